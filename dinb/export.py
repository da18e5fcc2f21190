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
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.formats.safetensors import np_dtype
from dinb.layout import Layout, one_mesh_shardings
from dinb.models.base import ModelDef
from dinb.progress import progress
from dinb.slicefile import TensorMeta, slice_file_name, write_slice_file
from dinb.strategy import Strategy
from dinb.version import __version__

DEFAULT_PLATFORMS = ("cpu", "cuda")
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], (tuple, list)):
        return tuple(int(s) for s in x[0]), str(np.dtype(x[1]))
    arr = np.asarray(x)
    return tuple(arr.shape), str(arr.dtype)


def input_layouts(strategy: Strategy, input_specs: Sequence[tuple[tuple[int, ...], str]]) -> list[Layout]:
    """The strategy's input layouts, or replicated ones when it gives none."""
    n = strategy.device_num
    return list(strategy.inputs) or [Layout.replicated(len(s), n) for s, _ in input_specs]


def build_program(
    model: ModelDef,
    param_specs: dict[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    input_specs: Sequence[tuple[tuple[int, ...], str]],
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> tuple[bytes, list[TensorMeta]]:
    """Trace and serialize the SPMD program; returns its bytes and the output metadata."""
    import jax
    from jax import export as jax_export

    n = strategy.device_num
    in_layouts = input_layouts(strategy, input_specs)
    out_struct = jax.eval_shape(
        model.apply,
        {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in param_specs.items()},
        *[jax.ShapeDtypeStruct(s, d) for s, d in input_specs],
    )
    single = not isinstance(out_struct, (tuple, list))
    outs = [out_struct] if single else list(out_struct)
    out_layouts = list(strategy.outputs) or [Layout.replicated(len(o.shape), n) for o in outs]
    if len(out_layouts) != len(outs):
        raise StrategyError(
            f"strategy has layouts for {len(out_layouts)} outputs, model {model.name!r} returns "
            f"{len(outs)}"
        )
    for i, (lay, o) in enumerate(zip(out_layouts, outs)):
        lay.check_shape(o.shape, f"output {i}")

    pnames = list(param_specs)
    shardings = one_mesh_shardings([strategy[k] for k in pnames] + in_layouts + out_layouts)
    p_shard = dict(zip(pnames, shardings))
    x_shard = shardings[len(pnames):len(pnames) + len(in_layouts)]
    o_shard = shardings[len(pnames) + len(in_layouts):]

    def program(params: dict[str, Any], *inputs: Any) -> Any:
        out = model.apply(params, *inputs)
        return (out,) if single else tuple(out)

    jitted = jax.jit(program, in_shardings=(p_shard, *x_shard), out_shardings=tuple(o_shard))
    args = (
        {k: jax.ShapeDtypeStruct(s, d, sharding=p_shard[k]) for k, (s, d) in param_specs.items()},
        *[jax.ShapeDtypeStruct(s, d, sharding=sh) for (s, d), sh in zip(input_specs, x_shard)],
    )
    exported = jax_export.export(jitted, platforms=tuple(platforms))(*args)
    names = model.output_names()
    out_meta = [
        TensorMeta(names[i] if i < len(names) else f"output_{i}", tuple(o.shape),
                   str(np.dtype(o.dtype)), lay)
        for i, (o, lay) in enumerate(zip(outs, out_layouts))
    ]
    return bytes(exported.serialize()), out_meta


def export_distributed(
    model: ModelDef,
    params: Mapping[str, Any],
    strategy: Strategy,
    example_inputs: Sequence[Any],
    out_dir: str | Path,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    show_progress: bool = False,
    dtype: str | None = None,
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
            return ckpt.load_rank(strategy, rank, param_names, show_progress=False)
    else:
        arrays = {k: np.asarray(v) for k, v in params.items()}
        param_specs = {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}

        def read_slices(rank: int) -> dict[str, np.ndarray]:
            return {k: v[strategy[k].slice_of(rank, v.shape, k)] for k, v in arrays.items()}

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

    program, out_meta = build_program(model, param_specs, strategy, input_specs, platforms)
    from jax import __version__ as jax_version
    in_layouts = input_layouts(strategy, input_specs)
    names = [s.name for s in model.input_specs()]
    in_meta = [TensorMeta(names[i] if i < len(names) else f"input_{i}", s, d, lay)
               for i, ((s, d), lay) in enumerate(zip(input_specs, in_layouts))]

    for stale in out_dir.glob(f"{model.name}*.dinb"):
        stale.unlink()  # files of an earlier export with more ranks must not linger
    export_id = uuid.uuid4().hex
    paths = []
    for rank in progress(range(n), desc=f"export {model.name}", disable=not show_progress):
        slices = slices_of(rank)
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
                    "slice": [[s.start, s.stop] for s in strategy[k].slice_of(rank, shape)]}
                for k, (shape, dtype) in param_specs.items()
            },
        }
        paths.append(write_slice_file(out_dir / slice_file_name(model.name, rank), meta,
                                      slices, program))
    strategy.save(out_dir / "strategy.json")
    return paths
