"""Engines forked from the warm factory: who their parent is, that signals and exits pass through
the stub, that an engine ends with its stub, and that a dead factory is said and replaced."""

import os
import signal
import subprocess
import time

import pytest

import dinb
from dinb.notebook import warm_start
from dinb.notebook.dispatch import process_alive

pytestmark = pytest.mark.mpi


def _wait_gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s  # the event, not a fixed sleep
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not process_alive(pid)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("engines", ["mpi", "local"])
def test_engines_are_forked_from_the_factory_unless_cold(engines):
    c = dinb.start_cluster(2, engines=engines, timeout_s=30)
    try:
        factory = warm_start.factory().proc.pid
        assert all(_parent_of(pid) == factory for pid in c.pids)
        assert c.execute("import jax, os\nprint(len(jax.local_devices()))") == {0: "1\n", 1: "1\n"}
    finally:
        c.stop()
    cold = dinb.start_cluster(2, engines=engines, timeout_s=30, warm=False)
    try:
        assert not any(_parent_of(pid) == factory for pid in cold.pids)
    finally:
        cold.stop()


def _stub_and_child(args: list[str]) -> tuple[subprocess.Popen, int]:
    factory = warm_start.factory()
    before = set(_children(factory.proc.pid))
    stub = subprocess.Popen(factory.command("http.server") + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (new := set(_children(factory.proc.pid)) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(new) == 1, "the factory forked no child for the stub"
    return stub, new.pop()


def test_a_signal_to_the_stub_reaches_the_child_and_its_status_comes_back():
    stub, child = _stub_and_child(["--bind", "127.0.0.1", "0"])
    stub.send_signal(signal.SIGTERM)
    assert stub.wait(timeout=30) == 128 + signal.SIGTERM
    assert _wait_gone(child)


def test_a_child_ends_with_its_killed_stub():
    stub, child = _stub_and_child(["--bind", "127.0.0.1", "0"])
    stub.kill()  # SIGKILL: the stub forwards nothing; the child watches it
    stub.wait(timeout=30)
    assert _wait_gone(child)


def test_a_dead_factory_is_named_by_its_stubs_and_replaced():
    old = warm_start.factory()
    command = old.command("ipyparallel.engine")
    os.kill(old.proc.pid, signal.SIGKILL)
    old.proc.wait(timeout=30)
    stub = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=60)
    assert stub.returncode == 1
    assert "the warm engine factory" in stub.stderr and "was not started" in stub.stderr
    new = warm_start.factory()
    assert new is not old and new.alive()


def test_a_changed_import_environment_gets_a_new_factory(monkeypatch):
    old = warm_start.factory()
    assert warm_start.factory() is old
    monkeypatch.setenv("JAX_DINB_TEST_FLAG", "1")  # read when JAX is imported, as JAX_PLATFORMS is
    new = warm_start.factory()
    assert new is not old and not old.alive()
