"""One runner per way of running an export, chosen once when ``Model.build_from_file`` loads it.

================================  ==============================================================
runner                            runs
================================  ==============================================================
:class:`SpmdRunner`               one SPMD program for all ranks, XLA's collectives (the default)
:class:`MpiRunner`                each rank's own program, MPI's all-reduce (CPU ranks of mpiexec)
:class:`OnnxRunner`               each rank's own program as ONNX models (provider ``tensorrt``)
:class:`PipelineRunner`           pipeline stages, each on its own ranks, micro-batches in GPipe order
:class:`DecoderRunner`            a decoder: prefill and decode programs over a KV cache (on CPU
                                  ranks of mpiexec each rank's own steps, MPI between them)
================================  ==============================================================

Every runner answers the same small protocol (:class:`Runner`), holds only its own state, and
is picked by :func:`choose_runner` from the export's metadata and the context, so nothing on
the predict path asks which kind of export it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dinb.errors import ProviderError
from dinb.export.slicefile import SliceFile
from dinb.job import ranks
from dinb.runtime.config import RuntimeConfig
from dinb.runtime.runners.decoder import DecoderRunner
from dinb.runtime.runners.decoder_mpi import mpi_decoder_applies
from dinb.runtime.runners.onnx import OnnxRunner
from dinb.runtime.runners.pipeline import PipelineRunner
from dinb.runtime.runners.rank_steps import MpiRunner, mpi_applies
from dinb.runtime.runners.spmd import SpmdRunner
from dinb.runtime.tensor import Tensor


class Runner(Protocol):
    """What :class:`dinb.runtime.model.Model` asks of the way an export runs."""

    provider: str  # what runs the program: "xla", or the ONNX Runtime provider used
    collectives: str  # between the ranks: "gloo", "mpi", "nccl", "in-process", ...
    notice: str | None  # a fallback the user must hear of (TensorRT missing), or None
    gives_outputs: bool  # this process's ranks return outputs (with stages: the last stage's)

    def predict(self, inputs: Sequence[Tensor | np.ndarray], micro_batches: int | None) -> list[np.ndarray]:
        """Check the inputs (:class:`~dinb.runtime.inputs.InputCheck`) before any collective, run
        on every rank with them, and return this process's outputs."""

    def rank_outputs(self) -> dict[int, list[np.ndarray]]:
        """Each local rank's own slice of every output of the last predict."""

    def describe(self) -> str:
        """What runs: the compiled HLO, or the per-rank steps and collectives."""

    def close(self) -> None:
        """Release the device buffers and compiled programs."""


def choose_runner(files: dict[int, SliceFile], job: ranks.Job, provider: str,
                  config: RuntimeConfig) -> Runner:
    """The runner for the export in ``files`` (this process's ranks' slice files) under the
    context's ``provider`` and the run-time ``config``."""
    first = files[job.local_ranks[0]]
    if first.pipeline is not None or first.generation is not None:
        if provider == "tensorrt":
            what = "an export with pipeline stages" if first.pipeline is not None else \
                "a decoder's export"
            raise ProviderError(f"{first.path}: {what} runs on the xla provider; the tensorrt provider "
                                "runs one-stage exports of the built-in models")
        if first.generation is not None:
            mpi = first.pipeline is None and mpi_decoder_applies(files, job, config)
            return DecoderRunner(files, job, mpi=mpi, stage_timeout_s=config.stage_timeout_s,
                                 decode_groups=config.decode_groups)
        return PipelineRunner(files, job, config)
    if provider == "tensorrt":
        return OnnxRunner(files, job.world_size, job.process_count, job.target)
    if mpi_applies(files, job, config):
        return MpiRunner(files, job.world_size, job.process_count, {r: job.device_of(r) for r in files})
    return SpmdRunner(files, job)


__all__ = ["DecoderRunner", "MpiRunner", "OnnxRunner", "PipelineRunner", "Runner", "SpmdRunner",
           "choose_runner"]
