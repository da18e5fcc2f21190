"""Notebook ranks: N ipyparallel engines, each bound to a device and acting as one rank of one job.

``start_cluster(n)`` starts the engines through ipyparallel's launchers (MPI engines through
the ``mpiexec`` of the ``mpich`` wheel by default; ``engines="local"``, ``"ssh"`` or ``"slurm"``;
``hosts=`` spreads MPI or SSH engines over hosts) or attaches to running ones (``profile=`` or
``connection_file=``), asks each engine who it is (pid, host, MPI rank, its own address), picks
the JAX coordinator's address (127.0.0.1 when every rank shares one host, else rank 0's own
address) and a free port on rank 0's host, and has every engine join the job at once
(:func:`dinb.engine.join`: gloo, preemption service off, short init timeout).

Every SPMD call goes to all ranks together (a call sent to only some ranks hangs in the first
collective) and is watched with a finite timeout. While it waits, the client checks each rank:
a rank that died is named at once (the job cannot go on; ``restart()``), and a call that
outlives its timeout names the ranks that never reached the collective (stuck in their own
part) apart from the ranks waiting for them. Ranks on this host are watched through their
process ids; ranks on other hosts through a heartbeating connection to their predict socket
(:mod:`dinb.death_watch`), which is authenticated off loopback (:mod:`dinb.secure_socket`).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from dinb import addresses, engine, remote_predict, wire
from dinb.death_watch import DeathWatch
from dinb.errors import DinbError, RankFailedError
from dinb.launchers import find_mpiexec, is_open_mpi
from dinb.secure_socket import ClientKeys, request_socket

DEFAULT_TIMEOUT_S = 60.0
HEARTBEAT_MS = 500  # the ipyparallel hub's heartbeat period for the clusters dinb starts
ENGINES = ("mpi", "local", "ssh", "slurm")
_current: RankCluster | None = None


class ClusterError(DinbError):
    """The cluster is missing, already running, or could not start."""


@dataclass
class PredictResult:
    """The outputs of one predict: one copy (all ranks agree) plus each rank's own view."""

    outputs: list[np.ndarray]
    per_rank: dict[int, list[np.ndarray]]
    agree: bool
    seconds: float


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


class _Published:
    """The final tokens in the shape of a running call's published data (see ``generate``)."""

    def __init__(self, tokens: Any, prompts: Any):
        single = len(prompts) > 0 and np.ndim(prompts[0]) == 0
        self.data = {"tokens": [tokens] if single else tokens}


