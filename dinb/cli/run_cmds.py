"""Running an export's ranks: ``run`` (predict), ``embed`` (MiniLM), ``generate`` (a decoder)
and ``demo`` (MindSpore's MatMul example under mpiexec)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dinb.cli.common import (
    coordinator_option,
    ids_arg,
    launch,
    lite_sample_lines,
    make_input,
)
from dinb.errors import DinbError


def cmd_run(args: argparse.Namespace) -> int:
    import warnings

    from dinb.errors import ProviderFallbackWarning
    from dinb.job import ranks
    from dinb.runtime import Context, Model, ModelType
    from dinb.runtime.config import load_config

    job = ranks.init(args.target, simulate=args.simulate, init_timeout_s=args.init_timeout,
                     coordinator_address=args.coordinator_address,
                     config_coordinator_address=load_config(args.config_file).coordinator_address or None)
    context = Context(target=[args.target], provider=args.provider)
    warnings.simplefilter("ignore", ProviderFallbackWarning)  # the notice is printed with the provider
    model = Model()
    model.build_from_file(args.model_dir, ModelType.DINB, context, args.config_file)
    inputs = model.get_inputs()
    for t in inputs:
        t.set_data_from_numpy(make_input(args.input, t.shape, t.dtype, args.seed, t.name))
    outputs, stats = _timed_predicts(model, inputs, args)
    if args.save_outputs:
        _save_outputs(model, outputs, Path(args.save_outputs))
    gathered = job.allgather("report", json.dumps({"lines": _rank_report(model, outputs), "stats": stats}))
    if job.process_index == 0:
        _print_report(model, [json.loads(g) for g in gathered], args)
    del model, inputs, outputs  # their device arrays hold the GPU client (see ranks.shutdown)
    ranks.shutdown()
    return 0


def _timed_predicts(model: Any, inputs: list[Any],
                    args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """``--warmup`` then ``--repeat`` predicts: the last outputs, and this rank's median times."""
    times_predict, times_loop = [], []
    outputs: list[Any] = []
    for i in range(args.warmup + args.repeat):
        t0 = time.perf_counter()
        outputs = model.predict(inputs, micro_batches=args.micro_batches)
        t1 = time.perf_counter()
        if i >= args.warmup:
            times_predict.append(t1 - t0)
        if args.repeat > 1:  # the run loop as a user script would write it: fresh inputs each time
            for t in inputs:
                t.set_data_from_numpy(t.get_data_to_numpy().copy())
            _ = [o.get_data_to_numpy() for o in outputs]
            if i >= args.warmup:
                times_loop.append(time.perf_counter() - t0)
    return outputs, {
        "predict_ms_median": 1e3 * statistics.median(times_predict) if times_predict else None,
        "loop_ms_median": 1e3 * statistics.median(times_loop) if times_loop else None,
        "load_s": model.timings["load_s"], "compile_s": model.timings["compile_s"],
    }


def _first_output_rank(model: Any) -> int:
    """The first rank holding outputs: rank 0, or the first rank of the last pipeline stage."""
    pipe = model.pipeline_info()
    return model.world_size - pipe["stage_ranks"] if pipe else 0


def _save_outputs(model: Any, outputs: list[Any], out_dir: Path) -> None:
    """``rank{r}_{name}.npy`` of every local rank, and ``{name}.npy`` from the first output rank."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank, arrays in model.rank_outputs().items():
        for out, data in zip(outputs, arrays):
            np.save(out_dir / f"rank{rank}_{out.name}.npy", data)
    if _first_output_rank(model) in model.local_ranks:  # this rank's (whole) outputs, one file per name
        for out in outputs:
            np.save(out_dir / f"{out.name}.npy", out.get_data_to_numpy())


def _rank_report(model: Any, outputs: list[Any]) -> list[str]:
    """What each local rank prints: who it is, and MindSpore Lite's lines for every output."""
    job, pipe, rank_outputs = model.job, model.pipeline_info(), model.rank_outputs()
    report: list[str] = []
    for rank in job.local_ranks:
        stage = ""
        if pipe:
            s = rank // pipe["stage_ranks"]
            stage = f", stage {s} of {pipe['stages']}" + ("" if s == pipe["stages"] - 1 else ": no outputs")
        report.append(f"rank {rank} of {job.world_size} (pid {os.getpid()}, "
                      f"device {job.device_of(rank)}{stage}):")
        per_rank = rank_outputs[rank] if len(job.local_ranks) > 1 else \
            [o.get_data_to_numpy() for o in outputs]
        for out, data in zip(outputs, per_rank):
            report += ["  " + line for line in lite_sample_lines(out.name.rstrip(), data)]
    return report


