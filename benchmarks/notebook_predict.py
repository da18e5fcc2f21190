"""Per-predict cost of the notebook path (``%dinfer predict``) against the same program in-process.

Megatron MLP (default d=1024, ff=4096, batch 8, float32) exported for 2 ranks. In one run:

  (1) RankCluster.predict on 2 MPI engine ranks, the fast path (what %dinfer predict calls)
  (2) RankCluster.predict(fast=False): the plain pattern, ipyparallel apply on every engine
  (3) the same sharded program in one process with 2 virtual devices (python -m dinb run --simulate 2)
  (3c) the same 2 ranks under mpiexec, timed inside the ranks (the collective between processes,
       no dispatch at all): (1) - (3c) is what the notebook path adds
  (4) no-op dispatch: an empty message to both ranks (fast path), and ipyparallel's apply_sync(lambda: 0)

plus cluster start to ready (engines up, then joined in the JAX job) and ``restart()`` after a
killed rank with the model reloaded. Ratios are to (3). Results
go to benchmarks/results/notebook_predict.json with the machine.

    python benchmarks/notebook_predict.py [--repeat 300 --rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from predict_overhead import machine, median_ms, run_config

    import dinb
    from dinb.models import MegatronMLP

    model = MegatronMLP(args.d_model, args.d_ff, args.batch)
    x = model.example_inputs(1)[0]
    tmp = Path(tempfile.mkdtemp(prefix="dinb-nbbench-"))
    dinb.export_distributed(model, model.init_params(0), model.strategy(2), [x], tmp / "r2")

    t0 = time.perf_counter()
    cluster = dinb.start_cluster(2)
    start_s = time.perf_counter() - t0
    cluster.load(tmp / "r2", show_progress=False)
    ref = cluster.predict(x).outputs[0]
    assert np.array_equal(cluster.predict(x, fast=False).outputs[0], ref)
    client = cluster.calls.client
    view = client[cluster.engine_of]
    best: dict[str, float] = {}
    try:
        for rnd in range(args.rounds):
            few, few_warm = args.repeat // 3, args.warmup // 3  # the slow paths get fewer calls
            res = {
                "fast": median_ms(lambda: cluster.predict(x), args.repeat, args.warmup),
                "apply": median_ms(lambda: cluster.predict(x, fast=False), few, few_warm),
                "noop_fast": median_ms(cluster.ping, args.repeat, args.warmup),
                "noop_apply": median_ms(lambda: view.apply_sync(int), few, few_warm),
            }
            opts = argparse.Namespace(repeat=args.repeat, warmup=args.warmup)
            res["inproc"] = run_config("b", tmp / "r2", opts, tmp / f"b{rnd}.json")["loop_ms"]
            res["mpiexec"] = run_config("c", tmp / "r2", opts, tmp / f"c{rnd}.json")["loop_ms"]
            print(f"round {rnd}: " + "  ".join(f"{k} {v:.2f} ms" for k, v in res.items()), flush=True)
            best = {k: min(best.get(k, v), v) for k, v in res.items()}
        # a rank killed, then restart() with the model reloaded (what `%dinfer cluster restart` does)
        os.kill(cluster.pids[1], signal.SIGKILL)
        with contextlib.suppress(dinb.errors.RankFailedError):
            cluster.predict(x)  # names the dead rank
        t0 = time.perf_counter()
        cluster.restart()
        restart_s = time.perf_counter() - t0
        assert np.array_equal(cluster.predict(x).outputs[0], ref)
    finally:
        cluster.stop()

    base = best["inproc"]
    rows = [
        ("(1) %dinfer predict: fast path, 2 engine ranks", best["fast"]),
        ("(2) ipyparallel apply on 2 engine ranks", best["apply"]),
        ("(3) in-process, 2 virtual devices", base),
        ("(3c) 2 mpiexec ranks, inside the ranks (no dispatch)", best["mpiexec"]),
        ("(4a) no-op, fast path", best["noop_fast"]),
        ("(4b) no-op, ipyparallel apply_sync", best["noop_apply"]),
    ]
    print(f"\nMegatron MLP d={args.d_model} ff={args.d_ff} batch={args.batch} float32; median per call, "
          f"best of {args.rounds} rounds")
    print(f"{'path':50s} {'ms':>8s} {'/(3)':>6s}")
    for label, ms in rows:
        print(f"{label:50s} {ms:8.2f} {ms / base:6.2f}")
    print(f"cluster start to ready (2 MPI engines, joined): {start_s:.2f} s")
    print(f"restart after a killed rank, model reloaded: {restart_s:.2f} s")
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, jax {m['jax']}")
    out = ROOT / "benchmarks" / "results" / "notebook_predict.json"
    out.write_text(json.dumps({"benchmark": "notebook_predict", "machine": m,
                               "model": {"d_model": args.d_model, "d_ff": args.d_ff, "batch": args.batch},
                               "rounds": args.rounds, "repeat": args.repeat, "start_to_ready_s": start_s,
                               "restart_with_reload_s": restart_s,
                               "results": [{"path": p, "ms": v, "ratio_to_in_process": v / base}
                                           for p, v in rows]}, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
