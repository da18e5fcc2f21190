"""Ranks on two hosts: two network namespaces of this machine, joined by a veth pair.

Every rank of the other namespace is as remote as a rank of another machine: its own address,
its own host name, no route to this namespace's loopback. The tests need root (they create the
namespaces and remove them afterwards) and skip with the reason otherwise.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from dinb import export_distributed
from dinb.cli import NOISE
from dinb.models import MatMulNeg

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "helpers"))
import two_hosts  # noqa: E402

pytestmark = pytest.mark.mpi
SEED_LINE = "output data is: " + " ".join(["-48.0"] * 10)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    try:
        pair = two_hosts.make(tmp_path_factory.mktemp("hosts"))
    except two_hosts.Unavailable as e:
        pytest.skip(f"two hosts as network namespaces: {e}")
    yield pair
    pair.remove()


def mpiexec(hosts, tmp_path, n, program, timeout_s=120, extra_env=None):
    """``mpiexec -f HOSTFILE -n N PROGRAM`` started on host a, one rank per host in turn."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{hosts.a.address}\n{hosts.b.address}\n")
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    cmd = [mpiexec, "-f", str(hostfile), "-launcher", "ssh", "-launcher-exec", str(hosts.ssh),
           "-n", str(n), *program]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", **(extra_env or {}))
    proc = hosts.a.run(*cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    proc.stdout = "\n".join(ln for ln in proc.stdout.splitlines() if not NOISE.search(ln))
    return proc


def export_matmul(path, n=2):
    m = MatMulNeg()
    x = np.ones((128, 96), np.float32)
    export_distributed(m, m.init_params(), m.strategy(n, "contraction"), [x], path)
    return path


@pytest.mark.parametrize("collectives", ["auto", "gloo"])
def test_seed_matmul_gives_minus_48_with_one_rank_on_each_host(hosts, tmp_path, collectives):
    (tmp_path / "run.ini").write_text(f"[runtime]\ncollectives = {collectives}\n")
    proc = mpiexec(hosts, tmp_path, 2, [sys.executable, "-m", "dinb", "run", "--model-dir",
                                        str(export_matmul(tmp_path / "mm")), "--config-file",
                                        str(tmp_path / "run.ini")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(SEED_LINE) == 2
    assert f"collectives: {'mpi' if collectives == 'auto' else 'gloo'}" in proc.stdout
    # rank 0 hosts the coordinator on its address on the route to host b, not on loopback
    where = f"(rank 0); rank 0 on {hosts.a.address}, rank 1 on {hosts.b.address}"
    assert f"addresses: coordinator {hosts.a.address}:" in proc.stdout and where in proc.stdout, proc.stdout


def test_dinb_listens_on_each_hosts_own_address_only(hosts, tmp_path):
    """``ss`` in each namespace: the JAX coordinator and gloo listen on that host's address;
    nothing of dinb's on a wildcard address or on the other host's."""
    (tmp_path / "gloo.ini").write_text("[runtime]\ncollectives = gloo\n")
    proc = mpiexec(hosts, tmp_path, 2, [sys.executable, str(HERE / "helpers" / "listening_rank.py"),
                                        str(export_matmul(tmp_path / "mm")), str(tmp_path / "gloo.ini")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    assert [r["value"] for r in reports] == [-48.0, -48.0]
    assert reports[0]["addresses"] == [hosts.a.address, hosts.b.address]
    for report, host in zip(reports, (hosts.a, hosts.b)):
        listened = {addr.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") for addr in report["dinb"]}
        # rank 0: the coordinator and gloo; rank 1: gloo
        assert listened == {host.address}, report
        assert len(report["dinb"]) == (2 if report["rank"] == 0 else 1), report


def test_a_coordinator_address_not_of_rank_0s_host_is_named_by_every_rank(hosts, tmp_path):
    wrong = hosts.b.address  # host b's address: rank 0 (on host a) cannot listen there
    proc = mpiexec(hosts, tmp_path, 2, [sys.executable, "-m", "dinb", "run", "--model-dir",
                                        str(export_matmul(tmp_path / "mm")), "--coordinator-address", wrong])
    assert proc.returncode != 0
    said = f"rank 0 could not pick the coordinator's address: cannot listen on {wrong}"
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]


def test_the_coordinator_address_from_the_environment(hosts, tmp_path):
    proc = mpiexec(hosts, tmp_path, 2, [sys.executable, "-m", "dinb", "run", "--model-dir",
                                        str(export_matmul(tmp_path / "mm"))],
                   extra_env={"DINB_COORDINATOR_ADDRESS": f"{hosts.a.address}:29431"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"addresses: coordinator {hosts.a.address}:29431 (rank 0)" in proc.stdout


@pytest.mark.parametrize("mode, fault", [("mpi", "kill"), ("attach", "silent")])
def test_notebook_cluster_with_one_engine_on_each_host(hosts, tmp_path, mode, fault):
    """The notebook runs on host a. ``mpi``: ``start_cluster(2, hosts=[a, b])`` (mpiexec with a
    hostfile); ``attach``: engines started by hand on each host, joined by connection file.
    Then rank 1 dies (``kill``) or host b falls silent (``silent``: its link goes down)."""
    args = [str(hosts.ssh), hosts.a.address, hosts.b.address, hosts.a.netns, hosts.b.netns, str(tmp_path),
            mode, fault]
    proc = hosts.a.run(sys.executable, str(HERE / "helpers" / "two_hosts_notebook.py"), *args,
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2"))
    assert "REPORT " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    # the rank sharing the notebook's host is on loopback; the other is at host b's address (under
    # mpiexec rank 1, the hostfile's second host; attached engines take ranks as they registered)
    far = report["far"]
    assert far == 1 or mode == "attach"
    rows = {row["rank"]: row for row in report["status"]}
    assert rows[far] == {"rank": far, "host": hosts.b.name, "address": hosts.b.address, "alive": True}
    assert rows[1 - far] == {"rank": 1 - far, "host": hosts.a.name, "address": "127.0.0.1", "alive": True}
    rank0_host = hosts.b if far == 0 else hosts.a
    assert report["coordinator"].startswith(rank0_host.address + ":")
    assert report["max_diff"] < 1e-4 and report["agree"]
    # nothing listens on a wildcard address but mpiexec's own control socket (hydra's); what
    # listens off loopback is on the host's own address
    for key, host in (("a", hosts.a), ("b", hosts.b)):
        for line in report["listening"][key]:
            address, owners = line.split(" ", 1)
            ip = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            if ip in ("0.0.0.0", "*", "::"):
                assert "mpiexec" in owners, line
            else:
                assert ip in ("127.0.0.1", host.address), line
    assert any(line.startswith(hosts.b.address + ":") for line in report["listening"]["b"])
    # a client without the cluster's key gets nothing from host b's rank's predict socket, and the
    # cluster's own predicts go on
    assert report["unauthenticated"] == {"plain": "no answer", "curve": "no answer"}
    assert report["after_unauthenticated"] < 1e-4
    # rank 1 killed or silent on host b: named (not the ranks that follow it), within 5 s
    kill = report["kill"]
    assert kill != "predict went on"
    assert kill["ranks"] == [far], kill["message"]
    assert f"on {hosts.b.name}" in kill["message"]
    assert kill["seconds"] < 5, kill


@pytest.mark.parametrize("mode", ["startup_agents", "mpiexec"])
def test_serving_with_agents_on_the_other_host(hosts, tmp_path, mode):
    """The worker on host a listens at host a's address, CURVE with the servable's key.
    ``startup_agents``: both agents on host b; the seed's client gets -48, clients without the
    key get nothing and change nothing, and a killed agent on host b is named within 5 s, then
    relaunched. ``mpiexec``: one agent on each host, as one MPI job."""
    proc = hosts.a.run(sys.executable, str(HERE / "helpers" / "two_hosts_serving.py"), str(hosts.ssh),
                       hosts.a.address, hosts.b.address, str(tmp_path), mode, capture_output=True, text=True,
                       timeout=400, env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2"))
    assert "REPORT " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    logs = report.get("server_log", "") + report.get("agents_log", "")
    assert report["dist"].startswith(hosts.a.address + ":")
    assert report.get("first") == [-48.0], logs
    if mode == "startup_agents":
        assert report["rogue"] == {"plain": "no answer", "curve": "no answer"}
        assert report["after_rogue"] == [-48.0]
        assert report["down_s"] < 5, report
        status, body = report["while_down"]
        assert status == 200 or (status == 503 and "rank 1 died" in body), report["while_down"]
        assert report["relaunched"] == [-48.0]
    assert report["server_exit"] == 0 and report["agents_exit"] == 0, logs
