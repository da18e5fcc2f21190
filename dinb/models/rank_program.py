"""What one rank computes under a split, written out: local steps and the collectives between.

On the XLA path each rank's program is derived by XLA's SPMD partitioner from the one global
program (see :mod:`dinb.export`), and the collectives are XLA's. A :class:`RankProgram` spells
the same computation out per rank, the way a lesson on tensor parallelism writes it: steps of
local computation on this rank's slices, joined by collectives named explicitly. The ONNX
provider (:mod:`dinb.runtime.runners.onnx`) runs it: every run of local steps becomes one ONNX
model, every collective one call of the rank's collective library (MPI)::

    Megatron MLP on N ranks, rank r holding W1[:, f_r], b1[f_r], W2[f_r, :]:
        Local      h_r = gelu(x W1_r + b1_r) W2_r        partial sums of the output
        AllReduce  h = sum_r h_r                         one all-reduce of (batch, d)
        Local      y = h + b2                            b2 is added once, after the sum

A program carries a tuple of *values* from step to step: it starts as the model's inputs (each
rank's own slice of them, by the input layouts) and ends as the outputs, whole on every rank. A
``Local`` step maps ``(params, *values)`` to new values; a collective replaces one value (the
last by default) by the sum (``AllReduce``) or the concatenation in rank order along an axis
(``AllGather``) of that value over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Local:
    """Computation on this rank's own data: ``fn(params, *values) -> tuple of values``."""

    fn: Callable[..., tuple[Any, ...]]
    name: str


@dataclass(frozen=True)
class AllReduce:
    """``values[index] = sum over ranks of values[index]``."""

    index: int = -1


@dataclass(frozen=True)
class AllGather:
    """``values[index] = concatenate(values[index] of ranks 0..N-1, axis)``."""

    axis: int
    index: int = -1


Step = Local | AllReduce | AllGather
Collective = AllReduce | AllGather


@dataclass(frozen=True)
class RankProgram:
    """One rank's program: steps over a tuple of values (see the module docstring)."""

    steps: tuple[Step, ...]

    def stages(self) -> list[list[Local] | Collective]:
        """The steps with consecutive ``Local`` steps grouped: what one ONNX model runs."""
        out: list[list[Local] | Collective] = []
        for step in self.steps:
            if isinstance(step, Local):
                if out and isinstance(out[-1], list):
                    out[-1].append(step)
                else:
                    out.append([step])
            else:
                out.append(step)
        return out

    def collectives(self) -> list[Collective]:
        return [s for s in self.steps if not isinstance(s, Local)]


def run_locals(steps: Sequence[Local], params: dict[str, Any], values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Apply a run of local steps."""
    for step in steps:
        values = tuple(step.fn(params, *values))
    return values


def collect(step: Collective, per_rank: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """A collective over the values of every rank (all held here): the reference semantics."""
    parts = [np.asarray(v[step.index]) for v in per_rank]
    if isinstance(step, AllReduce):
        joined = np.sum(parts, axis=0, dtype=parts[0].dtype)
    else:
        joined = np.concatenate(parts, axis=step.axis)
    return [_replace(v, step.index, joined) for v in per_rank]


def _replace(values: tuple[Any, ...], index: int, value: Any) -> tuple[Any, ...]:
    out = list(values)
    out[index] = value
    return tuple(out)


def run_reference(program: RankProgram, params_by_rank: dict[int, dict[str, Any]],
                  inputs_by_rank: dict[int, tuple[Any, ...]]) -> dict[int, tuple[Any, ...]]:
    """Every rank's program run here, in JAX, with the collectives done in numpy (for tests)."""
    values = dict(inputs_by_rank)
    for stage in program.stages():
        if isinstance(stage, list):
            values = {r: run_locals(stage, params_by_rank[r], v) for r, v in values.items()}
        else:
            ranks = sorted(values)
            values = dict(zip(ranks, collect(stage, [values[r] for r in ranks])))
    return values
