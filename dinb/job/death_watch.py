"""The moment each rank's process exits, seen by a small watcher process of its own.

When one rank of an MPI job dies, the launcher ends the others within milliseconds, and when
rank 0 dies the others follow because it hosted the JAX coordinator. To name the rank that died
*first*, the exits must be timed as they happen. A thread in the notebook's kernel cannot do
that reliably: after its ``select`` on the processes' pidfds wakes, it still waits for the GIL
(the ipyparallel client's threads hold it), and on a busy machine all the exits then look
simultaneous. So the watching runs in a separate, otherwise idle Python process, started with
``python -I`` on this file (no package imports, ~20 ms), which writes ``rank seconds`` lines
stamped with ``time.monotonic()`` (the same clock in every process) as each pidfd becomes
readable; where allowed it runs with a real-time priority (``SCHED_FIFO``), so that it wakes
before the processes that the launcher then ends. The client reads those lines when it
checks on its ranks.

Ranks on other hosts have no pid here. For each of them the watcher holds a connection of its
own to the rank's predict socket (a CURVE client, :mod:`dinb.job.secure_socket`), with ZeroMQ's
heartbeats every 0.5 s answered by the rank's I/O thread (no Python, no GIL involved). A rank
whose process exits closes that connection at once (its host's kernel ends the TCP stream); a
rank whose host or network goes silent misses its heartbeats, and after 3 s ZeroMQ drops the
connection. Either way the disconnect, seen on a monitor socket, is the rank's death.

Without pidfds (old kernels), nothing is reported and the caller's own polling still finds
the dead ranks, without their order.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Set
from typing import Any

HEARTBEAT_MS = 500
HEARTBEAT_TIMEOUT_MS = 3000
CONNECT_TIMEOUT_S = 15.0  # a remote rank whose socket cannot be reached in this time is dead


class DeathWatch:
    """The exits of a job's rank processes, in the order they happened."""

    def __init__(self, pids: list[int | None]):
        """``pids``: each rank's process id, None for a rank on another host (see
        :meth:`watch_remote`)."""
        self._died_at: dict[int, float] = {}
        self._pending = b""
        args = ["-" if pid is None else str(pid) for pid in pids]
        self._proc = subprocess.Popen([sys.executable, "-I", __file__, *args],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)
        assert self._proc.stdout is not None
        self._out = self._proc.stdout.fileno()

    def died_at(self, expect: Set[int] = frozenset(), wait_s: float = 0.5) -> dict[int, float]:
        """``{rank: time.monotonic() of its exit}`` for the exits seen so far.

        ``expect``: ranks already known to be dead; waits up to ``wait_s`` for the watcher's
        lines about them (they are written as the exit happens, but read here only now).
        """
        deadline = time.monotonic() + wait_s
        while True:
            timeout = 0.0 if expect <= self._died_at.keys() else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._out], [], [], timeout)
            if not ready:
                return dict(self._died_at)
            chunk = os.read(self._out, 4096)
            if not chunk:  # the watcher ended
                return dict(self._died_at)
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            for line in lines:
                rank, seconds = line.split()
                self._died_at.setdefault(int(rank), float(seconds))

    def watch_remote(self, rank: int, endpoint: str, server_key: str | None, public: str | None,
                     secret: str | None) -> None:
        """Watch a rank of another host through its predict socket at ``endpoint`` (CURVE keys:
        the rank's public key, the client's pair)."""
        assert self._proc.stdin is not None
        line = json.dumps({"rank": rank, "endpoint": endpoint, "server_key": server_key,
                           "public": public, "secret": secret})
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def close(self) -> None:
        """Stop the watcher process (it also stops by itself when this process goes)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=5)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()


class _RemoteRanks:
    """The watcher's connections to ranks on other hosts; a disconnect is a death."""

    def __init__(self) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.rank_of: dict[Any, int] = {}  # monitor socket -> rank
        self.socks: list[Any] = []
        self.deadline: dict[int, float] = {}  # ranks not yet connected -> give up at

    def add(self, item: dict[str, Any]) -> None:
        zmq = self.zmq
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, -1)  # once gone, gone
        if item["server_key"]:
            sock.curve_serverkey = item["server_key"].encode()
            sock.curve_publickey = item["public"].encode()
            sock.curve_secretkey = item["secret"].encode()
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                                          | zmq.EVENT_CLOSED)
        sock.connect(item["endpoint"])
        self.socks.append(sock)
        self.rank_of[monitor] = int(item["rank"])
        self.deadline[int(item["rank"])] = time.monotonic() + CONNECT_TIMEOUT_S

    def poll(self, fds: list[int]) -> list[int]:
        """Wait for the raw ``fds`` or a remote event; print remote deaths; return ready fds."""
        from zmq.utils.monitor import recv_monitor_message

        zmq = self.zmq
        poller = zmq.Poller()
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        for monitor in self.rank_of:
            poller.register(monitor, zmq.POLLIN)
        events = poller.poll(500)
        now = time.monotonic()
        ready = []
        for what, _ in events:
            if isinstance(what, int):
                ready.append(what)
                continue
            event = recv_monitor_message(what)["event"]
            rank = self.rank_of[what]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.deadline.pop(rank, None)
            elif rank not in self.deadline:  # connected before: the rank or its host went away
                print(rank, now, flush=True)
                self.forget(what)
        for rank, limit in list(self.deadline.items()):
            if now > limit:  # never reached: as dead as a rank that left
                print(rank, now, flush=True)
                self.forget(next(m for m, r in self.rank_of.items() if r == rank))
        return ready

    def forget(self, monitor: Any) -> None:
        rank = self.rank_of.pop(monitor)
        self.deadline.pop(rank, None)


def _watch(pids: list[int | None]) -> None:
    """The watcher process: one line per exit, until stdin closes (the client went away)."""
    try:  # wake before anything else runs: the exits are then timed as they happen
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError):  # not privileged: a raised priority, if allowed
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        except OSError:
            pass
    fds: dict[int, int] = {}
    for rank, pid in enumerate(pids):
        if pid is None:
            continue
        try:
            fds[os.pidfd_open(pid)] = rank
        except ProcessLookupError:
            print(rank, time.monotonic(), flush=True)
        except OSError:
            pass
    stdin = sys.stdin.fileno()
    remote: _RemoteRanks | None = None
    pending = b""
    while True:
        if remote is None:
            ready, _, _ = select.select([*fds, stdin], [], [])
        else:
            ready = remote.poll([*fds, stdin])
        now = time.monotonic()
        for fd in ready:
            if fd == stdin:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return  # the parent went away
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    remote = remote or _RemoteRanks()
                    remote.add(json.loads(line))
                continue
            print(fds.pop(fd), now, flush=True)
            os.close(fd)


if __name__ == "__main__":
    _watch([None if a == "-" else int(a) for a in sys.argv[1:]])
