"""Pictures of a split: which slice of a tensor each rank holds (matplotlib, metadata only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dinb.sharding.layout import Layout


def describe_slices(layout: Layout, shape: Sequence[int], name: str = "tensor") -> list[str]:
    """One line per rank: ``rank 0: w[0:48, 0:16]  (48, 16)``."""
    lines = []
    for r in range(layout.device_num):
        sl = layout.slice_of(r, shape, name)
        body = ", ".join(f"{s.start}:{s.stop}" for s in sl)
        lines.append(f"rank {r}: {name}[{body}]  {tuple(s.stop - s.start for s in sl)}")
    return lines


def draw_layout(layout: Layout, shape: Sequence[int], name: str = "", ax: Any = None) -> Any:
    """Draw the tensor as a grid of slices, each labelled and coloured by the ranks holding it.

    A 1-D tensor is drawn as one row. Replica groups share a tile, labelled with all their ranks.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shape2 = (1, shape[0]) if len(shape) == 1 else tuple(shape[:2])
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3 * shape2[0] / max(shape2[1], 1) + 0.6))
    cmap = plt.get_cmap("tab10")
    for group in layout.replica_groups():
        sl = layout.slice_of(group[0], shape, name or "tensor")
        rows = (0, 1) if len(shape) == 1 else (sl[0].start, sl[0].stop)
        cols = (sl[0].start, sl[0].stop) if len(shape) == 1 else (sl[1].start, sl[1].stop)
        ax.add_patch(Rectangle((cols[0], rows[0]), cols[1] - cols[0], rows[1] - rows[0],
                               facecolor=cmap(group[0] % 10), edgecolor="black", alpha=0.75))
        label = "r" + ",".join(map(str, group))
        ax.text((cols[0] + cols[1]) / 2, (rows[0] + rows[1]) / 2, label, ha="center",
                va="center", fontsize=9)
    ax.set_xlim(0, shape2[1])
    ax.set_ylim(shape2[0], 0)
    ax.set_title(f"{name} {tuple(shape)}\n{layout}", fontsize=8)
    ax.set_xlabel("columns")
    ax.set_ylabel("rows")
    return ax


def draw_reshard(source_boxes: Sequence[Any], target_box: Any, shape: Sequence[int], name: str = "",
                 ax: Any = None) -> Any:
    """Draw where a target rank's slice comes from: source slices coloured by rank, the target
    slice outlined in red, and the parts read from each source hatched.

    Boxes are ``((start, stop), ...)`` per axis (see :mod:`dinb.checkpoint.boxes`); 2-D tensors
    are drawn as they are, 1-D as one row.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from dinb.checkpoint.boxes import intersect

    def rect(box: Any) -> tuple[float, float, float, float]:
        if len(shape) == 1:
            return box[0][0], 0, box[0][1] - box[0][0], 1
        return box[1][0], box[0][0], box[1][1] - box[1][0], box[0][1] - box[0][0]

    shape2 = (1, shape[0]) if len(shape) == 1 else tuple(shape[:2])
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.2 * shape2[0] / max(shape2[1], 1) + 0.6))
    cmap = plt.get_cmap("tab10")
    seen: dict[Any, list[int]] = {}
    for r, box in enumerate(source_boxes):
        seen.setdefault(tuple(map(tuple, box)), []).append(r)
    for box, ranks in seen.items():
        x, y, w, h = rect(box)
        ax.add_patch(Rectangle((x, y), w, h, facecolor=cmap(ranks[0] % 10), edgecolor="grey", alpha=0.45))
        ax.text(x + w / 2, y + h / 2, "s" + ",".join(map(str, ranks)), ha="center", va="center", fontsize=8)
        common = intersect(tuple(map(tuple, target_box)), box)
        if common is not None:
            cx, cy, cw, ch = rect(common)
            ax.add_patch(Rectangle((cx, cy), cw, ch, fill=False, hatch="///", edgecolor="black", lw=0))
    x, y, w, h = rect(target_box)
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="red", lw=2.5))
    ax.set_xlim(0, shape2[1])
    ax.set_ylim(shape2[0], 0)
    ax.set_title(f"{name} {tuple(shape)}", fontsize=8)
    return ax
