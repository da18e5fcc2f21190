"""all-MiniLM-L6-v2, 8 sentences of up to 16 tokens: dinb's ranks beside sentence-transformers.

    python benchmarks/minilm.py                     # CPU: the four cases below, in one run
    python benchmarks/minilm.py --target gpu        # one GPU: dinb with 1 rank beside torch on it

CPU cases, all on the same token ids (the tokenizer is not timed):

  (a) dinb, 1 process, 1 device          python -m dinb run --simulate 1
  (b) dinb, 1 process, 2 virtual devices  python -m dinb run --simulate 2    (Megatron, tp=2)
  (c) dinb, 2 ranks under mpiexec        mpiexec -n 2 python -m dinb run     (Megatron, tp=2)
  (t) sentence-transformers on torch     benchmarks/minilm_torch.py, as many threads as XLA uses

(a)-(c) are the median time of ``Model.predict`` inside the ranks (the slowest rank's); (t) the
median of one batch through the SentenceTransformer's modules. Every case runs ``--rounds``
times in alternation and keeps its best median. The torch side runs in the reference environment
(``make reference`` builds ``.venv-ref``; ``--torch-python`` for another). ``--random-weights``
replaces the released weights by random ones of the same shapes (both sides load them), for a
machine without the weights package. Results go to ``benchmarks/results/minilm[_gpu].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_overhead import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "Each rank holds its own slice of the weights.",
    "A rank loads only its slice file.",
    "The all-reduce adds the partial sums of every rank.",
    "Tensor parallelism splits the attention heads over devices.",
    "Sentence embeddings of similar sentences are close.",
    "The cat sat on the mat.",
    "A kitten was sitting on a rug.",
    "Inference on several GPUs needs a collective to join the partial results.",
]


def random_model_dir(src: Path, dst: Path, seed: int = 0) -> Path:
    """``src``'s config and tokenizer files with random weights of the same shapes."""
    from dinb.formats.safetensors import write_file
    from dinb.models import BertEncoder

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.bin"))
    params = BertEncoder(dst).init_params(seed)
    write_file(dst / "model.safetensors", params, {"format": "pt"})
    return dst


def dinb_run(cmd_prefix: list[str], model_dir: Path, inputs: Path, args: argparse.Namespace, out: Path,
             extra: list[str]) -> float:
    cmd = cmd_prefix + [sys.executable, "-m", "dinb", "run", "--model-dir", str(model_dir), "--input",
                        str(inputs), "--repeat", str(args.repeat), "--warmup", str(args.warmup),
                        "--timings-json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return max(r["predict_ms_median"] for r in json.loads(out.read_text())["ranks"])


def torch_run(args: argparse.Namespace, model_dir: Path, inputs: Path, device: str, threads: int) -> dict:
    cmd = [args.torch_python, str(ROOT / "benchmarks" / "minilm_torch.py"), "--model-dir", str(model_dir),
           "--inputs", str(inputs), "--device", device, "--threads", str(threads), "--repeat",
           str(args.repeat), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the torch side failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--torch-python", default=str(ROOT / ".venv-ref" / "bin" / "python"))
    ap.add_argument("--model-dir", default=None, help="a BERT checkpoint directory (default: the package's)")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from dinb import export_distributed
    from dinb.checkpoint import DistributedCheckpoint
    from dinb.cli import mpiexec_path
    from dinb.models import BertEncoder, minilm_dir

    tmp = Path(tempfile.mkdtemp(prefix="dinb-minilm-bench-"))
    model_dir = Path(args.model_dir) if args.model_dir else minilm_dir()
    if args.random_weights:
        model_dir = random_model_dir(model_dir, tmp / "weights")
    encoder = BertEncoder(model_dir, batch=8, seq=16)
    inputs, lengths = encoder.tokenize(SENTENCES)
    npz = tmp / "inputs.npz"
    np.savez(npz, **dict(zip(("input_ids", "attention_mask", "token_type_ids"), inputs)))
    for n in (1, 2):
        ckpt = DistributedCheckpoint(encoder.checkpoint())
        export_distributed(encoder, ckpt, encoder.strategy(n, "megatron"), inputs, tmp / f"tp{n}")
    threads = os.cpu_count() or 1

    def ranks(prefix: list[str], tp: int, extra: list[str]) -> Any:
        return lambda out: dinb_run(prefix, tmp / f"tp{tp}", npz, args, out, extra)

    if args.target == "cpu":
        cases = {
            "a": ("(a) dinb, 1 process, 1 device", ranks([], 1, ["--simulate", "1"])),
            "b": ("(b) dinb, 2 virtual devices, tp=2", ranks([], 2, ["--simulate", "2"])),
            "c": ("(c) dinb, 2 ranks, mpiexec, tp=2", ranks([mpiexec_path(), "-n", "2"], 2, [])),
            "t": (f"(t) sentence-transformers, torch, {threads} threads",
                  lambda o: torch_run(args, model_dir, npz, "cpu", threads)["ms"]),
        }
    else:
        cases = {
            "a": ("(a) dinb, 1 rank, --target gpu", ranks([], 1, ["--target", "gpu"])),
            "t": ("(t) sentence-transformers, torch, cuda",
                  lambda o: torch_run(args, model_dir, npz, "cuda", threads)["ms"]),
        }
    best = {k: float("inf") for k in cases}
    for rnd in range(args.rounds):
        for key, (label, fn) in cases.items():
            ms = fn(tmp / f"{key}{rnd}.json")
            best[key] = min(best[key], ms)
            print(f"round {rnd} {label:44s} {ms:8.3f} ms", flush=True)
    ref = torch_run(args, model_dir, npz, "cpu" if args.target == "cpu" else "cuda", threads)["embedding"]
    from dinb import Model, init_ranks

    init_ranks(args.target)
    mine = Model()
    mine.build_from_file(tmp / "tp1")
    emb = mine.predict(inputs)[1].get_data_to_numpy()
    agree = float(np.abs(emb - np.asarray(ref, np.float32)).max())

    m = machine()
    print(f"\nall-MiniLM-L6-v2{' (random weights)' if args.random_weights else ''}, 8 sentences of "
          f"{min(lengths)}-{max(lengths)} tokens padded to 16, {args.target}; median of {args.repeat}, "
          f"best of {args.rounds} rounds; max |dinb - torch| embedding {agree:.1e}")
    print(f"{'case':46s} {'ms/batch':>9s} {'sentences/s':>12s} {'/ torch':>8s}")
    rows = []
    for key, (label, _) in cases.items():
        ms = best[key]
        print(f"{label:46s} {ms:9.3f} {8e3 / ms:12.1f} {ms / best['t']:8.2f}")
        rows.append({"case": label, "ms": round(ms, 4), "sentences_per_s": round(8e3 / ms, 1),
                     "ratio_to_torch": round(ms / best["t"], 3)})
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, jax {m['jax']}")
    name = "minilm_gpu.json" if args.target == "gpu" else "minilm.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "minilm", "target": args.target, "machine": m,
                               "random_weights": args.random_weights, "repeat": args.repeat,
                               "rounds": args.rounds, "max_abs_diff_to_torch": agree, "results": rows},
                              indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
