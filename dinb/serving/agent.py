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
from dinb.serving.worker import HEARTBEAT_S, agent_identity

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
            "decode_steps": info["decode_steps"],
            "vocab": info["vocab"], "model_dir": config.get("model_dir"), "eos_token_id": info["end_tokens"],
            "defaults": {k: v for k, v in info["defaults"].items() if k != "eos_token_id"},
            "family": model.model_name,
            "paged": None if info.get("paged") is None else
            {k: info["paged"][k] for k in ("blocks", "block_size", "table_width")}}


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
    agent = AgentLoop(distributed_address, model, rank, world, job, stop or threading.Event(),
                      worker_timeout_s, keys)
    try:
        return agent.run()
    finally:
        agent.close()


class AgentLoop:
    """One agent's sockets (ZeroMQ to the worker, and the local link once it is offered), its
    heartbeat thread, and the loop that answers the worker's requests."""

    def __init__(self, address: str, model: Any, rank: int, world: int, job: str, stop: threading.Event,
                 worker_timeout_s: float, keys: Any):
        import zmq

        self.address, self.model, self.rank, self.stop = address, model, rank, stop
        self.worker_timeout_s = worker_timeout_s
        self.identity = agent_identity(job, rank)
        self.me = {"rank": rank, "job": job}
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.identity.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.as_agent(self.sock)
        self.sock.connect(f"tcp://{address}")
        self.registration = wire.pack({"type": "register", "world": world, **self.me,
                                       **registration_of(model)})
        self.beat = threading.Thread(target=_heartbeats, args=(address, self.me, stop, keys), daemon=True,
                                     name=f"dinb-agent-{rank}-heartbeat")
        self.beat.start()
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.link: Any = None  # the local link to the worker, once connected
        self.registered = False

    def run(self) -> str:
        self.sock.send_multipart(self.registration)
        t0 = told = time.monotonic()
        while not self.stop.is_set():
            events = dict(self.poller.poll(200))
            if self.link is not None and self.link.fileno() in events:
                self._serve_link()
            elif self.sock in events:
                if self._on_message(self.sock.recv_multipart(copy=False)):
                    return "stopped"
            elif not self.registered:
                if time.monotonic() - t0 > self.worker_timeout_s:
                    raise DinbError(
                        f"rank {self.rank}: no distributed worker answered at {self.address} within "
                        f"{self.worker_timeout_s:g} s; start the servable (distributed.start_servable) "
                        "with this distributed_address")
                if time.monotonic() - told > 5:
                    log.warning("rank %d waits for the distributed worker at %s", self.rank, self.address)
                    told = time.monotonic()
        return "interrupted"

    def _on_message(self, frames: list[Any]) -> bool:
        """Act on one message from the worker; True when it says stop."""
        header = wire.header(frames)
        kind = header.get("type")
        if kind == "welcome":
            self.registered = True
            self._drop_link()
            self.link = _link_to(header.get("link"), self.identity)
            if self.link is not None:
                import zmq

                self.poller.register(self.link, zmq.POLLIN)
        elif kind == "register_again":  # the worker restarted under this agent
            self.sock.send_multipart(self.registration)
        elif kind == "refused":
            raise DinbError(f"rank {self.rank}: the distributed worker at {self.address} refused this agent: "
                            f"{header.get('reason')}")
        elif kind in ("gen_step", "infer"):
            self.sock.send_multipart(self.answer(header, frames), copy=False)
        elif kind == "stop":
            self.sock.send_multipart(wire.pack({"type": "bye", **self.me}))
            return True
        return False

    def _serve_link(self) -> None:
        """Answer one request over the local link; a link that breaks leaves ZeroMQ alone."""
        try:
            frames = local_link.receive(self.link)
            if frames is not None:
                local_link.send(self.link, self.answer(wire.header(frames), frames))
        except OSError:  # the worker went away mid-message
            frames = None
        if frames is None:
            self._drop_link()

    def _drop_link(self) -> None:
        if self.link is not None:
            self.poller.unregister(self.link)
            self.link.close()
            self.link = None

    def answer(self, header: dict[str, Any], frames: list[Any]) -> list[Any]:
        """The reply frames to a request (``infer`` or ``gen_step``)."""
        if header.get("type") == "gen_step":
            try:
                result = agent_step(self.model, header)
            except DinbError as e:
                result = {"error": f"{type(e).__name__}: {e}"}
            return wire.pack({"type": "result", "id": header["id"], **self.me, **result})

        def predict(arrays: list[Any], micro_batches: int | None = None) -> list[Any]:
            return [t.get_data_to_numpy() for t in self.model.predict(arrays, micro_batches=micro_batches)]

        return remote_predict.answer(predict, frames, type="result", id=header["id"], **self.me)[0]

    def close(self) -> None:
        self.stop.set()
        self.beat.join(timeout=2)
        if self.link is not None:
            self.link.close()
        self.sock.close(linger=100)


def registration_of(model: Any) -> dict[str, Any]:
    """What the worker learns of this agent's export when it registers."""
    inputs, outputs = model_io(model)
    staged = model.pipeline_info() or (model.generation_info() or {}).get("stages") or {"stages": 1}
    return {"pid": os.getpid(), "host": socket.gethostname(), "inputs": inputs, "outputs": outputs,
            "stages": staged["stages"],
            "generation": generation_info(model), "batch_buckets": model.batch_buckets or None}


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
    sock.setsockopt(zmq.IDENTITY, f"{agent_identity(me['job'], me['rank'])}/heartbeat".encode())
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
