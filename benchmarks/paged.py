"""A paged KV cache against a cache of slots: memory held per token, sequences at once, and the
first token's time with and without a cached prefix.

    python benchmarks/paged.py

Two parts, one run:

* **memory** (the pool's own bookkeeping, ``dinb.runtime.block_pool``, no model): a fixed
  workload of mixed lengths (seed 0: prompts of 16-512 tokens, outputs of 16-256) admitted first
  come first served into (a) 8 slots of ``max_len`` 768 positions (the longest request; and 3
  slots of 2048, a common context length, in the same memory) and (b) a pool of blocks of 16
  holding the same positions, under two policies: the budget reserved when a sequence joins
  (TensorRT-LLM's *guaranteed no evict*) and dinb's, blocks as the tokens come with the newest
  sequence preempted when the pool is short (vLLM's), with decode calls of 1 and of 8 steps.
  Per call: positions held, positions holding a token, sequences in flight; the waste is
  ``1 - in use / held``, as vLLM counts it.
* **decode step** (the reference config, float32, on this machine): ms per step of 64 greedy
  tokens after prompts of 16, for 1 and 8 sequences and max_len 128 and 512, an export with a
  cache of slots beside the same with a pool of as many positions (the best of 3 each).
* **time to first token** (the reference config, float32, on this machine): a 512-token prompt
  into an empty pool, then a 512-token prompt whose first 496 tokens are the first one's
  (31 blocks found, 16 tokens prefilled over a 512-position window), the best of 3 each.

Results go to ``benchmarks/results/paged.json`` with the machine.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from predict_overhead import machine  # noqa: E402

BLOCK, MAX_LEN, SLOTS = 16, 768, 8


def workload(n: int = 200, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(list(rng.integers(0, 500, int(rng.integers(16, 513)))), int(rng.integers(16, 257)))
            for _ in range(n)]


def simulate_slots(requests: list[tuple[list[int], int]], max_len: int = MAX_LEN) -> dict[str, Any]:
    """Slots of ``max_len`` positions in ``SLOTS * MAX_LEN`` positions, first come first served,
    a token a step."""
    positions, waiting, live = SLOTS * MAX_LEN, list(range(len(requests))), {}
    slots = positions // max_len
    used_sum = steps = 0
    waste, concurrent = [], []
    while waiting or live:
        while waiting and len(live) < slots:
            prompt, out = requests[waiting[0]]
            live[waiting.pop(0)] = [len(prompt), out - 1]  # positions written, tokens still to pick
        for r in list(live):
            live[r][0] += 1
            live[r][1] -= 1
        used = sum(w for w, _ in live.values())
        used_sum += used
        waste.append(1 - used / positions)
        concurrent.append(len(live))
        steps += 1
        for r in [r for r, (_, left) in live.items() if left <= 0]:
            del live[r]
    return {"steps": steps, "mean_waste": 1 - used_sum / (positions * steps), "max_waste": max(waste),
            "mean_sequences": float(np.mean(concurrent)), "max_sequences": max(concurrent),
            "positions": positions, "preemptions": 0, "recomputed_tokens": 0}


def simulate_pool(requests: list[tuple[list[int], int]], call_steps: int, reserve: bool) -> dict[str, Any]:
    """The same positions as a pool of blocks of ``BLOCK`` (``dinb.runtime.block_pool``'s own
    bookkeeping), first come first served, decode calls of up to ``call_steps`` steps (the
    runner's rule: ``steps_for``). ``reserve``: a sequence takes its whole budget when it joins;
    else (dinb's policy) the blocks of its prompt and first call, then each call's blocks before
    the call, the newest preempted when the pool is short and prefilled again when it rejoins
    (past the blocks of its text still cached: prefix caching is on, as in dinb). Memory is
    counted during each call: the blocks held (cached, unreferenced ones not counted), against
    the positions written by its end."""
    from dinb.models.decode_loop import steps_for
    from dinb.runtime.block_pool import BlockPool

    pool = BlockPool(SLOTS * MAX_LEN // BLOCK, BLOCK)
    waiting = deque((r, 0) for r in range(len(requests)))  # (request, tokens it had picked)
    live: dict[int, list[int]] = {}  # request -> [positions written, tokens still to pick]; oldest first
    held_sum = used_sum = steps = recomputed = 0
    waste, concurrent = [], []
    while waiting or live:
        while waiting:
            r, made = waiting[0]
            prompt, out = requests[r]
            written, left = len(prompt) + max(made, 1) - 1, out - max(made, 1)
            want = len(prompt) + out - 1 if reserve else written + min(call_steps, left)
            text = prompt + [0] * (written - len(prompt))  # a resumed one: its prompt and tokens
            got = pool.admit(r, text, want)
            if got is None:
                break
            pool.prefilled(r)
            waiting.popleft()
            recomputed += written - got.cached_tokens if made else 0
            live[r] = [written, left]
        k = steps_for(sorted({1, call_steps}), max(left for _, left in live.values()))
        if not reserve:
            for r in pool.make_room([(r, w + min(k, left)) for r, (w, left) in live.items()]):
                waiting.appendleft((r, requests[r][1] - live.pop(r)[1]))
        for v in live.values():
            step = min(k, v[1])
            v[0], v[1] = v[0] + step, v[1] - step
        held, used = pool.in_use * BLOCK, sum(w for w, _ in live.values())
        held_sum, used_sum, steps = held_sum + held * k, used_sum + used * k, steps + k
        waste.append(1 - used / held if held else 0.0)
        concurrent.append(len(live))
        for r in [r for r, (_, left) in live.items() if left <= 0]:
            del live[r]
            pool.release(r)
    return {"steps": steps, "mean_waste": 1 - used_sum / held_sum, "max_waste": max(waste),
            "mean_sequences": float(np.mean(concurrent)), "max_sequences": max(concurrent),
            "positions": pool.blocks * BLOCK, "preemptions": pool.preemptions,
            "recomputed_tokens": recomputed}


def first_token_times(work: Path) -> dict[str, float]:
    import dinb
    from dinb import Model, export_distributed
    from dinb.models import LlamaDecoder

    config = json.loads((ROOT / "tests" / "fixtures" / "llama" / "config.json").read_text())
    config["max_position_embeddings"] = MAX_LEN  # random weights: any length will do
    decoder = LlamaDecoder(config=config, slots=2, max_len=MAX_LEN, buckets=[16, 64, 512],
                           cache_blocks=2 * MAX_LEN // BLOCK, block_size=BLOCK)
    dinb.init_ranks("cpu", simulate=1)
    export_distributed(decoder, decoder.init_params(0), decoder.strategy(1), decoder.example_inputs(), work)
    model = Model()
    model.build_from_file(work)
    rng = np.random.default_rng(1)
    cold, warm = [], []
    for i in range(4):  # the first round compiles
        base = [int(t) for t in rng.integers(0, 500, 512)]
        model.generate(base, 1)
        c = model.generation_info()["timings"]["prefill_s"]
        model.generate(base[:496] + [int(t) for t in rng.integers(0, 500, 16)], 1)
        w = model.generation_info()["timings"]["prefill_s"]
        if i:
            cold.append(c)
            warm.append(w)
    hits = model.generation_info()["paged"]["prefix_hits"]
    return {"cold_ms": 1e3 * min(cold), "prefix_hit_ms": 1e3 * min(warm), "prefix_blocks_found": hits}


CASES = (("slots", lambda r: simulate_slots(r)),
         ("slots of max_len 2048 (3 in the same memory)", lambda r: simulate_slots(r, 2048)),
         ("pool, budget reserved (no preemption)", lambda r: simulate_pool(r, 1, reserve=True)),
         ("pool on demand, 1 step a call", lambda r: simulate_pool(r, 1, reserve=False)),
         ("pool on demand, 8 steps a call (dinb)", lambda r: simulate_pool(r, 8, reserve=False)))


def decode_step_times(work: Path) -> list[dict[str, Any]]:
    """ms per decode step, slots against paged at equal positions (see the module docstring)."""
    import dinb
    from dinb import Model, export_distributed
    from dinb.models import LlamaDecoder

    config = json.loads((ROOT / "tests" / "fixtures" / "llama" / "config.json").read_text())
    config["max_position_embeddings"] = 512
    dinb.init_ranks("cpu", simulate=1)
    rng = np.random.default_rng(2)
    rows = []
    for max_len in (128, 512):
        models = {}
        for cache in ("slots", "paged"):
            decoder = LlamaDecoder(config=config, slots=8, max_len=max_len, buckets=[16], cache=cache)
            export_distributed(decoder, decoder.init_params(0), decoder.strategy(1), decoder.example_inputs(),
                               work / f"{cache}{max_len}")
            models[cache] = Model()
            models[cache].build_from_file(work / f"{cache}{max_len}")
        for batch in (1, 8):
            prompts = [[int(t) for t in rng.integers(0, 200, 16)] for _ in range(batch)]
            row: dict[str, Any] = {"max_len": max_len, "batch": batch}
            for cache, model in models.items():
                times = []
                for _ in range(4):  # the first compiles
                    model.generate(prompts, 64)
                    t = model.generation_info()["timings"]
                    times.append(1e3 * t["decode_s"] / t["decode_steps"])
                row[f"{cache}_ms"] = min(times[1:])
            rows.append(row)
    return rows


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the work folder
    requests = workload()
    result: dict[str, Any] = {"machine": machine(), "block_size": BLOCK, "max_len": MAX_LEN, "slots": SLOTS,
                              "requests": len(requests)}
    result["cases"] = {name: run(requests) for name, run in CASES}
    work = Path(tempfile.mkdtemp(prefix="dinb-bench-paged-"))
    try:
        result["first_token"] = first_token_times(work / "export")
        result["decode_step"] = decode_step_times(work / "steps")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cases, t = result["cases"], result["first_token"]
    s = cases["slots"]
    print(f"{len(requests)} requests (prompts 16-512, outputs 16-256), cache of {s['positions']} positions")
    print("cache | steps | mean waste | max waste | mean sequences (x slots) | max sequences | preemptions "
          "| tokens prefilled again")
    for name, r in cases.items():
        gain = r["mean_sequences"] / s["mean_sequences"]
        print(f"{name} | {r['steps']} | {r['mean_waste']:.1%} | {r['max_waste']:.1%} | "
              f"{r['mean_sequences']:.1f} ({gain:.2f}x) | {r['max_sequences']} | {r['preemptions']} | "
              f"{r['recomputed_tokens']}")
    print(f"first token of a 512-token prompt: {t['cold_ms']:.1f} ms; sharing 496 tokens: "
          f"{t['prefix_hit_ms']:.1f} ms ({t['prefix_hit_ms'] / t['cold_ms']:.2f}x)")
    print("decode step (reference config, float32) | slots ms | paged ms | paged / slots")
    for r in result["decode_step"]:
        print(f"max_len {r['max_len']}, {r['batch']} sequences | {r['slots_ms']:.3f} | {r['paged_ms']:.3f} | "
              f"{r['paged_ms'] / r['slots_ms']:.2f}")
    print(f"machine: {result['machine']}")
    (ROOT / "benchmarks" / "results" / "paged.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
