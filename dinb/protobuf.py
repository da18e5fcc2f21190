"""The protobuf wire format, just enough for MindSpore's checkpoint and strategy files.

dinb reads and writes those files without the ``protobuf`` package: a message is a sequence of
fields, each a varint key ``(field_number << 3) | wire_type`` followed by a varint (type 0), a
length-prefixed byte string (type 2), or 8/4 fixed bytes (types 1/5). :func:`fields` walks one
message and yields ``(number, wire_type, value)``, where a length-delimited value is returned as
``(start, end)`` offsets into the buffer rather than a copy, so a multi-GiB checkpoint is walked
through a memory map without reading its tensor bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


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
            return result, pos
        shift += 7
        if shift > 70:
            raise WireError("varint longer than 10 bytes")


def fields(buf: Any, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field number, wire type, value)`` for each field of the message in ``buf[start:end]``.

    Varints are returned as ``int``; length-delimited fields as ``(start, end)`` offsets.
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = read_varint(buf, pos, end)
        elif wire == LEN:
            n, pos = read_varint(buf, pos, end)
            if pos + n > end:
                raise WireError(f"field {number} claims {n} bytes but the message ends {end - pos} bytes on")
            value, pos = (pos, pos + n), pos + n
        elif wire == FIXED64:
            value, pos = bytes(buf[pos : pos + 8]), pos + 8
        elif wire == FIXED32:
            value, pos = bytes(buf[pos : pos + 4]), pos + 4
        else:
            raise WireError(f"unsupported wire type {wire} for field {number} at byte {pos}")
        yield number, wire, value
    if pos != end:
        raise WireError("message ends inside a field")


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
        raise WireError(f"expected an integer field, got wire type {wire}")
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
