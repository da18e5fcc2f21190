"""Serving: ``serve`` (agents, worker, REST and gRPC for one export), ``serve-agent`` (one
agent) and ``serve-key`` (the servable's key file)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dinb.errors import DinbError


def cmd_serve_agent(args: argparse.Namespace) -> int:
    """One Agent: join the job, load this rank's slice file, serve the worker until it says stop."""
    import signal
    import threading
    import uuid

    from dinb.job import ranks
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
    # Leaving: Python's exit would restore SIGTERM's default, and the launcher's SIGTERM would then
    # kill this rank in its exit and make mpiexec report a failed job.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if how == "stopped":
        del model
        ranks.shutdown()  # every rank was told to stop: they leave the job together
    return 0


def _write_servable(directory: Path, ranks: int, stages: int, ins: list[str], outs: list[str],
                    batching: bool) -> None:
    """A ``servable_config.py`` of one method, ``predict``, over the export's ranks and stages."""
    directory.mkdir()
    (directory / "servable_config.py").write_text(
        "from dinb.serving import distributed, register\n\n"
        f"model = distributed.declare_servable(rank_size={ranks}, stage_size={stages}, "
        f"with_batch_dim={batching})\n\n\n"
        f"@register.register_method(output_names={outs!r})\n"
        f"def predict({', '.join(ins)}):\n"
        f"    return register.add_stage(model, {', '.join(ins)}, outputs_count={len(outs)})\n")


def _announce(args: argparse.Namespace, name: str, ranks: int, ins: list[str], outs: list[str],
              generates: bool) -> None:
    grpc = f"gRPC {args.grpc} and " if args.grpc != "none" else ""
    print(f"serving {name} ({ranks} ranks, method predict: {ins} -> {outs}) on {grpc}"
          f"REST http://{args.rest} (v2 model {name!r}); Ctrl-C stops", flush=True)
    if generates:
        print(f"it generates: POST http://{args.rest}/v2/models/{name}/generate and .../generate_stream "
              f"with {{\"text_input\": ..., \"parameters\": {{\"max_tokens\": 16}}}}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """A one-method servable from an export: agents, the worker, REST and gRPC, until Ctrl-C."""
    import signal
    import threading

    from dinb.export.slicefile import find_slice_files, read_meta
    from dinb.job.addresses import is_loopback
    from dinb.serving import distributed, server
    from dinb.serving.servable_key import make_key_file

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
    _write_servable(servable_dir / name, len(files), meta.get("pipeline", {}).get("stages", 1), ins, outs,
                    bool(args.batching))
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
        _announce(args, name, len(files), ins, outs, "generation" in meta)
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


def add_parsers(sub: Any) -> None:
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
