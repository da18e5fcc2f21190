"""A decoder's export: its generation programs, traced over the strategy's layouts, and one cache.

A model that generates (``model.generates``, such as :class:`dinb.models.llama.LlamaDecoder`)
exports, besides its weight slices (the programs are those of :mod:`dinb.models.decode_loop`):

* ``program``: the decode step with its logits, ``(tokens (S,), positions (S,), cache) ->
  (logits (S, V), cache)`` over the whole cache (``Model.decode_step``, the explorer's view);
* ``program/decode_<k>_w<W>`` and ``..._sample``: ``k`` decode steps in one call, tokens picked
  on the device (greedy, or by each slot's sampling), the attention over the first ``W`` cache
  positions: one for each ``k`` of the model's ``decode_steps`` and each window ``W`` of its
  ``windows`` (the runtime runs the smallest window that holds every slot's next positions, so
  a step's cost follows the tokens in the cache, by bucket);
* ``program/prefill_<R>x<P>``: ``R`` prompts of up to ``P`` tokens at once (prompts that arrive
  together: a ``generate`` of several, serving's joiners), for each pair of the model's
  ``prefill_shapes``; exported on a machine with a CUDA GPU also ``.../prefill_<R>x<P>@cuda``,
  the same with cuDNN's flash attention (CUDA only: the portable one runs on CPU and GPU);
* the KV cache: an input and output of every program, laid out by the strategy (key/value heads
  split or replicated over the ranks, see the model), which the runtime allocates once on the
  devices and *donates* to every call, so XLA updates it in place.

A paged export (``cache_blocks``: see :mod:`dinb.models.kv_cache`) has the same programs, each
taking the slots' block tables ``(S, N)`` after the cache, and ``program/prefill_1x<P>_w<W>``
for the rest of a prompt whose first blocks are cached (``starts`` after the tables): its
``P``-token bucket attends over ``W`` positions of its blocks.

With pipeline stages (:mod:`dinb.models.decode_stages`) each rank's file holds its stage's
parameters, ``program`` is its stage's decode step (activations in, activations or the logits
out) and the cache is its stage's layers' (``generation.cache``); the generation programs are
built when the export is loaded, from the model's own definition, as the per-rank steps of MPI
ranks are (:mod:`dinb.runtime.runners.decoder_stages`).

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
from dinb.models.decode_loop import SAMPLING, STATE, STOPS, decode_program, prefill_program
from dinb.models.decode_stages import stage_decode
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import Strategy

#: cuDNN's fused attention, which a ``@cuda`` prefill calls (outside jax.export's stable set)
CUDNN_ATTENTION = "__cudnn$fmhaSoftmax"


def cache_bytes(cache: TensorMeta, rank: int) -> int:
    """Bytes of the KV cache that ``rank`` holds."""
    shape = [s.stop - s.start for s in cache.layout.slice_of(rank, cache.shape, cache.name)]
    return int(np.prod(shape)) * np.dtype(np_dtype(cache.dtype)).itemsize


def decode_name(steps: int, window: int, sample: bool = False) -> str:
    return f"decode_{steps}_w{window}" + ("_sample" if sample else "")


def prefill_name(rows: int, bucket: int, platform: str | None = None, window: int | None = None) -> str:
    """``prefill_<R>x<P>``; ``..._w<W>`` for the rest of a prompt after a cached prefix (paged)."""
    name = f"prefill_{rows}x{bucket}" + (f"_w{window}" if window else "")
    return name + (f"@{platform}" if platform else "")


def gpus_for(ranks: int) -> list[Any] | None:
    """``ranks`` CUDA GPUs of this process, or None: cuDNN's attention is lowered for real
    devices only (not over an abstract mesh), so the ``@cuda`` prefill programs are exported on
    a machine with as many GPUs as the export has ranks."""
    import jax

    try:
        found = [d for d in jax.devices("gpu") if d.platform == "gpu"]
    except RuntimeError:
        return None
    return found[:ranks] if len(found) >= ranks else None


class GenerationLayouts:
    """The layouts of the programs' inputs and outputs under a strategy (the decode step's own
    inputs give the slots' and the cache's)."""

    def __init__(self, strategy: Strategy):
        self.slot = strategy.inputs[0]
        self.cache = strategy.inputs[2]
        self.paged = len(strategy.inputs) > 3  # the block tables' layout follows the cache's
        dm = self.cache.dev_matrix
        slot_axis = self.slot.tensor_map[0]
        self.whole1, self.whole2 = Layout(dm, [-1]), Layout(dm, [-1, -1])
        self.per_slot = Layout(dm, [slot_axis, -1])  # (S, columns): the sampling and the stops

    def state(self) -> list[Layout]:
        return [self.slot] * len(STATE)

    def sampling(self) -> list[Layout]:
        return [self.per_slot] * (len(SAMPLING) + 1)


def sampling_specs(slots: int) -> list[tuple[tuple[int, ...], str]]:
    """``sampling_f``, ``sampling_i`` and ``stops`` of ``slots`` slots."""
    return [((slots, cols), dtype) for _, cols, dtype in SAMPLING] + [((slots, STOPS), "int32")]


def build_generation_programs(
    model: Any,
    param_specs: Mapping[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    float_dtype: str,
    platforms: Sequence[str],
) -> tuple[dict[Any, bytes], dict[str, Any], list[TensorMeta], list[TensorMeta]]:
    """Trace every generation program over ``strategy``'s layouts (see the module docstring).

    Returns ``{1: the decode step, name: program}``, the slice files' ``generation`` record, and
    the decode step's input and output metadata (what ``Model.predict`` would run).
    """
    trace = _Tracer(model, param_specs, strategy, float_dtype, platforms)
    lay = trace.lay
    step_in = [((model.slots,), "int32"), ((model.slots,), "int32"), trace.cache_spec, *trace.tables_spec]
    step_lay = [lay.slot, lay.slot, lay.cache, *[lay.whole2] * len(trace.tables_spec)]
    program, outs = trace_program(model.decode, param_specs, trace.layouts, step_in, step_lay,
                                  list(strategy.outputs), platforms, "the decode step")
    programs: dict[Any, bytes] = {1: program}
    for steps in model.decode_steps:
        for window in model.windows:
            for sample in (False, True):
                programs[decode_name(steps, window, sample)] = trace.decode(steps, window, sample)
    kernels = {"prefill": {p: "xla" for p in platforms}}
    cuda = "cuda" in platforms and trace.gpus is not None
    for rows, bucket in model.prefill_shapes():
        programs[prefill_name(rows, bucket)] = trace.prefill(rows, bucket, "xla")
        if cuda:
            try:
                programs[prefill_name(rows, bucket, "cuda")] = trace.prefill(rows, bucket, "cudnn")
                kernels["prefill"]["cuda"] = "cudnn"
            except Exception as e:  # noqa: BLE001 - cuDNN refused the shapes: the portable one serves
                kernels["prefill"]["cuda"] = f"xla (cuDNN refused: {type(e).__name__}: {str(e)[:160]})"
                cuda = False
    for bucket, window in model.prefix_shapes():
        programs[prefill_name(1, bucket, window=window)] = trace.prefill(1, bucket, "xla", window)
    cache = TensorMeta("kv_cache", *trace.cache_spec, lay.cache)
    record = {"slots": model.slots, "max_len": model.max_len, "buckets": list(model.buckets),
              "windows": list(model.windows), "decode_steps": list(model.decode_steps),
              "prefill_shapes": [list(rp) for rp in model.prefill_shapes()], "stops": STOPS,
              "kernels": kernels, "programs": sorted(str(k) for k in programs if k != 1),
              "cache": cache.to_json(),
              "cache_bytes": [cache_bytes(cache, r) for r in range(strategy.device_num)]}
    if model.cache_blocks is not None:
        record["paged"] = {"blocks": model.cache_blocks, "block_size": model.block_size,
                           "table_width": model.table_width,
                           "prefix_shapes": [list(pw) for pw in model.prefix_shapes()]}
    names = ("tokens", "positions", "kv_cache", "block_tables")
    inputs = [TensorMeta(n, s, d, la) for n, (s, d), la in zip(names, step_in, step_lay)]
    outputs = [TensorMeta(n, *o) for n, o in zip(("logits", "kv_cache"), outs)]
    return programs, record, inputs, outputs


def build_staged_generation(
    model: Any,
    param_specs: Mapping[str, tuple[tuple[int, ...], str]],
    strategy: Strategy,
    float_dtype: str,
    platforms: Sequence[str],
) -> tuple[list[dict[Any, bytes]], list[dict[str, Any]], dict[str, Any], list[TensorMeta], list[TensorMeta]]:
    """A decoder over ``strategy``'s pipeline stages: each stage's decode step (its ``program``),
    the ``pipeline`` record of each stage's files, the ``generation`` record (the cache: one
    stage's layers) and the decode step's input and output metadata."""
    from dinb.sharding.pipeline import stage_layer_ranges

    ranges = stage_layer_ranges(model, strategy)
    lay = GenerationLayouts(strategy)
    per = ranges[0][1] - ranges[0][0]
    shape = model.cache_shape()
    cache = TensorMeta("kv_cache", (per, *shape[1:]), float_dtype, lay.cache)
    tables = [((model.slots, model.table_width), "int32")] if model.cache_blocks is not None else []
    carry = Layout(lay.cache.dev_matrix, [lay.slot.tensor_map[0], -1, -1])
    slots, hidden = model.slots, int(model.hf["hidden_size"])
    state = [((slots,), "int32")] * len(STATE)
    tail = [*state, *sampling_specs(slots), (cache.shape, float_dtype), *tables]
    tail_lay = [*lay.state(), *lay.sampling(), lay.cache, *[lay.whole2] * len(tables)]
    programs, metas = [], []
    for s, (a, b) in enumerate(ranges):
        first, last = s == 0, s == len(ranges) - 1
        x = ((slots,), "int32") if first else ((slots, 1, hidden), float_dtype)
        names = strategy.stage_params(s)
        out_lay = [lay.whole2 if last else carry, lay.cache]
        program, _ = trace_program(stage_decode(model, range(a, b), first, last, model.max_len, None),
                                   {k: param_specs[k] for k in names}, {k: strategy[k] for k in names},
                                   [x, *tail], [lay.slot if first else carry, *tail_lay], out_lay, platforms,
                                   f"the decode step of stage {s} (layers {a}..{b - 1})")
        programs.append({1: program})
        metas.append({"stages": len(ranges), "stage": s, "stage_ranks": strategy.stage_device_num,
                      "layers": [a, b], "micro_batches": [1], "receives": [], "sends": []})
    record = {"slots": model.slots, "max_len": model.max_len, "buckets": list(model.buckets),
              "windows": list(model.windows), "decode_steps": list(model.decode_steps),
              "prefill_shapes": [list(rp) for rp in model.prefill_shapes()], "stops": STOPS,
              "kernels": {"prefill": {p: "xla" for p in platforms}}, "programs": [],
              "cache": cache.to_json(),
              "cache_bytes": [cache_bytes(cache, r % strategy.stage_device_num)
                              for r in range(strategy.device_num)]}
    if model.cache_blocks is not None:
        record["paged"] = {"blocks": model.cache_blocks, "block_size": model.block_size,
                           "table_width": model.table_width,
                           "prefix_shapes": [list(pw) for pw in model.prefix_shapes()]}
    names = ("tokens", "positions", "kv_cache", "block_tables")
    specs = [((slots,), "int32"), ((slots,), "int32"), (cache.shape, float_dtype), *tables]
    inputs = [TensorMeta(n, sh, d, la) for n, (sh, d), la in
              zip(names, specs, [lay.slot, lay.slot, lay.cache, lay.whole2])]
    outputs = [TensorMeta("logits", (slots, model.vocab), "float32", lay.whole2), cache]
    return programs, metas, record, inputs, outputs


class _Tracer:
    """Traces the decode and prefill programs of one model under one strategy."""

    def __init__(self, model: Any, param_specs: Mapping[str, tuple[tuple[int, ...], str]], strategy: Strategy,
                 float_dtype: str, platforms: Sequence[str]):
        self.model, self.param_specs, self.platforms = model, param_specs, platforms
        self.layouts = {k: strategy[k] for k in param_specs}
        self.lay = GenerationLayouts(strategy)
        self.cache_spec = (model.cache_shape(), float_dtype)
        self.state = [((model.slots,), "int32")] * len(STATE)
        self.tables_spec = [] if model.cache_blocks is None else [((model.slots, model.table_width), "int32")]
        self.gpus = gpus_for(strategy.device_num)

    def decode(self, steps: int, window: int, sample: bool) -> bytes:
        lay, slots = self.lay, self.model.slots
        specs = [*self.state, ((slots,), "bool"), *sampling_specs(slots), self.cache_spec, *self.tables_spec]
        ins = [*lay.state(), lay.slot, *lay.sampling(), lay.cache, *[lay.whole2] * len(self.tables_spec)]
        outs = [lay.whole2, lay.whole2, *lay.state(), lay.cache]
        program, _ = trace_program(decode_program(self.model, steps, window, sample), self.param_specs,
                                   self.layouts, specs, ins, outs, self.platforms,
                                   f"{steps} decode steps, window {window}{', sampling' if sample else ''}")
        return program

    def prefill(self, rows: int, bucket: int, attention: str, window: int | None = None) -> bytes:
        lay, slots = self.lay, self.model.slots
        starts = [((rows,), "int32")] if window else []
        specs = [((rows, bucket), "int32"), *[((rows,), "int32")] * 3, *self.state, *sampling_specs(slots),
                 self.cache_spec, *self.tables_spec, *starts]
        ins = [lay.whole2, lay.whole1, lay.whole1, lay.whole1, *lay.state(), *lay.sampling(), lay.cache,
               *[lay.whole2] * len(self.tables_spec), *[lay.whole1] * len(starts)]
        outs = [lay.whole1, lay.whole1, lay.whole2, *lay.state(), lay.cache]
        what = f"the prefill of {rows} prompt(s) of up to {bucket} tokens" + (
            f" after a cached prefix, over {window} positions" if window else "")
        cudnn = attention == "cudnn"
        program, _ = trace_program(prefill_program(self.model, attention, window), self.param_specs,
                                   self.layouts, specs, ins, outs, ("cuda",) if cudnn else self.platforms,
                                   what + (" (cuDNN)" if cudnn else ""),
                                   custom_calls=(CUDNN_ATTENTION,) if cudnn else (),
                                   devices=self.gpus if cudnn else None)
        return program
