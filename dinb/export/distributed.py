"""Export a model as per-rank slice files: one SPMD program plus each rank's weight slices.

``export_distributed`` traces ``model.apply`` once with every parameter and input annotated by
its layout, and serializes the resulting ``jax.export`` program (StableHLO with shardings) for
CPU and CUDA. XLA's SPMD partitioner later turns it into the per-rank program and inserts the
collectives the layouts imply. Each rank's file then gets ``param[layout.slice_of(rank)]`` for
every parameter, so a rank reads only its own weights. No devices are needed to export: the
program is traced over an abstract mesh.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.export.decode_programs import build_generation_programs, build_staged_generation
from dinb.export.slicefile import SUFFIX, TensorMeta, parse_slice_file_name, slice_file_name, write_slice_file
from dinb.export.stage_programs import build_stage_programs
from dinb.export.tracing import DEFAULT_PLATFORMS, input_layouts, trace_program
from dinb.formats.safetensors import np_dtype
from dinb.models.base import ModelDef
from dinb.progress import progress
from dinb.sharding import batch_buckets as bb
from dinb.sharding.strategy import Strategy
from dinb.version import __version__

FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
Spec = tuple[tuple[int, ...], str]  # a tensor's shape and dtype


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], (tuple, list)):
        return tuple(int(s) for s in x[0]), str(np.dtype(x[1]))
    arr = np.asarray(x)
    return tuple(arr.shape), str(arr.dtype)


def build_program(
    model: ModelDef,
    param_specs: dict[str, Spec],
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
    param_specs: dict[str, Spec],
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


@dataclass
class Programs:
    """What an export traced: each stage's programs by name (one stage without pipelines), the
    slice files' ``pipeline`` record of each stage (None: one stage), the input and output
    metadata, a decoder's ``generation`` record and the batch buckets made (None: none)."""

    per_stage: list[dict[Any, bytes]]
    stage_meta: list[dict[str, Any] | None]
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    generation: dict[str, Any] | None = None
    buckets: list[int] | None = None

    def of_rank(self, strategy: Strategy, rank: int) -> dict[Any, bytes]:
        return self.per_stage[strategy.rank_stage(rank) if self.stage_meta[0] is not None else 0]


class ParamSource:
    """Where each rank's parameter slices come from: whole arrays, or a distributed checkpoint
    (any layout and rank count) read rank by rank, so no whole tensor is ever held."""

    def __init__(self, params: Mapping[str, Any] | Any, model: ModelDef, strategy: Strategy):
        self.strategy = strategy
        if hasattr(params, "load_rank"):
            self.ckpt, self.arrays = params, None
            specs = params.param_specs()
            wanted = list(model.param_shapes())
            names = wanted if set(wanted) <= set(specs) else list(specs)
            self.specs = {k: specs[k] for k in names}
        else:
            self.ckpt = None
            self.arrays = {k: np.asarray(v) for k, v in params.items()}
            self.specs = {k: (tuple(v.shape), str(v.dtype)) for k, v in self.arrays.items()}
        #: parameters the strategy holds under a second name (a staged export's tied head), by source
        self.copies = {copy: source for copy, source in model.tied_copies().items()
                       if copy in strategy and copy not in self.specs and source in self.specs}
        self.specs.update({copy: self.specs[source] for copy, source in self.copies.items()})

    def slices(self, rank: int, dtypes: Mapping[str, str]) -> dict[str, np.ndarray]:
        """Rank ``rank``'s slices of the parameters it holds, cast to ``dtypes``."""
        held = [k for k in self.specs if self.strategy.holds(k, rank)]
        copies = [k for k in held if k in self.copies]
        held = [k for k in held if k not in self.copies]
        if self.ckpt is not None:
            read = self.ckpt.load_rank(self.strategy, rank, held, show_progress=False)
            whole = {k: self.ckpt.load_rank(None, 0, [self.copies[k]], show_progress=False)[self.copies[k]]
                     for k in copies}
        else:
            read = {k: self.arrays[k][self.strategy.slice_of(k, rank, self.arrays[k].shape)] for k in held}
            whole = {k: self.arrays[self.copies[k]] for k in copies}
        read.update({k: np.asarray(a)[self.strategy.slice_of(k, rank, np.shape(a))]
                     for k, a in whole.items()})
        return {k: v.astype(np_dtype(dtypes[k]), copy=False) for k, v in read.items()}


