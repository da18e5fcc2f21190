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
  first rank broadcasts the tokens and the state to every rank (they all run the same host loop).

A rank that sends or receives nothing within ``stage_timeout_s`` is named
(:class:`~dinb.errors.RankFailedError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from dinb.errors import ProviderError, RankFailedError
from dinb.export.slicefile import SliceFile, TensorMeta
from dinb.formats.safetensors import np_dtype
from dinb.job import ranks
from dinb.models.decode_loop import SAMPLING, STOPS
from dinb.models.decode_stages import stage_decode, stage_prefill
from dinb.runtime.placement import place_params
from dinb.runtime.runners.decoder_mpi import DECODE, PREFILL, MpiDecoderPrograms, decoder_model
from dinb.runtime.runners.stage_link import poll_until
from dinb.sharding.layout import Layout

#: where a decode and a prefill program take the cache (after the params): it is donated
DECODE_CACHE, PREFILL_CACHE = 9, 12


class StagedDecoderPrograms:
    """A staged decoder export's programs on this process's stages (see the module docstring),
    by the names of a one-stage export's programs."""

    def __init__(self, files: dict[int, SliceFile], job: ranks.Job, mpi: bool, timeout_s: float):
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

    def info(self) -> dict[str, Any]:
        return {"stages": self.stages, "stage_ranks": self.t, "local_stages": list(self.local_stages),
                "layers": {s: [r.start, r.stop] for s, r in self.layers.items()},
                "transfer": "mpi" if self.link is not None else "local"}

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
    def _decode(self, steps: int, window: int, sample: bool, params: dict[int, Any], tokens: Any,
                positions: Any, remaining: Any, counts: Any, keep: Any, sampling_f: Any, sampling_i: Any,
                stops: Any, cache: dict[int, Any], *rest: Any) -> tuple[Any, ...]:
        """``decode_k``: ``steps`` passes, each one token per live slot (see decode_loop)."""
        jnp = self._jax.numpy
        where = np.where if self.link is not None else jnp.where  # (on the last stage's devices)
        state: list[Any] = [tokens, positions, where(keep, remaining, 0), counts]
        sampling = {s: self._put(s, (sampling_f, sampling_i, stops, *rest),
                                 ("per_slot",) * 3 + ("whole2",) * len(rest)) for s in self.local_stages}
        picks, logprobs = [], []
        for _ in range(steps):
            picked, logprob, *state = self._pass("decode", window, sample, params, state, sampling, cache,
                                                 state[0], [(self.slots, 1, self.hidden)],
                                                 [((self.slots,), "int32"), ((self.slots,), "float32")])
            picks.append(picked)
            logprobs.append(logprob)
        stack = jnp.stack if self.link is None else np.stack
        return stack(picks), stack(logprobs), *state, cache

    def _logits_step(self, params: dict[int, Any], tokens: Any, positions: Any, cache: dict[int, Any],
                     *rest: Any) -> tuple[Any, Any]:
        """The decode step with its logits over the whole cache (``Model.decode_step``)."""
        zeros = np.zeros(self.slots, np.int32)
        state = [tokens, positions, zeros + 1, zeros]
        sampling_arrays = [np.zeros((self.slots, c), np_dtype(d)) for _, c, d in SAMPLING]
        sampling_arrays.append(np.full((self.slots, STOPS), -1, np.int32))
        sampling = {s: self._put(s, (*sampling_arrays, *rest), ("per_slot",) * 3 + ("whole2",) * len(rest))
                    for s in self.local_stages}
        logits, = self._pass("decode", self.model.max_len, None, params, state, sampling, cache, tokens,
                             [(self.slots, 1, self.hidden)], [((self.slots, self.vocab), "float32")])
        return logits, cache

    def _prefill(self, window: int | None, params: dict[int, Any], ids: Any, lengths: Any, slots: Any,
                 budgets: Any, tokens: Any, positions: Any, remaining: Any, counts: Any, sampling_f: Any,
                 sampling_i: Any, stops: Any, cache: dict[int, Any], *rest: Any) -> tuple[Any, ...]:
        """``prefill_<R>x<P>`` (``window``: ``..._w<W>``, after a cached prefix): one pass."""
        rows, bucket = np.shape(ids)
        state = [tokens, positions, remaining, counts]
        args = {s: self._put(s, (lengths, slots, budgets), ("whole1",) * 3) for s in self.local_stages}
        tail = {s: self._put(s, (sampling_f, sampling_i, stops, *rest),
                             ("per_slot",) * 3 + ("whole2", "whole1")[:len(rest)]) for s in self.local_stages}
        extra = {s: (args[s], tail[s]) for s in self.local_stages}
        first, logprob, logits, *state = self._pass(
            "prefill", window, None, params, state, extra, cache, ids, [(rows, bucket, self.hidden)],
            [((rows,), "int32"), ((rows,), "float32"), ((rows, self.vocab), "float32")])
        return first, logprob, logits, *state, cache

    def _pass(self, kind: str, window: int | None, sample: bool | None, params: dict[int, Any],
              state: list[Any], extra: dict[int, Any], cache: dict[int, Any], x: Any,
              carry: list[tuple[int, ...]], picked: list[tuple[tuple[int, ...], str]]) -> list[Any]:
        """One pass through the local stages; the last stage's results (``picked``: their shapes
        and dtypes, then the state), the same on every process. ``cache`` is updated in place."""
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
            program = self._stage(s, kind, window, sample)
            if kind == "decode":
                out = program(params[s], xin, *st, *extra[s][:3], cache[s], *extra[s][3:])
            else:
                (lengths, slots, budgets), tail = extra[s]
                out = program(params[s], xin, lengths, slots, budgets, *st, *tail[:3], cache[s], *tail[3:])
            *results, cache[s] = out
            if not last:
                x = results[0]
                if self.link is not None:
                    self.link.send(np.asarray(x))
            else:
                got = results
        n_state = 0 if sample is None and kind == "decode" else 4
        if self.link is None:
            return got
        specs = picked + [((self.slots,), "int32")] * n_state
        mine = [np.asarray(a) for a in got] if self.stages - 1 in self.local_stages else None
        return self.link.broadcast(mine, specs)


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

    def send(self, x: np.ndarray) -> None:
        peer = self.rank + self.t
        req = self.world.Isend([np.ascontiguousarray(x).view(np.uint8).reshape(-1), self.MPI.BYTE], dest=peer,
                               tag=1)
        self._wait(req, peer, lambda: f"rank {self.rank} (stage {self.rank // self.t}) could not hand its "
                   f"activations to rank {peer} (stage {peer // self.t})")

    def recv(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        peer = self.rank - self.t
        buf = np.empty(shape, np_dtype(dtype))
        req = self.world.Irecv([buf.view(np.uint8).reshape(-1), self.MPI.BYTE], source=peer, tag=1)
        self._wait(req, peer, lambda: f"rank {self.rank} (stage {self.rank // self.t}) received no "
                   f"activations from rank {peer} (stage {peer // self.t})")
        return buf

    def broadcast(self, arrays: list[np.ndarray] | None, specs: Sequence[tuple[tuple[int, ...], str]]
                  ) -> list[np.ndarray]:
        """The last stage's first rank's ``arrays`` on every rank (``specs``: their shapes, dtypes)."""
        sizes = [int(np.prod(shape)) * np.dtype(np_dtype(d)).itemsize for shape, d in specs]
        if arrays is not None and self.rank == self.root:
            buf = np.concatenate([np.ascontiguousarray(a, np_dtype(d)).view(np.uint8).reshape(-1)
                                  for a, (_, d) in zip(arrays, specs)])
        else:
            buf = np.empty(sum(sizes), np.uint8)
        req = self.world.Ibcast([buf, self.MPI.BYTE], root=self.root)
        self._wait(req, self.root, lambda: f"rank {self.rank} received no tokens from rank {self.root} (the "
                   "last stage)")
        out, at = [], 0
        for (shape, d), n in zip(specs, sizes):
            out.append(buf[at:at + n].view(np_dtype(d)).reshape(shape))
            at += n
        return out

    def _wait(self, req: Any, peer: int, message: Callable[[], str]) -> None:
        if not poll_until(req.Test, self.timeout_s):
            raise RankFailedError(f"{message()} within {self.timeout_s:.0f} s; rank {peer} is dead or stuck",
                                  (peer,))
