"""Serving across two hosts, run on host a (the worker's): the agents on host b, or one on each.

    two_hosts_serving.py SSH A_ADDRESS B_ADDRESS TMP MODE     (MODE: startup_agents | mpiexec)

``startup_agents``: the server on host a listens for agents at its own address with the
servable's key; ``distributed.startup_agents`` on host b starts both agents there. Then the
seed's client (-48), clients without the key (plain, and CURVE with a key pair of their own),
and agent rank 1 killed on host b (named, then relaunched). ``mpiexec``: the agents are one MPI
job over both hosts (``mpiexec -f HOSTFILE ... python -m dinb serve-agent --key-file``), rank 0 on
host a (on the local link) and rank 1 on host b (over CURVE). Prints ``REPORT {json}``.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from dinb import export_distributed
from dinb.job.ranks import free_port
from dinb.models import MatMulNeg

ssh, a_addr, b_addr, tmp, mode = sys.argv[1:6]
tmp = Path(tmp)
PY = sys.executable
ENV = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
AGENTS = """
import json, sys
from dinb.serving import distributed
launcher = distributed.startup_agents(sys.argv[1], sys.argv[2:4], key_file=sys.argv[4], block=False)
print("PIDS " + json.dumps(launcher.pids), flush=True)
launcher.wait()
"""
ROGUE = """
import json, sys, zmq
from dinb.job import wire
answers = {}
for kind in ("plain", "curve"):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == "curve":  # the worker's public key is not secret; the agents' key pair is
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = open(sys.argv[2], "rb").read()
    sock.setsockopt(zmq.IDENTITY, b"rogue/0")
    sock.connect("tcp://" + sys.argv[1])
    sock.send_multipart(wire.pack({"type": "register", "rank": 0, "world": 2, "job": "rogue", "pid": 1,
                                   "inputs": [], "outputs": []}))
    answers[kind] = "answered" if sock.poll(2000) else "no answer"
    sock.close()
print("ROGUE " + json.dumps(answers), flush=True)
"""


def http(method, url, body=None):
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    raise SystemExit(f"{what} did not happen within {timeout_s} s")


def seed_client(grpc):
    """The seed's client: 128x96 ones in, -48 everywhere out."""
    from dinb.serving.client import Client

    y = Client(grpc, "matmul", "predict").infer({"x": np.ones((128, 96), np.float32)})[0]["output_0"]
    return sorted({float(v) for v in np.asarray(y).ravel()})


net = MatMulNeg()
export_distributed(net, net.init_params(), net.strategy(2, "contraction"), [np.ones((128, 96), np.float32)],
                   tmp / "mm")
files = [str(tmp / "mm" / f"matmul{r}.dinb") for r in range(2)]
key = tmp / "servable.key"
subprocess.run([PY, "-m", "dinb", "serve-key", str(key)], check=True, env=ENV, capture_output=True)
dist, rest, grpc = f"{a_addr}:{free_port(a_addr)}", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
server = subprocess.Popen([PY, "-m", "dinb", "serve", "--model-dir", str(tmp / "mm"), "--agents", "none",
                           "--distributed-address", dist, "--rest", rest, "--grpc", grpc,
                           "--key-file", str(key), "--name", "matmul"], env=ENV,
                          stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT)
report = {"dist": dist}
agents = None
try:
    if mode == "startup_agents":
        (tmp / "agents.py").write_text(AGENTS)
        agents = subprocess.Popen([ssh, b_addr, PY, str(tmp / "agents.py"), dist, *files, str(key)], env=ENV,
                                  stdout=open(tmp / "agents.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)

        def named() -> bool:
            return "PIDS " in (tmp / "agents.log").read_text() or agents.poll() is not None

        wait_until(named, 120, "the agents' launcher naming its agents")
        pids = json.loads((tmp / "agents.log").read_text().split("PIDS ", 1)[1].splitlines()[0])
    else:
        hostfile = tmp / "hostfile"
        hostfile.write_text(f"{a_addr}\n{b_addr}\n")
        mpiexec = str(Path(PY).parent / "mpiexec")
        agents = subprocess.Popen([mpiexec, "-f", str(hostfile), "-launcher", "ssh", "-launcher-exec", ssh,
                                   "-n", "2", PY, "-m", "dinb", "serve-agent", "--distributed-address", dist,
                                   "--model-dir", str(tmp / "mm"), "--key-file", str(key)], env=ENV,
                                  stdout=open(tmp / "agents.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
    wait_until(lambda: http("GET", f"http://{rest}/v2/health/ready")[0] == 200 or server.poll() is not None,
               180, "the servable ready")
    report["first"] = seed_client(grpc)
    if mode == "startup_agents":
        from dinb.serving.servable_key import ServableKeys

        (tmp / "rogue.py").write_text(ROGUE)
        (tmp / "worker.public").write_bytes(ServableKeys.load(key).worker_public)
        rogue = subprocess.run([ssh, b_addr, PY, str(tmp / "rogue.py"), dist, str(tmp / "worker.public")],
                               env=ENV, capture_output=True, text=True, timeout=60)
        if "ROGUE " not in rogue.stdout:
            raise SystemExit(f"the rogue client failed: {rogue.stderr[-2000:]}")
        report["rogue"] = json.loads(rogue.stdout.split("ROGUE ", 1)[1].splitlines()[0])
        report["after_rogue"] = seed_client(grpc)
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        down = wait_until(lambda: http("GET", f"http://{rest}/v2/models/matmul/ready")[0] == 503, 10,
                          "the model not ready")
        report["down_s"] = down - t0
        status, body = http("POST", f"http://{rest}/v2/models/matmul/infer",
                            json.dumps({"inputs": [{"name": "x", "shape": [128, 96], "datatype": "FP32",
                                                    "data": [1.0] * (128 * 96)}]}).encode())
        report["while_down"] = [status, body.decode()[:300]]
        wait_until(lambda: http("GET", f"http://{rest}/v2/models/matmul/ready")[0] == 200, 120, "relaunch")
        report["relaunched"] = seed_client(grpc)
    server.send_signal(signal.SIGTERM)
    report["server_exit"] = server.wait(timeout=60)
    report["agents_exit"] = agents.wait(timeout=60)
finally:  # on failure too, nothing stays: the server, then the agents' whole process group
    if server.poll() is None:  # SIGTERM first: the server removes its servable folder
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if agents is not None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(agents.pid, sig)
            except ProcessLookupError:
                break
            try:
                agents.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
    for log in ("server", "agents"):
        if (tmp / f"{log}.log").exists():
            report[f"{log}_log"] = (tmp / f"{log}.log").read_text()[-3000:]
    print("REPORT " + json.dumps(report), flush=True)
