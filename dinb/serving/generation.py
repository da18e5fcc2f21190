"""Generation in the server: continuous batching of sequences over the agents' slots.

A decoder's export has ``S`` sequence *slots*, one row each of the KV cache the agents keep on
their devices (see :mod:`dinb.runtime.runners.decoder`). The :class:`GenerationScheduler` in the
serving process runs one *step* at a time on every agent, the same message to each::

    worker -> agents   gen_step  {prefill: [{slot, ids, sampling, max_tokens, stop_ids}], active}
    agents -> worker   result    {tokens: {slot: [token, ...]}, compute_ms}

A step first prefills the requests that joined (all in one call where the export's prefill
shapes allow; each into a free slot, its first token picked on the devices), then runs one call
of the decode program: ``k`` decode steps of every slot still generating (``active``, and the
joiners), the tokens picked on the devices. This is iteration-level scheduling (Orca's, vLLM's)
at the granularity of a call: a new request joins at the next call instead of waiting for the
batch to end, and a finished one (its end token, its ``max_tokens``, or its client gone) leaves
its slot free for the next. ``k`` trades the first token's wait against throughput: a joiner
waits at most one call of ``k`` steps, and every call's round trip to the agents is paid once
per ``k`` tokens. When every slot is busy, up to ``max_waiting`` requests wait in
order; one more gets :class:`Unavailable` (HTTP 503) at once. Every rank picks the same tokens
(the logits are whole on each, the generators seeded alike), and the scheduler checks it.

With a paged KV cache (an export with ``--cache-blocks``) the scheduler also holds the pool's
blocks (:class:`~dinb.runtime.block_pool.BlockPool`, one for the job), taken as the tokens come:
before each step every sequence in flight gets the blocks its decode call reaches (the grown
tables go in the step message, ``tables: [[slot, table], ...]``), and when the pool runs out the
newest sequence is *preempted*: it leaves its slot and blocks and waits at the front of the
queue. A request joins when a slot is free *and* the pool has the blocks of its prompt and
first call (``{..., table, start}`` in its join, ``start`` the prompt positions its shared
prefix blocks hold already); a preempted one rejoins with its prompt and all but its last token
as ``ids`` and ``resume: [last token, tokens picked]``, so it goes on with the same tokens (its
stream sees no repeat and no gap). A request that the empty pool could not hold gets 400 with
the sizes.

A rank that dies fails every request in flight with the worker's 503 naming it, as infer does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dinb.errors import DinbError, InputError
from dinb.models.sampling import SamplingParams
from dinb.runtime.block_pool import BlockPool
from dinb.serving.worker import DistributedWorker, Unavailable

log = logging.getLogger("dinb.serving")
PARAMETERS = ("max_tokens", "temperature", "top_k", "top_p", "seed")


@dataclass
class GenRequest:
    """One sequence being generated; its tokens arrive on ``tokens`` (then None, or an error)."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    tokens: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    slot: int | None = None
    produced: int = 0
    made: list[int] = field(default_factory=list)  # the tokens so far (what a preempted one resumes from)
    joined: int = 0  # the step it last joined at: the newest in flight is preempted first
    finish_reason: str | None = None
    cancelled: bool = False


