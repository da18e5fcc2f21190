"""What XLA makes of a strategy: compile it for N simulated devices and read the result.

The program is compiled exactly as a rank compiles it (:mod:`dinb.export` traces it,
:class:`dinb.Model` compiles it), but on N virtual CPU devices in a helper process, so no
cluster is needed and the notebook's own JAX (if any) is left alone: JAX fixes its device
count when it first starts, and the explorer needs any count. From the compiled program come:

* the partitioned HLO text, from which :mod:`dinb.explore.hlo` lists the collectives;
* ``flops``: XLA's cost analysis of one rank's program;
* ``argument/output/temp bytes``: XLA's memory analysis of one rank's buffers.

The helper (``python -m dinb.explore.xla_view``) is started on first use, kept for the next call, and
every request has a finite timeout; a helper that dies or hangs is replaced.
"""

from __future__ import annotations

import atexit
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinb.errors import DinbError
from dinb.explore.hlo import Collective, parse_collectives
from dinb.sharding.layout import Layout

DEFAULT_TIMEOUT_S = 120.0
MIN_DEVICES = 16


@dataclass(frozen=True)
class CompiledView:
    """One rank's view of a compiled SPMD program (all ranks run the same one)."""

    device_count: int
    hlo_text: str
    flops: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    compile_s: float
    collectives: list[Collective] = field(default_factory=list)
    sends: list[tuple[tuple[int, ...], str]] = field(default_factory=list)  # a stage's carry out


