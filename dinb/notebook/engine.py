"""What runs inside each notebook engine: one engine is one rank of one JAX job.

The client (:mod:`dinb.notebook.cluster`) calls these functions on every engine together. State lives in
this module (the engine process's rank, context and loaded model). Before the one collective a
predict runs, each rank publishes ``phase = "collective"`` through ipyparallel's data channel,
so when a call times out the client can tell the rank stuck in its own part (never reached the
collective) from the ranks waiting for it.
"""

from __future__ import annotations

import os
import time
from typing import Any

_state: dict[str, Any] = {"rank": None, "world": None, "target": None, "context": None, "model": None,
                          "model_dir": None, "outputs": None, "preload": None}
_marks: dict[str, float] = {}  # when this engine reached each step of its start (wall clock, s)


def _mark(step: str) -> None:
    _marks[step] = time.time()


def _process_start() -> float:
    """This process's start on the wall clock, from /proc (to 10 ms)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return float("nan")


def start_marks() -> dict[str, float]:
    """When this engine's process started and reached each step since: ``engine code`` (ipyparallel's
    engine ran dinb's start-up command), ``jax imported``, ``identified``, ``joined``, ``load``
    and ``loaded`` (:mod:`benchmarks.notebook_start` draws them)."""
    return {"process": _process_start(), **_marks}


def _publish(**data: Any) -> None:
    try:
        from ipyparallel.datapub import publish_data

        publish_data(data)
    except Exception:  # outside an engine task (tests calling directly): nothing to publish
        pass


def preload() -> None:
    """Import JAX on a thread while the engine finishes registering (the engines that
    :mod:`dinb.notebook.cluster` starts run this as their startup command; the join needs JAX)."""
    import importlib
    import threading

    _mark("engine code")

    def imports() -> None:
        importlib.import_module("jax")
        _mark("jax imported")

    thread = threading.Thread(target=imports, daemon=True, name="dinb-preload")
    thread.start()
    _state["preload"] = thread


def identify(client_host: str = "127.0.0.1") -> dict[str, Any]:
    """This engine's process id, host, MPI rank (None when not launched by mpiexec) and its own
    address: loopback when the client is on loopback, else its address on the route to the
    client (``client_host``, the notebook kernel's address)."""
    import socket

    from dinb.job.addresses import host_key, own_address
    from dinb.job.mpi_world import mpi_world

    world = mpi_world()
    if _state["preload"] is not None:  # let it finish before this thread imports anything of JAX
        _state["preload"].join()
    import jax  # noqa: F401  (on every engine at once, before the join needs it)

    _mark("identified")
    return {"pid": os.getpid(), "host": socket.gethostname(), "host_key": host_key(),
            "address": own_address(client_host),
            "mpi_rank": world[0] if world else None, "mpi_size": world[1] if world else None}


def free_port(host: str) -> int:
    """A free port on this engine's host (rank 0 picks the JAX coordinator's port)."""
    from dinb.job.addresses import free_port as pick

    return pick(host)


def join(rank: int, world: int, coordinator: str, target: str, init_timeout_s: int,
         local_rank: int | None = None, local_size: int | None = None) -> dict[str, Any]:
    """Bind the device and join the job as ``rank`` of ``world`` (before any other JAX call);
    ``local_rank``/``local_size``: this rank among the ranks on its host."""
    import dinb

    job = dinb.init_ranks(target, process_index=rank, process_count=world, coordinator=coordinator,
                          init_timeout_s=init_timeout_s, local_rank=local_rank, local_size=local_size)
    _state.update(rank=rank, world=world, target=target)
    _mark("joined")
    return {"rank": rank, "device": str(job.devices[rank])}


def set_context(target: str, provider: str) -> str:
    """Build this rank's ``Context`` (MindSpore Lite's ``Context(target, device_id, rank_id, provider)``)."""
    from dinb import Context

    ctx = Context(target=[target], rank_id=_state["rank"], provider=provider)
    ctx.check_provider()
    _state["context"] = ctx
    return f"{target}/{provider}"


def load(model_dir: str) -> dict[str, Any]:
    """Load this rank's own slice file and compile (all ranks at once, as MindSpore Lite does)."""
    from dinb import Context, Model, ModelType

    _mark("load")
    model = Model()
    context = _state["context"] or Context(target=[_state["target"] or "cpu"], rank_id=_state["rank"])
    model.build_from_file(model_dir, ModelType.DINB, context,
                          on_phase=lambda phase: _publish(**{phase: time.time()}))
    _state.update(model=model, model_dir=model_dir, outputs=None)
    _mark("loaded")
    return {"rank": _state["rank"], "model": model.model_name,
            "inputs": [(t.name, list(t.shape), str(t.dtype)) for t in model.get_inputs()],
            "pipeline": model.pipeline_info(), "generation": _generation_info(model)}


def _generation_info(model: Any) -> dict[str, Any] | None:
    info = model.generation_info()
    if info is None:
        return None
    cache = info["cache"]
    return {"slots": info["slots"], "max_len": info["max_len"], "buckets": info["buckets"],
            "cache_shape": list(cache.shape), "cache_dtype": cache.dtype,
            "cache_bytes": info["cache_bytes"][_state["rank"]]}


def generate(prompts: Any, max_new_tokens: int, sampling: dict[str, Any]) -> dict[str, Any]:
    """Generate on this rank (every rank at once); the tokens picked so far are published as they
    come, so the notebook prints them while the ranks work."""
    _not_serving()
    model = _model()
    so_far: list[list[int]] = []

    def on_token(row: int, token: int) -> None:
        while len(so_far) <= row:
            so_far.append([])
        so_far[row].append(token)
        _publish(tokens=so_far)  # ipyparallel serializes it now: no copy needed

    _publish(phase="collective", t=time.time())
    tokens = model.generate(prompts, max_new_tokens, on_token=on_token, **sampling)
    _publish(phase="done", t=time.time(), tokens=so_far)
    return {"tokens": tokens, "timings": model.generation_info()["timings"]}


def model() -> Any:
    """This rank's loaded :class:`dinb.Model` (for ``%%dinfer`` cells)."""
    return _model()


def _model() -> Any:
    if _state["model"] is None:
        from dinb.errors import DinbError

        raise DinbError(f"rank {_state['rank']} has no model loaded; run `%dinfer load DIR` first")
    return _state["model"]


def predict(inputs: list[Any], micro_batches: int | None = None) -> list[Any]:
    """Run the SPMD program on this rank; returns this rank's outputs as numpy arrays (none on a
    rank outside the last pipeline stage)."""
    _not_serving()
    model = _model()
    _publish(phase="collective", t=time.time())
    outs = [t.get_data_to_numpy() for t in model.predict(inputs, micro_batches=micro_batches)]
    _publish(phase="done", t=time.time())
    _state["outputs"] = outs
    return outs


def rank() -> int:
    """This engine's rank in the job."""
    return int(_state["rank"])


def status() -> dict[str, Any]:
    """Rank, pid, device, resident memory and what is loaded."""
    rss = 0
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    model = _state["model"]
    row = {"rank": _state["rank"], "pid": os.getpid(), "device": None, "kind": None, "device_mem": None,
           "rss_mib": round(rss / 2**20), "loaded": _state["model_dir"],
           "provider": model.provider if model is not None else None,
           "collectives": model.collectives if model is not None else None}
    if _state["rank"] is not None:
        from dinb.job.ranks import current_job

        job = current_job()
        if job is not None:
            dev = job.devices[_state["rank"]]
            row.update(device=str(dev), kind=dev.device_kind, device_mem=_device_memory(dev))
    return row


def _device_memory(dev: Any) -> str | None:
    """``used/total GiB`` of an accelerator (XLA's allocator); None for CPU devices."""
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # CPU devices have no memory stats
        return None
    total = stats.get("bytes_limit")
    if not total:
        return None
    return f"{stats.get('bytes_in_use', 0) / 2**30:.1f}/{total / 2**30:.1f} GiB"


def outputs() -> list[Any] | None:
    return _state["outputs"]


def timeline() -> list[tuple[Any, ...]]:
    """This rank's computations of the last pipelined predict, as StageEvent fields."""
    model = _state["model"]
    if model is None:
        return []
    rank = _state["rank"]
    return [(e.rank, e.stage, e.micro, e.start, e.end) for e in model.timeline() if e.rank == rank]


def leave() -> bool:
    """Leave the JAX job (``jax.distributed.shutdown``) before the engine stops."""
    from dinb.job.ranks import shutdown

    _state.update(model=None, outputs=None)  # the arrays they hold keep the GPU client alive
    shutdown()
    return True


# ---- the fast predict path: a direct socket per rank, served from a thread ----------------------
_fast: dict[str, Any] = {"endpoint": None, "server_key": None}


def serve_fast(host: str = "127.0.0.1", client_key: str | None = None) -> dict[str, Any]:
    """Start (once) this rank's predict server on ``host``; returns its endpoint and, with
    ``client_key``, its CURVE public key.

    A message is ``[header JSON, array bytes ...]`` with the inputs; the reply carries this rank's
    outputs (rank 0) or only their shapes and a checksum (other ranks, enough to check they
    agree). The engine's main thread stays free for control calls (status, restart).
    Off loopback the socket is a CURVE server that admits only the client holding the secret of
    ``client_key`` (:mod:`dinb.job.secure_socket`): nobody else on the network can drive it.
    """
    if _fast["endpoint"] is None:
        import threading

        from dinb.job.secure_socket import endpoint_of, reply_socket

        sock, _fast["server_key"] = reply_socket(host, client_key)
        _fast["endpoint"] = endpoint_of(sock)
        threading.Thread(target=_fast_loop, args=(sock,), daemon=True, name="dinb-fast-predict").start()
    return {"endpoint": _fast["endpoint"], "server_key": _fast["server_key"]}


def _fast_loop(sock: Any) -> None:
    from dinb.job import remote_predict, wire

    while True:
        frames = sock.recv_multipart(copy=False)
        if wire.header(frames).get("noop"):
            sock.send_multipart(wire.pack({"outputs": []}))  # the client measuring the path itself
            continue
        reply, outs = remote_predict.answer(_predict_arrays, frames)
        if outs is not None:
            _state["outputs"] = outs
        sock.send_multipart(reply, copy=False)


def _predict_arrays(arrays: list[Any], micro_batches: int | None = None) -> list[Any]:
    _not_serving()
    return [t.get_data_to_numpy() for t in _model().predict(arrays, micro_batches=micro_batches)]


# ---- serving: this rank as an Agent of a servable -------------------------------------------------
def serve_agent(distributed_address: str, job: str, worker_timeout_s: float) -> int:
    """Serve the loaded model as this rank's Agent (:mod:`dinb.serving.agent`) from a thread."""
    import threading

    from dinb.serving import agent

    if _state.get("serving") is not None:
        from dinb.errors import DinbError

        raise DinbError(f"rank {_state['rank']} already serves; stop it first (%dinfer serve stop)")
    model, stop = _model(), threading.Event()
    _state["serving"] = stop

    def run() -> None:
        try:
            agent.serve(distributed_address, model, _state["rank"], _state["world"], job, stop,
                        worker_timeout_s)
        finally:
            _state["serving"] = None

    threading.Thread(target=run, daemon=True, name="dinb-agent").start()
    return int(_state["rank"])


def stop_agent() -> bool:
    """Stop serving (the thread leaves at its next poll)."""
    stop = _state.get("serving")
    if stop is not None:
        stop.set()
    return stop is not None


def _not_serving() -> None:
    if _state.get("serving") is not None:
        from dinb.errors import DinbError

        raise DinbError(f"rank {_state['rank']} serves a servable: its requests and this predict would "
                        "meet in the collectives out of order. Use the servable, or stop serving "
                        "(%dinfer serve stop)")
