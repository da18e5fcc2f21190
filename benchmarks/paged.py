"""A paged KV cache against a cache of slots: memory held per token, sequences at once, and the
first token's time with and without a cached prefix.

    python benchmarks/paged.py

Two parts, one run:

* **memory** (the pool's own bookkeeping, no model): a fixed workload of mixed lengths (seed 0:
  prompts of 16-512 tokens, outputs of 16-256) admitted first come first served, one token per
  sequence a step, into (a) ``S`` slots of ``max_len`` 768 positions and (b) a pool of blocks of
  16 holding the same positions, with the policy dinb runs (a sequence reserves its budget when
  it joins). Per step: positions held, positions holding a token, sequences in flight; the
  waste is ``1 - in use / held``, as vLLM counts it.
  Beside it, the pool under vLLM's policy (blocks taken as tokens come, the newest sequence
  preempted when none is free), which dinb does not run: what it would gain.
* **time to first token** (the reference config, float32, on this machine): a 512-token prompt
  into an empty pool, then a 512-token prompt whose first 496 tokens are the first one's
  (31 blocks found, 16 tokens prefilled over a 512-position window), the best of 3 each.

Results go to ``benchmarks/results/paged.json`` with the machine.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
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


def simulate(requests: list[tuple[list[int], int]], paged: bool) -> dict[str, Any]:
    """Steps of a first-come-first-served scheduler over ``requests``; what the cache held."""
    from dinb.runtime.block_pool import BlockPool

    positions = SLOTS * MAX_LEN
    pool = BlockPool(positions // BLOCK, BLOCK, prefix_caching=False) if paged else None
    waiting, live = list(range(len(requests))), {}
    held_sum = used_sum = 0
    waste, concurrent, steps = [], [], 0
    while waiting or live:
        while waiting and (paged or len(live) < SLOTS):
            prompt, out = requests[waiting[0]]
            if paged and pool.admit(waiting[0], prompt, len(prompt) + out - 1) is None:
                break
            live[waiting.pop(0)] = [len(prompt), out - 1]  # positions written, tokens still to pick
        used = sum(w for w, _ in live.values())
        held = pool.in_use * BLOCK if paged else positions
        held_sum, used_sum = held_sum + held, used_sum + used
        waste.append(1 - used / held if held else 0.0)
        concurrent.append(len(live))
        steps += 1
        for r in list(live):
            live[r][0] += 1
            live[r][1] -= 1
            if live[r][1] <= 0:
                del live[r]
                if paged:
                    pool.release(r)
    return {"steps": steps, "mean_waste": 1 - used_sum / held_sum, "max_waste": max(waste),
            "mean_sequences": float(np.mean(concurrent)), "max_sequences": max(concurrent),
            "positions": positions}


def simulate_on_demand(requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    """The same pool with vLLM's policy, which dinb does not run (yet): a sequence joins when the
    blocks of its prompt are free, takes a block each time it crosses a block's end, and when
    none is free the newest sequence is preempted (its blocks freed, its prompt and tokens so
    far prefilled again when it rejoins). Blocks counted, not allocated."""
    blocks = SLOTS * MAX_LEN // BLOCK
    free, live, order = blocks, {}, []  # live: request -> [positions written, tokens left, blocks]
    waiting = [(r, len(p), out - 1) for r, (p, out) in enumerate(requests)]
    held_sum = used_sum = preempted = steps = 0
    concurrent, waste = [], []

    def need(n: int) -> int:
        return -(-n // BLOCK)

    while waiting or live:
        while waiting and need(waiting[0][1] + 1) <= free:
            r, written, left = waiting.pop(0)
            live[r] = [written, left, need(written + 1)]
            free -= live[r][2]
            order.append(r)
        used = sum(v[0] for v in live.values())
        held = (blocks - free) * BLOCK
        held_sum, used_sum = held_sum + held, used_sum + used
        waste.append(1 - used / held if held else 0.0)
        concurrent.append(len(live))
        steps += 1
        for r in list(order):
            if r not in live:
                continue
            v = live[r]
            v[0], v[1] = v[0] + 1, v[1] - 1
            if v[1] <= 0:
                free += v[2]
                del live[r]
                order.remove(r)
            elif need(v[0] + 1) > v[2]:
                while free == 0:  # preempt the newest to give this one its block
                    victim = order.pop()
                    free += live[victim][2]
                    waiting.insert(0, (victim, live[victim][0], live[victim][1]))
                    del live[victim]
                    preempted += 1
                    if victim == r:
                        break
                if r in live:
                    v[2] += 1
                    free -= 1
    return {"steps": steps, "mean_waste": 1 - used_sum / held_sum, "max_waste": max(waste),
            "mean_sequences": float(np.mean(concurrent)), "max_sequences": max(concurrent),
            "preemptions": preempted, "positions": blocks * BLOCK}


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


def main() -> None:
    requests = workload()
    result: dict[str, Any] = {"machine": machine(), "block_size": BLOCK, "max_len": MAX_LEN, "slots": SLOTS,
                              "requests": len(requests)}
    result["slots_cache"] = simulate(requests, paged=False)
    result["paged_cache"] = simulate(requests, paged=True)
    result["paged_on_demand"] = simulate_on_demand(requests)
    work = Path(tempfile.mkdtemp(prefix="dinb-bench-paged-"))
    try:
        result["first_token"] = first_token_times(work / "export")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s, p, t = result["slots_cache"], result["paged_cache"], result["first_token"]
    print(f"{len(requests)} requests (prompts 16-512, outputs 16-256), cache of {s['positions']} positions")
    print("cache | steps | mean waste | max waste | mean sequences | max sequences | preemptions")
    rows = (("slots", s), ("paged (dinb: budget reserved)", p), ("paged on demand (vLLM's policy)",
                                                                 result["paged_on_demand"]))
    for name, r in rows:
        print(f"{name} | {r['steps']} | {r['mean_waste']:.1%} | {r['max_waste']:.1%} | "
              f"{r['mean_sequences']:.1f} | {r['max_sequences']} | {r.get('preemptions', 0)}")
    print(f"paged / slots: {p['mean_sequences'] / s['mean_sequences']:.2f}x the sequences at once, "
          f"{s['steps'] / p['steps']:.2f}x fewer steps")
    print(f"first token of a 512-token prompt: {t['cold_ms']:.1f} ms; sharing 496 tokens: "
          f"{t['prefix_hit_ms']:.1f} ms ({t['prefix_hit_ms'] / t['cold_ms']:.2f}x)")
    print(f"machine: {result['machine']}")
    (ROOT / "benchmarks" / "results" / "paged.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
