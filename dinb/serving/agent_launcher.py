"""The agent processes of one machine, started together and relaunched together when one dies.

Two ways to start them (``startup_agents(..., launcher=)``):

* ``"mpiexec"`` (the default for CPU agents where mpiexec is found): one MPI job,
  ``mpiexec -n 1 python -m dinb serve-agent --rank 0 ... : -n 1 ... --rank 1 ...``. The agents
  are then MPI's processes, so each runs its rank's own program with ``mpi4py``'s collectives
  (``collectives = mpi``, :mod:`dinb.runtime.runners.rank_steps`) instead of the SPMD program over
  gloo: the Megatron MLP's all-reduce costs ~0.03 ms instead of ~0.8 ms on CPU.
* ``"processes"`` (GPUs, or no mpiexec): one process per rank, joined by the JAX coordinator
  that rank 0 hosts; XLA's collectives (NCCL on GPUs, gloo on CPUs).

Either way a process that exits is seen within 0.1 s: the agents of an MPI job are watched
through pidfds by :class:`dinb.job.death_watch.DeathWatch` (they are mpiexec's grandchildren), which
also orders the exits, so the rank that died first is the one named to the worker. The
launcher then ends the job's other ranks and, with ``restart="always"``, starts a new job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from dinb.errors import DinbError
from dinb.job.launchers import find_mpiexec, is_open_mpi

log = logging.getLogger("dinb.serving")
PIDS_TIMEOUT_S = 60.0  # how long the agents of an MPI job may take to appear under mpiexec


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, grandchildren, ...), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


class AgentLauncher:
    """The agent processes of this machine (see the module docstring and ``startup_agents``)."""

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
        launcher: str = "auto",
        key_file: Path | None = None,
    ):
        self.address, self.files, self.target, self.host = address, files, target, host
        self.log_dir = log_dir
        self.start_port, self.restart, self.max_restarts = start_port, restart, max_restarts
        self.worker_timeout_s, self.key_file = worker_timeout_s, key_file
        self.mpiexec = find_mpiexec() if launcher in ("auto", "mpiexec") else None
        if launcher == "mpiexec" and self.mpiexec is None:
            raise DinbError("launcher='mpiexec': no mpiexec found (install dinb's dependencies, the mpich "
                            "wheel, or put one on PATH); or use launcher='processes'")
        if launcher not in ("auto", "mpiexec", "processes"):
            raise DinbError(f"launcher must be 'auto', 'mpiexec' or 'processes', not {launcher!r}")
        use_mpi = launcher == "mpiexec" or (launcher == "auto" and target == "cpu" and len(files) > 1)
        self.launcher = "mpiexec" if use_mpi and self.mpiexec else "processes"
        self.procs: list[subprocess.Popen[bytes]] = []  # the agents, or the one mpiexec
        self._agent_pids: list[int] = []
        self._watch: Any = None  # a DeathWatch on an MPI job's agents
        self.restarts = 0
        self.job = ""
        self.done = threading.Event()
        self.error: str | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._notify: Any = None  # a socket to the worker, to report a dead rank at once

    @property
    def pids(self) -> list[int]:
        """Each agent's process id, in rank order (waits for an MPI job's agents to appear)."""
        if self.launcher == "processes":
            return [p.pid for p in self.procs]
        with self._lock:
            return list(self._mpi_pids())

    def start(self) -> None:
        self._launch()
        threading.Thread(target=self._monitor, daemon=True, name="dinb-agent-launcher").start()

    # ---- launching -----------------------------------------------------------------------------
    def _agent_args(self) -> list[str]:
        return [sys.executable, "-m", "dinb", "serve-agent", "--distributed-address", self.address,
                "--world", str(len(self.files)), "--job", self.job, "--target", self.target,
                "--worker-timeout", str(self.worker_timeout_s),
                *(["--key-file", str(self.key_file)] if self.key_file else [])]

    def _launch(self) -> None:
        self.job = uuid.uuid4().hex[:12]
        self._agent_pids = []
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
        if self.launcher == "mpiexec":
            self._launch_mpi(env)
        else:
            self._launch_processes(env)
        log.info("started %d agents (job %s, %s)", len(self.files), self.job, self.launcher)

    def _launch_processes(self, env: dict[str, str]) -> None:
        from dinb.job.ranks import free_port

        port = (
            next(p for p in range(self.start_port, self.start_port + 1000) if _free(self.host, p))
            if self.start_port
            else free_port(self.host)
        )
        cmd = [*self._agent_args(), "--coordinator", f"{self.host}:{port}"]
        self.procs = []
        for r, f in enumerate(self.files):
            out = self._log_file(r)
            try:
                self.procs.append(subprocess.Popen(cmd + ["--rank", str(r), "--model-file", str(f)], env=env,
                                                   stdout=out, stderr=subprocess.STDOUT if out else None))
            finally:
                if out is not None:
                    out.close()  # the agent has its own copy

    def _launch_mpi(self, env: dict[str, str]) -> None:
        """One MPI job, one rank per file (MPMD: ``-n 1 cmd : -n 1 cmd ...``); each agent writes its
        own log file when ``log_dir`` is given."""
        assert self.mpiexec is not None
        root = ["--allow-run-as-root"] if is_open_mpi(self.mpiexec) and os.geteuid() == 0 else []
        cmd: list[str] = [self.mpiexec, *root]
        for r, f in enumerate(self.files):
            log_file = [] if self.log_dir is None else ["--log-file", str(self._log_path(r))]
            cmd += [*([":"] if r else []), "-n", "1", *self._agent_args(), "--rank", str(r),
                    "--model-file", str(f), *log_file]
        out = None if self.log_dir is None else open(self._log_path("mpiexec"), "ab")  # its own notices
        try:
            self.procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT if out else None)]
        finally:
            if out is not None:
                out.close()

    def _mpi_pids(self) -> list[int]:
        """The MPI job's agents by rank, found below mpiexec; watched from then on."""
        if self._agent_pids:
            return self._agent_pids
        mpiexec, n = self.procs[0], len(self.files)
        deadline = time.monotonic() + PIDS_TIMEOUT_S
        while True:
            found: dict[int, int] = {}
            for pid in descendants(mpiexec.pid):
                args = _cmdline(pid)
                if "serve-agent" in args and "--rank" in args and args[0] == sys.executable:
                    found[int(args[args.index("--rank") + 1])] = pid
            if len(found) == n:
                break
            if mpiexec.poll() is not None or time.monotonic() > deadline:
                how = "still runs" if mpiexec.poll() is None else f"exited with {mpiexec.returncode}"
                raise DinbError(f"the agents' mpiexec job {self.job} started ranks {sorted(found)} of {n} "
                                f"within {PIDS_TIMEOUT_S:g} s (mpiexec {how})")
            time.sleep(0.02)
        from dinb.job.death_watch import DeathWatch

        self._agent_pids = [found[r] for r in range(n)]
        self._watch = DeathWatch(list(self._agent_pids))
        return self._agent_pids

    def _log_path(self, rank: int | str) -> Path:
        assert self.log_dir is not None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / (f"agent_{rank}.log" if isinstance(rank, int) else f"{rank}.log")

    def _log_file(self, rank: int) -> Any:
        """Where an agent's output goes: ``log_dir/agent_{rank}.log`` (appended), else None (this
        process's own output)."""
        return None if self.log_dir is None else open(self._log_path(rank), "ab")

    # ---- watching ------------------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self.done.is_set():
            time.sleep(0.1)
            with self._lock:
                if self._stopping:
                    continue
                try:
                    dead, codes = self._exits()
                except DinbError as e:  # an MPI job whose agents never appeared
                    dead, codes = list(range(len(self.files))), {}
                    log.error("%s", e)
                if dead is None:
                    continue
                if not dead:  # the server told every agent to stop
                    self.done.set()
                    return
                log.error("agent rank(s) %s exited (%s); ending the other ranks of job %s", dead,
                          ", ".join(f"rank {r}: {codes.get(r, 'ended')}" for r in dead), self.job)
                for r in dead:  # the worker hears it now, not after the heartbeat timeout
                    self._tell_worker({"type": "rank_died", "job": self.job, "rank": r, "code": codes.get(r)})
                self._end_all()
                if self.restart == "always" and self.restarts < self.max_restarts:
                    self.restarts += 1
                    log.warning("relaunching the agents (%d of at most %d)", self.restarts, self.max_restarts)
                    self._launch()
                else:
                    self.error = f"agent rank(s) {dead} exited" + (
                        f" with {[codes[r] for r in dead]}" if all(r in codes for r in dead) else "")
                    self.done.set()

    def _exits(self) -> tuple[list[int] | None, dict[int, int]]:
        """``(None, {})`` while the agents run; ``([], codes)`` when all stopped cleanly; else the
        ranks that died, the first first, with the exit codes known."""
        if self.launcher == "processes":
            codes = [p.poll() for p in self.procs]
            if all(c is None for c in codes):
                return None, {}
            if all(c == 0 for c in codes):
                return [], {}
            dead = [r for r, c in enumerate(codes) if c not in (None, 0)]
            return (dead or None), {r: codes[r] for r in dead}  # type: ignore[misc]
        pids = self._mpi_pids()
        died = self._watch.died_at(wait_s=0)
        code = self.procs[0].poll()
        if not died and code is None:
            return None, {}
        if code is None:  # a rank is gone: was it told to stop (mpiexec then ends with 0)?
            try:
                code = self.procs[0].wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        if code == 0:
            return [], {}
        died = self._watch.died_at(wait_s=0.2)
        order = sorted(died, key=died.get) or list(range(len(pids)))  # type: ignore[arg-type]
        return order, {}

    def _tell_worker(self, header: dict[str, Any]) -> None:
        import zmq

        from dinb.job import wire

        if self._notify is None:
            from dinb.serving.servable_key import keys_for

            self._notify = zmq.Context.instance().socket(zmq.DEALER)
            keys = keys_for(self.address, self.key_file, "the agents' launcher")
            if keys is not None:
                keys.as_agent(self._notify)
            self._notify.setsockopt(zmq.LINGER, 500)
            self._notify.connect(f"tcp://{self.address}")
        try:
            self._notify.send_multipart(wire.pack(header), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # no worker listening: it finds out by the heartbeats

    # ---- ending --------------------------------------------------------------------------------
    def _end_all(self, grace_s: float = 3.0) -> None:
        agents = list(self._agent_pids)
        # An MPI job's agents get SIGTERM themselves, so they leave as told (exit 0) and mpiexec
        # ends after them; SIGTERM to mpiexec would kill them, and it would report a failed job.
        targets = [pid for pid in agents if self.job in _cmdline(pid)] if agents else []
        for pid in targets:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not targets:
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if targets:  # the agents did not end mpiexec in time: end it
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=1.0)
                        continue
                    except subprocess.TimeoutExpired:
                        pass
                p.kill()
                p.wait(timeout=5)
        for pid in agents:  # an MPI job's ranks outlive a killed mpiexec
            if self.job in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def stop(self, wait_s: float = 0.0) -> None:
        """End every agent process: wait up to ``wait_s`` for them to leave by themselves (they were
        told to stop), then SIGTERM, then SIGKILL after 3 s."""
        with self._lock:
            self._stopping = True
            deadline = time.monotonic() + wait_s
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
            self._end_all()
            self.done.set()
        if self._notify is not None:
            self._notify.close(linger=0)
            self._notify = None

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