def weights_dtype(specs: Mapping[str, Spec]) -> str:
    """The floating-point dtype most of the weights' elements have (what a checkpoint computes
    in when no ``dtype`` is asked for: a bfloat16 download keeps its cache in bfloat16)."""
    count: dict[str, int] = {}
    for shape, d in specs.values():
        if d in FLOAT_DTYPES:
            count[d] = count.get(d, 0) + int(np.prod(shape))
    return max(count, key=lambda d: count[d]) if count else "float32"


def cast_specs(specs: Mapping[str, Spec], input_specs: list[Spec],
               dtype: str | None) -> tuple[dict[str, Spec], list[Spec]]:
    """The parameter and input specs with floating-point dtypes cast to ``dtype`` (None: kept)."""
    if dtype is None:
        return dict(specs), input_specs
    if dtype not in FLOAT_DTYPES:
        raise DinbError(f"dtype {dtype!r}: export casts to one of {sorted(FLOAT_DTYPES)}")
    return ({k: (s, dtype if d in FLOAT_DTYPES else d) for k, (s, d) in specs.items()},
            [(s, dtype if d in FLOAT_DTYPES else d) for s, d in input_specs])


def trace_programs(model: ModelDef, param_specs: dict[str, Spec], strategy: Strategy,
                   input_specs: list[Spec], platforms: Sequence[str], dtype: str | None,
                   micro_batches: Sequence[int] | None,
                   batch_buckets: Sequence[int] | str | None) -> Programs:
    """Every program the export holds: a decoder's, each pipeline stage's, or the one-stage
    program with its batch buckets."""
    generates = getattr(model, "generates", False)
    if generates or strategy.pipeline_stages > 1:
        if batch_buckets not in (None, "auto"):
            raise StrategyError("batch buckets are for one-stage exports of models without a KV cache; "
                                "a pipelined export has micro-batches, a decoder sequence slots")
        if generates and strategy.pipeline_stages > 1:
            per_stage, stage_meta, generation, in_meta, out_meta = build_staged_generation(
                model, param_specs, strategy, dtype or weights_dtype(param_specs), platforms)
            return Programs(per_stage, list(stage_meta), in_meta, out_meta, generation)
        if generates:
            programs, generation, in_meta, out_meta = build_generation_programs(
                model, param_specs, strategy, dtype or weights_dtype(param_specs), platforms)
            return Programs([programs], [None], in_meta, out_meta, generation)
        per_stage, stage_meta, out_meta = build_stage_programs(
            model, param_specs, strategy, input_specs, platforms, micro_batches)
        return Programs(per_stage, list(stage_meta), input_meta(model, strategy, input_specs), out_meta)
    if micro_batches not in (None, [1], (1,)):
        raise StrategyError(
            f"micro_batches={list(micro_batches)}: micro-batches are for pipeline stages; the strategy has "
            "one stage (give pipeline_stages= to infer_predict_layout)")
    buckets = bucket_choice(model, strategy, input_specs, batch_buckets)  # checked before any tracing
    program, out_meta = build_program(model, param_specs, strategy, input_specs, platforms)
    programs: dict[Any, bytes] = {1: program}
    if buckets is not None:
        try:
            programs.update(build_bucket_programs(model, param_specs, strategy, input_specs, platforms,
                                                  buckets, out_meta))
        except StrategyError:
            if batch_buckets != "auto":
                raise
            buckets = None  # outputs without the batch axis: "auto" makes none
    return Programs([programs], [None], input_meta(model, strategy, input_specs), out_meta, buckets=buckets)


