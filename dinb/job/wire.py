"""Arrays between dinb's own processes: one JSON header frame, then each array's raw bytes.

A message is a ZeroMQ multipart ``[header, array 0, array 1, ...]``; the header carries what the
receiver needs (``"arrays": [[shape, dtype], ...]`` plus the caller's own keys), and the arrays
go as their C-order bytes without copies. Used by the notebook cluster's predict path and by the
serving worker and its agents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from dinb.errors import DinbError
from dinb.formats.safetensors import np_dtype


def pack(header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[Any]:
    """The frames of one message."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = dict(header, arrays=[[list(a.shape), str(a.dtype)] for a in arrays])
    return [json.dumps(head).encode(), *arrays]


def unpack(frames: Sequence[Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header and the arrays of one message (views on the frames' buffers, no copies)."""
    try:
        header = json.loads(bytes(buffer_of(frames[0])))
        specs = header.get("arrays", [])
        if len(specs) != len(frames) - 1:
            raise ValueError(f"{len(specs)} arrays announced, {len(frames) - 1} frames sent")
        arrays = [np.frombuffer(buffer_of(f), dtype=np_dtype(d)).reshape(s)
                  for f, (s, d) in zip(frames[1:], specs)]
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise DinbError(f"a malformed message between dinb processes ({e})") from None
    return header, arrays


def header(frames: Sequence[Any]) -> dict[str, Any]:
    """Only the header of a message (its arrays stay where they are)."""
    try:
        head = json.loads(bytes(buffer_of(frames[0])))
    except (ValueError, IndexError) as e:
        raise DinbError(f"a malformed message between dinb processes ({e})") from None
    if not isinstance(head, dict):
        raise DinbError("a malformed message between dinb processes (its header is not an object)")
    return head


def buffer_of(frame: Any) -> Any:
    """The bytes of a frame: a ZeroMQ frame's buffer, or the object itself."""
    return frame.buffer if hasattr(frame, "buffer") else frame