class XlaViewer:
    """A helper process with ``devices`` virtual CPU devices that compiles programs on request."""

    def __init__(self, devices: int = MIN_DEVICES, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.devices = max(int(devices), 1)
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        # the helper's stderr: a file with no name (unlinked at once), so nothing is left behind
        # however this process ends, and its tail is still there for error messages
        self._log = tempfile.TemporaryFile(prefix="dinb-xla-view-", suffix=".log")

    # ---- requests ----------------------------------------------------------------------------
    def compile_model(self, model: Any, strategy: Any, input_specs: Sequence[tuple[tuple[int, ...], str]],
                      param_specs: dict[str, tuple[tuple[int, ...], str]]) -> CompiledView:
        """Trace ``model`` under ``strategy`` (as :func:`dinb.export_distributed` does) and compile."""
        try:
            blob = pickle.dumps(model)
        except Exception as e:
            raise DinbError(
                f"model {getattr(model, 'name', model)!r} cannot be sent to the compiler process "
                f"({e}); define its class in an importable module, not in the notebook"
            ) from None
        request = ("model", blob, strategy.to_json(), list(input_specs), dict(param_specs))
        return self._request(request, strategy.device_num)

    def compile_stages(self, model: Any, strategy: Any, input_specs: Sequence[tuple[tuple[int, ...], str]],
                       param_specs: dict[str, tuple[tuple[int, ...], str]]) -> list[CompiledView]:
        """Each pipeline stage's program under ``strategy`` (as export traces it, for the whole
        batch), compiled for one stage's ranks; each view's ``sends`` are the values that stage
        hands the next."""
        try:
            blob = pickle.dumps(model)
        except Exception as e:
            raise DinbError(f"model {getattr(model, 'name', model)!r} cannot be sent to the compiler "
                            f"process ({e}); define its class in an importable module") from None
        request = ("stages", blob, strategy.to_json(), list(input_specs), dict(param_specs))
        return self._request(request, strategy.stage_device_num)

    def compile_export(self, slice_file: str | Path, device_count: int) -> CompiledView:
        """Compile the program stored in an export's slice file, for its rank count."""
        return self._request(("export", str(slice_file)), device_count)

    def close(self) -> None:
        """Stop the helper (a later request starts a new one); its log stays for error messages."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def shutdown(self) -> None:
        """Stop the helper and drop its log (at interpreter exit)."""
        self.close()
        self._log.close()

    # ---- the helper process ------------------------------------------------------------------
    def _request(self, request: tuple, device_count: int) -> CompiledView:
        if device_count > self.devices:
            self.close()
            self.devices = max(device_count, self.devices * 2)
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        t0 = time.perf_counter()
        try:
            _send(proc.stdin, (device_count, request))
            reply = _receive(proc.stdout, self.timeout_s)
        except TimeoutError:
            self.close()
            raise DinbError(
                f"compiling for {device_count} simulated devices took longer than {self.timeout_s:g} s; "
                "the compiler process was stopped (a smaller model or fewer devices compiles faster)"
            ) from None
        except (EOFError, BrokenPipeError, OSError):
            self.close()
            raise DinbError(f"the compiler process died; its log: {self._log_tail()}") from None
        status, payload = reply
        if status != "ok":
            raise DinbError(f"compiling for {device_count} simulated devices failed: {payload}")
        seconds = time.perf_counter() - t0
        if isinstance(payload, list):  # one view per pipeline stage
            return [CompiledView(device_count=device_count, compile_s=seconds, **p,  # type: ignore[return-value]
                                 collectives=parse_collectives(p["hlo_text"], device_count)) for p in payload]
        payload["compile_s"] = seconds
        return CompiledView(device_count=device_count, **payload,
                            collectives=parse_collectives(payload["hlo_text"], device_count))

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ, JAX_PLATFORMS="cpu", DINB_XLA_VIEW_DEVICES=str(self.devices))
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if "force_host_platform_device_count" not in f)
        self._proc = subprocess.Popen([sys.executable, "-m", "dinb.explore.xla_view"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env)
        return self._proc

    def _log_tail(self) -> str:
        try:
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            tail = os.pread(fd, 800, max(0, size - 800))  # pread leaves the helper's offset alone
            return tail.decode(errors="replace") or "(empty)"
        except (OSError, ValueError):
            return "(unreadable)"


_viewer: XlaViewer | None = None


def viewer() -> XlaViewer:
    """The process-wide helper, started on first use and stopped at exit."""
    global _viewer
    if _viewer is None:
        _viewer = XlaViewer()
        atexit.register(_viewer.shutdown)
    return _viewer


# ---- framing: 8-byte length, then a pickle ---------------------------------------------------
def _send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_exact(stream: Any, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    fd = stream.fileno()
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _receive(stream: Any, timeout_s: float | None = None) -> Any:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    (n,) = struct.unpack("<Q", _read_exact(stream, 8, deadline))
    return pickle.loads(_read_exact(stream, n, deadline))


# ---- the helper's side -----------------------------------------------------------------------
def _compile(program: bytes, param_metas: dict[str, Any], input_metas: list[Any],
             output_metas: list[Any], devices: list[Any]) -> dict[str, Any]:
    import jax
    from jax import export as jax_export

    from dinb.sharding.layout import one_mesh_shardings

    exported = jax_export.deserialize(bytearray(program))
    names = list(param_metas)
    layouts = ([param_metas[n].layout for n in names] + [m.layout for m in input_metas]
               + [m.layout for m in output_metas])
    shardings = one_mesh_shardings(layouts, devices)
    p_shard = dict(zip(names, shardings))
    x_shard = shardings[len(names):len(names) + len(input_metas)]
    o_shard = tuple(shardings[len(names) + len(input_metas):])
    jitted = jax.jit(exported.call, in_shardings=(p_shard, *x_shard), out_shardings=o_shard)
    args = ({n: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=p_shard[n]) for n, m in param_metas.items()},
            *[jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s) for m, s in zip(input_metas, x_shard)])
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    return {"hlo_text": str(compiled.as_text()), "flops": float(cost.get("flops", 0.0)),
            "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
            "output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
            "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0))}


def handle_request(request: tuple, devices: list[Any]) -> dict[str, Any] | list[dict[str, Any]]:
    from dinb.export.distributed import build_program
    from dinb.export.slicefile import TensorMeta, read_program
    from dinb.export.stage_programs import build_stage_programs
    from dinb.export.tracing import input_layouts
    from dinb.sharding.strategy import Strategy

    if request[0] == "stages":
        _, blob, strategy_json, input_specs, param_specs = request
        model = pickle.loads(blob)
        strategy = Strategy.from_json(strategy_json)
        input_specs = [(tuple(s), d) for s, d in input_specs]
        programs, metas, _ = build_stage_programs(model, param_specs, strategy, input_specs, ("cpu",), [1])
        views = []
        for s, (program, meta) in enumerate(zip(programs, metas)):
            params = {n: TensorMeta(n, tuple(param_specs[n][0]), param_specs[n][1], strategy[n])
                      for n in strategy.stage_params(s)}
            view = _compile(program[1], params, [TensorMeta.from_json(m) for m in meta["receives"]],
                            [TensorMeta.from_json(m) for m in meta["sends"]], devices)
            view["sends"] = [(tuple(m["shape"]), m["dtype"]) for m in meta["sends"]]
            views.append(view)
        return views

    if request[0] == "model":
        _, blob, strategy_json, input_specs, param_specs = request
        model = pickle.loads(blob)
        strategy = Strategy.from_json(strategy_json)
        input_specs = [(tuple(s), d) for s, d in input_specs]
        program, out_meta = build_program(model, param_specs, strategy, input_specs, platforms=("cpu",))
        params = {n: TensorMeta(n, tuple(s), d, strategy[n]) for n, (s, d) in param_specs.items()}
        ins = [TensorMeta(f"input_{i}", s, d, lay)
               for i, ((s, d), lay) in enumerate(zip(input_specs, input_layouts(strategy, input_specs)))]
        return _compile(program, params, ins, out_meta, devices)
    meta, program = read_program(request[1])
    params = {n: TensorMeta(n, tuple(p["shape"]), p["dtype"], Layout.from_json(p["layout"]))
              for n, p in meta["params"].items()}
    return _compile(program, params, [TensorMeta.from_json(m) for m in meta["inputs"]],
                    [TensorMeta.from_json(m) for m in meta["outputs"]], devices)


def serve() -> None:
    """The helper's loop: read a request from stdin, answer on stdout, until stdin closes."""
    import jax

    jax.config.update("jax_num_cpu_devices", int(os.environ.get("DINB_XLA_VIEW_DEVICES", MIN_DEVICES)))
    all_devices = sorted(jax.devices(), key=lambda d: d.id)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the reply stream
    while True:
        try:
            device_count, request = _receive(stdin)
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", handle_request(request, all_devices[:device_count]))
        except Exception as e:  # reported to the caller, who raises it with context
            reply = ("error", f"{type(e).__name__}: {e}")
        _send(stdout, reply)


if __name__ == "__main__":
    serve()
