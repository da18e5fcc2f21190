"""The worker <-> agent requests of one host over a Unix socket, without ZeroMQ's threads.

Over ZeroMQ a request wakes six threads in turn: the worker's loop hands it to its I/O thread,
which sends it to the agent's I/O thread, which wakes the agent; the reply goes back the same
way. Where sleeping CPUs are slow to wake (the 2-core VM: 0.29 ms from the worker's send to
the agent holding the request, 0.36 ms back, measured) that is most of the hop. On one host the
worker also listens on an abstract Unix socket (``\\0dinb-worker-<id>``: nothing on disk, gone
with the process, reachable only from the same network namespace); an agent whose ``welcome``
names it connects, proves itself with the one-time token of that welcome, and from then on
the requests and replies go over it: the worker's event loop writes to the socket, the agent's
own thread wakes from ``poll`` on it, and back. Registration, heartbeats and ``stop`` stay on
ZeroMQ, and an agent that cannot connect (another host) keeps using ZeroMQ for everything.

A message is ``<body bytes: u64> <frames: u32>``, then the body: each frame's size (u64), then
the frames, each starting at a multiple of 64 bytes (so the arrays read back are aligned), the
frames being :mod:`dinb.job.wire`'s (a JSON header, then each array's bytes).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from dinb.errors import DinbError
from dinb.job import wire

PREFIX = struct.Struct("<QI")
ALIGN = 64
HELLO_MAX = 64 * 1024  # bytes a connection may send before it has shown its token
CONNECT_TIMEOUT_S = 2.0


def _pad(n: int) -> int:
    return -n % ALIGN


def encode(frames: Sequence[Any]) -> list[Any]:
    """One message's parts (buffers), ready for ``sendmsg`` or a stream's ``writelines``."""
    views = [memoryview(wire.buffer_of(f)).cast("B") for f in frames]
    sizes = struct.pack(f"<{len(views)}Q", *(len(v) for v in views))
    parts: list[Any] = [sizes, bytes(_pad(PREFIX.size + len(sizes)))]
    for v in views:
        parts += [v, bytes(_pad(len(v)))]
    body = sum(len(p) for p in parts)
    return [PREFIX.pack(body, len(views)), *parts]


def decode(body: Any, count: int) -> list[memoryview]:
    """The frames of a message body (views on it)."""
    view = memoryview(body)
    sizes = struct.unpack_from(f"<{count}Q", view, 0)
    offset = 8 * count
    offset += _pad(PREFIX.size + offset)
    frames = []
    for size in sizes:
        if offset + size > len(view):
            raise DinbError("a truncated message on the local link")
        frames.append(view[offset:offset + size])
        offset += size + _pad(size)
    return frames


# ---- the agent's side: a blocking socket ---------------------------------------------------------
def connect(path: str, hello: dict[str, Any]) -> socket.socket:
    """Connect to the worker's link at ``path`` and say who this is (raises ``OSError``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(path)
        send(sock, wire.pack(hello))
        sock.settimeout(None)
    except OSError:
        sock.close()
        raise
    return sock


def send(sock: socket.socket, frames: Sequence[Any]) -> None:
    """Write one message, all of it."""
    parts = encode(frames)
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = memoryview(parts[0])[sent:]


def receive(sock: socket.socket) -> list[memoryview] | None:
    """Read one message; None when the worker closed the link."""
    head = _read_exactly(sock, PREFIX.size)
    if head is None:
        return None
    body_len, count = PREFIX.unpack(head)
    body = _read_exactly(sock, body_len)
    if body is None:
        return None
    return decode(body, count)


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


# ---- the worker's side: an asyncio server ----------------------------------------------------------
class LinkServer:
    """The worker's abstract Unix socket: one stream per agent that proved its token."""

    def __init__(self, on_message: Callable[[str, dict[str, Any], list[memoryview]], None]):
        self.path = f"\0dinb-worker-{uuid.uuid4().hex}"
        self._tokens: dict[str, str] = {}  # agent key -> the token its welcome carried
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._on_message = on_message
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    def invite(self, key: str) -> dict[str, str]:
        """What the agent ``key`` gets in its welcome to connect: the path and a fresh token."""
        token = secrets.token_hex(16)
        self._tokens[key] = token
        old = self._writers.pop(key, None)
        if old is not None:
            old.close()
        return {"path": self.path, "token": token}

    def linked(self, key: str) -> bool:
        return key in self._writers

    def send(self, key: str, frames: Sequence[Any]) -> None:
        self._writers[key].writelines(encode(frames))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = None
        try:
            frames = await _read(reader, HELLO_MAX)
            hello = wire.header(frames) if frames else {}
            key = str(hello.get("key"))
            if not secrets.compare_digest(str(hello.get("token", "")), self._tokens.get(key, "-")):
                return
            del self._tokens[key]
            self._writers[key] = writer
            while True:
                frames = await _read(reader)
                if frames is None:
                    return
                self._on_message(key, wire.header(frames), frames)
        except (OSError, DinbError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            if key is not None and self._writers.get(key) is writer:
                del self._writers[key]  # the agent's requests go over ZeroMQ again

    async def stop(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        if self._server is not None:
            self._server.close()


async def _read(reader: asyncio.StreamReader, limit: int | None = None) -> list[memoryview] | None:
    try:
        head = await reader.readexactly(PREFIX.size)
    except asyncio.IncompleteReadError:
        return None
    body_len, count = PREFIX.unpack(head)
    if limit is not None and body_len > limit:
        raise DinbError(f"a first message of {body_len} bytes on the local link")
    return decode(await reader.readexactly(body_len), count)


