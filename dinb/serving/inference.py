"""A servable at run time: its methods replayed on requests, its model's batches, its metadata.

**Batching.** With ``with_batch_dim=True`` the model's first axis is the batch: requests queue
up, and the dispatcher merges consecutive ones along that axis up to the export's batch size
``B`` (the program's shapes are fixed at export): those that waited while the ranks ran the
previous batch, and, with ``batch_delay_ms > 0``, those arriving that long after the first.
The merged batch is padded with zeros to the smallest of the export's batch buckets that holds
it (``B`` for an export without buckets; see :mod:`dinb.sharding.batch_buckets`), run once on all ranks,
and each request gets its rows back. A request that finds the queue empty and the ranks idle
runs at once from its own task, at its own bucket, without the dispatcher's hand-offs. A
request of more than ``B`` rows runs as several batches. Inputs listed in
``without_batch_dim_inputs`` have no batch axis: they are passed whole, and only requests with
equal values there are merged. With ``with_batch_dim=False`` every request is one run of the
model, whole. One batch runs at a time (every rank runs it); the queue holds at most
``max_queue`` requests, beyond which a request gets :class:`Unavailable`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinb.errors import DinbError, InputError
from dinb.formats.safetensors import np_dtype
from dinb.serving.generation import GenerationScheduler
from dinb.serving.register import DistributedModel, Method, ServableSpec
from dinb.serving.worker import DistributedWorker, Unavailable
from dinb.sharding import batch_buckets


class RequestError(InputError):
    """The request is wrong (an input missing, extra, of the wrong shape or type): HTTP 400."""


class NotFound(DinbError):
    """No such servable, method or version: HTTP 404, gRPC NOT_FOUND."""


@dataclass
class _Pending:
    arrays: list[np.ndarray]
    rows: int
    future: asyncio.Future[Any]
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """The model's queue and its dispatcher (see the module docstring)."""

    def __init__(
        self,
        worker: DistributedWorker,
        model: DistributedModel,
        batch_delay_ms: float = 0.0,
        max_queue: int = 1024,
        metrics: Any = None,
        name: str = "",
    ):
        self.worker, self.model, self.name = worker, model, name
        self.delay_s, self.max_queue, self.metrics = batch_delay_ms / 1e3, max_queue, metrics
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self._one_at_a_time = asyncio.Lock()  # every rank runs one batch at a time, in order
        self._direct = 0  # requests waiting for the model without batching

    @property
    def max_batch(self) -> int:
        inputs, _ = self.worker.model_io()
        batched = [i for i in range(len(inputs)) if i not in self.model.without_batch_dim_inputs]
        return int(inputs[batched[0]]["shape"][0]) if batched else 1

    @property
    def buckets(self) -> list[int]:
        """The batch sizes the ranks have programs for (just the export's batch without buckets)."""
        agent = self.worker.agents.get(0)
        return list(agent.batch_buckets if agent is not None and agent.batch_buckets else [self.max_batch])

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for item in self._waiting:
            if not item.future.done():
                item.future.set_exception(Unavailable(f"servable {self.name!r} is stopping"))
        self._waiting.clear()

    async def call(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """The model's outputs for one request's model inputs (any number of rows), and the time
        the ranks computed on them (the slowest rank's ``Model.predict``, in ms)."""
        if not self.worker.ready:
            raise Unavailable(self.worker.why_unavailable())
        if not self.model.with_batch_dim:  # no merging: run in this request's own task, in turn
            if self._direct >= self.max_queue:
                raise Unavailable(
                    f"servable {self.name!r}: the queue is full ({self.max_queue} requests); retry later"
                )
            self._direct += 1
            queued = time.perf_counter()
            try:
                async with self._one_at_a_time:
                    start = time.perf_counter()
                    outs = await self.worker.run(arrays)
                    compute = max(self.worker.compute_ms.values(), default=0.0)
            finally:
                self._direct -= 1
            if self.metrics is not None:
                self.metrics.batch(self.name, [start - queued], 1, self.worker.compute_ms)
            return outs, compute
        b = self.max_batch
        rows = self._rows(arrays)
        if rows <= b and not self._waiting and not self._one_at_a_time.locked():
            item = _Pending(arrays, rows, asyncio.get_running_loop().create_future())
            await self._run([item])  # nobody to merge with: no hand-off to the dispatcher
            return await item.future
        if rows <= b:
            return await self._enqueue(arrays, rows)
        parts = [
            await self._enqueue(
                [
                    a[s : s + b] if i not in self.model.without_batch_dim_inputs else a
                    for i, a in enumerate(arrays)
                ],
                min(b, rows - s),
            )
            for s in range(0, rows, b)
        ]
        return (
            [np.concatenate([p[0][k] for p in parts]) for k in range(len(parts[0][0]))],
            sum(p[1] for p in parts),
        )

    def _rows(self, arrays: list[np.ndarray]) -> int:
        return next(
            int(a.shape[0]) for i, a in enumerate(arrays) if i not in self.model.without_batch_dim_inputs
        )

    async def _enqueue(self, arrays: list[np.ndarray], rows: int) -> tuple[list[np.ndarray], float]:
        if len(self._waiting) >= self.max_queue:
            raise Unavailable(
                f"servable {self.name!r}: the queue is full ({self.max_queue} requests); retry later"
            )
        item = _Pending(arrays, rows, asyncio.get_running_loop().create_future())
        self._waiting.append(item)
        self._arrived.set()
        return await item.future

    async def _dispatch(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            await self._run(batch)

    async def _gather(self) -> list[_Pending]:
        """The requests of the next run: the first in line, and (batching) those that fit with it."""
        first = self._waiting.popleft()
        batch, rows, cap = [first], first.rows, self.max_batch
        deadline = first.queued + self.delay_s
        while rows < cap:
            if not self._waiting:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
                continue
            nxt = self._waiting[0]
            if rows + nxt.rows > cap or not self._compatible(first, nxt):
                break
            batch.append(self._waiting.popleft())
            rows += nxt.rows
        return batch

    def _compatible(self, a: _Pending, b: _Pending) -> bool:
        return all(np.array_equal(a.arrays[i], b.arrays[i]) for i in self.model.without_batch_dim_inputs)

    async def _run(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            arrays, bucket = self._merge(batch)
            async with self._one_at_a_time:
                outs = await self.worker.run(arrays)
                compute = max(self.worker.compute_ms.values(), default=0.0)
        except Exception as e:  # every request of the batch gets the error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        if self.metrics is not None:
            self.metrics.batch(
                self.name,
                [start - i.queued for i in batch],
                sum(i.rows for i in batch) or 1,
                self.worker.compute_ms,
                bucket,
            )
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(([o[offset : offset + item.rows] for o in outs], compute))
            offset += item.rows

    def _merge(self, batch: list[_Pending]) -> tuple[list[np.ndarray], int]:
        """The batch's inputs, padded to the smallest batch bucket that holds them; that bucket."""
        cap = batch_buckets.smallest(self.buckets, sum(item.rows for item in batch))
        merged = []
        for i in range(len(batch[0].arrays)):
            if i in self.model.without_batch_dim_inputs:
                merged.append(batch[0].arrays[i])
                continue
            parts = [item.arrays[i] for item in batch]
            rows = sum(p.shape[0] for p in parts)
            if rows < cap:
                parts.append(np.zeros((cap - rows, *parts[0].shape[1:]), parts[0].dtype))
            merged.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
        return merged, cap


class Servable:
    """One servable in the serving process: its methods, worker and batcher."""

    def __init__(
        self,
        spec: ServableSpec,
        worker: DistributedWorker,
        version: int = 1,
        batch_delay_ms: float = 0.0,
        max_queue: int = 1024,
        metrics: Any = None,
    ):
        assert spec.model is not None
        self.spec, self.worker, self.version = spec, worker, version
        self.batcher = Batcher(worker, spec.model, batch_delay_ms, max_queue, metrics, spec.name)
        self.scheduler: GenerationScheduler | None = None  # a decoder's, made once its agents register
        self._codec: Any = None

    def generation(self) -> tuple[GenerationScheduler, Any]:
        """A decoder's scheduler and its tokenizer (:class:`dinb.models.text.TokenCodec`)."""
        agent = self.worker.agents.get(0)
        if agent is None:
            raise Unavailable(self.worker.why_unavailable())
        if agent.generation is None:
            raise RequestError(f"model {self.name!r} does not generate; send it /infer requests")
        if self.scheduler is None:
            from dinb.models.text import token_codec

            info = agent.generation
            self.scheduler = GenerationScheduler(self.worker, info, max_waiting=self.batcher.max_queue,
                                                 metrics=self.batcher.metrics, servable=self.spec.name)
            self._codec = token_codec(info.get("model_dir"), {"eos_token_id": info.get("eos_token_id")})
        return self.scheduler, self._codec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ready(self) -> bool:
        return self.worker.ready

    def method(self, name: str) -> Method:
        try:
            return self.spec.methods[name]
        except KeyError:
            raise NotFound(
                f"servable {self.name!r} has no method {name!r}; it has {sorted(self.spec.methods)}"
            ) from None

    # ---- requests ------------------------------------------------------------------------------
    async def infer(
        self, method_name: str, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float]:
        """Run a method on one request's named arrays (checked first): its named outputs, and the
        ms its ranks spent in ``Model.predict`` (the floor a request cannot go under)."""
        method = self.method(method_name)
        compute = 0.0
        self.check_inputs(method, inputs)
        values: dict[int, Any] = {i: inputs[n] for i, n in enumerate(method.input_names)}
        for stage in method.stages:
            args = [values[a] for a in stage.args]
            if isinstance(stage.target, DistributedModel):
                outs, compute = await self.batcher.call([np.ascontiguousarray(a) for a in args])
            else:
                result = stage.target(*args)
                outs = list(result) if isinstance(result, tuple) else [result]
            if len(outs) != len(stage.outputs):
                raise DinbError(
                    f"a stage of method {method.name!r} returned {len(outs)} values, "
                    f"outputs_count is {len(stage.outputs)}"
                )
            values.update((i, np.asarray(o)) for i, o in zip(stage.outputs, outs))
        return {n: values[i] for n, i in zip(method.output_names, method.results)}, compute

    def check_inputs(self, method: Method, inputs: dict[str, np.ndarray]) -> None:
        """Every input named, none extra; the ones that go into the model of its dtype and shape."""
        missing = [n for n in method.input_names if n not in inputs]
        extra = [n for n in inputs if n not in method.input_names]
        if missing or extra:
            raise RequestError(
                f"method {self.name}.{method.name} takes inputs {list(method.input_names)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; not inputs of it: {extra}" if extra else "")
            )
        model_inputs, _ = self.worker.model_io()
        assert self.spec.model is not None
        for name, index in method.direct_inputs().items():
            want, got = model_inputs[index], inputs[name]
            if got.dtype != np_dtype(want["dtype"]):
                raise RequestError(f"input {name!r} must be {want['dtype']}, got {got.dtype}")
            shape = list(want["shape"])
            batched = self.spec.model.with_batch_dim and index not in self.spec.model.without_batch_dim_inputs
            if batched and (got.ndim != len(shape) or list(got.shape[1:]) != shape[1:] or got.shape[0] < 1):
                raise RequestError(
                    f"input {name!r} must have shape [n, {', '.join(map(str, shape[1:]))}] "
                    f"(n >= 1 rows), got {list(got.shape)}"
                )
            if not batched and list(got.shape) != shape:
                raise RequestError(f"input {name!r} must have shape {shape}, got {list(got.shape)}")

    # ---- metadata ------------------------------------------------------------------------------
    def io(self, method: Method) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Each input's and output's name, dtype and shape (-1: the batch axis, or unknown)."""
        model_inputs, model_outputs = self.worker.model_io()
        assert self.spec.model is not None
        stage = method.model_stage()
        direct = method.direct_inputs()
        outputs_of_model = {v: k for k, v in enumerate(stage.outputs)} if stage else {}

        def shaped(meta: dict[str, Any], batched: bool) -> list[int]:
            shape = list(meta["shape"])
            return [-1, *shape[1:]] if batched and shape else shape

        ins = []
        for name in method.input_names:
            if name in direct:
                i = direct[name]
                meta = model_inputs[i]
                batched = self.spec.model.with_batch_dim and i not in self.spec.model.without_batch_dim_inputs
                ins.append({"name": name, "dtype": meta["dtype"], "shape": shaped(meta, batched)})
            else:
                ins.append({"name": name, "dtype": "float32", "shape": [-1]})
        outs = []
        for name, v in zip(method.output_names, method.results):
            if v in outputs_of_model:
                meta = model_outputs[outputs_of_model[v]]
                outs.append(
                    {
                        "name": name,
                        "dtype": meta["dtype"],
                        "shape": shaped(meta, self.spec.model.with_batch_dim),
                    }
                )
            else:
                outs.append({"name": name, "dtype": "float32", "shape": [-1]})
        return ins, outs
