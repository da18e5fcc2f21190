"""Pictures of a paged KV cache: the pool's blocks, who holds them, and each sequence's block table.

They draw a :meth:`dinb.runtime.block_pool.BlockPool.snapshot` (plain data). Every rank holds
the same blocks, each for its own key/value heads (the pool is split by heads, like the weights
of attention), so one picture of the pool is every rank's; ``per_rank`` names what each rank
holds of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def describe_block_pool(snapshot: Mapping[str, Any], per_rank: Sequence[str] = ()) -> list[str]:
    """One line per sequence (its block table, ``*`` a block shared from the prefix cache), one
    for the pool's blocks, then ``per_rank``."""
    blocks, size = snapshot["blocks"], snapshot["block_size"]
    free, evictable, refs = set(snapshot["free"]), set(snapshot["evictable"]), snapshot["refs"]
    held = blocks - len(free) - len(evictable)
    lines = [f"pool: {blocks} blocks of {size} positions: {held} held, {len(evictable)} cached, "
             f"{len(free)} free"]
    for seq, table in snapshot["tables"].items():
        shared = snapshot["shared"][seq]
        cells = " ".join(f"{b}*" if i < shared else str(b) for i, b in enumerate(table))
        lines.append(f"sequence {seq}: blocks [{cells}] = positions 0 .. {len(table) * size - 1}")
    marks = "".join("." if b in free else "c" if b in evictable else str(min(refs[b], 9))
                    for b in range(blocks))
    lines.append(f"blocks 0 .. {blocks - 1}: {marks}   (n: held by n sequences, c: cached, .: free)")
    return lines + list(per_rank)


def draw_block_pool(snapshot: Mapping[str, Any], ax: Any = None, title: str = "") -> Any:
    """The pool as a row of blocks coloured by the sequence holding them (a block held by several,
    a shared prefix, is hatched and labelled with its count; grey: cached, white: free), and under
    it each sequence's block table, each entry an arrow to its block."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    blocks, tables = snapshot["blocks"], snapshot["tables"]
    refs, evictable = snapshot["refs"], set(snapshot["evictable"])
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.55 * blocks), 1.4 + 0.6 * len(tables)))
    cmap = plt.get_cmap("tab10")
    owner: dict[int, int] = {}
    for i, table in enumerate(tables.values()):
        for b in table:
            owner.setdefault(b, i)
    for b in range(blocks):
        if refs[b] > 1:
            face, hatch, label = cmap(owner[b] % 10), "//", f"{b}\n×{refs[b]}"
        elif refs[b] == 1:
            face, hatch, label = cmap(owner[b] % 10), None, str(b)
        else:
            face, hatch, label = ("0.85" if b in evictable else "white"), None, str(b)
        ax.add_patch(Rectangle((b, 0), 0.9, 0.9, facecolor=face, edgecolor="black", hatch=hatch, alpha=0.8))
        ax.text(b + 0.45, 0.45, label, ha="center", va="center", fontsize=7)
    for i, (seq, table) in enumerate(tables.items()):  # each table: its entries in position order
        y, color = -1.6 - 1.1 * i, cmap(i % 10)
        ax.text(-0.3, y + 0.35, f"seq {seq}", ha="right", va="center", fontsize=8, color=color)
        for j, b in enumerate(table):
            ax.add_patch(Rectangle((j, y), 0.9, 0.7, facecolor="white", edgecolor=color))
            ax.text(j + 0.45, y + 0.35, str(b), ha="center", va="center", fontsize=7)
            ax.annotate("", xy=(b + 0.45, 0), xytext=(j + 0.45, y + 0.7),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 0.7, "alpha": 0.6})
    ax.set_xlim(-2.5, blocks + 0.2)
    ax.set_ylim(-1.8 - 1.1 * len(tables), 1.2)
    ax.axis("off")
    ax.set_title(title or f"pool: {blocks} blocks of {snapshot['block_size']} positions (hatched: shared)\n"
                 "below: each sequence's block table, in position order", fontsize=8)
    return ax
