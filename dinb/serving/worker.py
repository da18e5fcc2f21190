"""The Distributed Worker: the agents of one servable register here; it runs the model on them.

It listens on the servable's ``distributed_address`` (a ZeroMQ ROUTER socket; 127.0.0.1 unless
told otherwise). Each agent is one rank of one JAX job, already joined and loaded, and says so::

    agent  -> worker   register   {rank, world, job, pid, inputs, outputs}   then a heartbeat every 0.25 s
    worker -> agent    welcome
    worker -> agents   infer      {id} + the arrays (the same to every rank, as MindSpore's examples do)
    agents -> worker   result     {id, outputs: [{shape, dtype, crc}], compute_ms} (+ rank 0's arrays)
    worker -> agents   gen_step   {id, prefill, decode}: a decoder's step (dinb.serving.generation)
    agents -> worker   result     {id, tokens: {slot: token}, compute_ms}

Agents of this host then carry ``infer``/``gen_step`` and their results over a Unix socket
that the welcome names (:mod:`dinb.serving.local_link`); the rest stays on ZeroMQ.

The servable is ready when ``rank_size`` ranks of one job have registered. An agent that goes
quiet for ``heartbeat_timeout_s`` (1.5 s) is dead: the servable is not ready any more, and every
request in flight or arriving fails at once with :class:`Unavailable` naming the rank, until
the ranks of a new job (agents relaunched) have registered. A heartbeat from an agent the worker
does not know (the worker restarted under running agents) is answered ``register_again``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinb.errors import DinbError
from dinb.job import remote_predict, wire
from dinb.serving.local_link import LinkServer
from dinb.serving.servable_key import ServableKeys, close_worker_context

log = logging.getLogger("dinb.serving")
HEARTBEAT_S = 0.25


def agent_identity(job: Any, rank: Any) -> str:
    """The name an agent goes by on the worker's socket and its local link: ``job/rank``."""
    return f"{job}/{rank}"


class Unavailable(DinbError):
    """The servable cannot run requests now (a rank is dead or missing): HTTP 503, gRPC UNAVAILABLE."""


@dataclass
class Agent:
    rank: int
    world: int
    job: str
    pid: int
    host: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    identity: bytes
    generation: dict[str, Any] | None = None
    batch_buckets: list[int] | None = None
    last_seen: float = field(default_factory=time.monotonic)


