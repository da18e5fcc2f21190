"""How long the strategy explorer takes to follow a change, and where the time goes.

Megatron MLP (d=1024, ff=4096, batch 8, float32), megatron strategy on N = 2, 4, 8 devices. In
one run, median of ``--repeat``:

  (a) trace + compile in this process on N of 16 virtual CPU devices (the helper's own work)
  (b) the same through the explorer's helper process (``XlaViewer.compile_model``): (b)/(a) is
      the price of the separate process (pickling, pipes, parsing the HLO)
  (c) a device-count change in the explorer widget, nothing cached: plan, compile, all pictures
  (d) the same change when that strategy was compiled before (the plan's cache)

plus the helper's start (first request, JAX import included). Results go to
benchmarks/results/explorer.json with the machine.

    python benchmarks/explorer.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", 16)
    from predict_overhead import machine, median_ms

    from dinb.explore.plan import StrategyPlan
    from dinb.explore.xla_view import XlaViewer, handle_request
    from dinb.models import MegatronMLP
    from dinb.widgets import StrategyExplorer

    model = MegatronMLP()
    params = {k: (s, "float32") for k, s in model.param_shapes().items()}
    inputs = [(s.shape, s.dtype) for s in model.input_specs()]
    devices = sorted(jax.devices(), key=lambda d: d.id)

    viewer = XlaViewer()
    t0 = time.perf_counter()
    viewer.compile_model(model, model.strategy(2), inputs, params)
    first_s = time.perf_counter() - t0

    explorer = StrategyExplorer(model, devices=2)
    rows = []
    for n in (2, 4, 8):
        strategy = model.strategy(n)
        request = ("model", pickle.dumps(model), strategy.to_json(), inputs, params)
        a = median_ms(lambda: handle_request(request, devices[:n]), args.repeat)  # noqa: B023
        b = median_ms(lambda: viewer.compile_model(model, strategy, inputs, params), args.repeat)  # noqa: B023

        def away(cached: bool) -> None:
            explorer.set_devices(1)
            if not cached:
                explorer.plan.source._compiled.clear()

        c = median_ms(lambda: explorer.set_devices(n), args.repeat, setup=lambda: away(False))  # noqa: B023
        d = median_ms(lambda: explorer.set_devices(n), args.repeat, setup=lambda: away(True))  # noqa: B023
        plan = StrategyPlan.create(model, n)
        kinds = ", ".join(f"{x.kind}/{x.group_size}" for x in plan.compile().collectives)
        rows.append({"devices": n, "collectives": kinds, "in_process_ms": a, "helper_ms": b,
                     "explorer_change_ms": c, "explorer_change_cached_ms": d})
    viewer.shutdown()

    print(f"\nMegatron MLP d=1024 ff=4096 batch 8, megatron strategy; median of {args.repeat}")
    print(f"{'N':>3} {'collectives':<14} {'(a) in-proc ms':>15} {'(b) helper ms':>14} {'(b)/(a)':>8} "
          f"{'(c) change ms':>14} {'(d) cached ms':>14} {'(c)/(b)':>8}")
    for r in rows:
        print(f"{r['devices']:>3} {r['collectives']:<14} {r['in_process_ms']:15.1f} {r['helper_ms']:14.1f} "
              f"{r['helper_ms'] / r['in_process_ms']:8.2f} {r['explorer_change_ms']:14.1f} "
              f"{r['explorer_change_cached_ms']:14.1f} {r['explorer_change_ms'] / r['helper_ms']:8.2f}")
    print(f"helper start + first compile: {first_s:.2f} s")
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, jax {m['jax']}")
    out = ROOT / "benchmarks" / "results" / "explorer.json"
    out.write_text(json.dumps({"benchmark": "explorer", "machine": m, "repeat": args.repeat,
                               "helper_first_request_s": first_s, "results": rows}, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
