"""Time per output token: dinb's decoder beside its memory floor, plain JAX and transformers.

    python benchmarks/generate.py                                   # CPU: the reference config
    python benchmarks/generate.py --configs cpu-mid --batches 8     # CPU: stages that outweigh a pass
    python benchmarks/generate.py --baseline a878130                # ... beside an earlier dinb
    python benchmarks/generate.py --target gpu --configs 1b,3b      # one GPU: the floor table

Every case generates ``--new-tokens`` greedy tokens after prompts of 16 random token ids, for a
batch of 1, 8 and 32 prompts (the export's sequence slots), with the same random weights. "Per
token" is one decode step of the whole batch (each sequence gets one token); tokens per second
count every sequence's tokens.

On the CPU (the reference config, or ``cpu-mid``: 8 layers of 1024, float32), in one run:

  (a) dinb, 1 device                   python -m dinb generate --simulate 1
  (b) dinb, N virtual devices          python -m dinb generate --simulate N
  (c) dinb, N ranks under mpiexec      mpiexec -n N python -m dinb generate    (tp = N): each
                                       rank's own steps, MPI's all-reduce between them
  (c-gloo) the same ranks running the SPMD program, its collectives over gloo
  (s) (s-mpi) N pipeline stages of one rank each, simulated and under mpiexec (the activations
       forward over MPI, the tokens broadcast back from the last stage every step; on one host's
       CPU every slot in one group), and (s-mpi-G) under mpiexec with the slots in one group a
       stage, following each other through the stages (``decode_groups = N``); on a machine of
       2N cores or more also 2 stages of N ranks each (2 x N), simulated and under mpiexec with
       one group and with two; every staged mpiexec case also prints each rank's busy share
  (a0) (b0) (c0) the same with the dinb of ``--baseline REV`` (a git revision, in a worktree), and
       with ``--baseline-stages`` its (s-mpi) and (s-mpi-G) too
  (t) transformers' generate           benchmarks/generate_torch.py in the reference environment

On one GPU (bfloat16, in-process, ``--configs``: ``1b`` is a Llama of 1.2 billion parameters,
``3b`` Llama-3.2-3B's shape), in one run, for every batch and ``--max-lens``:

  floor      (bytes of every weight + the keys and values in use, read once a step) / bandwidth,
             over the device-to-device copy bandwidth measured in the run and over 4.8 TB/s
  dinb       Model.generate on an export with a cache of slots (its decode program, k steps a call)
  paged      the same with a paged KV cache (``--cache-blocks``: blocks of 16 for what the
             sequences hold, read through their block tables by XLA's gather)
  jax loop   the model's own decode step over the whole cache in lax.fori_loop, argmax on the
             device: plain JAX's strongest form
  torch      transformers' generate (eager), ``(T(n) - T(1)) / (n - 1)``

and a prefill row: a prompt of ``--prefill`` tokens against the bf16 matmul rate measured in the
run (and the datasheet's 989 TFLOP/s). Results go to ``benchmarks/results/generate*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
DATASHEET_TBS, DATASHEET_TFLOPS = 4.8, 989.0  # H200 SXM: HBM3e bandwidth, dense bf16
DEVICE = ["gpu"]  # what --target gpu runs on ("cpu" with --dry-run: the table's code on small shapes)
CONFIGS: dict[str, dict[str, Any]] = {
    "reference": json.loads((ROOT / "tests" / "fixtures" / "llama" / "config.json").read_text()),
    # CPU: a decoder whose decode step is memory-bound (0.3 GB of float32 weights), where a pipeline
    # stage's compute outweighs what a pass costs beside it (the reference config's is a few MB)
    "cpu-mid": {
        "model_type": "llama",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_hidden_layers": 8,
        "vocab_size": 8192,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 16,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "3b": {
        "model_type": "llama",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "num_hidden_layers": 28,
        "vocab_size": 128256,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
}


def prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(0, vocab, PROMPT))) for _ in range(batch)]


def write_folder(config: dict[str, Any], params: dict[str, np.ndarray], out: Path) -> Path:
    """A Hugging Face folder of the weights (config.json, model.safetensors)."""
    from dinb.formats.safetensors import write_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"])))
    write_file(out / "model.safetensors", params, {"format": "pt"})
    return out


def random_params(config: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """Random weights of the config's shapes (``N(0, 1/in)``, norms 1), made by JAX."""
    import jax
    import jax.numpy as jnp

    from dinb.formats.safetensors import np_dtype
    from dinb.models import LlamaDecoder

    shapes = LlamaDecoder(config=config).param_shapes()
    keys = jax.random.split(jax.random.key(0), len(shapes))
    out = {}
    for key, (name, shape) in zip(keys, shapes.items()):
        if name.endswith("norm.weight"):
            a = jnp.ones(shape, jnp.float32)
        else:
            a = jax.random.normal(key, shape, jnp.float32) / np.sqrt(shape[1])
        out[name] = np.asarray(a.astype(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32))
        assert out[name].dtype == np_dtype(dtype)
    return out


