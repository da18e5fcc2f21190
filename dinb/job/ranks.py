"""Bootstrap of one rank: bind the device, configure collectives, join the job.

All of it must happen before any other JAX call in the process. Three ways to run N ranks:

* ``mpiexec -n N python -m dinb run ...``: N processes, one device each; MPI gives each its rank,
  rank 0 picks the coordinator's address and a free port and broadcasts them, then every process
  joins one JAX job (``jax.distributed.initialize``) whose collectives run over gloo (CPU) or NCCL
  (GPU). The ranks may be on several hosts (a hostfile): see :mod:`dinb.job.addresses`.
* notebook engines (ipyparallel) do the same with the rank handed in by the cluster.
* simulated: one process with N virtual CPU devices (``simulate=N``); same program, same slices.

Known traps handled here: the coordinator binds one address (127.0.0.1 on one host, never every
interface), gloo listens on the rank's own address (not whatever the host name resolves to), the
preemption service is off (it swallows SIGTERM), the port is picked free by rank 0 (a busy port
crashes the coordinator), and the join has a short timeout (a missing rank aborts the process).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from dinb.errors import DinbError, RankFailedError
from dinb.job import addresses
from dinb.job.addresses import free_port
from dinb.job.launchers import GpuChoice, choose_gpu, host_gpu_count, slurm_coordinator, slurm_world
from dinb.job.mpi_world import mpi_coordinator, mpi_world

DEFAULT_INIT_TIMEOUT_S = 30
DEFAULT_AGREE_TIMEOUT_S = 60

_job: Job | None = None


@dataclass
class Job:
    """This process's view of the job: its rank(s), the world, the devices in rank order."""

    process_index: int
    process_count: int
    target: str
    simulate: int | None
    devices: list[Any] = field(default_factory=list)
    agree_timeout_s: float = DEFAULT_AGREE_TIMEOUT_S
    coordinator: str | None = None  # host:port of the JAX coordinator (rank 0 hosts it)
    gpu: GpuChoice | None = None  # the GPU this process's rank computes on (target "gpu")
    addresses: list[str] = field(default_factory=list)  # each process's own address, by process
    _step: int = 0

    @property
    def world_size(self) -> int:
        """Number of ranks (= devices) in the job."""
        return len(self.devices)

    @property
    def local_ranks(self) -> list[int]:
        """The ranks this process hosts (one under mpiexec, all of them when simulated)."""
        return [r for r, d in enumerate(self.devices) if d.process_index == self.process_index]

    def describe_addresses(self) -> str:
        """Where the job listens: the coordinator and each process's own address."""
        if self.process_count == 1:
            return "addresses: one process, no sockets"
        where = (f"every rank on {self.addresses[0]}" if len(set(self.addresses)) == 1 else
                 ", ".join(f"rank {r} on {a}" for r, a in enumerate(self.addresses)))
        return f"addresses: coordinator {self.coordinator} (rank 0); {where}"

    def device_of(self, rank: int) -> Any:
        return self.devices[rank]

    def allgather(self, topic: str, value: str, timeout_s: float | None = None) -> list[str]:
        """Every process publishes ``value`` for ``topic``; returns all values by process.

        Goes through the JAX coordinator's key-value store (no collective, no MPI), with a
        finite timeout: processes that do not answer in time are named in a
        :class:`RankFailedError`.
        """
        if self.process_count == 1:
            return [value]
        from jax._src.distributed import global_state

        client = global_state.client
        self._step += 1
        key = f"dinb/{self._step}/{topic}"
        client.key_value_set(f"{key}/{self.process_index}", value)
        timeout = timeout_s if timeout_s is not None else self.agree_timeout_s
        deadline = time.monotonic() + timeout
        values: list[str] = []
        missing: list[int] = []
        for p in range(self.process_count):
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                values.append(client.blocking_key_value_get(f"{key}/{p}", left_ms))
            except Exception:
                missing.append(p)
                values.append("")
        if missing:
            raise RankFailedError(
                f"{topic}: rank(s) {missing} did not answer within {timeout:.0f} s; they are "
                "dead or stuck. Restart the job.",
                tuple(missing),
            )
        return values

    def agree(self, topic: str, error: str | None, timeout_s: float | None = None) -> None:
        """Every process reports ``error`` (None = fine) for ``topic``; raise if any failed.

        Runs before any collective that a failed rank would leave hanging: every rank learns
        who failed and why, instead of waiting forever in the collective.
        """
        values = self.allgather(topic, "ok" if error is None else "error:" + error, timeout_s)
        failures = {p: v[len("error:"):] for p, v in enumerate(values) if v != "ok"}
        if failures:
            ranks = tuple(failures)
            first = next(iter(failures.values()))
            more = "" if len(failures) == 1 else f" (and {len(failures) - 1} more)"
            raise RankFailedError(f"{topic} failed on rank(s) {list(ranks)}: {first}{more}", ranks)


