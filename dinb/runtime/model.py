"""``Model``: load a rank's slice file, compile once, predict many times (MindSpore Lite's shape).

::

    context = Context(target=["cpu"])
    model = Model()
    model.build_from_file("out/matmul0.dinb", ModelType.DINB, context)  # or the directory
    inputs = model.get_inputs()
    inputs[0].set_data_from_numpy(np.ones(inputs[0].shape, np.float32))
    outputs = model.predict(inputs)
    outputs[0].get_data_to_numpy()

A process reads the slice files of the ranks it hosts: its own under mpiexec, all of them in
the simulated mode. Before the first collective, the ranks compare notes through the job's
coordinator: if any rank failed to load, or the files come from different exports, every rank
raises the same error naming the rank at fault instead of hanging in the collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import (
    DinbError,
    InputError,
    ProviderError,
    RankFailedError,
    RankMismatchError,
    SliceFileError,
)
from dinb.export.slicefile import SliceFile, TensorMeta, find_slice_files, read_slice_file
from dinb.formats.safetensors import np_dtype
from dinb.job import ranks
from dinb.runtime.config import RuntimeConfig, load_config
from dinb.runtime.context import Context, ModelType
from dinb.runtime.generation import DecodeRun
from dinb.runtime.model_generation import Generating
from dinb.runtime.model_info import Introspection
from dinb.runtime.onnx_rank import OnnxRanks
from dinb.runtime.pipeline_run import PipelineRun
from dinb.runtime.programs import deserialize
from dinb.runtime.rank_steps import JitRanks, StepRanks, rank_program_of
from dinb.runtime.tensor import Tensor
from dinb.sharding.layout import one_mesh_shardings


class Model(Introspection, Generating):
    """A distributed model as one rank sees it: build once, then ``predict``."""

    def __init__(self) -> None:
        self._job: ranks.Job | None = None
        self._files: dict[int, SliceFile] = {}
        self._inputs: list[TensorMeta] = []
        self._outputs: list[TensorMeta] = []
        self._compiled: Any = None  # the program at the export's batch
        self._by_batch: dict[int, Any] = {}  # with batch buckets: each bucket's program
        self._params: dict[str, Any] = {}
        self._in_shardings: list[Any] = []
        # at each batch size the export runs: each local rank's input slices
        self._in_slices: dict[int, dict[int, list[tuple[slice, ...]]]] = {}
        self.batch_buckets: list[int] = []  # the batch sizes predict takes (see dinb.sharding.batch_buckets)
        self._steps: StepRanks | None = None  # per-rank programs (tensorrt, or collectives = mpi)
        self._pipe: PipelineRun | None = None
        self._gen: DecodeRun | None = None  # a decoder's cache and programs (generate)
        self._last_by_rank: dict[int, tuple[np.ndarray, ...]] = {}
        self.provider = ""  # what runs the program: "xla", or the ONNX Runtime provider used
        self.collectives = ""  # between the ranks: "gloo", "mpi", "nccl" or "in-process"
        self.provider_notice: str | None = None
        self._in_types: list[tuple[tuple[int, ...], np.dtype]] = []  # checked on every predict
        self._out_whole: list[bool] = []
        self._last: list[Any] = []
        self.config = RuntimeConfig()
        self.timings: dict[str, float] = {}

    # ---- build -------------------------------------------------------------------------------
    def build_from_file(self, model_path: str | Path, model_type: ModelType = ModelType.DINB,
                        context: Context | None = None, config_file: str | Path | None = None,
                        *, on_phase: Callable[[str], None] | None = None) -> None:
        """Load this process's slice file(s) and compile the SPMD program once.

        ``model_path`` is a rank's ``.dinb`` file or the directory of an export. ``on_phase`` is
        told ``"read"`` once every rank's slices are read and ``"compiled"`` after compiling
        (notebook engines report it for the load progress bars).
        """
        context = context or Context()
        context.check_provider()
        if model_type is ModelType.MINDIR:
            raise SliceFileError(
                f"{model_path}: MindIR files are MindSpore's own format; export the model with "
                "dinb (dinb.export_distributed or python -m dinb export) and load the .dinb files"
            )
        self.config = load_config(config_file)
        info = context.device_info
        job = ranks.current_job() or ranks.init(
            context.target_name, device_id=info.device_id,
            init_timeout_s=self.config.init_timeout_s, agree_timeout_s=self.config.agree_timeout_s)
        self._job = job
        t0 = time.perf_counter()
        error: DinbError | None = None
        try:
            if info.rank_id is not None and job.process_count > 1 and info.rank_id != job.process_index:
                raise RankMismatchError(
                    f"Context rank_id={info.rank_id} but this process is rank {job.process_index} "
                    "of the job; leave rank_id unset under mpiexec or pass the process's rank"
                )
            self._files = self._read_local(Path(model_path), job)
        except DinbError as e:
            error = e
        try:
            job.agree("load slice files", None if error is None else f"{type(error).__name__}: {error}")
        except RankFailedError:
            if error is not None:
                raise error from None  # this rank's own typed error; the others name this rank
            raise
        ids = job.allgather("export id", next(iter(self._files.values())).export_id)
        if len(set(ids)) > 1:
            odd = [r for r, i in enumerate(ids) if i != ids[0]]
            raise SliceFileError(
                f"ranks {odd} loaded slice files from a different export than rank 0; give every "
                "rank the files of one export (one directory)"
            )
        self.timings["load_s"] = time.perf_counter() - t0
        if on_phase is not None:
            on_phase("read")
        t0 = time.perf_counter()
        self._prepare(job)
        if self._files[job.local_ranks[0]].pipeline is not None:
            if context.device_info.provider == "tensorrt":
                raise ProviderError(
                    f"{model_path}: an export with pipeline stages runs on the xla provider; the "
                    "tensorrt provider runs one-stage exports"
                )
            self._pipe = PipelineRun(self._files, job, self.config)
            self.provider = "xla"
            self.collectives = ("in-process" if job.process_count == 1
                                else "none within a stage" if self._pipe.t == 1
                                else "nccl" if job.target == "gpu" else "gloo")
        elif self._files[job.local_ranks[0]].generation is not None:
            if context.device_info.provider == "tensorrt":
                raise ProviderError(f"{model_path}: a decoder's export runs on the xla provider")
            self._gen = DecodeRun(self._files, job, self._place_params(job)[0])
            self.provider = "xla"
            self.collectives = ("in-process" if job.process_count == 1
                                else "nccl" if job.target == "gpu" else "gloo")
        elif context.device_info.provider == "tensorrt":
            onnx = OnnxRanks(self._files, job.world_size, job.process_count, job.target)
            self._steps = onnx
            self.provider = f"tensorrt: onnxruntime {onnx.provider}"
            self.provider_notice = onnx.notice
            self.collectives = "mpi" if job.process_count > 1 else "in-process"
        elif self._choose_collectives(job) == "mpi":
            self._steps = JitRanks(self._files, job.world_size, job.process_count,
                                   {r: job.device_of(r) for r in self._files})
            self.provider, self.collectives = "xla", "mpi"
        else:
            self._compile(job)
            self.provider = "xla"
            self.collectives = ("in-process" if job.process_count == 1
                                else "nccl" if job.target == "gpu" else "gloo")
        self.timings["compile_s"] = time.perf_counter() - t0
        if on_phase is not None:
            on_phase("compiled")

    def _read_local(self, path: Path, job: ranks.Job) -> dict[int, SliceFile]:
        local = job.local_ranks
        if not path.exists():
            raise SliceFileError(f"{path} does not exist; pass an export directory or a .dinb file")
        if path.is_dir() or len(local) > 1:
            directory = path if path.is_dir() else path.parent
            by_rank = find_slice_files(directory)
            if len(by_rank) != job.world_size:
                raise RankMismatchError(
                    f"{directory} holds slice files for {len(by_rank)} ranks but this job has "
                    f"{job.world_size}; launch {len(by_rank)} ranks (mpiexec -n {len(by_rank)} or "
                    f"--simulate {len(by_rank)}), or export again for {job.world_size} ranks"
                )
            paths = {r: by_rank[r] for r in local}
        else:
            paths = {local[0]: path}
        files: dict[int, SliceFile] = {}
        for rank, p in paths.items():
            sf = read_slice_file(p, verify=self.config.verify_checksums)
            if sf.world_size != job.world_size:
                raise RankMismatchError(
                    f"{p} was exported for {sf.world_size} ranks but this job has "
                    f"{job.world_size}; launch {sf.world_size} ranks, or export again for "
                    f"{job.world_size} ranks"
                )
            if sf.rank != rank:
                raise RankMismatchError(
                    f"{p} holds rank {sf.rank}'s slices but this process is rank {rank}; pass the "
                    "export directory and each rank picks its own file"
                )
            files[rank] = sf
        return files

    def _prepare(self, job: ranks.Job) -> None:
        """What every predict needs from the export: input checks, each local rank's input slices."""
        first = next(iter(self._files.values()))
        self._inputs, self._outputs = first.inputs, first.outputs
        self._in_types = [(tuple(m.shape), np_dtype(m.dtype)) for m in self._inputs]
        if first.pipeline is not None:
            return  # the stages slice their own inputs (dinb.runtime.pipeline_run)
        self.batch_buckets = first.batch_buckets
        self._in_slices = {
            b: {r: [m.layout.slice_of(r, self._at_batch(m.shape, b), m.name) for m in self._inputs]
                for r in job.local_ranks}
            for b in self.batch_buckets or [None]}
        self._out_whole = [len(m.layout.replica_groups()) == 1 or len(job.local_ranks) == 1
                           for m in self._outputs]

    def _choose_collectives(self, job: ranks.Job) -> str:
        """``mpi`` or ``gloo`` for CPU ranks of several processes (config ``collectives``).

        ``mpi`` runs each rank's own program (:mod:`dinb.runtime.rank_steps`) with ``mpi4py``'s
        collectives; it needs the ranks to be MPI's processes, one rank each, and a per-rank
        program of the model for the export's strategy. ``auto`` takes it where it can and gloo
        (collectives inside the one SPMD program) elsewhere; every rank must choose alike."""
        wanted = self.config.collectives
        if job.process_count == 1 or job.target != "cpu" or wanted == "gloo":
            return "gloo"
        first = next(iter(self._files.values()))
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
        choices = job.allgather("collectives", "gloo" if reason else "mpi")
        return "mpi" if all(c == "mpi" for c in choices) else "gloo"

    def _place_params(self, job: ranks.Job) -> tuple[dict[str, Any], list[Any]]:
        """Every parameter as one global array from the local ranks' slices (each slice on its
        rank's device); also the input and output shardings."""
        import jax

        pmeta = next(iter(self._files.values())).param_meta()
        names = list(pmeta)
        shardings = one_mesh_shardings([pmeta[n].layout for n in names]
                                       + [m.layout for m in self._inputs + self._outputs], job.devices)
        p_shard = dict(zip(names, shardings))
        self._params = {
            n: jax.make_array_from_single_device_arrays(
                m.shape, p_shard[n],
                [jax.device_put(sf.params[n], job.device_of(r)) for r, sf in self._files.items()])
            for n, m in pmeta.items()
        }
        return self._params, shardings[len(names):]

    def _compile(self, job: ranks.Job) -> None:
        import jax

        first = next(iter(self._files.values()))
        exported = deserialize(first)
        if exported.nr_devices != job.world_size:
            raise RankMismatchError(
                f"{first.path}: the program was exported for {exported.nr_devices} devices but "
                f"this job has {job.world_size}; export again for {job.world_size} ranks"
            )
        params, io_shardings = self._place_params(job)
        p_shard = {n: a.sharding for n, a in params.items()}
        self._in_shardings = io_shardings[:len(self._inputs)]
        o_shard = tuple(io_shardings[len(self._inputs):])
        structs = [jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s)
                   for m, s in zip(self._inputs, self._in_shardings)]
        jitted = jax.jit(exported.call, in_shardings=(p_shard, *self._in_shardings),
                         out_shardings=o_shard)
        self._compiled = jitted.lower(self._params, *structs).compile()
        for b in self.batch_buckets[:-1]:  # the smaller buckets' programs: same shardings
            small = deserialize(first, f"batch_{b}", f"the program for batch {b}")
            structs = [jax.ShapeDtypeStruct(self._at_batch(m.shape, b), m.dtype, sharding=s)
                       for m, s in zip(self._inputs, self._in_shardings)]
            jitted = jax.jit(small.call, in_shardings=(p_shard, *self._in_shardings), out_shardings=o_shard)
            self._by_batch[b] = jitted.lower(self._params, *structs).compile()
        if self.batch_buckets:
            self._by_batch[self.batch_buckets[-1]] = self._compiled

    # ---- run ---------------------------------------------------------------------------------
    def get_inputs(self) -> list[Tensor]:
        """Empty input tensors with the exported names, shapes and dtypes."""
        self._check_built()
        return [Tensor(name=m.name, shape=m.shape, dtype=m.dtype) for m in self._inputs]

    def output_meta(self) -> list[TensorMeta]:
        """Name, full shape, dtype and layout of every output, as exported."""
        self._check_built()
        return list(self._outputs)

    def get_outputs(self) -> list[Tensor]:
        """Output tensors of the last predict (empty ones before it; none on ranks outside the
        last pipeline stage)."""
        self._check_built()
        if self._pipe is not None and not self._pipe.gives_outputs:
            return []
        if self._last:
            return self._output_tensors()
        return [Tensor(name=m.name, shape=m.shape, dtype=m.dtype) for m in self._outputs]

    def predict(self, inputs: Sequence[Tensor | np.ndarray],
                micro_batches: int | None = None) -> list[Tensor]:
        """Run the model on every rank with the same inputs; returns this rank's outputs.

        Inputs are checked (count, shape, dtype) before any collective is entered. Outputs whose
        layout is replicated (the default: the last stage's ranks all hold the same result) are
        whole on every rank; a sharded output is this rank's slice under mpiexec and the
        assembled tensor in the simulated mode.

        With pipeline stages, only the first stage's ranks need ``inputs`` (the others may pass
        ``[]``) and only the last stage's ranks return outputs (the others return ``[]``). The
        batch runs as ``micro_batches`` micro-batches (default: the config's, 1 unless set),
        which must be one of the counts the export has programs for; every rank must use the
        same count.
        """
        self._check_built()
        if self._gen is not None:
            raise InputError("this is a decoder's export: it runs prefill and decode steps over a KV "
                             "cache kept on the devices; call generate(prompt_ids, max_new_tokens) "
                             "instead of predict")
        if self._pipe is not None:
            m = self._pipe.check_micro(self.config.micro_batches if micro_batches is None else micro_batches)
            arrays = self._check_inputs(inputs) if self._pipe.takes_inputs or len(inputs) else None
            self._last = self._pipe.predict(arrays, m)
            return self._output_tensors()
        if micro_batches not in (None, 1):
            raise InputError(f"micro_batches={micro_batches!r}: this export has one pipeline stage; "
                             "micro-batches are for pipelined exports")
        arrays = self._check_inputs(inputs)
        batch = arrays[0].shape[0] if self.batch_buckets else None
        # the last call's device outputs go first: kept alive while the next call runs, they cost
        # MiniLM at batch 64 on a GPU 1.3 ms a call (4.7 ms against 6.1, measured)
        self._last = []
        if self._steps is not None:
            self._last_by_rank = self._steps.run(
                {r: tuple(a[sl] for a, sl in zip(arrays, slices))
                 for r, slices in self._in_slices[batch].items()}, batch)
            self._last = list(next(iter(self._last_by_rank.values())))
            return self._output_tensors()
        program = self._by_batch[batch] if batch is not None else self._compiled
        self._last = list(program(self._params, *self._global_inputs(arrays, batch)))
        return self._output_tensors()

    def _check_inputs(self, inputs: Sequence[Tensor | np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._inputs):
            raise InputError(
                f"the model takes {len(self._inputs)} inputs {[m.name for m in self._inputs]}, "
                f"got {len(inputs)}"
            )
        arrays = []
        for m, (shape, dtype), x in zip(self._inputs, self._in_types, inputs):
            a = x.get_data_to_numpy() if isinstance(x, Tensor) else np.asarray(x)
            if a.shape != shape or a.dtype != dtype:
                if not self._a_bucket(a, shape, dtype, arrays):
                    rows = f" (or {self.batch_buckets} rows)" if self.batch_buckets else ""
                    raise InputError(
                        f"input {m.name!r} must be {m.dtype}{list(m.shape)}{rows} (as exported), got "
                        f"{a.dtype}{list(a.shape)}; convert with np.asarray(x, dtype=np.{m.dtype}) "
                        "or export again for this shape"
                    )
            arrays.append(a)
        return arrays

    def _a_bucket(self, a: np.ndarray, shape: tuple[int, ...], dtype: np.dtype,
                  before: list[np.ndarray]) -> bool:
        """Whether ``a`` is an input at one of the export's batch buckets (as those before it)."""
        return (bool(self.batch_buckets) and a.dtype == dtype and a.ndim == len(shape)
                and a.shape[1:] == shape[1:] and a.shape[0] in self.batch_buckets
                and (not before or before[0].shape[0] == a.shape[0]))

    @staticmethod
    def _at_batch(shape: tuple[int, ...], batch: int | None) -> tuple[int, ...]:
        return shape if batch is None else (batch, *shape[1:])

    def _global_inputs(self, arrays: list[np.ndarray], batch: int | None) -> list[Any]:
        """The inputs as the program takes them. In one process the numpy arrays go as they are:
        the compiled call splits and transfers them in XLA's C++ path (measured ~40 us faster per
        call than building the sharded arrays here). Ranks of several processes each build
        their local shards of one global array."""
        if self._job is not None and self._job.process_count == 1:
            return arrays
        import jax

        out = []
        for i, (a, sh) in enumerate(zip(arrays, self._in_shardings)):
            shards = [jax.device_put(a[slices[i]], self._job.device_of(r))
                      for r, slices in self._in_slices[batch].items()]
            out.append(jax.make_array_from_single_device_arrays(a.shape, sh, shards))
        return out

    def _output_tensors(self) -> list[Tensor]:
        one_process = self._job is not None and self._job.process_count == 1
        if self._pipe is not None or self._steps is not None or one_process:  # whole arrays here
            return [Tensor(np.asarray(arr), name=m.name) for m, arr in zip(self._outputs, self._last)]
        return [Tensor(np.asarray(arr.addressable_data(0) if whole else arr), name=m.name)
                for m, arr, whole in zip(self._outputs, self._last, self._out_whole)]

    def _check_built(self) -> None:
        if self._compiled is None and self._steps is None and self._pipe is None and self._gen is None:
            raise DinbError("the model is not built; call build_from_file(path, ...) first")
