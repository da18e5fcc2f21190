"""How one pipeline stage hands its activations to the next: three links, one interface.

Rank ``j`` of stage ``s`` sends its shard of each value it computed to rank ``j`` of stage
``s + 1`` (both hold the value under the same layout, see :mod:`dinb.sharding.pipeline`). A link moves
those shards for one micro-batch at a time:

* :class:`LocalLink`: every rank in this process (the simulated mode). Each stage runs in its own
  thread; values go through a queue and ``jax.device_put`` moves them onto the next stage's
  devices.
* :class:`MpiLink`: rank processes that are MPI's world (``mpiexec``, the notebook cluster's MPI
  engines), on CPU. Non-blocking ``Isend``/``Irecv`` of the shard's bytes, so a stage computes
  micro-batch ``m + 1`` while ``m`` is on its way; waits poll with a deadline and name the rank
  that did not send or receive. Measured on 2 CPU processes: 0.013 ms for 8 KiB, 0.14 ms for
  1 MiB, against 1.45 and 1.56 ms for XLA's collective-permute over gloo.
* :class:`XlaLink`: any other job (GPU ranks, processes MPI did not launch such as serving
  agents). A two-device program, ``ppermute`` from the sender's device to the receiver's, run
  by both ranks in the same order; on GPUs it is NCCL between device buffers, with no host copy.
  Its waits are XLA's: a dead peer surfaces as the collective's error, and the caller's timeouts
  (notebook cluster, serving worker) name it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinb.errors import DinbError, RankFailedError
from dinb.formats.safetensors import np_dtype
from dinb.runtime.config import TRANSFERS


@dataclass(frozen=True)
class Shard:
    """What one rank sends or receives of one value: its local shape and dtype."""

    shape: tuple[int, ...]
    dtype: str


class LocalLink:
    """Stages in threads of one process; ``queue.Queue`` between consecutive stages."""

    name = "in-process"

    def __init__(self, stages: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.queues = [queue.Queue[Any]() for _ in range(stages)]  # queues[s]: into stage s

    def send(self, stage: int, micro: int, values: Sequence[Any]) -> None:
        self.queues[stage + 1].put((micro, values))

    def fail(self, stage: int, error: BaseException) -> None:
        """Stage ``stage`` failed: the stages after it stop waiting at once."""
        for q in self.queues[stage + 1:]:
            q.put((None, error))

    def recv(self, stage: int, micro: int) -> Sequence[Any]:
        try:
            got, values = self.queues[stage].get(timeout=self.timeout_s)
        except queue.Empty:
            raise RankFailedError(
                f"stage {stage} received nothing from stage {stage - 1} for micro-batch {micro} "
                f"within {self.timeout_s:.0f} s"
            ) from None
        if got is None:
            raise values
        return values

    def finish(self) -> None:
        for q in self.queues:
            while not q.empty():
                q.get_nowait()


class MpiLink:
    """Point-to-point messages between this rank and its peers in the stages before and after.

    Receives for every micro-batch of a predict are posted when it starts (:meth:`expect`), so
    activations land while this rank still computes the previous micro-batch. Sends go through
    a thread of their own doing blocking ``Send`` (mpi4py releases the GIL): a message larger
    than MPI's eager limit (a few KiB in shared memory) only moves while its sender is inside
    MPI, and this rank's main thread is busy computing the next micro-batch meanwhile.
    """

    name = "mpi"

    def __init__(self, rank: int, stage_ranks: int, stages: int, timeout_s: float):
        import threading

        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.t, self.stages, self.timeout_s = rank, stage_ranks, stages, timeout_s
        self.tag_ub = int(self.comm.Get_attr(MPI.TAG_UB) or 32767)
        self._threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._sent = threading.Condition()
        self._queued = self._done = 0
        self._error: BaseException | None = None
        self._posted: dict[int, tuple[list[Any], list[np.ndarray]]] = {}
        if self._threaded:
            threading.Thread(target=self._sender, daemon=True, name=f"dinb-stage-send-{rank}").start()

    def _tag(self, micro: int, count: int, value: int) -> int:
        tag = (count * 256 + micro) * 16 + value % 16
        return tag if tag <= self.tag_ub else micro * 16 + value % 16

    # ---- sending ------------------------------------------------------------------------------
    def send(self, micro: int, count: int, shards: Sequence[np.ndarray]) -> None:
        peer = self.rank + self.t
        for i, a in enumerate(shards):
            buf = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
            if not self._threaded:  # MPI without thread support: send from this thread
                self.comm.Send([buf, self.MPI.BYTE], dest=peer, tag=self._tag(micro, count, i))
                continue
            with self._sent:
                self._queued += 1
            self._outbox.put((buf, peer, self._tag(micro, count, i)))

    def _sender(self) -> None:
        while True:
            buf, peer, tag = self._outbox.get()
            try:
                self.comm.Send([buf, self.MPI.BYTE], dest=peer, tag=tag)
            except BaseException as e:  # noqa: BLE001 - reported by finish()
                self._error = e
            with self._sent:
                self._done += 1
                self._sent.notify_all()

    def finish(self) -> None:
        """Wait until every message sent has left (a dead receiver is named after the timeout)."""
        peer = self.rank + self.t
        with self._sent:
            if not self._sent.wait_for(lambda: self._done == self._queued, self.timeout_s):
                raise RankFailedError(
                    f"rank {self.rank} could not hand its activations to rank {peer} (stage "
                    f"{peer // self.t}) within {self.timeout_s:.0f} s; rank {peer} is dead or stuck",
                    (peer,))
        if self._error is not None:
            error, self._error = self._error, None
            raise RankFailedError(f"rank {self.rank}: sending to rank {peer} failed: {error}", (peer,))

    # ---- receiving ----------------------------------------------------------------------------
    def expect(self, count: int, shards: Sequence[Shard]) -> None:
        """Post the receives of every micro-batch of a predict in ``count`` micro-batches."""
        peer = self.rank - self.t
        self._posted = {}
        for micro in range(count):
            bufs = [np.empty(s.shape, np_dtype(s.dtype)) for s in shards]
            reqs = [self.comm.Irecv([b.view(np.uint8).reshape(-1), self.MPI.BYTE], source=peer,
                                    tag=self._tag(micro, count, i)) for i, b in enumerate(bufs)]
            self._posted[micro] = (reqs, bufs)

    def recv(self, micro: int, count: int) -> list[np.ndarray]:
        peer = self.rank - self.t
        reqs, bufs = self._posted.pop(micro)
        self._wait(reqs, lambda: (
            f"rank {self.rank} (stage {self.rank // self.t}) received nothing from rank {peer} "
            f"(stage {peer // self.t}) for micro-batch {micro} of {count} within "
            f"{self.timeout_s:.0f} s; rank {peer} is dead or stuck, or the ranks predicted with "
            "different micro_batches"), peer)
        return bufs

    def cancel(self) -> None:
        """Drop the receives still posted (a predict that failed part-way)."""
        for reqs, _ in self._posted.values():
            for r in reqs:
                try:
                    r.Cancel()
                except Exception:  # noqa: BLE001 - a request may have completed meanwhile
                    pass
        self._posted = {}

    def _wait(self, reqs: list[Any], message: Any, peer: int) -> None:
        if not poll_until(lambda: self.MPI.Request.Testall(reqs), self.timeout_s):
            self.cancel()
            for r in reqs:
                try:
                    r.Cancel()
                except Exception:  # noqa: BLE001
                    pass
            raise RankFailedError(message(), (peer,))


def poll_until(done: Any, timeout_s: float) -> bool:
    """Whether ``done()`` came true within ``timeout_s``: an MPI request's ``Test``, polled by
    spinning first, then in short naps (activations usually arrive in microseconds)."""
    deadline = time.monotonic() + timeout_s
    pause = 0.0
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(0.0002, pause + 0.00001)
    return True


class XlaLink:
    """A two-device ``ppermute`` from rank ``j`` of stage ``s`` to rank ``j`` of stage ``s + 1``."""

    name = "xla"

    def __init__(self, devices: Sequence[Any], rank: int, stage_ranks: int):
        self.devices, self.rank, self.t = list(devices), rank, stage_ranks
        self._programs: dict[tuple[int, int, tuple[int, ...], str], Any] = {}

    def _program(self, src: int, dst: int, shard: Shard) -> tuple[Any, Any]:
        import jax
        from jax.sharding import AxisType, Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        key = (src, dst, shard.shape, shard.dtype)
        if key not in self._programs:
            mesh = Mesh(np.array([self.devices[src], self.devices[dst]]), ("pair",),
                        axis_types=(AxisType.Auto,))
            sharding = NamedSharding(mesh, P("pair"))
            move = jax.shard_map(lambda a: jax.lax.ppermute(a, "pair", [(0, 1)]), mesh=mesh,
                                 in_specs=P("pair"), out_specs=P("pair"))
            self._programs[key] = (jax.jit(move, out_shardings=sharding), sharding)
        return self._programs[key]

    def _move(self, src: int, dst: int, local: Any, shard: Shard) -> Any:
        import jax

        program, sharding = self._program(src, dst, shard)
        mine = jax.device_put(local[None], self.devices[self.rank])
        full = jax.make_array_from_single_device_arrays((2, *shard.shape), sharding, [mine])
        return program(full).addressable_data(0)[0]

    def send(self, shards: Sequence[Any]) -> None:
        for a in shards:
            self._move(self.rank, self.rank + self.t, a, Shard(tuple(a.shape), str(a.dtype)))

    def recv(self, shards: Sequence[Shard]) -> list[Any]:
        import jax.numpy as jnp

        return [self._move(self.rank - self.t, self.rank, jnp.zeros(s.shape, np_dtype(s.dtype)), s)
                for s in shards]


def choose_transfer(setting: str, process_count: int, process_index: int, target: str) -> str:
    """``"local"``, ``"mpi"`` or ``"xla"`` for this job under the config's ``stage_transfer``."""
    if setting not in TRANSFERS:
        raise DinbError(f"stage_transfer = {setting!r}; choose one of {list(TRANSFERS)}")
    if process_count == 1:
        return "local"
    mpi_ok, why = _mpi_world_is_job(process_count, process_index)
    if setting == "mpi" and not mpi_ok:
        raise DinbError(f"stage_transfer = mpi, but {why}; use stage_transfer = xla (or auto)")
    if setting == "xla" or (setting == "auto" and (target == "gpu" or not mpi_ok)):
        return "xla"
    return "mpi"