__all__ = ["Job", "current_job", "free_port", "init", "mpi_world", "shutdown"]


def _gloo_listens_on(address: str) -> None:
    """Make JAX's gloo collectives listen on ``address``: by default gloo resolves the host name,
    which on one machine may give a LAN address and on a namespace or a container no address."""
    from jax._src import xla_bridge

    make = xla_bridge._jax.make_gloo_tcp_collectives
    make = getattr(make, "__wrapped__", make)

    def on_address(*args: Any, **kw: Any) -> Any:
        return make(*args, hostname=address, **kw)

    on_address.__wrapped__ = make  # type: ignore[attr-defined]
    xla_bridge._jax.make_gloo_tcp_collectives = on_address


def _wait_for_coordinator(address: str, rank: int, timeout_s: float, own: str) -> None:
    """Wait until rank 0's coordinator accepts connections, then join at the first try.

    JAX's client retries a refused connection only after about a second, so a rank that asks
    before rank 0 is listening (ranks start together) made every join take 1.15 s instead of
    0.05 s.
    """
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                where = "" if addresses.is_loopback(own) else (
                    f" from {own} (host {socket.gethostname()}); check that this host reaches rank 0's "
                    "address, or name one it reaches with --coordinator-address")
                raise RankFailedError(
                    f"rank {rank} could not reach the JAX coordinator at {address} within "
                    f"{timeout_s:g} s; rank 0 hosts it: check that rank 0 started and is alive{where}",
                    ranks=(0,)) from None
            time.sleep(0.005)


def _backends_initialized() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def _check_distinct_gpus(job: Job) -> None:
    """Two ranks of one host on one GPU (a CUDA_VISIBLE_DEVICES of one entry exported to every
    rank): NCCL would fail at the first collective; name the ranks now."""
    assert job.gpu is not None
    where = job.allgather("gpu", f"{socket.gethostname()}/{job.gpu.physical}")
    first: dict[str, int] = {}
    for rank, key in enumerate(where):
        if key in first:
            raise DinbError(
                f"ranks {first[key]} and {rank} both compute on GPU {key.split('/', 1)[1]} of host "
                f"{key.split('/', 1)[0]}; give each rank its own GPU (leave CUDA_VISIBLE_DEVICES unset, "
                "or list one GPU per local rank in it)"
            )
        first[key] = rank


