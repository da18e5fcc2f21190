"""MindSpore Serving's ``distributed`` functions: declare a servable, start it, start its agents.

In a servable's ``servable_config.py``::

    model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=False)

In the server script (Main and the Distributed Worker)::

    distributed.start_servable(servable_dir, "matmul", distributed_address="127.0.0.1:6200")
    server.start_grpc_server("127.0.0.1:5500")
    server.start_restful_server("127.0.0.1:1500")

In the agents' script (one Agent process per rank's slice file)::

    distributed.startup_agents("127.0.0.1:6200", ["model/matmul0.dinb", "model/matmul1.dinb"])

MindSpore's ``rank_table_json_file`` is accepted and checked against ``rank_size``, and
``group_config_files`` are accepted; dinb needs neither (JAX/XLA's collectives replace HCCL, and
the agents find each other through the JAX coordinator that rank 0 hosts).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinb.errors import DinbError, SliceFileError
from dinb.serving import register
from dinb.serving.register import DistributedModel, ServableError, ServableSpec

log = logging.getLogger("dinb.serving")


def declare_servable(
    rank_size: int,
    stage_size: int = 1,
    with_batch_dim: bool = True,
    without_batch_dim_inputs: int | Sequence[int] | None = None,
) -> DistributedModel:
    """Declare the servable's model: ``rank_size`` agents (ranks) in ``stage_size`` pipeline stages.

    ``stage_size > 1`` serves an export with that many pipeline stages (``python -m dinb export
    --pipeline-stages``): the worker sends each request to the first stage's ranks only and takes
    the result from the last stage's, whose ranks must agree. Agents of an export with another
    stage count are refused at registration, naming both counts.

    ``with_batch_dim``: the model's first input axis is the batch, and concurrent requests are
    merged along it; ``without_batch_dim_inputs``: the indices of inputs without that axis.
    """
    if not isinstance(rank_size, int) or rank_size < 1:
        raise ServableError(f"rank_size must be a positive number of ranks, got {rank_size!r}")
    if not isinstance(stage_size, int) or stage_size < 1 or rank_size % stage_size:
        raise ServableError(f"stage_size {stage_size!r} must divide rank_size {rank_size}")
    skip = (
        (without_batch_dim_inputs,)
        if isinstance(without_batch_dim_inputs, int)
        else tuple(without_batch_dim_inputs or ())
    )
    return register.declare(DistributedModel(rank_size, stage_size, bool(with_batch_dim), skip))


def load_servable(servable_directory: str | Path, servable_name: str) -> ServableSpec:
    """Run ``{servable_directory}/{servable_name}/servable_config.py`` and collect what it declares."""
    path = Path(servable_directory) / servable_name / "servable_config.py"
    if not path.is_file():
        raise ServableError(
            f"{path} does not exist: a servable {servable_name!r} is a folder of "
            f"{servable_directory} holding servable_config.py"
        )
    spec = ServableSpec(servable_name)
    module_spec = importlib.util.spec_from_file_location(f"dinb_servable_{servable_name}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    register._collecting = spec
    try:
        module_spec.loader.exec_module(module)
    except DinbError:
        raise
    except Exception as e:
        raise ServableError(f"{path} failed: {type(e).__name__}: {e}") from e
    finally:
        register._collecting = None
    if spec.model is None:
        raise ServableError(f"{path} declares no model: call distributed.declare_servable(rank_size=...)")
    if not spec.methods:
        raise ServableError(f"{path} registers no method: decorate one with @register.register_method(...)")
    return spec


def rank_table_devices(path: str | Path) -> int:
    """The number of devices a MindSpore rank table lists."""
    try:
        table = json.loads(Path(path).read_text())
        return sum(len(server["device"]) for server in table["server_list"])
    except FileNotFoundError:
        raise ServableError(f"rank table {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServableError(f"{path} is not a MindSpore rank table (server_list[].device[]): {e}") from None


def start_servable(
    servable_directory: str | Path,
    servable_name: str,
    rank_table_json_file: str | None = None,
    version_number: int = 1,
    distributed_address: str = "127.0.0.1:6200",
    wait_agents_time_in_seconds: float = 0,
    *,
    batch_delay_ms: float = 2.0,
    max_queue: int = 1024,
    heartbeat_timeout_s: float = 1.5,
    request_timeout_s: float = 60.0,
    handle_sigterm: bool = True,
) -> None:
    """Load the servable and start its Distributed Worker at ``distributed_address``; return once
    all ``rank_size`` agents have registered.

    ``wait_agents_time_in_seconds``: how long to wait for them; 0 keeps MindSpore's meaning (no
    limit), saying every 5 s which ranks are still missing. ``batch_delay_ms``: how long the first
    request of a batch waits for others to merge with; ``max_queue``: requests waiting at most.
    ``handle_sigterm``: in the main thread, SIGTERM drains and stops the server (as MindSpore's does).
    """
    from dinb.serving.main import Main, stop_on_sigterm

    spec = load_servable(servable_directory, servable_name)
    assert spec.model is not None
    if rank_table_json_file is not None:
        devices = rank_table_devices(rank_table_json_file)
        if devices != spec.model.rank_size:
            raise ServableError(
                f"{rank_table_json_file} lists {devices} devices but servable {servable_name!r} "
                f"declares rank_size={spec.model.rank_size}"
            )
    if handle_sigterm:
        stop_on_sigterm()
    Main.get().add_servable(
        spec,
        distributed_address,
        version_number,
        wait_agents_time_in_seconds or None,
        batch_delay_ms,
        max_queue,
        heartbeat_timeout_s,
        request_timeout_s,
    )


# ---- agents --------------------------------------------------------------------------------------
def startup_agents(
    distributed_address: str,
    model_files: Sequence[str | Path],
    group_config_files: Sequence[str | Path] | None = None,
    agent_start_port: int = 7000,
    agent_ip: str | None = None,
    rank_start: int | None = None,
    *,
    target: str = "cpu",
    restart: str = "always",
    max_restarts: int = 3,
    worker_timeout_s: float = 300.0,
    log_dir: str | Path | None = None,
    block: bool = True,
) -> AgentLauncher:
    """Start one Agent process per slice file on this machine: rank r loads ``model_files[r]``.

    The agents join one JAX job (rank 0 hosts its coordinator on the first free port from
    ``agent_start_port``, on ``agent_ip`` or 127.0.0.1), register with the worker at
    ``distributed_address`` and serve. ``restart="always"`` relaunches all of them (a new job)
    when one dies, at most ``max_restarts`` times; ``"never"`` leaves them down. ``log_dir``
    collects each agent's output in ``agent_{rank}.log`` (default: this process's). ``block`` waits
    until the agents stop (the server stopped them, or SIGTERM / Ctrl-C here); otherwise the
    returned :class:`AgentLauncher` runs them in the background.
    """
    files = [Path(f) for f in model_files]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise SliceFileError(f"startup_agents needs one slice file per rank; missing: {missing or 'all'}")
    if group_config_files is not None:
        if len(group_config_files) != len(files):
            raise DinbError(f"{len(group_config_files)} group_config_files for {len(files)} model_files")
        gone = [str(g) for g in group_config_files if not Path(g).is_file()]
        if gone:
            raise DinbError(f"group config file(s) {gone} do not exist")
    if rank_start not in (None, 0):
        raise DinbError(
            f"rank_start={rank_start}: agents of one servable on several machines are not supported "
            "yet; start all ranks' agents on one machine (rank_start=None)"
        )
    if restart not in ("always", "never"):
        raise DinbError(f"restart must be 'always' or 'never', not {restart!r}")
    launcher = AgentLauncher(
        distributed_address,
        files,
        target,
        agent_ip or "127.0.0.1",
        agent_start_port,
        restart,
        max_restarts,
        worker_timeout_s,
        Path(log_dir) if log_dir is not None else None,
    )
    launcher.start()
    if block:
        launcher.wait()
    return launcher


class AgentLauncher:
    """The agent processes of this machine, relaunched together when one dies (see startup_agents)."""

    def __init__(
        self,
        address: str,
        files: list[Path],
        target: str,
        host: str,
        start_port: int,
        restart: str,
        max_restarts: int,
        worker_timeout_s: float,
        log_dir: Path | None = None,
    ):
        self.address, self.files, self.target, self.host = address, files, target, host
        self.log_dir = log_dir
        self.start_port, self.restart, self.max_restarts = start_port, restart, max_restarts
        self.worker_timeout_s = worker_timeout_s
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self.job = ""
        self.done = threading.Event()
        self.error: str | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._notify: Any = None  # a socket to the worker, to report a dead rank at once

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> None:
        self._launch()
        threading.Thread(target=self._monitor, daemon=True, name="dinb-agent-launcher").start()

    def _launch(self) -> None:
        from dinb.ranks import free_port

        self.job = uuid.uuid4().hex[:12]
        port = (
            next(p for p in range(self.start_port, self.start_port + 1000) if _free(self.host, p))
            if self.start_port
            else free_port(self.host)
        )
        n = len(self.files)
        cmd = [
            sys.executable,
            "-m",
            "dinb",
            "serve-agent",
            "--distributed-address",
            self.address,
            "--world",
            str(n),
            "--coordinator",
            f"{self.host}:{port}",
            "--job",
            self.job,
            "--target",
            self.target,
            "--worker-timeout",
            str(self.worker_timeout_s),
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
        self.procs = []
        for r, f in enumerate(self.files):
            out = self._log_file(r)
            try:
                self.procs.append(
                    subprocess.Popen(
                        cmd + ["--rank", str(r), "--model-file", str(f)],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT if out else None,
                    )
                )
            finally:
                if out is not None:
                    out.close()  # the agent has its own copy
        log.info("started %d agents (job %s, pids %s)", n, self.job, self.pids)

    def _log_file(self, rank: int) -> Any:
        """Where an agent's output goes: ``log_dir/agent_{rank}.log`` (appended), else None (this
        process's own output)."""
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"agent_{rank}.log", "ab")

    def _monitor(self) -> None:
        while not self.done.is_set():
            time.sleep(0.1)
            with self._lock:
                codes = [p.poll() for p in self.procs]
                if self._stopping or all(c is None for c in codes):
                    continue
                if all(c == 0 for c in codes):  # the server told every agent to stop
                    self.done.set()
                    return
                dead = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if not dead:
                    continue  # some stopped cleanly, the others follow
                log.error(
                    "agent rank(s) %s exited (%s); ending the other ranks of job %s",
                    dead,
                    ", ".join(f"rank {r}: {codes[r]}" for r in dead),
                    self.job,
                )
                for r in dead:  # the worker hears it now, not after the heartbeat timeout
                    self._tell_worker({"type": "rank_died", "job": self.job, "rank": r, "code": codes[r]})
                self._end_all()
                if self.restart == "always" and self.restarts < self.max_restarts:
                    self.restarts += 1
                    log.warning("relaunching the agents (%d of at most %d)", self.restarts, self.max_restarts)
                    self._launch()
                else:
                    self.error = f"agent rank(s) {dead} exited with {[codes[r] for r in dead]}"
                    self.done.set()

    def _tell_worker(self, header: dict[str, Any]) -> None:
        import zmq

        from dinb import wire

        if self._notify is None:
            self._notify = zmq.Context.instance().socket(zmq.DEALER)
            self._notify.setsockopt(zmq.LINGER, 500)
            self._notify.connect(f"tcp://{self.address}")
        try:
            self._notify.send_multipart(wire.pack(header), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # no worker listening: it finds out by the heartbeats

    def _end_all(self, grace_s: float = 3.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def stop(self) -> None:
        """End every agent process (SIGTERM, then SIGKILL after 3 s)."""
        with self._lock:
            self._stopping = True
            self._end_all()
            self.done.set()

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the agents stop; SIGTERM or Ctrl-C here stops them."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
        try:
            self.done.wait(timeout_s)
        except KeyboardInterrupt:
            self.stop()
        if self.error:
            raise DinbError(self.error)


def _free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
