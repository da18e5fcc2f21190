"""What a plan costs: the bytes each rank holds (``RankBytes``), the activations a pipeline stage
hands the next (``Transfer``) and the time of compute and collectives (``CostEstimate``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinb.explore.hlo import Collective
from dinb.sharding.layout import Layout
from dinb.units import fmt_bytes, fmt_seconds


@dataclass(frozen=True)
class RankBytes:
    """What one rank holds, in bytes."""

    rank: int
    parameters: int
    replicated: int  # of ``parameters``: slices other ranks hold too
    inputs: int  # with pipeline stages: or the activations received from the previous stage
    outputs: int  # or the activations sent to the next stage
    workspace: int = 0  # XLA's temp buffers, known once compiled
    stage: int = 0
    cache: int = 0  # state kept on the device between calls (a decoder's KV cache)

    @property
    def total(self) -> int:
        return self.parameters + self.inputs + self.outputs + self.workspace + self.cache


@dataclass(frozen=True)
class Transfer:
    """Stage ``stage`` handing its activations to stage ``stage + 1``: ``pairs`` messages (rank
    ``j`` to rank ``j``) of ``bytes_per_rank`` each, per whole batch."""

    stage: int
    values: tuple[tuple[tuple[int, ...], str], ...]  # shape and dtype of each value sent
    bytes_per_rank: int
    pairs: int
    seconds: float


def carry_bytes(values: Sequence[tuple[tuple[int, ...], str]], first_input: Layout | None, local: int,
                 device_num: int) -> int:
    """Bytes of the activations one rank sends or receives (laid out as :func:`carry_layout`)."""
    from dinb.sharding.pipeline import carry_layout

    total = 0
    for shape, dtype in values:
        lay = carry_layout(first_input, len(shape), device_num)
        total += math.prod(lay.slice_shape(shape)) * np.dtype(dtype).itemsize
    return total


@dataclass(frozen=True)
class CostEstimate:
    """Compute and communication time of one predict, estimated from the compiled program."""

    flops: float
    compute_s: float
    collectives: tuple[tuple[Collective, float], ...]  # each with its estimated seconds
    link_gb_per_s: float
    tflop_per_s: float

    @property
    def bytes_sent(self) -> float:
        return sum(c.bytes_sent_per_rank for c, _ in self.collectives)

    @property
    def comm_s(self) -> float:
        return sum(s for _, s in self.collectives)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    def collectives_summary(self) -> str:
        """The collectives XLA inserted and their time, as text (the same under every XLA that
        partitions the program the same way)."""
        lines = [f"  {c.kind} in groups of {c.group_size} {c.groups_text()}: {c.shape_text()} per rank, "
                 f"sends {fmt_bytes(c.bytes_sent_per_rank)} per rank = {fmt_seconds(s)}"
                 for c, s in self.collectives] or ["  no collectives"]
        return "\n".join(lines)

    def compute_summary(self) -> str:
        """XLA's FLOPs per rank over the compute rate beside the traffic time (XLA's FLOP count
        varies a little between versions)."""
        return (f"  compute {self.flops / 1e6:.4g} MFLOP per rank = {fmt_seconds(self.compute_s)} at "
                f"{self.tflop_per_s:g} TFLOP/s; communication {fmt_seconds(self.comm_s)} at "
                f"{self.link_gb_per_s:g} GB/s")

    def summary(self) -> str:
        """The collectives and the estimates as text."""
        return self.collectives_summary() + "\n" + self.compute_summary()
