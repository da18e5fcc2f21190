"""The ``tensorrt`` provider: each rank's program as ONNX, run by ONNX Runtime, TensorRT first.

The program comes from the model's :class:`~dinb.models.rank_program.RankProgram` for the
export's strategy (a built-in model rebuilt from the slice file's ``model`` and
``model_config``). Every run of local steps is converted by ``jax2onnx`` into one ONNX model
whose constants are this rank's weight slices; every collective between them runs with the
rank's collective library: MPI (``mpi4py``'s ``Allreduce``/``Allgather`` on the job's
processes, which ``mpiexec`` or MPI engines started) or, when all ranks are simulated in one
process, numpy over the local ranks.

ONNX Runtime runs each model with the first execution provider available of TensorRT (an engine
built per rank and cached under ``~/.cache/dinb/tensorrt``), CUDA (target ``gpu``) and CPU.
The one used is reported (:attr:`OnnxRanks.provider`), and a fallback from TensorRT is always
announced (:attr:`OnnxRanks.notice`, also as a ``ProviderFallbackWarning``), never silent.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import ProviderError, ProviderFallbackWarning
from dinb.models.rank_program import AllGather, AllReduce, Collective, Local, collect, run_locals
from dinb.slicefile import SliceFile

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

    available = ort.get_available_providers()
    chosen: list[Any] = []
    if target == "gpu" and "TensorrtExecutionProvider" in available:
        cache_dir.mkdir(parents=True, exist_ok=True)
        chosen.append(("TensorrtExecutionProvider", {"device_id": 0, "trt_engine_cache_enable": True,
                                                     "trt_engine_cache_path": str(cache_dir)}))
    if target == "gpu" and "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": 0}))
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


class OnnxRanks:
    """The ranks this process hosts, each running its program as ONNX models (see module doc)."""

    def __init__(self, files: dict[int, SliceFile], world_size: int, process_count: int, target: str):
        import jax

        from dinb.models import MODELS, get_model

        check_installed()
        first = next(iter(files.values()))
        if first.model not in MODELS:
            raise ProviderError(
                f"{first.path}: provider 'tensorrt' runs the built-in models {sorted(MODELS)}, whose "
                f"per-rank programs are written out; {first.model!r} is not one. Use provider 'xla'."
            )
        model = get_model(first.model, **first.meta.get("model_config", {}))
        strategy = _strategy_of(first)
        name = model.strategy_name_of(strategy)
        program = model.rank_program(name, world_size) if name else None
        if program is None:
            raise ProviderError(
                f"{first.path}: provider 'tensorrt' runs the named strategies of {model.name!r} "
                f"({list(model.strategy_names)}); this export's layouts are none of them. Export with a "
                "named strategy, or use provider 'xla'."
            )
        odd = [m.name for m in first.inputs + first.outputs if m.dtype in ("float16", "bfloat16", "float64")]
        if odd:
            raise ProviderError(f"{first.path}: the ONNX path runs float32 exports; {odd} are not "
                                "float32. Export without --dtype, or use provider 'xla'.")
        self.model, self.strategy_name, self.program, self.world_size = model, name, program, world_size
        self.comm = _Mpi(world_size) if process_count > 1 else None
        self.inputs, self.outputs = first.inputs, first.outputs
        self.providers, self.notice = execution_providers(target, cache_root() / "tensorrt" / first.export_id)
        if self.notice:
            warnings.warn(self.notice, ProviderFallbackWarning, stacklevel=3)
        self.sessions: dict[int, list[Any]] = {}
        for rank, sf in files.items():
            specs = tuple(jax.ShapeDtypeStruct(m.layout.slice_shape(m.shape, m.name), m.dtype)
                          for m in self.inputs)
            self.sessions[rank] = self._convert(sf.params, specs, f"{model.name}_rank{rank}")
        first_session = next(s for s in next(iter(self.sessions.values())) if not isinstance(s, Collective))
        self.provider = first_session.get_providers()[0]

    def _convert(self, params: dict[str, np.ndarray], specs: tuple[Any, ...], name: str) -> list[Any]:
        """Each run of local steps as an ONNX Runtime session (weights inside as constants)."""
        import jax
        import onnxruntime as ort
        from jax2onnx import to_onnx

        stages: list[Any] = []
        for i, stage in enumerate(self.program.stages()):
            if not isinstance(stage, list):
                stages.append(stage)
                specs = _after(stage, specs, self.world_size)
                continue

            def run(*values: Any, steps: Sequence[Local] = tuple(stage)) -> tuple[Any, ...]:
                return run_locals(steps, params, values)

            with jax.disable_jit():  # nested jits (jax.nn.softmax) inline: one flat graph to convert
                proto = to_onnx(run, list(specs), model_name=f"{name}_stage{i}",
                                input_names=[f"v{j}" for j in range(len(specs))])
            options = ort.SessionOptions()
            options.log_severity_level = 3
            stages.append(ort.InferenceSession(proto.SerializeToString(), options, providers=self.providers))
            specs = tuple(jax.eval_shape(run, *specs))
        return stages

    def run(self, inputs_by_rank: dict[int, tuple[np.ndarray, ...]]) -> dict[int, tuple[np.ndarray, ...]]:
        """Every local rank's program on its input slices; the outputs of each local rank."""
        values = dict(inputs_by_rank)
        stages = len(next(iter(self.sessions.values())))
        for i in range(stages):
            step = self.sessions[next(iter(self.sessions))][i]
            if isinstance(step, (AllReduce, AllGather)):
                values = self._collect(step, values)
            else:
                values = {r: tuple(self.sessions[r][i].run(None, {f"v{j}": np.ascontiguousarray(v)
                                                                  for j, v in enumerate(vals)}))
                          for r, vals in values.items()}
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
        lines = [f"{self.model.name} ({self.strategy_name}) per rank, on {self.provider}:"]
        for stage in self.program.stages():
            if isinstance(stage, list):
                lines += [f"  onnx   {s.name}" for s in stage]
            else:
                what = "all-reduce" if isinstance(stage, AllReduce) else f"all-gather on axis {stage.axis}"
                lines.append(f"  {'mpi' if self.comm else 'numpy'}    {what} of value {stage.index}")
        return "\n".join(lines)


class _Mpi:
    """Collectives between rank processes with mpi4py (the job's processes are MPI's world)."""

    def __init__(self, world_size: int):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ProviderError(f"the ONNX path's collectives need mpi4py: {INSTALL}") from None
        self.comm = MPI.COMM_WORLD
        if self.comm.size != world_size:
            raise ProviderError(
                f"the ONNX path's collectives run over MPI, but MPI's world has {self.comm.size} "
                f"process(es) and the job {world_size} ranks; start the ranks with mpiexec -n "
                f"{world_size} (or notebook engines='mpi')"
            )

    def collect(self, step: Collective, value: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        if isinstance(step, AllReduce):
            out = np.empty_like(value)
            self.comm.Allreduce(value, out, op=MPI.SUM)
            return out
        parts = np.empty((self.comm.size, *value.shape), value.dtype)
        self.comm.Allgather(value, parts)
        return np.concatenate(list(parts), axis=step.axis)


def _after(step: Collective, specs: tuple[Any, ...], world: int) -> tuple[Any, ...]:
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


def _strategy_of(sf: SliceFile) -> Any:
    from dinb.strategy import Strategy

    return Strategy({n: m.layout for n, m in sf.param_meta().items()},
                    inputs=[m.layout for m in sf.inputs], outputs=[m.layout for m in sf.outputs])
