"""Serving the Megatron MLP (d=1024, ff=4096) on 2 agents: latency and throughput of batch-1 requests.

    python benchmarks/serving.py [--requests 400]

Two servers (``python -m dinb serve``), one after the other, on the same 2-rank export shape:

  batching off   exported for batch 1; every request is one run of the model
  batching on    exported for batch 32; concurrent requests merge into one run (up to 32 rows)

For each, REST (the binary tensor extension, as tritonclient sends) and gRPC (raw contents), at
concurrency 1, 8 and 32: p50 and p99 latency at the client, and requests per second. The floor
is ``Model.predict`` inside the agents for those same requests (each response carries its
``dinb_compute_ms``, measured around ``Model.predict`` on the ranks), so "overhead" is what
the serving path adds in the same run. Results: ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
D, FF = 1024, 4096


def start_server(model_dir: Path, batching: bool) -> tuple[subprocess.Popen[str], str, str]:
    from dinb.ranks import free_port

    rest, grpc_addr, dist = (f"127.0.0.1:{free_port()}" for _ in range(3))
    cmd = [
        sys.executable,
        "-m",
        "dinb",
        "serve",
        "--model-dir",
        str(model_dir),
        "--rest",
        rest,
        "--grpc",
        grpc_addr,
        "--distributed-address",
        dist,
        "--batch-delay-ms",
        "1",
        *(["--batching"] if batching else []),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{rest}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, rest, grpc_addr
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")


async def drive(protocol: str, address: str, concurrency: int, n: int, rows: np.ndarray) -> dict:
    import aiohttp
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    latencies, computes = [], []
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, D], "datatype": "FP32", "parameters": {"binary_data_size": D * 4}}
            ],
            "outputs": [{"name": "output_0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(address) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)

        async def rest_one(i: int) -> float:
            body = head + rows[i % len(rows)].tobytes()
            async with session.post(
                f"http://{address}/v2/models/mlp/infer",
                data=body,
                headers={"Inference-Header-Content-Length": str(len(head))},
            ) as r:
                data = await r.read()
                assert r.status == 200, data[:200]
                size = int(r.headers["Inference-Header-Content-Length"])
                return json.loads(data[:size])["parameters"]["dinb_compute_ms"]

        async def grpc_one(i: int) -> float:
            req = pb.ModelInferRequest(model_name="mlp")
            req.inputs.append(pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, D]))
            req.raw_input_contents.append(rows[i % len(rows)].tobytes())
            resp = await stub.ModelInfer(req)
            return resp.parameters["dinb_compute_ms"].double_param

        one = rest_one if protocol == "rest" else grpc_one
        for i in range(min(20, n)):  # warm up
            await one(i)
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                t0 = time.perf_counter()
                computes.append(await one(i))
                latencies.append((time.perf_counter() - t0) * 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "rps": n / wall,
        "compute_p50_ms": float(np.median(computes)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()

    from dinb import export_distributed
    from dinb.models import MegatronMLP

    tmp = Path(tempfile.mkdtemp(prefix="dinb-serving-bench-"))
    rows = np.random.default_rng(0).standard_normal((64, 1, D)).astype(np.float32)
    results = []
    for batching, batch in ((False, 1), (True, 32)):
        net = MegatronMLP(D, FF, batch)
        export_distributed(net, net.init_params(0), net.strategy(2), net.example_inputs(), tmp / f"b{batch}")
        proc, rest, grpc_addr = start_server(tmp / f"b{batch}", batching)
        try:
            for protocol, address in (("rest", rest), ("grpc", grpc_addr)):
                for concurrency in (1, 8, 32):
                    r = asyncio.run(drive(protocol, address, concurrency, args.requests, rows))
                    r.update(batching=batching, protocol=protocol, concurrency=concurrency)
                    results.append(r)
                    print(
                        f"batching {'on ' if batching else 'off'} {protocol:4s} c={concurrency:<3d} "
                        f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  {r['rps']:7.1f} req/s  "
                        f"(ranks' compute p50 {r['compute_p50_ms']:.2f} ms)",
                        flush=True,
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    def get(batching: bool, protocol: str, c: int) -> dict:
        return next(
            r for r in results if (r["batching"], r["protocol"], r["concurrency"]) == (batching, protocol, c)
        )

    m = machine()
    print(
        f"\nMegatron MLP d={D} ff={FF} on 2 agents, batch-1 requests, {args.requests} per cell; "
        f"{m['cpu']}, {m['cores']} cores, jax {m['jax']}"
    )
    print(
        f"{'batching':9s} {'protocol':8s} {'c':>3s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} "
        f"{'floor ms':>9s} {'p50 over floor':>15s}"
    )
    for r in results:
        print(
            f"{'on' if r['batching'] else 'off':9s} {r['protocol']:8s} {r['concurrency']:3d} "
            f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['rps']:8.1f} {r['compute_p50_ms']:9.2f} "
            f"{r['p50_ms'] - r['compute_p50_ms']:15.2f}"
        )
    summary = {}
    for protocol in ("rest", "grpc"):
        c1 = get(False, protocol, 1)
        summary[protocol] = {
            "overhead_c1_ms": c1["p50_ms"] - c1["compute_p50_ms"],
            "batched_c32_over_unbatched_c1": get(True, protocol, 32)["rps"] / c1["rps"],
        }
        print(
            f"{protocol}: p50 overhead at concurrency 1 (batching off) "
            f"{summary[protocol]['overhead_c1_ms']:.2f} ms; "
            f"throughput at concurrency 32 batched / concurrency 1 unbatched "
            f"{summary[protocol]['batched_c32_over_unbatched_c1']:.1f}x"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "benchmark": "serving",
                "machine": m,
                "requests": args.requests,
                "results": results,
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
