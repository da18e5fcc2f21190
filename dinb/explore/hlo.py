"""The collectives XLA inserted, read from a compiled (SPMD-partitioned) HLO module's text.

XLA's partitioner turns one sharded program into the per-rank program and adds the
communication the layouts imply. Each collective line names its kind, the per-rank shape and
the rank groups that talk to each other, written in one of four ways::

    replica_groups={{0,1},{2,3}}                         explicit groups
    replica_groups=[2,2]<=[4]                            iota: arange(4).reshape(2,2) rows
    replica_groups=[2,4]<=[4,2]T(1,0)                    iota, transposed before the reshape
    replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}
                                                         ranks laid on a mesh, grouped along axes

Ranks are logical device ids, which dinb makes equal to rank order (the mesh's devices in rank
order).

**Traffic model** (bandwidth-optimal ring algorithms; ``g`` ranks per group, ``S`` the bytes of
the per-rank *result* shape, the shape printed on the line):

* all-reduce: each rank sends ``2 (g-1)/g * S`` (a reduce-scatter, then an all-gather);
* all-gather: ``(g-1)/g * S`` (S is the gathered result);
* reduce-scatter: ``(g-1) * S`` (S is one rank's scattered part);
* all-to-all: ``(g-1)/g * S``;
* collective-permute / collective-broadcast: ``S`` (ranks that send to themselves move nothing).

The time estimate is ``bytes sent per rank / link bandwidth``: a teaching number, not a
measurement (latency, topology and overlap with compute are left out).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast")

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}

_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")


@dataclass(frozen=True)
class Collective:
    """One collective of the per-rank program."""

    kind: str
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, per-rank result shape) per operand
    groups: tuple[tuple[int, ...], ...]  # rank groups (permute: the (source, target) pairs)
    bytes: int  # bytes of the per-rank result

    @property
    def group_size(self) -> int:
        return max((len(g) for g in self.groups), default=1) if self.kind not in _PAIRWISE else 2

    @property
    def bytes_sent_per_rank(self) -> float:
        """Bytes each rank sends under the ring model of the module docstring."""
        g, s = self.group_size, self.bytes
        if self.kind in _PAIRWISE:
            moving = [p for p in self.groups if p[0] != p[1]]
            return float(s) if moving else 0.0
        if g <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2 * (g - 1) / g * s
        if self.kind == "reduce-scatter":
            return float((g - 1) * s)
        return (g - 1) / g * s  # all-gather, all-to-all

    def seconds(self, link_bytes_per_s: float) -> float:
        """Estimated time: bytes sent per rank over the link bandwidth."""
        return self.bytes_sent_per_rank / link_bytes_per_s

    def shape_text(self) -> str:
        return ", ".join(f"{d}{list(s)}" for d, s in self.shapes)

    def groups_text(self, limit: int = 4) -> str:
        parts = ["{" + ",".join(map(str, g)) + "}" for g in self.groups[:limit]]
        more = len(self.groups) - limit
        return " ".join(parts) + (f" +{more} more" if more > 0 else "")


_PAIRWISE = ("collective-permute", "collective-broadcast")


def parse_collectives(hlo_text: str, device_count: int) -> list[Collective]:
    """Every collective in ``hlo_text`` (the ``-done`` halves of async pairs are skipped)."""
    found = []
    for line in hlo_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        kind = m.group("kind")
        shapes = _array_shapes(m.group("type"))
        if m.group("start") and kind in ("all-gather", "collective-permute") and len(shapes) >= 2:
            shapes = shapes[len(shapes) // 2:]  # (operands..., results...): keep the results
        nbytes = int(sum(math.prod(s) * DTYPE_BYTES.get(d, 1) for d, s in shapes))
        rest = line[m.end():]
        if kind in _PAIRWISE:
            groups = _pairs(rest)
        else:
            groups = parse_replica_groups(rest, device_count)
        found.append(Collective(kind, m.group("name"), tuple(shapes), groups, nbytes))
    return found


def _array_shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for m in _ARRAY.finditer(type_text):
        dims = tuple(int(d) for d in m.group("dims").split(",") if d)
        out.append((m.group("dtype"), dims))
    return out


def _pairs(rest: str) -> tuple[tuple[int, ...], ...]:
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
    if not m:
        return ()
    return tuple(tuple(int(v) for v in p.split(",")) for p in re.findall(r"\{(\d+,\d+)", m.group(1) + "}"))


def parse_replica_groups(rest: str, device_count: int) -> tuple[tuple[int, ...], ...]:
    """The rank groups of one collective, from the text after its operands."""
    m = re.search(r"replica_groups=", rest)
    if not m:
        return (tuple(range(device_count)),)
    text = rest[m.end():]
    if text.startswith("{"):
        if text.startswith("{}"):
            return (tuple(range(device_count)),)
        body = text[1:_matching_brace(text)]
        return tuple(tuple(int(v) for v in g.split(",") if v) for g in re.findall(r"\{([\d,]*)\}", body))
    if text.startswith("mesh["):
        return _mesh_groups(text)
    iota = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        return _iota_groups(iota.group(1), iota.group(2), iota.group(3))
    raise ValueError(f"unrecognised replica_groups: {text[:80]!r}")


def _matching_brace(text: str) -> int:
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return i
    raise ValueError(f"unbalanced braces in {text[:80]!r}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = _ints(dims)
    ids = np.arange(math.prod(shape)).reshape(shape)
    return ids.transpose(_ints(perm)) if perm else ids


def _iota_groups(groups: str, dims: str, perm: str | None) -> tuple[tuple[int, ...], ...]:
    g = _ints(groups)
    ids = _iota(dims, perm).reshape(g)
    return tuple(tuple(int(v) for v in row) for row in ids)


def _mesh_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """``mesh['a'=2,'b'=2][, device_ids=(...)] {'b'}``: ranks on the mesh, grouped along axes.

    Group axes may be sub-axes ``'a':(pre)size``: axis ``a`` seen as ``[pre, size, rest]``,
    major first (``pre`` is the product of the sizes before it).
    """
    head = re.match(r"mesh\[([^\]]*)\]", text)
    assert head is not None
    axes = [(n, int(s)) for n, s in re.findall(r"'([^']+)'=(\d+)", head.group(1))]
    rest = text[head.end():]
    sizes = [s for _, s in axes]
    ids = np.arange(math.prod(sizes))
    dev = re.match(r",\s*device_ids=\((?:\[([\d,]+)\](?:T\(([\d,]+)\))?)\)", rest)
    if dev:
        ids = _iota(dev.group(1), dev.group(2)).reshape(-1)
        rest = rest[dev.end():]
    else:
        explicit = re.match(r",\s*device_ids=\[([\d,]+)\]", rest)
        if explicit:
            ids = np.array(_ints(explicit.group(1)))
            rest = rest[explicit.end():]
    sel = re.match(r"\s*\{([^}]*)\}", rest)
    wanted = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", sel.group(1)) if sel else []
    # split every axis at the sub-axis boundaries named, so each group axis is one dimension
    cuts: dict[str, set[int]] = {n: {1, s} for n, s in axes}
    for n, pre, size in wanted:
        if pre:
            cuts[n] |= {int(pre), int(pre) * int(size)}
    fine_sizes, fine_names = [], []
    for n, s in axes:
        bounds = sorted(c for c in cuts[n] if s % c == 0)
        for lo, hi in zip(bounds, bounds[1:]):
            fine_sizes.append(hi // lo)
            fine_names.append((n, lo, hi // lo))
    grid = ids.reshape(fine_sizes) if fine_sizes else ids.reshape(1)
    group_dims = []
    for n, pre, size in wanted:
        if pre:
            group_dims.append(fine_names.index((n, int(pre), int(size))))
        else:
            group_dims += [i for i, f in enumerate(fine_names) if f[0] == n]
    other = [i for i in range(grid.ndim) if i not in group_dims]
    moved = grid.transpose(other + group_dims).reshape(-1, math.prod(grid.shape[i] for i in group_dims))
    return tuple(tuple(int(v) for v in row) for row in moved)
