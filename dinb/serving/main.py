"""Main, the serving process: one asyncio loop in its own thread runs everything.

The loop (a non-daemon thread, so a server script may return from its ``start()`` as MindSpore
Serving's do, and the process keeps serving) holds each servable's Distributed Worker and
batcher, the REST server (aiohttp) and the gRPC server (grpc.aio). ``stop()`` (``server.stop()``,
or SIGTERM) refuses new requests, lets the ones in flight finish (``drain_s``), tells the agents
to stop, and ends the loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Coroutine
from typing import Any

from dinb.errors import DinbError
from dinb.serving import protocol
from dinb.serving.inference import Servable
from dinb.serving.metrics import Metrics
from dinb.serving.register import ServableSpec
from dinb.serving.worker import DistributedWorker, Unavailable

log = logging.getLogger("dinb.serving")


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed (it answers each request faster), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def split_address(address: str, what: str) -> tuple[str, int]:
    host, sep, port = str(address).rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise DinbError(f"{what} {address!r} must be 'host:port', e.g. '127.0.0.1:5500'")
    return host, int(port)


class Main:
    """The serving process's state (one per process: :meth:`get`)."""

    _instance: Main | None = None

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.servables: dict[str, Servable] = {}
        self.metrics = Metrics()
        self.inflight = 0
        self.stopping = False
        self.rest: Any = None
        self.grpc: Any = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dinb-serving", daemon=False)
        self.thread.start()
        self._started.wait()

    @classmethod
    def get(cls) -> Main:
        if cls._instance is None or not cls._instance.thread.is_alive():
            cls._instance = Main()
        return cls._instance

    @classmethod
    def current(cls) -> Main | None:
        return cls._instance if cls._instance is not None and cls._instance.thread.is_alive() else None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = None) -> Any:
        """Run ``coro`` on the serving loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    # ---- servables -----------------------------------------------------------------------------
    def add_servable(
        self,
        spec: ServableSpec,
        address: str,
        version: int,
        wait_s: float | None,
        batch_delay_ms: float,
        max_queue: int,
        heartbeat_timeout_s: float,
        request_timeout_s: float,
        local_link: bool = True,
        keys: Any = None,
    ) -> Servable:
        if spec.name in self.servables:
            raise DinbError(f"servable {spec.name!r} is already served by this process")
        assert spec.model is not None
        split_address(address, "distributed_address")
        worker = DistributedWorker(
            spec.name, spec.model.rank_size, address, heartbeat_timeout_s, request_timeout_s,
            stage_size=spec.model.stage_size, local_link=local_link, keys=keys,
        )

        async def start() -> Servable:
            await worker.start()
            servable = Servable(spec, worker, version, batch_delay_ms, max_queue, self.metrics)
            servable.batcher.start()
            return servable

        servable = self.call(start(), 30)
        self.servables[spec.name] = servable
        try:
            self.call(worker.wait_ready(wait_s))
        except DinbError:
            self.call(self._drop(spec.name), 30)
            raise
        return servable

    async def _drop(self, name: str) -> None:
        servable = self.servables.pop(name)
        servable.batcher.stop()
        if servable.scheduler is not None:
            servable.scheduler.stop()
        await servable.worker.stop()

    # ---- requests (the REST and gRPC handlers go through here) ---------------------------------
    def resolve(self, model: str, version: str = "") -> tuple[Servable, str]:
        """The servable and method a request names. While stopping, every request is refused
        as unavailable (503 / UNAVAILABLE), also once the servables are gone: not 404."""
        if self.stopping:
            raise Unavailable("the server is stopping")
        return protocol.resolve(self.servables, model, version)

    async def infer(
        self, servable: Servable, method: str, inputs: dict[str, Any], protocol: str, model: str
    ) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        error: BaseException | None = None
        self.inflight += 1
        try:
            if self.stopping:
                raise Unavailable("the server is stopping")
            return await servable.infer(method, inputs)
        except BaseException as e:
            error = e
            raise
        finally:
            self.inflight -= 1
            from dinb.serving.metrics import status_of

            self.metrics.request(model, protocol, status_of(error), time.perf_counter() - t0)

    def count(self, model: str, protocol: str, error: BaseException) -> None:
        """A request refused before it reached a servable (malformed, unknown model). Names not
        served are counted as ``_unknown``, so requests cannot grow the metrics without bound."""
        from dinb.serving.inference import NotFound
        from dinb.serving.metrics import status_of

        label = "_unknown" if isinstance(error, NotFound) else model
        self.metrics.request(label, protocol, status_of(error), 0.0)

    @property
    def ready(self) -> bool:
        return bool(self.servables) and all(s.ready for s in self.servables.values()) and not self.stopping

    # ---- stopping ------------------------------------------------------------------------------
    def stop(self, drain_s: float = 30.0) -> None:
        """Refuse new requests, finish the ones in flight (at most ``drain_s``), stop the agents,
        the servers and the loop."""
        if not self.thread.is_alive():
            return
        self.stopping = True
        deadline = time.monotonic() + drain_s
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.inflight:
            log.warning("stopping with %d request(s) still in flight after %.0f s", self.inflight, drain_s)
        try:
            self.call(self._shutdown(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            if Main._instance is self:
                Main._instance = None

    async def _shutdown(self) -> None:
        for name in list(self.servables):
            await self._drop(name)
        if self.grpc is not None:
            await self.grpc.stop(grace=1)
        if self.rest is not None:
            await self.rest.cleanup()


def stop_on_sigterm() -> None:
    """In the main thread: SIGTERM (and Ctrl-C) stop the server cleanly (drain, stop agents)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        main = Main.current()
        if main is not None:
            log.warning("signal %d: draining and stopping the server", signum)
            main.stop()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
