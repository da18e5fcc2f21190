"""MindSpore's checkpoint (``.ckpt``) and strategy files, read and written without MindSpore.

A ``.ckpt`` file is a run of serialized ``Checkpoint`` messages, one ``Value`` each, so the file
parses as one message (proto2)::

    Checkpoint  { repeated Value value = 1; }
    Value       { required string tag = 1; oneof value { TensorProto tensor = 2;
                                                          MapTensorProto maptensor = 3; } }
    TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                  required bytes tensor_content = 3; }

The content is raw little-endian C-order bytes. A tensor over 512 MiB is written as several
consecutive records with the same tag, each holding the next rows. With ``crc_check`` the file
ends with ``b"crc_num"`` and the 10-byte big-endian CRC-32 of everything before it.

A strategy file that does not end in ``.json`` is a serialized ``ParallelStrategyMap``
(package ``mindspore.straspb``): ``current_stage = 1``, ``parallel_layout_item = 3`` of
``ParallelLayoutItem { param_name = 1; parallel_layouts = 2; }`` with
``ParallelLayouts { dev_matrix = 1; tensor_map = 2; param_split_shape = 3; indices_offset = 4;
field = 5; opt_weight_shard_step = 6; opt_weight_shard_size = 7; }``, each of the first four a
repeated message of ``repeated int dim = 1``. A nested tensor_map is written as one
``TensorMap`` per tensor axis.
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

from dinb import protobuf as pb
from dinb.checkpoint.dinbfile import np_dtype
from dinb.checkpoint.stored import StoredTensor
from dinb.errors import CheckpointError, LayoutError, StrategyError
from dinb.layout import Layout
from dinb.strategy import ParamLayout, Strategy

MS_DTYPES = {
    "Int8": "int8", "UInt8": "uint8", "Int16": "int16", "UInt16": "uint16", "Int32": "int32",
    "UInt32": "uint32", "Int64": "int64", "UInt64": "uint64", "Float16": "float16",
    "Float32": "float32", "Float64": "float64", "Bool": "bool", "BFloat16": "bfloat16",
}
NP_TO_MS = {v: k for k, v in MS_DTYPES.items()}
CRC_TAG = b"crc_num"
CRC_TRAILER = len(CRC_TAG) + 10
SLICE_BYTES = 512 * 1024 * 1024  # MindSpore splits a tensor over this size into records


class MindSporeCheckpoint:
    """The index of one MindSpore ``.ckpt`` file: each tensor's dtype, shape and byte segments.

    The file is walked through a memory map, touching only the record headers; ``verify``
    checks the trailing CRC when the file has one (that reads the whole file once).
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.tensors: dict[str, StoredTensor] = {}
        self.has_crc = False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.path} does not exist") from None
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
        parts: dict[str, tuple[np.dtype, tuple[int, ...], list[tuple[int, int]]]] = {}
        for number, wire, value in pb.fields(buf, 0, end):
            if number != 1 or wire != pb.LEN:
                raise pb.WireError(f"unexpected top-level field {number}")
            tag, tensor = None, None
            for n2, w2, v2 in pb.fields(buf, *value):
                if n2 == 1 and w2 == pb.LEN:
                    tag = bytes(buf[v2[0] : v2[1]]).decode()
                elif n2 == 2 and w2 == pb.LEN:
                    tensor = v2
                elif n2 == 3:
                    raise CheckpointError(
                        f"{self.path}: {tag!r} is a MapParameter (maptensor), which dinb does not load"
                    )
            if tag is None or tensor is None:
                raise pb.WireError("a record without tag or tensor")
            dims: list[int] = []
            ttype, content = "", (0, 0)
            for n3, w3, v3 in pb.fields(buf, *tensor):
                if n3 == 1:
                    dims += pb.packed_or_single(buf, w3, v3, signed=True)
                elif n3 == 2:
                    ttype = bytes(buf[v3[0] : v3[1]]).decode()
                elif n3 == 3:
                    content = v3
            if ttype not in MS_DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {tag!r} has tensor_type {ttype!r}; dinb reads "
                    f"{sorted(MS_DTYPES)}"
                )
            dtype = np_dtype(MS_DTYPES[ttype])
            segment = (content[0], content[1] - content[0])
            if tag in parts:
                if parts[tag][0] != dtype:
                    raise CheckpointError(f"{self.path}: records of {tag!r} disagree on dtype")
                parts[tag][2].append(segment)
            else:
                parts[tag] = (dtype, tuple(dims), [segment])
        for tag, (dtype, dims, segments) in parts.items():
            self.tensors[tag] = StoredTensor(self.path, tag, dtype, dims, tuple(segments))