def _share_cores(local_rank: int, ranks_here: int) -> None:
    """CPU ranks sharing a machine each get their own share of its cores, as a GPU rank gets its
    own device: rank ``i`` of ``n`` here is pinned to cores ``i*k .. i*k + k - 1`` (``k`` =
    cores // n), so XLA sizes its thread pool to ``k`` and ranks computing at the same time
    (pipeline stages, or the parts of a tensor-parallel layer) do not fight over every core.
    Left alone when the launcher already bound the process to fewer cores, with
    ``DINB_CPU_BIND=none``, and when a share would be a single core: the rank's collective
    threads (gloo's, MPI's) then wait behind its own compute (2 tensor-parallel ranks on 2 cores:
    7.9 ms a predict pinned, 4.7 ms not). With one core or less each, Eigen's own thread pool
    only oversubscribes the cores (measured: about 5% slower predict for 2 ranks on 2 cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    total = os.cpu_count() or 1
    share = total // max(1, ranks_here)
    if os.environ.get("DINB_CPU_BIND", "cores") != "none" and len(cores) == total and share >= 2:
        os.sched_setaffinity(0, cores[local_rank * share:(local_rank + 1) * share])
    if share <= 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()


def init(
    target: str = "cpu",
    simulate: int | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    coordinator: str | None = None,
    device_id: int | None = None,
    init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S,
    agree_timeout_s: float = DEFAULT_AGREE_TIMEOUT_S,
    coordinator_address: str | None = None,
    config_coordinator_address: str | None = None,
    local_rank: int | None = None,
    local_size: int | None = None,
) -> Job:
    """Make this process a rank (or, with ``simulate=N``, all N ranks) and return the job.

    Under mpiexec the rank and world come from MPI; ``process_index``/``process_count`` plus
    ``coordinator`` ("host:port") let another launcher (notebook engines) hand them in, with
    ``local_rank``/``local_size`` (this process among those on its host). Calling again returns
    the same job; asking for a different world is an error (JAX cannot leave and rejoin a job:
    start new processes).

    Under mpiexec rank 0 hosts the coordinator at ``coordinator_address`` ("host" or
    "host:port"; else ``$DINB_COORDINATOR_ADDRESS``, else ``config_coordinator_address``), else
    on 127.0.0.1 when all ranks share one host, else on its address that routes to the others.
    """
    global _job
    if target not in ("cpu", "gpu"):
        raise DinbError(f"target must be 'cpu' or 'gpu', got {target!r}")
    if _job is not None:
        _job = _rejoin(_job, target, simulate, process_count, agree_timeout_s)
        return _job
    world = mpi_world() if process_count is None else None
    who = _who(world, process_index, process_count, local_rank, local_size, coordinator,
               coordinator_address, config_coordinator_address)
    if simulate is not None and who.count > 1:
        raise DinbError(
            f"simulate={simulate} runs all ranks in one process, but this process is rank {who.index} of "
            f"{who.count} launched processes; drop --simulate under mpiexec")
    gpu = _configure(target, who, simulate, device_id)
    own = addresses.LOOPBACK
    if who.count > 1:
        if who.coordinator is None:
            if world is None:
                raise DinbError("process_count > 1 without MPI needs coordinator='host:port'")
            choice = addresses.coordinator_choice(coordinator_address, config_coordinator_address)
            who.coordinator = mpi_coordinator(choice, multi_host=who.local_size < who.count)
        own = _join(who, gpu, init_timeout_s)
    _job = Job(who.index, who.count, target, simulate, _devices(simulate), agree_timeout_s, who.coordinator,
               gpu=gpu)
    _job.addresses = _job.allgather("address", own) if who.count > 1 else [own]
    if gpu is not None and who.count > 1:
        _check_distinct_gpus(_job)
    return _job


@dataclass
class _Who:
    """Which process this is: its index among ``count``, among ``local_size`` on its host, and
    where the job's coordinator is (None: rank 0 picks it, under MPI)."""

    index: int
    count: int
    local_rank: int
    local_size: int
    coordinator: str | None


def _rejoin(job: Job, target: str, simulate: int | None, process_count: int | None,
            agree_timeout_s: float) -> Job:
    """The job of a second call: the same one, or a smaller simulated world on the first devices;
    a different world is an error (JAX cannot leave and rejoin a job)."""
    if simulate is not None and job.process_count == 1 and job.target == target:
        import jax

        if simulate <= len(jax.devices()):
            return Job(0, 1, target, simulate, sorted(jax.devices(), key=lambda d: d.id)[:simulate],
                       agree_timeout_s)
        raise DinbError(
            f"this process has {len(jax.devices())} devices and cannot simulate {simulate} ranks; restart "
            f"it (the kernel) and call dinb.init_ranks(simulate={simulate}) first")
    wanted = (process_count or job.process_count, simulate, target)
    if wanted != (job.process_count, job.simulate, job.target):
        raise DinbError(
            f"this process already joined a job as {job.process_count} process(es), simulate={job.simulate}, "
            f"target={job.target!r}; a different job needs a new process (restart the kernel or the engines)")
    return job


def _who(world: tuple[int, int, int, int] | None, process_index: int | None, process_count: int | None,
         local_rank: int | None, local_size: int | None, coordinator: str | None,
         coordinator_address: str | None, config_coordinator_address: str | None) -> _Who:
    """This process's place in the job: from MPI, from Slurm (srun without an MPI plugin), from
    the launcher that handed it in (notebook engines), or alone."""
    if process_count is not None:  # another launcher: it knows which ranks share a host
        index = process_index or 0
        return _Who(index, process_count, index if local_rank is None else local_rank,
                    process_count if local_size is None else local_size, coordinator)
    if world is not None:
        return _Who(*world, coordinator)
    slurm = slurm_world()
    if slurm is None:
        return _Who(0, 1, 0, 1, None)
    host, port = addresses.split_address(slurm_coordinator(), "Slurm's first host of the step")
    choice = addresses.coordinator_choice(coordinator_address, config_coordinator_address)
    if choice is not None:
        chosen_host, chosen_port = addresses.split_address(*choice)
        host, port = chosen_host, chosen_port or port
    return _Who(slurm.rank, slurm.size, slurm.local_rank, slurm.local_size, f"{host}:{port}")


