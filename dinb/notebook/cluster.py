"""Notebook ranks: N ipyparallel engines, each bound to a device and acting as one rank of one job.

``start_cluster(n)`` starts the engines through ipyparallel's launchers (MPI engines through
the ``mpiexec`` of the ``mpich`` wheel by default; ``engines="local"``, ``"ssh"`` or ``"slurm"``;
``hosts=`` spreads MPI or SSH engines over hosts) or attaches to running ones (``profile=`` or
``connection_file=``), asks each engine who it is (pid, host, MPI rank, its own address), picks
the JAX coordinator's address (127.0.0.1 when every rank shares one host, else rank 0's own
address) and a free port on rank 0's host, and has every engine join the job at once
(:func:`dinb.notebook.engine.join`: gloo, preemption service off, short init timeout).

A cluster is three parts: how its engines start (:class:`~dinb.notebook.launch.Launch`), how
its started ranks are called, every rank at once and watched (:class:`~dinb.notebook.dispatch.
RankCalls`), and what they have loaded with the calls that use it (:class:`~dinb.notebook.
cluster_calls.ModelCalls`); :class:`RankCluster` starts and stops them and offers their calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dinb.errors import ClusterError, DinbError
from dinb.job import addresses
from dinb.job.death_watch import DeathWatch
from dinb.job.secure_socket import ClientKeys, request_socket
from dinb.notebook import engine
from dinb.notebook.cluster_calls import ModelCalls, PredictResult
from dinb.notebook.dispatch import RankCalls
from dinb.notebook.launch import Launch

DEFAULT_TIMEOUT_S = 60.0
HEARTBEAT_MS = 100  # the ipyparallel hub's heartbeat period for the clusters dinb starts
HEARTBEAT_MISSES = 300  # an engine silent for HEARTBEAT_MS * HEARTBEAT_MISSES = 30 s is dropped
ENGINES = ("mpi", "local", "ssh", "slurm")
_current: RankCluster | None = None


class RankCluster:
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
        self.n, self.devices = n, devices
        self.launch = Launch(n, engines, hosts, controller_ip, list(mpi_args or []), ssh_cmd, warm)
        self.profile, self.connection_file = profile, connection_file
        self.timeout_s, self.init_timeout_s = timeout_s, init_timeout_s
        self._cluster: Any = None
        self._client: Any = None
        self._calls: RankCalls | None = None
        self.model = ModelCalls(n)
        self.engine_of: list[int] = []  # engine id of each rank
        self.pids: list[int] = []
        self.hostnames: list[str] = []  # each rank's host
        self.local: list[bool] = []  # whether each rank is on this host (its pid means something here)
        self.rank_addresses: list[str] = []  # each rank's own address (its predict socket's)
        self.coordinator: str | None = None
        self.endpoints: list[str] = []  # each rank's predict socket
        self.server_keys: list[str | None] = []  # its CURVE public key (None on loopback)
        self.device_names: list[str] = []
        self.start_seconds: float | None = None
        self.start_marks: dict[str, float] = {}  # when the last start reached each step (wall clock, s)
        self._keys: ClientKeys | None = None  # this client's CURVE keys (ranks off loopback)

    @property
    def engines(self) -> str:
        return self.launch.engines

    @property
    def calls(self) -> RankCalls:
        """How the started ranks are called (a clear error when none run)."""
        if self._calls is None or self._client is None:
            raise ClusterError("no cluster is running; start one with `%dinfer cluster start -n 2`")
        return self._calls

    # ---- life cycle --------------------------------------------------------------------------
    def start(self) -> RankCluster:
        """Start (or attach to) the engines, learn who each is, and have every one join the job."""
        t0 = time.perf_counter()
        marks = self.start_marks = {"start": time.time()}
        if self.profile or self.connection_file:
            self._attach()
        else:
            self._launch(marks)
        marks["registered"] = time.time()
        who = self._identify()
        marks["identified"] = time.time()
        self._join([w["host_key"] for w in who], who[0]["address"])
        marks["joined"] = time.time()
        self._connect_fast()
        marks["ready"] = time.time()
        self.start_seconds = time.perf_counter() - t0
        return self

    def _attach(self) -> None:
        """Connect to running engines (``profile=`` or ``connection_file=``)."""
        import ipyparallel as ipp

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

    def _launch(self, marks: dict[str, float]) -> None:
        """Start the controller and the engines (see :class:`~dinb.notebook.launch.Launch`)."""
        import ipyparallel as ipp

        controller = self.launch.controller_address()
        where = {} if addresses.is_loopback(controller) else {
            "controller_ip": controller, "controller_location": controller}
        # The hub completes an engine's registration at its next heartbeat: every 3 s by default,
        # which was most of the start (6.0 of 7.4 s for 2 engines). Beats every 0.1 s with 300
        # misses allowed keep the default's 30 s before an engine is dropped. The engines import
        # JAX on a thread while they register, and start right after the controller (ipyparallel
        # waits 1 s by default; the engines wait for its files anyway).
        self._cluster = ipp.Cluster(
            n=self.n, engines=self.engines, log_level=40, delay=0, **where,
            controller_args=[f"--HeartMonitor.period={HEARTBEAT_MS}",
                             f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}"])
        self.launch.configure(self._cluster.config)
        self._cluster.start_controller_sync()
        marks["controller"] = time.time()
        self._cluster.start_engines_sync()
        marks["engines launched"] = time.time()
        self._client = self._cluster.connect_client_sync()
        self._client.wait_for_engines(self.n, timeout=self.init_timeout_s, interactive=False)

    def _identify(self) -> list[dict[str, Any]]:
        """Ask every engine who it is; order them by MPI rank (engine ids are not trusted) and
        make the calls that watch them."""
        ids = sorted(self._client.ids)[: self.n]
        controller_host = urlsplit(self._client._config["registration"]).hostname or addresses.LOOPBACK
        who = self._client[ids].apply_sync(engine.identify, addresses.own_address(controller_host))
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
        watch = DeathWatch([pid if local else None for pid, local in zip(self.pids, self.local)])
        self._calls = RankCalls(self._client, self.engine_of, self.pids, self.hostnames, self.local,
                                self.timeout_s, watch)
        return who

    def _join(self, keys: list[str], address0: str) -> None:
        """Every engine joins one JAX job, rank 0 hosting its coordinator (loopback on one host)."""
        host0 = addresses.LOOPBACK if len(set(keys)) == 1 else address0
        port = self.calls.call(engine.free_port, (host0,), what="picking the coordinator's port",
                               timeout_s=15, ranks=[0])[0]
        self.coordinator = coordinator = f"{host0}:{port}"
        local_rank = [keys[:r].count(keys[r]) for r in range(self.n)]

        def join_args(r: int) -> tuple[Any, ...]:
            return (r, self.n, coordinator, self.devices, self.init_timeout_s, local_rank[r],
                    keys.count(keys[r]))

        joined = self.calls.call(engine.join, join_args, timeout_s=self.init_timeout_s + 15,
                                 what="joining the job")
        self.device_names = [j["device"] for j in joined]

    def _connect_fast(self) -> None:
        """Start every rank's predict socket (on its own address, CURVE off loopback), connect to
        them, and have the death watch follow the ranks of other hosts through them."""
        if any(not addresses.is_loopback(a) for a in self.rank_addresses):
            self._keys = ClientKeys()
        public = self._keys.public if self._keys else None
        calls = self.calls
        served = calls.call(engine.serve_fast, lambda r: (self.rank_addresses[r], public),
                            what="starting the predict servers")
        self.endpoints = [s["endpoint"] for s in served]
        self.server_keys = [s["server_key"] for s in served]
        calls.socks = [request_socket(s["endpoint"], s["server_key"], self._keys) for s in served]
        for r, s in enumerate(served):
            if not self.local[r]:
                keys = self._keys
                calls.watch.watch_remote(r, s["endpoint"], s["server_key"], keys and keys.public,
                                         keys and keys.secret)

    def stop(self) -> None:
        """Leave the JAX job on every rank, stop the engines, leave no process behind."""
        global _current
        calls = self._calls
        if calls is not None and (calls.broken or not all(calls.alive(r) for r in range(calls.n))):
            # stuck or dead ranks: the job cannot be left, and a survivor blocks in its exit; end
            # this host's ranks first (the launcher ends the others with their engines). Local
            # engines otherwise wait out the launcher's grace period: 5 s of a restart, measured.
            calls.kill_local()
        if self._client is not None:
            self._leave_and_stop(calls)
        if calls is not None:
            calls.kill_local()
            calls.close()
        self.launch.close()
        self._calls, self._keys, self._client, self._cluster = None, None, None, None
        self.pids, self.model = [], ModelCalls(self.n)
        if _current is self:
            _current = None

    def _leave_and_stop(self, calls: RankCalls | None) -> None:
        """Every live rank leaves the job; then the engines stop, then the controller."""
        if calls is not None and all(calls.alive(r) for r in range(calls.n)):
            try:
                calls.call(engine.leave, timeout_s=15, what="leaving the job")
            except DinbError:  # a rank died meanwhile: the others block in the job's shutdown
                calls.kill_local()
        try:
            if self._cluster is not None:
                # engines first: stopped together with the controller (stop_cluster), an engine
                # that loses its hub waits out the launcher's grace period (3.6 s against 0.6 s
                # for 2 engines)
                self._cluster.stop_engines_sync()
                self._cluster.stop_controller_sync()
            elif calls is not None:  # engines we attached to: the live ones stop; a dead one never answers
                alive = [e for r, e in enumerate(self.engine_of) if calls.alive(r)]
                if alive:
                    self._client.shutdown(targets=alive, block=False)
        except Exception:  # a dead cluster may fail to stop cleanly; the pids are checked after
            pass
        try:
            self._client.close()
        except Exception:
            pass

    def restart(self) -> RankCluster:
        """Stop everything and start the same number of fresh ranks (reloading the model)."""
        global _current
        model_dir = self.model.model_dir
        self.stop()
        self.start()
        _current = self
        if model_dir:
            self.load(model_dir, show_progress=False)
        return self

    @property
    def running(self) -> bool:
        return self._client is not None

    def _rank_alive(self, rank: int) -> bool:
        return self._calls is not None and self._calls.alive(rank)

    # ---- what the ranks run (see dinb.notebook.cluster_calls) --------------------------------------
    @property
    def model_dir(self) -> str | None:
        """The export the ranks have loaded (None: nothing loaded)."""
        return self.model.model_dir

    @property
    def pipeline(self) -> dict[str, Any] | None:
        """The loaded export's stages (None: one stage)."""
        return self.model.pipeline

    @property
    def roles(self) -> Any:
        """Which ranks take inputs and which give outputs (:class:`dinb.job.remote_predict.Roles`)."""
        return self.model.roles

    @property
    def last(self) -> PredictResult | None:
        """The last predict's result."""
        return self.model.last

    def context(self, target: str = "cpu", provider: str = "xla") -> list[str]:
        """Build every rank's ``Context`` (target, provider)."""
        return self.model.context(self.calls, target, provider)

    def load(self, model_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
        """Each rank loads its own slice file from ``model_dir`` and compiles the program (two
        progress bars: the ranks that have read their slices, those that have compiled)."""
        return self.model.load(self.calls, model_dir, show_progress)

    def predict(self, *inputs: Any, timeout_s: float | None = None, fast: bool = True,
                micro_batches: int | None = None) -> PredictResult:
        """The same inputs to the first stage's ranks, the program on every rank, the outputs
        gathered (see :meth:`ModelCalls.predict`)."""
        return self.model.predict(self.calls, *inputs, timeout_s=timeout_s, fast=fast,
                                  micro_batches=micro_batches)

    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, timeout_s: float | None = None,
                 on_token: Callable[[int, int], None] | None = None, **sampling: Any) -> Any:
        """:meth:`dinb.Model.generate` on every rank; the tokens as it returns them (see
        :meth:`ModelCalls.generate`)."""
        return self.model.generate(self.calls, prompt_ids, max_new_tokens, timeout_s=timeout_s,
                                   on_token=on_token, **sampling)

    @property
    def last_generation(self) -> dict[str, Any] | None:
        """Rank 0's tokens and timings of the last generate."""
        return self.model.last_generation

    def outputs(self) -> PredictResult:
        """The last predict's result, with every rank's own outputs."""
        return self.model.outputs(self.calls)

    def ping(self, timeout_s: float = 10) -> float:
        """Round trip of an empty message to every rank over the fast path, in seconds."""
        return self.model.ping(self.calls, timeout_s)

    def timeline(self) -> list[Any]:
        """When each rank computed each micro-batch in the last pipelined predict."""
        return self.model.timeline(self.calls)

    def strategy(self) -> Any:
        """The loaded model's strategy (from the export's ``strategy.json``)."""
        return self.model.strategy()

    def status(self) -> list[dict[str, Any]]:
        """One row per rank: rank, pid, device, resident memory, what is loaded (alive or not)."""
        rows = [{"rank": r, "pid": pid, "alive": self._rank_alive(r), "host": self.hostnames[r],
                 "address": self.rank_addresses[r],
                 "device": self.device_names[r] if r < len(self.device_names) else None}
                for r, pid in enumerate(self.pids)]
        return self.model.status(self.calls, rows) if self._calls is not None else rows

    def serve(self, distributed_address: str, worker_timeout_s: float = 300.0) -> str:
        """Every rank becomes an Agent of the servable whose Distributed Worker listens at
        ``distributed_address``; returns the job id (see :meth:`ModelCalls.serve`)."""
        return self.model.serve(self.calls, distributed_address, worker_timeout_s)

    def stop_serving(self) -> None:
        """The ranks stop serving (the worker sees them go)."""
        self.model.stop_serving(self.calls)

    def execute(self, code: str, timeout_s: float | None = None) -> dict[int, str]:
        """Run a cell on every rank; returns each rank's printed output."""
        return self.model.execute(self.calls, code, timeout_s)


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
