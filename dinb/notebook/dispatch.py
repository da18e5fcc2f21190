"""Calling a started cluster's ranks: every rank at once, watched, with a finite timeout.

:class:`RankCalls` is made once the engines of a :class:`~dinb.notebook.cluster.RankCluster`
are known (their engine ids, processes and hosts). Every SPMD call goes to all ranks together
(a call sent to only some ranks hangs in the first collective). While it waits, it checks each
rank: a rank that died is named at once (the job cannot go on; ``restart()``), and a call that
outlives its timeout names the ranks that never reached the collective (stuck in their own
part) apart from the ranks waiting for them. Ranks on this host are watched through their
process ids; ranks on other hosts through a heartbeating connection to their predict socket
(:mod:`dinb.job.death_watch`). Predict's fast path goes over each rank's own socket.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinb.errors import RankFailedError
from dinb.job import remote_predict, wire
from dinb.job.death_watch import DeathWatch


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, exited but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def remote_message(e: Exception) -> str:
    """``Name: message`` of an error raised in an engine."""
    ename, evalue = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
    return f"{ename}: {evalue}"


@dataclass
class RankCalls:
    """The ranks of a started cluster, in rank order, and how to call them."""

    client: Any  # ipyparallel's Client
    engine_of: list[int]  # engine id of each rank
    pids: list[int]
    hostnames: list[str]
    local: list[bool]  # whether each rank runs on this host (its pid means something here)
    timeout_s: float
    watch: DeathWatch
    broken: bool = False  # a rank died or got stuck: the job cannot be left politely
    socks: list[Any] = field(default_factory=list)  # the fast predict path's sockets, one per rank

    @property
    def n(self) -> int:
        return len(self.engine_of)

    def alive(self, rank: int) -> bool:
        """A rank of this host: its process exists; of another host: its connection holds."""
        if self.local[rank]:
            return process_alive(self.pids[rank])
        return rank not in self.watch.died_at(wait_s=0)

    def kill_local(self) -> None:
        """SIGKILL the ranks of this host that still run."""
        for pid, local in zip(self.pids, self.local):
            if local and process_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def check_alive(self, what: str) -> None:
        """Name the rank whose engine process exited (the job cannot go on without it).

        When one rank dies, the others follow: the launcher ends them, its peers in a collective
        or a stage transfer fail, and rank 0 hosted the JAX coordinator. So several ranks can be
        dead at once. The rank that died first (:class:`DeathWatch`) is the cause. A follower
        exits at least its own teardown later (10 ms and more for a JAX process), so exits
        within 2 ms of the first count as one event; when rank 0 is among them, it is named as
        the cause and the others as ended by the job.
        """
        now = time.monotonic()
        gone = {r for r, pid in enumerate(self.pids) if self.local[r] and not process_alive(pid)}
        watched = self.watch.died_at(gone)
        dead = {r: watched.get(r, now) for r in gone | watched.keys()}
        if not dead:
            return
        self.broken = True
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

    def call(self, fn: Callable[..., Any], args: Callable[[int], tuple] | tuple = (),
             timeout_s: float | None = None, what: str = "the call",
             on_poll: Callable[[list[Any]], None] | None = None,
             ranks: list[int] | None = None) -> list[Any]:
        """Call ``fn`` on every rank at once (or on ``ranks``, for calls that run no collective);
        per-rank results in rank order (finite timeout).

        ``on_poll(async_results)`` sees the calls while they run (for progress bars: each
        result's ``.data`` holds what its rank published, ``.ready()`` whether it finished).
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        targets = list(range(self.n)) if ranks is None else ranks
        ars = [self.client[self.engine_of[r]].apply_async(fn, *(args(r) if callable(args) else args))
               for r in targets]
        deadline = time.monotonic() + timeout_s
        while True:
            if on_poll is not None:
                on_poll(ars)
            if all(ar.ready() for ar in ars):
                break
            self.check_alive(what)
            if time.monotonic() > deadline:
                self._timed_out(targets, ars, what, timeout_s)
            ars[0].wait(0.002)
        results, errors = [], {}
        for r, ar in zip(targets, ars):
            try:
                results.append(ar.get(0))
            except Exception as e:  # a remote error: report it with its rank
                errors[r] = remote_message(e)
        if errors:
            detail = "; ".join(f"rank {r}: {m}" for r, m in errors.items())
            raise RankFailedError(f"{what} failed on rank(s) {sorted(errors)}: {detail}",
                                  ranks=tuple(sorted(errors)))
        return results

    def _timed_out(self, targets: list[int], ars: list[Any], what: str, timeout_s: float) -> None:
        reached = [r for r, ar in zip(targets, ars) if (ar.data or {}).get("phase") in ("collective", "done")]
        pending = [r for r, ar in zip(targets, ars) if not ar.ready()]
        stuck = [r for r in pending if r not in reached] or pending
        waiting = [r for r in pending if r not in stuck]
        self.broken = True
        raise RankFailedError(
            f"rank(s) {stuck} did not finish {what} within {timeout_s:g} s"
            + (f"; rank(s) {waiting} are waiting for them in the collective" if waiting else "")
            + ". Those ranks are stuck; run `%dinfer cluster restart` (RankCluster.restart()).",
            ranks=tuple(stuck))

    def fast_predict(self, arrays: list[np.ndarray], roles: remote_predict.Roles, timeout_s: float,
                     noop: bool = False, micro_batches: int | None = None) -> tuple[list[np.ndarray], bool]:
        """A predict over the ranks' own sockets: the data rank's outputs, and whether every
        output rank's outputs agree with them (by checksum)."""
        import zmq

        extra = {"micro_batches": micro_batches} if micro_batches is not None else {}
        for r, sock in enumerate(self.socks):
            header, takes = roles.header(r, noop=noop, **extra)
            sock.send_multipart(wire.pack(header, arrays if takes else []), copy=False)
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        replies: dict[int, list[Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.n:
            events = dict(poller.poll(5))
            for r, sock in enumerate(self.socks):
                if r not in replies and sock in events:
                    replies[r] = sock.recv_multipart(copy=False)
            if len(replies) == self.n:
                break
            self.check_alive("predict")
            if time.monotonic() > deadline:
                self.broken = True
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

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.socks = []
        self.watch.close()
