"""Distributed serving with real processes over loopback: Main, agents, tritonclient, curl-like calls.

Every server here is a real process (the seed's scripts, or ``python -m dinb serve``), every agent
a real rank process joined in a JAX job, and every client a real HTTP or gRPC client.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from dinb import export_distributed
from dinb.job.ranks import free_port
from dinb.models import MatMulNeg, MegatronMLP, mlp_reference

pytestmark = pytest.mark.mpi
PY = sys.executable
ENV = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")


# ---- helpers ---------------------------------------------------------------------------------------
def http(method, url, body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def wait_until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def ready(rest):
    return http("GET", f"http://{rest}/v2/health/ready", timeout=2)[0] == 200


def agent_processes(pid):
    """The ``serve-agent`` processes below ``pid``: its children, or the ranks of its mpiexec job."""
    from dinb.serving.agent_launcher import descendants

    def args(p):
        try:
            return open(f"/proc/{p}/cmdline").read().split("\0")
        except OSError:
            return []

    return [p for p in descendants(pid) if "serve-agent" in args(p) and "mpiexec" not in args(p)[0]]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def v2_json(x, name="x"):
    return json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()


class Serve:
    """``python -m dinb serve`` on free ports: Main, the worker and the agents' launcher."""

    def __init__(self, model_dir, batching=True, extra=()):
        for attempt in range(2):  # a free port can be taken by another process before the server binds it
            self.rest, self.grpc, self.dist = (f"127.0.0.1:{free_port()}" for _ in range(3))
            cmd = [PY, "-m", "dinb", "serve", "--model-dir", str(model_dir), "--rest", self.rest, "--grpc",
                   self.grpc, "--distributed-address", self.dist, *(["--batching"] if batching else []),
                   *extra]
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
            wait_until(lambda: self.proc.poll() is not None or ready(self.rest), 120,
                       f"the server at {self.rest}")
            if self.proc.poll() is None:
                return
            output = self.proc.stdout.read()
            if attempt or "in use" not in output:
                raise AssertionError(f"the server exited before it was ready:\n{output[-3000:]}")

    def agents(self):
        return agent_processes(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp")
    net = MegatronMLP(d_model=256, d_ff=1024, batch=8)
    params = net.init_params(1)
    export_distributed(net, params, net.strategy(2), net.example_inputs(), root / "mlp", batch_buckets=[1, 2, 4])
    server = Serve(root / "mlp")
    yield server, params
    server.stop()


# ---- the seed's flow --------------------------------------------------------------------------------
SEED_CONFIG = """
from dinb.serving import distributed
from dinb.serving import register

model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
"""
SEED_SERVER = """
import os
import sys
from dinb.serving import server
from dinb.serving import distributed


def start():
    servable_dir = os.path.dirname(os.path.realpath(sys.argv[0]))
    distributed.start_servable(servable_dir, "matmul", rank_table_json_file="rank_table_2pcs.json",
                               version_number=1, distributed_address="{dist}", wait_agents_time_in_seconds=0)
    server.start_grpc_server("{grpc}")
    server.start_restful_server("{rest}")


if __name__ == "__main__":
    start()
"""
SEED_AGENT = """
from dinb.serving import distributed


def start_agents():
    model_files = []
    for i in range(2):
        model_files.append(f"model/matmul{{i}}.dinb")
    distributed.startup_agents(distributed_address="{dist}", model_files=model_files,
                               group_config_files=None, agent_start_port={port}, agent_ip=None,
                               rank_start=None)


if __name__ == "__main__":
    start_agents()
"""
SEED_CLIENT = """
import numpy as np
from dinb.serving.client import Client


def run_matmul():
    client = Client("{grpc}", "matmul", "predict")
    instance = {{"x": np.ones((128, 96), np.float32)}}
    result = client.infer(instance)
    print("result:\\n", result)


if __name__ == "__main__":
    run_matmul()
"""


def seed_dir(tmp_path):
    addr = {"rest": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{free_port()}",
            "dist": f"127.0.0.1:{free_port()}", "port": free_port()}
    (tmp_path / "matmul").mkdir()
    (tmp_path / "matmul" / "servable_config.py").write_text(SEED_CONFIG)
    (tmp_path / "serving_server.py").write_text(textwrap.dedent(SEED_SERVER).format(**addr))
    (tmp_path / "serving_agent.py").write_text(textwrap.dedent(SEED_AGENT).format(**addr))
    (tmp_path / "serving_client.py").write_text(textwrap.dedent(SEED_CLIENT).format(**addr))
    (tmp_path / "rank_table_2pcs.json").write_text(json.dumps(
        {"version": "1.0", "server_count": "1", "status": "completed",
         "server_list": [{"server_id": "127.0.0.1", "device": [
             {"device_id": str(i), "device_ip": f"192.98.{i}.10", "rank_id": str(i)} for i in range(2)]}]}))
    net = MatMulNeg()
    x = np.ones((128, 96), np.float32)
    export_distributed(net, net.init_params(), net.strategy(2, "contraction"), [x], tmp_path / "model")
    return addr


def test_the_seeds_serving_flow_prints_minus_48(tmp_path):
    """MindSpore Serving's distributed example as written, dinb in place of mindspore_serving: server, agents, client."""
    addr = seed_dir(tmp_path)
    server = subprocess.Popen([PY, "serving_server.py"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    agents = subprocess.Popen([PY, "serving_agent.py"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: ready(addr["rest"]), 120, "the seed's server")
        out = subprocess.run([PY, "serving_client.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("result:\n [{'y': array([[-48., -48., -48., ..., -48., -48., -48.],")
        assert out.stdout.count("-48.") >= 36 and "dtype=float32)}]" in out.stdout
    finally:
        server.send_signal(signal.SIGTERM)  # drain, stop the agents: every process ends
        assert server.wait(timeout=60) == 0
        assert agents.wait(timeout=60) == 0, agents.stdout.read()


# ---- standard clients -------------------------------------------------------------------------------
def test_tritonclient_http_and_grpc_unchanged(mlp):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    server, params = mlp
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    want = mlp_reference(params, x)
    for mod, url in ((th, server.rest), (tg, server.grpc)):
        client = mod.InferenceServerClient(url)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
        meta = client.get_model_metadata("mlp")
        inputs = meta["inputs"] if mod is th else [
            {"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in meta.inputs]
        assert inputs == [{"name": "x", "datatype": "FP32", "shape": [-1, 256]}]
        for binary in (True, False):
            inp = mod.InferInput("x", list(x.shape), "FP32")
            if mod is th:
                inp.set_data_from_numpy(x, binary_data=binary)
                out = mod.InferRequestedOutput("output_0", binary_data=binary)
            else:
                inp.set_data_from_numpy(x)
                out = mod.InferRequestedOutput("output_0")
            got = client.infer("mlp", [inp], outputs=[out]).as_numpy("output_0")
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
        if mod is th:
            got = client.async_infer("mlp.predict", [inp]).get_result().as_numpy("output_0")
        else:
            got = grpc_async(client, inp)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def grpc_async(client, inp):
    done = []
    client.async_infer("mlp.predict", [inp], callback=lambda result, error: done.append((result, error)))
    wait_until(lambda: done, 30, "the async gRPC call")
    assert done[0][1] is None
    return done[0][0].as_numpy("output_0")


def test_mindspore_rest_form_and_client(mlp):
    from dinb.serving.client import Client

    server, params = mlp
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    body = json.dumps({"instances": [{"x": row.tolist()} for row in x]}).encode()
    status, data, _ = http("POST", f"http://{server.rest}/model/mlp:predict", body)
    assert status == 200
    got = np.array([inst["output_0"] for inst in json.loads(data)["instances"]], np.float32)
    np.testing.assert_allclose(got, mlp_reference(params, x), rtol=2e-4, atol=2e-4)
    client = Client(server.grpc, "mlp", "predict")
    result = client.infer([{"x": row} for row in x])
    assert [list(r) for r in result] == [["output_0"], ["output_0"]] and result[0]["output_0"].shape == (256,)
    np.testing.assert_allclose(np.stack([r["output_0"] for r in result]), mlp_reference(params, x),
                               rtol=2e-4, atol=2e-4)
    assert client.infer_async({"x": x[0]}).result(timeout=30)[0]["output_0"].shape == (256,)


def test_concurrent_requests_are_merged_into_batches(mlp):
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    server, params = mlp
    rows = np.random.default_rng(2).standard_normal((24, 256)).astype(np.float32)

    async def one(stub, i):
        req = pb.ModelInferRequest(model_name="mlp")
        req.inputs.append(pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 256]))
        req.raw_input_contents.append(rows[i:i + 1].tobytes())
        resp = await stub.ModelInfer(req)
        return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, 256)

    async def burst():
        async with grpc.aio.insecure_channel(server.grpc) as channel:
            stub = pbg.GRPCInferenceServiceStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(24)))

    before = batch_rows(server.rest)
    got = np.concatenate(asyncio.run(burst()))
    np.testing.assert_allclose(got, mlp_reference(params, rows), rtol=2e-4, atol=2e-4)
    after = batch_rows(server.rest)
    runs, merged = after[0] - before[0], after[1] - before[1]
    assert merged == 24 and runs < 24  # fewer model runs than requests: requests shared batches


def test_a_lone_request_runs_at_the_smallest_batch_bucket(mlp):
    """The export has programs for 1, 2, 4 and 8 rows: requests one after the other each run the
    1-row program instead of being padded to 8."""
    server, params = mlp
    x = np.random.default_rng(3).standard_normal((1, 256)).astype(np.float32)
    before = bucket_runs(server.rest)
    for _ in range(5):
        status, data, _ = http("POST", f"http://{server.rest}/v2/models/mlp/infer", v2_json(x))
        assert status == 200, data
        got = np.asarray(json.loads(data)["outputs"][0]["data"], np.float32).reshape(1, 256)
        np.testing.assert_allclose(got, mlp_reference(params, x), rtol=2e-4, atol=2e-4)
    status, data, _ = http("POST", f"http://{server.rest}/v2/models/mlp/infer", v2_json(np.tile(x, (3, 1))))
    assert status == 200, data
    after = bucket_runs(server.rest)
    assert after.get("1", 0) - before.get("1", 0) == 5 and after.get("4", 0) - before.get("4", 0) == 1


def bucket_runs(rest):
    """Model runs so far by the batch bucket they ran at, from the Prometheus metrics."""
    text = http("GET", f"http://{rest}/metrics")[1].decode()
    return {b: float(v) for b, v in re.findall(r'^dinb_batch_runs_total\{bucket="(\d+)",servable="mlp"\} (\S+)$',
                                                 text, re.M)}


def batch_rows(rest):
    """(model runs, rows run) so far, from the Prometheus metrics."""
    text = http("GET", f"http://{rest}/metrics")[1].decode()
    count = re.search(r'^dinb_batch_rows_count\{servable="mlp"\} (\S+)$', text, re.M)
    total = re.search(r'^dinb_batch_rows_sum\{servable="mlp"\} (\S+)$', text, re.M)
    return (float(count.group(1)), float(total.group(1))) if count and total else (0.0, 0.0)


# ---- bad requests -----------------------------------------------------------------------------------
BINARY_HEAD = b'{"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "parameters": {"binary_data_size": 1024}}]}'

def test_bad_requests_get_4xx_naming_the_problem_and_the_server_stays_up(mlp):
    server, _ = mlp
    url = f"http://{server.rest}/v2/models"
    x = np.ones((1, 256), np.float32)
    cases = [
        ("POST", f"{url}/nothing/infer", v2_json(x), {}, 404, "no model 'nothing'"),
        ("POST", f"{url}/mlp.train/infer", v2_json(x), {}, 404, "no method 'train'"),
        ("POST", f"{url}/mlp/infer", b'{"inputs": []}', {}, 400, "missing ['x']"),
        ("POST", f"{url}/mlp/infer", v2_json(x, "y")[:-2] + b', {"name": "x", "shape": [1, 256], "datatype": '
         b'"FP32", "data": ' + json.dumps([1.0] * 256).encode() + b"}]}", {}, 400, "not inputs of it: ['y']"),
        ("POST", f"{url}/mlp/infer", v2_json(np.ones((1, 3), np.float32)), {}, 400,
         "must have shape [n, 256]"),
        ("POST", f"{url}/mlp/infer", v2_json(x).replace(b'"FP32"', b'"INT32"'), {}, 400, "must be float32"),
        ("POST", f"{url}/mlp/infer", b"{not json", {}, 400, "not valid JSON"),
        ("POST", f"{url}/mlp/infer", BINARY_HEAD + b"\0" * 1000,  # 1000 bytes where 1024 are announced
         {"Inference-Header-Content-Length": str(len(BINARY_HEAD))}, 400, "binary_data_size"),
        ("POST", f"{url}/mlp/infer", b"x" * (101 * 2**20), {}, 413, ""),
        ("POST", "http://" + server.rest + "/model/mlp:predict", b'{"instances": 3}', {}, 400, "instances"),
    ]
    for method, target, body, headers, code, words in cases:
        status, data, _ = http(method, target, body, headers)
        assert status == code, (target, status, data[:200])
        if words:
            assert words in json.loads(data).get("error", json.loads(data).get("error_msg", "")), data[:300]
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))
    for model, shape, dtype, raw, code, words in (
            ("mlp", [1, 3], "FP32", b"\0" * 12, "INVALID_ARGUMENT", "must have shape"),
            ("mlp", [1, 256], "FP64", b"\0" * 2048, "INVALID_ARGUMENT", "must be float32"),
            ("mlp", [1, 256], "FP32", b"\0" * 10, "INVALID_ARGUMENT", "needs 1024 bytes"),
            ("elsewhere", [1, 256], "FP32", b"\0" * 1024, "NOT_FOUND", "no model 'elsewhere'")):
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.append(pb.ModelInferRequest.InferInputTensor(name="x", datatype=dtype, shape=shape))
        req.raw_input_contents.append(raw)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=30)
        assert e.value.code().name == code and words in e.value.details(), e.value.details()
    assert ready(server.rest) and server.proc.poll() is None


# ---- load ---------------------------------------------------------------------------------------------
def test_load_2000_requests_at_concurrency_32_both_protocols_10_percent_malformed(mlp):
    import aiohttp
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    server, params = mlp
    rng = np.random.default_rng(3)
    pool = rng.standard_normal((64, 256)).astype(np.float32)
    want = mlp_reference(params, pool).astype(np.float32)
    results = {"ok": 0, "bad": 0, "wrong": 0, "lost": 0}

    async def rest_call(session, i, bad):
        row = pool[i % 64:i % 64 + 1]
        body = b'{"inputs": [{"name": "x", "shape": [1, 255]' if bad else v2_json(row)
        async with session.post(f"http://{server.rest}/v2/models/mlp/infer", data=body) as r:
            data = await r.read()
            if bad:
                return "bad" if 400 <= r.status < 500 else "wrong"
            got = np.array(json.loads(data)["outputs"][0]["data"], np.float32)
            right = r.status == 200 and np.allclose(got, want[i % 64], rtol=2e-4, atol=2e-4)
            return "ok" if right else "wrong"

    async def grpc_call(stub, i, bad):
        req = pb.ModelInferRequest(model_name="mlp")
        req.inputs.append(pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 256]))
        req.raw_input_contents.append(pool[i % 64].tobytes()[: 100 if bad else None])
        try:
            resp = await stub.ModelInfer(req)
        except grpc.aio.AioRpcError as e:
            return "bad" if bad and e.code() == grpc.StatusCode.INVALID_ARGUMENT else "wrong"
        got = np.frombuffer(resp.raw_output_contents[0], np.float32)
        return "ok" if not bad and np.allclose(got, want[i % 64], rtol=2e-4, atol=2e-4) else "wrong"

    async def load(n, first):
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(server.grpc) as channel:
            stub = pbg.GRPCInferenceServiceStub(channel)

            async def one(i):
                async with sem:
                    bad = (i * 7919) % 10 == 0  # 10% malformed, spread out
                    try:
                        call = rest_call(session, i, bad) if i % 2 else grpc_call(stub, i, bad)
                        return await asyncio.wait_for(call, 60)
                    except Exception:
                        return "lost"

            return await asyncio.gather(*(one(first + i) for i in range(n)))

    asyncio.run(load(200, 0))  # warm up: the server's memory settles
    before = rss_mib(server.proc.pid)
    for outcome in asyncio.run(load(2000, 200)):
        results[outcome] += 1
    after = rss_mib(server.proc.pid)
    assert results["lost"] == 0 and results["wrong"] == 0, results
    assert results["ok"] + results["bad"] == 2000 and 150 <= results["bad"] <= 250, results
    assert after - before < 25, f"the server grew from {before:.0f} to {after:.0f} MiB"


# ---- failure and life cycle ----------------------------------------------------------------------------
def test_a_killed_agent_is_named_within_5_s_then_relaunched_without_restarting_main(mlp):
    import tritonclient.grpc as tg

    server, params = mlp
    agents = server.agents()
    assert len(agents) == 2
    victim = [p for p in agents if "--rank 1" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")][0]
    x = np.ones((1, 256), np.float32)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    t_down = wait_until(lambda: http("GET", f"http://{server.rest}/v2/models/mlp/ready")[0] == 503, 5,
                        "model ready turning false")
    assert t_down - t0 < 5
    status, data, _ = http("POST", f"http://{server.rest}/v2/models/mlp/infer", v2_json(x))
    if status == 503:  # not relaunched yet: the error names the dead rank
        assert "rank 1 died" in json.loads(data)["error"]
    client = tg.InferenceServerClient(server.grpc)
    wait_until(lambda: client.is_model_ready("mlp"), 60, "the relaunched agents")
    status, data, _ = http("POST", f"http://{server.rest}/v2/models/mlp/infer", v2_json(x))
    assert status == 200 and server.proc.poll() is None
    assert not alive(victim) and set(server.agents()).isdisjoint(agents)


def test_sigterm_drains_and_leaves_no_process(tmp_path):
    net = MegatronMLP(d_model=128, d_ff=512, batch=4)
    export_distributed(net, net.init_params(), net.strategy(2), net.example_inputs(), tmp_path / "m")
    server = Serve(tmp_path / "m")
    agents = server.agents()

    async def burst():
        import aiohttp

        served = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async def client():
                """Requests one after another until the server stops taking them, so that some
                are in flight whenever SIGTERM comes (waiting on the clock raced a busy machine)."""
                got = []
                while len(got) < 5000:
                    try:
                        async with session.post(f"http://{server.rest}/v2/models/mlp/infer",
                                                data=v2_json(np.ones((1, 128), np.float32))) as r:
                            got.append(r.status)
                    except aiohttp.ClientError:
                        got.append("refused")
                    if got[-1] == 200:
                        served.set()
                    else:
                        return got
                return got

            tasks = [asyncio.create_task(client()) for _ in range(16)]
            await asyncio.wait_for(served.wait(), 60)
            server.proc.send_signal(signal.SIGTERM)
            return [s for got in await asyncio.gather(*tasks) for s in got]

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 503, "refused"} and statuses.count(200) > 0, statuses
    assert server.proc.wait(timeout=60) == 0
    wait_until(lambda: not any(alive(p) for p in agents), 10, "the agents ending")


def test_agents_before_the_worker_and_a_worker_restarted_under_running_agents(tmp_path):
    addr = seed_dir(tmp_path)
    agents = subprocess.Popen([PY, "serving_agent.py"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        # the agents are up (their processes started) and wait for their worker
        wait_until(lambda: len(agent_processes(agents.pid)) == 2, 60, "the two agent processes")
        assert agents.poll() is None
        for attempt in range(2):  # the second server starts under the same, still running agents
            server = subprocess.Popen([PY, "serving_server.py"], cwd=tmp_path, env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wait_until(lambda: ready(addr["rest"]), 60, f"server {attempt} getting the agents")
            body = v2_json(np.ones((128, 96), np.float32))
            status, data, _ = http("POST", f"http://{addr['rest']}/v2/models/matmul/infer", body)
            assert status == 200 and set(json.loads(data)["outputs"][0]["data"]) == {-48.0}
            if attempt == 0:
                server.kill()  # no drain, no stop message: the agents keep running
                server.wait(timeout=10)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert agents.wait(timeout=60) == 0
    finally:
        for p in (agents, server):
            if p.poll() is None:
                p.kill()


def test_notebook_engines_and_mpiexec_ranks_serve_as_agents(tmp_path):
    """Main in this process; the agents are notebook engines, then ranks under mpiexec."""
    import dinb
    from dinb.cli import mpiexec_path
    from dinb.notebook import cluster as cl
    from dinb.serving import distributed, server

    addr = seed_dir(tmp_path)
    x = v2_json(np.ones((128, 96), np.float32))
    engines = dinb.start_cluster(2, timeout_s=60)
    try:
        engines.load(tmp_path / "model", show_progress=False)
        engines.serve(addr["dist"])
        distributed.start_servable(tmp_path, "matmul", distributed_address=addr["dist"],
                                   wait_agents_time_in_seconds=60, handle_sigterm=False)
        server.start_restful_server(addr["rest"])
        status, data, _ = http("POST", f"http://{addr['rest']}/v2/models/matmul/infer", x)
        assert status == 200 and set(json.loads(data)["outputs"][0]["data"]) == {-48.0}
        with pytest.raises(dinb.RankFailedError, match="serves a servable"):
            engines.predict(np.ones((128, 96), np.float32))
        engines.stop_serving()
        wait_until(lambda: http("GET", f"http://{addr['rest']}/v2/models/matmul/ready")[0] == 503, 10,
                   "the servable noticing the engines left")
        ranks = subprocess.Popen([mpiexec_path(), "-n", "2", PY, "-m", "dinb", "serve-agent", "--distributed-address",
                                  addr["dist"], "--model-dir", str(tmp_path / "model")], env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: ready(addr["rest"]), 60, "the mpiexec ranks registering")
        status, data, _ = http("POST", f"http://{addr['rest']}/v2/models/matmul/infer", x)
        assert status == 200 and set(json.loads(data)["outputs"][0]["data"]) == {-48.0}
    finally:
        server.stop()
        cl.stop_cluster()
    assert ranks.wait(timeout=60) == 0, ranks.stdout.read()  # the server told them to stop


def test_declaration_errors_name_what_to_do(tmp_path):
    from dinb.serving import distributed
    from dinb.serving.register import ServableError

    (tmp_path / "piped").mkdir()
    (tmp_path / "piped" / "servable_config.py").write_text(
        "from dinb.serving import distributed\nmodel = distributed.declare_servable(rank_size=4, stage_size=3)\n")
    with pytest.raises(ServableError, match="stage_size 3 must divide rank_size 4"):
        distributed.load_servable(tmp_path, "piped")
    with pytest.raises(ServableError, match="servable_config.py does not exist"):
        distributed.load_servable(tmp_path, "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "servable_config.py").write_text(
        "from dinb.serving import distributed\nmodel = distributed.declare_servable(rank_size=2)\n")
    with pytest.raises(ServableError, match="registers no method"):
        distributed.load_servable(tmp_path, "empty")
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"server_list": [{"device": [{"device_id": "0"}] * 8}]}))
    (tmp_path / "seed").mkdir()
    seed_dir(tmp_path / "seed")
    with pytest.raises(ServableError, match="lists 8 devices but servable 'matmul' declares rank_size=2"):
        distributed.start_servable(tmp_path / "seed", "matmul", rank_table_json_file=str(table),
                                   handle_sigterm=False)


def test_waiting_without_limit_says_which_ranks_are_missing(caplog):
    """wait_agents_time_in_seconds=0 waits without limit, naming the missing ranks every few seconds."""
    from dinb.serving.worker import DistributedWorker

    async def wait():
        worker = DistributedWorker("lonely", 2, f"127.0.0.1:{free_port()}")
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_ready(None, every_s=0.2), 1.0)
        except TimeoutError:
            pass
        finally:
            await worker.stop()

    with caplog.at_level("WARNING", logger="dinb.serving"):
        asyncio.run(wait())
    lines = [r.getMessage() for r in caplog.records if "waits for rank(s) [0, 1] of 2" in r.getMessage()]
    assert len(lines) >= 3


def test_a_stuck_rank_fails_the_request_in_flight_at_once(mlp):
    """Rank 1 stopped (SIGSTOP) mid-service: the request waiting for it gets 503 naming it within
    the heartbeat timeout, not the request timeout; then the rank is killed and relaunched."""
    server, _ = mlp
    wait_until(lambda: ready(server.rest) and len(server.agents()) == 2, 60, "two ready agents")
    victim = [p for p in server.agents() if "--rank 1" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")][0]
    os.kill(victim, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, data, _ = http("POST", f"http://{server.rest}/v2/models/mlp/infer", v2_json(np.ones((1, 256), np.float32)))
        assert status == 503 and "rank 1 died" in json.loads(data)["error"], data
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(victim, signal.SIGKILL)
    wait_until(lambda: ready(server.rest), 60, "the relaunched agents")


class Scaled:
    """y = (x @ W) * scale: ``x`` has the batch axis, ``scale`` (one per feature) has none."""

    @staticmethod
    def model():
        from dinb.models.base import ModelDef, TensorSpec
        from dinb.sharding.layout import Layout
        from dinb.sharding.strategy import Strategy

        class ScaledModel(ModelDef):
            name = "scaled"
            strategy_names = ("columns",)
            default_strategy = "columns"

            def param_shapes(self):
                return {"w": (8, 8)}

            def init_params(self, seed=0):
                return {"w": 2 * np.eye(8, dtype=np.float32)}

            def apply(self, p, x, scale):
                return (x @ p["w"]) * scale

            def input_specs(self):
                return (TensorSpec("x", (4, 8)), TensorSpec("scale", (8,)))

            def _strategy(self, n, name, shapes):
                return Strategy({"w": Layout([n], [-1, 0])}, inputs=[Layout([n], [-1, -1]), Layout([n], [-1])],
                                outputs=[Layout([n], [-1, -1])])

        return ScaledModel()


def test_inputs_without_a_batch_axis_merge_only_when_equal(tmp_path):
    from dinb.serving import distributed, server
    from dinb.serving.client import Client
    from dinb.serving.main import Main

    net = Scaled.model()
    files = export_distributed(net, net.init_params(), net.strategy(2), [((4, 8), "float32"), ((8,), "float32")],
                               tmp_path / "slices")
    (tmp_path / "scaled").mkdir()
    (tmp_path / "scaled" / "servable_config.py").write_text(
        "from dinb.serving import distributed, register\n"
        "model = distributed.declare_servable(rank_size=2, with_batch_dim=True, without_batch_dim_inputs=[1])\n"
        "@register.register_method(output_names=['y'])\n"
        "def predict(x, scale):\n"
        "    return register.add_stage(model, x, scale, outputs_count=1)\n")
    dist, grpc_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    launcher = distributed.startup_agents(dist, files, agent_start_port=free_port(), block=False)
    try:
        distributed.start_servable(tmp_path, "scaled", distributed_address=dist, wait_agents_time_in_seconds=60,
                                   handle_sigterm=False, batch_delay_ms=50)
        server.start_grpc_server(grpc_address)
        client = Client(grpc_address, "scaled", "predict")
        meta = client.metadata()
        assert [(i.name, list(i.shape)) for i in meta.inputs] == [("x", [-1, 8]), ("scale", [8])]
        rng = np.random.default_rng(0)
        xs = rng.standard_normal((6, 1, 8)).astype(np.float32)
        scales = [np.full(8, s, np.float32) for s in (1.0, 3.0, 1.0, 1.0, 3.0, 1.0)]  # 4 and 2: some merge
        futures = [client.infer_async([{"x": x[0], "scale": s}]) for x, s in zip(xs, scales)]
        for x, s, f in zip(xs, scales, futures):
            np.testing.assert_allclose(f.result(timeout=60)[0]["y"], 2 * x[0] * s, rtol=1e-6)
        rows = Main.current().metrics.rows.labels("scaled")
        runs = rows._sum.get(), sum(b.get() for b in rows._buckets)  # rows run, model runs
        # every row ran once; whether requests merged depends on when they arrived (a request that
        # finds the ranks idle runs at once), so the count is not asserted: that no run merged
        # across scales is what the values above check (2 * x * its own scale)
        assert runs[0] == 6 and 1 <= runs[1] <= 6
        worker = Main.current().servables["scaled"].worker  # the agents of this host took the local link
        assert sorted(worker.agents) == [0, 1]
        assert all(worker._link.linked(a.identity.decode()) for a in worker.agents.values())
    finally:
        server.stop()
        launcher.stop()


def test_a_pipelined_export_serves_with_stage_size_2(tmp_path):
    """rank_size=4, stage_size=2: requests go to stage 0's ranks, answers come from stage 1's."""
    from dinb import infer_predict_layout
    from dinb.models import DeepMLP, deep_mlp_reference

    net = DeepMLP(d_model=64, d_ff=128, layers=4, batch=8)
    params = net.init_params(2)
    x = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    export_distributed(net, params, infer_predict_layout(net, x, device_num=4, pipeline_stages=2), [x],
                       tmp_path / "deep")
    server = Serve(tmp_path / "deep", batching=False, extra=["--name", "deep"])
    try:
        status, data, _ = http("POST", f"http://{server.rest}/v2/models/deep/infer", v2_json(x))
        assert status == 200, data
        out = np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(8, 64)
        np.testing.assert_allclose(out, deep_mlp_reference(params, x, 4), rtol=1e-5, atol=1e-5)
        assert len(server.agents()) == 4
    finally:
        log = server.stop()
    assert "serving deep (4 ranks" in log


def test_agents_of_another_stage_count_are_refused_naming_both():
    import zmq

    from dinb.job import wire
    from dinb.serving.worker import DistributedWorker

    async def register():
        address = f"127.0.0.1:{free_port()}"
        worker = DistributedWorker("deep", 4, address, stage_size=2)
        await worker.start()
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"job/0")
        sock.connect(f"tcp://{address}")
        try:
            await sock.send_multipart(wire.pack({"type": "register", "world": 4, "stages": 1, "rank": 0,
                                                 "job": "job", "pid": 1, "inputs": [], "outputs": []}))
            return wire.header(await asyncio.wait_for(sock.recv_multipart(), 10))
        finally:
            sock.close(linger=0)
            await worker.stop()

    import zmq.asyncio  # noqa: F401 - the asyncio flavour of the worker's own sockets

    reply = asyncio.run(register())
    assert reply["type"] == "refused"
    assert "declares stage_size=2, this agent's export has 1 pipeline stage(s)" in reply["reason"]
