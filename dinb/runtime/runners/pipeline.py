"""Running a pipelined export: each stage's program on its own ranks, micro-batches in GPipe order.

For a predict cut into ``M`` micro-batches, every rank of stage ``s`` runs::

    for m in 0 .. M-1:
        values = inputs[m]            (stage 0: rows m B/M .. (m+1) B/M - 1 of the inputs)
               | receive(s - 1, m)    (other stages: the previous stage's activations)
        values = program_s,M(params_s, *values)       one SPMD call over the stage's T ranks
        send(s + 1, m, values)        (the last stage keeps them: the outputs of micro-batch m)

Sends do not wait for the receiver, so stage ``s`` starts micro-batch ``m + 1`` while stage
``s + 1`` works on ``m``: GPipe's schedule falls out of the data dependencies (see
:mod:`dinb.sharding.pipeline` for the bubble). Every computation is timed (``events``), on the wall clock
shared by the processes of one machine, so the schedule that actually ran can be drawn and its
bubble measured. The links between stages are in :mod:`dinb.runtime.runners.stage_link`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dinb.errors import InputError, ProviderError, RankMismatchError
from dinb.export.slicefile import SliceFile, TensorMeta
from dinb.job import ranks
from dinb.runtime.config import RuntimeConfig
from dinb.runtime.inputs import InputCheck
from dinb.runtime.placement import xla_collectives
from dinb.runtime.programs import deserialize
from dinb.runtime.runners.stage_link import (
    LocalLink,
    MpiLink,
    Shard,
    XlaLink,
    choose_transfer,
    xla_link_refusal,
)
from dinb.sharding.layout import one_mesh_shardings
from dinb.sharding.pipeline import StageEvent


class PipelineRunner:
    """The stages this process hosts, compiled, and the link to the stages next to them."""

    provider = "xla"
    notice: str | None = None

    def __init__(self, files: dict[int, SliceFile], job: ranks.Job, config: RuntimeConfig):
        first = next(iter(files.values()))
        pipe = first.pipeline
        assert pipe is not None
        self.job, self.config = job, config
        self.stages, self.t = int(pipe["stages"]), int(pipe["stage_ranks"])
        self.micro_counts: list[int] = sorted(pipe["micro_batches"])
        self.files = files
        self.local_stages = sorted({r // self.t for r in files})
        self.meta = {s: next(sf for r, sf in files.items() if r // self.t == s).pipeline
                     for s in self.local_stages}
        self.inputs = first.inputs
        self.outputs = first.outputs
        self.check = InputCheck(self.inputs, [])
        self.check_micro(config.micro_batches, "the config's micro_batches")
        self.transfer = choose_transfer(config.stage_transfer, job.process_count, job.process_index,
                                        job.target)
        if self.transfer == "xla":
            import jax

            refusal = xla_link_refusal(jax.__version__, job.target, self.t)
            if refusal:
                raise ProviderError(f"{first.path}: {refusal}")
        self._params: dict[int, dict[str, Any]] = {}
        self._compiled: dict[tuple[int, int], Any] = {}
        self._shardings: dict[int, tuple[dict[str, Any], list[Any], list[Any]]] = {}
        for s in self.local_stages:
            self._place_params(s)
            for m in sorted({1, config.micro_batches}):
                self._compile(s, m)
        rank = job.local_ranks[0]
        if self.transfer == "local":
            self._pool = ThreadPoolExecutor(max_workers=self.stages, thread_name_prefix="dinb-stage")
        elif self.transfer == "mpi":
            self._mpi = MpiLink(rank, self.t, self.stages, config.stage_timeout_s)
        else:
            self._xla = XlaLink(job.devices, rank, self.t)
        self.events: list[StageEvent] = []
        self._last: list[list[Any]] = []  # the last stage's outputs, per micro-batch
        self.last_micro_batches = 1
        self.collectives = "none within a stage" if self.t == 1 and job.process_count > 1 \
            else xla_collectives(job)

    def info(self) -> dict[str, Any]:
        """``stages``, ``stage_ranks``, the ``micro_batches`` counts exported, the stages this
        process hosts, the ``transfer`` between stages and each local stage's ``layers``."""
        return {"stages": self.stages, "stage_ranks": self.t, "micro_batches": list(self.micro_counts),
                "local_stages": list(self.local_stages), "transfer": self.transfer,
                "layers": {s: list(self.meta[s]["layers"]) for s in self.local_stages}}

    def close(self) -> None:
        self._last, self._params, self._compiled = [], {}, {}
        if self.transfer == "local":
            self._pool.shutdown(wait=False)

    # ---- who does what -----------------------------------------------------------------------
    @property
    def takes_inputs(self) -> bool:
        """Whether this process hosts ranks of the first stage (the only ones given inputs)."""
        return 0 in self.local_stages

    @property
    def gives_outputs(self) -> bool:
        """Whether this process hosts ranks of the last stage (the only ones with outputs)."""
        return self.stages - 1 in self.local_stages

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.t, (stage + 1) * self.t))

    def check_micro(self, m: Any, what: str = "micro_batches") -> int:
        if isinstance(m, bool) or not isinstance(m, int) or m not in self.micro_counts:
            raise InputError(
                f"{what} = {m!r}: this export has programs for {self.micro_counts} micro-batches; "
                "pick one of them, or export again with micro_batches=[...] (--micro-batches)"
            )
        return m

    # ---- build -------------------------------------------------------------------------------
    def _layouts(self, stage: int) -> tuple[dict[str, TensorMeta], list[TensorMeta], list[TensorMeta]]:
        sf = next(sf for r, sf in self.files.items() if r // self.t == stage)
        pipe = sf.pipeline
        assert pipe is not None
        receives = [TensorMeta.from_json(d) for d in pipe["receives"]]
        sends = [TensorMeta.from_json(d) for d in pipe["sends"]]
        return sf.param_meta(), receives, sends

    def _place_params(self, stage: int) -> None:
        import jax

        pmeta, receives, sends = self._layouts(stage)
        names = list(pmeta)
        devices = [self.job.device_of(r) for r in self.stage_ranks(stage)]
        shardings = one_mesh_shardings([pmeta[n].layout for n in names]
                                       + [m.layout for m in receives + sends], devices)
        p_shard = dict(zip(names, shardings))
        self._shardings[stage] = (p_shard, shardings[len(names):len(names) + len(receives)],
                                  shardings[len(names) + len(receives):])
        local = [r for r in self.stage_ranks(stage) if r in self.files]
        self._params[stage] = {
            n: jax.make_array_from_single_device_arrays(
                m.shape, p_shard[n], [jax.device_put(self.files[r].params[n], self.job.device_of(r))
                                      for r in local])
            for n, m in pmeta.items()
        }

    def _compile(self, stage: int, m: int) -> Any:
        import jax

        if (stage, m) in self._compiled:
            return self._compiled[(stage, m)]
        sf = next(sf for r, sf in self.files.items() if r // self.t == stage)
        exported = deserialize(sf, m, f"the stage {stage} program for {m} micro-batches")
        if exported.nr_devices != self.t:
            raise RankMismatchError(
                f"{sf.path}: the stage {stage} program spans {exported.nr_devices} devices, but the "
                f"export's stages have {self.t} ranks; the file is damaged"
            )
        _, receives, _ = self._layouts(stage)
        p_shard, in_shard, out_shard = self._shardings[stage]
        structs = [jax.ShapeDtypeStruct(_micro(r.shape, m), r.dtype, sharding=sh)
                   for r, sh in zip(receives, in_shard)]
        jitted = jax.jit(exported.call, in_shardings=(p_shard, *in_shard), out_shardings=tuple(out_shard))
        self._compiled[(stage, m)] = jitted.lower(self._params[stage], *structs).compile()
        return self._compiled[(stage, m)]

    # ---- run ---------------------------------------------------------------------------------
    def predict(self, inputs: Sequence[Any], micro_batches: int | None) -> list[np.ndarray]:
        """One predict in ``micro_batches`` micro-batches (None: the config's); the outputs when
        this process hosts the last stage (else ``[]``). ``inputs`` are the whole batch's (needed
        by the first stage only: the others may pass ``[]``)."""
        m = self.check_micro(self.config.micro_batches if micro_batches is None else micro_batches)
        arrays = self.check(inputs) if self.takes_inputs or len(inputs) else None
        for s in self.local_stages:
            self._compile(s, m)  # every rank of a stage compiles, before any stage starts
        micro_inputs: list[list[np.ndarray]] = []
        if self.takes_inputs:
            assert arrays is not None
            rows = arrays[0].shape[0] // m if arrays and arrays[0].ndim else 0
            micro_inputs = [[a[i * rows:(i + 1) * rows] for a in arrays] for i in range(m)]
        self.events = []
        self.last_micro_batches = m
        if self.transfer == "local":
            link = LocalLink(self.stages, self.config.stage_timeout_s)
            futures = [self._pool.submit(self._run_stage, s, m, micro_inputs, link)
                       for s in self.local_stages]
            errors = []
            for s, f in zip(self.local_stages, futures):
                try:
                    f.result(timeout=self.config.stage_timeout_s * (self.stages + 1))
                except BaseException as e:  # noqa: BLE001 - the first stage's error is reported
                    errors.append(e)
                    link.fail(s, e)
            link.finish()
            if errors:
                raise errors[0]
        else:
            stage = self.local_stages[0]
            if self.transfer == "mpi" and stage > 0:
                self._mpi.expect(m, self._wanted(stage, m))
            try:
                self._run_stage(stage, m, micro_inputs, None)
            except BaseException:
                if self.transfer == "mpi":
                    self._mpi.cancel()
                raise
        if not self.gives_outputs:
            return []
        return [np.concatenate([self._whole(o[i]) for o in self._last], axis=0) if m > 1
                else self._whole(self._last[0][i]) for i in range(len(self.outputs))]

    def _whole(self, arr: Any) -> np.ndarray:
        """An output (replicated over the last stage) as numpy, from this process's copy."""
        return np.asarray(arr if self.job.process_count == 1 else arr.addressable_data(0))

    def _run_stage(self, stage: int, m: int, micro_inputs: list[list[np.ndarray]],
                   link: LocalLink | None) -> None:
        import jax

        program, params = self._compiled[(stage, m)], self._params[stage]
        _, receives, _ = self._layouts(stage)
        _, in_shard, _ = self._shardings[stage]
        local = [r for r in self.stage_ranks(stage) if r in self.files]
        last = stage == self.stages - 1
        outs_by_micro = []
        try:
            for i in range(m):
                if stage == 0:
                    values = self._global(micro_inputs[i], receives, in_shard, m, local)
                else:
                    values = self._receive(stage, i, m, receives, in_shard, local, link)
                start = time.time()
                outs = program(params, *values)
                jax.block_until_ready(outs)
                end = time.time()
                self.events += [StageEvent(r, stage, i, start, end) for r in local]
                if last:
                    outs_by_micro.append(list(outs))
                else:
                    self._send(stage, i, m, outs, link)
            if self.transfer == "mpi":
                self._mpi.finish()
        finally:
            if last:
                self._last = outs_by_micro

    def _global(self, arrays: list[np.ndarray], metas: list[TensorMeta], shardings: list[Any], m: int,
                local: list[int]) -> list[Any]:
        """The first stage's micro-batch inputs as the program takes them: numpy in one process
        (XLA splits them), else this rank's slice of each as one global array."""
        if self.job.process_count == 1:
            return list(arrays)
        import jax

        out = []
        for a, meta, sh in zip(arrays, metas, shardings):
            shards = [jax.device_put(a[meta.layout.slice_of(r % self.t, a.shape, meta.name)],
                                     self.job.device_of(r)) for r in local]
            out.append(jax.make_array_from_single_device_arrays(a.shape, sh, shards))
        return out

    def _send(self, stage: int, micro: int, m: int, outs: Sequence[Any], link: LocalLink | None) -> None:
        if link is not None:
            link.send(stage, micro, list(outs))
        elif self.transfer == "mpi":
            self._mpi.send(micro, m, [np.asarray(o.addressable_data(0)) for o in outs])
        else:
            self._xla.send([o.addressable_data(0) for o in outs])

    def _receive(self, stage: int, micro: int, m: int, metas: list[TensorMeta], shardings: list[Any],
                 local: list[int], link: LocalLink | None) -> list[Any]:
        import jax

        if link is not None:
            return [jax.device_put(v, sh) for v, sh in zip(link.recv(stage, micro), shardings)]
        shapes = [_micro(meta.shape, m) for meta in metas]
        if self.transfer == "mpi":
            got = self._mpi.recv(micro, m)
            shards = [[jax.device_put(g, self.job.device_of(local[0]))] for g in got]
        else:
            shards = [[g] for g in self._xla.recv(self._wanted(stage, m))]
        return [jax.make_array_from_single_device_arrays(sh, s, part)
                for sh, s, part in zip(shapes, shardings, shards)]

    def _wanted(self, stage: int, m: int) -> list[Shard]:
        """This rank's part of each value stage ``stage`` receives, at ``m`` micro-batches."""
        _, receives, _ = self._layouts(stage)
        return [Shard(meta.layout.slice_shape(_micro(meta.shape, m), meta.name), meta.dtype)
                for meta in receives]

    def rank_outputs(self) -> dict[int, list[np.ndarray]]:
        """Each local rank's outputs of the last predict: its part for last-stage ranks, nothing
        for the others."""
        out: dict[int, list[np.ndarray]] = {r: [] for r in self.files}
        if not self._last:
            return out
        rank_of = {d: r for r, d in enumerate(self.job.devices)}
        for i in range(len(self.outputs)):
            parts: dict[int, list[np.ndarray]] = {}
            for micro in self._last:
                for shard in micro[i].addressable_shards:
                    parts.setdefault(rank_of[shard.device], []).append(np.asarray(shard.data))
            for r, p in parts.items():
                out[r].append(np.concatenate(p, axis=0) if len(p) > 1 else p[0])
        return out

    def describe(self) -> str:
        """What each local stage runs: its layers, ranks, programs and link."""
        lines = []
        for s in self.local_stages:
            pipe = self.meta[s]
            assert pipe is not None
            a, b = pipe["layers"]
            lines.append(f"stage {s}: layers {a}..{b - 1} on ranks {self.stage_ranks(s)}; programs for "
                         f"{self.micro_counts} micro-batches; activations {self.transfer}")
            for m in sorted({mm for (st, mm) in self._compiled if st == s}):
                lines.append(f"--- stage {s}, {m} micro-batch(es) ---")
                lines.append(str(self._compiled[(s, m)].as_text()))
        return "\n".join(lines)


def _micro(shape: Sequence[int], m: int) -> tuple[int, ...]:
    shape = tuple(shape)
    return (shape[0] // m, *shape[1:]) if shape else shape
