"""Each rank runs its own program: runs of local steps, with the collectives between them done
by the job's MPI (``mpi4py``), not inside one SPMD program.

A built-in model writes out, for each named strategy, what one rank computes
(:class:`~dinb.models.rank_program.RankProgram`): local steps on the rank's slices and named
collectives between them. For the Megatron MLP on ``n`` ranks::

    h_r = gelu(x @ w1[:, cols_r] + b1[cols_r])       local (rank r's columns of w1)
    p_r = h_r @ w2[rows_r, :]                         local (rank r's rows of w2)
    y   = sum_r p_r + b2                              all-reduce, then local

Two backends compile the runs of local steps:

* :class:`MpiRunner` (provider ``xla`` with ``collectives = mpi``): each run is one ``jax.jit``
  program over the rank's own device; the all-reduce is ``mpi4py``'s ``Allreduce`` on host
  buffers. On CPU ranks that ``mpiexec`` started this replaces gloo's all-reduce inside the
  SPMD program, which costs 37x MPI's at 32 KiB (``benchmarks/collectives.py``).
* :class:`~dinb.runtime.runners.onnx.OnnxRunner` (provider ``tensorrt``): each run as an ONNX model.

When all ranks are simulated in one process, the collectives are numpy over the local ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dinb.errors import ProviderError
from dinb.export.slicefile import SliceFile
from dinb.job import ranks
from dinb.models.rank_program import AllGather, AllReduce, Collective, Local, collect, run_locals
from dinb.runtime.config import RuntimeConfig
from dinb.runtime.inputs import InputCheck, one_stage
from dinb.sharding.batch_buckets import at_batch

#: one compiled run of local steps: the rank's values in, its values out
Stage = Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]


def rank_program_of(first: SliceFile, world_size: int, what: str) -> tuple[Any, str, Any]:
    """The built-in model of an export, its strategy's name and the rank program for it.
    ``what`` names the path asking (for the errors: it needs a named strategy of a built-in
    model)."""
    from dinb.models import MODELS, get_model

    if first.model not in MODELS:
        raise ProviderError(
            f"{first.path}: {what} runs the built-in models {sorted(MODELS)}, whose per-rank "
            f"programs are written out; {first.model!r} is not one. Use provider 'xla'."
        )
    model = get_model(first.model, **first.meta.get("model_config", {}))
    name = model.strategy_name_of(strategy_of(first))
    program = model.rank_program(name, world_size) if name else None
    if program is None:
        raise ProviderError(
            f"{first.path}: {what} runs the named strategies of {model.name!r} "
            f"({list(model.strategy_names)}); this export's layouts are none of them. Export with a "
            "named strategy, or use provider 'xla'."
        )
    return model, name, program


def strategy_of(sf: SliceFile) -> Any:
    from dinb.sharding.strategy import Strategy

    return Strategy({n: m.layout for n, m in sf.param_meta().items()},
                    inputs=[m.layout for m in sf.inputs], outputs=[m.layout for m in sf.outputs])


class MpiCollectives:
    """Collectives between rank processes with mpi4py (the job's processes are MPI's world)."""

    def __init__(self, world_size: int, what: str, comm: Any = None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ProviderError(f"{what} needs mpi4py for its collectives (pip install mpi4py)") from None
        self.comm = MPI.COMM_WORLD if comm is None else comm  # or the ranks of one pipeline stage
        if self.comm.size != world_size:
            raise ProviderError(
                f"{what} runs its collectives over MPI, but MPI's world has {self.comm.size} "
                f"process(es) and the job {world_size} ranks; start the ranks with mpiexec -n "
                f"{world_size} (or notebook engines='mpi')"
            )

    def collect(self, step: Collective, value: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        if isinstance(step, AllReduce):
            # MPI has no bfloat16: such a sum runs in float32 (as XLA's own reductions do)
            wide = value.astype(np.float32) if value.dtype.name == "bfloat16" else value
            out = np.empty_like(wide)
            self.comm.Allreduce(wide, out, op=MPI.SUM)
            return out.astype(value.dtype, copy=False)
        raw = value.view(np.uint16) if value.dtype.name == "bfloat16" else value  # gathered as bytes
        parts = np.empty((self.comm.size, *value.shape), raw.dtype)
        self.comm.Allgather(raw, parts)
        return np.concatenate(list(parts.view(value.dtype)), axis=step.axis)


def shapes_after(step: Collective, specs: tuple[Any, ...], world: int) -> tuple[Any, ...]:
    """Shapes after a collective: an all-gather multiplies its axis by the rank count."""
    import jax

    if isinstance(step, AllReduce):
        return specs
    out = list(specs)
    s = specs[step.index]
    shape = list(s.shape)
    shape[step.axis] *= world
    out[step.index] = jax.ShapeDtypeStruct(tuple(shape), s.dtype)
    return tuple(out)


def mpi_applies(files: dict[int, SliceFile], job: ranks.Job, config: RuntimeConfig) -> bool:
    """Whether CPU ranks of several processes run :class:`MpiRunner` (config ``collectives``).

    ``mpi`` runs each rank's own program with ``mpi4py``'s collectives; it needs the ranks to be
    MPI's processes, one rank each, and a per-rank program of the model for the export's
    strategy. ``auto`` takes it where it can and the SPMD program (gloo) elsewhere; every rank
    must choose alike, so the ranks compare their answers."""
    wanted = config.collectives
    if job.process_count == 1 or job.target != "cpu" or wanted == "gloo":
        return False
    first = next(iter(files.values()))
    world = ranks.mpi_world()
    reason = None
    if world is None or world[1] != job.process_count or len(job.local_ranks) != 1:
        reason = "the ranks are not MPI's processes (mpiexec or notebook engines='mpi')"
    else:
        try:
            rank_program_of(first, job.world_size, "collectives = mpi")
        except ProviderError as e:
            reason = str(e)
    if reason and wanted == "mpi":
        raise ProviderError(f"collectives = mpi: {reason}; use collectives = gloo or auto")
    return all(c == "mpi" for c in job.allgather("collectives", "gloo" if reason else "mpi"))


class StepRanks:
    """The ranks this process hosts, each running its rank program (see the module doc), at the
    export's batch and at each of its batch buckets. Subclasses compile a run of local steps
    (:meth:`_compile`) and name what runs them (``provider``, ``collectives``)."""

    what = "the per-rank program"  # for errors and describe()
    runs_on = "jit"
    notice: str | None = None
    gives_outputs = True

    def __init__(self, files: dict[int, SliceFile], world_size: int, process_count: int):

        first = next(iter(files.values()))
        self.model, self.strategy_name, self.program = rank_program_of(first, world_size, self.what)
        self.world_size = world_size
        self.comm = MpiCollectives(world_size, self.what) if process_count > 1 else None
        self.inputs, self.outputs = first.inputs, first.outputs
        self.buckets: list[int] = first.batch_buckets
        self.check = InputCheck(self.inputs, self.buckets)
        #: at each batch size the export runs, each local rank's slices of every input
        self.in_slices = {b: {r: [m.layout.slice_of(r, at_batch(m.shape, b), m.name) for m in self.inputs]
                              for r in files} for b in self.buckets or [None]}
        self._last: dict[int, tuple[np.ndarray, ...]] = {}
        self.files = files
        #: each local rank's compiled steps at each batch size (None: the export's own); a bucket's
        #: steps are compiled the first time a batch of its size comes
        self.stages: dict[int, dict[int | None, list[Stage | Collective]]] = {r: {} for r in files}
        for rank in files:
            self.steps_at(rank, self.buckets[-1] if self.buckets else None)

    def steps_at(self, rank: int, batch: int | None) -> list[Stage | Collective]:
        """Rank ``rank``'s compiled steps at ``batch`` rows."""
        import jax

        if batch in self.stages[rank]:
            return self.stages[rank][batch]
        params = self.files[rank].params
        shapes = [at_batch(m.shape, batch) for m in self.inputs]
        specs = tuple(jax.ShapeDtypeStruct(m.layout.slice_shape(s, m.name), m.dtype)
                      for m, s in zip(self.inputs, shapes))
        compiled: list[Stage | Collective] = []
        for i, stage in enumerate(self.program.stages()):
            if isinstance(stage, list):
                name = f"{self.model.name}_rank{rank}_stage{i}" + (f"_batch{batch}" if batch else "")
                compiled.append(self._compile(stage, params, specs, name, rank))
                specs = tuple(jax.eval_shape(_runner(stage, params), *specs))
            else:
                compiled.append(stage)
                specs = shapes_after(stage, specs, self.world_size)
        self.stages[rank][batch] = compiled
        return compiled

    def _compile(self, steps: Sequence[Local], params: dict[str, np.ndarray], specs: tuple[Any, ...],
                 name: str, rank: int) -> Stage:
        raise NotImplementedError

    def predict(self, inputs: Sequence[Any], micro_batches: int | None) -> list[np.ndarray]:
        """Every local rank's program on its slices of ``inputs``; the first local rank's outputs
        (whole where replicated, its slice where the layout splits them)."""
        one_stage(micro_batches)
        arrays = self.check(inputs)
        batch = arrays[0].shape[0] if self.buckets else None
        self._last = {}
        self._last = self.run({r: tuple(a[sl] for a, sl in zip(arrays, slices))
                               for r, slices in self.in_slices[batch].items()}, batch)
        return list(next(iter(self._last.values())))

    def rank_outputs(self) -> dict[int, list[np.ndarray]]:
        return {r: list(v) for r, v in self._last.items()}

    def close(self) -> None:
        self._last, self.stages = {}, {}

    def run(self, inputs_by_rank: dict[int, tuple[np.ndarray, ...]],
            batch: int | None = None) -> dict[int, tuple[np.ndarray, ...]]:
        """Every local rank's program (at ``batch`` rows, one of the export's batch buckets; None:
        the export's batch) on its input slices; the outputs of each local rank."""
        values = dict(inputs_by_rank)
        steps = {r: self.steps_at(r, batch) for r in self.stages}
        for i, step in enumerate(steps[next(iter(steps))]):
            if isinstance(step, (AllReduce, AllGather)):
                values = self._collect(step, values)
            else:
                values = {r: steps[r][i](vals) for r, vals in values.items()}  # type: ignore[operator]
        return values

    def _collect(self, step: Collective, values: dict[int, tuple[np.ndarray, ...]]
                 ) -> dict[int, tuple[np.ndarray, ...]]:
        if self.comm is None:  # all ranks in this process
            ranks = sorted(values)
            return dict(zip(ranks, collect(step, [values[r] for r in ranks])))
        ((rank, vals),) = values.items()
        out = list(vals)
        out[step.index] = self.comm.collect(step, np.ascontiguousarray(vals[step.index]))
        return {rank: tuple(out)}

    def describe(self) -> str:
        lines = [f"{self.model.name} ({self.strategy_name}) per rank, on {self.runs_on}:"]
        for stage in self.program.stages():
            if isinstance(stage, list):
                lines += [f"  {self.runs_on:<6} {s.name}" for s in stage]
            else:
                what = "all-reduce" if isinstance(stage, AllReduce) else f"all-gather on axis {stage.axis}"
                lines.append(f"  {'mpi' if self.comm else 'numpy':<6} {what} of value {stage.index}")
        return "\n".join(lines)


def _runner(steps: Sequence[Local], params: dict[str, Any]) -> Callable[..., tuple[Any, ...]]:
    def run(*values: Any) -> tuple[Any, ...]:
        return run_locals(steps, params, values)

    return run


class MpiRunner(StepRanks):
    """Runs of local steps as ``jax.jit`` programs on each rank's own device (the parameters
    placed there once), collectives over MPI."""

    what = "collectives = mpi"
    runs_on = "xla"
    provider, collectives = "xla", "mpi"

    def __init__(self, files: dict[int, SliceFile], world_size: int, process_count: int,
                 devices: dict[int, Any]):
        self._devices = devices
        super().__init__(files, world_size, process_count)

    def _compile(self, steps: Sequence[Local], params: dict[str, np.ndarray], specs: tuple[Any, ...],
                 name: str, rank: int) -> Stage:
        import jax

        placed = {k: jax.device_put(v, self._devices[rank]) for k, v in params.items()}

        def run(p: dict[str, Any], *values: Any) -> tuple[Any, ...]:
            return run_locals(steps, p, values)

        compiled = jax.jit(run).lower(placed, *specs).compile()

        def stage(values: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
            return tuple(np.asarray(v) for v in compiled(placed, *values))

        return stage
