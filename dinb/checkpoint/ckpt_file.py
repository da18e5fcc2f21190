"""MindSpore's checkpoint file (``.ckpt``), read and written without MindSpore.

A ``.ckpt`` file is a run of serialized ``Checkpoint`` messages, one ``Value`` each, so the file
parses as one message (proto2)::

    Checkpoint  { repeated Value value = 1; }
    Value       { required string tag = 1; oneof value { TensorProto tensor = 2;
                                                          MapTensorProto maptensor = 3; } }
    TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                  required bytes tensor_content = 3; }

The content is raw little-endian C-order bytes. A tensor over 512 MiB is written as several
consecutive records with the same tag, each holding the next rows. A 0-d tensor is written with
no dims (MindSpore's reader also takes ``dims = [0]`` with one element for it). With
``crc_check`` the file ends with ``b"crc_num"`` and the 10-byte big-endian CRC-32 of everything
before it.

Records of ``tensor_type "str"`` hold a Python string (``save_checkpoint(...,
append_dict={"note": "hi"})``): ``dims = [0]`` and the content is numpy's fixed-width unicode,
UTF-32-LE, padded with NUL code points. They load as ``str``, as MindSpore's ``load_checkpoint``
returns them.

Every length and shape in the file is checked against the file before it is used: a damaged or
lying file is a :class:`CheckpointError` naming the file and the record, never an allocation
larger than the file.
"""

from __future__ import annotations

import math
import mmap
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dinb.checkpoint.stored import StoredTensor
from dinb.errors import CheckpointError
from dinb.formats import protobuf as pb
from dinb.formats.safetensors import np_dtype
from dinb.formats.untrusted import MAX_NDIM

MS_DTYPES = {
    "Int8": "int8", "UInt8": "uint8", "Int16": "int16", "UInt16": "uint16", "Int32": "int32",
    "UInt32": "uint32", "Int64": "int64", "UInt64": "uint64", "Float16": "float16",
    "Float32": "float32", "Float64": "float64", "Bool": "bool", "BFloat16": "bfloat16",
}
NP_TO_MS = {v: k for k, v in MS_DTYPES.items()}
STRING_TYPE = "str"
CRC_TAG = b"crc_num"
CRC_TRAILER = len(CRC_TAG) + 10
SLICE_BYTES = 512 * 1024 * 1024  # MindSpore splits a tensor over this size into records


