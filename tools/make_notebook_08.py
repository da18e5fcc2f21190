"""Writes notebooks/08_serving.ipynb; ``--execute`` stores the outputs nbval compares."""

from nbtools import CHECK, code, exercises, md, write_notebook

IGNORE = "# NBVAL_IGNORE_OUTPUT\n"

cells = [
    md("""# 08 · Serving a model split over ranks

MindSpore Serving's distributed serving (MindSpore Serving's distributed example) has three parts: **Main**, the process clients
talk to (REST and gRPC); a **Distributed Worker**, which the agents join and which runs every
request on all of them; and one **Agent** per rank, holding that rank's slice. dinb keeps the
names and the Python API (`distributed.declare_servable`, `register.register_method`,
`register.add_stage`, `distributed.start_servable`, `server.start_grpc_server`, ...), and both
servers speak the **Open Inference Protocol v2** (KServe v2 / Triton), so `tritonclient`, `curl`
and any v2 client work unchanged.

Here this notebook's kernel is Main, and the agents are the notebook ranks of notebook 02: two
ipyparallel engines under `mpiexec`, each loading its own slice file."""),
    md("""## 1 · A servable: its model and its method

A servable is a folder holding `servable_config.py`, exactly as in MindSpore Serving. It declares a
distributed model of 2 ranks, whose first input axis is the batch (so concurrent requests can be
merged), and one method, `predict`, made of one stage: the model."""),
    code(CHECK + """import tempfile
from pathlib import Path

import numpy as np

import dinb
from dinb.models import MegatronMLP, mlp_reference
from dinb.serving import free_port

work = Path(tempfile.mkdtemp())
(work / "mlp").mkdir()
(work / "mlp" / "servable_config.py").write_text('''from dinb.serving import distributed, register

model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=True)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
''')
print((work / "mlp" / "servable_config.py").read_text())"""),
    md("""The model: the Megatron MLP (d=1024, ff=4096) exported for 2 ranks at batch 8, the most rows
one run takes. A request may carry fewer rows; the server pads the merged batch to 8."""),
    code(CHECK + """net = MegatronMLP(d_model=1024, d_ff=4096, batch=8)
params = net.init_params(0)
paths = dinb.export_distributed(net, params, net.strategy(2), net.example_inputs(), work / "slices")
print([p.name for p in paths])"""),
    md("""## 2 · The agents: notebook ranks

Each engine loads its own slice file, then serves it as the Agent of its rank: it connects to the
Distributed Worker's address and waits for it. (`startup_agents` does the same with plain
processes, and `mpiexec -n 2 python -m dinb serve-agent` with MPI ranks.)"""),
    code(CHECK + """%load_ext dinb
%dinfer cluster start -n 2"""),
    code(IGNORE + """%dinfer load {work / "slices"}"""),
    code(CHECK + """worker = f"127.0.0.1:{free_port()}"
rest, grpc_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
dinb.current_cluster().serve(worker)
print("the 2 ranks wait for the Distributed Worker")"""),
    md("""## 3 · Main: start the servable, then the servers

`start_servable` returns once every rank has registered (`wait_agents_time_in_seconds=0` would
wait without limit, saying every few seconds which ranks are missing)."""),
    code(CHECK + """from dinb.serving import distributed, server

distributed.start_servable(work, "mlp", distributed_address=worker, wait_agents_time_in_seconds=60,
                           handle_sigterm=False)
server.start_grpc_server(grpc_address)
server.start_restful_server(rest)
print("serving: v2 model 'mlp' (and 'mlp.predict'), MindSpore form POST /model/mlp:predict")"""),
    md("""## 4 · Three clients

MindSpore Serving's `Client` (v2 over gRPC underneath): a list of instances in, a list of dicts
out. Each instance is one sample, so the three go as one request of three rows."""),
    code(CHECK + """from dinb.serving.client import Client

x = np.random.default_rng(1).standard_normal((3, 1024)).astype(np.float32)
client = Client(grpc_address, "mlp", "predict")
result = client.infer([{"x": row} for row in x])
y = np.stack([r["y"] for r in result])
print(len(result), "results, each", result[0]["y"].shape, "; equal to numpy:",
      np.allclose(y, mlp_reference(params, x), rtol=2e-4, atol=2e-4))"""),
    md("""`tritonclient`, unchanged, over HTTP and over gRPC:"""),
    code(CHECK + """import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

for name, module, address in (("http", thttp, rest), ("grpc", tgrpc, grpc_address)):
    c = module.InferenceServerClient(address)
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = c.infer("mlp", [inp]).as_numpy("y")
    print(f"tritonclient.{name}: model ready {c.is_model_ready('mlp')}, equal to numpy "
          f"{np.allclose(got, mlp_reference(params, x), rtol=2e-4, atol=2e-4)}")"""),
    md("""And plain HTTP, the v2 JSON body (what `curl -d @body.json .../v2/models/mlp/infer` sends):"""),
    code(CHECK + """import json
import urllib.request

body = {"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32", "data": x[0].tolist()}]}
request = urllib.request.Request(f"http://{rest}/v2/models/mlp/infer", data=json.dumps(body).encode())
with urllib.request.urlopen(request) as response:
    answer = json.load(response)
out = answer["outputs"][0]
print(out["name"], out["datatype"], out["shape"], "equal to numpy:",
      np.allclose(out["data"], mlp_reference(params, x[:1]).ravel(), rtol=2e-4, atol=2e-4))"""),
    md("""## 5 · Batching: latency against concurrency

Concurrent requests of one row each. With batching, the worker merges the requests waiting
(up to the export's 8 rows, after at most 2 ms) into one run of the model on both ranks, so
throughput grows with concurrency while each run costs about the same. For comparison, a second
servable of the same model exported for one row, without batching, served by two agent
processes (`startup_agents`) in the background: every request is a run of its own."""),
    code(IGNORE + """(work / "mlp1").mkdir()
(work / "mlp1" / "servable_config.py").write_text(
    (work / "mlp" / "servable_config.py").read_text().replace("with_batch_dim=True", "with_batch_dim=False"))
one = MegatronMLP(d_model=1024, d_ff=4096, batch=1)
files = dinb.export_distributed(one, params, one.strategy(2), one.example_inputs(), work / "slices1")
worker1 = f"127.0.0.1:{free_port()}"
launcher = distributed.startup_agents(worker1, files, agent_start_port=free_port(), log_dir=work / "logs",
                                      block=False)
distributed.start_servable(work, "mlp1", distributed_address=worker1, wait_agents_time_in_seconds=120,
                           handle_sigterm=False)"""),
    code(IGNORE + """import asyncio
import time

import aiohttp


async def sweep(model, concurrency, n=64):
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 4096}}]}).encode()
    latencies = []
    async with aiohttp.ClientSession() as session:
        async def one(i):
            t = time.perf_counter()
            async with session.post(f"http://{rest}/v2/models/{model}/infer", data=head + x[i % 3].tobytes(),
                                    headers={"Inference-Header-Content-Length": str(len(head))}) as r:
                await r.read()
            latencies.append((time.perf_counter() - t) * 1e3)

        t0 = time.perf_counter()
        for start in range(0, n, concurrency):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + concurrency))))
        return float(np.median(latencies)), n / (time.perf_counter() - t0)


levels = [1, 2, 4, 8, 16]
curves = {}
for model in ("mlp1", "mlp"):
    curves[model] = [await sweep(model, c) for c in levels]
    print(model, ["%.1f ms, %.0f req/s" % v for v in curves[model]])"""),
    code(IGNORE + """import matplotlib.pyplot as plt

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
for model, label in (("mlp1", "batching off"), ("mlp", "batching on")):
    left.plot(levels, [v[0] for v in curves[model]], "o-", label=label)
    right.plot(levels, [v[1] for v in curves[model]], "o-", label=label)
left.set(xlabel="concurrent requests", ylabel="median latency (ms)", xscale="log", title="latency")
right.set(xlabel="concurrent requests", ylabel="requests per second", xscale="log", title="throughput")
for ax in (left, right):
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.legend()
plt.tight_layout()
plt.show()"""),
    md("""## 6 · A rank dies

Kill rank 1 of the background servable with SIGKILL. Its launcher sees the process exit and tells
the worker at once: the model turns not ready (HTTP 503, gRPC `ModelReady` false), and requests
fail with 503 naming the dead rank instead of hanging. The launcher then relaunches both ranks (a
new JAX job), they register, and the servable is ready again; Main was never restarted."""),
    code(IGNORE + """import os
import signal


def status():
    try:
        with urllib.request.urlopen(f"http://{rest}/v2/models/mlp1/ready", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


os.kill(launcher.pids[1], signal.SIGKILL)
seen, t0 = [], time.perf_counter()
while time.perf_counter() - t0 < 60:
    seen.append(status())
    if seen[-1] == 200 and 503 in seen:
        break
    time.sleep(0.1)
print(f"statuses every 0.1 s: {seen[:3]} ... {seen[-3:]}")"""),
    code(CHECK + """request = urllib.request.Request(f"http://{rest}/v2/models/mlp1/infer",
                                 data=json.dumps(body).encode())
with urllib.request.urlopen(request) as response:
    back = json.load(response)["outputs"][0]["shape"]
print("turned not ready (503):", 503 in seen, "; ready again (200):", seen[-1] == 200,
      "; a request after it:", back)"""),
    md("""While it was down, a request got an answer like this one:

```
HTTP 503 {"error": "servable 'mlp1': rank 1 died; rank(s) [0] ended with it; the servable is not ready until the agents are relaunched"}
```

The worker's Prometheus metrics count every request by model, protocol and status, the time
requests waited in the queue, the rows of every model run (above 1 when requests were merged),
and each rank's compute time:"""),
    code(CHECK + """with urllib.request.urlopen(f"http://{rest}/metrics") as r:
    metrics = r.read().decode()
runs = [line for line in metrics.splitlines() if line.startswith("dinb_batch_rows_count")]
rows = [line for line in metrics.splitlines() if line.startswith("dinb_batch_rows_sum")]
merged = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in rows}
count = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in runs}
print("mlp: more rows than runs (requests were merged):",
      merged['servable="mlp"'] > count['servable="mlp"'])
print("mlp1: one row per run:", merged['servable="mlp1"'] == count['servable="mlp1"'])"""),
    md("""## 7 · Stop

`server.stop()` stops taking requests, lets the ones in flight finish, tells every agent to stop,
and closes the servers."""),
    code(CHECK + """server.stop()
launcher.stop()
%dinfer cluster stop"""),
    *exercises(
        "The servable above pads every merged batch to the export's 8 rows. A lone request of 3 rows "
        "pays for 8.",
        ("""Export the same model again with `batch_buckets="auto"` (one program per batch size).
Which buckets does the export hold (`dinb.read_meta(path)["batch_buckets"]`), and at which bucket
does a lone request of 3 rows run?""",
         """bucketed = dinb.export_distributed(net, params, net.strategy(2), net.example_inputs(),
                                   work / "buckets", batch_buckets="auto")
buckets = dinb.read_meta(bucketed[0])["batch_buckets"]
runs_at = min(b for b in buckets if b >= 3)
print(buckets, runs_at)""",
         """exercises.batch_bucket(buckets, runs_at, work / "buckets")"""),
    ),
    code("""import shutil

shutil.rmtree(work)  # the tutorial's files go with it"""),
]

write_notebook(cells, "08_serving.ipynb")
