"""Serving the Megatron MLP (d=1024, ff=4096) on 2 agents, beside a peer server: latency and throughput.

    python benchmarks/serving.py [--requests 400] [--no-peers]

Servers, one after the other, each on its own free ports:

  dinb, batching off   ``python -m dinb serve`` of a 2-rank export for batch 1: a request is a run
  dinb, batching on    the same with ``--batching`` on an export for batch 32 with batch buckets
                       1, 2, 4, 8, 16, 32: merged requests run at the smallest bucket holding them
  dinb before          the configuration before batch buckets, MPI agents and the local link
                       (``--agents processes --no-local-link --batch-delay-ms 1``, the batch-32
                       export without buckets), for the ratios in one run
  mlserver, off / on   MLServer (``make .venv-peers/.installed``) serving the same MLP as one JAX
                       function on one device in one process, with its adaptive batching off / on
                       (max 32 rows, padded to a power of two as dinb's buckets)
  pytriton, off / on   Triton Inference Server through PyTriton (``make .venv-pytriton/.installed``:
                       PyTriton 0.7 needs numpy < 2, so JAX 0.4.38 there), the same function, with
                       Triton's dynamic batcher off / on (max 32 rows, no queue delay)

Requests are batch-1 float32 rows, REST (dinb: the binary tensor extension, as tritonclient sends;
MLServer: JSON, the only body it reads; dinb JSON too, at concurrency 1, for a like-for-like row)
and gRPC (raw contents), at concurrency 1, 8 and 32: p50 and p99 at the client and requests per
second. dinb's floor is the median ``Model.predict`` of ``mpiexec -n 2 python -m dinb run --repeat
300`` on the batch-1 export, a peer's the median call of its JAX function in its own environment,
both run in this benchmark; "over floor" is p50 minus it. dinb's responses
also carry the ranks' own compute (``dinb_compute_ms``). Results: ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_overhead import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".venv-peers" / "bin"
PYTRITON = ROOT / ".venv-pytriton" / "bin"
D, FF = 1024, 4096
MODEL = "mlp"


def wait_ready(proc: subprocess.Popen[str], rest: str, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{rest}/v2/models/{MODEL}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{what} did not become ready")


def ports(n: int) -> list[str]:
    from dinb.job.ranks import free_port

    return [f"127.0.0.1:{free_port()}" for _ in range(n)]


BEFORE = ["--agents", "processes", "--no-local-link", "--batch-delay-ms", "1"]


def start_dinb(model_dir: Path, batching: bool, extra: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    rest, grpc_addr, dist = ports(3)
    cmd = [sys.executable, "-m", "dinb", "serve", "--model-dir", str(model_dir), "--name", MODEL,
           "--rest", rest, "--grpc", grpc_addr, "--distributed-address", dist,
           *(["--batching"] if batching else []), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    wait_ready(proc, rest, "dinb serve")
    return proc, rest, grpc_addr


def start_mlserver(tmp: Path, params: dict[str, np.ndarray],
                   batching: bool) -> tuple[subprocess.Popen[str], str, str]:
    rest, grpc_addr, metrics = ports(3)
    folder = tmp / f"mlserver-{'on' if batching else 'off'}"
    (folder / MODEL).mkdir(parents=True)
    np.savez(folder / MODEL / "params.npz", **params)
    shutil.copy(Path(__file__).parent / "peers" / "mlserver_mlp.py", folder / MODEL / "mlserver_mlp.py")
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": int(rest.split(":")[1]), "grpc_port": int(grpc_addr.split(":")[1]),
        "metrics_port": int(metrics.split(":")[1]), "parallel_workers": 0, "debug": False}))
    (folder / MODEL / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "mlserver_mlp.JaxMLP",
        "parameters": {"uri": str(folder / MODEL / "params.npz")},
        **({"max_batch_size": 32, "max_batch_time": 0.001} if batching else {})}))
    proc = subprocess.Popen([str(PEERS / "mlserver"), "start", str(folder)], cwd=folder / MODEL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    wait_ready(proc, rest, "mlserver")
    return proc, rest, grpc_addr


async def drive(protocol: str, address: str, concurrency: int, n: int, rows: np.ndarray,
                params: dict[str, np.ndarray]) -> dict:
    import aiohttp
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    from dinb.models import mlp_reference

    latencies, computes = [], []
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, D], "datatype": "FP32",
                                   "parameters": {"binary_data_size": D * 4}}],
                       "outputs": [{"name": "output_0", "parameters": {"binary_data": True}}]}).encode()
    async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(address) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        url = f"http://{address}/v2/models/{MODEL}/infer"

        async def rest_binary(i: int) -> tuple[np.ndarray, float | None]:
            async with session.post(url, data=head + rows[i % len(rows)].tobytes(),
                                    headers={"Inference-Header-Content-Length": str(len(head))}) as r:
                data = await r.read()
                assert r.status == 200, data[:200]
                size = int(r.headers["Inference-Header-Content-Length"])
                meta = json.loads(data[:size])
                compute = meta.get("parameters", {}).get("dinb_compute_ms")
                return np.frombuffer(data[size:], np.float32), compute

        async def rest_json(i: int) -> tuple[np.ndarray, float | None]:
            body = {"inputs": [{"name": "x", "shape": [1, D], "datatype": "FP32",
                                "data": rows[i % len(rows)].reshape(-1).tolist()}]}
            async with session.post(url, json=body) as r:
                meta = await r.json()
                assert r.status == 200, meta
                out = np.asarray(meta["outputs"][0]["data"], np.float32)
                return out, (meta.get("parameters") or {}).get("dinb_compute_ms")

        async def grpc_raw(i: int) -> tuple[np.ndarray, float | None]:
            req = pb.ModelInferRequest(model_name=MODEL)
            req.inputs.append(pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, D]))
            req.raw_input_contents.append(rows[i % len(rows)].tobytes())
            resp = await stub.ModelInfer(req)
            out = (np.frombuffer(resp.raw_output_contents[0], np.float32) if resp.raw_output_contents
                   else np.asarray(resp.outputs[0].contents.fp32_contents, np.float32))
            extra = resp.parameters
            return out, extra["dinb_compute_ms"].double_param if "dinb_compute_ms" in extra else None

        one = {"rest": rest_binary, "rest-json": rest_json, "grpc": grpc_raw}[protocol]
        got, _ = await one(0)  # the answer is right (and the server warm)
        np.testing.assert_allclose(got.reshape(1, D), mlp_reference(params, rows[0]), rtol=1e-3, atol=1e-3)
        for i in range(1, min(100, n)):  # warm: the first requests after a start are slower
            await one(i)
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                t0 = time.perf_counter()
                _, compute = await one(i)
                latencies.append((time.perf_counter() - t0) * 1e3)
                if compute is not None:
                    computes.append(compute)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "rps": n / wall,
            "compute_p50_ms": float(np.median(computes)) if computes else None}


def mpiexec_floor(model_dir: Path, tmp: Path) -> float:
    """The median predict of 2 mpiexec ranks on the export (the slowest rank's), in ms."""
    from dinb.cli import mpiexec_path

    out = tmp / "floor.json"
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "dinb", "run", "--model-dir", str(model_dir),
           "--repeat", "300", "--timings-json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode:
        raise SystemExit(f"mpiexec dinb run failed: {proc.stderr[-2000:]}")
    return max(r["predict_ms_median"] for r in json.loads(out.read_text())["ranks"])


FLOOR = """
import sys, time, numpy as np, jax, jax.numpy as jnp
with np.load(sys.argv[1]) as f:
    p = {k: jnp.asarray(f[k]) for k in f.files}
fn = jax.jit(lambda p, x: jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])
rows = np.random.default_rng(0).standard_normal((64, 1, p["w1"].shape[0])).astype(np.float32)
times = []
for i in range(320):
    t0 = time.perf_counter()
    np.asarray(fn(p, rows[i % len(rows)]))
    times.append(time.perf_counter() - t0)
print(1e3 * float(np.median(times[20:])))
"""


def one_device_floor(python: Path, params_file: Path) -> float:
    """The median call of the same MLP as one jitted JAX function on one CPU device, numpy in and
    out (what a peer computes per batch-1 request), in the peer's own environment, in ms."""
    out = subprocess.run([str(python), "-c", FLOOR, str(params_file)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if out.returncode:
        raise SystemExit(f"the floor in {python} failed: {out.stderr[-1000:]}")
    return float(out.stdout.split()[-1])


def start_pytriton(tmp: Path, batching: bool) -> tuple[subprocess.Popen[str], str, str]:
    """PyTriton's Triton; its Python backend's stub links libpython, from the venv's own Python."""
    rest, grpc_addr, metrics = ports(3)
    ask = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    libdir = subprocess.run([str(PYTRITON / "python"), "-c", ask], capture_output=True, text=True,
                            check=True).stdout.strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               LD_LIBRARY_PATH=":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p))
    cmd = [str(PYTRITON / "python"), str(Path(__file__).parent / "peers" / "pytriton_mlp.py"),
           str(tmp / "params.npz"), *(a.split(":")[1] for a in (rest, grpc_addr, metrics)),
           "on" if batching else "off"]
    proc = subprocess.Popen(cmd, stdout=open(tmp / f"pytriton-{batching}.log", "w"), stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    wait_ready(proc, rest, "pytriton")
    return proc, rest, grpc_addr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--no-peers", action="store_true", help="dinb only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dinb-serving-bench-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> int:
    from dinb import export_distributed
    from dinb.models import MegatronMLP

    rows = np.random.default_rng(0).standard_normal((64, 1, D)).astype(np.float32)
    params = MegatronMLP(D, FF, 1).init_params(0)
    for folder, batch, buckets in (("b1", 1, None), ("b32-buckets", 32, "auto"), ("b32", 32, None)):
        net = MegatronMLP(D, FF, batch)
        export_distributed(net, params, net.strategy(2), net.example_inputs(), tmp / folder,
                           batch_buckets=buckets)
    np.savez(tmp / "params.npz", **params)
    floors = {"dinb": mpiexec_floor(tmp / "b1", tmp)}
    print(f"floor: mpiexec -n 2 dinb run, median predict {floors['dinb']:.3f} ms", flush=True)

    every = [(p, c) for p in ("rest", "grpc") for c in (1, 8, 32)]
    servers: list[tuple[str, bool, list[tuple[str, int]]]] = [("dinb", False, every), ("dinb", True, every),
               ("dinb before", False, [("rest", 1), ("grpc", 1)]),
               ("dinb before", True, [("rest", 1), ("rest", 32), ("grpc", 1), ("grpc", 32)])]
    peers = not args.no_peers and (PEERS / "mlserver").exists()
    if not args.no_peers and not peers:
        print("MLServer is not installed (make .venv-peers/.installed): dinb only", flush=True)
    if peers:
        servers += [("mlserver", False, every), ("mlserver", True, every)]
        floors["mlserver"] = one_device_floor(PEERS / "python", tmp / "params.npz")
    if not args.no_peers and (PYTRITON / "python").exists():
        servers += [("pytriton", False, every), ("pytriton", True, every)]
        floors["pytriton"] = one_device_floor(PYTRITON / "python", tmp / "params.npz")
    print("floors (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in floors.items()), flush=True)
    results = []
    for server, batching, cells in servers:
        if server == "dinb":
            proc, rest, grpc_addr = start_dinb(tmp / ("b32-buckets" if batching else "b1"), batching, [])
        elif server == "dinb before":
            proc, rest, grpc_addr = start_dinb(tmp / ("b32" if batching else "b1"), batching, BEFORE)
        elif server == "pytriton":
            proc, rest, grpc_addr = start_pytriton(tmp, batching)
        else:
            proc, rest, grpc_addr = start_mlserver(tmp, params, batching)
        try:
            if server == "mlserver":
                cells = [("rest-json" if p == "rest" else p, c) for p, c in cells]
            elif server == "dinb" and not batching:
                cells = [*cells[:3], ("rest-json", 1), *cells[3:]]
            for protocol, concurrency in cells:
                address = rest if protocol.startswith("rest") else grpc_addr
                r = asyncio.run(drive(protocol, address, concurrency, args.requests, rows, params))
                r.update(server=server, batching=batching, protocol=protocol, concurrency=concurrency,
                         over_floor_ms=None)
                r["over_floor_ms"] = r["p50_ms"] - floors[server.split()[0]]
                results.append(r)
                compute = f"{r['compute_p50_ms']:.2f}" if r["compute_p50_ms"] is not None else "-"
                on = "on " if batching else "off"
                print(f"{server:11s} batching {on} {protocol:9s} c={concurrency:<3d} "
                      f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  {r['rps']:7.1f} req/s  "
                      f"(ranks' compute p50 {compute} ms)", flush=True)
        finally:  # PyTriton's runs in a session of its own, with tritonserver: the whole group goes
            stop = functools.partial(os.killpg, proc.pid) if server == "pytriton" else proc.send_signal
            stop(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop(signal.SIGKILL)
                proc.wait()

    m = machine()
    print(f"\nMegatron MLP d={D} ff={FF}, batch-1 requests, {args.requests} per cell; dinb on 2 agents, "
          f"floors {', '.join(f'{k} {v:.3f} ms' for k, v in floors.items())}; "
          f"{m['cpu']}, {m['cores']} cores, jax {m['jax']}")
    print(f"{'server':11s} {'batching':8s} {'protocol':9s} {'c':>3s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'req/s':>8s} {'compute':>8s} {'p50-floor':>10s}")
    for r in results:
        compute = f"{r['compute_p50_ms']:.2f}" if r["compute_p50_ms"] is not None else "-"
        print(f"{r['server']:11s} {'on' if r['batching'] else 'off':8s} {r['protocol']:9s} "
              f"{r['concurrency']:3d} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['rps']:8.1f} {compute:>8s} "
              f"{r['over_floor_ms']:10.2f}")

    def get(server: str, batching: bool, protocol: str, c: int) -> dict | None:
        return next((r for r in results if (r["server"], r["batching"], r["protocol"], r["concurrency"])
                     == (server, batching, protocol, c)), None)

    summary: dict[str, dict[str, float]] = {}
    for protocol in ("rest", "grpc"):
        off, on = get("dinb", False, protocol, 1), get("dinb", True, protocol, 1)
        c32 = get("dinb", True, protocol, 32)
        b_off, b32 = get("dinb before", False, protocol, 1), get("dinb before", True, protocol, 32)
        assert off and on and c32 and b_off and b32
        s = summary[protocol] = {
            "dinb_over_floor_c1_ms": off["over_floor_ms"],
            "before_over_floor_c1_ms": b_off["over_floor_ms"],
            "batching_on_over_off_p50_c1": on["p50_ms"] / off["p50_ms"],
            "dinb_rps_c32_batched": c32["rps"],
            "c32_batched_rps_over_before": c32["rps"] / b32["rps"],
        }
        line = (f"{protocol}: dinb p50 - floor at c=1 {s['dinb_over_floor_c1_ms']:.2f} ms (before "
                f"{s['before_over_floor_c1_ms']:.2f}); batching on / off p50 at c=1 "
                f"{s['batching_on_over_off_p50_c1']:.2f}x; c=32 batched {c32['rps']:.0f} req/s "
                f"({s['c32_batched_rps_over_before']:.2f}x before)")
        peer_protocol = "rest-json" if protocol == "rest" else protocol
        for peer in ("mlserver", "pytriton"):
            p_off = get(peer, False, peer_protocol if peer == "mlserver" else protocol, 1)
            p32 = get(peer, True, peer_protocol if peer == "mlserver" else protocol, 32)
            if p_off and p32:
                s[f"{peer}_over_floor_c1_ms"] = p_off["over_floor_ms"]
                s[f"{peer}_rps_c32_batched"] = p32["rps"]
                line += (f"; {peer} p50 - floor at c=1 {p_off['over_floor_ms']:.2f} ms, c=32 batched "
                         f"{p32['rps']:.0f} req/s")
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "serving", "machine": m, "requests": args.requests, "floors_ms": floors,
              "results": results, "summary": summary}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