class DistributedWorker:
    """Agents of one distributed model; :meth:`run` sends one batch to all of them."""

    def __init__(
        self,
        name: str,
        rank_size: int,
        address: str,
        heartbeat_timeout_s: float = 1.5,
        request_timeout_s: float = 60.0,
        stage_size: int = 1,
        local_link: bool = True,
        keys: ServableKeys | None = None,
    ):
        self.name, self.rank_size, self.address = name, rank_size, address
        self.local_link, self.keys = local_link, keys
        self._ctx: Any = None  # with keys: the worker's own context and its ZAP handler
        self.stage_size = stage_size
        self.roles = remote_predict.Roles(rank_size, rank_size // stage_size)
        self.heartbeat_timeout_s, self.request_timeout_s = heartbeat_timeout_s, request_timeout_s
        self.agents: dict[int, Agent] = {}
        self.job: str | None = None
        self.dead: list[int] = []  # ranks of the current job found dead
        self.compute_ms: dict[int, float] = {}  # each rank's last compute time
        self._pending: dict[int, tuple[asyncio.Future[Any], dict[int, Any]]] = {}
        self._ids = itertools.count(1)
        self._sock: Any = None
        self._link = LinkServer(self._linked_message)
        self._tasks: list[asyncio.Task[Any]] = []
        self._ready_event: asyncio.Event | None = None

    # ---- state ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.job is not None and not self.dead and len(self.agents) == self.rank_size

    def missing(self) -> list[int]:
        return [r for r in range(self.rank_size) if r not in self.agents]

    def model_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The model's inputs and outputs (name, shape, dtype) as rank 0 registered them."""
        if 0 not in self.agents:
            raise Unavailable(f"servable {self.name!r}: rank 0 has not registered yet")
        return self.agents[0].inputs, self.agents[0].outputs

    # ---- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        if self.keys is not None:  # off loopback: CURVE, only agents holding the servable's key
            self._ctx = self.keys.worker_context()
            self._sock = zmq.asyncio.Context.shadow(self._ctx[0].underlying).socket(zmq.ROUTER)
            self.keys.as_worker(self._sock)
        else:
            self._sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a relaunched agent may reuse an identity
        try:
            self._sock.bind(f"tcp://{self.address}")
        except zmq.ZMQError as e:
            self._close()
            raise DinbError(
                f"the distributed worker of {self.name!r} cannot listen on {self.address} ({e}); "
                "is another servable using it? Give another distributed_address"
            ) from None
        self._ready_event = asyncio.Event()
        if self.local_link:
            await self._link.start()
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        """Tell the agents to stop (they exit without being relaunched), then close."""
        for agent in list(self.agents.values()):
            await self._send(agent.identity, {"type": "stop"})
        await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        self._fail_pending(Unavailable(f"servable {self.name!r} is stopping"))
        await self._link.stop()
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            close_worker_context(*self._ctx)
            self._ctx = None

    async def wait_ready(self, timeout_s: float | None, every_s: float = 5.0) -> None:
        """Wait until every rank has registered; ``None`` waits without limit but says every
        ``every_s`` which ranks are still missing."""
        assert self._ready_event is not None
        t0 = time.monotonic()
        while True:
            self._ready_event.clear()  # no await between this and the check: no wake-up is lost
            if self.ready:
                return
            left = every_s if timeout_s is None else min(every_s, timeout_s - (time.monotonic() - t0))
            if left <= 0:
                raise DinbError(
                    f"servable {self.name!r}: rank(s) {self.missing()} of {self.rank_size} did not "
                    f"register at {self.address} within {timeout_s:g} s; start the agents "
                    "(distributed.startup_agents, or mpiexec -n N python -m dinb serve-agent)"
                )
            try:
                await asyncio.wait_for(self._ready_event.wait(), left)
            except TimeoutError:
                if not self.ready:
                    log.warning(
                        "servable %r waits for rank(s) %s of %d at %s (%.0f s so far)",
                        self.name,
                        self.missing(),
                        self.rank_size,
                        self.address,
                        time.monotonic() - t0,
                    )

    # ---- requests ------------------------------------------------------------------------------
    async def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for one batch: the same arrays to every rank of the first stage (all
        ranks without pipeline stages), the outputs of the last stage's first rank back (checked
        against the checksums of the other last-stage ranks)."""
        def message(rank: int, rid: int) -> tuple[dict[str, Any], Sequence[np.ndarray]]:
            header, takes = self.roles.header(rank, type="infer", id=rid)
            return header, arrays if takes else ()

        heads, data, errors = remote_predict.read_replies(await self._call_all(message))
        if errors:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
            raise DinbError(f"servable {self.name!r}: the model failed on rank(s) {sorted(errors)}: {detail}")
        if not remote_predict.agreement(heads, self.roles.output_ranks):
            raise DinbError(f"servable {self.name!r}: the ranks returned different outputs")
        self.compute_ms = {r: float(h.get("compute_ms", 0.0)) for r, h in heads.items()}
        return data[self.roles.data_rank]  # views on that rank's reply frames, which they keep alive

    async def step(self, header: dict[str, Any]) -> dict[int, list[int]]:
        """One generation step on every rank (see :mod:`dinb.serving.generation`): the tokens each
        slot got, checked to be the same on every rank."""
        replies = await self._call_all(lambda rank, rid: ({"type": "gen_step", "id": rid, **header}, ()))
        heads = {r: wire.header(f) for r, f in replies.items()}
        errors = {r: h["error"] for r, h in heads.items() if "error" in h}
        if errors:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
            raise DinbError(
                f"servable {self.name!r}: generation failed on rank(s) {sorted(errors)}: {detail}")
        picked = [heads[r]["tokens"] for r in sorted(heads)]
        if any(p != picked[0] for p in picked):
            raise DinbError(f"servable {self.name!r}: the ranks picked different tokens")
        self.compute_ms = {r: float(h.get("compute_ms", 0.0)) for r, h in heads.items()}
        return {int(s): [int(t) for t in tokens] for s, tokens in picked[0].items()}

    async def _call_all(self, message: Any) -> dict[int, Any]:
        """Send ``message(rank, id) -> (header, arrays)`` to every rank; their reply frames."""
        if not self.ready:
            raise Unavailable(self.why_unavailable())
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, {})
        try:
            for agent in list(self.agents.values()):
                header, arrays = message(agent.rank, rid)
                key = agent.identity.decode()
                if self._link.linked(key):
                    self._link.send(key, wire.pack(header, arrays))
                else:
                    await self._send(agent.identity, header, arrays)
            return dict(await asyncio.wait_for(future, self.request_timeout_s))
        except TimeoutError:
            waiting = [r for r in range(self.rank_size) if r not in self._pending.get(rid, (None, {}))[1]]
            raise Unavailable(
                f"servable {self.name!r}: rank(s) {waiting} did not answer within "
                f"{self.request_timeout_s:g} s"
            ) from None
        finally:
            self._pending.pop(rid, None)

    def why_unavailable(self) -> str:
        if self.dead:
            first, rest = self.dead[0], self.dead[1:]
            ended = f"; rank(s) {rest} ended with it" if rest else ""
            return (
                f"servable {self.name!r}: rank {first} died{ended}; the servable is not ready until the "
                "agents are relaunched"
            )
        return (
            f"servable {self.name!r} is not ready: rank(s) {self.missing()} of {self.rank_size} "
            "have not registered"
        )

    # ---- the agents' messages ------------------------------------------------------------------
    async def _send(self, identity: bytes, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
        await self._sock.send_multipart([identity, *wire.pack(header, arrays)], copy=False)

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            identity = bytes(frames[0].buffer)
            try:
                header = wire.header(frames[1:])
            except DinbError as e:
                log.warning("servable %r: a malformed message from %r: %s", self.name, identity, e)
                continue
            kind = header.get("type")
            if kind == "register":
                await self._register(identity, header)
            elif kind == "heartbeat":
                self._heartbeat(header)
                if self._agent(header) is None:  # this worker restarted under a running agent
                    identity = agent_identity(header.get("job"), header.get("rank"))
                    await self._send(identity.encode(), {"type": "register_again"})
            elif kind == "result":
                self._result(header, frames[1:])
            elif kind == "bye":
                self._gone(header, "stopped")
            elif kind == "rank_died":  # from the agents' launcher, which saw the process exit
                code = "" if header.get("code") is None else f"exit code {header['code']}, "
                self._gone(header, f"died ({code}seen by its launcher)")

    def _linked_message(self, key: str, header: dict[str, Any], frames: list[Any]) -> None:
        """A message over an agent's local link: a result."""
        if header.get("type") == "result" and agent_identity(header.get("job"), header.get("rank")) == key:
            self._result(header, frames)

    def _agent(self, header: dict[str, Any]) -> Agent | None:
        agent = self.agents.get(header.get("rank", -1))
        return agent if agent is not None and agent.job == header.get("job") else None

    async def _register(self, identity: bytes, h: dict[str, Any]) -> None:
        if h.get("stages", 1) != self.stage_size:
            reason = (f"the servable declares stage_size={self.stage_size}, this agent's export has "
                      f"{h.get('stages', 1)} pipeline stage(s); declare stage_size={h.get('stages', 1)} or "
                      f"export with --pipeline-stages {self.stage_size}")
            log.error("servable %r: rank %s refused: %s", self.name, h.get("rank"), reason)
            await self._send(identity, {"type": "refused", "reason": reason})
            return
        if h.get("world") != self.rank_size:
            log.error(
                "servable %r: rank %s registered for a job of %s ranks but the servable declares "
                "rank_size=%d; refused",
                self.name,
                h.get("rank"),
                h.get("world"),
                self.rank_size,
            )
            await self._send(
                identity,
                {
                    "type": "refused",
                    "reason": f"the servable declares rank_size="
                    f"{self.rank_size}, this agent's job has {h.get('world')} ranks",
                },
            )
            return
        if h["job"] != self.job:  # a new job: the agents were (re)launched
            if self.job is not None:
                log.warning(
                    "servable %r: agents of a new job register; the old job's ranks are dropped", self.name
                )
            self.job, self.agents, self.dead = h["job"], {}, []
            self._fail_pending(
                Unavailable(
                    f"servable {self.name!r}: the agents were relaunched while the request ran; send it again"
                )
            )
        self.agents[h["rank"]] = Agent(
            h["rank"], h["world"], h["job"], h["pid"], h.get("host", ""), h["inputs"], h["outputs"], identity,
            h.get("generation"), h.get("batch_buckets"),
        )
        link = self._link.invite(identity.decode()) if self.local_link else None
        await self._send(identity, {"type": "welcome", "link": link})
        if self.ready:
            log.info("servable %r is ready: %d ranks of job %s", self.name, self.rank_size, self.job)
            assert self._ready_event is not None
            self._ready_event.set()

    def _heartbeat(self, h: dict[str, Any]) -> None:
        agent = self._agent(h)
        if agent is not None:
            agent.last_seen = time.monotonic()

    def _result(self, h: dict[str, Any], frames: list[Any]) -> None:
        entry = self._pending.get(h.get("id", -1))
        if entry is None or self._agent(h) is None:
            return
        future, replies = entry
        replies[h["rank"]] = frames
        self._heartbeat(h)
        if len(replies) == self.rank_size and not future.done():
            future.set_result(dict(replies))

    def _gone(self, h: dict[str, Any], how: str) -> None:
        if self._agent(h) is None:
            return
        rank = h["rank"]
        if rank not in self.dead:
            self.dead.append(rank)
            (log.info if how == "stopped" else log.error)(
                "servable %r: rank %d %s; the servable is not ready", self.name, rank, how)
        self._fail_pending(Unavailable(self.why_unavailable()))

    def _fail_pending(self, error: Exception) -> None:
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def _watch(self) -> None:
        """Find agents that went quiet (a killed agent stops its heartbeat); when several did, the
        one silent longest is named first: the others were likely ended because it died."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            quiet = [
                a
                for a in self.agents.values()
                if now - a.last_seen > self.heartbeat_timeout_s and a.rank not in self.dead
            ]
            for agent in sorted(quiet, key=lambda a: a.last_seen):
                self._gone(
                    {"rank": agent.rank, "job": agent.job},
                    f"died (no heartbeat for {now - agent.last_seen:.1f} s)",
                )
