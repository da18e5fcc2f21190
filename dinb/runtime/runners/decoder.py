"""The decoder runner: a decoder export's programs, its KV cache and the slots' state on the
devices, and the host loop that keeps them busy.

A generation of a batch of prompts (see :mod:`dinb.models.decode_loop` for the programs)::

    first tokens = prefill(the prompts, in as few calls as the prefill shapes allow)
    repeat:  queue decode_k(state, ...)        k tokens of every slot, picked on the device
             read the call before it           the host reads while the devices run the next
    until every slot has its tokens (its budget, or an end token)

Nothing waits between decode calls: the state a call needs comes from the call before, on the
devices, and the host reads each call's k x S token ids while the next one runs. Each call runs
the smallest attention window that holds every slot's positions for its k steps, so its cost
follows the tokens in the cache, not ``max_len``. ``timings`` count only this loop's own time:
what a caller does with each token (``on_token``, the consumer of ``stream``) is left out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dinb.errors import InputError, RankMismatchError
from dinb.export.decode_programs import decode_name, prefill_name
from dinb.export.slicefile import SliceFile, TensorMeta
from dinb.formats.safetensors import np_dtype
from dinb.job import ranks
from dinb.models.decode_loop import STATE, steps_for, window_for
from dinb.models.sampling import SamplingParams, slot_arrays
from dinb.runtime.block_pool import BlockPool, blocks_for
from dinb.runtime.placement import device_array, host_copy, place_params, xla_collectives
from dinb.runtime.programs import deserialize
from dinb.runtime.runners.decoder_mpi import MpiDecoderPrograms
from dinb.runtime.runners.decoder_stages import StagedDecoderPrograms
from dinb.sharding.layout import Layout, one_mesh_shardings

#: ``(row, token, log-probability)`` as each token is picked
Picked = tuple[int, int, float]


class DecoderRunner:
    """A decoder export's programs, KV cache and slot state on this process's ranks."""

    provider = "xla"
    notice: str | None = None
    gives_outputs = True

    def __init__(self, files: dict[int, SliceFile], job: ranks.Job, mpi: bool = False,
                 stage_timeout_s: float = 60.0, decode_groups: int = 0):
        first = next(iter(files.values()))
        gen = first.generation or {}
        self.first, self.job = first, job
        #: the programs built at load from the model's definition: each rank's own steps with MPI
        #: between them (CPU ranks of mpiexec), or passes through pipeline stages; else None: the
        #: SPMD programs of the export
        self.built: MpiDecoderPrograms | StagedDecoderPrograms | None = None
        if first.pipeline is not None:
            self.built = StagedDecoderPrograms(files, job, job.process_count > 1, stage_timeout_s,
                                               decode_groups)
        elif mpi:
            self.built = MpiDecoderPrograms(first, job.local_ranks[0], job.world_size,
                                            job.device_of(job.local_ranks[0]))
        self.collectives = "mpi" if job.process_count > 1 and self.built is not None else xla_collectives(job)
        self.params = self.built.params if self.built else place_params(files, job)[0]
        self.slots, self.max_len = int(gen["slots"]), int(gen["max_len"])
        self.buckets = sorted(int(b) for b in gen["buckets"])
        self.windows = sorted(int(w) for w in gen["windows"])
        self.decode_steps = sorted(int(k) for k in gen["decode_steps"])
        self.prefill_shapes = sorted((int(r), int(p)) for r, p in gen["prefill_shapes"])
        self.stops_per_slot = int(gen["stops"])
        self.kernels = dict(gen["kernels"])
        self.programs_held = set(gen["programs"])
        self.cache_meta = TensorMeta.from_json(gen["cache"])
        self.cache_bytes = {r: int(gen["cache_bytes"][r]) for r in files}
        paged = gen.get("paged")
        #: a paged cache's blocks (None: slots of max_len positions); see dinb.runtime.block_pool
        self.pool = BlockPool(int(paged["blocks"]), int(paged["block_size"])) if paged else None
        self.prefix_shapes = sorted((int(p), int(w)) for p, w in paged["prefix_shapes"]) if paged else []
        width = int(paged["table_width"]) if paged else 0
        self.tables = np.full((self.slots, width), self.pool.blocks if self.pool else 0, np.int32)
        self.vocab = int(first.outputs[0].shape[-1])
        config = first.meta.get("model_config") or {}
        self.defaults = dict(config.get("generation_defaults") or {})  # generation_config.json's
        ends = [*(config.get("config") or {}).get("eos_token_id", []), *self.defaults.get("eos_token_id", [])]
        self.end_tokens = tuple(dict.fromkeys(int(t) for t in ends))
        self._shardings(first)
        self._compiled: dict[Any, Any] = {}
        self.cache: Any = None
        self.state: tuple[Any, ...] | None = None  # tokens, positions, remaining, counts: (S,) each
        self.sampling_f = np.zeros((self.slots, 2), np.float32)
        self.sampling_i = np.zeros((self.slots, 3), np.int32)
        self.stops = np.full((self.slots, self.stops_per_slot), -1, np.int32)
        self.position_bound = np.zeros(self.slots, np.int64)  # each slot's next position, at most
        self.left = np.zeros(self.slots, np.int64)  # tokens each slot may still pick, at most
        self.timings: dict[str, float] = {}
        self.ran: set[str] = set()  # the generation programs that have run (windows, steps, shapes)
        self.clock: Callable[[], float] = time.perf_counter  # the timings' clock

    def _shardings(self, first: SliceFile) -> None:
        if self.built is not None:  # the built programs place their own arguments
            (self._cache_sh, self._slot_sh, self._per_slot_sh, self._whole1, self._whole2,
             self._logits_sh) = [None] * 6
            return
        dm = self.cache_meta.layout.dev_matrix
        slot = first.inputs[0].layout
        layouts = [self.cache_meta.layout, slot, Layout(dm, [slot.tensor_map[0], -1]), Layout(dm, [-1]),
                   Layout(dm, [-1, -1]), first.outputs[0].layout]
        (self._cache_sh, self._slot_sh, self._per_slot_sh, self._whole1, self._whole2,
         self._logits_sh) = one_mesh_shardings(layouts, self.job.devices)
        self._p_shard = {n: a.sharding for n, a in self.params.items()}

    # ---- programs --------------------------------------------------------------------------------
    def _program(self, name: Any) -> Any:
        """Program ``name`` (1: the decode step with logits), compiled the first time it runs,
        with the cache (and the state) donated: XLA writes them in place."""
        self.ran.add(str(name))
        if self.built is not None:
            return self.built.program(name)
        if name in self._compiled:
            return self._compiled[name]
        import jax

        exported = deserialize(self.first, name, "the decode step" if name == 1 else f"the {name} program")
        if exported.nr_devices != self.job.world_size:
            raise RankMismatchError(f"{self.first.path}: the program was exported for {exported.nr_devices} "
                                    f"devices but this job has {self.job.world_size}")
        ins, outs, donate = self._signature(str(name))
        structs = [jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sh)
                   for aval, sh in zip(exported.in_avals[len(self.params):], ins)]
        t0 = time.perf_counter()
        jitted = jax.jit(exported.call, in_shardings=(self._p_shard, *ins), out_shardings=tuple(outs),
                         donate_argnums=donate)
        self._compiled[name] = jitted.lower(self.params, *structs).compile()
        self.timings[f"compile_{name}_s"] = time.perf_counter() - t0
        return self._compiled[name]

    def _signature(self, name: str) -> tuple[list[Any], list[Any], tuple[int, ...]]:
        """In and out shardings of a program, and the arguments it donates (after the params)."""
        state = [self._slot_sh] * len(STATE)
        sampling = [self._per_slot_sh] * 3
        tables = [self._whole2] if self.pool else []  # the block tables follow the cache
        if name.startswith("decode_"):
            ins = [*state, self._slot_sh, *sampling, self._cache_sh, *tables]
            return ins, [self._whole2, self._whole2, *state, self._cache_sh], (1, 2, 3, 4, 9)
        if name.startswith("prefill_"):
            starts = [self._whole1] if "_w" in name else []
            ins = [self._whole2, self._whole1, self._whole1, self._whole1, *state, *sampling, self._cache_sh,
                   *tables, *starts]
            outs = [self._whole1, self._whole1, self._whole2, *state, self._cache_sh]
            return ins, outs, (5, 6, 7, 8, 12)
        return [self._slot_sh, self._slot_sh, self._cache_sh, *tables], [self._logits_sh, self._cache_sh], \
            (3,)

    def _array(self, a: np.ndarray, sharding: Any) -> Any:
        """A copy of host array ``a`` for a program: the host goes on changing its own (the
        block tables, ``keep``) while a queued call has yet to run, and on the CPU a device
        array can share the host's memory."""
        a = np.array(a)
        return a if self.built is not None else device_array(a, sharding, self.job)

    def ensure_cache(self) -> None:
        """Allocate the KV cache and the slots' state on the devices (zeros, once)."""
        if self.cache is None and self.built is not None:
            self.cache = self.built.zeros_cache()
        if self.cache is None:
            import jax
            import jax.numpy as jnp

            shape, dtype = self.cache_meta.shape, np_dtype(self.cache_meta.dtype)
            self.cache = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self._cache_sh)()
        if self.state is None:
            zeros = np.zeros(self.slots, np.int32)
            self.state = tuple(self._array(zeros, self._slot_sh) for _ in STATE)

    def _sampling_args(self) -> list[Any]:
        return [self._array(a, self._per_slot_sh) for a in (self.sampling_f, self.sampling_i, self.stops)]

    def _tables_args(self) -> list[Any]:
        """The block tables (S, N), for the programs of a paged cache (none otherwise)."""
        return [self._array(self.tables, self._whole2)] if self.pool else []

    # ---- the runner's protocol ---------------------------------------------------------------------
    def predict(self, inputs: Sequence[Any], micro_batches: int | None) -> list[np.ndarray]:
        raise InputError("this is a decoder's export: it runs prefill and decode steps over a KV cache "
                         "kept on the devices; call generate(prompt_ids, max_new_tokens) instead of predict")

    def rank_outputs(self) -> dict[int, list[np.ndarray]]:
        return {r: [] for r in self.job.local_ranks}

    def describe(self) -> str:
        return self.built.describe() if self.built is not None else str(self._program(1).as_text())

    def close(self) -> None:
        self.cache, self.state, self.params, self._compiled = None, None, {}, {}

    # ---- the slots --------------------------------------------------------------------------------
    def set_slot(self, slot: int, sampling: SamplingParams, row: int, stop_ids: Sequence[int]) -> None:
        """How slot ``slot`` picks its tokens (``row``: the noise's stream for this seed)."""
        if len(stop_ids) > self.stops_per_slot:
            raise InputError(f"{len(stop_ids)} end tokens for one sequence; the export takes at most "
                             f"{self.stops_per_slot}")
        self.sampling_f[slot], self.sampling_i[slot] = slot_arrays(sampling, row)
        self.stops[slot] = -1
        self.stops[slot, :len(stop_ids)] = list(stop_ids)

    def prefill_slots(self, slots: Sequence[int], prompts: Sequence[np.ndarray], budgets: Sequence[int],
                      want_logits: bool = False, starts: Sequence[int] | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Prompts into their slots, in as few calls as the prefill shapes allow; each slot's first
        token and its log-probability (and the logits after each prompt, when asked). ``starts``
        (a paged cache): the positions of each prompt already in its blocks (a cached prefix),
        whose prompt then runs alone, over the rest (so does a prompt longer than the largest
        bucket: a resumed sequence's prompt and tokens)."""
        self.ensure_cache()
        starts = list(starts or [0] * len(prompts))
        alone = [st > 0 or len(p) > self.buckets[-1] for st, p in zip(starts, prompts)]
        got: dict[int, tuple[Any, Any, Any]] = {}
        fresh = [i for i, a in enumerate(alone) if not a]
        for chunk, out in self._prefill_fresh(fresh, slots, prompts, budgets, want_logits):
            got.update(zip(chunk, out))
        for i in (i for i, a in enumerate(alone) if a):
            got[i] = self._prefill_prefixed(slots[i], prompts[i], budgets[i], starts[i], want_logits)
        for slot, prompt, budget_left in zip(slots, prompts, budgets):
            self.position_bound[slot], self.left[slot] = len(prompt), budget_left - 1
        order = [got[i] for i in range(len(prompts))]
        return (np.array([o[0] for o in order], np.int32), np.array([o[1] for o in order], np.float32),
                np.stack([o[2] for o in order]) if want_logits else None)

    def _prefill_fresh(self, which: list[int], slots: Sequence[int], prompts: Sequence[np.ndarray],
                       budgets: Sequence[int], want_logits: bool) -> Iterator[tuple[list[int], list[Any]]]:
        """Prompts ``which`` from their first token, as many a call as a prefill shape holds."""
        start = 0
        while start < len(which):
            longest = max(len(prompts[j]) for j in which[start:])
            rows, bucket = self._prefill_shape(len(which) - start, longest)
            chunk = which[start:start + rows]
            ids = np.zeros((rows, bucket), np.int32)
            lengths, budget = np.ones(rows, np.int32), np.ones(rows, np.int32)
            where = np.full(rows, self.slots, np.int32)  # a padding row's slot: past the last one
            for i, j in enumerate(chunk):
                ids[i, :len(prompts[j])] = prompts[j]
                lengths[i], where[i], budget[i] = len(prompts[j]), slots[j], budgets[j]
            first, logprob, logit = self._run_prefill(self._prefill_program(rows, bucket), ids,
                                                      [lengths, where, budget], [], want_logits)
            yield chunk, [(first[i], logprob[i], logit[i] if want_logits else None)
                          for i in range(len(chunk))]
            start += len(chunk)

    def _prefill_prefixed(self, slot: int, prompt: np.ndarray, budget: int, start: int,
                          want_logits: bool) -> tuple[Any, Any, Any]:
        """One prompt whose first ``start`` positions are in its blocks already: the rest, over
        its blocks, a bucket at a time (chunks of the largest bucket, then the smallest that
        holds what is left); the last chunk's first token."""
        while True:
            end = min(len(prompt), start + self.buckets[-1])
            bucket = self.bucket_for(end - start)
            window = window_for([w for p, w in self.prefix_shapes if p == bucket], end)
            ids = np.zeros((1, bucket), np.int32)
            ids[0, :end - start] = prompt[start:end]
            last = end == len(prompt)
            first, logprob, logit = self._run_prefill(
                prefill_name(1, bucket, window=window), ids,
                [np.array([end], np.int32), np.array([slot], np.int32), np.array([budget], np.int32)],
                [self._array(np.array([start], np.int32), self._whole1)], want_logits and last)
            if last:
                return first[0], logprob[0], logit[0] if want_logits else None
            start = end

    def _run_prefill(self, name: str, ids: np.ndarray, rows: list[np.ndarray], extra: list[Any],
                     want_logits: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        args = [self._array(ids, self._whole2), *(self._array(a, self._whole1) for a in rows)]
        out = self._program(name)(self.params, *args, *self.state, *self._sampling_args(), self.cache,
                                  *self._tables_args(), *extra)
        first, logprob, logit, *state, self.cache = out
        self.state = tuple(state)
        return host_copy(first), host_copy(logprob), host_copy(logit) if want_logits else None

    def _prefill_shape(self, count: int, longest: int) -> tuple[int, int]:
        """The smallest bucket that holds ``longest`` tokens, with the fewest rows that hold
        ``count`` prompts (else the most it has)."""
        bucket = self.bucket_for(longest)
        rows = [r for r, p in self.prefill_shapes if p == bucket]
        return next((r for r in rows if r >= count), rows[-1]), bucket

    def _prefill_program(self, rows: int, bucket: int) -> str:
        cuda = prefill_name(rows, bucket, "cuda")
        return cuda if self.job.target == "gpu" and cuda in self.programs_held else prefill_name(rows, bucket)

    def decode_call(self, keep: np.ndarray, steps: int) -> tuple[Any, Any]:
        """Queue one call of ``steps`` decode steps for the slots in ``keep``; its tokens and
        log-probabilities (k, S) as device arrays (not read here)."""
        live = keep & (self.left > 0)
        reach = self.position_bound + np.minimum(steps, self.left)
        window = window_for(self.windows, int(reach[live].max(initial=1)))
        sample = bool((self.sampling_f[live, 0] > 0).any())
        out = self._program(decode_name(steps, window, sample))(
            self.params, *self.state, self._array(keep, self._slot_sh), *self._sampling_args(), self.cache,
            *self._tables_args())
        tokens, logprobs, *state, self.cache = out
        self.state = tuple(state)
        grown = np.where(live, np.minimum(steps, self.left), 0)
        self.position_bound += grown
        self.left = np.where(keep, self.left - grown, 0)
        return tokens, logprobs

    def next_steps(self, keep: np.ndarray) -> int:
        """Decode steps the next call runs: the most the export has, one each near the end."""
        return steps_for(self.decode_steps, int(self.left[keep].max(initial=0)))

    # ---- steps ---------------------------------------------------------------------------------
    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise InputError(f"a prompt of {length} tokens is longer than the export's largest bucket "
                         f"({self.buckets[-1]} tokens); shorten it or export with --max-len/--buckets "
                         "for longer prompts")

    def prefill(self, slot: int, prompt: np.ndarray) -> np.ndarray:
        """Fill ``slot`` with ``prompt`` (greedy); the logits (V,) after its last token."""
        self.set_slot(slot, SamplingParams(), 0, ())
        start = self.hold_blocks(slot, prompt, self.max_len)
        if start is None:
            need = blocks_for(self.max_len, self.pool.block_size) if self.pool else 0
            raise InputError(f"slot {slot}: the cache's pool has no {need} free blocks for it; free slots "
                             "first (a new generate frees them all)")
        _, _, logits = self.prefill_slots([slot], [prompt], [1], want_logits=True, starts=[start])
        assert logits is not None
        return logits[0]

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step of every slot over the whole cache; the logits (S, V)."""
        self.ensure_cache()
        logits, self.cache = self._program(1)(
            self.params, self._array(tokens.astype(np.int32), self._slot_sh),
            self._array(positions.astype(np.int32), self._slot_sh), self.cache, *self._tables_args())
        return host_copy(logits)

    def cache_slot(self, slot: int, length: int) -> np.ndarray:
        """Slot ``slot``'s keys and values at positions ``0 .. length-1`` as
        ``(layers, 2, kv_heads, length, head_dim)`` (gathered in one process; for tests and
        pictures)."""
        self.ensure_cache()
        staged = isinstance(self.built, StagedDecoderPrograms)
        if staged and self.built.link is None:
            cache = self.built.whole_cache(self.cache)
        elif self.built is not None or not self.cache.is_fully_addressable:
            raise InputError("kv_cache gathers the whole cache, which one process holds only when it hosts "
                             "every rank (--simulate N); under mpiexec each rank holds its own heads")
        else:
            cache = np.asarray(self.cache)
        if self.pool is None:
            return cache[:, :, slot, :, :length]
        b = self.pool.block_size
        blocks = cache[:, :, np.minimum(self.tables[slot, :blocks_for(length, b)], self.pool.blocks - 1)]
        layers, two, n, heads, _, dh = blocks.shape  # (L, 2, n, K, b, dh): its blocks in order
        return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(layers, two, heads, n * b, dh)[:, :, :, :length]

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

    def check_request(self, lengths: Sequence[int], max_new_tokens: Any) -> None:
        """A clear error for a request the export cannot hold."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens!r}: give a whole number >= 1")
        longest = max(lengths)
        self.bucket_for(longest)
        if longest + max_new_tokens - 1 > self.max_len:
            raise InputError(f"a prompt of {longest} tokens and {max_new_tokens} new tokens need "
                             f"{longest + max_new_tokens - 1} cache positions; the export has {self.max_len} "
                             f"(--max-len); ask for at most {self.max_len - longest + 1} new tokens")
        if self.pool is not None:
            self.pool.check_fits(longest + max_new_tokens - 1,
                                 f"a prompt of {longest} tokens and {max_new_tokens} new tokens")

    def steps(self, prompts: Sequence[np.ndarray], max_new_tokens: int, sampling: SamplingParams,
              stop_ids: Sequence[int] = ()) -> Iterator[Picked]:
        """``(row, token, log-probability)`` as each token is picked, row by row within a step.
        Prompt ``row`` takes sequence slot ``row``. With a paged cache a prompt joins when the
        pool has the blocks of its prompt and first call, each call's blocks are taken before
        it is queued, and when the pool runs out the newest sequence is preempted and later
        resumed (see :mod:`dinb.runtime.block_pool`): its tokens are the same as if it had not
        been, sampled ones included (its noise counter goes on where it stopped)."""
        self.check_request([len(p) for p in prompts], max_new_tokens)
        clock = _Clock(self.clock)
        run = _Run(prompts, max_new_tokens, {int(s) for s in stop_ids}, self.slots)
        self.ensure_cache()
        if isinstance(self.built, StagedDecoderPrograms):
            self.built.new_generation()
        self.left[:] = 0
        self.release_slots(range(self.slots))
        for row in run.rows:
            self.set_slot(row, sampling, row, stop_ids)
        try:
            _, first = self._join(run)
            self.timings["prefill_s"] = clock.busy()
            yield from clock.hand_over(first)
            decoded = calls = 0
            queued: deque[tuple[Any, Any]] = deque()
            while self.left[run.keep].any() or queued or run.waiting:
                self._release_done(run)
                if self.left[run.keep].any():
                    if not self._grow(run, self.next_steps(run.keep), preempt=False):
                        while queued:  # the pool is short: read what is in flight, then preempt
                            picked, got = self._read(queued.popleft(), run)
                            decoded += got
                            yield from clock.hand_over(picked)
                        self._release_done(run)
                        self._grow(run, self.next_steps(run.keep), preempt=True)
                    if self.left[run.keep].any():
                        queued.append(self.decode_call(run.keep, self.next_steps(run.keep)))
                        calls += 1
                if len(queued) > 1 or (queued and not self.left[run.keep].any()):  # one call ahead
                    picked, got = self._read(queued.popleft(), run)
                    decoded += got
                    yield from clock.hand_over(picked)
                if run.waiting:
                    self._release_done(run)
                    joined, picked = self._join(run)
                    if not joined and not queued and not self.left[run.keep].any():
                        raise InputError(f"the cache's pool cannot hold prompt {run.waiting[0]} even alone")
                    yield from clock.hand_over(picked)
            self.timings.update(decode_s=clock.busy(), decode_steps=decoded, decode_calls=calls)
        finally:
            self.release_slots(run.rows)

    def _read(self, call: tuple[Any, Any], run: _Run) -> tuple[list[Picked], int]:
        """A decode call's tokens, read (it waits for the call); and its steps that picked any."""
        tokens, logprobs = (host_copy(a) for a in call)
        rows = run.rows
        picked = [(row, int(t), float(lp)) for step_t, step_lp in zip(tokens, logprobs)
                  for row, t, lp in zip(rows, step_t[rows], step_lp[rows]) if t >= 0]
        for row, token, _ in picked:
            run.made[row].append(token)
            if token in run.stops:  # the devices stopped the slot already
                self.left[row] = 0
                run.keep[row] = False
        return picked, int((tokens[:, rows] >= 0).any(axis=1).sum())

    def _join(self, run: _Run) -> tuple[int, list[Picked]]:
        """Prefill the waiting rows that the cache holds now (all of them, without a pool); how
        many joined, and the first tokens of those that had none (a resumed row goes on from
        the tokens it had: its prompt and all but its last token prefilled, its state set)."""
        joiners, texts, starts, lefts = [], [], [], []
        while run.waiting:
            row = run.waiting[0]
            made = run.made[row]
            text = np.concatenate([run.prompts[row], np.asarray(made[:-1], np.int32)]) if made \
                else run.prompts[row]
            left = run.max_new - max(len(made), 1)  # tokens to pick after the prefill
            start = self.hold_blocks(row, text, len(text) + min(self.decode_steps[-1], left))
            if start is None:
                break
            joiners.append(run.waiting.popleft())
            texts.append(text)
            starts.append(start)
            lefts.append(left)
        if not joiners:
            return 0, []
        first, logprobs, _ = self.prefill_slots(joiners, texts, [n + 1 for n in lefts], starts=starts)
        resumed = [row for row in joiners if run.made[row]]
        if resumed:
            self._resume(resumed, [run.made[r][-1] for r in resumed], [len(run.made[r]) for r in resumed],
                         [lefts[joiners.index(r)] for r in resumed])
        if self.pool is not None:
            for row in joiners:
                self.pool.prefilled(row)
        picked = []
        for row, token, logprob in zip(joiners, first, logprobs):
            run.keep[row] = True
            run.order.append(row)
            if not run.made[row]:
                run.made[row].append(int(token))
                picked.append((row, int(token), float(logprob)))
                if int(token) in run.stops:
                    self.left[row] = 0
        return len(joiners), picked

    def _resume(self, slots: Sequence[int], tokens: Sequence[int], counts: Sequence[int],
                lefts: Sequence[int]) -> None:
        """Resumed sequences' state after their prefill: the last token they had picked is fed
        next (the prefill's own pick is dropped), ``counts`` tokens picked (the noise's counter
        goes on), ``lefts`` to pick."""
        state = [np.array(host_copy(a) if hasattr(a, "sharding") else a) for a in self.state]
        for column, values in ((0, tokens), (2, lefts), (3, counts)):
            state[column][list(slots)] = values
        self.state = tuple(self._array(a.astype(np.int32), self._slot_sh) for a in state)
        self.left[list(slots)] = lefts

    def _grow(self, run: _Run, steps: int, preempt: bool) -> bool:
        """Blocks for the positions a call of ``steps`` steps reaches, for every row in flight;
        False (nothing taken) when that needs a preemption and ``preempt`` is false. A row
        preempted waits at the front of the queue."""
        if self.pool is None:
            return True
        live = [r for r in run.order if run.keep[r] and self.left[r] > 0]
        needs = [(r, int(self.position_bound[r] + min(steps, self.left[r]))) for r in live]
        if not preempt and not self.pool.fits(needs):
            return False
        for row in self.pool.make_room(needs):
            run.keep[row], self.left[row] = False, 0
            run.order.remove(row)
            run.waiting.appendleft(row)
            self.set_table(row, ())
        for row in run.order:
            self.set_table(row, self.pool.seqs[row].table)
        return True

    def _release_done(self, run: _Run) -> None:
        """Rows that have every token in their calls give their blocks back (a call still in
        flight runs before any call that reuses them)."""
        for row in [r for r in run.order if self.left[r] == 0]:
            run.order.remove(row)
            self.release_slots([row])

    def hold_blocks(self, slot: int, prompt: Sequence[int], positions: int) -> int | None:
        """Slot ``slot``'s blocks for ``positions`` positions from the pool (its table set); the
        prompt positions already cached there, or None when the pool cannot give them now.
        Without a pool: 0 (a slot holds its max_len positions)."""
        if self.pool is None:
            return 0
        self.release_slots([slot])
        admitted = self.pool.admit(slot, [int(t) for t in prompt], positions)
        if admitted is None:
            return None
        self.set_table(slot, admitted.table)
        return admitted.cached_tokens

    def set_table(self, slot: int, table: Sequence[int]) -> None:
        """Slot ``slot``'s block table (entries past it: the pool's size, where writes drop)."""
        if self.pool is not None:
            self.tables[slot] = self.pool.blocks
            self.tables[slot, :len(table)] = table

    def release_slots(self, slots: Any) -> None:
        """The slots' blocks go back to the pool (nothing without one)."""
        if self.pool is not None:
            for slot in slots:
                self.pool.release(int(slot))

    def generate(self, prompt_ids: Any, max_new_tokens: int, sampling: SamplingParams,
                 stop_ids: Sequence[int] = (), on_token: Callable[[int, int], None] | None = None,
                 return_logprobs: bool = False) -> Any:
        prompts, single = self.prompts_of(prompt_ids)
        out: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        for row, token, logprob in self.steps(prompts, max_new_tokens, sampling, stop_ids):
            out[row].append(token)
            lps[row].append(logprob)
            if on_token is not None:
                on_token(row, token)
        tokens = out[0] if single else out
        if return_logprobs:
            return tokens, (lps[0] if single else lps)
        return tokens

    def serve_step(self, joins: Sequence[dict[str, Any]], active: Sequence[int],
                   tables: Sequence[tuple[int, Sequence[int]]] = ()) -> dict[int, list[int]]:
        """One step of continuous batching: the ``joins`` (each ``slot``, ``ids``, ``sampling``,
        ``max_tokens``, ``stop_ids``; with a paged cache also the ``table`` of blocks the
        scheduler's pool gave it and the ``start`` positions cached there, and for a preempted
        sequence that resumes, ``resume``: its last token and how many it had picked) prefilled,
        then one decode call of the slots in ``active`` and the joiners, ``tables`` the grown
        block tables ``(slot, table)`` of active slots; the tokens every slot got (a new
        joiner's first one included). A slot left out of ``active`` stops (its request finished,
        went away or was preempted)."""
        keep = np.zeros(self.slots, bool)
        keep[list(active)] = True
        self.left[~keep] = 0
        for slot, table in tables:
            self.set_table(int(slot), table)
        out: dict[int, list[int]] = {}
        if joins:
            self._serve_joins(joins, keep, out)
        if (keep & (self.left > 0)).any():
            tokens, _ = (host_copy(a) for a in self.decode_call(keep, self.next_steps(keep)))
            for slot in np.flatnonzero(keep):
                got = [int(t) for t in tokens[:, slot] if t >= 0]
                if got:
                    out.setdefault(int(slot), []).extend(got)
                    if got[-1] in self.stops[slot]:
                        self.left[slot] = 0
        return out

    def _serve_joins(self, joins: Sequence[dict[str, Any]], keep: np.ndarray,
                     out: dict[int, list[int]]) -> None:
        """A step's joiners prefilled (see :meth:`serve_step`); new ones' first tokens into ``out``."""
        prompts, _ = self.prompts_of([list(j["ids"]) for j in joins])
        for j, prompt in zip(joins, prompts):
            if "resume" not in j:  # a resumed one's prompt holds its tokens: it may pass a bucket
                self.check_request([len(prompt)], j["max_tokens"])
            self.set_slot(int(j["slot"]), j["sampling"], 0, j.get("stop_ids", ()))
            if self.pool is not None and "table" not in j:
                raise InputError("a join into a paged cache needs the block table that the scheduler's "
                                 "pool gave it")
            self.set_table(int(j["slot"]), j.get("table", ()))
        slots = [int(j["slot"]) for j in joins]
        first, _, _ = self.prefill_slots(slots, prompts, [int(j["max_tokens"]) for j in joins],
                                         starts=[int(j.get("start", 0)) for j in joins])
        resumed = [(int(j["slot"]), j["resume"], int(j["max_tokens"]) - 1) for j in joins if "resume" in j]
        if resumed:
            self._resume([r[0] for r in resumed], [int(r[1][0]) for r in resumed],
                         [int(r[1][1]) for r in resumed], [r[2] for r in resumed])
        for j, slot, token in zip(joins, slots, first):
            keep[slot] = True
            if "resume" in j:
                continue
            out[slot] = [int(token)]
            if int(token) in set(j.get("stop_ids", ())):
                self.left[slot] = 0

    def sampling(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0) -> SamplingParams:
        """How to pick: what the caller gives, else the export's ``generation_config.json``
        defaults, else greedy."""
        def pick(value: Any, key: str, default: Any) -> Any:
            return value if value is not None else self.defaults.get(key, default)

        return SamplingParams(pick(temperature, "temperature", 0.0), pick(top_k, "top_k", 0),
                              pick(top_p, "top_p", 1.0), seed)

    # ---- what Model's generation methods call ------------------------------------------------
    def stream(self, prompt_ids: Any, max_new_tokens: int, sampling: SamplingParams,
               stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """The new tokens of one prompt as they are picked."""
        prompts, single = self.prompts_of(prompt_ids)
        if not single:
            raise InputError("generate_stream takes one prompt (a list of token ids); use generate's "
                             "on_token for several")
        return (token for _, token, _ in self.steps(prompts, max_new_tokens, sampling, stop_ids))

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
        layout), the ``cache_bytes`` each local rank holds, the attention ``windows``, the
        ``decode_steps`` per call, the prefill ``kernels``, the pipeline ``stages`` (None: one; see
        :meth:`StagedDecoderPrograms.info`) and the last generation's timings."""
        return {"slots": self.slots, "max_len": self.max_len, "buckets": list(self.buckets),
                "vocab": self.vocab, "cache": self.cache_meta, "cache_bytes": dict(self.cache_bytes),
                "windows": list(self.windows), "decode_steps": list(self.decode_steps),
                "kernels": dict(self.kernels), "stops": self.stops_per_slot,
                "paged": None if self.pool is None else {**self.pool.stats(),
                                                         "table_width": int(self.tables.shape[1])},
                "end_tokens": list(self.end_tokens), "defaults": dict(self.defaults),
                "stages": self.built.info() if isinstance(self.built, StagedDecoderPrograms) else None,
                "timings": dict(self.timings)}


class _Run:
    """One generation's rows: prompts, the queue, the rows in flight (oldest first), each row's
    tokens so far (what a preempted row resumes from)."""

    def __init__(self, prompts: Sequence[np.ndarray], max_new: int, stops: set[int], slots: int) -> None:
        self.prompts, self.max_new, self.stops = prompts, max_new, stops
        self.rows = list(range(len(prompts)))
        self.waiting: deque[int] = deque(self.rows)
        self.keep = np.zeros(slots, bool)
        self.order: list[int] = []
        self.made: dict[int, list[int]] = {row: [] for row in self.rows}


class _Clock:
    """The time a generator spends working, without the time its consumer holds each value."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self._since = now()
        self._spent = 0.0

    def busy(self) -> float:
        """Working time since the last call."""
        now = self.now()
        spent, self._spent, self._since = self._spent + now - self._since, 0.0, now
        return spent

    def hand_over(self, items: list[Any]) -> Iterator[Any]:
        for item in items:
            self._spent += self.now() - self._since
            yield item
            self._since = self.now()