class RankCluster:
    """N engines = N ranks. Use :func:`start_cluster`; every method is one call on all ranks."""

    def __init__(self, n: int = 2, engines: str = "mpi", devices: str = "cpu", profile: str | None = None,
                 connection_file: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 init_timeout_s: int = 30, hosts: list[str] | str | Path | None = None,
                 controller_ip: str | None = None, mpi_args: list[str] | None = None,
                 ssh_cmd: list[str] | None = None):
        """``engines``: the ipyparallel launcher (``mpi``: one ``mpiexec`` for all engines, with
        ``hosts`` written to its hostfile or given as one; ``ssh``: engines spread over
        ``hosts`` by ``ssh_cmd``; ``slurm``: engines in a Slurm job; ``local``). ``controller_ip``:
        where the ipyparallel controller listens (default: loopback when the engines are on this
        host, else this host's address on the route to them). ``mpi_args``: more ``mpiexec``
        options (a launcher, ``-iface``)."""
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
        self._broken = False  # a rank died or got stuck: the job cannot be left politely
        self._watch: DeathWatch | None = None
        self._socks: list[Any] | None = None  # the fast predict path's sockets, one per rank
        self._keys: ClientKeys | None = None  # this client's CURVE keys (ranks off loopback)
        self._hostfile: str | None = None

    # ---- life cycle --------------------------------------------------------------------------
    def start(self) -> RankCluster:
        import ipyparallel as ipp

        t0 = time.perf_counter()
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
            # 0.5 s with 60 misses allowed keep the default's 30 s before an engine is dropped.
            # The engines import JAX on a thread while they register, and start right after the
            # controller (ipyparallel waits 1 s by default; the engines wait for its files anyway).
            self._cluster = ipp.Cluster(
                n=self.n, engines=self.engines, log_level=40, delay=0, **where,
                controller_args=[f"--HeartMonitor.period={HEARTBEAT_MS}",
                                 "--HeartMonitor.max_heartmonitor_misses=60"])
            self._configure_launcher(self._cluster.config)
            self._cluster.start_cluster_sync()
            self._client = self._cluster.connect_client_sync()
            self._client.wait_for_engines(self.n, timeout=self.init_timeout_s, interactive=False)
        ids = sorted(self._client.ids)[: self.n]
        controller_host = urlsplit(self._client._config["registration"]).hostname or addresses.LOOPBACK
        client_host = addresses.own_address(controller_host)
        who = self._client[ids].apply_sync(engine.identify, client_host)
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
        self._connect_fast()
        self.start_seconds = time.perf_counter() - t0
        return self

    def _pick_controller_ip(self) -> str:
        """Where the controller listens: the given address; loopback when every engine runs on
        this host; else this host's address on the route to the first other host."""
        if self.controller_ip:
            return addresses.split_address(self.controller_ip, "controller_ip")[0]
        if self.engines == "slurm":
            source = addresses.route_source("192.0.2.1")  # the interface of the default route
            if source is None:
                raise ClusterError("Slurm engines need the controller on an address the nodes reach; "
                                   "pass controller_ip='ADDRESS of this host'")
            return source
        mine = addresses.local_addresses()
        for host in self._host_list():
            ip = addresses.split_address(host, "hosts")[0]
            if not addresses.is_loopback(ip) and ip not in mine:
                return addresses.own_address(ip)
        return addresses.LOOPBACK

    def _host_list(self) -> list[str]:
        if self.hosts is None:
            return []
        if isinstance(self.hosts, (str, Path)):
            path = Path(self.hosts)
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise ClusterError(f"hostfile {path} cannot be read ({e.strerror or e})") from None
            names = [ln.split("#")[0].split()[0].split(":")[0] for ln in lines if ln.split("#")[0].strip()]
            if not names:
                raise ClusterError(f"hostfile {path} names no host")
            return names
        return [str(h) for h in self.hosts]

    def _configure_launcher(self, config: Any) -> None:
        """ipyparallel's launcher configuration for ``engines`` and ``hosts``."""
        config.EngineLauncher.engine_args = [
            "--IPEngine.startup_command=import dinb.engine; dinb.engine.preload()"]
        if self.engines == "mpi":
            mpiexec = _mpiexec()
            config.MPILauncher.mpi_cmd = [mpiexec]
            hostfile = str(self.hosts) if isinstance(self.hosts, (str, Path)) else None
            if self.hosts and hostfile is None:
                fd, self._hostfile = tempfile.mkstemp(prefix="dinb-hosts-", suffix=".txt")
                with os.fdopen(fd, "w") as f:
                    f.write("".join(f"{h}\n" for h in self._host_list()))
                hostfile = self._hostfile
            config.MPILauncher.mpi_args = _mpi_launch_args(mpiexec, hostfile) + self.mpi_args
        elif self.engines == "ssh":
            hosts = self._host_list()
            counts = {h: 0 for h in hosts}
            for r in range(self.n):  # round robin, as a hostfile without counts
                counts[hosts[r % len(hosts)]] += 1
            config.SSHEngineSetLauncher.engines = {h: c for h, c in counts.items() if c}
            if self.ssh_cmd:
                config.SSHLauncher.ssh_cmd = list(self.ssh_cmd)

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
        if self._broken:  # stuck or dead ranks cannot leave the job: end them first (this
            self._kill_local()  # host's; the launcher ends the others with their engines)
        if self._client is not None:
            if all(self._rank_alive(r) for r in range(len(self.pids))):
                try:
                    self._all(engine.leave, timeout_s=15, what="leaving the job")
                except DinbError:
                    pass
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

    # ---- the Lite-shaped steps ---------------------------------------------------------------
    def context(self, target: str = "cpu", provider: str = "xla") -> list[str]:
        """Build every rank's ``Context`` (target, provider)."""
        return self._all(engine.set_context, (target, provider), what="building the context")

    def load(self, model_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
        """Each rank loads its own slice file from ``model_dir`` and compiles the program.

        Two bars count the ranks that have read their slices and those that have compiled.
        """
        model_dir = str(Path(model_dir).resolve())
        from tqdm.auto import tqdm

        bars = {phase: tqdm(total=self.n, desc=desc, leave=False, disable=not show_progress)
                for phase, desc in (("read", "slices read"), ("compiled", "ranks compiled"))}

        def count(ars: list[Any]) -> None:
            for phase, bar in bars.items():
                done = sum(ar.ready() or (ar.data or {}).get(phase) is not None for ar in ars)
                bar.update(done - bar.n)

        try:
            infos = self._all(engine.load, (model_dir,), what=f"loading {model_dir}", on_poll=count)
        finally:
            for bar in bars.values():
                bar.close()
        self.model_dir, self.last = model_dir, None
        self.pipeline = infos[0].get("pipeline")
        self.roles = remote_predict.Roles.of(self.n, self.pipeline)
        return infos[0]

    def predict(self, *inputs: Any, timeout_s: float | None = None, fast: bool = True,
                micro_batches: int | None = None) -> PredictResult:
        """Send the same inputs to the first stage's ranks (every rank without pipeline stages,
        as in the seeds), run the program, gather.

        The fast path sends the inputs over each rank's own socket and gets back the outputs of
        the first rank of the last stage plus every other last-stage rank's output checksum (so
        agreement is checked without moving the data); :meth:`outputs` fetches each rank's own
        copy when asked. ``fast=False`` goes through ipyparallel (``apply`` on every engine) and
        returns every rank's outputs. ``micro_batches`` cuts a pipelined predict into that many
        micro-batches (see :meth:`dinb.Model.predict`).
        """
        arrays = [np.ascontiguousarray(x) for x in inputs]
        t0 = time.perf_counter()
        roles = self.roles
        if fast:
            first, agree = self._fast_predict(arrays, self.timeout_s if timeout_s is None else timeout_s,
                                              micro_batches=micro_batches)
            per_rank: dict[int, list[np.ndarray]] = {roles.data_rank: first}
        else:
            outs = self._all(engine.predict, (arrays, micro_batches), timeout_s=timeout_s, what="predict")
            per_rank = dict(enumerate(outs))
            first = outs[roles.data_rank]
            agree = all(len(outs[r]) == len(first)
                        and all(np.array_equal(a, b) for a, b in zip(outs[r], first))
                        for r in roles.output_ranks)
        self.last = PredictResult(list(first), per_rank, agree, time.perf_counter() - t0)
        return self.last

    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, timeout_s: float | None = None,
                 on_token: Callable[[int, int], None] | None = None, **sampling: Any) -> dict[str, Any]:
        """Every rank runs :meth:`dinb.Model.generate` with the same prompts (token ids) and
        options; ``on_token(row, token)`` sees rank 0's tokens while the ranks still work (they
        publish them as they come). Returns ``tokens`` (rank 0's, as ``Model.generate`` gives
        them), ``agree`` (every rank picked the same) and rank 0's ``timings``."""
        shown: list[int] = []

        def stream(ars: list[Any]) -> None:
            rows = (ars[0].data or {}).get("tokens") or []
            for row, toks in enumerate(rows):
                while len(shown) <= row:
                    shown.append(0)
                for token in toks[shown[row]:]:
                    if on_token is not None:
                        on_token(row, int(token))
                shown[row] = len(toks)

        outs = self._all(engine.generate, (prompt_ids, max_new_tokens, sampling), timeout_s=timeout_s,
                         what="generate", on_poll=stream)
        stream([_Published(outs[0]["tokens"], prompt_ids)])
        return {"tokens": outs[0]["tokens"], "agree": all(o["tokens"] == outs[0]["tokens"] for o in outs),
                "timings": outs[0]["timings"]}

    def outputs(self) -> PredictResult:
        """The last predict's result, with every rank's own outputs."""
        if self.last is None:
            raise ClusterError("no predict has run yet; run `%dinfer predict EXPR` first")
        if len(self.last.per_rank) < self.n:
            outs = self._all(engine.outputs, timeout_s=30, what="gathering outputs")
            self.last.per_rank = dict(enumerate(outs))
        return self.last

    def ping(self, timeout_s: float = 10) -> float:
        """Round trip of an empty message to every rank over the fast path, in seconds."""
        t0 = time.perf_counter()
        self._fast_predict([], timeout_s, noop=True)
        return time.perf_counter() - t0

    def _fast_predict(self, arrays: list[np.ndarray], timeout_s: float, noop: bool = False,
                      micro_batches: int | None = None) -> tuple[list[np.ndarray], bool]:
        import zmq

        if self._client is None:
            raise ClusterError("no cluster is running; start one with `%dinfer cluster start -n 2`")
        assert self._socks is not None  # made at start
        roles = self.roles
        extra = {"micro_batches": micro_batches} if micro_batches is not None else {}
        for r, sock in enumerate(self._socks):
            header, takes = roles.header(r, noop=noop, **extra)
            sock.send_multipart(wire.pack(header, arrays if takes else []), copy=False)
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        replies: dict[int, list[Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.n:
            events = dict(poller.poll(5))
            for r, sock in enumerate(self._socks):
                if r not in replies and sock in events:
                    replies[r] = sock.recv_multipart(copy=False)
            if len(replies) == self.n:
                break
            self._check_alive("predict")
            if time.monotonic() > deadline:
                self._broken = True
                pending = [r for r in range(self.n) if r not in replies]
                raise RankFailedError(
                    f"rank(s) {pending} did not answer predict within {timeout_s:g} s; "
                    "run `%dinfer cluster restart` (RankCluster.restart()).", ranks=tuple(pending))
        heads, data, errors = remote_predict.read_replies(replies)
        if errors:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
            raise RankFailedError(f"predict failed on rank(s) {sorted(errors)}: {detail}",
                                  ranks=tuple(sorted(errors)))
        return data[roles.data_rank], remote_predict.agreement(heads, roles.output_ranks)

    def timeline(self) -> list[Any]:
        """When each rank computed each micro-batch in the last pipelined predict (see
        :meth:`dinb.Model.timeline`); empty without pipeline stages."""
        from dinb.pipeline import StageEvent

        rows = self._all(engine.timeline, timeout_s=30, what="gathering the timeline")
        return sorted((StageEvent(*e) for per_rank in rows for e in per_rank), key=lambda e: e.start)

    def strategy(self) -> Any:
        """The loaded model's strategy (from the export's ``strategy.json``)."""
        from dinb.strategy import Strategy

        if self.model_dir is None:
            raise ClusterError("no model is loaded; run `%dinfer load DIR` first")
        path = Path(self.model_dir)
        return Strategy.load(path / "strategy.json" if path.is_dir() else path.parent / "strategy.json")

    def status(self) -> list[dict[str, Any]]:
        """One row per rank: rank, pid, device, resident memory, what is loaded (alive or not)."""
        rows = []
        for r, pid in enumerate(self.pids):
            rows.append({"rank": r, "pid": pid, "alive": self._rank_alive(r), "host": self.hostnames[r],
                         "address": self.rank_addresses[r],
                         "device": self.device_names[r] if r < len(self.device_names) else None})
        if rows and all(row["alive"] for row in rows):
            for row, st in zip(rows, self._all(engine.status, timeout_s=10, what="status")):
                row.update(kind=st["kind"], device_mem=st["device_mem"], rss_mib=st["rss_mib"],
                           provider=st["provider"], collectives=st["collectives"], loaded=st["loaded"])
        return rows

    def serve(self, distributed_address: str, worker_timeout_s: float = 300.0) -> str:
        """Make every rank an Agent of the servable whose Distributed Worker listens at
        ``distributed_address`` (:func:`dinb.serving.distributed.start_servable`, in this kernel or
        elsewhere); the ranks serve from a thread until :meth:`stop_serving`. Returns the job id."""
        if self.model_dir is None:
            raise ClusterError("no model is loaded; run `%dinfer load DIR` first, then serve it")
        job = f"notebook-{self.engine_of[0]}-{self.pids[0]}"
        self._all(engine.serve_agent, (distributed_address, job, worker_timeout_s),
                  what="starting the agents")
        return job

    def stop_serving(self) -> None:
        """The ranks stop serving (the worker sees them go)."""
        self._all(engine.stop_agent, what="stopping the agents")

    def execute(self, code: str, timeout_s: float | None = None) -> dict[int, str]:
        """Run a cell on every rank; returns each rank's printed output."""
        return dict(enumerate(self._all(_run_cell, (code,), timeout_s=timeout_s, what="the cell")))


def _run_cell(code: str) -> str:
    """Executed in an engine: run ``code`` in the engine's namespace, capture what it prints."""
    import contextlib
    import io

    import __main__

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<dinfer cell>", "exec"), __main__.__dict__)
    return buf.getvalue()


def _remote_message(e: Exception) -> str:
    ename, evalue = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
    return f"{ename}: {evalue}"


def _mpiexec() -> str:
    return find_mpiexec() or "mpiexec"


def _mpi_launch_args(mpiexec: str, hostfile: str | None) -> list[str]:
    """The engines' ``mpiexec`` flags, in the dialect of the MPI it belongs to.

    mpich's hydra: ``-disable-auto-cleanup`` asks it not to end the other ranks when one dies (it
    ends them anyway, measured, so the death watch orders the exits), ``-f`` names the hostfile.
    Open MPI (what GPU clusters ship): ``--hostfile``, and ``--allow-run-as-root`` when root;
    hydra's flags would make it refuse to start.
    """
    if is_open_mpi(mpiexec):
        args = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return args + (["--hostfile", hostfile] if hostfile else [])
    return ["-disable-auto-cleanup"] + (["-f", hostfile] if hostfile else [])


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
