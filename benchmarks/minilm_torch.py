"""The torch side of ``benchmarks/minilm.py``: sentence-transformers on the same token ids.

Runs in an environment with torch and sentence-transformers (``make reference`` builds one;
dinb itself never imports torch). Prints one JSON line: the median time of one batch through
the model's modules (Transformer, Pooling, Normalize), and the embeddings' checksum.

    python benchmarks/minilm_torch.py --model-dir DIR --inputs inputs.npz [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = SentenceTransformer(args.model_dir, device=args.device).eval()
    with np.load(args.inputs) as data:
        features = {k: torch.from_numpy(data[k]).long().to(args.device)
                    for k in ("input_ids", "attention_mask", "token_type_ids")}

    def once() -> np.ndarray:
        with torch.inference_mode():
            return model(dict(features))["sentence_embedding"].cpu().numpy()

    for _ in range(args.warmup):
        once()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        emb = once()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": statistics.median(times) * 1e3, "threads": args.threads, "device": args.device,
                      "torch": torch.__version__, "embedding": emb.tolist()}))


if __name__ == "__main__":
    main()
