"""``RankOutputs``: what every rank returned from one predict, one panel per rank.

Each panel names the outputs with shape, dtype, min/max/mean and a heatmap. The heatmap is the
output block-averaged down to at most ``max_side`` x ``max_side`` cells (an ``(m, n)`` array
becomes ``ceil(m/bm) x ceil(n/bn)`` means of ``bm x bn`` blocks), so a large output never
travels to the browser; one colour scale is shared by all ranks so panels compare by eye.
Above the panels: whether every rank holds the same values (bitwise), and, given a reference,
the largest difference from it.

Accepts a :class:`dinb.notebook.cluster.PredictResult` (``%dinfer outputs`` shows one), a
``{rank: [arrays]}`` mapping (``Model.rank_outputs()``), or a list of per-rank lists. With
pipeline stages only the last stage's ranks have outputs; the others get a panel saying so.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as w
import numpy as np

from dinb.sharding.layout import Layout
from dinb.widgets.pictures import rank_colour


@dataclass(frozen=True)
class OutputStats:
    """A small summary of one array."""

    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, a: np.ndarray) -> OutputStats:
        if a.size == 0:
            return cls(tuple(a.shape), str(a.dtype), math.nan, math.nan, math.nan)
        f = a.astype(np.float64, copy=False)
        return cls(tuple(a.shape), str(a.dtype), float(f.min()), float(f.max()), float(f.mean()))

    def text(self) -> str:
        return (f"{list(self.shape)} {self.dtype} min {_num(self.min)} max {_num(self.max)} "
                f"mean {_num(self.mean)}")


def _num(v: float) -> str:
    """Four significant digits, with -0 shown as 0 (stable text for golden outputs)."""
    s = f"{v:.4g}"
    return "0" if s == "-0" else s


def as_2d(a: np.ndarray) -> np.ndarray:
    """A 2-D view for drawing: scalars and vectors become one row, more axes fold into rows."""
    a = np.asarray(a)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(1, -1)
    return a.reshape(-1, a.shape[-1])


def downsample(a: np.ndarray, max_side: int = 64) -> np.ndarray:
    """Block means of a 2-D array so neither side exceeds ``max_side`` (see the module docstring)."""
    a = as_2d(a).astype(np.float64, copy=False)
    m, n = a.shape
    bm, bn = max(1, math.ceil(m / max_side)), max(1, math.ceil(n / max_side))
    if bm == 1 and bn == 1:
        return a
    pm, pn = math.ceil(m / bm) * bm, math.ceil(n / bn) * bn
    padded = np.full((pm, pn), np.nan)
    padded[:m, :n] = a
    with np.errstate(invalid="ignore"):
        return np.nanmean(padded.reshape(pm // bm, bm, pn // bn, bn), axis=(1, 3))


def heatmap_png(cells: np.ndarray, vmin: float, vmax: float) -> bytes:
    """A PNG of a small 2-D array (one pixel per cell, viridis).

    ``matplotlib.image`` writes it without pyplot, so the notebook's plotting backend is left as is.
    """
    from matplotlib.image import imsave

    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    buf = io.BytesIO()
    imsave(buf, np.nan_to_num(cells, nan=vmin), vmin=vmin, vmax=vmax, cmap="viridis", format="png")
    return buf.getvalue()


def _per_rank(result: Any) -> dict[int, list[np.ndarray]]:
    if hasattr(result, "per_rank"):
        result = result.per_rank
    if isinstance(result, Mapping):
        return {int(r): [np.asarray(a) for a in outs] for r, outs in sorted(result.items())}
    return {r: [np.asarray(a) for a in outs] for r, outs in enumerate(result)}


class RankOutputs(w.VBox):
    """One panel per rank for one predict's outputs (see the module docstring).

    ``layouts`` (one per output) say which ranks hold the same slice: agreement is then checked
    within each replica group, so a sharded output is not mistaken for a disagreement.
    """

    def __init__(self, result: Any, names: Sequence[str] | None = None,
                 reference: np.ndarray | Sequence[np.ndarray] | None = None, max_side: int = 64,
                 rtol: float = 1e-5, atol: float = 1e-5, layouts: Sequence[Layout] | None = None,
                 stage_ranks: int | None = None):
        every = _per_rank(result)
        # ranks of earlier pipeline stages return nothing: their activations went to the next stage
        self.silent = [r for r, outs in every.items() if not outs]
        self.per_rank = {r: outs for r, outs in every.items() if outs}
        if not self.per_rank:
            raise ValueError("no rank outputs to show; run a predict first")
        self.stage_ranks = stage_ranks or (len(every) - len(self.silent) if self.silent else None)
        first = next(iter(self.per_rank.values()))
        self.names = list(names) if names else [f"output_{i}" for i in range(len(first))]
        self.layouts = list(layouts) if layouts else None
        if reference is not None and not isinstance(reference, (list, tuple)):
            reference = [reference]
        self.reference = None if reference is None else [np.asarray(r) for r in reference]
        self.stats = {r: [OutputStats.of(a) for a in outs] for r, outs in self.per_rank.items()}
        self.agreement = [self._agreement(i) for i in range(len(first))]
        compared = {r: [self._difference(i, a, rtol, atol) for i, a in enumerate(outs)]
                    for r, outs in self.per_rank.items()}
        self.differences = {r: [text for text, _ in c] for r, c in compared.items()}
        self._close = [ok for c in compared.values() for _, ok in c if ok is not None]
        panels = [self._silent_panel(r) if r in self.silent else self._panel(r, max_side) for r in every]
        header = w.HTML("<br>".join(html.escape(line) for line in self._header_lines()))
        header.add_class("dinb-agreement")
        grid = w.GridBox(panels, layout=w.Layout(grid_template_columns="repeat(auto-fill, 250px)",
                                                 grid_gap="6px"))
        super().__init__([header, grid])
        self.add_class("dinb-rank-outputs")

    @classmethod
    def from_model(cls, model: Any, reference: Any = None, **kwargs: Any) -> RankOutputs:
        """The last predict of a :class:`dinb.Model` (simulated ranks), with its output layouts."""
        meta = model.output_meta()
        pipe = model.pipeline_info()
        return cls(model.rank_outputs(), [m.name for m in meta], reference,
                   layouts=[m.layout for m in meta],
                   stage_ranks=pipe["stage_ranks"] if pipe else None, **kwargs)

    def _stage(self, rank: int) -> int | None:
        return rank // self.stage_ranks if self.silent and self.stage_ranks else None

    @property
    def agree(self) -> bool:
        """Ranks that should hold the same values (a replica group; all, without layouts) do."""
        return not any(odd for _, odd in self.agreement)

    @property
    def within_reference(self) -> bool | None:
        """Every rank's outputs are within tolerance of the reference (None without one)."""
        if self.reference is None:
            return None
        return all(self._close)

    def _agreement(self, i: int) -> tuple[str, list[int]]:
        """``(kind, odd ranks)``: kind is ``whole``, ``sharded`` or ``shapes differ``."""
        ranks = list(self.per_rank)
        if self.layouts is not None and i < len(self.layouts):
            # the layouts span the last stage's ranks; its rank j is global rank ranks[0] + j
            base = ranks[0] if self.silent else 0
            groups = [[base + r for r in g if base + r in self.per_rank]
                      for g in self.layouts[i].replica_groups()]
            kind = "sharded" if len(groups) > 1 else "whole"
        elif len({self.per_rank[r][i].shape for r in ranks}) > 1:
            return "shapes differ", []
        else:
            groups, kind = [ranks], "whole"
        odd = []
        for g in (g for g in groups if g):
            base = self.per_rank[g[0]][i]
            odd += [r for r in g[1:] if self.per_rank[r][i].shape != base.shape
                    or not np.array_equal(self.per_rank[r][i], base)]
        return kind, odd

    def _header_lines(self) -> list[str]:
        n = len(self.per_rank)
        lines = []
        if self.silent:
            lines.append(f"ranks {self.silent} (earlier pipeline stages) return no outputs; the last "
                         f"stage's ranks {list(self.per_rank)} do")
        for name, (kind, odd) in zip(self.names, self.agreement):
            if odd:
                lines.append(f"{name}: ranks {odd} differ from the ranks that should hold the same values")
            elif kind == "shapes differ":
                lines.append(f"{name}: each rank holds its own slice (shapes differ; pass layouts= to check "
                             "the copies)")
            elif kind == "sharded":
                lines.append(f"{name}: sharded; the ranks holding each slice agree (bitwise)")
            else:
                lines.append(f"{name}: all {n} ranks agree (bitwise)" if n > 1 else f"{name}: one rank")
        return lines

    def _difference(self, i: int, a: np.ndarray, rtol: float, atol: float) -> tuple[str, bool | None]:
        """Text for the panel, and whether ``a`` is within tolerance (None: not comparable)."""
        if self.reference is None or i >= len(self.reference):
            return "", None
        ref = self.reference[i]
        if ref.shape != a.shape:
            return f"reference shape {list(ref.shape)} differs (this rank holds a slice)", None
        diff = float(np.max(np.abs(a.astype(np.float64) - ref.astype(np.float64)))) if a.size else 0.0
        ok = np.allclose(a, ref, rtol=rtol, atol=atol)
        verdict = "within" if ok else "OUTSIDE"
        return f"max |diff| vs reference {diff:.2e} ({verdict} rtol={rtol:g}, atol={atol:g})", bool(ok)

    def _silent_panel(self, rank: int) -> w.Widget:
        stage = self._stage(rank)
        where = f" (stage {stage})" if stage is not None else ""
        panel = w.VBox([w.HTML(f'<b style="color:{rank_colour(rank)}">rank {rank}</b>{where}'),
                        w.HTML('<div style="font-size:11px"><i>no outputs: it sent its activations '
                               'to the next stage</i></div>')],
                       layout=w.Layout(border="1px dashed #ccc", padding="4px"))
        panel.add_class("dinb-rank-panel")
        return panel

    def _panel(self, rank: int, max_side: int) -> w.Widget:
        parts: list[w.Widget] = [w.HTML(f'<b style="color:{rank_colour(rank)}">rank {rank}</b>')]
        for i, (a, st) in enumerate(zip(self.per_rank[rank], self.stats[rank])):
            vmin = min(s[i].min for s in self.stats.values())
            vmax = max(s[i].max for s in self.stats.values())
            cells = downsample(a, max_side)
            text = f"<b>{html.escape(self.names[i])}</b> {html.escape(st.text())}"
            if cells.shape != as_2d(a).shape:
                text += f"<br><i>heatmap: {cells.shape[0]}x{cells.shape[1]} block means</i>"
            if self.differences[rank][i]:
                text += f"<br>{html.escape(self.differences[rank][i])}"
            parts.append(w.HTML(f'<div style="font-size:11px">{text}</div>'))
            if a.size:
                img = w.Image(value=heatmap_png(cells, vmin, vmax), format="png",
                              layout=w.Layout(width="240px", height=f"{_height(cells.shape, 240)}px"))
                img.add_class("dinb-heatmap")
                parts.append(img)
        panel = w.VBox(parts, layout=w.Layout(border="1px solid #ddd", padding="4px"))
        panel.add_class("dinb-rank-panel")
        return panel

    def summary(self) -> str:
        """The panels as text (also the widget's plain-text form, so golden outputs compare)."""
        lines = [f"rank {r}: no outputs (stage {self._stage(r)})" for r in self.silent]
        for rank, stats in self.stats.items():
            body = "; ".join(f"{n} {s.text()}" for n, s in zip(self.names, stats))
            diffs = [d for d in self.differences[rank] if d]
            lines.append(f"rank {rank}: {body}" + (f"; {'; '.join(diffs)}" if diffs else ""))
        return "\n".join(lines + self._header_lines())

    def __repr__(self) -> str:
        return self.summary()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # ipywidgets cuts the plain text at 110 characters
            bundle["text/plain"] = self.summary()
        return bundle


def _height(shape: tuple[int, ...], width: int) -> int:
    return int(max(12, min(width * 1.5, width * shape[0] / max(shape[1], 1))))
