"""The programs of a pipelined export: each stage's layers over its own ranks, per micro-batch count.

Stage ``s`` of a strategy with ``S`` stages of ``T`` ranks runs
``model.apply_layers(params_s, a_s, b_s, *values)`` (see :mod:`dinb.sharding.pipeline`) on
micro-batches of ``B / M`` rows: it receives what stage ``s - 1`` sent (stage 0: the inputs) and
sends the next stage its carry, under the layout :func:`~dinb.sharding.pipeline.carry_layout`
gives it on the stage's ``T`` ranks (the last stage: the model's outputs). Every micro-batch
count ``M`` the export offers is a program of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dinb.errors import DinbError, StrategyError
from dinb.export.slicefile import TensorMeta
from dinb.export.tracing import DEFAULT_PLATFORMS, input_layouts, trace_program
from dinb.models.base import ModelDef
from dinb.sharding.layout import Layout
from dinb.sharding.pipeline import MAX_MICRO_BATCHES, carry_layout, micro_batch_choices, stage_layer_ranges
from dinb.sharding.strategy import Strategy

#: ``(program, received (shape, dtype) and layout, sent (shape, dtype, layout))`` of one stage
Traced = tuple[bytes, list[Any], list[Any]]


def build_stage_programs(
    model: ModelDef,
    param_specs: dict[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    input_specs: Sequence[tuple[tuple[int, ...], str]],
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    micro_batches: Sequence[int] | None = None,
) -> tuple[list[dict[int, bytes]], list[dict[str, Any]], list[TensorMeta]]:
    """Each pipeline stage's programs, one per micro-batch count, over the stage's own ranks.

    Returns, per stage, ``{M: program}`` and the ``pipeline`` metadata of its slice files, and
    the model's output metadata.
    """
    ranges = stage_layer_ranges(model, strategy)
    in_layouts = input_layouts(strategy, input_specs)
    batch = input_specs[0][0][0] if input_specs and input_specs[0][0] else 1
    counts = micro_batch_choices(batch, micro_batches, micro_batch_fits(batch, in_layouts, input_specs))
    traced = {m: trace_stages(model, param_specs, strategy, input_specs, in_layouts, platforms, ranges, m)
              for m in counts}
    programs, metas = [], []
    for s, (a, b) in enumerate(ranges):
        _, received, sent = traced[1][s]
        programs.append({m: traced[m][s][0] for m in counts})
        metas.append({
            "stages": len(ranges), "stage": s, "stage_ranks": strategy.stage_device_num, "layers": [a, b],
            "micro_batches": counts,
            "receives": [TensorMeta(f"carry_{i}", sh, d, lay).to_json()
                         for i, ((sh, d), lay) in enumerate(received)],
            "sends": [TensorMeta(f"carry_{i}", sh, d, lay).to_json() for i, (sh, d, lay) in enumerate(sent)],
        })
    names = model.output_names()
    outputs = [TensorMeta(names[i] if i < len(names) else f"output_{i}", *o)
               for i, o in enumerate(traced[1][-1][2])]
    split = [o.name for o in outputs if len(o.layout.replica_groups()) != 1]
    if split:
        raise StrategyError(
            f"outputs {split} are split over the last stage's ranks; with pipeline stages the last "
            "stage's ranks all return the whole outputs (give replicated output layouts)")
    return programs, metas, outputs


def micro_batch_fits(batch: int, in_layouts: Sequence[Layout],
                     input_specs: Sequence[tuple[tuple[int, ...], str]]) -> dict[int, str | None]:
    """For every count ``m`` dividing the batch: None when the input layouts split micro-batches
    of ``batch / m`` rows, else why not."""
    fits: dict[int, str | None] = {}
    for m in range(1, min(batch, MAX_MICRO_BATCHES) + 1):
        if batch % m == 0:
            try:
                for lay, (shape, _) in zip(in_layouts, input_specs):
                    lay.check_shape((shape[0] // m, *shape[1:]), "input")
                fits[m] = None
            except DinbError as e:
                fits[m] = str(e)
    return fits


def trace_stages(model: ModelDef, param_specs: dict[str, tuple[tuple[int, ...], str]], strategy: Strategy,
                 input_specs: Sequence[tuple[tuple[int, ...], str]], in_layouts: Sequence[Layout],
                 platforms: Sequence[str], ranges: list[tuple[int, int]], m: int) -> list[Traced]:
    """Every stage's program at ``m`` micro-batches, each stage traced on what the one before sends."""
    t = strategy.stage_device_num
    first = in_layouts[0] if in_layouts else None
    batch = input_specs[0][0][0] if input_specs and input_specs[0][0] else 1
    values = [((s[0] // m, *s[1:]), d) for s, d in input_specs]
    layouts = list(in_layouts)
    out = []
    for s, (a, b) in enumerate(ranges):
        names = strategy.stage_params(s)

        def fn(params: dict[str, Any], *vals: Any, a: int = a, b: int = b) -> tuple[Any, ...]:
            return tuple(model.apply_layers(params, a, b, *vals))

        last = s == len(ranges) - 1
        sends = (list(strategy.outputs) or None) if last else \
            (lambda shapes: [carry_layout(first, len(sh), t) for sh in shapes])
        program, sent = trace_program(
            fn, {k: param_specs[k] for k in names}, {k: strategy[k] for k in names}, values, layouts,
            sends, platforms, f"stage {s} (layers {a}..{b - 1})")
        for i, (shape, _, _) in enumerate(sent):
            if m > 1 and (not shape or shape[0] != batch // m):
                raise StrategyError(
                    f"stage {s} of model {model.name!r} gives value {i} of shape {list(shape)} for "
                    f"micro-batches of {batch // m} rows; micro-batching needs the batch on axis 0 of "
                    "every value (export with micro_batches=[1])")
        out.append((program, list(zip(values, layouts)), sent))
        values, layouts = [(sh, d) for sh, d, _ in sent], [lay for _, _, lay in sent]
    return out
