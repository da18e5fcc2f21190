"""Pipeline stages against tensor parallelism: the deep MLP on 4 ranks as 4 x 1, 2 x 2 and 1 x 4.

    python benchmarks/pipeline.py [--layers 8 --d 1024 --ff 4096 --batch 32 --repeat 20]

One export per layout (stages x ranks per stage) of ``mlp-deep`` (megatron inside a stage),
each run by ``mpiexec -n 4`` real rank processes (activations between stages over MPI), at
1, 2, 4 and 8 micro-batches. Per row:

* latency: a predict started on every rank at once (an MPI barrier before it), until the last
  stage's ranks have the outputs (median over ``--repeat``);
* throughput: ``--repeat`` predicts back to back with no barrier, rows per second at the last
  stage (a stage starts the next predict while later stages finish this one);
* memory: parameter bytes per rank (the largest rank's) and the largest peak RSS;
* bubble: GPipe's ``(S-1)/(M+S-1)`` beside the one measured from the ranks' own timeline of the
  median-latency predict (:func:`dinb.sharding.pipeline.measured_bubble`).

Ratios are to 1 x 4 (tensor parallel only) in the same run. Results go to
``benchmarks/results/pipeline.json`` (``--out`` for another name) with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from predict_overhead import machine  # noqa: E402

LAYOUTS = ((4, 1), (2, 2), (1, 4))  # (stages, ranks per stage)
MICRO = (1, 2, 4, 8)


def rank_main(args: argparse.Namespace) -> None:
    """One rank: predict at every micro-batch count; rank 0 writes what all ranks measured."""
    from mpi4py import MPI

    import dinb
    from dinb.sharding.pipeline import StageEvent, measured_bubble

    model = dinb.Model()
    model.build_from_file(args.rank_worker, dinb.ModelType.DINB, dinb.Context())
    comm = MPI.COMM_WORLD
    rank = comm.rank
    info = model.pipeline_info()
    x = np.random.default_rng(0).standard_normal(model.get_inputs()[0].shape).astype(np.float32)
    counts = [m for m in MICRO if info and m in info["micro_batches"]] if info else [1]
    out_rank = comm.size - (info["stage_ranks"] if info else comm.size)
    rows = []
    for m in counts:
        kw = {"micro_batches": m} if info else {}
        for _ in range(3):
            comm.Barrier()
            model.predict([x], **kw)
        lat, timelines = [], []
        for _ in range(args.repeat):
            comm.Barrier()
            t0 = time.perf_counter()
            model.predict([x], **kw)
            lat.append(time.perf_counter() - t0)
            timelines.append([(e.rank, e.stage, e.micro, e.start, e.end) for e in model.timeline()])
        done = comm.gather(lat, root=out_rank)  # the last stage's ranks finish last
        if rank == out_rank:
            per_call = [max(v) for v in zip(*done)]
            median = statistics.median(per_call)
            pick = per_call.index(sorted(per_call)[len(per_call) // 2])
        else:
            median, pick = None, None
        pick = comm.bcast(pick, root=out_rank)
        events = comm.gather(timelines[pick], root=0)
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            model.predict([x], **kw)
        comm.Barrier()  # the last stage's last predict has ended
        total = time.perf_counter() - t0
        medians = comm.gather(median, root=0)
        if rank == 0:
            flat = [StageEvent(*e) for per_rank in events for e in per_rank]
            rows.append({"micro_batches": m, "latency_ms": 1e3 * medians[out_rank],
                         "throughput_rows_s": args.repeat * x.shape[0] / total,
                         "bubble_measured": measured_bubble(flat) if info else 0.0})
    param_bytes = sum(model.param_bytes().values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = comm.gather((param_bytes, rss), root=0)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"rows": rows, "param_bytes": [p for p, _ in mem],
                                                 "rss_bytes": [r for _, r in mem],
                                                 "transfer": info["transfer"] if info else None}))
    dinb.shutdown_ranks()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--ff", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--cpu-bind", default="cores", choices=["cores", "none"],
                   help="cores: each rank on its own share of the cores (dinb's default); none: every "
                        "rank on every core")
    p.add_argument("--out", default=str(HERE / "results" / "pipeline.json"))
    p.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_worker:
        return rank_main(args)

    import dinb
    from dinb.cli import mpiexec_path
    from dinb.models import DeepMLP
    from dinb.sharding.pipeline import bubble_fraction

    net = DeepMLP(args.d, args.ff, args.layers, args.batch)
    params = net.init_params()
    x = np.zeros((args.batch, args.d), np.float32)
    results = []
    with tempfile.TemporaryDirectory(prefix="dinb-bench-pipeline-") as tmp:
        for stages, t in LAYOUTS:
            out = Path(tmp) / f"{stages}x{t}"
            strategy = dinb.infer_predict_layout(net, x, device_num=stages * t, pipeline_stages=stages)
            dinb.export_distributed(net, params, strategy, [x], out,
                                    micro_batches=list(MICRO) if stages > 1 else None)
            result = Path(tmp) / f"{stages}x{t}.json"
            cmd = [mpiexec_path(), "-n", str(stages * t), sys.executable, __file__, "--rank-worker", str(out),
                   "--result", str(result), "--repeat", str(args.repeat)]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", DINB_CPU_BIND=args.cpu_bind)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode:
                raise SystemExit(f"{stages} x {t} failed:\n{proc.stderr[-3000:]}")
            got = json.loads(result.read_text())
            for row in got["rows"]:
                row.update(layout=f"{stages} x {t}", stages=stages, ranks_per_stage=t,
                           bubble_formula=bubble_fraction(stages, row["micro_batches"]),
                           param_mib_per_rank=max(got["param_bytes"]) / 2**20,
                           peak_rss_mib=max(got["rss_bytes"]) / 2**20, transfer=got["transfer"])
                results.append(row)
            import shutil

            shutil.rmtree(out)  # the slice files of a layout, before the next is written
    base = next(r for r in results if r["stages"] == 1)
    print(f"mlp-deep: {args.layers} layers, d={args.d}, ff={args.ff}, batch {args.batch}, float32, 4 ranks "
          f"(mpiexec, cpu bind {args.cpu_bind}); ratios to 1 x 4 (tensor parallel only) in this run")
    head = (f"{'layout':<8}{'M':>3}{'latency ms':>12}{'x 1x4':>7}{'rows/s':>10}{'x 1x4':>7}"
            f"{'params/rank':>13}{'peak RSS':>10}{'bubble formula':>16}{'measured':>10}")
    print(head)
    for r in results:
        print(f"{r['layout']:<8}{r['micro_batches']:>3}{r['latency_ms']:>12.2f}"
              f"{r['latency_ms'] / base['latency_ms']:>7.2f}{r['throughput_rows_s']:>10.0f}"
              f"{r['throughput_rows_s'] / base['throughput_rows_s']:>7.2f}"
              f"{r['param_mib_per_rank']:>10.0f} MiB"
              f"{r['peak_rss_mib']:>6.0f} MiB{r['bubble_formula']:>16.2f}{r['bubble_measured']:>10.2f}")
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, jax {info['jax']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "cpu_bind": args.cpu_bind,
                                          "model": {"layers": args.layers, "d": args.d, "ff": args.ff,
                                                    "batch": args.batch}, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
