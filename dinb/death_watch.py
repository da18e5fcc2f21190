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

Without pidfds (old kernels), nothing is reported and the caller's own polling still finds
the dead ranks, without their order.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Set


class DeathWatch:
    """The exits of a job's rank processes, in the order they happened."""

    def __init__(self, pids: list[int]):
        self._died_at: dict[int, float] = {}
        self._pending = b""
        self._proc = subprocess.Popen([sys.executable, "-I", __file__, *map(str, pids)],
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

    def close(self) -> None:
        """Stop the watcher process (it also stops by itself when this process goes)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=5)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()


def _watch(pids: list[int]) -> None:
    """The watcher process: one line per exit, until every rank exited or stdin closed."""
    try:  # wake before anything else runs: the exits are then timed as they happen
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError):  # not privileged: a raised priority, if allowed
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        except OSError:
            pass
    fds: dict[int, int] = {}
    for rank, pid in enumerate(pids):
        try:
            fds[os.pidfd_open(pid)] = rank
        except ProcessLookupError:
            print(rank, time.monotonic(), flush=True)
        except OSError:
            pass
    stdin = sys.stdin.fileno()
    while fds:
        ready, _, _ = select.select([*fds, stdin], [], [])
        now = time.monotonic()
        for fd in ready:
            if fd == stdin:
                return  # the parent went away
            print(fds.pop(fd), now, flush=True)
            os.close(fd)


if __name__ == "__main__":
    _watch([int(a) for a in sys.argv[1:]])
