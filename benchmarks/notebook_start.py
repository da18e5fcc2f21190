"""Where a notebook cluster's start and restart spend their time, engine by engine.

For each configuration (2 MPI engines, 2 local engines, 4 MPI engines, each forked from the warm
factory of :mod:`dinb.notebook.warm_start` and cold, by default), ``--runs`` times in one run:

  start     ``dinb.start_cluster(n, engines=...)`` from the call to ready (joined, predict sockets up)
  load      ``cluster.load(export)``: each rank reads its slice file and compiles
  restart   rank 1 killed with SIGKILL, then ``cluster.restart()`` (stop, start, reload), as
            ``%dinfer cluster restart`` does after a dead rank

and the timeline of each start: the kernel's steps (controller up, engines launched, all
registered, identified, joined, ready) and each engine's (process started, ipyparallel's engine
code running dinb's start-up command, JAX imported, identified, joined, load, loaded), in seconds
from the call. Min / median / max over the runs. The model is the Megatron MLP (d=1024,
ff=4096) exported for n ranks. Results go to ``benchmarks/results/notebook_start.json`` with the
machine.

    python benchmarks/notebook_start.py [--runs 5] [--configs mpi:2,mpi:2:cold,local:2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ENGINE_STEPS = ("process", "engine code", "jax imported", "identified", "joined", "load", "loaded")


def one_config(engines: str, n: int, warm: bool, runs: int, model_dir: Path) -> dict[str, Any]:
    import dinb
    from dinb.notebook import engine, warm_start

    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    def timeline(cluster: Any, what: str, t0: float) -> None:
        for step, t in cluster.start_marks.items():
            if step != "start":
                add(f"{what}: kernel {step}", t - t0)
        per_engine = cluster.calls.call(engine.start_marks, timeout_s=30, what="start marks")
        for step in ENGINE_STEPS:
            times = [m[step] - t0 for m in per_engine if step in m]
            if times:
                add(f"{what}: engines {step} (last)", max(times))

    if warm and warm_start._factory is None:  # this kernel's first cluster starts the factory too
        t0 = time.time()
        dinb.start_cluster(n, engines=engines, warm=True).stop()
        add("first start in a kernel (the factory starts too)", time.time() - t0)
    for _ in range(runs):
        t0 = time.time()
        cluster = dinb.start_cluster(n, engines=engines, warm=warm)
        try:
            add("start", time.time() - t0)
            t1 = time.time()
            cluster.load(model_dir, show_progress=False)
            add("load", time.time() - t1)
            timeline(cluster, "start", t0)
            os.kill(cluster.pids[1], signal.SIGKILL)
            t2 = time.time()
            cluster.restart()
            add("restart with reload", time.time() - t2)
            timeline(cluster, "restart", t2)
        finally:
            cluster.stop()
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v), "runs": v}
            for k, v in rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--configs", default="mpi:2,mpi:2:cold,local:2,local:2:cold,mpi:4,mpi:4:cold",
                    help="ENGINES:N[:cold], comma-separated (cold: warm=False, every engine imports)")
    ap.add_argument("--out", default=str(HERE / "results" / "notebook_start.json"))
    args = ap.parse_args()

    from predict_overhead import machine

    import dinb
    from dinb.models import MegatronMLP

    configs = [(c.split(":")[0], int(c.split(":")[1]), not c.endswith(":cold"))
               for c in args.configs.split(",")]
    results: dict[str, Any] = {"machine": machine(), "runs": args.runs, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="dinb-notebook-start-") as tmp:
        for engines, n, warm in configs:
            net = MegatronMLP(d_model=1024, d_ff=4096, batch=8)
            model_dir = Path(tmp) / f"mlp{n}"
            if not model_dir.exists():
                dinb.export_distributed(net, net.init_params(0), net.strategy(n), net.example_inputs(),
                                        model_dir)
            label = f"{n} {engines} engines, {'forked from the warm factory' if warm else 'cold'}"
            rows = one_config(engines, n, warm, args.runs, model_dir)
            results["configs"][label] = rows
            print(f"\n{label}: seconds from the call, min / median / max of {args.runs} runs")
            for key, r in rows.items():
                print(f"  {key:<44} {r['min']:6.2f} {r['median']:6.2f} {r['max']:6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