def _print_report(model: Any, items: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Rank 0 prints the provider, the ranks' reports and the times (``--timings-json`` too)."""
    job, pipe = model.job, model.pipeline_info()
    notice = f" ({model.provider_notice})" if model.provider_notice else ""
    print(f"provider: {model.provider}{notice}; collectives: {model.collectives}")
    if job.process_count > 1:
        print(job.describe_addresses())
    if pipe:
        m = args.micro_batches or model.config.micro_batches
        print(f"pipeline: {pipe['stages']} stages x {pipe['stage_ranks']} ranks, {m} micro-batch(es), "
              f"activations over {pipe['transfer']}")
    for item in items:
        print("\n".join(item["lines"]), flush=True)
    rank_stats = [item["stats"] for item in items]
    if args.repeat > 1:
        print(f"predict: median {max(s['predict_ms_median'] for s in rank_stats):.3f} ms over "
              f"{args.repeat} calls (slowest rank)")
    if args.timings_json:
        Path(args.timings_json).write_text(json.dumps(
            {"world_size": job.world_size, "processes": job.process_count, "ranks": rank_stats}, indent=2))


def cmd_embed(args: argparse.Namespace) -> int:
    import warnings
    import zlib

    from dinb.errors import ProviderFallbackWarning
    from dinb.export.slicefile import find_slice_files, read_meta
    from dinb.job import ranks
    from dinb.models import BertEncoder, minilm_dir
    from dinb.runtime import Context, Model, ModelType

    export = Path(args.model_dir)
    meta = read_meta(export if export.is_file() else find_slice_files(export)[0])
    if meta["model"] != "minilm":
        raise DinbError(f"{export} is an export of {meta['model']!r}; embed runs sentence encoders (minilm)")
    config = dict(meta["model_config"])
    tokenizer_dir = Path(args.tokenizer or config.get("model_dir") or minilm_dir())
    if not (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer_dir = minilm_dir()
    encoder = BertEncoder(**dict(config, model_dir=tokenizer_dir))
    (ids, mask, types), lengths = encoder.tokenize(args.sentences)
    job = ranks.init(args.target, simulate=args.simulate, init_timeout_s=args.init_timeout,
                     coordinator_address=args.coordinator_address)
    warnings.simplefilter("ignore", ProviderFallbackWarning)  # the notice is printed below
    model = Model()
    model.build_from_file(export, ModelType.DINB, Context(target=[args.target], provider=args.provider))
    outputs = {t.name: t.get_data_to_numpy() for t in model.predict([ids, mask, types])}
    emb = outputs["sentence_embedding"][: len(args.sentences)]
    crcs = job.allgather("embeddings", str(zlib.crc32(np.ascontiguousarray(emb).tobytes())))
    if job.process_index == 0:
        notice = f" ({model.provider_notice})" if model.provider_notice else ""
        print(f"{meta['model']} on {job.world_size} ranks ({job.process_count} process(es)), provider "
              f"{model.provider}{notice}, collectives {model.collectives}; every rank returned the same "
              f"embeddings: {len(set(crcs)) == 1}")
        for i, (sentence, n) in enumerate(zip(args.sentences, lengths)):
            cut = f", cut at {encoder.seq}" if n > encoder.seq else ""
            print(f"[{i}] {n} tokens{cut}: {' '.join(f'{v:+.4f}' for v in emb[i, :6])} ...  |e| = "
                  f"{np.linalg.norm(emb[i]):.4f}  {sentence!r}")
        if len(args.sentences) > 1:
            print("cosine similarity:")
            for i, row in enumerate(emb @ emb.T):
                print(f"  [{i}] " + " ".join(f"{v:6.3f}" for v in row))
    del model
    ranks.shutdown()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Prompts in, tokens out as they come (rank 0 prints), every rank checked to agree."""
    import zlib

    from dinb.export.slicefile import find_slice_files, read_meta
    from dinb.job import ranks
    from dinb.models.text import TextStream, default_new_tokens, ms_per_step, token_codec
    from dinb.runtime import Context, Model, ModelType

    export = Path(args.model_dir)
    meta = read_meta(export if export.is_file() else find_slice_files(export)[0])
    if "generation" not in meta:
        raise DinbError(f"{export} is an export of {meta['model']!r}, which does not generate; export a "
                        "decoder (python -m dinb export --model llama ...)")
    if bool(args.prompts) == bool(args.ids):
        raise DinbError("give the prompts as text or as --ids, one of the two")
    config = meta["model_config"]
    codec = token_codec(args.tokenizer or config.get("model_dir"), config["config"])
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = args.ids or [codec.encode_chat([*system, {"role": "user", "content": p}])
                               for p in args.prompts]
    else:
        prompts = args.ids or [codec.encode(p) for p in args.prompts]
    job = ranks.init(args.target, simulate=args.simulate, init_timeout_s=args.init_timeout,
                     coordinator_address=args.coordinator_address)
    model = Model()
    model.build_from_file(export, ModelType.DINB, Context(target=[args.target]), args.config_file)
    talk = job.process_index == 0 and not args.json
    single = len(prompts) == 1
    info = model.generation_info()
    count = args.max_new_tokens or default_new_tokens(info["max_len"], [len(p) for p in prompts])
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    # compile the prefill and the decode calls the generation runs (a call of each step count:
    # 1 + 2 + 4 + 8 steps) and let the collectives connect (gloo says so), before the stream and
    # the timings start
    model.generate(prompts, min(count, sum(info["decode_steps"]) + 1), stop_ids=(), **sampling)
    if talk:
        print(f"{meta['model']} on {job.world_size} ranks ({job.process_count} process(es)), collectives "
              f"{model.collectives}; KV cache per rank {meta['generation']['cache_bytes']} bytes")
        if single:
            print(args.prompts[0] if args.prompts and not args.chat else
                  (codec.decode(prompts[0]) if args.chat else prompts[0]), end="", flush=True)

    stops = {"stop_ids": ()} if args.ignore_eos else {}
    rows = model.generate(prompts, count, on_token=TextStream(codec) if talk and single else None, **stops,
                          **sampling)
    crcs = job.allgather("tokens", str(zlib.crc32(json.dumps(rows).encode())))
    timings = model.generation_info()["timings"]
    per_token_ms = ms_per_step(timings)
    texts = [codec.decode(r) for r in rows]
    if job.process_index == 0:
        if args.json:
            print(json.dumps({"tokens": rows, "texts": texts, "ranks": job.world_size,
                              "collectives": model.collectives, "same_on_every_rank": len(set(crcs)) == 1,
                              "prefill_s": timings.get("prefill_s"),
                              "decode_ms_per_step": per_token_ms,
                              "paged": model.generation_info()["paged"],
                              "stages": model.generation_info()["stages"]}))
        else:
            if single:
                print()
            else:
                for p, text in zip(args.prompts or prompts, texts):
                    print(f"{p} -> {text}")
            print(f"{sum(map(len, rows))} tokens; decode {per_token_ms:.2f} ms per step ({len(rows)} "
                  f"sequence(s)); every rank generated the same tokens: {len(set(crcs)) == 1}")
    del model
    ranks.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dinb.models import MatMulNeg

    model = MatMulNeg()
    x = np.ones((128, 96), np.float32)
    out_root = Path(args.out or tempfile.mkdtemp(prefix="dinb-demo-"))
    try:
        return _demo(args, model, x, out_root)
    finally:
        if args.out is None:
            shutil.rmtree(out_root, ignore_errors=True)
            print(f"removed the demo's slice files from {out_root} (keep them with --out DIR)")


def _demo(args: argparse.Namespace, model: Any, x: np.ndarray, out_root: Path) -> int:
    from dinb.export import export_distributed
    from dinb.sharding.strategy import infer_predict_layout

    strategies = model.strategy_names if args.strategy == "all" else (args.strategy,)
    print(f"dinb demo: MindSpore's MatMul+Neg example, y = -(x @ W), W = 0.5 (96x16), x = ones(128x96)\n"
          f"expected: -48 everywhere; {args.ranks} real rank processes under mpiexec; slice files "
          f"in {out_root}\n")
    failed = 0
    for name in strategies:
        strategy = infer_predict_layout(model, x, device_num=args.ranks, strategy=name)
        out_dir = out_root / name
        export_distributed(model, model.init_params(), strategy, [x], out_dir)
        print(f"== strategy {name}: matmul.shard({_shard_str(name, args.ranks)}), "
              f"weight {strategy['matmul_weight']}")
        proc = launch(args.ranks, ["--model-dir", str(out_dir)], timeout_s=args.timeout)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            failed += 1
            sys.stdout.write(proc.stderr)
            print(f"!! strategy {name} failed (exit code {proc.returncode})")
        print()
    return 1 if failed else 0


def _shard_str(name: str, n: int) -> str:
    from dinb.models.matmul import MATMUL_SHARDS

    return str(MATMUL_SHARDS[name](n))


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("run", help="be one rank (under mpiexec) or all ranks (--simulate N)")
    p.add_argument("--model-dir", required=True, help="directory of an export (or a .dinb file)")
    p.add_argument("--simulate", type=int, default=None, help="N ranks as N virtual CPU devices")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--provider", default="xla", choices=["xla", "tensorrt"])
    p.add_argument("--config-file", default=None, help=".ini with [runtime] options")
    p.add_argument("--input", default="ones", help="ones | random | a .npy file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--init-timeout", type=int, default=30, help="seconds to wait for all ranks")
    p.add_argument("--timings-json", default=None)
    p.add_argument("--save-outputs", default=None, help="save each rank's outputs as .npy here")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="pipelined exports: cut each predict into this many micro-batches")
    coordinator_option(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("embed", help="sentence embeddings from an exported encoder (minilm), on real "
                                     "ranks (mpiexec) or simulated ones")
    p.add_argument("sentences", nargs="+")
    p.add_argument("--model-dir", required=True, help="directory of a minilm export")
    p.add_argument("--simulate", type=int, default=None, help="N ranks as N virtual CPU devices")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--provider", default="xla", choices=["xla", "tensorrt"])
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the export's)")
    p.add_argument("--init-timeout", type=int, default=30)
    coordinator_option(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("generate", help="generate text from an exported decoder (llama), streaming, on "
                                        "real ranks (mpiexec) or simulated ones")
    p.add_argument("prompts", nargs="*", help="prompts as text (the export's tokenizer.json encodes them)")
    p.add_argument("--ids", action="append", type=ids_arg, default=None,
                   help="a prompt as token ids, e.g. 1,5,9 (repeat for several)")
    p.add_argument("--model-dir", required=True, help="directory of a llama export")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate --max-new-tokens whatever the end tokens (to time a generation)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: as many as the cache holds after the longest prompt, at most 64")
    p.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (default: the model's generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None, help="0: no limit (default: as --temperature's)")
    p.add_argument("--top-p", type=float, default=None, help="1: no limit (default: as --temperature's)")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user's message, put through the model's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simulate", type=int, default=None, help="N ranks as N virtual CPU devices")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the export's)")
    p.add_argument("--init-timeout", type=int, default=30)
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, texts, timings)")
    p.add_argument("--config-file", default=None, help=".ini with [runtime] options (collectives = gloo ...)")
    coordinator_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="MindSpore's distributed MatMul example on real ranks")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--strategy", default="all", choices=["all", "contraction", "batch", "columns"])
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(func=cmd_demo)
