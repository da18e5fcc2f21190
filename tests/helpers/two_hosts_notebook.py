"""The notebook side of a two-host cluster, run on host a, with one engine per host: the Megatron
MLP on both, a client without the cluster's key trying host b's rank's predict socket, then that rank
killed or silenced. Prints one JSON report.

argv: SSH_SCRIPT HOST_A HOST_B NETNS_A NETNS_B WORKDIR MODE FAULT
MODE ``mpi``: ``start_cluster`` with MPI engines (mpiexec with a hostfile, hydra's ssh launcher
into host b). MODE ``attach``: a controller and two engines started by hand (``ipcontroller``
on host a's address, ``ipengine`` on each host), then ``start_cluster(connection_file=...)``.
FAULT ``kill``: rank 1's process is killed. ``silent``: host b's link goes down (no process
exits, nothing closes a connection: only the missing heartbeats tell).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

import dinb
from dinb.errors import RankFailedError
from dinb.job import wire
from dinb.models import MegatronMLP, mlp_reference

ssh, host_a, host_b, netns_a, netns_b, work, mode, fault = sys.argv[1:9]
work = Path(work)
report: dict = {}
started: list[subprocess.Popen] = []


def listening(netns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-ltnpH"], capture_output=True, text=True,
                         check=True).stdout
    return [f"{ln.split()[3]} {ln.split()[-1]}" for ln in out.splitlines() if ln.strip()]


m = MegatronMLP(d_model=64, d_ff=256, batch=4)
params = m.init_params(1)
x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
dinb.export_distributed(m, params, m.strategy(2), [x], work / "mlp")

cluster = None
try:
    if mode == "mpi":
        cluster = dinb.start_cluster(2, engines="mpi", hosts=[host_a, host_b],
                                     mpi_args=["-launcher", "ssh", "-launcher-exec", ssh], init_timeout_s=60)
    else:
        profile = work / "profile"
        python = [sys.executable, "-m"]
        started.append(subprocess.Popen([*python, "ipyparallel.controller", f"--ip={host_a}",
                                         f"--profile-dir={profile}", "--log-level=40"]))
        engine_file = profile / "security" / "ipcontroller-engine.json"
        client_file = profile / "security" / "ipcontroller-client.json"
        deadline = time.monotonic() + 60
        while not client_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for host in (host_a, host_b):
            engine = [*python, "ipyparallel.engine", f"--file={engine_file}", "--log-level=40"]
            remote = [ssh, host, " ".join(["exec", *engine])]
            started.append(subprocess.Popen(engine if host == host_a else remote))
        cluster = dinb.start_cluster(2, connection_file=str(client_file), init_timeout_s=60)
    report["status"] = [{k: row[k] for k in ("rank", "host", "address", "alive")} for row in cluster.status()]
    report["coordinator"] = cluster.coordinator
    cluster.load(work / "mlp", show_progress=False)
    result = cluster.predict(x)
    report["max_diff"] = float(np.abs(result.outputs[0] - mlp_reference(params, x)).max())
    report["agree"] = result.agree
    report["listening"] = {"a": listening(netns_a), "b": listening(netns_b)}
    pids = {row["rank"]: row["pid"] for row in cluster.status()}
    # the rank on host b (engines started by hand take their ranks in the order they registered)
    far = report["far"] = next(row["rank"] for row in cluster.status() if row["host"] != socket.gethostname())

    # a client without the cluster's key: plain, and CURVE with a key of its own
    endpoint = cluster.endpoints[far]
    tries = {}
    for kind in ("plain", "curve"):
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == "curve":
            public, secret = zmq.curve_keypair()
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = cluster.server_keys[far].encode()
        sock.connect(endpoint)
        sock.send_multipart(wire.pack({"noop": True}, []))
        tries[kind] = "answered" if sock.poll(1500) else "no answer"
        sock.close()
    report["unauthenticated"] = tries
    report["after_unauthenticated"] = float(np.abs(cluster.predict(x).outputs[0]
                                                   - mlp_reference(params, x)).max())

    # rank 1, on host b, dies or goes silent; the client names it
    link = ["ip", "-n", netns_b, "link", "set", "dinb0"]
    if fault == "kill":
        os.kill(pids[far], signal.SIGKILL)
    else:
        subprocess.run([*link, "down"], check=True)
    t0 = time.monotonic()
    try:
        cluster.predict(x, timeout_s=30)
        report["kill"] = "predict went on"
    except RankFailedError as e:
        report["kill"] = {"ranks": list(e.ranks), "message": str(e), "seconds": time.monotonic() - t0}
    if fault == "silent":
        subprocess.run([*link, "up"], check=True)
finally:
    if cluster is not None:
        cluster.stop()
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # an engine that lost its controller may not stop
            proc.kill()
            proc.wait(10)
print("REPORT " + json.dumps(report), flush=True)
