"""The ``tensorrt`` provider: each rank's program as ONNX, run by ONNX Runtime, TensorRT first.

The program comes from the model's :class:`~dinb.models.rank_program.RankProgram` for the
export's strategy (:mod:`dinb.runtime.runners.rank_steps`). Every run of local steps is converted by
``jax2onnx`` into one ONNX model whose constants are this rank's weight slices; every
collective between them runs over MPI (or numpy, when all ranks are simulated in one process).

ONNX Runtime runs each model with the first execution provider available of TensorRT (an engine
built per rank and cached under ``~/.cache/dinb/tensorrt``), CUDA (target ``gpu``) and CPU.
The one used is reported (:attr:`OnnxRunner.provider`), and a fallback from TensorRT is always
announced (:attr:`OnnxRunner.notice`, also as a ``ProviderFallbackWarning``), never silent.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import ProviderError, ProviderFallbackWarning
from dinb.export.slicefile import SliceFile
from dinb.models.rank_program import Local, run_locals
from dinb.runtime.runners.rank_steps import Stage, StepRanks

INSTALL = ("pip install 'dinb[onnx]' (onnxruntime and jax2onnx; for the GPU providers "
           "onnxruntime-gpu and NVIDIA TensorRT)")


def cache_root() -> Path:
    """Where engines are cached: ``$DINB_CACHE``, else ``$XDG_CACHE_HOME/dinb``, else ``~/.cache/dinb``."""
    if os.environ.get("DINB_CACHE"):
        return Path(os.environ["DINB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dinb"


def check_installed() -> None:
    """Raise :class:`ProviderError` naming the install when ONNX Runtime or jax2onnx is missing."""
    missing = [m for m in ("onnxruntime", "jax2onnx") if _missing(m)]
    if missing:
        raise ProviderError(f"provider 'tensorrt' needs {' and '.join(missing)}, not installed: {INSTALL}")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def execution_providers(target: str, cache_dir: Path) -> tuple[list[Any], str | None]:
    """ONNX Runtime's providers in the order TensorRT, CUDA, CPU (those available), and the
    notice to show when TensorRT is not among them."""
    import onnxruntime as ort

    from dinb.job.ranks import current_job

    available = ort.get_available_providers()
    job = current_job()
    gpu = job.gpu.index if job is not None and job.gpu is not None else 0  # the rank's own GPU
    chosen: list[Any] = []
    if target == "gpu" and "TensorrtExecutionProvider" in available:
        cache_dir.mkdir(parents=True, exist_ok=True)
        chosen.append(("TensorrtExecutionProvider", {"device_id": gpu, "trt_engine_cache_enable": True,
                                                     "trt_engine_cache_path": str(cache_dir)}))
    if target == "gpu" and "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": gpu}))
    chosen.append("CPUExecutionProvider")
    notice = None
    if target == "cpu":
        notice = ("target cpu: the ONNX program runs on ONNX Runtime's CPUExecutionProvider (TensorRT "
                  "needs a GPU)")
    elif len(chosen) == 1 or not isinstance(chosen[0], tuple) or chosen[0][0] != "TensorrtExecutionProvider":
        fallback = "CUDAExecutionProvider" if len(chosen) > 1 else "CPUExecutionProvider"
        notice = (f"TensorRT is not available to ONNX Runtime here (it offers {available}); the ONNX "
                  f"program runs on {fallback}. For TensorRT install onnxruntime-gpu and NVIDIA TensorRT.")
    return chosen, notice


class OnnxRunner(StepRanks):
    """The ranks this process hosts, each running its program as ONNX models (see module doc)."""

    what = "provider 'tensorrt'"
    runs_on = "onnx"

    def __init__(self, files: dict[int, SliceFile], world_size: int, process_count: int, target: str):
        check_installed()
        first = next(iter(files.values()))
        odd = [m.name for m in first.inputs + first.outputs if m.dtype in ("float16", "bfloat16", "float64")]
        if odd:
            raise ProviderError(f"{first.path}: the ONNX path runs float32 exports; {odd} are not "
                                "float32. Export without --dtype, or use provider 'xla'.")
        self.providers, self.notice = execution_providers(target, cache_root() / "tensorrt" / first.export_id)
        self.onnx_provider = ""  # the execution provider ONNX Runtime took
        self.collectives = "mpi" if process_count > 1 else "in-process"
        super().__init__(files, world_size, process_count)  # refuses what it cannot run
        self.provider = f"tensorrt: onnxruntime {self.onnx_provider}"
        if self.notice:  # announced once the program runs here
            warnings.warn(self.notice, ProviderFallbackWarning, stacklevel=4)

    def _compile(self, steps: Sequence[Local], params: dict[str, np.ndarray], specs: tuple[Any, ...],
                 name: str, rank: int) -> Stage:
        """A run of local steps as an ONNX Runtime session (weights inside as constants)."""
        import jax
        import onnxruntime as ort
        from jax2onnx import to_onnx

        def run(*values: Any) -> tuple[Any, ...]:
            return run_locals(steps, params, values)

        with jax.disable_jit():  # nested jits (jax.nn.softmax) inline: one flat graph to convert
            proto = to_onnx(run, list(specs), model_name=name,
                            input_names=[f"v{j}" for j in range(len(specs))])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=self.providers)
        self.onnx_provider = self.onnx_provider or session.get_providers()[0]

        def stage(values: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
            return tuple(session.run(None, {f"v{j}": np.ascontiguousarray(v) for j, v in enumerate(values)}))

        return stage