def write_ckpt(path: str | Path, arrays: Mapping[str, np.ndarray], crc_check: bool = False) -> Path:
    """Write ``arrays`` as a MindSpore ``.ckpt`` (the records MindSpore's ``save_checkpoint`` writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    crc = 0
    with open(tmp, "wb") as f:
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if str(arr.dtype) not in NP_TO_MS:
                raise CheckpointError(f"parameter {name!r}: dtype {arr.dtype} has no MindSpore tensor_type")
            count = math.ceil(arr.nbytes / SLICE_BYTES)
            pieces = np.array_split(arr, count) if count > 1 else [arr]
            for piece in pieces:
                content = memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
                tensor_head = b"".join(pb.int_field(1, int(d)) for d in arr.shape)
                tensor_head += pb.len_field(2, NP_TO_MS[str(arr.dtype)].encode())
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


# ---- strategy files ------------------------------------------------------------------------
def parse_strategy_pb(data: bytes, source: str = "strategy") -> Strategy:
    """A protobuf ``ParallelStrategyMap`` as a :class:`Strategy` (errors name ``source``)."""
    params: dict[str, ParamLayout] = {}
    stage = 0
    try:
        for number, wire, value in pb.fields(data):
            if number == 1 and wire == pb.VARINT:
                stage = value
            elif number == 3 and wire == pb.LEN:
                name, rec = _layout_item(data, value)
                params[name] = rec
    except pb.WireError as e:
        raise StrategyError(
            f"{source} is neither a JSON strategy (name it *.json) nor a protobuf ParallelStrategyMap ({e})"
        ) from None
    if not params:
        raise StrategyError(f"{source}: the strategy has no parallel_layout_item entries")
    return Strategy({n: ParamLayout(p.layout, p.shape, stage, p.field, p.opt_weight_shard_step,
                                    p.opt_weight_shard_size) for n, p in params.items()})


def _layout_item(data: bytes, span: tuple[int, int]) -> tuple[str, ParamLayout]:
    name, layouts = "", None
    for number, _, value in pb.fields(data, *span):
        if number == 1:
            name = data[value[0] : value[1]].decode()
        elif number == 2:
            layouts = value
    if layouts is None:
        raise pb.WireError(f"layout item {name!r} has no parallel_layouts")
    lists: dict[int, list[list[int]]] = {1: [], 2: [], 3: [], 4: []}
    ints = {5: 0, 6: 0, 7: 0}
    for number, wire, value in pb.fields(data, *layouts):
        if number in lists:
            dims: list[int] = []
            for n2, w2, v2 in pb.fields(data, *value):
                if n2 == 1:
                    dims += pb.packed_or_single(data, w2, v2, signed=True)
            lists[number].append(dims)
        elif number in ints:
            ints[number] = pb.packed_or_single(data, wire, value, signed=True)[0]
    if not lists[1] or not lists[2]:
        raise pb.WireError(f"layout of {name!r} lacks dev_matrix or tensor_map")
    maps = lists[2]
    if len(maps) > 1:  # nested form: one TensorMap per tensor axis
        tensor_map: list[Any] = [m[0] if len(m) == 1 else m for m in maps if m]
    else:
        tensor_map = maps[0]
    if any(any(d for d in x) for x in lists[3]) or any(any(d for d in x) for x in lists[4]):
        raise StrategyError(
            f"parameter {name!r} has a non-uniform split (param_split_shape / indices_offset); dinb "
            "handles even splits only"
        )
    try:
        layout = Layout(lists[1][0], tensor_map)
    except LayoutError as e:
        raise StrategyError(f"parameter {name!r}: {e}") from None
    return name, ParamLayout(layout, None, 0, ints[5], ints[6], ints[7])


def strategy_to_pb(strategy: Strategy) -> bytes:
    """Serialize a strategy as MindSpore's protobuf ``ParallelStrategyMap``."""
    out = pb.int_field(1, min((strategy.item(n).stage for n in strategy), default=0))
    for name in strategy:
        rec = strategy.item(name)
        lay = rec.layout
        body = pb.len_field(1, b"".join(pb.int_field(1, d) for d in lay.dev_matrix))
        nested = any(isinstance(e, tuple) for e in lay.tensor_map)
        if nested:
            for e in lay.tensor_map:
                dims = e if isinstance(e, tuple) else (e,)
                body += pb.len_field(2, b"".join(pb.int_field(1, d) for d in dims))
        else:
            body += pb.len_field(2, b"".join(pb.int_field(1, int(e)) for e in lay.tensor_map))
        body += pb.len_field(3, b"") + pb.len_field(4, b"")
        body += pb.int_field(5, rec.field) + pb.int_field(6, rec.opt_weight_shard_step)
        body += pb.int_field(7, rec.opt_weight_shard_size)
        out += pb.len_field(3, pb.len_field(1, name.encode()) + pb.len_field(2, body))
    return out
