"""The transformers side of ``benchmarks/generate.py``: ``LlamaForCausalLM.generate``, greedy.

Runs in an environment with torch and transformers (``make reference`` builds one; dinb never
imports torch). Prints one JSON line: ``ms_per_token``, one decode step of the batch, as
``(T(n) - T(1)) / (n - 1)`` where ``T(n)`` is the median time of ``generate`` for ``n`` new
tokens (the prefill and the first token cancel out).

    python benchmarks/generate_torch.py --model-dir DIR --batch 8 --new-tokens 48 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import transformers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = transformers.LlamaForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device).eval()
    rng = np.random.default_rng(1)
    ids = torch.from_numpy(np.stack([rng.integers(0, model.config.vocab_size, args.prompt)
                                     for _ in range(args.batch)])).long().to(args.device)

    def timed(n: int) -> float:
        times = []
        for _ in range(args.repeat):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    timed(2)  # warm-up
    one, many = timed(1), timed(args.new_tokens)
    print(json.dumps({"ms_per_token": (many - one) * 1e3 / (args.new_tokens - 1),
                      "torch": torch.__version__, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
