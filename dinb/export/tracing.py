"""Trace a function into one serialized SPMD program over an abstract mesh (no devices needed).

:mod:`dinb.export` traces a model's ``apply`` (and each pipeline stage) with it, and
:mod:`dinb.export.decode_programs` a decoder's prefill and decode step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinb.errors import StrategyError
from dinb.sharding.layout import Layout, one_mesh_shardings
from dinb.sharding.strategy import Strategy

DEFAULT_PLATFORMS = ("cpu", "cuda")


def trace_program(
    fn: Any,
    param_specs: Mapping[str, tuple[tuple[int, ...], str]],
    param_layouts: Mapping[str, Layout],
    input_specs: Sequence[tuple[tuple[int, ...], str]],
    in_layouts: Sequence[Layout],
    out_layouts: Sequence[Layout] | Any | None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    what: str = "the model",
    custom_calls: Sequence[str] = (),
    devices: Sequence[Any] | None = None,
) -> tuple[bytes, list[tuple[tuple[int, ...], str, Layout]]]:
    """Serialize ``fn(params, *inputs) -> tuple`` as one SPMD program over an abstract mesh.

    ``out_layouts`` is a list, a function of the traced output shapes giving one, or None
    (replicated outputs). ``custom_calls``: kernels outside ``jax.export``'s stable set that the
    program may call (cuDNN's attention): such a program is read only by the JAX that wrote it,
    which the slice files record. ``devices``: trace over a mesh of these real devices instead of
    an abstract one (for kernels lowered only for present devices). Returns the program and each
    output's shape, dtype and layout.
    """
    import jax
    from jax import export as jax_export

    n = next(iter(param_layouts.values())).device_num if param_layouts else in_layouts[0].device_num
    outs = list(jax.eval_shape(
        fn,
        {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in param_specs.items()},
        *[jax.ShapeDtypeStruct(s, d) for s, d in input_specs],
    ))
    if callable(out_layouts):
        out_layouts = out_layouts([tuple(o.shape) for o in outs])
    out_layouts = list(out_layouts or [Layout.replicated(len(o.shape), n) for o in outs])
    if len(out_layouts) != len(outs):
        raise StrategyError(
            f"strategy has layouts for {len(out_layouts)} outputs, {what} returns {len(outs)}"
        )
    for i, (lay, o) in enumerate(zip(out_layouts, outs)):
        lay.check_shape(o.shape, f"output {i}")

    pnames = list(param_specs)
    shardings = one_mesh_shardings([param_layouts[k] for k in pnames] + list(in_layouts) + out_layouts,
                                   devices)
    p_shard = dict(zip(pnames, shardings))
    x_shard = shardings[len(pnames):len(pnames) + len(in_layouts)]
    o_shard = shardings[len(pnames) + len(in_layouts):]

    jitted = jax.jit(fn, in_shardings=(p_shard, *x_shard), out_shardings=tuple(o_shard))
    args = (
        {k: jax.ShapeDtypeStruct(s, d, sharding=p_shard[k]) for k, (s, d) in param_specs.items()},
        *[jax.ShapeDtypeStruct(s, d, sharding=sh) for (s, d), sh in zip(input_specs, x_shard)],
    )
    checks = [jax_export.DisabledSafetyCheck.custom_call(c) for c in custom_calls]
    exported = jax_export.export(jitted, platforms=tuple(platforms), disabled_checks=checks)(*args)
    return bytes(exported.serialize()), [
        (tuple(o.shape), str(np.dtype(o.dtype)), lay) for o, lay in zip(outs, out_layouts)]


def input_layouts(strategy: Strategy, input_specs: Sequence[tuple[tuple[int, ...], str]]) -> list[Layout]:
    """The strategy's input layouts, or replicated ones (over one stage's ranks) when it gives none."""
    n = strategy.stage_device_num
    return list(strategy.inputs) or [Layout.replicated(len(s), n) for s, _ in input_specs]
