"""Time per output token: dinb's decoder beside plain JAX and Hugging Face transformers.

    python benchmarks/generate.py                          # CPU: the reference config, all cases
    python benchmarks/generate.py --config 1b --target gpu --ranks 1,2 --batches 1,8,32

Every case generates ``--new-tokens`` greedy tokens after prompts of 16 random token ids, for a
batch of 1, 8 and 32 prompts (the export's sequence slots), with the same random weights:

  (a) dinb, 1 device                     python -m dinb generate --simulate 1 (or --target gpu)
  (b) dinb, N virtual devices            python -m dinb generate --simulate N    (CPU only)
  (c) dinb, N ranks under mpiexec        mpiexec -n N python -m dinb generate    (tp = N)
  (j) plain JAX in one process           the model's own decode step, jitted with the same
                                         shardings and the cache donated, the same host loop
  (t) transformers' generate             benchmarks/generate_torch.py in the reference environment

"Per token" is one decode step of the whole batch (each sequence gets one token): dinb's and
JAX's are the decode loop's time over its steps; transformers' is ``(T(n) - T(1)) / (n - 1)``
with ``T(n)`` the median time of ``generate`` for ``n`` new tokens (the prefill cancels). Tokens
per second count every sequence's tokens. ``--config 1b`` is a Llama of about 1.2 billion
parameters (hidden 2048, 16 layers, 32 query and 8 key/value heads, vocabulary 32000), bfloat16.
Results go to ``benchmarks/results/generate[_gpu].json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_overhead import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 16
CONFIGS: dict[str, dict[str, Any]] = {
    "reference": json.loads((ROOT / "tests" / "fixtures" / "llama" / "config.json").read_text()),
    "1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 16, "vocab_size": 32000,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": False, "hidden_act": "silu"},
}


def write_weights(config: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """A checkpoint directory of random weights (config.json, model.safetensors)."""
    from dinb.formats.safetensors import write_file
    from dinb.models import LlamaDecoder

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"])))
    model = LlamaDecoder(config=config)
    rng = np.random.default_rng(seed)
    params = {n: (np.ones(s, np.float32) if n.endswith("norm.weight")
                  else rng.standard_normal(s, dtype=np.float32) / np.float32(np.sqrt(s[1])))
              for n, s in model.param_shapes().items()}
    write_file(out / "model.safetensors", params, {"format": "pt"})
    return out


def prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(0, vocab, PROMPT))) for _ in range(batch)]


def export(weights: Path, batch: int, ranks: int, new: int, dtype: str, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "dinb", "export", "--model", "llama", "--weights", str(weights),
                    "--ranks", str(ranks), "--slots", str(batch), "--max-len", str(PROMPT + new),
                    "--buckets", str(PROMPT), "--dtype", dtype, "--out", str(out)], check=True,
                   capture_output=True, text=True)
    return out


def dinb_case(kind: str, model_dir: Path, ids: list[list[int]], new: int, ranks: int, target: str,
              repeat: int) -> float:
    """ms per decode step, from ``dinb generate --json`` (the best of ``repeat`` runs, compiles
    excluded)."""
    from dinb.cli import launch

    args = ["--model-dir", str(model_dir), "--max-new-tokens", str(new), "--json", "--target", target]
    for row in ids:
        args += ["--ids", ",".join(map(str, row))]
    best = float("inf")
    for _ in range(repeat):
        if kind == "mpiexec":
            proc = launch(ranks, args, timeout_s=900, command="generate")
        else:
            proc = subprocess.run([sys.executable, "-m", "dinb", "generate", *args,
                                   *(["--simulate", str(ranks)] if target == "cpu" else [])],
                                  capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(f"dinb generate ({kind}, {ranks} ranks) failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        best = min(best, float(result["decode_ms_per_step"]))
    return best


def plain_jax(weights: Path, batch: int, ranks: int, new: int, dtype: str, target: str) -> float:
    """The same decode step in plain JAX (one process, ``ranks`` devices), in a subprocess."""
    cmd = [sys.executable, __file__, "--jax-worker", str(weights), "--batches", str(batch),
           "--ranks", str(ranks), "--new-tokens", str(new), "--dtype", dtype]
    env = dict(os.environ)
    if target == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ranks}"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode:
        raise RuntimeError(f"plain JAX failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def jax_worker(weights: Path, batch: int, ranks: int, new: int, dtype: str) -> None:
    import jax
    import jax.numpy as jnp

    from dinb.formats.safetensors import np_dtype
    from dinb.models import LlamaDecoder
    from dinb.models.llama import read_llama_config
    from dinb.sharding.layout import one_mesh_shardings

    model = LlamaDecoder(config=read_llama_config(weights / "config.json"), slots=batch,
                         max_len=PROMPT + new, buckets=[PROMPT])
    strategy = model.strategy(ranks)
    names = list(model.param_shapes())
    shard = one_mesh_shardings([strategy[n] for n in names] + list(strategy.inputs),
                               sorted(jax.devices(), key=lambda d: d.id)[:ranks])
    p_shard = dict(zip(names, shard))
    slot_sh, cache_sh = shard[len(names)], shard[len(names) + 2]
    whole = jax.sharding.NamedSharding(slot_sh.mesh, jax.sharding.PartitionSpec())
    from dinb.checkpoint import load_checkpoint

    dt = np_dtype(dtype)
    params = {n: jax.device_put(np.asarray(a).astype(dt), p_shard[n])
              for n, a in load_checkpoint(weights / "model.safetensors").items()}
    decode = jax.jit(model.decode, out_shardings=(whole, cache_sh), donate_argnums=3)
    prefill = jax.jit(model.prefill, out_shardings=(whole, cache_sh), donate_argnums=4)
    cache = jax.jit(lambda: jnp.zeros(model.cache_shape(), dt), out_shardings=cache_sh)()
    tokens = np.zeros(batch, np.int32)
    positions = np.full(batch, PROMPT, np.int32)
    best = float("inf")
    for _ in range(3):
        for row, ids in enumerate(prompts(batch, model.vocab)):
            logits, cache = prefill(params, np.array([ids], np.int32), np.int32(PROMPT), np.int32(row), cache)
            tokens[row] = int(np.asarray(logits)[0].argmax())
        positions[:] = PROMPT
        t0 = time.perf_counter()
        for _ in range(new - 1):
            logits, cache = decode(params, tokens, positions, cache)
            tokens = np.asarray(logits).argmax(-1).astype(np.int32)
            positions += 1
        best = min(best, (time.perf_counter() - t0) * 1e3 / (new - 1))
    print(best)


def torch_case(weights: Path, batch: int, new: int, dtype: str, device: str, python: str) -> float | None:
    python = shutil.which(python) or python
    if not Path(python).exists():
        print(f"no {python}: transformers' side skipped (make reference builds it)", file=sys.stderr)
        return None
    script = str(ROOT / "benchmarks" / "generate_torch.py")
    proc = subprocess.run([python, script, "--model-dir", str(weights),
                           "--batch", str(batch), "--prompt", str(PROMPT), "--new-tokens", str(new),
                           "--dtype", dtype, "--device", device],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        print(f"transformers' generate failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_token"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="reference", help="reference, 1b, or a config.json")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--ranks", default="2", help="rank counts for (b), (c) and (j): 2 or 1,2,4")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each dinb case (the best counts)")
    parser.add_argument("--torch-python", default=str(ROOT / ".venv-ref" / "bin" / "python"))
    parser.add_argument("--jax-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.target == "gpu" else "float32")
    batches = [int(b) for b in args.batches.split(",")]
    rank_counts = [int(r) for r in args.ranks.split(",")]
    if args.jax_worker is not None:
        jax_worker(args.jax_worker, batches[0], rank_counts[0], args.new_tokens, dtype)
        return
    config = CONFIGS.get(args.config) or json.loads(Path(args.config).read_text())
    work = Path(tempfile.mkdtemp(prefix="dinb-bench-generate-"))
    rows = []
    try:
        weights = write_weights(config, work / "weights")
        vocab = int(config["vocab_size"])
        for b in batches:
            ids = prompts(b, vocab)
            row: dict[str, Any] = {"batch": b}
            for n in sorted({1, *rank_counts}):
                out = export(weights, b, n, args.new_tokens, dtype, work / f"b{b}_tp{n}")
                if n == 1:
                    row["dinb_1"] = dinb_case("simulate", out, ids, args.new_tokens, 1, args.target,
                                              args.repeat)
                else:
                    if args.target == "cpu":
                        row[f"dinb_sim{n}"] = dinb_case("simulate", out, ids, args.new_tokens, n, "cpu",
                                                        args.repeat)
                    row[f"dinb_mpi{n}"] = dinb_case("mpiexec", out, ids, args.new_tokens, n, args.target,
                                                    args.repeat)
                row[f"jax_{n}"] = plain_jax(weights, b, n, args.new_tokens, dtype, args.target)
                shutil.rmtree(out, ignore_errors=True)
            device = "cuda" if args.target == "gpu" else "cpu"
            row["torch"] = torch_case(weights, b, args.new_tokens, dtype, device, args.torch_python)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, rank_counts, args)
    result = {"machine": machine(), "config": args.config, "dtype": dtype, "target": args.target,
              "new_tokens": args.new_tokens, "prompt": PROMPT, "ms_per_token": rows}
    name = f"generate_{args.target}_{args.config}.json" if args.target == "gpu" else "generate.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(result, indent=1) + "\n")


def print_table(rows: list[dict[str, Any]], rank_counts: list[int], args: argparse.Namespace) -> None:
    keys = [k for k in rows[0] if k != "batch"]
    print(f"\nms per output token (one decode step of the batch), {args.config}, {args.target}; "
          "tokens/s in brackets")
    print("batch | " + " | ".join(keys) + " | dinb_1 / jax_1" +
          "".join(f" | dinb_mpi{n} / jax_{n}" for n in rank_counts if n > 1))
    for r in rows:
        cells = [f"{r[k]:.2f} ({r['batch'] * 1e3 / r[k]:.0f})" if r[k] else "-" for k in keys]
        ratios = [f"{r['dinb_1'] / r['jax_1']:.2f}"] + [
            f"{r[f'dinb_mpi{n}'] / r[f'jax_{n}']:.2f}" for n in rank_counts if n > 1]
        print(f"{r['batch']} | " + " | ".join(cells) + " | " + " | ".join(ratios))
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
