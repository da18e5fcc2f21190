"""One predict sent to every rank over its own socket, and the answers read back.

Both the notebook cluster (client to engines) and the serving worker (worker to agents) send
the same inputs to the ranks at once and need one copy of the outputs back. As MindSpore Lite's example says,
the first stage's ranks all receive the input, other stages receive no data, and the last
stage's ranks all return the same data (:class:`Roles`; without pipeline stages every rank is
in the first and the last stage). Only the rank asked for data sends its outputs; every rank
with outputs sends each one's shape, dtype and CRC-32, enough to check that the last stage's
ranks all hold the same result without moving it (:func:`read_replies`, :func:`agreement`).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinb.job import wire


@dataclass(frozen=True)
class Roles:
    """Which of ``world`` ranks take inputs and which give outputs, for stages of ``stage_ranks``."""

    world: int
    stage_ranks: int

    @classmethod
    def of(cls, world: int, pipeline: dict[str, Any] | None) -> Roles:
        """From a model's ``pipeline_info()`` (None: one stage)."""
        return cls(world, int(pipeline["stage_ranks"]) if pipeline else world)

    @property
    def input_ranks(self) -> range:
        return range(self.stage_ranks)

    @property
    def output_ranks(self) -> range:
        return range(self.world - self.stage_ranks, self.world)

    @property
    def data_rank(self) -> int:
        """The rank whose outputs are sent back: the first of the last stage."""
        return self.world - self.stage_ranks

    def header(self, rank: int, **fields: Any) -> tuple[dict[str, Any], bool]:
        """The request header for ``rank`` and whether it gets the inputs."""
        return {"want_data": rank == self.data_rank, **fields}, rank in self.input_ranks


def answer(predict: Callable[..., list[np.ndarray]], frames: Sequence[Any],
           **extra: Any) -> tuple[list[Any], list[np.ndarray] | None]:
    """The rank side: run ``predict`` on the message's arrays (and its ``micro_batches`` when the
    header gives one); returns the reply frames and the outputs (None after an error, which goes
    back in the reply with its type and message)."""
    try:
        start = time.perf_counter()
        header, arrays = wire.unpack(frames)
        t0 = time.perf_counter()
        micro = header.get("micro_batches")
        outs = predict(arrays) if micro is None else predict(arrays, micro_batches=micro)
        ms = (time.perf_counter() - t0) * 1e3
        meta = [{"shape": list(o.shape), "dtype": str(o.dtype), "crc": crc(o)} for o in outs]
        send = outs if header.get("want_data") else []
        answer_ms = (time.perf_counter() - start) * 1e3
        return wire.pack({"outputs": meta, "compute_ms": ms, "answer_ms": answer_ms, **extra}, send), outs
    except Exception as e:  # the error goes back to the sender with this rank's name
        return wire.pack({"error": f"{type(e).__name__}: {e}", **extra}), None


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def read_replies(replies: dict[int, Sequence[Any]]) -> tuple[
        dict[int, dict[str, Any]], dict[int, list[np.ndarray]], dict[int, str]]:
    """Each rank's reply header and arrays, and each failed rank's error message."""
    heads, data, errors = {}, {}, {}
    for rank, frames in replies.items():
        head, arrays = wire.unpack(frames)
        heads[rank], data[rank] = head, arrays
        if "error" in head:
            errors[rank] = head["error"]
    return heads, data, errors


def agreement(heads: dict[int, dict[str, Any]], ranks: Sequence[int] | None = None) -> bool:
    """Whether the outputs of ``ranks`` (default: all) have the same shapes, dtypes and checksums."""
    chosen = [heads[r] for r in ranks] if ranks is not None else list(heads.values())
    sums = [[(tuple(m["shape"]), m["dtype"], m["crc"]) for m in h["outputs"]] for h in chosen]
    return all(s == sums[0] for s in sums)