#: JAX releases whose gloo fails a CPU process in two communicators (docs/architecture.md)
GLOO_TWO_COMMUNICATORS_BROKEN = ("0.12.1",)


def xla_link_refusal(jax_version: str, target: str, stage_ranks: int) -> str | None:
    """Why the XLA stage link cannot run here, or None: under jax 0.12.1 a CPU rank of a stage of
    several ranks takes part in two gloo communicators (its stage's and the link's), which
    fails with "Connection closed by peer" or hangs."""
    if target == "cpu" and stage_ranks > 1 and jax_version in GLOO_TWO_COMMUNICATORS_BROKEN:
        return (f"stage_transfer = xla between CPU stages of {stage_ranks} ranks fails under jax "
                f"{jax_version} (its gloo breaks a process in two communicators); install another "
                "release (pip install 'jax!=0.12.1' 'jaxlib!=0.12.1'), or run the ranks under mpiexec "
                "(stage_transfer = mpi)")
    return None


def _mpi_world_is_job(process_count: int, process_index: int) -> tuple[bool, str]:
    import os

    from dinb.job.mpi_world import MPI_SIZE_VARS

    if not any(v in os.environ for v in MPI_SIZE_VARS):
        return False, "these rank processes were not started by mpiexec"
    try:
        from mpi4py import MPI
    except ImportError:
        return False, "mpi4py is not installed"
    comm = MPI.COMM_WORLD
    if comm.size != process_count or comm.rank != process_index:
        return False, (f"MPI's world (rank {comm.rank} of {comm.size}) is not the job's "
                       f"(rank {process_index} of {process_count})")
    return True, ""