def _configure(target: str, who: _Who, simulate: int | None, device_id: int | None) -> GpuChoice | None:
    """The settings JAX reads when its backends start: the platform, the rank's share of the
    cores or its GPU, the simulated devices, gloo and no preemption service between processes."""
    if _backends_initialized():
        if who.count > 1:
            raise DinbError("JAX was used in this process before dinb could join the job; call "
                            "dinb.init_ranks() (or build the Model) before any other JAX call")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cuda" if target == "gpu" else "cpu")
        if target == "cpu" and who.count > 1:
            _share_cores(who.local_rank, who.local_size)
    gpu = choose_gpu(who.index, who.local_rank, device_id, gpu_count=host_gpu_count()) \
        if target == "gpu" else None
    import jax

    if gpu is not None and not _backends_initialized():
        jax.config.update("jax_cuda_visible_devices", str(gpu.index))
    if simulate is not None and not _backends_initialized():
        jax.config.update("jax_num_cpu_devices", int(simulate))
    if who.count > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_enable_preemption_service", False)
    return gpu


def _join(who: _Who, gpu: GpuChoice | None, init_timeout_s: int) -> str:
    """Join the JAX job at ``who.coordinator`` (rank 0 hosts it); this rank's own address."""
    import jax

    assert who.coordinator is not None
    own = addresses.own_address(who.coordinator.rpartition(":")[0])
    if not _backends_initialized():
        _gloo_listens_on(own)
    if who.index != 0:
        _wait_for_coordinator(who.coordinator, who.index, init_timeout_s, own)
    jax.distributed.initialize(
        coordinator_address=who.coordinator,
        num_processes=who.count,
        process_id=who.index,
        # given, so that JAX's own cluster detection (Open MPI, Slurm) picks nothing for us
        local_device_ids=[gpu.index if gpu is not None else 0],
        coordinator_bind_address=who.coordinator if who.index == 0 else None,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=max(10, init_timeout_s),
        shutdown_timeout_seconds=max(5, init_timeout_s),
    )
    return own


def _devices(simulate: int | None) -> list[Any]:
    """The job's devices in rank order (the first ``simulate`` of this process's, simulated)."""
    import jax

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if simulate is not None and len(devices) > simulate:
        devices = devices[:simulate]
    if simulate is not None and len(devices) != simulate:
        raise DinbError(
            f"asked to simulate {simulate} ranks but JAX has {len(devices)} devices; JAX was initialised "
            "earlier in this process - restart it and call dinb.init_ranks first")
    return devices


def current_job() -> Job | None:
    """The job this process joined, or None."""
    return _job


def shutdown() -> None:
    """Leave the job (``jax.distributed.shutdown`` on every rank before the processes stop).

    A GPU rank first lets go of its GPU client: the client watches the other ranks through the
    coordination service (so that a dead rank aborts the collectives), and a watch still running
    when rank 0's service stops printed ``WatchTasksAsync failed ... Connection refused`` on every
    successful exit. The arrays this process still holds keep the client alive, so callers drop
    their models first (the CLI, the engines and the serving agents do). Where a library keeps
    arrays of its own, the native libraries' stderr is closed for the rest of the process instead.
    """
    global _job
    if _job is not None and _job.process_count > 1:
        import jax

        if _job.target == "gpu" and not _release_gpu_client(_job):
            _native_logs_off()
        jax.distributed.shutdown()
    _job = None


def _release_gpu_client(job: Job) -> bool:
    """Drop JAX's backends and collect; True when the GPU client is gone."""
    import gc
    import weakref

    import jax
    from jax.extend.backend import clear_backends

    client = weakref.ref(job.devices[0].client) if job.devices else None
    job.devices = []
    jax.clear_caches()
    clear_backends()
    gc.collect()
    return client is None or client() is None


def _native_logs_off() -> None:
    """The GPU client outlives the job (a library holds arrays in its modules: jax2onnx, for the
    tensorrt provider), so its watch would report the others' exit: from here to the process's
    end, what the native libraries write to stderr goes nowhere; Python's own stderr (errors and
    tracebacks) still reaches the terminal through a copy of the descriptor."""
    import sys

    try:
        sys.stderr.flush()
        kept = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        sys.stderr = os.fdopen(kept, "w", buffering=1, closefd=False)
    except OSError:
        pass
