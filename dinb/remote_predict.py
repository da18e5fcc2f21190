"""One predict sent to every rank over its own socket, and the answers read back.

Both the notebook cluster (client to engines) and the serving worker (worker to agents) send
the same inputs to every rank at once (as the seeds do: the first stage's ranks all receive the
input) and need one copy of the outputs back. Only the ranks asked for data send their outputs;
every rank sends each output's shape, dtype and CRC-32, enough to check that the last stage's
ranks all hold the same result without moving it (:func:`read_replies`).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dinb import wire


def answer(predict: Callable[[list[np.ndarray]], list[np.ndarray]], frames: Sequence[Any],
           **extra: Any) -> tuple[list[Any], list[np.ndarray] | None]:
    """The rank side: run ``predict`` on the message's arrays; returns the reply frames and the
    outputs (None after an error, which goes back in the reply with its type and message)."""
    try:
        start = time.perf_counter()
        header, arrays = wire.unpack(frames)
        t0 = time.perf_counter()
        outs = predict(arrays)
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


def agreement(heads: dict[int, dict[str, Any]]) -> bool:
    """Whether every rank's outputs have the same shapes, dtypes and checksums."""
    sums = [[(tuple(m["shape"]), m["dtype"], m["crc"]) for m in h["outputs"]] for h in heads.values()]
    return all(s == sums[0] for s in sums)
