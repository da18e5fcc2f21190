"""Meshes and tensor_map entries as the explorer offers them: every factorisation of the device
count into mesh axes, the choices for one tensor axis, and the tiles a layout cuts a tensor into."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dinb.sharding.layout import MapEntry, entry_dims


@dataclass(frozen=True)
class AxisChoice:
    """One way to split one tensor axis: ``entry`` as in a tensor_map, and whether it is allowed."""

    entry: MapEntry
    label: str
    parts: int
    valid: bool
    reason: str = ""


@dataclass(frozen=True)
class Tile:
    """One distinct slice: the ranks holding it (a replica group) and its box per axis."""

    ranks: tuple[int, ...]
    box: tuple[tuple[int, int], ...]


# ---- the plan ----------------------------------------------------------------------------------
def mesh_choices(device_num: int, max_axes: int = 3) -> list[tuple[int, ...]]:
    """Every mesh for ``device_num`` devices: ordered factorisations into at most ``max_axes``
    sizes > 1 (``[N]`` first)."""
    if device_num == 1:
        return [(1,)]
    found: list[tuple[int, ...]] = []

    def grow(prefix: tuple[int, ...], left: int) -> None:
        if left == 1:
            found.append(prefix)
            return
        if len(prefix) == max_axes:
            return
        for d in range(2, left + 1):
            if left % d == 0:
                grow(prefix + (d,), left // d)

    grow((), device_num)
    return sorted(found, key=lambda m: (len(m), m))


def mesh_label(mesh: Sequence[int]) -> str:
    """``d1=2 × d0=4`` for ``[2, 4]`` (device dimensions count from the right)."""
    k = len(mesh)
    return " × ".join(f"d{k - 1 - i}={s}" for i, s in enumerate(mesh))


def entry_label(entry: MapEntry, mesh: Sequence[int]) -> str:
    """``—`` (whole), ``d0 ×4``, ``d1·d0 ×8``."""
    dims = entry_dims(entry)
    if not dims:
        return "—"
    k = len(mesh)
    return "·".join(f"d{d}" for d in dims) + f" ×{math.prod(mesh[k - 1 - d] for d in dims)}"


def dims_entry(dims: Sequence[int]) -> MapEntry:
    """The ``tensor_map`` entry that splits an axis over ``dims`` (the inverse of :func:`entry_dims`)."""
    return -1 if not dims else dims[0] if len(dims) == 1 else tuple(dims)
