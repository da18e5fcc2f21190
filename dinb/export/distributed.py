"""Export a model as per-rank slice files: one SPMD program plus each rank's weight slices.

``export_distributed`` traces ``model.apply`` once with every parameter and input annotated by
its layout, and serializes the resulting ``jax.export`` program (StableHLO with shardings) for
CPU and CUDA. XLA's SPMD partitioner later turns it into the per-rank program and inserts the
collectives the layouts imply. Each rank's file then gets ``param[layout.slice_of(rank)]`` for
every parameter, so a rank reads only its own weights. No devices are needed to export: the
program is traced over an abstract mesh.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.export.decode_programs import build_generation_programs
from dinb.export.slicefile import TensorMeta, slice_file_name, write_slice_file
from dinb.export.tracing import DEFAULT_PLATFORMS, trace_program
from dinb.formats.safetensors import np_dtype
from dinb.models.base import ModelDef
from dinb.progress import progress
from dinb.sharding import batch_buckets as bb
from dinb.sharding.layout import Layout
from dinb.sharding.pipeline import MAX_MICRO_BATCHES, carry_layout, micro_batch_choices, stage_layer_ranges
from dinb.sharding.strategy import Strategy
from dinb.version import __version__

FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], (tuple, list)):
        return tuple(int(s) for s in x[0]), str(np.dtype(x[1]))
    arr = np.asarray(x)
    return tuple(arr.shape), str(arr.dtype)


def input_layouts(strategy: Strategy, input_specs: Sequence[tuple[tuple[int, ...], str]]) -> list[Layout]:
    """The strategy's input layouts, or replicated ones (over one stage's ranks) when it gives none."""
    n = strategy.stage_device_num
    return list(strategy.inputs) or [Layout.replicated(len(s), n) for s, _ in input_specs]


def build_program(
    model: ModelDef,
    param_specs: dict[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    input_specs: Sequence[tuple[tuple[int, ...], str]],
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> tuple[bytes, list[TensorMeta]]:
    """Trace and serialize the SPMD program; returns its bytes and the output metadata."""
    def program(params: dict[str, Any], *inputs: Any) -> tuple[Any, ...]:
        out = model.apply(params, *inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    layouts = {k: strategy[k] for k in param_specs}
    in_layouts = input_layouts(strategy, input_specs)
    program_bytes, outs = trace_program(program, param_specs, layouts, input_specs, in_layouts,
                                        list(strategy.outputs) or None, platforms, model.name)
    names = model.output_names()
    return program_bytes, [TensorMeta(names[i] if i < len(names) else f"output_{i}", *o)
                           for i, o in enumerate(outs)]


def build_bucket_programs(
    model: ModelDef,
    param_specs: dict[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    input_specs: Sequence[tuple[tuple[int, ...], str]],
    platforms: Sequence[str],
    buckets: Sequence[int],
    out_meta: Sequence[TensorMeta],
) -> dict[str, bytes]:
    """``{program/batch_<b>: program}`` for every bucket below the export's batch, each checked
    to give the outputs of the full batch with ``b`` rows."""
    programs = {}
    for b in buckets[:-1]:
        specs = [(bb.at_batch(s, b), d) for s, d in input_specs]
        programs[bb.program_name(b)], outs = build_program(model, param_specs, strategy, specs, platforms)
        if [tuple(m.shape) for m in outs] != [bb.at_batch(m.shape, b) for m in out_meta]:
            raise StrategyError(
                f"model {model.name!r}: at {b} rows its outputs are {[list(m.shape) for m in outs]}, "
                f"not {[list(m.shape) for m in out_meta]} with {b} rows; batch buckets need every "
                "output's first axis to be the batch. Export without batch buckets"
            )
    return programs


def build_stage_programs(
    model: ModelDef,
    param_specs: dict[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    input_specs: Sequence[tuple[tuple[int, ...], str]],
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    micro_batches: Sequence[int] | None = None,
) -> tuple[list[dict[int, bytes]], list[dict[str, Any]], list[TensorMeta]]:
    """Each pipeline stage's programs, one per micro-batch count, over the stage's own ranks.

    Stage ``s`` of ``strategy`` runs ``model.apply_layers(params_s, a_s, b_s, *values)`` (see
    :mod:`dinb.sharding.pipeline`) on micro-batches of ``B / M`` rows. Returns, per stage,
    ``{M: program}`` and the ``pipeline`` metadata of its slice files, and the model's output
    metadata.
    """
    ranges = stage_layer_ranges(model, strategy)
    t = strategy.stage_device_num
    in_layouts = input_layouts(strategy, input_specs)
    first = in_layouts[0] if in_layouts else None
    batch = input_specs[0][0][0] if input_specs and input_specs[0][0] else 1

    def carry_layouts(shapes: list[tuple[int, ...]]) -> list[Layout]:
        return [carry_layout(first, len(sh), t) for sh in shapes]

    def trace_stages(m: int) -> list[tuple[bytes, list[Any], list[Any]]]:
        """``(program, received specs, sent values)`` of each stage at ``m`` micro-batches."""
        values = [((s[0] // m, *s[1:]), d) for s, d in input_specs]
        layouts = in_layouts
        out = []
        for s, (a, b) in enumerate(ranges):
            names = strategy.stage_params(s)

            def fn(params: dict[str, Any], *vals: Any, a: int = a, b: int = b) -> tuple[Any, ...]:
                return tuple(model.apply_layers(params, a, b, *vals))

            last = s == len(ranges) - 1
            program, sent = trace_program(
                fn, {k: param_specs[k] for k in names}, {k: strategy[k] for k in names}, values, layouts,
                (list(strategy.outputs) or None) if last else carry_layouts, platforms,
                f"stage {s} (layers {a}..{b - 1})")
            for i, (shape, _, _) in enumerate(sent):
                if m > 1 and (not shape or shape[0] != batch // m):
                    raise StrategyError(
                        f"stage {s} of model {model.name!r} gives value {i} of shape {list(shape)} for "
                        f"micro-batches of {batch // m} rows; micro-batching needs the batch on axis 0 "
                        "of every value (export with micro_batches=[1])"
                    )
            out.append((program, list(zip(values, layouts)), sent))
            values, layouts = [(sh, d) for sh, d, _ in sent], [lay for _, _, lay in sent]
        return out

    fits: dict[int, str | None] = {}
    for m in range(1, min(batch, MAX_MICRO_BATCHES) + 1):
        if batch % m == 0:
            try:
                for lay, (shape, _) in zip(in_layouts, input_specs):
                    lay.check_shape((shape[0] // m, *shape[1:]), "input")
                fits[m] = None
            except DinbError as e:
                fits[m] = str(e)
    counts = micro_batch_choices(batch, micro_batches, fits)
    traced = {m: trace_stages(m) for m in counts}
    names = model.output_names()
    programs, metas = [], []
    for s, (a, b) in enumerate(ranges):
        _, received, sent = traced[1][s]
        programs.append({m: traced[m][s][0] for m in counts})
        metas.append({
            "stages": len(ranges), "stage": s, "stage_ranks": t, "layers": [a, b],
            "micro_batches": counts,
            "receives": [TensorMeta(f"carry_{i}", sh, d, lay).to_json()
                         for i, ((sh, d), lay) in enumerate(received)],
            "sends": [TensorMeta(f"carry_{i}", sh, d, lay).to_json() for i, (sh, d, lay) in enumerate(sent)],
        })
    outputs = [TensorMeta(names[i] if i < len(names) else f"output_{i}", *o)
               for i, o in enumerate(traced[1][-1][2])]
    split = [o.name for o in outputs if len(o.layout.replica_groups()) != 1]
    if split:
        raise StrategyError(
            f"outputs {split} are split over the last stage's ranks; with pipeline stages the last "
            "stage's ranks all return the whole outputs (give replicated output layouts)"
        )
    return programs, metas, outputs


def export_distributed(
    model: ModelDef,
    params: Mapping[str, Any],
    strategy: Strategy,
    example_inputs: Sequence[Any],
    out_dir: str | Path,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    show_progress: bool = False,
    dtype: str | None = None,
    micro_batches: Sequence[int] | None = None,
    batch_buckets: Sequence[int] | str | None = None,
) -> list[Path]:
    """Write ``{model}{rank}.dinb`` for every rank of ``strategy`` into ``out_dir``.

    ``params`` are whole tensors by name, or a :class:`dinb.checkpoint.DistributedCheckpoint`
    (saved under any layout and rank count): then each rank's slices are read from it directly,
    so a resharded checkpoint becomes slice files without ever holding a whole tensor.
    ``example_inputs`` are arrays or ``(shape, dtype)`` pairs fixing the input signature.
    ``dtype`` (``"bfloat16"``, ``"float16"``, ...) casts the floating-point parameters and
    inputs, so the program computes in that precision and each slice takes that many bytes
    (integer inputs such as token ids are left as they are). Also writes ``strategy.json``
    (MindSpore's schema) beside the slice files. Returns the slice file paths in rank order.

    A strategy with pipeline stages gives each rank only its stage's parameter slices and its
    stage's programs, one for each micro-batch count in ``micro_batches`` (default: those of
    1, 2, 4, 8 that divide the batch; 1 is always there).

    ``batch_buckets`` (one-stage exports): also a program for each of these batch sizes (the
    export's batch is the largest), so a server runs a small merged batch at its own size
    instead of padding it to the export's (see :mod:`dinb.sharding.batch_buckets`); ``"auto"``: the
    powers of two below the export's batch that the input layouts divide.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(params, "load_rank"):  # a distributed checkpoint: read rank by rank
        ckpt = params
        specs = ckpt.param_specs()
        wanted = list(model.param_shapes())
        param_names = wanted if set(wanted) <= set(specs) else list(specs)
        param_specs = {k: specs[k] for k in param_names}

        def read_slices(rank: int) -> dict[str, np.ndarray]:
            held = [k for k in param_names if strategy.holds(k, rank)]
            return ckpt.load_rank(strategy, rank, held, show_progress=False)
    else:
        arrays = {k: np.asarray(v) for k, v in params.items()}
        param_specs = {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}

        def read_slices(rank: int) -> dict[str, np.ndarray]:
            return {k: v[strategy.slice_of(k, rank, v.shape)] for k, v in arrays.items()
                    if strategy.holds(k, rank)}

    def slices_of(rank: int) -> dict[str, np.ndarray]:
        return {k: v.astype(np_dtype(param_specs[k][1]), copy=False) for k, v in read_slices(rank).items()}

    input_specs = [_shape_dtype(x) for x in example_inputs]
    if dtype is not None:
        if dtype not in FLOAT_DTYPES:
            raise DinbError(f"dtype {dtype!r}: export casts to one of {sorted(FLOAT_DTYPES)}")
        param_specs = {k: (s, dtype if d in FLOAT_DTYPES else d) for k, (s, d) in param_specs.items()}
        input_specs = [(s, dtype if d in FLOAT_DTYPES else d) for s, d in input_specs]
    strategy.validate({k: s for k, (s, _) in param_specs.items()}, [s for s, _ in input_specs])
    strategy = strategy.with_shapes({k: s for k, (s, _) in param_specs.items()})
    n = strategy.device_num

    generation, buckets = None, None
    if batch_buckets is not None and (strategy.pipeline_stages > 1 or getattr(model, "generates", False)):
        raise StrategyError("batch buckets are for one-stage exports of models without a KV cache; "
                            "a pipelined export has micro-batches, a decoder sequence slots")
    if getattr(model, "generates", False):
        if strategy.pipeline_stages > 1:
            raise StrategyError(f"model {model.name!r} generates; its export has one pipeline stage")
        programs, generation, in_meta, out_meta = build_generation_programs(
            model, param_specs, strategy, dtype or "float32", platforms)
        stage_programs, stage_meta = [programs], [None]
    elif strategy.pipeline_stages > 1:
        stage_programs, stage_meta, out_meta = build_stage_programs(
            model, param_specs, strategy, input_specs, platforms, micro_batches)
    else:
        if micro_batches not in (None, [1], (1,)):
            raise StrategyError(
                f"micro_batches={list(micro_batches)}: micro-batches are for pipeline stages; the "
                "strategy has one stage (give pipeline_stages= to infer_predict_layout)"
            )
        if batch_buckets is not None:  # checked before anything is traced
            layouts, shapes = input_layouts(strategy, input_specs), [s for s, _ in input_specs]
            wanted = bb.choices(layouts, shapes) if batch_buckets == "auto" else batch_buckets
            buckets = bb.check(wanted, layouts, shapes, [s.name for s in model.input_specs()])
        program, out_meta = build_program(model, param_specs, strategy, input_specs, platforms)
        stage_programs, stage_meta = [{1: program}], [None]
        if buckets is not None:
            stage_programs[0].update(build_bucket_programs(model, param_specs, strategy, input_specs,
                                                           platforms, buckets, out_meta))
    from jax import __version__ as jax_version
    if generation is None:
        in_layouts = input_layouts(strategy, input_specs)
        names = [s.name for s in model.input_specs()]
        in_meta = [TensorMeta(names[i] if i < len(names) else f"input_{i}", s, d, lay)
                   for i, ((s, d), lay) in enumerate(zip(input_specs, in_layouts))]

    for stale in out_dir.glob(f"{model.name}*.dinb"):
        if re.fullmatch(rf"{re.escape(model.name)}\d+\.dinb", stale.name):
            stale.unlink()  # files of an earlier export with more ranks must not linger
    export_id = uuid.uuid4().hex
    paths = []
    for rank in progress(range(n), desc=f"export {model.name}", disable=not show_progress):
        slices = slices_of(rank)
        stage = strategy.rank_stage(rank)
        meta = {
            "dinb_version": __version__,
            "jax_version": jax_version,
            "model": model.name,
            "model_config": model.config(),
            "rank": rank,
            "world_size": n,
            "export_id": export_id,
            "platforms": list(platforms),
            "inputs": [m.to_json() for m in in_meta],
            "outputs": [m.to_json() for m in out_meta],
            "params": {
                k: {"shape": list(shape), "dtype": dtype,
                    "layout": strategy[k].to_json(),
                    "slice": [[s.start, s.stop] for s in strategy.slice_of(k, rank, shape) or ()]}
                for k, (shape, dtype) in param_specs.items() if strategy.holds(k, rank)
            },
        }
        if stage_meta[0] is not None:
            meta["pipeline"] = stage_meta[stage]
        if generation is not None:
            meta["generation"] = generation
        if buckets is not None:
            meta["batch_buckets"] = buckets
        paths.append(write_slice_file(out_dir / slice_file_name(model.name, rank), meta,
                                      slices, stage_programs[stage if stage_meta[0] is not None else 0]))
    strategy.save(out_dir / "strategy.json")
    return paths
