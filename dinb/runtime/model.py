"""``Model``: load a rank's slice file, compile once, predict many times (MindSpore Lite's shape).

::

    context = Context(target=["cpu"])
    model = Model()
    model.build_from_file("out/matmul0.dinb", ModelType.DINB, context)  # or the directory
    inputs = model.get_inputs()
    inputs[0].set_data_from_numpy(np.ones(inputs[0].shape, np.float32))
    outputs = model.predict(inputs)
    outputs[0].get_data_to_numpy()

``Model`` is a facade: loading picks one *runner* for the export (see
:mod:`dinb.runtime.runners`: the SPMD program, each rank's own programs over MPI, ONNX Runtime,
pipeline stages, a decoder) and every call after that goes to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, SliceFileError
from dinb.export.slicefile import SliceFile, TensorMeta
from dinb.job import ranks
from dinb.runtime.block_pool import BlockPool
from dinb.runtime.config import RuntimeConfig, load_config
from dinb.runtime.context import Context, ModelType
from dinb.runtime.loading import load_slice_files
from dinb.runtime.runners import DecoderRunner, PipelineRunner, Runner, choose_runner
from dinb.runtime.tensor import Tensor
from dinb.sharding.pipeline import StageEvent


class Model:
    """A distributed model as one rank sees it: build once, then ``predict`` (or ``generate``)."""

    def __init__(self) -> None:
        self._job: ranks.Job | None = None
        self._files: dict[int, SliceFile] = {}
        self._runner: Runner | None = None
        self._last: list[Tensor] = []
        self.config = RuntimeConfig()
        self.timings: dict[str, float] = {}

    # ---- build -------------------------------------------------------------------------------
    def build_from_file(self, model_path: str | Path, model_type: ModelType = ModelType.DINB,
                        context: Context | None = None, config_file: str | Path | None = None,
                        *, on_phase: Callable[[str], None] | None = None) -> None:
        """Load this process's slice file(s) and compile the program(s) once.

        ``model_path`` is a rank's ``.dinb`` file or the directory of an export. ``on_phase`` is
        told ``"read"`` once every rank's slices are read and ``"compiled"`` after compiling
        (notebook engines report it for the load progress bars).
        """
        context = context or Context()
        context.check_provider()
        if model_type is ModelType.MINDIR:
            raise SliceFileError(
                f"{model_path}: MindIR files are MindSpore's own format; export the model with dinb "
                "(dinb.export_distributed or python -m dinb export) and load the .dinb files")
        self.config = load_config(config_file)
        info = context.device_info
        job = ranks.current_job() or ranks.init(
            context.target_name, device_id=info.device_id,
            init_timeout_s=self.config.init_timeout_s, agree_timeout_s=self.config.agree_timeout_s)
        self._job = job
        t0 = time.perf_counter()
        self._files = load_slice_files(Path(model_path), job, self.config.verify_checksums, info.rank_id)
        self.timings["load_s"] = time.perf_counter() - t0
        if on_phase is not None:
            on_phase("read")
        t0 = time.perf_counter()
        self._runner = choose_runner(self._files, job, info.provider, self.config)
        self.timings["compile_s"] = time.perf_counter() - t0
        if on_phase is not None:
            on_phase("compiled")

    @property
    def runner(self) -> Runner:
        """The runner that loading chose (see :mod:`dinb.runtime.runners`)."""
        if self._runner is None:
            raise DinbError("the model is not built; call build_from_file(path, ...) first")
        return self._runner

    def _built(self) -> SliceFile:
        """This process's first slice file, once the model is built (else a clear error)."""
        self.runner  # noqa: B018 - raises when not built
        return next(iter(self._files.values()))

    @property
    def provider(self) -> str:
        """What runs the program: ``xla``, or the ONNX Runtime provider used (empty before build)."""
        return self._runner.provider if self._runner is not None else ""

    @property
    def collectives(self) -> str:
        """Between the ranks: ``gloo``, ``mpi``, ``nccl`` or ``in-process`` (empty before build)."""
        return self._runner.collectives if self._runner is not None else ""

    @property
    def provider_notice(self) -> str | None:
        """A fallback the user must hear of (TensorRT not available), or None."""
        return self._runner.notice if self._runner is not None else None

    @property
    def batch_buckets(self) -> list[int]:
        """The batch sizes predict takes (see :mod:`dinb.sharding.batch_buckets`); empty: the export's."""
        return list(self._first.batch_buckets) if self._files else []

    def close(self) -> None:
        """Release the devices' buffers and the compiled programs (the model must be built again)."""
        if self._runner is not None:
            self._runner.close()
        self._runner, self._last = None, []

    # ---- run ---------------------------------------------------------------------------------
    def get_inputs(self) -> list[Tensor]:
        """Empty input tensors with the exported names, shapes and dtypes."""
        return [Tensor(name=m.name, shape=m.shape, dtype=m.dtype) for m in self._built().inputs]

    def output_meta(self) -> list[TensorMeta]:
        """Name, full shape, dtype and layout of every output, as exported."""
        return list(self._built().outputs)

    def get_outputs(self) -> list[Tensor]:
        """Output tensors of the last predict (empty ones before it; none on ranks outside the
        last pipeline stage)."""
        if not self.runner.gives_outputs:
            return []
        return list(self._last) or [Tensor(name=m.name, shape=m.shape, dtype=m.dtype)
                                    for m in self._first.outputs]

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
        runner = self.runner
        self._last = []
        outputs = runner.predict(inputs, micro_batches)
        self._last = [Tensor(a, name=m.name) for m, a in zip(self._first.outputs, outputs)]
        return list(self._last)

    # ---- generation (a decoder's export) -----------------------------------------------------
    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_ids: Sequence[int] | None = None, on_token: Callable[[int, int], None] | None = None,
                 return_logprobs: bool = False) -> Any:
        """New tokens after a prompt (a list of token ids), or after each of a list of prompts
        (at most the export's sequence slots), from a decoder's export.

        Greedy when ``temperature`` is 0; else sampled (``top_k``, ``top_p``, see
        :mod:`dinb.models.sampling`) with a generator per prompt seeded by ``seed``: the same
        seed gives the same tokens on every rank count. What is not given comes from the
        model's ``generation_config.json`` (greedy without one). A prompt stops after
        ``max_new_tokens`` or after a token of ``stop_ids`` (which is kept; default: the model's
        end tokens, ``()`` for none). ``on_token(row, token)`` is called as
        each token is picked (streaming: the tokens come every few decode steps, as many as one
        call of the decode program runs). The tokens are picked on the devices; with
        ``return_logprobs`` each token's log-probability under the model comes back too, as
        ``(tokens, logprobs)`` of the same nesting. Every rank must make the same call.
        """
        runner = self._decoder("generate")
        return runner.generate(prompt_ids, max_new_tokens, runner.sampling(temperature, top_k, top_p, seed),
                               runner.end_tokens if stop_ids is None else stop_ids, on_token, return_logprobs)

    def generate_stream(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, **sampling: Any
                        ) -> Iterator[int]:
        """The new tokens of one prompt as they are picked (an iterator); ``generate``'s options."""
        runner = self._decoder("generate_stream")
        stop_ids = sampling.pop("stop_ids", None)
        return runner.stream(prompt_ids, max_new_tokens, runner.sampling(**sampling),
                             runner.end_tokens if stop_ids is None else stop_ids)

    def prefill(self, slot: int, prompt_ids: Sequence[int]) -> np.ndarray:
        """Run the prefill program: ``prompt_ids`` into sequence slot ``slot`` of the KV cache;
        returns the logits (vocabulary,) after the prompt's last token. (``generate`` calls it.)"""
        return self._decoder("prefill").prefill_logits(slot, prompt_ids)

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Run one decode step: ``tokens[s]`` of every slot ``s`` at ``positions[s]``; returns the
        logits (slots, vocabulary). The cache is updated in place."""
        return self._decoder("decode_step").decode_logits(tokens, positions)

    def serve_step(self, joins: Sequence[dict[str, Any]], active: Sequence[int],
                   tables: Sequence[tuple[int, Sequence[int]]] = ()) -> dict[int, list[int]]:
        """One step of continuous batching (what a serving agent runs): the requests in ``joins``
        (``slot``, ``ids``, ``sampling`` (:class:`~dinb.models.sampling.SamplingParams`),
        ``max_tokens``, ``stop_ids``; a paged cache's ``table``, ``start`` and ``resume``)
        prefilled into their slots, then one call of the decode program for them and the slots
        in ``active`` (``tables``: a paged cache's grown block tables); the tokens each slot got."""
        return self._decoder("serve_step").serve_step(joins, active, tables)

    def kv_cache(self, slot: int, length: int) -> np.ndarray:
        """The keys and values of slot ``slot`` at positions ``0 .. length-1``, gathered from every
        rank: ``(layers, 2, kv_heads, length, head_dim)``."""
        return self._decoder("kv_cache").cache_slot(slot, length)

    def block_pool(self) -> BlockPool | None:
        """A paged cache's pool of blocks (which sequence holds which, the prefix cache): its
        ``snapshot()`` is what :func:`dinb.explore.draw_block_pool` draws; None for a cache of
        slots."""
        return self._decoder("block_pool").pool

    def generation_info(self) -> dict[str, Any] | None:
        """A decoder's ``slots``, ``max_len``, prompt ``buckets``, ``vocab``, the KV ``cache`` (shape,
        dtype, layout), the ``cache_bytes`` each local rank holds and, for a paged cache, its
        pool's ``paged`` counts; None for other exports."""
        runner = self.runner
        return runner.info() if isinstance(runner, DecoderRunner) else None

    def _decoder(self, what: str) -> DecoderRunner:
        runner = self.runner
        if not isinstance(runner, DecoderRunner):
            raise DinbError(f"{what}: {self.model_name!r} is not a decoder's export; generate runs models "
                            "that generate text (--model llama)")
        return runner

    # ---- what the model says about itself ----------------------------------------------------
    @property
    def _first(self) -> SliceFile:
        return next(iter(self._files.values()))

    @property
    def job(self) -> ranks.Job:
        self._built()
        assert self._job is not None
        return self._job

    @property
    def model_name(self) -> str:
        return self._built().model

    def export_meta(self) -> dict[str, Any]:
        """The export's metadata as this rank's slice file holds it (model, config, layouts)."""
        return dict(self._built().meta)

    @property
    def world_size(self) -> int:
        return self.job.world_size

    @property
    def local_ranks(self) -> list[int]:
        return self.job.local_ranks

    def param_bytes(self) -> dict[int, int]:
        """Bytes of parameter slices each local rank holds (with stages: its stage's only)."""
        self._built()
        return {r: sum(a.nbytes for a in sf.params.values()) for r, sf in self._files.items()}

    def rank_outputs(self) -> dict[int, list[np.ndarray]]:
        """Each local rank's own slice of every output of the last predict."""
        return self.runner.rank_outputs()

    def compiled_text(self) -> str:
        """The partitioned HLO XLA compiled (shows the collectives the layouts imply); with the
        ``tensorrt`` provider or MPI's collectives, the rank's steps and collectives."""
        return self.runner.describe()

    def pipeline_info(self) -> dict[str, Any] | None:
        """``stages``, ``stage_ranks``, the ``micro_batches`` counts exported, the stages this
        process hosts and the ``transfer`` between stages; None for a one-stage export."""
        runner = self.runner
        return runner.info() if isinstance(runner, PipelineRunner) else None

    def timeline(self) -> list[StageEvent]:
        """When each local rank computed each micro-batch in the last predict (wall-clock
        seconds); empty for a one-stage export. :func:`dinb.sharding.pipeline.measured_bubble`
        reads it."""
        runner = self.runner
        return list(runner.events) if isinstance(runner, PipelineRunner) else []
