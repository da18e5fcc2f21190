"""Engines forked from a warm process: a cluster starts without paying its imports again.

A notebook engine spends most of its start importing (on the 2-core machine: ipyparallel and its
engine 0.9 s, JAX 0.5 s more, every engine at once), before it can register. The *factory* is one
process per kernel that has imported them all (JAX, ipyparallel's engine and controller, dinb)
and started no JAX backend, no thread of its own and no MPI; it listens on an abstract Unix
socket (no file to remove) that admits only processes of its own user (``SO_PEERCRED``). The
launchers start a small *stub* instead of ``python -m ipyparallel.engine`` (or
``.controller``): ``python -S warm_stub.py @ADDRESS MODULE ARGS``, which is what ``mpiexec`` or
ipyparallel's local launcher runs. The stub hands the factory its arguments, environment,
folder and standard streams (and mpich's ``PMI_FD``) over the socket, with the file descriptors
themselves (``SCM_RIGHTS``); the factory forks, and the child becomes that process: it takes
the streams at their numbers, the stub's environment (MPI's rank variables included, so
``MPI_Init`` in the child joins the stub's job), and runs the module as ``__main__``.

Guarantees kept:
- one process per rank, as before: the stub only waits. Signals to the stub (the launcher's
  SIGINT/SIGTERM) go on to the child, and the child's exit status comes back as the stub's own;
- the child ends when its stub goes (a SIGKILLed stub cannot forward anything), twice over: a
  thread of the child polls the stub's pidfd, and the factory kills a child whose stub's
  connection ends before the child did. Ranks are bound to cores (or GPUs) by :func:`dinb.init_ranks` in the
  child, as before;
- the factory ends with the kernel (``PR_SET_PDEATHSIG`` and an ``atexit``), and a dead factory
  is noticed: a stub that cannot reach it says so and exits 1, and the kernel starts a new
  factory before the next cluster (:func:`factory`).

Where it is not used (engines on other hosts, Slurm, Open MPI's ``mpirun``, whose PMIx join
this was not checked with), engines start cold as before.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

STUB = Path(__file__).with_name("warm_stub.py")
WARM_MODULES = ("jax", "numpy", "zmq", "ipyparallel.engine.app", "ipyparallel.controller.app",
                "dinb", "dinb.notebook.engine", "dinb.runtime", "dinb.job.ranks")
MAX_MESSAGE = 1 << 20
LISTEN_TIMEOUT_S = 10.0


class Factory:
    """The kernel's handle on its factory process."""

    def __init__(self) -> None:
        self.fingerprint = _import_env()
        self.address = f"@dinb-warm-{os.getpid()}-{secrets.token_hex(8)}"  # @: the abstract namespace
        # run by path: ``-m dinb.notebook...`` would import the dinb package before it listens
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), self.address],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        atexit.register(self.close)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], LISTEN_TIMEOUT_S)
        said = self.proc.stdout.readline() if ready else b""  # listening comes first, in milliseconds
        self.proc.stdout.close()
        if said != b"listening\n":
            from dinb.errors import ClusterError

            self.close()
            raise ClusterError(f"dinb's warm engine factory did not start (it said {said!r}); start the "
                               "cluster with warm=False")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def command(self, module: str) -> list[str]:
        """What a launcher runs instead of ``python -m MODULE``."""
        return [sys.executable, "-S", str(STUB), self.address, module]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


_factory: Factory | None = None


def _import_env() -> dict[str, str]:
    """The environment that modules read when they are imported (JAX's flags, Python's path):
    when the kernel's changes, a factory that imported with the old one is replaced."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(("JAX_", "XLA_", "PYTHON", "TF_", "CUDA_", "NCCL_", "OMP_", "LD_"))}


def factory() -> Factory:
    """This kernel's factory, started (again) when there is none alive, or when the environment
    that imports read has changed since it started."""
    global _factory
    if _factory is None or not _factory.alive() or _factory.fingerprint != _import_env():
        if _factory is not None:
            _factory.close()
        _factory = Factory()
    return _factory


# ---- the factory process ---------------------------------------------------------------------
def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(address: str) -> None:
    """Listen first (a stub that comes early waits in the backlog), import, then fork on demand."""
    import importlib

    _die_with_parent()
    parent = os.getppid()
    sys.path[0] = ""  # run by path, Python put this folder first; engines find modules in their own
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + address.removeprefix("@"))
    listener.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # a kernel interrupt signals the kernel's process group: the cell stops, not this server
    # (it goes with its parent; the engines it forks get the default handler back)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the kernel reads that line only
    for name in WARM_MODULES:
        importlib.import_module(name)
    stubs: dict[int, socket.socket] = {}  # child pid -> its stub's connection
    while os.getppid() == parent:
        ready, _, _ = select.select([listener, *stubs.values()], [], [], 0.2)
        _reap(stubs)
        for pid, conn in list(stubs.items()):
            if conn in ready and not _peek(conn):  # the stub went (killed): its child goes too
                _kill(pid)
                conn.close()
                del stubs[pid]
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():  # the abstract namespace has no file permissions: only our own user
            conn.close()
            continue
        try:
            pid = _fork_child(conn, listener)
        except (OSError, ValueError) as e:
            try:
                conn.sendall(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
            except OSError:
                pass
            conn.close()
            continue
        stubs[pid] = conn


def _peek(conn: socket.socket) -> bytes:
    """What a stub sent (it sends nothing after its request: only an EOF, when it ends)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b"?"
    except OSError:
        return b""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(stubs: dict[int, socket.socket]) -> None:
    while stubs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = stubs.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            except OSError:
                pass
            conn.close()


def _fork_child(conn: socket.socket, listener: socket.socket) -> int:
    msg, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 16)
    request = json.loads(msg)
    targets = request["fds"]
    if len(fds) != len(targets):
        raise ValueError(f"{len(fds)} file descriptors for {len(targets)} targets")
    # A signal the stub forwards at once must find the child with the default actions, not the
    # factory's handler (which would run the child's atexit, and hung there once): blocked over
    # the fork, delivered in the child once the defaults are back.
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        return pid
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what a new Python process has
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    try:  # the child: become the process the stub stands for
        listener.close()
        conn.close()
        env = request["env"]
        _take_fds(fds, targets, env)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(request["cwd"])
        _end_with(request["stub_pid"])
        sys.argv = [request["module"], *request["args"]]
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    # out of the factory's loop as an ordinary exit: atexit (MPI_Finalize, JAX's shutdown) runs
    raise SystemExit(code)


def _take_fds(fds: list[int], targets: list[int], env: dict[str, str]) -> None:
    """The standard streams go to 0, 1 and 2. mpich's PMI socket keeps the fresh number it came
    with, and ``PMI_FD`` says so: its number in the stub may be one that an object inherited
    from the factory still owns (and closes later, as pyzmq's context does after a fork)."""
    for fd, target in zip(fds[:3], targets[:3]):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
    for fd in fds[3:]:
        os.set_inheritable(fd, True)
        env["PMI_FD"] = str(fd)


def _end_with(stub_pid: int) -> None:
    """End this process when its stub ends (a killed stub forwards nothing)."""
    import threading

    try:
        pidfd = os.pidfd_open(stub_pid)
    except ProcessLookupError:  # the stub went before this child could watch it
        os.kill(os.getpid(), signal.SIGKILL)
        return
    except (OSError, AttributeError):  # no pidfds here (Linux < 5.3)
        return

    def watch() -> None:
        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="dinb-stub-watch").start()


if __name__ == "__main__":
    serve(sys.argv[1])
