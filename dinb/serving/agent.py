"""An Agent: one rank of the served model, answering the Distributed Worker's requests.

The agent has already joined its JAX job and loaded its own slice file (a :class:`dinb.Model`);
:func:`serve` registers it with the worker at ``distributed_address`` and runs every request the
worker sends through ``Model.predict`` (the SPMD program, XLA's collectives between the ranks),
until the worker says stop. On the worker's host, requests and results go over a Unix socket
(:mod:`dinb.serving.local_link`) that this thread polls with the ZeroMQ socket. A second socket
sends a heartbeat every 0.25 s from its own thread,
so a long predict does not look like a dead rank. An agent started before its worker waits for
it, saying so every 5 s, for at most ``worker_timeout_s``; when the worker restarts, the agent
registers again.

Three ways to start agents, all ending here: ``distributed.startup_agents`` (one process per slice
file), ``mpiexec -n N python -m dinb serve-agent`` and notebook engines (``%dinfer serve``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from dinb.errors import DinbError
from dinb.job import remote_predict, wire
from dinb.serving import local_link
from dinb.serving.generation import agent_step
from dinb.serving.worker import HEARTBEAT_S

log = logging.getLogger("dinb.serving")


def model_io(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Name, full shape and dtype of the model's inputs and outputs."""

    def rows(metas: Any) -> list[dict[str, Any]]:
        return [{"name": m.name, "shape": list(m.shape), "dtype": str(m.dtype)} for m in metas]

    return rows(model.get_inputs()), rows(model.output_meta())


def generation_info(model: Any) -> dict[str, Any] | None:
    """What the server needs of a decoder's export to schedule it (None for other models)."""
    info = model.generation_info()
    if info is None:
        return None
    config = model.export_meta().get("model_config", {})
    return {"slots": info["slots"], "max_len": info["max_len"], "buckets": info["buckets"],
            "vocab": info["vocab"], "model_dir": config.get("model_dir"),
            "eos_token_id": (config.get("config") or {}).get("eos_token_id")}


def serve(
    distributed_address: str,
    model: Any,
    rank: int,
    world: int,
    job: str,
    stop: threading.Event | None = None,
    worker_timeout_s: float = 300.0,
    keys: Any = None,
) -> str:
    """Register with the worker and answer it until it says stop (or ``stop`` is set).

    Returns why it ended: ``"stopped"`` (the worker's order), ``"interrupted"`` (``stop``).
    Raises :class:`DinbError` when no worker answers within ``worker_timeout_s``, or the worker
    refuses the agent (another rank count). ``keys``: the servable's
    (:class:`~dinb.serving.servable_key.ServableKeys`), for a worker off loopback.
    """
    import zmq

    stop = stop or threading.Event()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"{job}/{rank}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.as_agent(sock)
    sock.connect(f"tcp://{distributed_address}")
    inputs, outputs = model_io(model)
    me = {"rank": rank, "job": job}
    registration = wire.pack(
        {
            "type": "register",
            "world": world,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "inputs": inputs,
            "outputs": outputs,
            "stages": (model.pipeline_info() or {"stages": 1})["stages"],
            "generation": generation_info(model),
            "batch_buckets": getattr(model, "batch_buckets", None) or None,
            **me,
        }
    )
    beat = threading.Thread(
        target=_heartbeats,
        args=(distributed_address, me, stop, keys),
        daemon=True,
        name=f"dinb-agent-{rank}-heartbeat",
    )
    beat.start()

    def predict(arrays: list[Any], micro_batches: int | None = None) -> list[Any]:
        return [t.get_data_to_numpy() for t in model.predict(arrays, micro_batches=micro_batches)]

    samplers: dict[int, Any] = {}  # a decoder's: each slot's token picker

    def answer(header: dict[str, Any], frames: list[Any]) -> list[Any]:
        """The reply frames to a request (``infer`` or ``gen_step``)."""
        if header.get("type") == "gen_step":
            try:
                result = agent_step(model, samplers, header)
            except DinbError as e:
                result = {"error": f"{type(e).__name__}: {e}"}
            return wire.pack({"type": "result", "id": header["id"], **me, **result})
        return remote_predict.answer(predict, frames, type="result", id=header["id"], **me)[0]

    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    link: Any = None  # the local link to the worker, once connected
    sock.send_multipart(registration)
    registered, t0, told = False, time.monotonic(), time.monotonic()
    try:
        while not stop.is_set():
            events = dict(poller.poll(200))
            if link is not None and link.fileno() in events:
                try:
                    frames = local_link.receive(link)
                    if frames is not None:
                        local_link.send(link, answer(wire.header(frames), frames))
                except OSError:  # the worker went away mid-message
                    frames = None
                if frames is None:  # the link is gone: back to ZeroMQ alone
                    poller.unregister(link)
                    link.close()
                    link = None
                continue
            if sock not in events:
                if not registered and time.monotonic() - t0 > worker_timeout_s:
                    raise DinbError(
                        f"rank {rank}: no distributed worker answered at {distributed_address} "
                        f"within {worker_timeout_s:g} s; start the servable "
                        "(distributed.start_servable) with this distributed_address"
                    )
                if not registered and time.monotonic() - told > 5:
                    log.warning("rank %d waits for the distributed worker at %s", rank, distributed_address)
                    told = time.monotonic()
                continue
            frames = sock.recv_multipart(copy=False)
            header = wire.header(frames)
            kind = header.get("type")
            if kind == "welcome":
                registered = True
                if link is not None:
                    poller.unregister(link)
                    link.close()
                link = _link_to(header.get("link"), f"{job}/{rank}")
                if link is not None:
                    poller.register(link, zmq.POLLIN)
            elif kind == "register_again":  # the worker restarted under this agent
                sock.send_multipart(registration)
            elif kind == "refused":
                raise DinbError(
                    f"rank {rank}: the distributed worker at {distributed_address} refused this "
                    f"agent: {header.get('reason')}"
                )
            elif kind in ("gen_step", "infer"):
                sock.send_multipart(answer(header, frames), copy=False)
            elif kind == "stop":
                sock.send_multipart(wire.pack({"type": "bye", **me}))
                return "stopped"
        return "interrupted"
    finally:
        stop.set()
        beat.join(timeout=2)
        if link is not None:
            link.close()
        sock.close(linger=100)


def _link_to(invite: dict[str, Any] | None, key: str) -> Any:
    """A connected local link to the worker, or None where its socket cannot be reached (another
    host or network namespace: requests then stay on ZeroMQ)."""
    if not invite:
        return None
    try:
        return local_link.connect(invite["path"], {"key": key, "token": invite["token"]})
    except OSError as e:
        log.info("no local link to the worker (%s); requests go over ZeroMQ", e)
        return None


def _heartbeats(address: str, me: dict[str, Any], stop: threading.Event, keys: Any) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    if keys is not None:
        keys.as_agent(sock)
    sock.setsockopt(zmq.IDENTITY, f"{me['job']}/{me['rank']}/heartbeat".encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 4)  # a missing worker must not pile heartbeats up
    sock.connect(f"tcp://{address}")
    frames = wire.pack({"type": "heartbeat", **me})
    try:
        while not stop.wait(HEARTBEAT_S):
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
    finally:
        sock.close(linger=0)
