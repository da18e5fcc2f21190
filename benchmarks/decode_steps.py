"""The decode programs an export holds: 1 and 8 steps a call against 1, 2, 4 and 8, in one process.

    python benchmarks/decode_steps.py                 # CPU: the reference config, float32
    python benchmarks/decode_steps.py --target gpu    # one GPU: the 1b config, bfloat16

A generation of ``--new-tokens`` greedy tokens after prompts of 16 picks the first token in the
prefill and the rest in decode calls, each the most steps the export has that the tokens left
fill: with 1 and 8, 47 steps are 5 calls of 8 and 7 of 1; with 1, 2, 4 and 8 they are 5 of 8 and
one each of 4, 2 and 1. Both exports share the weights and are loaded side by side, and their
generations alternate (``--repeat`` each, compiles excluded), so the machine's drift from one
moment to the next falls on both alike. Results go to ``benchmarks/results/decode_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import CONFIGS, prompts  # noqa: E402
from predict_overhead import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"1,8": [1, 8], "1,2,4,8": 8}  # decode_steps=8: 8 and the powers of two below


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_steps.json"))
    args = parser.parse_args()

    import dinb
    from dinb import Context, Model, export_distributed
    from dinb.models import LlamaDecoder

    dinb.init_ranks(args.target, simulate=1 if args.target == "cpu" else None)
    config = CONFIGS["reference" if args.target == "cpu" else "1b"]
    dtype = "float32" if args.target == "cpu" else "bfloat16"
    work = Path(tempfile.mkdtemp(prefix="dinb-bench-decode-steps-"))
    rows = []
    try:
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = prompts(batch, int(config["vocab_size"]))
            models, times = {}, {}
            for name, steps in VARIANTS.items():
                decoder = LlamaDecoder(config=config, slots=batch, max_len=16 + args.new_tokens, buckets=[16],
                                       prefill_rows=[batch], decode_steps=steps, cache="slots")
                export_distributed(decoder, decoder.init_params(0), decoder.strategy(1),
                                   decoder.example_inputs(), work / f"{name}-{batch}", dtype=dtype)
                models[name] = Model()
                models[name].build_from_file(work / f"{name}-{batch}", context=Context(target=[args.target]))
                models[name].generate(ids, args.new_tokens, stop_ids=())  # compiles what it runs
                times[name] = []
            for _ in range(args.repeat):
                for name, model in models.items():
                    model.generate(ids, args.new_tokens, stop_ids=())
                    t = model.generation_info()["timings"]
                    times[name].append(1e3 * t["decode_s"] / t["decode_steps"])
            row = {"batch": batch}
            for name, model in models.items():
                row[name] = {"min_ms": min(times[name]), "median_ms": float(np.median(times[name])),
                             "calls": model.generation_info()["timings"]["decode_calls"]}
                model.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nms per decode step, {args.new_tokens} new tokens, min (median) of {args.repeat}; "
          "calls per generation")
    print("batch | steps 1,8 | calls | steps 1,2,4,8 | calls | ratio of mins")
    for r in rows:
        a, b = r["1,8"], r["1,2,4,8"]
        print(f"{r['batch']} | {a['min_ms']:.3f} ({a['median_ms']:.3f}) | {a['calls']} | {b['min_ms']:.3f} "
              f"({b['median_ms']:.3f}) | {b['calls']} | {b['min_ms'] / a['min_ms']:.2f}")
    print(f"machine: {machine()}")
    Path(args.out).write_text(json.dumps({"machine": machine(), "target": args.target, "dtype": dtype,
                                          "new_tokens": args.new_tokens, "repeat": args.repeat,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
