"""Generation on the ranks: the KV cache on the devices, prefill and decode steps, the token loop.

:class:`DecoderRunner` holds what a decoder's export needs at run time (see
:mod:`dinb.export.decode_programs`): the decode step and the prefill programs compiled with the cache
*donated* (XLA writes the new keys and values into the cache's own buffers), and the cache
itself, allocated once per rank with its layout. Every rank runs the same calls with the same
inputs; the logits come back whole on every rank, so every rank picks the same tokens.

A generation of a batch of prompts::

    for each prompt b:  logits_b = prefill(prompt_b padded to its bucket, slot b)   # fills slot b
                        token_b = pick(logits_b)
    repeat:             logits = decode(tokens, positions)     # one token of every slot at once
                        token_b = pick(logits[b]); positions += 1

A decode step costs the same whatever the positions: it reads every slot's whole cache
(``max_len`` positions, masked beyond its own), so its time grows with the slots and the cache,
and it runs two all-reduces per layer whatever the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dinb.errors import InputError, RankMismatchError
from dinb.export.slicefile import SliceFile, TensorMeta
from dinb.formats.safetensors import np_dtype
from dinb.job import ranks
from dinb.runtime.placement import place_params, xla_collectives
from dinb.runtime.programs import deserialize
from dinb.runtime.sampling import Sampler, SamplingParams
from dinb.sharding.layout import Layout, one_mesh_shardings


class DecoderRunner:
    """A decoder export's programs and KV cache on this process's ranks."""

    provider = "xla"
    notice: str | None = None
    gives_outputs = True

    def __init__(self, files: dict[int, SliceFile], job: ranks.Job):
        first = next(iter(files.values()))
        gen = first.generation or {}
        self.files, self.job = files, job
        self.collectives = xla_collectives(job)
        self.params, _ = place_params(files, job)
        self.slots, self.max_len = int(gen["slots"]), int(gen["max_len"])
        self.buckets = sorted(int(b) for b in gen["buckets"])
        self.cache_meta = TensorMeta.from_json(gen["cache"])
        self.cache_bytes = {r: int(gen["cache_bytes"][r]) for r in files}
        self.vocab = int(first.outputs[0].shape[-1])
        dm = self.cache_meta.layout.dev_matrix
        slot_layout = first.inputs[0].layout
        whole = Layout(dm, [])
        (self._cache_sharding, self._slot_sharding, self._whole, self._ids_sharding,
         self._logits_sharding, self._step_logits_sharding) = one_mesh_shardings(
            [self.cache_meta.layout, slot_layout, whole, Layout(dm, [-1, -1]), Layout(dm, [-1, -1]),
             first.outputs[0].layout], job.devices)
        self._p_shard = {n: a.sharding for n, a in self.params.items()}
        self._compiled: dict[Any, Any] = {}
        self.cache: Any = None
        self.timings: dict[str, float] = {}
        self._compile(1)

    # ---- programs --------------------------------------------------------------------------------
    def _compile(self, which: int | str) -> Any:
        """The decode step (``1``) or ``"prefill_<P>"``, compiled once, the cache donated."""
        if which in self._compiled:
            return self._compiled[which]
        import jax

        first = next(iter(self.files.values()))
        exported = deserialize(first, which, "the decode step" if which == 1 else f"the {which} program")
        if exported.nr_devices != self.job.world_size:
            raise RankMismatchError(f"{first.path}: the program was exported for {exported.nr_devices} "
                                    f"devices but this job has {self.job.world_size}")
        cache = jax.ShapeDtypeStruct(self.cache_meta.shape, self.cache_meta.dtype,
                                     sharding=self._cache_sharding)
        if which == 1:
            ins = [self._slot_sharding, self._slot_sharding, self._cache_sharding]
            structs = [jax.ShapeDtypeStruct((self.slots,), "int32", sharding=s) for s in ins[:2]] + [cache]
            outs = (self._step_logits_sharding, self._cache_sharding)
        else:
            bucket = int(str(which).split("_")[1])
            ins = [self._ids_sharding, self._whole, self._whole, self._cache_sharding]
            structs = [jax.ShapeDtypeStruct((1, bucket), "int32", sharding=ins[0]),
                       jax.ShapeDtypeStruct((), "int32", sharding=self._whole),
                       jax.ShapeDtypeStruct((), "int32", sharding=self._whole), cache]
            outs = (self._logits_sharding, self._cache_sharding)
        donate = len(ins)  # the cache, the last argument after the parameters
        t0 = time.perf_counter()
        jitted = jax.jit(exported.call, in_shardings=(self._p_shard, *ins), out_shardings=outs,
                         donate_argnums=(donate,))
        self._compiled[which] = jitted.lower(self.params, *structs).compile()
        self.timings[f"compile_{which}_s"] = time.perf_counter() - t0
        return self._compiled[which]

    # ---- the runner's protocol ---------------------------------------------------------------------
    def predict(self, inputs: Sequence[Any], micro_batches: int | None) -> list[np.ndarray]:
        raise InputError("this is a decoder's export: it runs prefill and decode steps over a KV cache "
                         "kept on the devices; call generate(prompt_ids, max_new_tokens) instead of predict")

    def rank_outputs(self) -> dict[int, list[np.ndarray]]:
        return {r: [] for r in self.files}

    def describe(self) -> str:
        return str(self._compile(1).as_text())

    def close(self) -> None:
        self.cache, self.params, self._compiled = None, {}, {}

    def _array(self, a: np.ndarray, sharding: Any) -> Any:
        """``a`` (the same on every rank) as the program's input: numpy in one process, the
        local shards of one global array across processes."""
        if self.job.process_count == 1:
            return a
        import jax

        where = sharding.addressable_devices_indices_map(a.shape)
        shards = [jax.device_put(a[idx], d) for d, idx in where.items()]
        return jax.make_array_from_single_device_arrays(a.shape, sharding, shards)

    @staticmethod
    def _host(arr: Any) -> np.ndarray:
        """The logits, whole on every rank: this process's first copy."""
        if len(arr.sharding.device_set) == 1:
            return np.asarray(arr)
        return np.asarray(arr.addressable_data(0) if arr.is_fully_replicated else arr)

    def ensure_cache(self) -> None:
        """Allocate the KV cache on the devices (zeros, once)."""
        if self.cache is None:
            import jax
            import jax.numpy as jnp

            shape, dtype = self.cache_meta.shape, np_dtype(self.cache_meta.dtype)
            self.cache = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self._cache_sharding)()

    # ---- steps -----------------------------------------------------------------------------------
    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise InputError(f"a prompt of {length} tokens is longer than the export's largest bucket "
                         f"({self.buckets[-1]} tokens); shorten it or export with --max-len/--buckets "
                         "for longer prompts")

    def prefill(self, slot: int, prompt: np.ndarray) -> np.ndarray:
        """Fill ``slot`` with ``prompt``; the logits (V,) after its last token."""
        self.ensure_cache()
        bucket = self.bucket_for(len(prompt))
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :len(prompt)] = prompt
        fn = self._compile(f"prefill_{bucket}")
        logits, self.cache = fn(self.params, self._array(ids, self._ids_sharding),
                                self._array(np.int32(len(prompt)), self._whole),
                                self._array(np.int32(slot), self._whole), self.cache)
        return self._host(logits)[0]

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step of every slot; the logits (S, V)."""
        self.ensure_cache()
        logits, self.cache = self._compile(1)(
            self.params, self._array(tokens.astype(np.int32), self._slot_sharding),
            self._array(positions.astype(np.int32), self._slot_sharding), self.cache)
        return self._host(logits)

    def cache_slot(self, slot: int, length: int) -> np.ndarray:
        """Slot ``slot``'s keys and values at positions ``0 .. length-1`` as
        ``(layers, 2, kv_heads, length, head_dim)`` (gathered in one process; for tests and
        pictures)."""
        self.ensure_cache()
        if not self.cache.is_fully_addressable:
            raise InputError("kv_cache gathers the whole cache, which one process holds only when it hosts "
                             "every rank (--simulate N); under mpiexec each rank holds its own heads")
        return np.asarray(self.cache)[:, :, slot, :, :length]

    # ---- the token loop ---------------------------------------------------------------------------
    def prompts_of(self, prompt_ids: Any) -> tuple[list[np.ndarray], bool]:
        """The prompts as int32 arrays, and whether one prompt (not a list of them) was given."""
        single = len(prompt_ids) > 0 and np.ndim(prompt_ids[0]) == 0
        rows = [prompt_ids] if single else list(prompt_ids)
        if not 1 <= len(rows) <= self.slots:
            raise InputError(f"{len(rows)} prompts for an export of {self.slots} sequence slots; give 1 to "
                             f"{self.slots}, or export with --slots {len(rows)}")
        out = []
        for i, row in enumerate(rows):
            a = np.asarray(row)
            if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
                raise InputError(f"prompt {i}: give a non-empty list of token ids (integers), got "
                                 f"{a.dtype}{list(a.shape)}")
            if a.min() < 0 or a.max() >= self.vocab:
                raise InputError(f"prompt {i}: token ids must lie in 0 .. {self.vocab - 1} (the vocabulary); "
                                 f"found {int(a.min() if a.min() < 0 else a.max())}")
            out.append(a.astype(np.int32))
        return out, single

    def steps(self, prompts: Sequence[np.ndarray], max_new_tokens: int, sampling: SamplingParams,
              stop_ids: Sequence[int] = ()) -> Iterator[tuple[int, int]]:
        """``(row, token)`` as each token is picked, row by row within a step."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens!r}: give a whole number >= 1")
        longest = max(len(p) for p in prompts)
        self.bucket_for(longest)
        if longest + max_new_tokens - 1 > self.max_len:
            raise InputError(f"a prompt of {longest} tokens and {max_new_tokens} new tokens need "
                             f"{longest + max_new_tokens - 1} cache positions; the export has "
                             f"{self.max_len} (--max-len); ask for at most {self.max_len - longest + 1} "
                             "new tokens")
        stops = {int(s) for s in stop_ids}
        samplers = [Sampler(sampling, row) for row in range(len(prompts))]
        tokens = np.zeros(self.slots, np.int32)
        positions = np.zeros(self.slots, np.int32)
        left = {}
        t0 = time.perf_counter()
        for row, prompt in enumerate(prompts):
            tokens[row] = samplers[row].pick(self.prefill(row, prompt))
            positions[row] = len(prompt)
            left[row] = max_new_tokens
        self.timings["prefill_s"] = time.perf_counter() - t0
        t0, steps = time.perf_counter(), 0
        while True:
            for row in sorted(left):
                yield row, int(tokens[row])
                left[row] -= 1
                if left[row] == 0 or int(tokens[row]) in stops:
                    del left[row]
            if not left:
                break
            logits = self.decode(tokens, positions)
            steps += 1
            greedy = logits.argmax(-1) if sampling.temperature == 0 else None  # one argmax for all
            for row in left:
                tokens[row] = greedy[row] if greedy is not None else samplers[row].pick(logits[row])
                positions[row] += 1
        self.timings["decode_s"] = time.perf_counter() - t0
        self.timings["decode_steps"] = steps

    def generate(self, prompt_ids: Any, max_new_tokens: int, sampling: SamplingParams,
                 stop_ids: Sequence[int] = (), on_token: Callable[[int, int], None] | None = None) -> Any:
        prompts, single = self.prompts_of(prompt_ids)
        out: list[list[int]] = [[] for _ in prompts]
        for row, token in self.steps(prompts, max_new_tokens, sampling, stop_ids):
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
        return out[0] if single else out

    # ---- what Model's generation methods call ------------------------------------------------
    def stream(self, prompt_ids: Any, max_new_tokens: int, sampling: SamplingParams,
               stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """The new tokens of one prompt as they are picked."""
        prompts, single = self.prompts_of(prompt_ids)
        if not single:
            raise InputError("generate_stream takes one prompt (a list of token ids); use generate's "
                             "on_token for several")
        return (token for _, token in self.steps(prompts, max_new_tokens, sampling, stop_ids))

    def prefill_logits(self, slot: int, prompt_ids: Sequence[int]) -> np.ndarray:
        """``prompt_ids`` into sequence slot ``slot``; the logits after its last token."""
        if not 0 <= slot < self.slots:
            raise InputError(f"slot {slot}: the export has slots 0 .. {self.slots - 1}")
        prompts, _ = self.prompts_of([list(prompt_ids)])
        return self.prefill(slot, prompts[0])

    def decode_logits(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One decode step of ``tokens[s]`` at ``positions[s]`` in every slot; the logits."""
        t, p = np.asarray(tokens), np.asarray(positions)
        if t.shape != (self.slots,) or p.shape != (self.slots,):
            raise InputError(f"decode_step takes one token and one position per slot, ({self.slots},) each; "
                             f"got {list(t.shape)} and {list(p.shape)}")
        if p.min() < 0 or p.max() >= self.max_len:
            raise InputError(f"positions must lie in 0 .. {self.max_len - 1} (the cache's length)")
        return self.decode(t, p)

    def info(self) -> dict[str, Any]:
        """``slots``, ``max_len``, prompt ``buckets``, ``vocab``, the KV ``cache`` (shape, dtype,
        layout), the ``cache_bytes`` each local rank holds and the last generation's timings."""
        return {"slots": self.slots, "max_len": self.max_len, "buckets": list(self.buckets),
                "vocab": self.vocab, "cache": self.cache_meta, "cache_bytes": dict(self.cache_bytes),
                "timings": dict(self.timings)}

