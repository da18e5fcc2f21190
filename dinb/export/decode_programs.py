"""A decoder's export: one decode-step program, one prefill program per prompt bucket, one cache.

A model that generates (``model.generates``, such as :class:`dinb.models.llama.LlamaDecoder`)
exports three kinds of thing besides its weight slices:

* ``decode(params, tokens (S,), positions (S,), cache) -> (logits (S, V), cache)``: the slice
  file's main ``program``, the one step that runs once per generated token for all ``S``
  sequence slots together;
* ``prefill(params, ids (1, P), length (), slot (), cache) -> (logits (1, V), cache)``: one
  program ``program/prefill_<P>`` per *bucket* ``P``: a prompt of ``n <= P`` tokens runs in the
  smallest bucket that holds it, padded, so a few compiled shapes serve every prompt length;
* the KV cache: an input and output of both, laid out by the strategy (key/value heads split or
  replicated over the ranks, see the model), which the runtime allocates once on the devices
  and *donates* to every call, so XLA updates it in place: a decode step writes one position of
  every slot, never copies the cache.

The cache of rank ``r`` takes ``prod(slice shape) * itemsize`` bytes: with ``L`` layers, ``S``
slots, ``T`` positions, ``K`` key/value heads of ``dh`` over ``tp`` ranks it is
``L * 2 * S * (K / tp or 1) * T * dh`` elements per rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinb.export.slicefile import TensorMeta
from dinb.export.tracing import trace_program
from dinb.formats.safetensors import np_dtype
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import Strategy


def cache_bytes(cache: TensorMeta, rank: int) -> int:
    """Bytes of the KV cache that ``rank`` holds."""
    shape = [s.stop - s.start for s in cache.layout.slice_of(rank, cache.shape, cache.name)]
    return int(np.prod(shape)) * np.dtype(np_dtype(cache.dtype)).itemsize


def build_generation_programs(
    model: Any,
    param_specs: Mapping[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    float_dtype: str,
    platforms: Sequence[str],
) -> tuple[dict[Any, bytes], dict[str, Any], list[TensorMeta], list[TensorMeta]]:
    """Trace the decode step and every prefill bucket over ``strategy``'s layouts.

    Returns ``{1: decode, "prefill_<P>": prefill}``, the slice files' ``generation`` record, and
    the decode step's input and output metadata (what ``Model.predict`` runs).
    """
    layouts = {k: strategy[k] for k in param_specs}
    n = strategy.device_num
    cache_layout = strategy.inputs[2]
    slot_layout = strategy.inputs[0]
    cache_spec = (model.cache_shape(), float_dtype)
    cache = TensorMeta("kv_cache", *cache_spec, cache_layout)
    whole0 = Layout(cache_layout.dev_matrix, [])

    def decode(params: dict[str, Any], tokens: Any, positions: Any, kv: Any) -> tuple[Any, Any]:
        return model.decode(params, tokens, positions, kv)

    dec_inputs = [((model.slots,), "int32"), ((model.slots,), "int32"), cache_spec]
    dec_layouts = [slot_layout, slot_layout, cache_layout]
    program, outs = trace_program(decode, param_specs, layouts, dec_inputs, dec_layouts,
                                  list(strategy.outputs), platforms, "the decode step")
    programs: dict[Any, bytes] = {1: program}
    names = ("tokens", "positions", "kv_cache")
    inputs = [TensorMeta(nm, s, d, lay) for nm, (s, d), lay in zip(names, dec_inputs, dec_layouts)]
    outputs = [TensorMeta(nm, *o) for nm, o in zip(("logits", "kv_cache"), outs)]

    def prefill(params: dict[str, Any], ids: Any, length: Any, slot: Any, kv: Any) -> tuple[Any, Any]:
        return model.prefill(params, ids, length, slot, kv)

    logits_layout = Layout(cache_layout.dev_matrix, [-1, -1])
    pre_in = pre_out = None
    for bucket in model.buckets:
        specs = [((1, bucket), "int32"), ((), "int32"), ((), "int32"), cache_spec]
        lays = [Layout(whole0.dev_matrix, [-1, -1]), whole0, whole0, cache_layout]
        programs[f"prefill_{bucket}"], outs = trace_program(
            prefill, param_specs, layouts, specs, lays, [logits_layout, cache_layout], platforms,
            f"the prefill of {bucket} tokens")
        pre_in = [TensorMeta(nm, s, d, lay).to_json() for nm, (s, d), lay
                  in zip(("input_ids", "length", "slot", "kv_cache"), specs, lays)]
        pre_out = [TensorMeta(nm, *o).to_json() for nm, o in zip(("logits", "kv_cache"), outs)]
    record = {"slots": model.slots, "max_len": model.max_len, "buckets": list(model.buckets),
              "cache": cache.to_json(), "cache_bytes": [cache_bytes(cache, r) for r in range(n)],
              "prefill_inputs": pre_in, "prefill_outputs": pre_out}
    return programs, record, inputs, outputs
