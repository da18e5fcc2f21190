"""Per-predict time of the Megatron MLP: one device, 2 virtual devices, 2 real ranks.

Configurations, all through dinb's runtime (``Model.predict``) on the same slice files:

  (a) one process, one device                  python -m dinb run --simulate 1
  (b) one process, 2 virtual devices, sharded   python -m dinb run --simulate 2
  (c) 2 real ranks under mpiexec                mpiexec -n 2 python -m dinb run
      (each rank's own program, the all-reduce by mpi4py: ``collectives = mpi``, the default)
  (g) the same, collectives inside the SPMD program over gloo (``collectives = gloo``)

For each: the median time of ``predict`` inside the rank(s) (slowest rank for (c) and (g)), and the
median time of one iteration of the run loop (fresh input tensors, predict, outputs to numpy).
Ratios are to (b). Each configuration runs ``--rounds`` times in alternation; the table keeps
each configuration's best median. Results go to ``benchmarks/results/predict_overhead.json``
with the machine described.

    python benchmarks/predict_overhead.py [--d-model 1024 --d-ff 4096 --batch 8 --repeat 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, repeat: int, warmup: int = 0, setup=None) -> float:
    """Median wall time of ``fn()`` in ms over ``repeat`` calls after ``warmup``; ``setup()``
    runs untimed before each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def machine() -> dict[str, object]:
    import jax

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "platform": platform.platform(), "jax": jax.__version__}


def run_config(kind: str, model_dir: Path, args: argparse.Namespace, out_json: Path) -> dict:
    common = ["--model-dir", str(model_dir), "--input", "random", "--repeat", str(args.repeat),
              "--warmup", str(args.warmup), "--timings-json", str(out_json)]
    py = [sys.executable, "-m", "dinb", "run"]
    if kind == "a":
        cmd = py + common + ["--simulate", "1"]
    elif kind == "b":
        cmd = py + common + ["--simulate", "2"]
    else:
        from dinb.cli import mpiexec_path

        cmd = [mpiexec_path(), "-n", "2"] + py + common
        if kind == "g":  # the collectives inside the SPMD program, over gloo
            ini = out_json.with_suffix(".ini")
            ini.write_text("[runtime]\ncollectives = gloo\n")
            cmd += ["--config-file", str(ini)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"configuration ({kind}) failed:\n{proc.stderr[-3000:]}")
    data = json.loads(out_json.read_text())
    ranks = data["ranks"]
    return {"predict_ms": max(r["predict_ms_median"] for r in ranks),
            "loop_ms": max(r["loop_ms_median"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_overhead.json"))
    args = ap.parse_args()

    from dinb import export_distributed
    from dinb.models import MegatronMLP

    model = MegatronMLP(args.d_model, args.d_ff, args.batch)
    params = model.init_params(0)
    x = [np.zeros((args.batch, args.d_model), np.float32)]
    tmp = Path(tempfile.mkdtemp(prefix="dinb-bench-"))
    export_distributed(model, params, model.strategy(1), x, tmp / "r1")
    export_distributed(model, params, model.strategy(2), x, tmp / "r2")
    dirs = {"a": tmp / "r1", "b": tmp / "r2", "c": tmp / "r2", "g": tmp / "r2"}
    labels = {"a": "(a) 1 process, 1 device", "b": "(b) 1 process, 2 virtual devices",
              "c": "(c) 2 ranks, mpiexec, collectives mpi", "g": "(g) 2 ranks, mpiexec, gloo"}
    best: dict[str, dict[str, float]] = {}
    for rnd in range(args.rounds):
        for kind in "abcg":
            r = run_config(kind, dirs[kind], args, tmp / f"{kind}{rnd}.json")
            print(f"round {rnd} {labels[kind]:38s} predict {r['predict_ms']:7.3f} ms  "
                  f"loop {r['loop_ms']:7.3f} ms", flush=True)
            prev = best.get(kind)
            best[kind] = r if prev is None else {k: min(prev[k], r[k]) for k in r}

    b = best["b"]
    print(f"\nMegatron MLP d={args.d_model} ff={args.d_ff} batch={args.batch} float32, "
          f"median of {args.repeat} after {args.warmup} warm-up, best of {args.rounds} rounds")
    print(f"{'configuration':38s} {'predict ms':>11s} {'/(b)':>6s} {'loop ms':>9s} {'/(b)':>6s}")
    rows = []
    for kind in "abcg":
        r = best[kind]
        rp, rl = r["predict_ms"] / b["predict_ms"], r["loop_ms"] / b["loop_ms"]
        print(f"{labels[kind]:38s} {r['predict_ms']:11.3f} {rp:6.2f} {r['loop_ms']:9.3f} {rl:6.2f}")
        rows.append({"config": labels[kind], **r, "predict_ratio_to_b": rp, "loop_ratio_to_b": rl})
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, jax {m['jax']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "predict_overhead", "machine": m,
                               "model": {"d_model": args.d_model, "d_ff": args.d_ff,
                                         "batch": args.batch, "dtype": "float32"},
                               "repeat": args.repeat, "warmup": args.warmup, "rounds": args.rounds,
                               "results": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
