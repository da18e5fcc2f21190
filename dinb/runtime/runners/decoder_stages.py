"""A decoder over pipeline stages: its generation programs as passes through the stages.

:class:`~dinb.runtime.runners.decoder.DecoderRunner` calls the programs a one-stage decoder
exports (``decode_<k>_w<W>``, ``prefill_<R>x<P>``, ...) with their arguments and results. Here each
of them is a pass through the stages (:mod:`dinb.models.decode_stages`): ``k`` decode steps are
``k`` passes, each one::

    stage 0 ... S-1:  x = stage_s(x, state, ...)         activations forward, stage to stage
    last stage:       tokens, state = pick(logits(x))    the state back to stage 0 for the next step

so the runner's host loop (continuous batching, the block pool, preemption) is the same with
and without stages. Two ways to run the stages:

* **one process** (simulated ranks, or one host's GPUs): each stage's programs are ``jax.jit``
  over its own ranks' devices (its ``T`` ranks one SPMD program), the activations and the state
  moved between the stages' devices by ``jax.device_put``; nothing waits on the host within a
  call, so a call is queued whole while the previous one runs;
* **CPU ranks of mpiexec** (one rank a process): each rank runs its stage's programs over its own
  slices (:class:`~dinb.models.llama_rank.RankModel`, the stage's all-reduces by MPI among the
  stage's ranks), sends its activations to the same rank of the next stage, and the last stage's
  first rank sends the tokens and the state to every rank (they all run the same host loop);
  every send is non-blocking, so no rank waits for a peer that is busy with another group.

A rank that sends or receives nothing within ``stage_timeout_s`` is named
(:class:`~dinb.errors.RankFailedError`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from dinb.errors import ProviderError, RankFailedError
from dinb.export.slicefile import SliceFile, TensorMeta
from dinb.formats.safetensors import np_dtype
from dinb.job import ranks
from dinb.models.decode_loop import SAMPLING, STOPS
from dinb.models.decode_stages import stage_decode, stage_decode_rows, stage_prefill
from dinb.runtime.placement import place_params
from dinb.runtime.runners.decoder_mpi import DECODE, PREFILL, MpiDecoderPrograms, decoder_model
from dinb.runtime.runners.stage_link import poll_until
from dinb.sharding.layout import Layout

#: where a decode (of every slot, of some rows) and a prefill program take the cache: it is donated
DECODE_CACHE, ROWS_CACHE, PREFILL_CACHE = 9, 10, 12


class StagedDecoderPrograms:
    """A staged decoder export's programs on this process's stages (see the module docstring),
    by the names of a one-stage export's programs."""

    def __init__(self, files: dict[int, SliceFile], job: ranks.Job, mpi: bool, timeout_s: float,
                 groups: int = 0):
        import jax

        first = next(iter(files.values()))
        pipe, gen = first.pipeline or {}, first.generation or {}
        self.stages, self.t = int(pipe["stages"]), int(pipe["stage_ranks"])
        self.model, self.strategy_name = decoder_model(first)
        by_stage: dict[int, dict[int, SliceFile]] = {}
        for r, sf in files.items():
            by_stage.setdefault(r // self.t, {})[r] = sf
        self.local_stages = sorted(by_stage)
        self.layers = {s: range(*next(iter(fs.values())).pipeline["layers"]) for s, fs in by_stage.items()}
        self.cache_meta = TensorMeta.from_json(gen["cache"])
        self.slots, self.vocab = int(gen["slots"]), int(first.outputs[0].shape[-1])
        self.hidden = int(self.model.hf["hidden_size"])
        self._jitted: dict[tuple[Any, ...], Any] = {}
        self.link: _StageLink | None = None
        if mpi:
            if self.strategy_name not in ("megatron", "replicated"):
                raise ProviderError(f"{first.path}: a decoder's stages on MPI's ranks run megatron or "
                                    f"replicated in each stage; this export's strategy is "
                                    f"{self.strategy_name!r}")
            (rank,) = job.local_ranks
            self.link = _StageLink(rank, self.t, self.stages, timeout_s)
            self.rank_programs = MpiDecoderPrograms(files[rank], rank % self.t, self.t, job.device_of(rank),
                                                    comm=self.link.stage_comm)
            self.params = {self.local_stages[0]: self.rank_programs.params}
            self.stage_model = self.rank_programs.model
        elif job.process_count == 1:
            self.stage_model = self.model
            self.params, self._sh = {}, {}
            for s, stage_files in by_stage.items():
                devices = [job.device_of(r) for r in range(s * self.t, (s + 1) * self.t)]
                self.params[s], self._sh[s] = self._place(stage_files, job, devices)
        else:
            raise ProviderError(
                f"{first.path}: a decoder over pipeline stages runs in one process (simulated ranks, or "
                "one host's GPUs) or on CPU ranks of mpiexec, one rank a process; this job has "
                f"{job.process_count} processes on {job.target}")
        self._jax = jax
        #: slot groups in flight through the stages (0: as :meth:`auto_groups`), at most one a slot
        self.groups = max(1, min(groups or self.auto_groups(job.target), self.slots))

    def auto_groups(self, target: str) -> int:
        """One group per stage where the stages compute side by side (GPUs, CPU ranks of several
        hosts); one where they share one host's cores (simulated CPU devices, mpiexec ranks of
        one host): the groups' passes would only take turns on the same cores."""
        if target != "cpu" or (self.link is not None and self.link.hosts > 1):
            return self.stages
        return 1

    def _place(self, files: dict[int, SliceFile], job: ranks.Job, devices: list[Any]) -> tuple[dict, dict]:
        """A stage's parameters on its devices, and the shardings of what its programs take."""
        dm = self.cache_meta.layout.dev_matrix
        slot = next(iter(files.values())).inputs[0].layout
        layouts = {"cache": self.cache_meta.layout, "slot": slot,
                   "per_slot": Layout(dm, [slot.tensor_map[0], -1]), "whole1": Layout(dm, [-1]),
                   "whole2": Layout(dm, [-1, -1]), "carry": Layout(dm, [-1, -1, -1])}
        params, shardings = place_params(files, job, list(layouts.values()), devices)
        return params, dict(zip(layouts, shardings))

    # ---- what DecoderRunner asks -------------------------------------------------------------
    def zeros_cache(self) -> dict[int, Any]:
        """Each local stage's cache of its layers, zeros."""
        if self.link is not None:
            return {self.local_stages[0]: self.rank_programs.zeros_cache()}
        jnp = self._jax.numpy
        shape, dtype = self.cache_meta.shape, np_dtype(self.cache_meta.dtype)
        return {s: self._jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self._sh[s]["cache"])()
                for s in self.local_stages}

    def whole_cache(self, cache: dict[int, Any]) -> np.ndarray:
        """Every stage's cache as one array of all the layers (one process only)."""
        return np.concatenate([np.asarray(cache[s]) for s in range(self.stages)], axis=0)

    def program(self, name: Any) -> Callable[..., tuple[Any, ...]]:
        """The pass through the stages that stands for the exported program ``name``."""
        key = str(name)
        decode, prefill = DECODE.fullmatch(key), PREFILL.fullmatch(key)
        if name == 1:
            return self._logits_step
        if decode:
            return partial(self._decode, int(decode[1]), int(decode[2]), bool(decode[3]))
        if prefill and not prefill[4]:
            return partial(self._prefill, int(prefill[3]) if prefill[3] else None)
        raise ProviderError(f"a decoder over pipeline stages has no program {key!r}")

    def new_generation(self) -> None:
        """Start the stage statistics of :meth:`info` again (they are a generation's)."""
        if self.link is not None:
            self.link.busy_s, self.link.stats = 0.0, {}

    def info(self) -> dict[str, Any]:
        info = {"stages": self.stages, "stage_ranks": self.t, "local_stages": list(self.local_stages),
                "layers": {s: [r.start, r.stop] for s, r in self.layers.items()},
                "transfer": "mpi" if self.link is not None else "local", "groups": self.groups}
        if self.link is not None:  # each rank's share of the generation's decode time spent computing
            info["busy"] = {r: round(st["busy_s"] / st["wall_s"], 4) for r, st in self.link.stats.items()
                            if st["wall_s"] > 0}
        return info

    def describe(self) -> str:
        lines = [f"a decoder over {self.stages} pipeline stages of {self.t} rank(s): activations (S, 1, "
                 f"{self.hidden}) forward, the slots' state back from the last stage each step"]
        for s, r in self.layers.items():
            lines.append(f"stage {s}: layers {r.start}..{r.stop - 1}" + (" + embedding" if s == 0 else "")
                         + (" + norm and logits head" if s == self.stages - 1 else ""))
        return "\n".join(lines)

    # ---- one stage's program -------------------------------------------------------------------
    def _stage(self, s: int, kind: str, window: int | None, sample: bool | None) -> Any:
        key = (s, kind, window, sample)
        if key not in self._jitted:
            first, last, layers = s == 0, s == self.stages - 1, self.layers[s]
            if kind == "decode":
                fn, donate = stage_decode(self.stage_model, layers, first, last, window, sample), DECODE_CACHE
            elif kind == "rows":
                fn, donate = stage_decode_rows(self.stage_model, layers, first, last, window, bool(sample)), \
                    ROWS_CACHE
            else:
                fn, donate = stage_prefill(self.stage_model, layers, first, last, window), PREFILL_CACHE
            self._jitted[key] = self._jax.jit(fn, donate_argnums=(donate,))
        return self._jitted[key]

    def _put(self, s: int, values: Sequence[Any], kinds: Sequence[str]) -> list[Any]:
        """``values`` on stage ``s``'s devices (as they are under MPI: the rank's own device)."""
        if self.link is not None:
            return list(values)
        sh = self._sh[s]
        return [None if v is None else self._jax.device_put(v, sh[k]) for v, k in zip(values, kinds)]

    # ---- the passes --------------------------------------------------------------------------
    def groups_of(self, keep: np.ndarray) -> list[np.ndarray]:
        """The slot groups that follow each other through the stages, as their slots, each
        padded to ``ceil(S / G)`` with ``S`` (a row that writes nothing): slot ``i`` is in group
        ``i % G`` (so the first slots taken land in different groups); a group without a kept
        slot is left out."""
        n = -(-self.slots // self.groups)
        groups = []
        for g in range(self.groups):
            rows = np.arange(g, self.slots, self.groups)
            if keep[rows].any():
                groups.append(np.concatenate([rows, np.full(n - len(rows), self.slots)]).astype(np.int32))
        return groups

    def _decode(self, steps: int, window: int, sample: bool, params: dict[int, Any], tokens: Any,
                positions: Any, remaining: Any, counts: Any, keep: Any, sampling_f: Any, sampling_i: Any,
                stops: Any, cache: dict[int, Any], *rest: Any) -> tuple[Any, ...]:
        """``decode_k``: ``steps`` passes of each slot group, one token per live slot a pass.

        Group ``g``'s pass computes its slots only (:func:`~dinb.models.decode_stages.stage_decode_rows`)
        and moves on their entries of the state, so its passes depend on its own previous pass
        alone: the passes are issued step by step, group by group, and stage ``s`` works on
        group ``g`` while stage ``s + 1`` works on group ``g - 1``. The groups' slots are merged
        into one state and one ``(k, S)`` of tokens at the end of the call. One group (or one
        with a kept slot) runs the passes of every slot, as without groups."""
        t0 = time.perf_counter()
        if self.link is not None:
            self.link.busy_s = 0.0  # this call's
        jnp = self._jax.numpy
        xp = np if self.link is not None else jnp
        keep_host = np.asarray(keep, bool)
        groups = self.groups_of(keep_host) if self.groups > 1 else []
        last = self.stages - 1
        start = self._put(last, [tokens, positions, xp.where(keep_host, remaining, 0), counts], ("slot",) * 4)
        sampling = {s: self._put(s, (sampling_f, sampling_i, stops, *rest),
                                 ("per_slot",) * 3 + ("whole2",) * len(rest)) for s in self.local_stages}
        if len(groups) <= 1:
            groups = [None]
        results: list[Any] = [[None, None, *start] for _ in groups]
        passes: list[tuple[int, int, Any]] = []
        for step in range(steps):
            for g, rows in enumerate(groups):
                state = _ready(results[g])[2:]
                n = self.slots if rows is None else len(rows)
                results[g] = self._pass("decode", window, sample, params, state, sampling, cache, state[0],
                                        [(n, 1, self.hidden)],
                                        [((self.slots,), "int32"), ((self.slots,), "float32")], rows)
                passes.append((step, g, results[g]))
        if groups == [None]:
            picks, logprobs = zip(*(_ready(res)[:2] for _, _, res in passes))
            state = _ready(results[0])[2:]
        else:
            masks = [np.isin(np.arange(self.slots), rows) for rows in groups]
            picks = [xp.full((self.slots,), -1, np.int32) for _ in range(steps)]
            logprobs = [xp.zeros((self.slots,), np.float32) for _ in range(steps)]
            for step, g, res in passes:
                picked, logprob = _ready(res)[:2]
                picks[step] = xp.where(masks[g], picked, picks[step])
                logprobs[step] = xp.where(masks[g], logprob, logprobs[step])
            state = list(start)
            for mask, res in zip(masks, results):
                state = [xp.where(mask, new, old) for new, old in zip(_ready(res)[2:], state)]
        if self.link is not None:
            self.link.account(time.perf_counter() - t0)
        return xp.stack(picks), xp.stack(logprobs), *state, cache

    def _logits_step(self, params: dict[int, Any], tokens: Any, positions: Any, cache: dict[int, Any],
                     *rest: Any) -> tuple[Any, Any]:
        """The decode step with its logits over the whole cache (``Model.decode_step``)."""
        zeros = np.zeros(self.slots, np.int32)
        state = [tokens, positions, zeros + 1, zeros]
        sampling_arrays = [np.zeros((self.slots, c), np_dtype(d)) for _, c, d in SAMPLING]
        sampling_arrays.append(np.full((self.slots, STOPS), -1, np.int32))
        sampling = {s: self._put(s, (*sampling_arrays, *rest), ("per_slot",) * 3 + ("whole2",) * len(rest))
                    for s in self.local_stages}
        logits, = _ready(self._pass("decode", self.model.max_len, None, params, state, sampling, cache,
                                    tokens, [(self.slots, 1, self.hidden)],
                                    [((self.slots, self.vocab), "float32")]))
        return logits, cache

    def _prefill(self, window: int | None, params: dict[int, Any], ids: Any, lengths: Any, slots: Any,
                 budgets: Any, tokens: Any, positions: Any, remaining: Any, counts: Any, sampling_f: Any,
                 sampling_i: Any, stops: Any, cache: dict[int, Any], *rest: Any) -> tuple[Any, ...]:
        """``prefill_<R>x<P>`` (``window``: ``..._w<W>``, after a cached prefix): a pass of each
        slot group's prompts (all of them in one pass with one group), issued one after the
        other so that stage ``s`` prefills group ``g`` while stage ``s + 1`` prefills ``g - 1``;
        the groups' first tokens, log-probabilities and logits put back in the rows' order, and
        their slots' state merged."""
        xp = np if self.link is not None else self._jax.numpy
        state = [tokens, positions, remaining, counts]
        slot_of = np.asarray(slots)
        groups = [np.flatnonzero(slot_of % self.groups == g) for g in range(self.groups)]
        parts = [idx for idx in groups if (slot_of[idx] < self.slots).any()] if self.groups > 1 else []
        if len(parts) <= 1:
            return (*_ready(self._prefill_pass(window, params, ids, lengths, slots, budgets, state,
                                               (sampling_f, sampling_i, stops), cache, rest)), cache)
        results = [self._prefill_pass(window, params, *_rows((ids, lengths, slots, budgets), idx), state,
                                      (sampling_f, sampling_i, stops), cache,
                                      rest[:1] + tuple(_rows(rest[1:], idx)))
                   for idx in parts]
        rows = len(slot_of)
        out = [xp.zeros((rows,), np.int32), xp.zeros((rows,), np.float32),
               xp.zeros((rows, self.vocab), np.float32)]
        merged = list(self._put(self.stages - 1, state, ("slot",) * 4))
        for idx, res in zip(parts, results):
            got = _ready(res)
            out = [_set_rows(o, idx, g) for o, g in zip(out, got[:3])]
            mine = np.isin(np.arange(self.slots), slot_of[idx])
            merged = [xp.where(mine, new, old) for new, old in zip(got[3:], merged)]
        return (*out, *merged, cache)

    def _prefill_pass(self, window: int | None, params: dict[int, Any], ids: Any, lengths: Any, slots: Any,
                      budgets: Any, state: list[Any], sampling: tuple[Any, Any, Any], cache: dict[int, Any],
                      rest: tuple[Any, ...]) -> Any:
        """One prefill pass of the rows ``ids`` (R, P) through the stages (see :meth:`_pass`)."""
        rows, bucket = np.shape(ids)
        args = {s: self._put(s, (lengths, slots, budgets), ("whole1",) * 3) for s in self.local_stages}
        tail = {s: self._put(s, (*sampling, *rest), ("per_slot",) * 3 + ("whole2", "whole1")[:len(rest)])
                for s in self.local_stages}
        extra = {s: (args[s], tail[s]) for s in self.local_stages}
        return self._pass("prefill", window, None, params, state, extra, cache, ids,
                          [(rows, bucket, self.hidden)],
                          [((rows,), "int32"), ((rows,), "float32"), ((rows, self.vocab), "float32")])

    def _pass(self, kind: str, window: int | None, sample: bool | None, params: dict[int, Any],
              state: list[Any], extra: dict[int, Any], cache: dict[int, Any], x: Any,
              carry: list[tuple[int, ...]], picked: list[tuple[tuple[int, ...], str]],
              rows: np.ndarray | None = None) -> Any:
        """One pass through the local stages (a decode of the slots ``rows`` only, when given);
        the last stage's results (``picked``: their shapes and dtypes, then the state), the same
        on every process: a list, or under MPI a broadcast under way (:func:`_ready` waits for
        it). ``cache`` is updated in place."""
        x_kind = ("slot" if kind == "decode" else "whole2")
        for s in self.local_stages:
            first, last = s == 0, s == self.stages - 1
            st = self._put(s, state, ("slot",) * 4)
            if first:
                xin = self._put(s, [x], [x_kind])[0]
            elif self.link is not None:
                xin = self.link.recv(carry[0], self.cache_meta.dtype)
            else:
                xin = self._put(s, [x], ["carry"])[0]
            program = self._stage(s, "rows" if rows is not None else kind, window, sample)
            t0 = time.perf_counter()
            if rows is not None:
                at = self._put(s, [rows], ["whole1"])[0]
                out = program(params[s], xin, at, *st, *extra[s][:3], cache[s], *extra[s][3:])
            elif kind == "decode":
                out = program(params[s], xin, *st, *extra[s][:3], cache[s], *extra[s][3:])
            else:
                (lengths, slots, budgets), tail = extra[s]
                out = program(params[s], xin, lengths, slots, budgets, *st, *tail[:3], cache[s], *tail[3:])
            *results, cache[s] = out
            if not last:
                x = results[0]
                if self.link is not None:
                    x = np.asarray(x)
                    self.link.busy_s += time.perf_counter() - t0
                    self.link.send(x)
            else:
                got = results
                if self.link is not None:
                    got = [np.asarray(a) for a in got]
                    self.link.busy_s += time.perf_counter() - t0
        n_state = 0 if sample is None and kind == "decode" else 4
        if self.link is None:
            return got
        specs = picked + [((self.slots,), "int32")] * n_state
        return self.link.broadcast(got if self.stages - 1 in self.local_stages else None, specs)


class _StageLink:
    """MPI between a rank and the same rank of the stages before and after it, the broadcast of
    the last stage's results to every rank, and the communicator of the rank's own stage."""

    def __init__(self, rank: int, stage_ranks: int, stages: int, timeout_s: float):
        from mpi4py import MPI

        self.MPI, self.world = MPI, MPI.COMM_WORLD
        if self.world.size != stage_ranks * stages:
            raise ProviderError(f"a decoder over {stages} stages of {stage_ranks} rank(s) runs on "
                                f"{stage_ranks * stages} MPI processes; MPI's world has {self.world.size}")
        self.rank, self.t, self.stages, self.timeout_s = rank, stage_ranks, stages, timeout_s
        self.stage_comm = self.world.Split(rank // stage_ranks, rank)
        self.root = (stages - 1) * stage_ranks
        self.hosts = len(set(self.world.allgather(socket.gethostname())))  # the job's hosts
        #: seconds this rank computed (its stage's programs) in the decode call under way, and
        #: every rank's busy and wall seconds over the decode calls so far
        self.busy_s, self.stats = 0.0, {}
        self.sends: list[tuple[Any, int, Callable[[], str]]] = []  # under way: request, peer, what

    def send(self, x: np.ndarray) -> None:
        """``x`` to the same rank of the next stage, started (:meth:`settle` waits for it)."""
        peer = self.rank + self.t
        req = self.world.Isend([np.ascontiguousarray(x).view(np.uint8).reshape(-1), self.MPI.BYTE], dest=peer,
                               tag=1)
        self._started(req, peer, lambda: f"rank {self.rank} (stage {self.rank // self.t}) could not hand "
                      f"its activations to rank {peer} (stage {peer // self.t})")

    def _started(self, req: Any, peer: int, message: Callable[[], str]) -> None:
        """A send under way: those done are let go (mpi4py's request holds the buffer till then)."""
        self.sends = [s for s in self.sends if not s[0].Test()]
        self.sends.append((req, peer, message))

    def recv(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        peer = self.rank - self.t
        buf = np.empty(shape, np_dtype(dtype))
        req = self.world.Irecv([buf.view(np.uint8).reshape(-1), self.MPI.BYTE], source=peer, tag=1)
        self._wait(req, peer, lambda: f"rank {self.rank} (stage {self.rank // self.t}) received no "
                   f"activations from rank {peer} (stage {peer // self.t})")
        return buf

    def broadcast(self, arrays: list[np.ndarray] | None, specs: Sequence[tuple[tuple[int, ...], str]]
                  ) -> _Broadcast:
        """The last stage's first rank's ``arrays`` on every rank (``specs``: their shapes, dtypes),
        started: its :func:`_ready` waits for them. The root sends them to each rank on its own
        (``Isend``, not ``Ibcast``): a non-blocking collective moves only while its root calls
        into MPI, and the root goes straight on to its next group's pass, so the ranks waiting
        for these tokens would wait for that pass too. A few hundred bytes go out as they are
        sent; messages of one pair keep their order, so every rank matches the passes' results in
        the order the passes ran."""
        sizes = [int(np.prod(shape)) * np.dtype(np_dtype(d)).itemsize for shape, d in specs]
        if self.rank == self.root:
            assert arrays is not None
            buf = np.concatenate([np.ascontiguousarray(a, np_dtype(d)).view(np.uint8).reshape(-1)
                                  for a, (_, d) in zip(arrays, specs)])
            for r in range(self.world.size):
                if r != self.root:
                    self._started(self.world.Isend([buf, self.MPI.BYTE], dest=r, tag=2), r,
                                  lambda r=r: f"rank {self.root} (the last stage) could not hand its "
                                  f"tokens to rank {r}")
            return _Broadcast(self, None, buf, specs, sizes)
        buf = np.empty(sum(sizes), np.uint8)
        return _Broadcast(self, self.world.Irecv([buf, self.MPI.BYTE], source=self.root, tag=2), buf, specs,
                          sizes)

    def settle(self) -> None:
        """Wait for this rank's sends still under way (at the end of a decode call)."""
        sends, self.sends = self.sends, []
        for req, peer, message in sends:
            self._wait(req, peer, message)

    def account(self, wall_s: float) -> None:
        """Add a decode call's ``wall_s`` and this rank's busy time in it to the stage statistics
        (every rank's, gathered: the calls end together)."""
        self.settle()
        mine, self.busy_s = np.array([self.busy_s, wall_s]), 0.0
        every = np.empty((self.world.size, 2))
        req = self.world.Iallgather([mine, self.MPI.DOUBLE], [every, self.MPI.DOUBLE])
        self._wait(req, self.root, lambda: f"rank {self.rank}: the ranks did not all end the decode call")
        for r, (b, w) in enumerate(every.tolist()):
            stats = self.stats.setdefault(r, {"busy_s": 0.0, "wall_s": 0.0})
            stats["busy_s"] += b
            stats["wall_s"] += w

    def _wait(self, req: Any, peer: int, message: Callable[[], str]) -> None:
        if not poll_until(req.Test, self.timeout_s):
            raise RankFailedError(f"{message()} within {self.timeout_s:.0f} s; rank {peer} is dead or stuck",
                                  (peer,))


class _Broadcast:
    """A started broadcast of the last stage's results (:meth:`_StageLink.broadcast`)."""

    def __init__(self, link: _StageLink, req: Any, buf: np.ndarray,
                 specs: Sequence[tuple[tuple[int, ...], str]], sizes: list[int]):
        """``req``: the receive under way (None at the root, which has them)."""
        self.link, self.req, self.buf, self.specs, self.sizes = link, req, buf, specs, sizes
        self.arrays: list[np.ndarray] | None = None

    def wait(self) -> list[np.ndarray]:
        if self.arrays is None:
            link = self.link
            if self.req is not None:
                link._wait(self.req, link.root, lambda: f"rank {link.rank} received no tokens from rank "
                           f"{link.root} (the last stage)")
            self.arrays, at = [], 0
            for (shape, d), n in zip(self.specs, self.sizes):
                self.arrays.append(self.buf[at:at + n].view(np_dtype(d)).reshape(shape))
                at += n
        return self.arrays


def _rows(arrays: Sequence[Any], idx: np.ndarray) -> list[np.ndarray]:
    """The rows ``idx`` of each of ``arrays`` (a prefill's per-row inputs), on the host."""
    return [np.asarray(a)[idx] for a in arrays]


def _set_rows(out: Any, idx: np.ndarray, values: Any) -> Any:
    """``out`` with its rows ``idx`` set to ``values`` (a numpy array in place, a JAX one anew)."""
    if isinstance(out, np.ndarray):
        out[idx] = np.asarray(values)
        return out
    return out.at[idx].set(values)


def _ready(result: Any) -> list[Any]:
    """A pass's results: waited for where they come by a broadcast still under way."""
    return result.wait() if isinstance(result, _Broadcast) else result
