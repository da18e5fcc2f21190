"""Stands for one engine (or the controller) forked by dinb's warm factory; see warm_start.py.

    python -S warm_stub.py SOCKET MODULE [ARGS...]

Sends the factory this process's arguments, environment, folder and descriptors (0, 1, 2 and
mpich's PMI_FD), forwards the signals it gets to the forked process, and exits with its status.
Runs with ``-S`` and the standard library only: it starts in a few milliseconds.
"""

import json
import os
import select
import signal
import socket
import sys

NOTICE = "dinb: the warm engine factory"


def main() -> int:
    # One function on purpose: the stub is a few system calls in a fixed order, with the signal
    # state (``child``, ``pending``) shared from the first line to the last; it must start in
    # milliseconds under ``python -S`` and import nothing but the standard library.
    path, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    fds = [0, 1, 2]
    if os.environ.get("PMI_FD", "").isdigit():
        fds.append(int(os.environ["PMI_FD"]))
    # signals are taken from the start: one that comes before the child exists is passed on to it
    # as soon as it does (the launcher may stop an engine that is still starting)
    child = None
    pending = []

    def forward(signum, _frame):
        if child is None:
            pending.append(signum)
            return
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect("\0" + path[1:] if path.startswith("@") else path)
        request = {"module": module, "args": args, "env": dict(os.environ), "cwd": os.getcwd(),
                   "fds": fds, "stub_pid": os.getpid()}
        socket.send_fds(conn, [json.dumps(request).encode()], fds)
        reader = conn.makefile("rb")
        first = json.loads(reader.readline() or b"{}")
    except (OSError, ValueError) as e:
        print(f"{NOTICE} at {path} did not answer ({e}); the {module} process was not started. "
              "Start the cluster again (a new factory starts), or pass warm=False", file=sys.stderr)
        return 1
    if "pid" not in first:
        print(f"{NOTICE} could not start {module}: {first.get('error', 'no answer')}", file=sys.stderr)
        return 1
    child = first["pid"]
    for signum in pending:
        forward(signum, None)
    try:
        pidfd = os.pidfd_open(child)
    except OSError:
        pidfd = None
    # The factory reports the exit. If the factory itself is gone, the child's pidfd says when
    # the child ends (its status is then lost: 1).
    watched = [conn] + ([pidfd] if pidfd is not None else [])
    while True:
        try:
            ready, _, _ = select.select(watched, [], [], None if conn in watched else 1.0)
        except InterruptedError:
            continue
        if conn in ready:
            line = reader.readline()
            if line:
                return _status(line)
            watched.remove(conn)  # the factory is gone
            if not watched:
                return 1
        elif not ready or pidfd in ready:
            if conn not in watched:
                return 1
            ready, _, _ = select.select([conn], [], [], 1.0)  # its status comes a moment later
            line = reader.readline() if ready else b""
            return _status(line) if line else 1


def _status(line):
    """The child's exit status as a shell gives it (128 + N when signal N ended it)."""
    code = int(json.loads(line).get("exit", 1))
    return code if code >= 0 else 128 - code

if __name__ == "__main__":
    sys.exit(main())
