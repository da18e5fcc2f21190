"""Which part of a full tensor a rank holds, as a box, and how boxes of two layouts overlap.

A *box* is a tuple of ``(start, stop)`` per tensor axis. Under a layout (see :mod:`dinb.sharding.layout`)
rank ``r`` holds ``box = layout.slice_of(r, shape)``.

MindSpore's optimizer shard (``opt_weight_shard_size = s > 1``) splits that model-parallel slice
again along axis 0 into ``s`` equal parts, over the layout's *replica* device dimensions (the ones
no tensor axis uses), innermost (rightmost in ``dev_matrix``) first: the ranks of one optimizer
group differ only in those dimensions, so they are ``opt_weight_shard_step`` ranks apart. A
replica dimension larger than what is still needed is cut, and only its inner part is used. The
part a rank holds is its mixed-radix coordinate over the chosen dimensions, major first. Example:
``W(8, 12)``, ``dev_matrix=[2, 2]``, ``tensor_map=[-1, 0]`` (columns split by dimension 0),
``opt_weight_shard_size=2, step=2``: dimension 1 is the replica one, so rank ``r`` holds rows
``4*(r // 2) : 4*(r // 2) + 4`` of columns ``6*(r % 2) : 6*(r % 2) + 6``.

Resharding never merges a tensor: the target rank's box is intersected with every distinct
source box (replicas are read once), and only those intersections are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dinb.errors import LayoutError
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import ParamLayout

Box = tuple[tuple[int, int], ...]


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(s)) for s in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(e - s for s, e in box)


def box_size(box: Box) -> int:
    return math.prod(box_shape(box))


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None when they do not overlap."""
    out = tuple((max(s1, s2), min(e1, e2)) for (s1, e1), (s2, e2) in zip(a, b))
    return out if all(s < e for s, e in out) else None


def relative(inner: Box, outer: Box) -> tuple[Any, ...]:
    """``inner`` (a part of ``outer``) as an index into an array holding ``outer``.

    A 0-d tensor's box is ``()``, and ``a[()]`` of a 0-d array is a copy of its value, so a read
    into it would be lost: the index is then ``(...,)``, which gives a 0-d view.
    """
    return tuple(slice(s - o, e - o) for (s, e), (o, _) in zip(inner, outer)) or (Ellipsis,)


def opt_shard_size(item: ParamLayout) -> int:
    """Into how many parts the optimizer shard cuts axis 0 of the slice (1: no shard).

    MindSpore's ``-1`` means "over every replica": the product of the replica dimensions.
    """
    size = item.opt_weight_shard_size
    if size == -1:
        return math.prod(item.layout.dim_size(d) for d in item.layout.replica_dims)
    return max(size, 1)


def opt_shard_part(layout: Layout, rank: int, size: int) -> int:
    """Which of the ``size`` optimizer-shard parts of its slice ``rank`` holds (see module doc)."""
    k = len(layout.dev_matrix)
    replica_index = {k - 1 - d for d in layout.replica_dims}  # dev_matrix positions, left to right
    replica = [i for i in range(k) if i in replica_index and layout.dev_matrix[i] > 1]
    coord = layout.coord(rank)
    chosen: list[tuple[int, int]] = []  # (coordinate within the used part, size of that part)
    remaining = size
    for i in reversed(replica):
        if remaining == 1:
            break
        d = layout.dev_matrix[i]
        take = d if remaining >= d else remaining
        if remaining % take or d % take:
            raise LayoutError(
                f"opt_weight_shard_size {size} does not fit the replica dimensions of dev_matrix "
                f"{list(layout.dev_matrix)} (tensor_map {layout.to_json()['tensor_map']})"
            )
        chosen.insert(0, (coord[i] % take, take))
        remaining //= take
    if remaining != 1:
        raise LayoutError(
            f"opt_weight_shard_size {size} is larger than the "
            f"{math.prod(layout.dev_matrix[i] for i in replica)} replicas of layout {layout}"
        )
    part = 0
    for c, n in chosen:
        part = part * n + c
    return part


def param_box(item: ParamLayout, rank: int, shape: Sequence[int], name: str = "tensor") -> Box:
    """The box of a ``shape`` tensor that ``rank`` holds under ``item`` (optimizer shard included)."""
    lay = item.layout
    sl = lay.slice_of(rank, shape, name)
    box = [(s.start, s.stop) for s in sl]
    size = opt_shard_size(item)
    if size > 1 and shape:
        start, stop = box[0]
        if (stop - start) % size:
            raise LayoutError(
                f"{name}: axis 0 slice of {stop - start} rows does not split into "
                f"opt_weight_shard_size={size} parts"
            )
        part = opt_shard_part(lay, rank, size)
        rows = (stop - start) // size
        box[0] = (start + part * rows, start + (part + 1) * rows)
    return tuple(box)


def overlap_plan(target: Box, sources: Sequence[Box | None]) -> list[tuple[int, Box]]:
    """``[(source rank, intersection)]`` covering ``target`` once: replicas are read from one rank.

    Ranks holding the same box are replicas; the first of them in rank order is read. A source
    of None (a rank of another pipeline stage) holds nothing.
    """
    seen: set[Box] = set()
    plan = []
    for rank, box in enumerate(sources):
        if box is None or box in seen:
            continue
        seen.add(box)
        common = intersect(target, box)
        if common is not None:
            plan.append((rank, common))
    return plan
