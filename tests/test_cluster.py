"""Notebook ranks with real ipyparallel engines under mpiexec: predict, failures, recovery."""

import glob
import os
import signal
import threading
import time

import numpy as np
import pytest

import dinb
from dinb.errors import RankFailedError
from dinb.models import MatMulNeg
from dinb.notebook import cluster as cl
from dinb.notebook.dispatch import process_alive

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def matmul_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("matmul")
    net = MatMulNeg()
    x = np.ones((128, 96), np.float32)
    strategy = dinb.infer_predict_layout(net, x, device_num=2, strategy="contraction")
    dinb.export_distributed(net, net.init_params(), strategy, [x], out)
    return out


@pytest.fixture(scope="module")
def ranks(matmul_dir):
    c = dinb.start_cluster(2, timeout_s=30)
    c.context("cpu", "xla")
    c.load(matmul_dir, show_progress=False)
    yield c
    cl.stop_cluster()


X = np.ones((128, 96), np.float32)


def test_engines_are_ranks_and_predict_agrees(ranks):
    rows = ranks.status()
    assert [r["rank"] for r in rows] == [0, 1]
    assert len({r["pid"] for r in rows}) == 2 and all(r["alive"] for r in rows)
    assert [r["device"] for r in rows] == ["cpu:0", "cpu:2048"]
    assert all(r["loaded"] == str(ranks.model_dir) for r in rows)
    result = ranks.predict(X)
    np.testing.assert_array_equal(result.outputs[0], np.full((128, 16), -48, np.float32))
    assert result.agree
    every = ranks.outputs()  # each rank's own copy, fetched on demand
    assert sorted(every.per_rank) == [0, 1]
    for outs in every.per_rank.values():
        np.testing.assert_array_equal(outs[0], result.outputs[0])
    plain = ranks.predict(X, fast=False)  # through ipyparallel: every rank's outputs at once
    assert plain.agree and sorted(plain.per_rank) == [0, 1]
    assert ranks.ping() > 0
    assert ranks.strategy()["matmul_weight"].tensor_map == (1, 0)
    printed = ranks.execute("import dinb.notebook.engine as E\nprint('rank', E.rank(), E.model().world_size)")
    assert printed == {0: "rank 0 2\n", 1: "rank 1 2\n"}


def test_clear_messages_for_misuse(ranks, tmp_path):
    with pytest.raises(cl.ClusterError, match="already running"):
        dinb.start_cluster(2)
    with pytest.raises(RankFailedError, match=r"failed on rank\(s\) \[0, 1\]: rank 0: SliceFileError"):
        ranks.load(tmp_path, show_progress=False)
    with pytest.raises(RankFailedError, match="InputError"):
        ranks.predict(np.ones((3, 3), np.float32))


def test_stuck_rank_is_named_then_restart_recovers(ranks, matmul_dir):
    ranks.load(matmul_dir, show_progress=False)
    code = ("import time, numpy as np, dinb.notebook.engine as E\n"
            "if E.rank() == 1:\n    time.sleep(120)\n"
            "E.predict([np.ones((128, 96), np.float32)])")
    t0 = time.monotonic()
    stuck = r"rank\(s\) \[1\] did not finish .* rank\(s\) \[0\] are waiting"
    with pytest.raises(RankFailedError, match=stuck) as e:
        ranks.execute(code, timeout_s=4)
    assert e.value.ranks == (1,) and time.monotonic() - t0 < 30
    ranks.restart()
    assert ranks.predict(X).outputs[0][0, 0] == -48


def test_killed_rank_is_named_within_seconds_then_restart_recovers(ranks):
    before = set(glob.glob("/dev/shm/mpich_shm_*"))
    victim = ranks.pids[1]
    threading.Timer(0.3, lambda: os.kill(victim, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank\(s\) \[1\] died during predict") as e:
        for _ in range(100000):
            ranks.predict(X)
    assert 1 in e.value.ranks and time.monotonic() - t0 < 30
    ranks.restart()
    assert ranks.predict(X).agree
    assert set(glob.glob("/dev/shm/mpich_shm_*")) <= before  # a killed rank never finalized MPI


def test_killed_coordinator_rank_is_named_as_the_cause(ranks):
    """Rank 0 hosts the JAX coordinator: its death ends rank 1 too, and the cause comes first."""
    victim = ranks.pids[0]
    threading.Timer(0.3, lambda: os.kill(victim, signal.SIGKILL)).start()
    with pytest.raises(RankFailedError, match=r"^rank\(s\) \[0\] died during predict") as e:
        for _ in range(100000):
            ranks.predict(X)
    assert e.value.ranks == (0,)
    assert "rank(s) [1] were then ended by the job because rank 0 hosted its coordinator" in str(e.value)
    ranks.restart()
    assert ranks.predict(X).agree


def test_stop_leaves_no_process(matmul_dir):
    cl.stop_cluster()
    with pytest.raises(cl.ClusterError, match="no cluster is running"):
        cl.current()
    c = dinb.start_cluster(2, engines="local", timeout_s=30)
    c.load(matmul_dir, show_progress=False)
    assert c.predict(X).outputs[0][0, 0] == -48
    pids = list(c.pids)
    c.stop()
    deadline = time.monotonic() + 30  # wait for the processes to be gone, not a fixed time
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(process_alive(p) for p in pids)