class MindSporeCheckpoint:
    """The index of one MindSpore ``.ckpt`` file: each tensor's dtype, shape and byte segments.

    The file is walked through a memory map, touching only the record headers (string records
    are decoded, they are small); ``verify`` checks the trailing CRC when the file has one (that
    reads the whole file once). ``tensors`` maps names to :class:`StoredTensor`, ``strings``
    names to the strings the file holds.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.tensors: dict[str, StoredTensor] = {}
        self.strings: dict[str, str] = {}
        self.names: list[str] = []  # tensors and strings, in file order
        self.has_crc = False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.path} does not exist") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint file {self.path} cannot be read ({e.strerror or e})") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise CheckpointError(f"{self.path} is empty; it is not a MindSpore checkpoint")
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
                end = size
                if size >= CRC_TRAILER and buf[size - CRC_TRAILER : size - 10] == CRC_TAG:
                    self.has_crc = True
                    end = size - CRC_TRAILER
                    if verify:
                        want = int.from_bytes(buf[size - 10 : size], "big")
                        if zlib.crc32(memoryview(buf)[:end]) != want:
                            raise CheckpointError(
                                f"{self.path}: the file's CRC does not match its content; it is "
                                "corrupted. Re-copy or re-save it."
                            )
                self._index(buf, end)
        except pb.WireError as e:
            raise CheckpointError(
                f"{self.path} is not a readable MindSpore checkpoint ({e}); it may be truncated, "
                "encrypted (dec_key) or another kind of file"
            ) from None
        finally:
            os.close(fd)

    def _index(self, buf: Any, end: int) -> None:
        parts: dict[str, tuple[str, list[int], list[tuple[int, int]]]] = {}
        for index, (number, wire, value) in enumerate(pb.fields(buf, 0, end)):
            if number != 1:
                raise pb.WireError(f"record {index} is field {number}; a checkpoint holds only field 1")
            pb.expect(wire, pb.LEN, f"record {index}")
            tag, ttype, dims, content = self._record(buf, value, index)
            if tag in parts:
                if parts[tag][0] != ttype or parts[tag][1] != dims:
                    raise CheckpointError(
                        f"{self.path}: the records of {tag!r} disagree on tensor_type or dims "
                        f"({parts[tag][0]}{parts[tag][1]} and {ttype}{dims}); the file is damaged"
                    )
                parts[tag][2].append(content)
            else:
                parts[tag] = (ttype, dims, [content])
        self.names = list(parts)
        for tag, (ttype, dims, spans) in parts.items():
            segments = tuple((s, e - s) for s, e in spans)
            if ttype == STRING_TYPE:
                self.strings[tag] = self._string(buf, tag, spans)
                continue
            dtype = np_dtype(MS_DTYPES[ttype])
            nbytes = sum(n for _, n in segments)
            shape = tuple(dims)
            if shape == (0,) and nbytes == dtype.itemsize:
                shape = ()  # MindSpore's loader reads dims [0] with one element as 0-d
            if math.prod(shape) * dtype.itemsize != nbytes:
                raise CheckpointError(
                    f"{self.path}: tensor {tag!r} holds {nbytes} bytes but dims {list(dims)} of "
                    f"{ttype} need {math.prod(shape) * dtype.itemsize}; the file is damaged"
                )
            self.tensors[tag] = StoredTensor(self.path, tag, dtype, shape, segments)

    def _record(self, buf: Any, span: tuple[int, int], index: int
                ) -> tuple[str, str, list[int], tuple[int, int]]:
        tag, tensor = None, None
        for number, wire, value in pb.fields(buf, *span):
            if number == 1:
                pb.expect(wire, pb.LEN, f"the tag of record {index}")
                tag = pb.text(buf, value, f"the tag of record {index}")
            elif number == 2:
                pb.expect(wire, pb.LEN, f"the tensor of record {index}")
                tensor = value
            elif number == 3:
                raise CheckpointError(
                    f"{self.path}: {tag!r} (record {index}) is a MapParameter (maptensor), which dinb "
                    "does not load"
                )
        where = f"record {index} ({tag!r})" if tag is not None else f"record {index}"
        if tag is None or tensor is None:
            raise pb.WireError(f"{where} lacks its tag or its tensor")
        dims: list[int] = []
        ttype, content = None, None
        for number, wire, value in pb.fields(buf, *tensor):
            if number == 1:
                dims += pb.packed_or_single(buf, wire, value, signed=True)
                if len(dims) > MAX_NDIM:
                    raise CheckpointError(f"{self.path}: {where} has more than {MAX_NDIM} dims; the file "
                                          "is damaged")
            elif number == 2:
                pb.expect(wire, pb.LEN, f"the tensor_type of {where}")
                ttype = pb.text(buf, value, f"the tensor_type of {where}")
            elif number == 3:
                pb.expect(wire, pb.LEN, f"the tensor_content of {where}")
                content = value
        if ttype is None or content is None:
            raise pb.WireError(f"{where} lacks its tensor_type or tensor_content")
        if ttype != STRING_TYPE and ttype not in MS_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {tag!r} has tensor_type {ttype!r}; dinb reads "
                f"{sorted(MS_DTYPES) + [STRING_TYPE]}"
            )
        if any(d < 0 for d in dims):
            raise CheckpointError(f"{self.path}: {where} has negative dims {dims}; the file is damaged")
        return tag, ttype, dims, content

    def _string(self, buf: Any, tag: str, spans: list[tuple[int, int]]) -> str:
        raw = b"".join(bytes(buf[s:e]) for s, e in spans)
        if len(raw) % 4:
            raise CheckpointError(
                f"{self.path}: string record {tag!r} holds {len(raw)} bytes, not a whole number of "
                "UTF-32 code points; the file is damaged"
            )
        try:
            return raw.decode("utf-32-le").rstrip("\0")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: string record {tag!r} is not valid UTF-32 text; the file is damaged"
            ) from None


def string_record(value: str) -> bytes:
    """A string's content as MindSpore writes it: numpy's unicode array bytes (UTF-32-LE)."""
    return np.array(value).tobytes()


def write_ckpt(path: str | Path, values: Mapping[str, np.ndarray | str], crc_check: bool = False) -> Path:
    """Write ``values`` as a MindSpore ``.ckpt`` (the records MindSpore's ``save_checkpoint`` writes).

    Arrays become tensor records; ``str`` values become ``"str"`` records.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    crc = 0
    with open(tmp, "wb") as f:
        for name, value in values.items():
            for dims, ttype, content in _records(name, value):
                tensor_head = b"".join(pb.int_field(1, int(d)) for d in dims)
                tensor_head += pb.len_field(2, ttype.encode())
                tensor_head += pb.key(3, pb.LEN) + pb.varint(len(content))
                tensor_len = len(tensor_head) + len(content)
                value_head = pb.len_field(1, name.encode()) + pb.key(2, pb.LEN) + pb.varint(tensor_len)
                value_len = len(value_head) + tensor_len
                head = pb.key(1, pb.LEN) + pb.varint(value_len) + value_head + tensor_head
                if crc_check:
                    crc = zlib.crc32(content, zlib.crc32(head, crc))
                f.write(head)
                f.write(content)
        if crc_check:
            f.write(CRC_TAG + crc.to_bytes(10, "big"))
    os.replace(tmp, path)
    return path


def _records(name: str, value: np.ndarray | str) -> list[tuple[tuple[int, ...], str, memoryview | bytes]]:
    if isinstance(value, str):
        return [((0,), STRING_TYPE, string_record(value))]
    arr = np.asarray(value)
    if str(arr.dtype) not in NP_TO_MS:
        raise CheckpointError(f"parameter {name!r}: dtype {arr.dtype} has no MindSpore tensor_type")
    dims = arr.shape
    count = math.ceil(arr.nbytes / SLICE_BYTES)
    pieces = np.array_split(arr, count) if count > 1 else [arr]
    return [(dims, NP_TO_MS[str(arr.dtype)], memoryview(np.ascontiguousarray(p).reshape(-1).view(np.uint8)))
            for p in pieces]
