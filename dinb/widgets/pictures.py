"""HTML and SVG pictures for the widgets: tile grids, bytes per rank, the collectives table.

Pure functions from plan values to small strings: they carry shapes, boxes and byte counts,
never tensor values. Elements carry ``data-*`` attributes (tile count, ranks, bytes) so tests
and browsers can read what is drawn.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from dinb.explore.costs import CostEstimate, RankBytes, Transfer
from dinb.explore.mesh import Tile
from dinb.units import fmt_bytes, fmt_seconds

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
           "#9c755f", "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf")
SEGMENTS = (("parameters", "#4e79a7"), ("copies", "#a0cbe8"), ("inputs", "#59a14f"),
            ("outputs", "#f28e2b"), ("KV cache", "#b07aa1"), ("workspace", "#bab0ac"))


def rank_colour(rank: int) -> str:
    return PALETTE[rank % len(PALETTE)]


def rank_list(ranks: Sequence[int]) -> str:
    """``r0``, ``r0,2``, ``r0-3`` (runs of consecutive ranks shortened)."""
    parts, i = [], 0
    ranks = list(ranks)
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(f"{ranks[i]}-{ranks[j]}" if j - i >= 2 else ",".join(map(str, ranks[i:j + 1])))
        i = j + 1
    return "r" + ",".join(parts)


def tile_grid_svg(name: str, shape: Sequence[int], tiles: Sequence[Tile], device_num: int,
                  width: int = 220) -> str:
    """The tensor as a rectangle cut into its slices, each filled with the colour of the first
    rank holding it; a replica group shows a strip of all its ranks' colours along the bottom.

    A 2-D tensor is drawn rows x columns; 1-D as one row; more axes: the first two.
    """
    shape = tuple(shape)
    if len(shape) == 0:
        rows, cols, ax_r, ax_c = 1, 1, None, None
    elif len(shape) == 1:
        rows, cols, ax_r, ax_c = 1, shape[0], None, 0
    else:
        rows, cols, ax_r, ax_c = shape[0], shape[1], 0, 1
    if ax_r is None:
        height = 30
    else:
        height = int(round(width * min(max(rows / cols, 0.15), 1.0)))
    parts = [f'<svg class="dinb-tiles" data-tensor="{html.escape(name)}" data-tiles="{len(tiles)}" '
             f'data-devices="{device_num}" width="{width + 2}" height="{height + 2}" '
             f'viewBox="-1 -1 {width + 2} {height + 2}" xmlns="http://www.w3.org/2000/svg">']
    for tile in tiles:
        r0, r1 = (0, rows) if ax_r is None else tile.box[ax_r]
        c0, c1 = (0, cols) if ax_c is None else tile.box[ax_c]
        x, w = c0 / cols * width, (c1 - c0) / cols * width
        y, h = r0 / rows * height, (r1 - r0) / rows * height
        box = ", ".join(f"{a}:{b}" for a, b in tile.box)
        ranks = ",".join(map(str, tile.ranks))
        parts.append(f'<g class="dinb-tile" data-ranks="{ranks}" data-box="{box}">'
                     f'<title>{html.escape(name)}[{box}] on ranks {ranks}</title>'
                     f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                     f'fill="{rank_colour(tile.ranks[0])}" fill-opacity="0.8" stroke="#222" '
                     'stroke-width="0.8"/>')
        if len(tile.ranks) > 1 and h >= 10:
            sw = w / len(tile.ranks)
            for i, r in enumerate(tile.ranks):
                parts.append(f'<rect x="{x + i * sw:.1f}" y="{y + h - 5:.1f}" width="{sw:.1f}" height="5" '
                             f'fill="{rank_colour(r)}"/>')
        label = rank_list(tile.ranks)
        if w >= 7 * len(label) * 0.75 and h >= 12:
            parts.append(f'<text x="{x + w / 2:.1f}" y="{y + h / 2 + 3:.1f}" font-size="10" '
                         f'text-anchor="middle" fill="#111">{label}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def rank_legend(device_num: int) -> str:
    """A row of colour swatches, one per rank."""
    items = "".join(f'<span style="display:inline-block;margin-right:6px"><span style="display:inline-block;'
                    f'width:10px;height:10px;background:{rank_colour(r)};margin-right:2px"></span>r{r}</span>'
                    for r in range(device_num))
    return f'<div class="dinb-legend" style="font-size:11px">{items}</div>'


def bytes_bars_svg(rows: Sequence[RankBytes], capacity: float, width: int = 420) -> str:
    """One stacked bar per rank (parameters, copies among them, inputs, outputs, a decoder's KV
    cache, workspace),
    with the device capacity as a dashed line; a capacity far above every bar is left off the
    scale (and said so) so the bars stay readable."""
    largest = max([r.total for r in rows] + [1])
    on_scale = capacity <= 4 * largest
    top = max(capacity, largest) if on_scale else largest * 1.1
    staged = any(r.stage for r in rows)  # pipeline stages: each bar says its stage
    bar_h, gap, left, label_w = 14, 4, 52 if staged else 34, 170
    height = len(rows) * (bar_h + gap) + 30
    parts = [f'<svg class="dinb-bytes" data-ranks="{len(rows)}" data-capacity="{int(capacity)}" '
             f'width="{left + width + label_w}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for i, row in enumerate(rows):
        y = i * (bar_h + gap)
        x = float(left)
        over = row.total > capacity
        label = f"s{row.stage} r{row.rank}" if staged else f"r{row.rank}"
        parts.append(f'<g class="dinb-rank-bar" data-rank="{row.rank}" data-stage="{row.stage}" '
                     f'data-bytes="{row.total}"><text x="0" y="{y + 11}" font-size="11">{label}</text>')
        values = (row.parameters - row.replicated, row.replicated, row.inputs, row.outputs, row.cache,
                  row.workspace)
        for (label, colour), v in zip(SEGMENTS, values):
            w = v / top * width
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" '
                             f'fill="{colour}"><title>{label}: {fmt_bytes(v)}</title></rect>')
                x += w
        share = row.total / capacity * 100 if capacity else 0
        parts.append(f'<text x="{left + width + 12}" y="{y + 11}" font-size="11" '
                     f'fill="{"#c00" if over else "#222"}">{fmt_bytes(row.total)} ({share:.3g}% of '
                     f'{fmt_bytes(capacity)}){" OVER" if over else ""}</text></g>')
    if on_scale:
        cap_x = left + capacity / top * width
        parts.append(f'<line x1="{cap_x:.1f}" y1="0" x2="{cap_x:.1f}" y2="{height - 26}" stroke="#c00" '
                     'stroke-dasharray="4 3"/>')
    lx = left
    for label, colour in SEGMENTS:
        parts.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{lx + 13}" y="{height - 5}" font-size="10">{label}</text>')
        lx += 20 + 6 * len(label)
    cap = "- - capacity" if on_scale else f"capacity {fmt_bytes(capacity)} is off the scale"
    parts.append(f'<text x="{lx}" y="{height - 5}" font-size="10" fill="#c00">{cap}</text></svg>')
    return "".join(parts)


def transfers_html(transfers: Sequence[Transfer], micro_batches: int) -> str:
    """The activations each stage hands the next: values, bytes per rank pair, time."""
    if not transfers:
        return ""
    rows = "".join(
        f'<tr class="dinb-transfer" data-stage="{t.stage}" data-bytes="{t.bytes_per_rank}">'
        f"<td>stage {t.stage} &rarr; {t.stage + 1}</td>"
        f"<td>{html.escape(', '.join(f'{d}{list(s)}' for s, d in t.values))}</td><td>{t.pairs}</td>"
        f"<td>{fmt_bytes(t.bytes_per_rank)}</td><td>{fmt_bytes(t.bytes_per_rank / micro_batches)} x "
        f"{micro_batches}</td><td>{fmt_seconds(t.seconds)}</td></tr>" for t in transfers)
    head = ("<tr><th>between</th><th>values (whole batch)</th><th>rank pairs</th><th>bytes per rank</th>"
            "<th>per micro-batch</th><th>time</th></tr>")
    return (f'<table class="dinb-transfers" style="font-size:12px">{head}{rows}</table>'
            '<p style="font-size:11px;color:#555">rank j of a stage sends to rank j of the next, all pairs '
            "at once; the last stage's ranks keep the outputs</p>")


def collectives_html(cost: CostEstimate) -> str:
    """The collectives XLA inserted, with bytes sent per rank and time, and the totals."""
    if not cost.collectives:
        body = ('<p class="dinb-no-collectives">No collectives: every rank computes its part without '
                'talking to the others.</p>')
    else:
        head = ("<tr><th>#</th><th>collective</th><th>ranks/group</th><th>groups</th><th>per-rank shape</th>"
                "<th>sent per rank</th><th>time</th></tr>")
        rows = "".join(
            f'<tr class="dinb-collective" data-kind="{c.kind}" data-bytes="{c.bytes}" '
            f'data-group-size="{c.group_size}"><td>{i}</td><td><b>{c.kind}</b></td><td>{c.group_size}</td>'
            f"<td>{html.escape(c.groups_text())}</td><td>{html.escape(c.shape_text())}</td>"
            f"<td>{fmt_bytes(c.bytes_sent_per_rank)}</td><td>{fmt_seconds(s)}</td></tr>"
            for i, (c, s) in enumerate(cost.collectives))
        style = "<style>.dinb-collectives td, .dinb-collectives th {padding: 1px 8px}</style>"
        body = f'{style}<table class="dinb-collectives" style="font-size:12px">{head}{rows}</table>'
    share = cost.comm_s / cost.total_s * 100 if cost.total_s else 0.0
    summary = (f'<p class="dinb-cost" style="font-size:12px">compute: {cost.flops / 1e9:.3g} GFLOP per rank '
               f"at {cost.tflop_per_s:g} TFLOP/s = <b>{fmt_seconds(cost.compute_s)}</b>; communication: "
               f"{fmt_bytes(cost.bytes_sent)} sent per rank at {cost.link_gb_per_s:g} GB/s = "
               f"<b>{fmt_seconds(cost.comm_s)}</b> ({share:.3g}% of the estimated step)</p>")
    return body + summary


def schedule_svg(blocks: Sequence[tuple[int, int, float, float]], stages: int, width: int = 520,
                 unit: str = "tick") -> str:
    """A pipeline schedule: one row per stage, time to the right, one block per (stage,
    micro-batch) computation coloured by micro-batch; the white gaps are the bubble.

    ``blocks`` are ``(stage, micro, start, end)`` in any time unit starting at 0 (GPipe's ideal
    schedule in ticks, or a measured one in milliseconds).
    """
    end = max((b[3] for b in blocks), default=1.0) or 1.0
    row_h, left, top = 22, 58, 4
    height = top + stages * row_h + 24
    parts = [f'<svg class="dinb-schedule" data-stages="{stages}" data-blocks="{len(blocks)}" '
             f'width="{left + width + 10}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for s in range(stages):
        y = top + s * row_h
        parts.append(f'<text x="0" y="{y + 15}" font-size="11">stage {s}</text>'
                     f'<rect x="{left}" y="{y}" width="{width}" height="{row_h - 4}" fill="#f4f4f4"/>')
    for stage, micro, start, stop in blocks:
        x, w = left + start / end * width, max((stop - start) / end * width, 0.8)
        y = top + stage * row_h
        parts.append(f'<g class="dinb-block" data-stage="{stage}" data-micro="{micro}">'
                     f'<title>stage {stage}, micro-batch {micro}: {start:.3g}-{stop:.3g} {unit}</title>'
                     f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 4}" '
                     f'fill="{rank_colour(micro)}" stroke="#222" stroke-width="0.5"/>')
        if w >= 14:
            parts.append(f'<text x="{x + w / 2:.1f}" y="{y + 13}" font-size="10" text-anchor="middle" '
                         f'fill="#fff">{micro}</text>')
        parts.append("</g>")
    axis_y = top + stages * row_h + 12
    parts.append(f'<text x="{left}" y="{axis_y}" font-size="10">0</text>'
                 f'<text x="{left + width}" y="{axis_y}" font-size="10" text-anchor="end">'
                 f'{end:.3g} {unit}</text>'
                 f'<text x="{left + width / 2}" y="{axis_y}" font-size="10" text-anchor="middle">'
                 f'time; colour = micro-batch</text></svg>')
    return "".join(parts)


def block_pool_svg(snapshot: dict, width: int = 560) -> str:
    """A paged cache's pool (:meth:`~dinb.runtime.block_pool.BlockPool.snapshot`) as a row of
    blocks: coloured by the sequence holding it (several holders, a shared prefix: striped, with
    the count), grey cached, white free; under it each sequence's block table, its entries in
    position order. ``data-*``: blocks, held, cached, free; each block its ``data-refs``."""
    blocks, tables, refs = snapshot["blocks"], snapshot["tables"], snapshot["refs"]
    free, cached = set(snapshot["free"]), set(snapshot["evictable"])
    owner: dict[int, int] = {}
    for i, table in enumerate(tables.values()):
        for b in table:
            owner.setdefault(b, i)
    cell = max(8.0, min(28.0, (width - 60) / max(blocks, 1)))
    height = 48 + 22 * len(tables)
    held = blocks - len(free) - len(cached)
    parts = [f'<svg class="dinb-pool" data-blocks="{blocks}" data-held="{held}" data-cached="{len(cached)}" '
             f'data-free="{len(free)}" width="{max(60 + cell * blocks + 2, 460):.0f}" height="{height}" '
             'xmlns="http://www.w3.org/2000/svg" style="font:9px sans-serif">',
             '<defs><pattern id="dinb-shared" width="4" height="4" patternUnits="userSpaceOnUse" '
             'patternTransform="rotate(45)"><rect width="2" height="4" fill="#ffffff" opacity="0.6"/>'
             '</pattern></defs>', '<text x="0" y="15">pool</text>']
    for b in range(blocks):
        x = 60 + cell * b
        fill = rank_colour(owner[b]) if refs[b] else "#cccccc" if b in cached else "#ffffff"
        parts.append(f'<rect class="dinb-block" data-block="{b}" data-refs="{refs[b]}" x="{x:.1f}" y="2" '
                     f'width="{cell - 1:.1f}" height="20" fill="{fill}" stroke="#333" stroke-width="0.5"/>')
        label = str(b)
        if refs[b] > 1:
            parts.append(f'<rect x="{x:.1f}" y="2" width="{cell - 1:.1f}" height="20" '
                         'fill="url(#dinb-shared)"/>')
            label = f"{b}×{refs[b]}"
        parts.append(f'<text x="{x + cell / 2:.1f}" y="16" text-anchor="middle">{label}</text>')
    for i, (seq, table) in enumerate(tables.items()):
        y = 30 + 22 * i
        parts.append(f'<text x="0" y="{y + 12}" fill="{rank_colour(i)}">seq {html.escape(str(seq))}</text>')
        for j, b in enumerate(table):
            x = 60 + cell * j
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{cell - 1:.1f}" height="16" fill="#ffffff" '
                         f'stroke="{rank_colour(i)}"/><text x="{x + cell / 2:.1f}" y="{y + 12}" '
                         f'text-anchor="middle">{b}</text>')
    parts.append(f'<text x="0" y="{height - 2}" fill="#555">colour: the sequence holding a block '
                 '(striped, b×n: shared by n), grey: cached, white: free</text></svg>')
    return "".join(parts)
