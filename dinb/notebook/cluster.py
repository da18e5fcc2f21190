"""Notebook ranks: N ipyparallel engines, each bound to a device and acting as one rank of one job.

``start_cluster(n)`` starts the engines through ipyparallel's launchers (MPI engines through
the ``mpiexec`` of the ``mpich`` wheel by default; ``engines="local"``, ``"ssh"`` or ``"slurm"``;
``hosts=`` spreads MPI or SSH engines over hosts) or attaches to running ones (``profile=`` or
``connection_file=``), asks each engine who it is (pid, host, MPI rank, its own address), picks
the JAX coordinator's address (127.0.0.1 when every rank shares one host, else rank 0's own
address) and a free port on rank 0's host, and has every engine join the job at once
(:func:`dinb.notebook.engine.join`: gloo, preemption service off, short init timeout).

Every SPMD call goes to all ranks together (a call sent to only some ranks hangs in the first
collective) and is watched with a finite timeout. While it waits, the client checks each rank:
a rank that died is named at once (the job cannot go on; ``restart()``), and a call that
outlives its timeout names the ranks that never reached the collective (stuck in their own
part) apart from the ranks waiting for them. Ranks on this host are watched through their
process ids; ranks on other hosts through a heartbeating connection to their predict socket
(:mod:`dinb.job.death_watch`), which is authenticated off loopback (:mod:`dinb.job.secure_socket`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dinb.errors import ClusterError, DinbError, RankFailedError
from dinb.job import addresses, remote_predict
from dinb.job.death_watch import DeathWatch
from dinb.job.secure_socket import ClientKeys, request_socket
from dinb.notebook import engine
from dinb.notebook.cluster_calls import ModelCalls, PredictResult, _remote_message
from dinb.notebook.cluster_launch import EngineLaunch

DEFAULT_TIMEOUT_S = 60.0
HEARTBEAT_MS = 100  # the ipyparallel hub's heartbeat period for the clusters dinb starts
HEARTBEAT_MISSES = 300  # an engine silent for HEARTBEAT_MS * HEARTBEAT_MISSES = 30 s is dropped
ENGINES = ("mpi", "local", "ssh", "slurm")
_current: RankCluster | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class RankCluster(EngineLaunch, ModelCalls):
    """N engines = N ranks. Use :func:`start_cluster`; every method is one call on all ranks."""

    def __init__(self, n: int = 2, engines: str = "mpi", devices: str = "cpu", profile: str | None = None,
                 connection_file: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 init_timeout_s: int = 30, hosts: list[str] | str | Path | None = None,
                 controller_ip: str | None = None, mpi_args: list[str] | None = None,
                 ssh_cmd: list[str] | None = None, warm: bool | None = None):
        """``engines``: the ipyparallel launcher (``mpi``: one ``mpiexec`` for all engines, with
        ``hosts`` written to its hostfile or given as one; ``ssh``: engines spread over
        ``hosts`` by ``ssh_cmd``; ``slurm``: engines in a Slurm job; ``local``). ``controller_ip``:
        where the ipyparallel controller listens (default: loopback when the engines are on this
        host, else this host's address on the route to them). ``mpi_args``: more ``mpiexec``
        options (a launcher, ``-iface``). ``warm``: fork the engines and the controller from a
        process that has imported them already (:mod:`dinb.notebook.warm_start`); None: where it
        applies (local engines, mpich's MPI engines on this host)."""
        if engines not in ENGINES:
            raise ClusterError(f"engines must be one of {list(ENGINES)}, not {engines!r}")
        if devices not in ("cpu", "gpu"):
            raise ClusterError(f"devices must be 'cpu' or 'gpu', not {devices!r}")
        if hosts is not None and engines not in ("mpi", "ssh"):
            raise ClusterError(f"hosts= spreads MPI or SSH engines; {engines!r} engines " + (
                "are placed by Slurm (give the nodes to salloc or sbatch)" if engines == "slurm" else
                "run on this host"))
        if engines == "ssh" and not hosts:
            raise ClusterError("ssh engines need hosts=[...] (the hosts to start them on)")
        self.n, self.engines, self.devices = n, engines, devices
        self.profile, self.connection_file = profile, connection_file
        self.timeout_s, self.init_timeout_s = timeout_s, init_timeout_s
        self.hosts, self.controller_ip = hosts, controller_ip
        self.mpi_args, self.ssh_cmd = list(mpi_args or []), ssh_cmd
        self.warm = warm
        self._cluster: Any = None
        self._client: Any = None
        self.engine_of: list[int] = []  # engine id of each rank
        self.pids: list[int] = []
        self.hostnames: list[str] = []  # each rank's host
        self.local: list[bool] = []  # whether each rank is on this host (its pid means something here)
        self.rank_addresses: list[str] = []  # each rank's own address (its predict socket's)
        self.coordinator: str | None = None
        self.endpoints: list[str] = []  # each rank's predict socket
        self.server_keys: list[str | None] = []  # its CURVE public key (None on loopback)
        self.device_names: list[str] = []
        self.model_dir: str | None = None
        self.pipeline: dict[str, Any] | None = None  # the loaded export's stages (None: one stage)
        self.roles = remote_predict.Roles(n, n)  # who takes inputs and who gives outputs
        self.last: PredictResult | None = None
        self.start_seconds: float | None = None
        self.start_marks: dict[str, float] = {}  # when the last start reached each step (wall clock, s)
        self._broken = False  # a rank died or got stuck: the job cannot be left politely
        self._watch: DeathWatch | None = None
        self._socks: list[Any] | None = None  # the fast predict path's sockets, one per rank
        self._keys: ClientKeys | None = None  # this client's CURVE keys (ranks off loopback)
        self._hostfile: str | None = None

    # ---- life cycle --------------------------------------------------------------------------
    def start(self) -> RankCluster:
        t0 = time.perf_counter()
        marks = self.start_marks = {"start": time.time()}
        import ipyparallel as ipp

        if self.profile or self.connection_file:
            if self.connection_file and not Path(self.connection_file).is_file():
                raise ClusterError(f"connection file {self.connection_file} does not exist; it is the "
                                   "controller's security/ipcontroller-client.json")
            by: dict[str, Any] = {"profile": self.profile}
            if self.profile and Path(self.profile).is_dir():  # a profile directory, not a name
                by = {"profile_dir": self.profile}
            if self.connection_file:
                self._client = ipp.Client(self.connection_file, timeout=self.init_timeout_s)
            else:
                self._client = ipp.Client(**by, timeout=self.init_timeout_s)
            self._client.wait_for_engines(self.n, timeout=self.init_timeout_s, interactive=False)
        else:
            controller = self._pick_controller_ip()
            where = {} if addresses.is_loopback(controller) else {
                "controller_ip": controller, "controller_location": controller}
            # The hub completes an engine's registration at its next heartbeat: every 3 s by
            # default, which was most of the start (6.0 of 7.4 s for 2 engines). Beats every
            # 0.1 s with 300 misses allowed keep the default's 30 s before an engine is dropped.
            # The engines import JAX on a thread while they register, and start right after the
            # controller (ipyparallel waits 1 s by default; the engines wait for its files anyway).
            self._cluster = ipp.Cluster(
                n=self.n, engines=self.engines, log_level=40, delay=0, **where,
                controller_args=[f"--HeartMonitor.period={HEARTBEAT_MS}",
                                 f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}"])
            self._configure_launcher(self._cluster.config)
            self._cluster.start_controller_sync()
            marks["controller"] = time.time()
            self._cluster.start_engines_sync()
            marks["engines launched"] = time.time()
            self._client = self._cluster.connect_client_sync()
            self._client.wait_for_engines(self.n, timeout=self.init_timeout_s, interactive=False)
        marks["registered"] = time.time()
        ids = sorted(self._client.ids)[: self.n]
        controller_host = urlsplit(self._client._config["registration"]).hostname or addresses.LOOPBACK
        client_host = addresses.own_address(controller_host)
        who = self._client[ids].apply_sync(engine.identify, client_host)
        marks["identified"] = time.time()
        ranks = [w["mpi_rank"] if w["mpi_rank"] is not None and w["mpi_size"] == self.n else i
                 for i, w in enumerate(who)]
        if sorted(ranks) != list(range(self.n)):
            ranks = list(range(self.n))
        order = sorted(range(self.n), key=lambda i: ranks[i])
        who = [who[i] for i in order]
        self.engine_of = [ids[i] for i in order]
        here = addresses.host_key()
        self.pids = [w["pid"] for w in who]
        self.hostnames = [w["host"] for w in who]
        self.local = [w["host_key"] == here for w in who]
        self.rank_addresses = [addresses.LOOPBACK if local else w["address"]
                               for local, w in zip(self.local, who)]
        self._watch = DeathWatch([pid if local else None for pid, local in zip(self.pids, self.local)])
        keys = [w["host_key"] for w in who]
        one_host = len(set(keys)) == 1
        host0 = addresses.LOOPBACK if one_host else who[0]["address"]
        port = self._all(engine.free_port, (host0,), what="picking the coordinator's port",
                         timeout_s=15, ranks=[0])[0]
        self.coordinator = coordinator = f"{host0}:{port}"
        local_rank = [keys[:r].count(keys[r]) for r in range(self.n)]
        joined = self._all(engine.join, lambda r: (r, self.n, coordinator, self.devices, self.init_timeout_s,
                                                   local_rank[r], keys.count(keys[r])),
                           timeout_s=self.init_timeout_s + 15, what="joining the job")
        self.device_names = [j["device"] for j in joined]
        marks["joined"] = time.time()
        self._connect_fast()
        marks["ready"] = time.time()
        self.start_seconds = time.perf_counter() - t0
        return self


    def _connect_fast(self) -> None:
        """Start every rank's predict socket (on its own address, CURVE off loopback), connect to
        them, and have the death watch follow the ranks of other hosts through them."""
        if any(not addresses.is_loopback(a) for a in self.rank_addresses):
            self._keys = ClientKeys()
        public = self._keys.public if self._keys else None
        served = self._all(engine.serve_fast, lambda r: (self.rank_addresses[r], public),
                           what="starting the predict servers")
        self.endpoints = [s["endpoint"] for s in served]
        self.server_keys = [s["server_key"] for s in served]
        self._socks = [request_socket(s["endpoint"], s["server_key"], self._keys) for s in served]
        for r, s in enumerate(served):
            if not self.local[r] and self._watch is not None:
                keys = self._keys
                self._watch.watch_remote(r, s["endpoint"], s["server_key"], keys and keys.public,
                                         keys and keys.secret)

    def stop(self) -> None:
        """Leave the JAX job on every rank, stop the engines, leave no process behind."""
        global _current
        if self._broken or not all(self._rank_alive(r) for r in range(len(self.pids))):
            # stuck or dead ranks: the job cannot be left, and a survivor blocks in its exit; end
            # this host's ranks first (the launcher ends the others with their engines). Local
            # engines otherwise wait out the launcher's grace period: 5 s of a restart, measured.
            self._kill_local()
        if self._client is not None:
            if all(self._rank_alive(r) for r in range(len(self.pids))):
                try:
                    self._all(engine.leave, timeout_s=15, what="leaving the job")
                except DinbError:  # a rank died meanwhile: the others block in the job's shutdown
                    self._kill_local()
            try:
                if self._cluster is not None:
                    # engines first: stopped together with the controller (stop_cluster), an
                    # engine that loses its hub waits out the launcher's grace period (3.6 s
                    # against 0.6 s for 2 engines)
                    self._cluster.stop_engines_sync()
                    self._cluster.stop_controller_sync()
                else:  # engines we attached to: the live ones stop; a dead one would never answer
                    alive = [e for r, e in enumerate(self.engine_of) if self._rank_alive(r)]
                    if alive:
                        self._client.shutdown(targets=alive, block=False)
            except Exception:  # a dead cluster may fail to stop cleanly; the pids are checked below
                pass
            try:
                self._client.close()
            except Exception:
                pass
        self._kill_local()
        for sock in self._socks or []:
            sock.close(linger=0)
        self._socks, self._keys = None, None
        if self._hostfile is not None:
            os.unlink(self._hostfile)
            self._hostfile = None
        self._client = self._cluster = None
        self.pids, self.model_dir, self.last, self._broken = [], None, None, False
        self.pipeline, self.roles = None, remote_predict.Roles(self.n, self.n)
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if _current is self:
            _current = None

    def restart(self) -> RankCluster:
        """Stop everything and start the same number of fresh ranks (reloading the model)."""
        global _current
        model_dir = self.model_dir
        self.stop()
        self.start()
        _current = self
        if model_dir:
            self.load(model_dir, show_progress=False)
        return self

    @property
    def running(self) -> bool:
        return self._client is not None

    def _kill_local(self) -> None:
        for pid, local in zip(self.pids, self.local):
            if local and _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _rank_alive(self, rank: int) -> bool:
        """A rank of this host: its process exists; of another host: its connection holds."""
        if self.local[rank]:
            return _alive(self.pids[rank])
        return self._watch is None or rank not in self._watch.died_at(wait_s=0)

    # ---- dispatch ----------------------------------------------------------------------------
    def _check_alive(self, what: str) -> None:
        """Name the rank whose engine process exited (the job cannot go on without it).

        When one rank dies, the others follow: the launcher ends them, its peers in a collective
        or a stage transfer fail, and rank 0 hosted the JAX coordinator. So several ranks can be
        dead at once. The rank that died first (:class:`DeathWatch`) is the cause. A follower
        exits at least its own teardown later (10 ms and more for a JAX process), so exits
        within 2 ms of the first count as one event; when rank 0 is among them, it is named as
        the cause and the others as ended by the job.
        """
        now = time.monotonic()
        gone = {r for r, pid in enumerate(self.pids) if self.local[r] and not _alive(pid)}
        watched = self._watch.died_at(gone) if self._watch else {}
        dead = {r: watched.get(r, now) for r in gone | watched.keys()}
        if not dead:
            return
        self._broken = True
        first = min(dead.values())
        cause = sorted(r for r, t in dead.items() if t - first < 0.002)  # died together: one event
        if 0 in cause:
            cause = [0]
        followers = [r for r in range(self.n) if r not in cause]
        pids = ", ".join(str(self.pids[r]) if self.local[r] else f"{self.pids[r]} on {self.hostnames[r]}"
                         for r in cause)
        how = "exited" if all(self.local[r] for r in cause) else "exited or its host stopped answering"
        message = f"rank(s) {cause} died during {what} (engine process {pids} {how})"
        if cause == [0] and followers:
            message += (f"; rank(s) {followers} were then ended by the job because rank 0 hosted its "
                        "coordinator")
        raise RankFailedError(message + "; the job cannot continue. Run `%dinfer cluster restart` "
                              "(RankCluster.restart()).", ranks=tuple(cause))

    def _all(self, fn: Callable[..., Any], args: Callable[[int], tuple] | tuple = (),
             timeout_s: float | None = None, what: str = "the call",
             on_poll: Callable[[list[Any]], None] | None = None,
             ranks: list[int] | None = None) -> list[Any]:
        """Call ``fn`` on every rank at once (or on ``ranks``, for calls that run no collective);
        per-rank results in rank order (finite timeout).

        ``on_poll(async_results)`` sees the calls while they run (for progress bars: each
        result's ``.data`` holds what its rank published, ``.ready()`` whether it finished).
        """
        if self._client is None:
            raise ClusterError("no cluster is running; start one with `%dinfer cluster start -n 2`")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        targets = list(range(self.n)) if ranks is None else ranks
        ars = []
        for r in targets:
            a = args(r) if callable(args) else args
            ars.append(self._client[self.engine_of[r]].apply_async(fn, *a))
        deadline = time.monotonic() + timeout_s
        while True:
            ready = sum(ar.ready() for ar in ars)
            if on_poll is not None:
                on_poll(ars)
            if ready == len(ars):
                break
            self._check_alive(what)
            if time.monotonic() > deadline:
                reached = [r for r, ar in zip(targets, ars)
                           if (ar.data or {}).get("phase") in ("collective", "done")]
                pending = [r for r, ar in zip(targets, ars) if not ar.ready()]
                stuck = [r for r in pending if r not in reached] or pending
                waiting = [r for r in pending if r not in stuck]
                self._broken = True
                raise RankFailedError(
                    f"rank(s) {stuck} did not finish {what} within {timeout_s:g} s"
                    + (f"; rank(s) {waiting} are waiting for them in the collective" if waiting else "")
                    + ". Those ranks are stuck; run `%dinfer cluster restart` (RankCluster.restart()).",
                    ranks=tuple(stuck))
            ars[0].wait(0.002)
        results, errors = [], {}
        for r, ar in zip(targets, ars):
            try:
                results.append(ar.get(0))
            except Exception as e:  # a remote error: report it with its rank
                errors[r] = _remote_message(e)
        if errors:
            detail = "; ".join(f"rank {r}: {m}" for r, m in errors.items())
            raise RankFailedError(f"{what} failed on rank(s) {sorted(errors)}: {detail}",
                                  ranks=tuple(sorted(errors)))
        return results


# ---- the current cluster (what the magics use) ---------------------------------------------------
def start_cluster(n: int = 2, engines: str = "mpi", devices: str = "cpu", **kw: Any) -> RankCluster:
    """Start N ranks and make them the current cluster. Errors if one is already running."""
    global _current
    if _current is not None and _current.running:
        raise ClusterError(
            f"a cluster of {_current.n} ranks is already running; `%dinfer cluster stop` (or "
            "restart) first"
        )
    _current = RankCluster(n, engines, devices, **kw).start()
    return _current


def current() -> RankCluster:
    """The running cluster, or a clear error."""
    if _current is None or not _current.running:
        raise ClusterError("no cluster is running; start one with `%dinfer cluster start -n 2`")
    return _current


def stop_cluster() -> None:
    if _current is not None:
        _current.stop()
