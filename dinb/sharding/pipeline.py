"""Pipeline stages: which layers each stage runs, what it sends the next, and the GPipe schedule.

``S`` stages of ``T`` ranks each: global rank ``r`` is rank ``r % T`` of stage ``r // T``. Stage
``s`` holds layers ``a_s .. b_s - 1`` (only their parameters, split over its ``T`` ranks) and
computes ``carry_s = layers[a_s:b_s](carry_{s-1})``, with ``carry_{-1}`` the model's inputs and
``carry_{S-1}`` its outputs. Rank ``j`` of stage ``s`` sends its part of ``carry_s`` to rank ``j``
of stage ``s + 1``: both hold the carry under the same layout, so the transfer is one message
between two ranks, and the first stage's ranks are the only ones that take inputs while the last
stage's are the only ones that give outputs.

GPipe schedule: the batch of ``B`` rows is cut into ``M`` micro-batches of ``B / M`` rows;
micro-batch ``m`` runs on stage ``s`` at tick ``m + s``. With equal stage times ``t`` a predict
takes ``M + S - 1`` ticks, in which each stage is busy for ``M``, so the idle fraction (the
*bubble*) is::

    bubble = (S - 1) / (M + S - 1)        e.g. S = 4: M = 1 -> 0.75, M = 4 -> 0.43, M = 8 -> 0.27

while the time per predict shrinks from ``S * T_layer`` toward ``T_layer`` per micro-batch only
as far as a smaller micro-batch keeps each rank's matmuls efficient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dinb.errors import StrategyError
from dinb.sharding.layout import Layout

if TYPE_CHECKING:
    from dinb.models.base import ModelDef
    from dinb.sharding.strategy import Strategy

DEFAULT_MICRO_BATCHES = (1, 2, 4, 8)
MAX_MICRO_BATCHES = 256  # micro-batch numbers travel in message tags


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """GPipe's idle fraction ``(S - 1) / (M + S - 1)`` for equal stage times."""
    return (stages - 1) / (micro_batches + stages - 1)


def gpipe_schedule(stages: int, micro_batches: int) -> list[tuple[int, int, int]]:
    """``[(tick, stage, micro-batch)]``: micro-batch ``m`` on stage ``s`` at tick ``m + s``."""
    return [(m + s, s, m) for s in range(stages) for m in range(micro_batches)]


def decode_schedule(stages: int, groups: int, steps: int) -> list[tuple[int, int, int, int]]:
    """``[(tick, stage, group, step)]`` of a decoder's ``steps`` decode steps over ``stages``
    stages with its slots in ``groups`` groups (``runtime/runners/decoder_stages``).

    Step ``t`` of group ``g`` needs that group's tokens of step ``t - 1``, which leave the last
    stage at the end of tick ``(t - 1) P + g + S - 1``; with the groups issued in turn, a step
    takes ``P = max(S, G)`` ticks, so the pass runs on stage ``s`` at tick ``t P + g + s``. With
    ``G >= S`` no stage waits between the first and the last pass."""
    period = max(stages, groups)
    return [(t * period + g + s, s, g, t) for t in range(steps) for g in range(groups) for s in range(stages)]


def decode_busy_fraction(stages: int, groups: int, steps: int) -> float:
    """The share of the ticks each stage works in :func:`decode_schedule`: ``G k`` passes over
    ``(k - 1) P + G + S - 1`` ticks; one group gives ``1/S`` as ``k`` grows, ``G = S`` groups
    ``G k / (G k + S - 1)``."""
    return groups * steps / ((steps - 1) * max(stages, groups) + groups + stages - 1)


def draw_decode_schedule(stages: int, groups: int, steps: int) -> str:
    """:func:`decode_schedule` as text: a row per stage, a column per tick, the group each
    stage works on (``.``: idle)."""
    ticks = decode_schedule(stages, groups, steps)
    width = max(t for t, *_ in ticks) + 1
    rows = [["."] * width for _ in range(stages)]
    for tick, s, g, _ in ticks:
        rows[s][tick] = str(g)
    return "\n".join(f"stage {s}  {''.join(r)}" for s, r in enumerate(rows))


@dataclass(frozen=True)
class StageEvent:
    """One stage's computation of one micro-batch on one rank (seconds on one clock)."""

    rank: int
    stage: int
    micro: int
    start: float
    end: float


