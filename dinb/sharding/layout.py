"""How one tensor is split over the devices of a job: MindSpore's ``dev_matrix`` + ``tensor_map``.

The devices (ranks ``0 .. n-1``) are arranged in a grid ``dev_matrix = [d_{k-1}, ..., d_0]``.
Device dimensions are counted **from the right**: dimension ``j`` has size
``dev_matrix[k-1-j]``. Rank ``r`` sits at ``coord = np.unravel_index(r, dev_matrix)``
(row-major, last entry fastest), so its position along device dimension ``j`` is
``coord[k-1-j]``.

``tensor_map[a]`` says how tensor axis ``a`` is split:

* ``-1``: not split, every rank holds the whole axis;
* ``j``: split into ``dev_matrix[k-1-j]`` equal parts, rank ``r`` holds part ``coord[k-1-j]``;
* ``(j1, j2, ...)``: split over several device dimensions at once, the first one major:
  ``parts = size(j1) * size(j2) * ...`` and ``part = (coord_j1 * size(j2) + coord_j2) ...``.

Device dimensions no axis uses are *replica* dimensions: ranks that differ only there hold the
same slice. Worked example, ``W`` of shape ``(96, 16)``, ``dev_matrix=[2, 2]``::

    tensor_map=[1, 0]   slices (48, 8):  rank 0 -> W[0:48, 0:8]    rank 1 -> W[0:48, 8:16]
                                         rank 2 -> W[48:96, 0:8]   rank 3 -> W[48:96, 8:16]
    tensor_map=[1, -1]  slices (48, 16): ranks {0, 1} hold W[0:48], ranks {2, 3} hold W[48:96]

The same split in JAX: a ``Mesh`` of the devices reshaped to ``dev_matrix`` with axis names
``("d{k-1}", ..., "d0")`` and a ``PartitionSpec`` naming, per tensor axis, the mesh axes of its
``tensor_map`` entry. :meth:`Layout.named_sharding` builds it; its ``devices_indices_map`` agrees
with :meth:`Layout.slice_of` (a property test checks this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dinb.errors import LayoutError

if TYPE_CHECKING:  # jax is imported lazily: a rank must configure it before the first import
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

MapEntry = int | tuple[int, ...]
MAX_DEVICES = 1 << 20  # more ranks than any job has: a layout claiming more comes from a damaged file


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def axis_name(dim: int) -> str:
    """Name of the JAX mesh axis for MindSpore device dimension ``dim`` (counted from the right)."""
    return f"d{dim}"


@dataclass(frozen=True)
class Layout:
    """The split of one tensor over a device grid (see the module docstring for the math)."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[MapEntry, ...]

    def __init__(self, dev_matrix: Sequence[int], tensor_map: Sequence[MapEntry | Sequence[int]]):
        dm = tuple(_as_int(d, "dev_matrix entry") for d in dev_matrix)
        tm = tuple(_normalize_entry(e) for e in tensor_map)
        object.__setattr__(self, "dev_matrix", dm)
        object.__setattr__(self, "tensor_map", tm)
        self._validate()

    def _validate(self) -> None:
        if len(self.dev_matrix) > 64 or len(self.tensor_map) > 64:
            raise LayoutError(
                f"a layout with {len(self.dev_matrix)} device dimensions and {len(self.tensor_map)} tensor "
                "axes; dinb handles at most 64 of each (is the strategy file damaged?)"
            )
        if not self.dev_matrix or any(d < 1 for d in self.dev_matrix):
            raise LayoutError(
                f"dev_matrix {list(self.dev_matrix)} must be a non-empty list of positive sizes"
            )
        if self.device_num > MAX_DEVICES:
            raise LayoutError(
                f"dev_matrix {list(self.dev_matrix)} spans {self.device_num} devices; dinb handles at most "
                f"{MAX_DEVICES} (is the strategy file damaged?)"
            )
        k = len(self.dev_matrix)
        used: list[int] = []
        for axis, entry in enumerate(self.tensor_map):
            for dim in entry_dims(entry):
                if not 0 <= dim < k:
                    raise LayoutError(
                        f"tensor_map[{axis}] = {dim} names device dimension {dim}, but dev_matrix "
                        f"{list(self.dev_matrix)} has dimensions 0..{k - 1} (use -1 for 'not split')"
                    )
                if dim in used:
                    raise LayoutError(
                        f"device dimension {dim} is used twice in tensor_map "
                        f"{_map_list(self.tensor_map)}; each dimension may split one axis only"
                    )
                used.append(dim)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def device_num(self) -> int:
        """Number of ranks the layout spans: the product of ``dev_matrix``."""
        return math.prod(self.dev_matrix)

    @property
    def rank(self) -> int:
        """Number of tensor axes the layout describes."""
        return len(self.tensor_map)

    def dim_size(self, dim: int) -> int:
        """Size of device dimension ``dim`` (counted from the right)."""
        return self.dev_matrix[len(self.dev_matrix) - 1 - dim]

    def parts(self, axis: int) -> int:
        """Into how many parts tensor axis ``axis`` is split."""
        return math.prod(self.dim_size(d) for d in entry_dims(self.tensor_map[axis]))

    @property
    def replica_dims(self) -> tuple[int, ...]:
        """Device dimensions that split no axis (ranks along them hold copies)."""
        used = {d for e in self.tensor_map for d in entry_dims(e)}
        return tuple(d for d in range(len(self.dev_matrix)) if d not in used)

    # ---- slices ------------------------------------------------------------------------------
    def check_shape(self, shape: Sequence[int], name: str = "tensor") -> None:
        """Raise :class:`LayoutError` unless this layout divides ``shape`` evenly.

        The message lists, for each offending axis, the part counts that would divide it.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.rank:
            raise LayoutError(
                f"{name} has shape {list(shape)} ({len(shape)} axes) but its layout's tensor_map "
                f"{_map_list(self.tensor_map)} describes {self.rank} axes"
            )
        for axis, size in enumerate(shape):
            parts = self.parts(axis)
            if size % parts:
                raise LayoutError(
                    f"{name}: axis {axis} has size {size}, which does not split into {parts} equal "
                    f"parts (tensor_map[{axis}] = {_entry_str(self.tensor_map[axis])}, dev_matrix "
                    f"{list(self.dev_matrix)}). Part counts that divide {size}: "
                    f"{', '.join(map(str, _divisors(size)))}. Choose one of them, or leave the "
                    f"axis unsplit (-1)."
                )

    def slice_shape(self, shape: Sequence[int], name: str = "tensor") -> tuple[int, ...]:
        """Shape of the slice every rank holds: ``shape[a] // parts(a)`` per axis."""
        self.check_shape(shape, name)
        return tuple(int(s) // self.parts(a) for a, s in enumerate(shape))

    def coord(self, rank: int) -> tuple[int, ...]:
        """Rank's position in the device grid, ``np.unravel_index(rank, dev_matrix)``."""
        if not 0 <= rank < self.device_num:
            raise LayoutError(
                f"rank {rank} is outside this layout's {self.device_num} devices "
                f"(dev_matrix {list(self.dev_matrix)})"
            )
        return tuple(int(c) for c in np.unravel_index(rank, self.dev_matrix))

    def part_index(self, rank: int, axis: int) -> int:
        """Which of the ``parts(axis)`` parts of tensor axis ``axis`` rank ``rank`` holds."""
        coord = self.coord(rank)
        k = len(self.dev_matrix)
        index = 0
        for dim in entry_dims(self.tensor_map[axis]):
            index = index * self.dim_size(dim) + coord[k - 1 - dim]
        return index

    def slice_of(self, rank: int, shape: Sequence[int], name: str = "tensor") -> tuple[slice, ...]:
        """The slice of a tensor of ``shape`` that ``rank`` holds, as a tuple of ``slice``."""
        sub = self.slice_shape(shape, name)
        return tuple(
            slice(self.part_index(rank, a) * n, (self.part_index(rank, a) + 1) * n)
            for a, n in enumerate(sub)
        )

    def replica_groups(self) -> list[tuple[int, ...]]:
        """Ranks grouped by the slice they hold; a group of one means no copy exists."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.device_num):
            key = tuple(self.part_index(r, a) for a in range(self.rank))
            groups.setdefault(key, []).append(r)
        return [tuple(g) for g in groups.values()]

    # ---- JAX view ----------------------------------------------------------------------------
    @property
    def mesh_axis_names(self) -> tuple[str, ...]:
        """Mesh axis names, left to right: ``("d{k-1}", ..., "d0")``."""
        k = len(self.dev_matrix)
        return tuple(axis_name(k - 1 - i) for i in range(k))

    def partition_spec(self) -> PartitionSpec:
        """The JAX ``PartitionSpec`` of this layout over :attr:`mesh_axis_names`."""
        from jax.sharding import PartitionSpec

        entries: list[Any] = []
        for e in self.tensor_map:
            dims = entry_dims(e)
            if not dims:
                entries.append(None)
            elif isinstance(e, tuple):
                entries.append(tuple(axis_name(d) for d in dims))
            else:
                entries.append(axis_name(dims[0]))
        return PartitionSpec(*entries)

    def mesh(self, devices: Sequence[Any]) -> Mesh:
        """A concrete ``Mesh``: ``devices`` in rank order, reshaped to ``dev_matrix``.

        Every axis is ``AxisType.Auto``: the layouts say how inputs, parameters and outputs are
        split and XLA's partitioner decides the rest (jax >= 0.11 makes new meshes ``Explicit``,
        where every intermediate's split must be spelled out in the program).
        """
        from jax.sharding import AxisType, Mesh

        if len(devices) != self.device_num:
            raise LayoutError(
                f"layout spans {self.device_num} devices (dev_matrix {list(self.dev_matrix)}) "
                f"but {len(devices)} were given"
            )
        return Mesh(np.array(devices, dtype=object).reshape(self.dev_matrix), self.mesh_axis_names,
                    axis_types=(AxisType.Auto,) * len(self.dev_matrix))

    def abstract_mesh(self) -> Any:
        """A device-free ``AbstractMesh`` of the same shape (for exporting without devices), with
        ``Auto`` axes as :meth:`mesh`."""
        from jax.sharding import AbstractMesh, AxisType

        return AbstractMesh(self.dev_matrix, self.mesh_axis_names,
                            axis_types=(AxisType.Auto,) * len(self.dev_matrix))

    def named_sharding(self, devices_or_mesh: Any = None) -> NamedSharding:
        """``NamedSharding`` on a concrete mesh (``devices`` in rank order) or, if None, abstract."""
        from jax.sharding import AbstractMesh, Mesh, NamedSharding

        if devices_or_mesh is None:
            mesh = self.abstract_mesh()
        elif isinstance(devices_or_mesh, (Mesh, AbstractMesh)):
            mesh = devices_or_mesh
        else:
            mesh = self.mesh(devices_or_mesh)
        return NamedSharding(mesh, self.partition_spec())

    @classmethod
    def from_partition_spec(
        cls, mesh_shape: Any, spec: Sequence[Any], ndim: int | None = None
    ) -> Layout:
        """Layout of ``spec`` over a mesh given as ``Mesh`` or ``{axis name: size}`` (ordered).

        The mesh's axes, left to right, become ``dev_matrix``; a spec entry naming mesh axis ``i``
        maps to device dimension ``k-1-i``.
        """
        shape = dict(mesh_shape.shape) if hasattr(mesh_shape, "devices") else dict(mesh_shape)
        names = list(shape)
        k = len(names)
        entries: list[MapEntry] = []
        spec = list(spec) + [None] * ((ndim or len(spec)) - len(spec))
        for e in spec:
            if e is None:
                entries.append(-1)
                continue
            group = (e,) if isinstance(e, str) else tuple(e)
            for n in group:
                if n not in names:
                    raise LayoutError(f"PartitionSpec names mesh axis {n!r}; the mesh has {names}")
            dims = tuple(k - 1 - names.index(n) for n in group)
            entries.append(dims if len(dims) > 1 else dims[0])
        return cls([shape[n] for n in names], entries)

    def strides(self) -> tuple[int, ...]:
        """Rank stride of each entry of ``dev_matrix`` (left to right): ``prod(dev_matrix[i+1:])``."""
        return tuple(math.prod(self.dev_matrix[i + 1 :]) for i in range(len(self.dev_matrix)))

    def refine(self, dev_matrix: Sequence[int]) -> Layout:
        """The same split expressed over a finer device grid ``dev_matrix``.

        Every entry of this layout's grid must be a run of consecutive entries of the finer grid
        (see :func:`common_dev_matrix`); a device dimension becomes the tuple of finer
        dimensions it covers, major first. ``slice_of`` is unchanged for every rank.
        """
        fine = tuple(int(d) for d in dev_matrix)
        fine_strides = Layout(fine, []).strides()
        kf, k = len(fine), len(self.dev_matrix)
        groups: dict[int, tuple[int, ...]] = {}
        for i, (size, stride) in enumerate(zip(self.dev_matrix, self.strides())):
            group = tuple(
                kf - 1 - fi
                for fi, (fs, fst) in enumerate(zip(fine, fine_strides))
                if fst >= stride and fst * fs <= stride * size and fs > 1
            )
            if math.prod(fine[kf - 1 - g] for g in group) != size:
                raise LayoutError(
                    f"device grid {list(fine)} does not refine {list(self.dev_matrix)}"
                )
            groups[k - 1 - i] = group
        entries: list[MapEntry] = []
        for e in self.tensor_map:
            dims = tuple(d for j in entry_dims(e) for d in groups[j])
            entries.append(-1 if not dims else dims[0] if len(dims) == 1 else dims)
        return Layout(fine, entries)

    @classmethod
    def replicated(cls, ndim: int, device_num: int) -> Layout:
        """Every rank holds the whole tensor."""
        return cls([device_num], [-1] * ndim)

    # ---- serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict[str, list[Any]]:
        return {"dev_matrix": list(self.dev_matrix), "tensor_map": _map_list(self.tensor_map)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        return cls(d["dev_matrix"], d["tensor_map"])

    def __repr__(self) -> str:
        return f"Layout(dev_matrix={list(self.dev_matrix)}, tensor_map={_map_list(self.tensor_map)})"


def _as_int(value: Any, what: str) -> int:
    """An integer (numpy integers too); anything else (a float, a string) is a LayoutError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LayoutError(f"{what} {value!r} must be an integer")
    return int(value)


def _normalize_entry(e: Any) -> MapEntry:
    if isinstance(e, (list, tuple)):
        dims = tuple(_as_int(d, "tensor_map entry") for d in e)
        if not dims or any(d < 0 for d in dims):
            raise LayoutError(f"nested tensor_map entry {list(dims)} must list device dimensions (no -1)")
        return dims[0] if len(dims) == 1 else dims
    return _as_int(e, "tensor_map entry")


def entry_dims(e: MapEntry) -> tuple[int, ...]:
    """The device dimensions a ``tensor_map`` entry splits an axis over (``()`` when not split)."""
    if isinstance(e, tuple):
        return e
    return () if e == -1 else (e,)


def _entry_str(e: MapEntry) -> str:
    return str(list(e)) if isinstance(e, tuple) else str(e)


def _map_list(tm: Sequence[MapEntry]) -> list[Any]:
    return [list(e) if isinstance(e, tuple) else e for e in tm]


def common_dev_matrix(layouts: Sequence[Layout]) -> tuple[int, ...]:
    """The coarsest device grid that refines every layout's grid (so one JAX mesh serves all).

    Each grid entry of size ``d`` and rank stride ``s`` covers the strides ``s .. s*d``; the
    common grid cuts at every such boundary. Grids like ``[2, 3]`` and ``[3, 2]`` cut six ranks
    incompatibly and have no common refinement: a :class:`LayoutError` says so.
    """
    if not layouts:
        raise LayoutError("no layouts given")
    n = layouts[0].device_num
    cuts = {1, n}
    for lay in layouts:
        if lay.device_num != n:
            raise LayoutError(f"layouts span different device counts: {n} and {lay.device_num}")
        cuts.update(lay.strides())
    ordered = sorted(cuts)
    for lo, hi in zip(ordered, ordered[1:]):
        if hi % lo:
            grids = sorted({tuple(lay.dev_matrix) for lay in layouts})
            raise LayoutError(
                f"the device grids {[list(g) for g in grids]} split the {n} ranks in incompatible "
                "ways, so no single mesh holds them; use dev_matrices whose sizes nest "
                "(e.g. [4] with [2, 2])"
            )
    sizes = [hi // lo for lo, hi in zip(ordered, ordered[1:])][::-1]
    return tuple(sizes) or (1,)


def one_mesh_shardings(layouts: Sequence[Layout],
                       devices: Sequence[Any] | None = None) -> list[NamedSharding]:
    """JAX shardings of ``layouts`` on one mesh: their :func:`common_dev_matrix` laid over
    ``devices`` (in rank order), or an ``AbstractMesh`` of that shape when ``devices`` is None."""
    grid = common_dev_matrix(layouts)
    base = Layout(grid, [])
    mesh = base.abstract_mesh() if devices is None else base.mesh(devices)
    return [lay.refine(grid).named_sharding(mesh) for lay in layouts]
