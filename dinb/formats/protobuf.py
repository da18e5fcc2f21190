"""The protobuf wire format, just enough for MindSpore's checkpoint and strategy files.

dinb reads and writes those files without the ``protobuf`` package: a message is a sequence of
fields, each a varint key ``(field_number << 3) | wire_type`` followed by a varint (type 0), a
length-prefixed byte string (type 2), or 8/4 fixed bytes (types 1/5). :func:`fields` walks one
message and yields ``(number, wire_type, value)``, where a length-delimited value is returned as
``(start, end)`` offsets into the buffer rather than a copy, so a multi-GiB checkpoint is walked
through a memory map without reading its tensor bytes.

The bytes come from outside: every offset is checked against the message's end before use, a
field of the wrong wire type is a :class:`WireError` naming the field (:func:`expect`), and text
is decoded strictly (:func:`text`). Readers turn a ``WireError`` into their own typed error
naming the file and record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
WIRE_NAMES = {VARINT: "varint", FIXED64: "fixed64", LEN: "length-delimited", FIXED32: "fixed32"}


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (or not the message expected)."""


def read_varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at ``buf[pos]``; returns ``(value, next position)``."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("message ends inside a varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >= 1 << 64:
                raise WireError("varint larger than 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def fields(buf: Any, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field number, wire type, value)`` for each field of the message in ``buf[start:end]``.

    Varints are returned as ``int``; length-delimited fields as ``(start, end)`` offsets; fixed
    fields as their raw bytes.
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos} (not a protobuf message)")
        if wire == VARINT:
            value, pos = read_varint(buf, pos, end)
        elif wire == LEN:
            n, pos = read_varint(buf, pos, end)
            if n > end - pos:
                raise WireError(f"field {number} claims {n} bytes but the message ends {end - pos} bytes on")
            value, pos = (pos, pos + n), pos + n
        elif wire in (FIXED64, FIXED32):
            n = 8 if wire == FIXED64 else 4
            if n > end - pos:
                raise WireError(f"field {number} is cut short by the end of the message")
            value, pos = bytes(buf[pos : pos + n]), pos + n
        else:
            raise WireError(f"unsupported wire type {wire} for field {number} at byte {pos}")
        yield number, wire, value


def expect(wire: int, want: int, what: str) -> None:
    """Raise :class:`WireError` unless a field has the wire type its schema gives it."""
    if wire != want:
        raise WireError(f"{what} is {WIRE_NAMES.get(wire, wire)}, expected {WIRE_NAMES[want]}")


def text(buf: Any, span: tuple[int, int], what: str) -> str:
    """The UTF-8 string at ``span``; bytes that are not UTF-8 are a :class:`WireError` naming ``what``."""
    raw = bytes(buf[span[0] : span[1]])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"{what} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None


def packed_or_single(buf: Any, wire: int, value: Any, signed: bool = False) -> list[int]:
    """The integers of a repeated int field entry, whether written packed (LEN) or one by one."""
    if wire == VARINT:
        values = [value]
    elif wire == LEN:
        values, pos = [], value[0]
        while pos < value[1]:
            v, pos = read_varint(buf, pos, value[1])
            values.append(v)
    else:
        raise WireError(f"expected an integer field, got wire type {WIRE_NAMES.get(wire, wire)}")
    return [_signed(v) for v in values] if signed else values


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# ---- writing -------------------------------------------------------------------------------
def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def len_field(number: int, payload: bytes) -> bytes:
    return key(number, LEN) + varint(len(payload)) + payload


def int_field(number: int, value: int) -> bytes:
    return key(number, VARINT) + varint(value)