def measured_bubble(events: Iterable[StageEvent]) -> float:
    """The idle fraction of a measured predict: ``1 - mean_s(busy_s) / makespan``.

    ``busy_s`` is the time stage ``s`` spent computing (averaged over its ranks), ``makespan``
    the time from the first computation's start to the last one's end. Equal stage times and
    free transfers give :func:`bubble_fraction`; transfers and uneven stages add to it.
    """
    events = list(events)
    if not events:
        raise ValueError("no stage events to measure")
    span = max(e.end for e in events) - min(e.start for e in events)
    busy: dict[int, dict[int, float]] = {}
    for e in events:
        per_rank = busy.setdefault(e.stage, {})
        per_rank[e.rank] = per_rank.get(e.rank, 0.0) + (e.end - e.start)
    mean = sum(sum(r.values()) / len(r) for r in busy.values()) / len(busy)
    return max(0.0, 1.0 - mean / span) if span > 0 else 0.0


def simulate_schedule(stage_s: Sequence[float], micro_batches: int,
                      transfer_s: Sequence[float] = ()) -> list[StageEvent]:
    """GPipe's schedule with real stage costs: stage ``s`` takes ``stage_s[s] / M`` per
    micro-batch, starts micro-batch ``m`` when it finished ``m - 1`` and stage ``s - 1``'s
    result for ``m`` has arrived (``transfer_s[s - 1] / M`` after it was computed). Unequal
    stages or slow transfers make the bubble larger than :func:`bubble_fraction`."""
    m_count, events = micro_batches, []
    done: dict[tuple[int, int], float] = {}
    for s, total in enumerate(stage_s):
        for m in range(m_count):
            ready = done.get((s - 1, m), 0.0) + (transfer_s[s - 1] / m_count if s and transfer_s else 0.0)
            start = max(ready, done.get((s, m - 1), 0.0))
            done[(s, m)] = start + total / m_count
            events.append(StageEvent(s, s, m, start, done[(s, m)]))
    return events


def stage_layer_ranges(model: ModelDef, strategy: Strategy) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of the layers each stage of ``strategy`` runs, read from the stages its
    parameters record; a layer split between stages, or stages out of order, is an error naming
    the layer."""
    layers = model.pipeline_layers()
    stages = strategy.pipeline_stages
    if layers is None:
        raise StrategyError(
            f"the strategy has {stages} pipeline stages but model {model.name!r} is not a stack of "
            "layers; use a one-stage strategy"
        )
    layer_stage = []
    for i, names in enumerate(layers):
        found = {strategy.stage_of(n) for n in names if n in strategy}
        if len(found) != 1:
            raise StrategyError(
                f"layer {i} of model {model.name!r} has parameters in stages {sorted(found)}; a layer "
                "belongs to one stage"
                if found else f"layer {i} of model {model.name!r} has no parameter in the strategy"
            )
        layer_stage.append(found.pop())
    ranges = []
    for s in range(stages):
        idx = [i for i, st in enumerate(layer_stage) if st == s]
        if not idx or idx != list(range(idx[0], idx[-1] + 1)) or (ranges and ranges[-1][1] != idx[0]):
            raise StrategyError(
                f"pipeline stage {s} holds layers {idx} of model {model.name!r}; each stage needs a "
                "run of consecutive layers following the previous stage's (layer i in stage "
                f"{layer_stage}[i])"
            )
        ranges.append((idx[0], idx[-1] + 1))
    return ranges


def carry_layout(first_input: Layout | None, ndim: int, device_num: int) -> Layout:
    """The layout of a value passed between stages: its batch axis (axis 0) split as the model's
    first input splits its batch (so data-parallel ranks keep their own rows), the rest whole."""
    if first_input is None or first_input.rank == 0 or ndim == 0:
        return Layout.replicated(ndim, device_num)
    batch = first_input.tensor_map[0]
    return Layout(first_input.dev_matrix, [batch] + [-1] * (ndim - 1))


def micro_batch_choices(batch: int, requested: Sequence[int] | None,
                        fits: dict[int, str | None]) -> list[int]:
    """The micro-batch counts to export: ``requested`` (each checked) or the defaults that fit.

    ``fits[m]`` is None when ``m`` micro-batches fit every layout, else why not.
    """
    if requested is None:
        return [m for m in DEFAULT_MICRO_BATCHES if batch % m == 0 and fits.get(m) is None]
    valid = [m for m in range(1, min(batch, MAX_MICRO_BATCHES) + 1)
             if batch % m == 0 and fits.get(m) is None]
    out = []
    for m in requested:
        if isinstance(m, bool) or not isinstance(m, int) or m not in valid:
            why = fits.get(m) if isinstance(m, int) and batch % m == 0 else None
            raise StrategyError(
                f"micro_batches={m!r}: the batch of {batch} rows "
                + (f"cannot be cut into {m} micro-batches here ({why})" if why else
                   f"does not split into {m!r} equal micro-batches")
                + f"; counts that would: {', '.join(map(str, valid))}"
            )
        if m not in out:
            out.append(m)
    return sorted(set(out) | {1})