def torch_case(weights: Path, batch: int, new: int, dtype: str, device: str, python: str) -> float | None:
    python = shutil.which(python) or python
    if not Path(python).exists():
        print(f"no {python}: transformers' side skipped (make reference builds it)", file=sys.stderr)
        return None
    proc = subprocess.run(
        [
            python,
            str(ROOT / "benchmarks" / "generate_torch.py"),
            "--model-dir",
            str(weights),
            "--batch",
            str(batch),
            "--prompt",
            str(PROMPT),
            "--new-tokens",
            str(new),
            "--dtype",
            dtype,
            "--device",
            device,
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode:
        print(f"transformers' generate failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_token"])


# ---- one GPU -----------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device pass (read + write)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (1 << 30,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)
    return 2 * a.nbytes / best_s(lambda: f(a))


def matmul_peak() -> float:
    """FLOP per second of an 8192^3 bf16 matrix product."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    return 2 * 8192**3 / best_s(lambda: f(a))


def best_s(fn: Any, repeat: int = 5) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def weight_bytes(decoder: Any, itemsize: int) -> int:
    """Bytes of the weights one decode step reads: every matrix once, one row of the embedding."""
    total = 0
    for name, shape in decoder.param_shapes().items():
        n = int(np.prod(shape))
        if name == "model.embed_tokens.weight" and not decoder.hf["tie_word_embeddings"]:
            n = shape[1] * decoder.slots  # the rows looked up, not the table
        total += n * itemsize
    return total


def kv_bytes_in_use(decoder: Any, batch: int, new: int, itemsize: int) -> float:
    """Keys and values a step reads, on average over the generation (positions 16 .. 16 + new)."""
    per_position = decoder.layers * 2 * decoder.kv_heads * decoder.head_dim * itemsize
    return batch * per_position * (PROMPT + new / 2)


def pool_blocks(batch: int, max_len: int, positions: int, block: int = 16) -> int:
    """Blocks of a pool that holds ``batch`` sequences of ``positions`` positions (and at least
    one of ``max_len``, as an export needs)."""
    def blocks(n: int) -> int:
        return -(-n // block)

    return max(blocks(max_len), batch * blocks(positions))


def cache_bytes(decoder: Any, itemsize: int) -> int:
    return int(np.prod(decoder.cache_shape())) * itemsize


def paged_case(
    config: dict[str, Any], decoder: Any, params: dict[str, np.ndarray], ids: list[list[int]], new: int,
    work: Path,
) -> dict[str, Any]:
    """:func:`dinb_case` for ``decoder``'s sizes with a paged cache of blocks of 16 for what
    the sequences hold, and both caches' bytes (bfloat16)."""
    from dinb.models import LlamaDecoder

    blocks = pool_blocks(decoder.slots, decoder.max_len, PROMPT + new - 1)
    paged = LlamaDecoder(config=config, slots=decoder.slots, max_len=decoder.max_len,
                         buckets=[PROMPT], prefill_rows=[decoder.slots], cache_blocks=blocks,
                         decode_steps=decoder.decode_steps)
    case = dinb_case(paged, params, ids, new, work)
    return {"paged": case["dinb"], "paged_windows": case["windows"],
            "cache_MB": cache_bytes(decoder, 2) / 1e6, "paged_cache_MB": cache_bytes(paged, 2) / 1e6}


def dinb_case(
    decoder: Any, params: dict[str, np.ndarray], ids: list[list[int]], new: int, work: Path
) -> dict[str, Any]:
    """ms per decode step of Model.generate on a fresh export (the best of 3, compiles excluded)."""
    from dinb import Context, Model, export_distributed

    t0 = time.perf_counter()
    export_distributed(decoder, params, decoder.strategy(1), decoder.example_inputs(), work, dtype="bfloat16")
    export_s = time.perf_counter() - t0
    model = Model()
    model.build_from_file(work, context=Context(target=[DEVICE[0]]))
    model.generate(ids, new)  # compiles the programs this generation runs
    best = float("inf")
    for _ in range(3):
        model.generate(ids, new)
        t = model.generation_info()["timings"]
        best = min(best, 1e3 * t["decode_s"] / max(1, t["decode_steps"]))
    windows = sorted({int(n.split("_w")[1]) for n in model.runner.ran if n.startswith("decode_")})
    model.close()
    shutil.rmtree(work, ignore_errors=True)
    return {"dinb": best, "windows": windows, "export_s": export_s}


def jax_loop(decoder: Any, params: dict[str, Any], ids: list[list[int]], new: int) -> float:
    """ms per step of the model's own decode step over the whole cache in lax.fori_loop."""
    import jax
    import jax.numpy as jnp

    prefill = jax.jit(decoder.prefill_rows, donate_argnums=4)
    cache = jnp.zeros(decoder.cache_shape(), jnp.bfloat16)
    rows = len(ids)
    logits, cache = prefill(
        params,
        jnp.asarray(ids, jnp.int32),
        jnp.full(rows, PROMPT, jnp.int32),
        jnp.arange(rows, dtype=jnp.int32),
        cache,
    )
    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    positions = jnp.full(rows, PROMPT, jnp.int32)

    def run(params: dict[str, Any], tokens: Any, positions: Any, cache: Any) -> tuple[Any, Any, Any]:
        def body(_: int, c: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
            tokens, positions, cache = c
            logits, cache = decoder.decode(params, tokens, positions, cache)
            return jnp.argmax(logits, -1).astype(jnp.int32), positions + 1, cache

        return jax.lax.fori_loop(0, new - 1, body, (tokens, positions, cache))

    loop = jax.jit(run, donate_argnums=3)
    state = loop(params, tokens, positions, cache)  # compile and warm up
    best = float("inf")
    for _ in range(3):
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = jax.block_until_ready(loop(params, tokens, positions, state[2]))
        best = min(best, (time.perf_counter() - t0) * 1e3 / (new - 1))
    return best


def prefill_row(
    config: dict[str, Any], params: dict[str, np.ndarray], length: int, peak: float, work: Path
) -> dict[str, Any]:
    """A prompt of ``length`` tokens through Model.prefill (cuDNN's attention where exported)."""
    from dinb import Context, Model, export_distributed
    from dinb.models import LlamaDecoder

    decoder = LlamaDecoder(config=config, slots=1, max_len=length, buckets=[length], decode_steps=1)
    export_distributed(decoder, params, decoder.strategy(1), decoder.example_inputs(), work, dtype="bfloat16")
    model = Model()
    model.build_from_file(work, context=Context(target=[DEVICE[0]]))
    ids = np.random.default_rng(3).integers(0, decoder.vocab, length)
    s = best_s(lambda: model.prefill(0, ids), repeat=5)
    kernel = model.generation_info()["kernels"]["prefill"].get("cuda", "xla")
    model.close()
    shutil.rmtree(work, ignore_errors=True)
    h, f, dh = decoder.hf["hidden_size"], decoder.hf["intermediate_size"], decoder.head_dim
    per_token = (
        2
        * decoder.layers
        * (h * (decoder.heads + 2 * decoder.kv_heads) * dh + decoder.heads * dh * h + 3 * h * f)
    )
    flops = (
        length * per_token + 2 * decoder.layers * length * length * decoder.heads * dh + 2 * decoder.vocab * h
    )
    return {
        "tokens": length,
        "ms": 1e3 * s,
        "tflops": flops / s / 1e12,
        "of_measured_peak": flops / s / peak,
        "of_datasheet_peak": flops / s / (DATASHEET_TFLOPS * 1e12),
        "attention": kernel,
    }


def gpu_main(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    import dinb
    from dinb.models import LlamaDecoder
    from dinb.models.llama import powers_up_to

    dinb.init_ranks(DEVICE[0])
    bw, peak = copy_bandwidth(), matmul_peak()
    result: dict[str, Any] = {
        "machine": dict(machine(), gpu=f"{jax.devices()[0].device_kind} ({len(jax.devices())})"),
        "copy_bandwidth_TBs": bw / 1e12,
        "matmul_TFLOPs": peak / 1e12,
        "new_tokens": args.new_tokens,
        "prompt": PROMPT,
        "decode_steps": (powers_up_to(args.decode_steps) if isinstance(args.decode_steps, int)
                         else sorted({1, *args.decode_steps})),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rows": [],
        "prefill": [],
    }
    out = Path(args.out)
    start = time.perf_counter()
    names = args.configs.split(",")
    prefill_config = "3b" if "3b" in names else names[-1]
    work = Path(tempfile.mkdtemp(prefix="dinb-bench-generate-"))
    try:
        for name in args.configs.split(","):
            config = CONFIGS[name]
            params = random_params(config, "bfloat16")
            on_device = {k: jnp.asarray(v) for k, v in params.items()}
            torch_dir = (
                write_folder(config, params, work / f"{name}-hf") if args.torch_python != "none" else None
            )
            for max_len in [int(m) for m in args.max_lens.split(",")]:
                for batch in [int(b) for b in args.batches.split(",")]:
                    if time.perf_counter() - start > args.budget_s:
                        result["rows"].append(
                            {"config": name, "batch": batch, "max_len": max_len, "skipped": "time budget"}
                        )
                        continue
                    decoder = LlamaDecoder(  # the cache of slots: "paged" is the pool beside it
                        config=config, slots=batch, max_len=max_len, buckets=[PROMPT], prefill_rows=[batch],
                        cache="slots", decode_steps=args.decode_steps,
                    )
                    ids = prompts(batch, decoder.vocab)
                    floor = weight_bytes(decoder, 2) + kv_bytes_in_use(decoder, batch, args.new_tokens, 2)
                    row = {
                        "config": name,
                        "batch": batch,
                        "max_len": max_len,
                        "floor_ms": floor / bw * 1e3,
                        "floor_ms_datasheet": floor / (DATASHEET_TBS * 1e12) * 1e3,
                    }
                    row.update(dinb_case(decoder, params, ids, args.new_tokens, work / "export"))
                    if args.paged:
                        row.update(paged_case(config, decoder, params, ids, args.new_tokens, work / "paged"))
                    row["jax_loop"] = jax_loop(decoder, on_device, ids, args.new_tokens)
                    row["torch"] = (
                        torch_case(torch_dir, batch, args.new_tokens, "bfloat16", "cuda", args.torch_python)
                        if torch_dir is not None and max_len == int(args.max_lens.split(",")[0])
                        else None
                    )
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    out.write_text(json.dumps(result, indent=1) + "\n")
            if args.prefill and name == prefill_config:
                row = prefill_row(config, params, args.prefill, peak, work / "prefill")
                result["prefill"].append(dict(row, config=name))
                print(json.dumps(result["prefill"][-1]), flush=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
            del on_device, params
            jax.clear_caches()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        result["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=1) + "\n")
    print_gpu_table(result)


def print_gpu_table(result: dict[str, Any]) -> None:
    print(
        f"\nms per decode step on {result['machine'].get('gpu')}; floor over the copy bandwidth measured "
        f"({result['copy_bandwidth_TBs']:.2f} TB/s) and over {DATASHEET_TBS} TB/s"
    )
    print(
        "config | batch | max_len | floor | floor 4.8 | dinb | x floor | x floor 4.8 | jax loop | "
        "dinb/jax | paged | paged/dinb | cache MB slots / paged | torch"
    )
    for r in result["rows"]:
        if "dinb" not in r:
            continue
        torch = f"{r['torch']:.2f}" if r.get("torch") else "-"
        floor, sheet = r["floor_ms"], r["floor_ms_datasheet"]
        paged = "- | - | -"
        if "paged" in r:
            paged = (f"{r['paged']:.3f} | {r['paged'] / r['dinb']:.2f} | "
                     f"{r['cache_MB']:.0f} / {r['paged_cache_MB']:.0f}")
        print(
            f"{r['config']} | {r['batch']} | {r['max_len']} | {floor:.3f} | {sheet:.3f} | "
            f"{r['dinb']:.3f} | "
            f"{r['dinb'] / floor:.2f} | {r['dinb'] / sheet:.2f} | {r['jax_loop']:.3f} | "
            f"{r['dinb'] / r['jax_loop']:.2f} | {paged} | {torch}"
        )
    for p in result["prefill"]:
        print(
            f"prefill {p['config']} {p['tokens']} tokens: {p['ms']:.2f} ms, {p['tflops']:.0f} TFLOP/s = "
            f"{p['of_measured_peak']:.0%} of the measured {result['matmul_TFLOPs']:.0f}, "
            f"{p['of_datasheet_peak']:.0%} of {DATASHEET_TFLOPS:.0f} (attention: {p['attention']})"
        )


# ---- the CPU ---------------------------------------------------------------------------------------
def cli(args: list[str], pythonpath: Path | None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "dinb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=pythonpath or ROOT,
    )


def cpu_export(weights: Path, batch: int, ranks: int, new: int, out: Path, source: Path | None,
               stages: int = 1) -> Path:
    staged = ["--pipeline-stages", str(stages)] if stages > 1 else []
    proc = cli(
        [
            "export",
            *staged,
            "--model",
            "llama",
            "--weights",
            str(weights),
            "--ranks",
            str(ranks),
            "--slots",
            str(batch),
            "--max-len",
            str(PROMPT + new),
            "--buckets",
            str(PROMPT),
            "--out",
            str(out),
        ],
        source,
    )
    if proc.returncode:
        raise RuntimeError(f"export failed:\n{proc.stderr[-3000:]}")
    return out


def cpu_generate(
    kind: str, model_dir: Path, ids: list[list[int]], new: int, ranks: int, source: Path | None, repeat: int,
    config_file: Path | None = None, busy: dict[str, Any] | None = None,
) -> float:
    """ms per decode step, from ``dinb generate --json`` (the best of ``repeat`` runs); a staged
    export's share of the decode time each rank spent computing goes in ``busy`` (the best run's)."""
    args = ["generate", "--model-dir", str(model_dir), "--max-new-tokens", str(new), "--json"]
    if config_file is not None:
        args += ["--config-file", str(config_file)]
    for row in ids:
        args += ["--ids", ",".join(map(str, row))]
    best = float("inf")
    for _ in range(repeat):
        if kind == "mpiexec":
            from dinb.cli import mpiexec_path
            from dinb.job.launchers import mpiexec_command

            env = dict(os.environ, PYTHONPATH=str(source)) if source else dict(os.environ)
            proc = subprocess.run(
                [*mpiexec_command(mpiexec_path(), ranks), sys.executable, "-m", "dinb", *args],
                capture_output=True,
                text=True,
                timeout=900,
                env=env,
                cwd=source or ROOT,
            )
        else:
            proc = cli([*args, "--simulate", str(ranks)], source)
        if proc.returncode:
            raise RuntimeError(f"dinb generate ({kind}, {ranks} ranks) failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if float(out["decode_ms_per_step"]) < best:
            best = float(out["decode_ms_per_step"])
            if busy is not None and "busy" in out.get("stages", {}):
                busy.update(out["stages"]["busy"])
    return best


def baseline_tree(rev: str, work: Path) -> Path:
    """A worktree of dinb at ``rev`` (removed with ``work``)."""
    tree = work / f"dinb-{rev}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    return tree


def cpu_main(args: argparse.Namespace) -> None:
    from dinb.formats.safetensors import np_dtype

    name = args.configs.split(",")[0]
    config = CONFIGS[name]
    work = Path(tempfile.mkdtemp(prefix="dinb-bench-generate-"))
    tree = None
    rows = []
    try:
        from dinb.models import LlamaDecoder

        params = {
            k: v.astype(np_dtype("float32")) for k, v in LlamaDecoder(config=config).init_params(0).items()
        }
        weights = write_folder(config, params, work / "weights")
        gloo = work / "gloo.ini"
        gloo.write_text("[runtime]\ncollectives = gloo\n")
        groups, two_groups, one_group = work / "groups.ini", work / "groups2.ini", work / "groups1.ini"
        groups.write_text(f"[runtime]\ndecode_groups = {args.ranks}\n")
        two_groups.write_text("[runtime]\ndecode_groups = 2\n")
        one_group.write_text("[runtime]\ndecode_groups = 1\n")
        busy: dict[str, dict[str, float]] = {}  # per staged case, each rank's computing share
        tree = baseline_tree(args.baseline, work) if args.baseline else None
        n = args.ranks
        for b in [int(x) for x in args.batches.split(",")]:
            ids = prompts(b, int(config["vocab_size"]))
            row: dict[str, Any] = {"batch": b}
            for tag, source in (("", None), ("baseline_", tree)):
                if tag and source is None:
                    continue
                one = cpu_export(weights, b, 1, args.new_tokens, work / f"{tag}b{b}_1", source)
                row[f"{tag}dinb_1"] = cpu_generate(
                    "simulate", one, ids, args.new_tokens, 1, source, args.repeat
                )
                split = cpu_export(weights, b, n, args.new_tokens, work / f"{tag}b{b}_{n}", source)
                row[f"{tag}dinb_sim{n}"] = cpu_generate(
                    "simulate", split, ids, args.new_tokens, n, source, args.repeat
                )
                row[f"{tag}dinb_mpi{n}"] = cpu_generate(
                    "mpiexec", split, ids, args.new_tokens, n, source, args.repeat
                )
                if not tag:  # the same ranks with the SPMD program's gloo collectives
                    row[f"dinb_mpi{n}_gloo"] = cpu_generate(
                        "mpiexec", split, ids, args.new_tokens, n, source, args.repeat, gloo
                    )
                if args.stages and (not tag or args.baseline_stages):  # n pipeline stages of one rank each
                    staged = cpu_export(weights, b, n, args.new_tokens, work / f"{tag}b{b}_{n}st", source,
                                        stages=n)
                    if not tag:
                        row[f"dinb_sim{n}_stages"] = cpu_generate(
                            "simulate", staged, ids, args.new_tokens, n, None, args.repeat
                        )
                    for key, cfg in ((f"{tag}dinb_mpi{n}_stages", one_group),  # and a group of slots a stage:
                                     (f"{tag}dinb_mpi{n}_stages_groups{n}", groups)):
                        row[key] = cpu_generate("mpiexec", staged, ids, args.new_tokens, n, source,
                                                args.repeat, cfg, busy.setdefault(f"b{b} {key}", {}))
                    if not tag and (os.cpu_count() or 1) >= 2 * n:  # 2 stages of n ranks, where the cores are
                        grid = cpu_export(weights, b, 2 * n, args.new_tokens, work / f"b{b}_2x{n}", None,
                                          stages=2)
                        row[f"dinb_sim{2 * n}_2x{n}"] = cpu_generate(
                            "simulate", grid, ids, args.new_tokens, 2 * n, None, args.repeat
                        )
                        for key, cfg in ((f"dinb_mpi{2 * n}_2x{n}", one_group),
                                         (f"dinb_mpi{2 * n}_2x{n}_groups2", two_groups)):
                            row[key] = cpu_generate("mpiexec", grid, ids, args.new_tokens, 2 * n, None,
                                                    args.repeat, cfg, busy.setdefault(f"b{b} {key}", {}))
            row["torch"] = torch_case(weights, b, args.new_tokens, "float32", "cpu", args.torch_python)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if tree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True
            )
        shutil.rmtree(work, ignore_errors=True)
    keys = [k for k in rows[0] if k != "batch"]
    print(f"\nms per output token (one decode step of the batch), {name} config, CPU; tokens/s in brackets")
    print("batch | " + " | ".join(keys) + (" | dinb_1 / baseline" if args.baseline else ""))
    for r in rows:
        cells = [f"{r[k]:.2f} ({r['batch'] * 1e3 / r[k]:.0f})" if r.get(k) else "-" for k in keys]
        ratio = f" | {r['dinb_1'] / r['baseline_dinb_1']:.2f}" if args.baseline else ""
        print(f"{r['batch']} | " + " | ".join(cells) + ratio)
    if busy:
        print("\nstaged cases: each rank's share of the decode time spent computing")
        for case, shares in busy.items():
            print(f"{case}: " + ", ".join(f"rank {r} {v:.0%}" for r, v in shares.items()))
    print(f"machine: {machine()}")
    result = {
        "busy": busy,
        "machine": machine(),
        "config": name,
        "dtype": "float32",
        "target": "cpu",
        "baseline": args.baseline,
        "new_tokens": args.new_tokens,
        "prompt": PROMPT,
        "ms_per_token": rows,
    }
    Path(args.out or ROOT / "benchmarks" / "results" / "generate.json").write_text(
        json.dumps(result, indent=1) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--configs", default=None, help="cpu: reference or cpu-mid; gpu: 1b,3b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-lens", default="80,2048", help="gpu: the exports' max_len")
    parser.add_argument("--ranks", type=int, default=2, help="cpu: ranks of (b) and (c)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 48 on the CPU, 64 on a GPU")
    parser.add_argument("--prefill", type=int, default=2048, help="gpu: the prefill row's prompt (0: none)")
    parser.add_argument("--repeat", type=int, default=2, help="cpu: runs of each dinb case (the best counts)")
    parser.add_argument("--baseline", default=None, help="cpu: a git revision of dinb to run beside")
    parser.add_argument("--baseline-stages", action="store_true",
                        help="cpu: the baseline's (s-mpi) and (s-mpi-G) too (a baseline with decoder stages)")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                        help="cpu: also --ranks pipeline stages of one rank each (simulated, mpiexec)")
    parser.add_argument(
        "--budget-s", type=float, default=1e9, help="gpu: start no case after this many seconds"
    )
    parser.add_argument("--paged", action=argparse.BooleanOptionalAction, default=True,
                        help="gpu: also each case with a paged KV cache")
    parser.add_argument("--decode-steps", default=None,
                        help="gpu: the decode steps a call can run: 8 (it and the powers of two below) "
                             "or 1,8 (those alone)")
    parser.add_argument("--torch-python", default=str(ROOT / ".venv-ref" / "bin" / "python"))
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--dry-run", action="store_true",
        help="gpu: the same cases on the CPU (to check the code), written to a temporary file unless --out",
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the work folder
    args = parser.parse_args()
    if args.target == "gpu":
        if args.dry_run:  # never over the stored GPU results
            DEVICE[0] = "cpu"
            args.out = args.out or str(Path(tempfile.gettempdir()) / "dinb-generate-dry-run.json")
        args.configs = args.configs or "1b,3b"
        args.new_tokens = args.new_tokens or 64
        if args.decode_steps is None:
            from dinb.models.llama import DEFAULT_DECODE_STEPS

            args.decode_steps = str(DEFAULT_DECODE_STEPS)
        steps = [int(k) for k in args.decode_steps.split(",")]  # one number: it and the powers of two below
        args.decode_steps = steps if len(steps) > 1 else steps[0]
        args.out = args.out or str(ROOT / "benchmarks" / "results" / "generate_gpu.json")
        gpu_main(args)
    else:
        args.configs = args.configs or "reference"
        args.new_tokens = args.new_tokens or 48
        cpu_main(args)


if __name__ == "__main__":
    main()