def bucket_choice(model: ModelDef, strategy: Strategy, input_specs: list[Spec],
                  batch_buckets: Sequence[int] | str | None) -> list[int] | None:
    """The batch buckets to trace: those asked for (checked), or with ``"auto"`` the powers of two
    below the batch that the input layouts divide when every input has the batch on axis 0
    (None: none)."""
    if batch_buckets is None:
        return None
    layouts, shapes = input_layouts(strategy, input_specs), [s for s, _ in input_specs]
    names = [s.name for s in model.input_specs()]
    if batch_buckets != "auto":
        return bb.check(batch_buckets, layouts, shapes, names)
    try:
        buckets = bb.check(bb.choices(layouts, shapes), layouts, shapes, names)
    except (StrategyError, IndexError):
        return None
    return buckets if len(buckets) > 1 else None


def input_meta(model: ModelDef, strategy: Strategy,
               input_specs: list[Spec]) -> list[TensorMeta]:
    names = [s.name for s in model.input_specs()]
    return [TensorMeta(names[i] if i < len(names) else f"input_{i}", s, d, lay)
            for i, ((s, d), lay) in enumerate(zip(input_specs, input_layouts(strategy, input_specs)))]


def rank_meta(model: ModelDef, strategy: Strategy, rank: int, export_id: str, platforms: Sequence[str],
              param_specs: dict[str, Spec], programs: Programs) -> dict[str, Any]:
    """The metadata of rank ``rank``'s slice file (see :mod:`dinb.export.slicefile`)."""
    from jax import __version__ as jax_version

    meta = {
        "dinb_version": __version__, "jax_version": jax_version, "model": model.name,
        "model_config": model.config(), "rank": rank, "world_size": strategy.device_num,
        "export_id": export_id, "platforms": list(platforms),
        "inputs": [m.to_json() for m in programs.inputs], "outputs": [m.to_json() for m in programs.outputs],
        "params": {k: {"shape": list(shape), "dtype": dtype, "layout": strategy[k].to_json(),
                       "slice": [[s.start, s.stop] for s in strategy.slice_of(k, rank, shape) or ()]}
                   for k, (shape, dtype) in param_specs.items() if strategy.holds(k, rank)},
    }
    if programs.stage_meta[0] is not None:
        meta["pipeline"] = programs.stage_meta[strategy.rank_stage(rank)]
    if programs.generation is not None:
        meta["generation"] = programs.generation
    if programs.buckets is not None:
        meta["batch_buckets"] = programs.buckets
    return meta


def remove_stale(out_dir: Path, name: str) -> None:
    """Remove ``{name}{rank}.dinb`` files of an earlier export (one with more ranks must not linger)."""
    for stale in out_dir.glob(f"{name}*{SUFFIX}"):
        parsed = parse_slice_file_name(stale.name)
        if parsed is not None and parsed[0] == name:
            stale.unlink()


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
    batch_buckets: Sequence[int] | str | None = "auto",
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
    instead of padding it to the export's (see :mod:`dinb.sharding.batch_buckets`). The default
    ``"auto"`` takes the powers of two below the export's batch that the input layouts divide,
    where every input and output has the batch on axis 0 (else none); None: no buckets.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = ParamSource(params, model, strategy)
    param_specs, input_specs = cast_specs(source.specs, [_shape_dtype(x) for x in example_inputs], dtype)
    strategy.validate({k: s for k, (s, _) in param_specs.items()}, [s for s, _ in input_specs])
    strategy = source.strategy = strategy.with_shapes({k: s for k, (s, _) in param_specs.items()})
    programs = trace_programs(model, param_specs, strategy, input_specs, platforms, dtype, micro_batches,
                              batch_buckets)
    remove_stale(out_dir, model.name)
    export_id = uuid.uuid4().hex
    dtypes = {k: d for k, (_, d) in param_specs.items()}
    paths = [write_slice_file(out_dir / slice_file_name(model.name, rank),
                              rank_meta(model, strategy, rank, export_id, platforms, param_specs, programs),
                              source.slices(rank, dtypes), programs.of_rank(strategy, rank))
             for rank in progress(range(strategy.device_num), desc=f"export {model.name}",
                                  disable=not show_progress)]
    strategy.save(out_dir / "strategy.json")
    return paths