class GenerationScheduler:
    """The slots of one decoder servable and the step loop that fills them."""

    def __init__(self, worker: DistributedWorker, info: dict[str, Any], max_waiting: int = 64,
                 metrics: Any = None, servable: str = ""):
        self.worker, self.metrics, self.servable = worker, metrics, servable
        paged = info.get("paged")
        self.pool = BlockPool(int(paged["blocks"]), int(paged["block_size"])) if paged else None
        self.slots, self.max_len = int(info["slots"]), int(info["max_len"])
        self.buckets, self.vocab = list(info["buckets"]), int(info["vocab"])
        self.call_steps = max(int(k) for k in info.get("decode_steps") or [1])  # the most a call runs
        self.stop_ids = frozenset(int(t) for t in info.get("eos_token_id") or ())
        self.defaults = dict(info.get("defaults") or {})  # generation_config.json's sampling
        self.max_waiting = max_waiting
        self.free = list(range(self.slots))
        self.active: dict[int, GenRequest] = {}
        self.waiting: deque[GenRequest] = deque()
        self.steps = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None

    def submit(self, ids: list[int], parameters: dict[str, Any]) -> GenRequest:
        """Check and queue one request (400 for a bad one, 503 when nothing is free)."""
        unknown = sorted(set(parameters) - set(PARAMETERS) - {"stream"})
        if unknown:
            raise InputError(f"unknown parameters {unknown}; this server takes {list(PARAMETERS)}")
        max_tokens = parameters.get("max_tokens", 16)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens={max_tokens!r}: give a whole number >= 1")
        given = {k: parameters[k] for k in PARAMETERS[1:] if k in parameters}
        try:
            sampling = SamplingParams(**{**self.defaults, **given})
        except TypeError as e:
            raise InputError(f"parameters: {e}") from None
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab
                              for t in ids):
            raise InputError(f"the prompt must be 1 or more token ids in 0 .. {self.vocab - 1}")
        if len(ids) > self.buckets[-1]:
            raise InputError(f"a prompt of {len(ids)} tokens is longer than the model's largest bucket "
                             f"({self.buckets[-1]} tokens); shorten it")
        if len(ids) + max_tokens - 1 > self.max_len:
            raise InputError(f"a prompt of {len(ids)} tokens and max_tokens {max_tokens} need "
                             f"{len(ids) + max_tokens - 1} cache positions; the model has {self.max_len}: "
                             f"ask for at most {self.max_len - len(ids) + 1} tokens")
        if self.pool is not None:
            self.pool.check_fits(len(ids) + max_tokens - 1, f"a prompt of {len(ids)} tokens and max_tokens "
                                 f"{max_tokens}")
        if not self.worker.ready:
            raise Unavailable(self.worker.why_unavailable())
        if not self.free and len(self.waiting) >= self.max_waiting:
            raise Unavailable(f"all {self.slots} sequence slots are busy and {len(self.waiting)} requests "
                              "wait; try again shortly")
        req = GenRequest(list(ids), max_tokens, sampling, self.stop_ids)
        self.waiting.append(req)
        self._start()
        self._wake.set()
        return req

    def cancel(self, req: GenRequest) -> None:
        """The client went away: the request leaves its slot (or the queue) at the next step."""
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
        self._wake.set()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._fail_all(Unavailable("the servable is stopping"))

    # ---- the step loop -------------------------------------------------------------------------
    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            if not self.active and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except DinbError as e:
                self._fail_all(e if isinstance(e, Unavailable) else Unavailable(str(e)))
            except Exception as e:  # never leave a stream hanging
                log.exception("generation step failed")
                self._fail_all(Unavailable(f"generation failed: {type(e).__name__}: {e}"))

    async def _step(self) -> None:
        for slot, req in list(self.active.items()):
            if req.cancelled:
                self._finish(slot, "cancelled")
        tables = self._grow()
        joining, places = self._admit()
        decoding = sorted(self.active)
        for req in joining:
            self.active[req.slot] = req
        if not self.active:
            return
        header = {"prefill": [{"slot": r.slot, "ids": place.pop("ids"), "sampling": r.sampling.__dict__,
                               "max_tokens": r.max_tokens - max(r.produced, 1) + 1,
                               "stop_ids": sorted(r.stop_ids), **place} for r, place in zip(joining, places)],
                  "active": decoding, "tables": tables}
        picked = await self.worker.step(header)
        self.steps += 1
        if self.pool is not None:
            for req in joining:
                self.pool.prefilled(req.slot)
        for slot, tokens in picked.items():
            req = self.active.get(slot)
            for token in tokens:
                if req is None or req.finish_reason is not None:
                    break
                self._emit(req, token)
        if self.pool is not None and self.metrics is not None:
            self.metrics.kv_cache(self.servable, self.pool.stats(), len(self.waiting))

    def _reach(self, req: GenRequest, text: int) -> int:
        """Positions a sequence holds after its next call: ``text`` written, and up to a call's
        steps more (its next token goes at ``text``)."""
        return text + min(self.call_steps, req.max_tokens - max(req.produced, 1))

    def _grow(self) -> list[list[Any]]:
        """A paged cache: every active sequence's blocks for its next call, the newest preempted
        while the pool is short (back to the queue's front); the grown tables, ``[slot, table]``."""
        if self.pool is None or not self.active:
            return []
        order = sorted(self.active, key=lambda slot: (self.active[slot].joined, slot))
        before = {slot: len(self.pool.seqs[slot].table) for slot in order}
        needs = [(slot, self._reach(req, len(req.ids) + req.produced - 1))
                 for slot, req in ((slot, self.active[slot]) for slot in order)]
        for slot in self.pool.make_room(needs):  # newest first: the oldest ends up at the front
            req = self.active.pop(slot)
            req.slot = None
            self.free.append(slot)
            self.waiting.appendleft(req)
        self.free.sort()
        return [[slot, list(self.pool.seqs[slot].table)] for slot in sorted(self.active)
                if len(self.pool.seqs[slot].table) != before[slot]]

    def _admit(self) -> tuple[list[GenRequest], list[dict[str, Any]]]:
        """The waiting requests that join at this step (a free slot, and with a paged cache the
        blocks of their prompt and first call), in order; each one's ``ids`` and blocks."""
        joining, places = [], []
        while self.free and self.waiting:
            req = self.waiting[0]
            text = req.ids + req.made[:-1]
            place: dict[str, Any] = {"ids": text}
            if req.made:
                place["resume"] = [req.made[-1], req.produced]
            if self.pool is not None:
                got = self.pool.admit(self.free[0], text, self._reach(req, len(text)))
                if got is None:
                    break  # it waits for blocks, and those behind it wait in their order
                place.update(table=got.table, start=got.cached_tokens)
            self.waiting.popleft()
            req.slot = self.free.pop(0)
            req.joined = self.steps
            joining.append(req)
            places.append(place)
        return joining, places

    def _emit(self, req: GenRequest, token: int) -> None:
        req.produced += 1
        req.made.append(token)
        req.tokens.put_nowait(token)
        if token in req.stop_ids:
            self._finish(req.slot, "stop")
        elif req.produced >= req.max_tokens:
            self._finish(req.slot, "length")

    def _finish(self, slot: int | None, reason: str) -> None:
        req = self.active.pop(slot, None) if slot is not None else None
        if req is None:
            return
        req.finish_reason = reason
        req.tokens.put_nowait(None)
        self.free.append(slot)
        self.free.sort()
        if self.pool is not None:
            self.pool.release(slot)

    def _fail_all(self, error: Exception) -> None:
        for req in [*self.active.values(), *self.waiting]:
            req.tokens.put_nowait(error)
        self.free = list(range(self.slots))
        self.active.clear()
        self.waiting.clear()
        if self.pool is not None:
            for slot in range(self.slots):
                self.pool.release(slot)


async def tokens_of(req: GenRequest) -> Any:
    """The request's tokens as they come (an async iterator); raises the step's error."""
    while True:
        item = await req.tokens.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        yield item


def agent_step(model: Any, header: dict[str, Any]) -> dict[str, Any]:
    """One generation step on an agent (see the module docstring); the tokens of every slot."""
    t0 = time.perf_counter()
    joins = [dict(p, sampling=SamplingParams(**p["sampling"])) for p in header.get("prefill") or ()]
    tokens = model.serve_step(joins, [int(s) for s in header.get("active") or ()],
                              [(int(slot), table) for slot, table in header.get("tables") or ()])
    return {"tokens": {str(slot): picked for slot, picked in tokens.items()},
            "compute_ms": 1000 * (time.perf_counter() - t0)}
