"""The safetensors format, read and written by dinb itself (bfloat16 included, no torch).

A file is ``[8-byte little-endian header length N][N bytes of JSON][data]``. The JSON maps each
tensor name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` (offsets into
the data, C order, little-endian) and may hold ``"__metadata__": {str: str}``. The header is
padded with spaces to a multiple of 8 bytes, so the data is aligned.

dinb's slice files and checkpoint files are plain safetensors files written here; any
safetensors reader opens them. :func:`read_header` checks the whole header before anything is
read or allocated: a header length inside the file, a JSON object, known dtypes, shapes of at most
64 axes, and for every tensor ``prod(shape) * itemsize == end - begin`` within the file's size.
So a damaged or lying file is a typed error naming the file and the tensor, never a huge
allocation. Tensors are then read with ``os.preadv`` straight into their arrays.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinb.errors import DinbError
from dinb.formats.untrusted import MAX_HEADER_BYTES, Fields

DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
NP_NAMES = {v: k for k, v in DTYPES.items()}


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name, bfloat16 included (through ml_dtypes, which JAX ships)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: dtype, shape and where its bytes lie in the file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: the tensors in file order and the string metadata."""

    path: Path
    size: int
    entries: dict[str, Entry]
    metadata: dict[str, str]


def read_header(path: str | Path, error: type[DinbError], what: str = "safetensors file") -> Header:
    """Read and check the header of ``path``; every problem is an ``error`` naming the file."""
    path = Path(path)
    check = Fields(error, str(path))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                check.fail(f"only {size} bytes, too short for a {what}; it is truncated or not a {what}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                check.fail(f"the header claims {n} bytes but the file holds {size - 8} after the length; "
                           f"it is truncated or not a {what}")
            raw = f.read(n)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    header = check.obj(check.json(raw, "the header"), "the header")
    data_start = 8 + n
    metadata: dict[str, str] = {}
    entries: dict[str, Entry] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            meta = check.obj(spec, "__metadata__")
            for k, v in meta.items():
                metadata[k] = check.check(v, f"__metadata__.{k}", str)
            continue
        where = f"tensor {name!r}"
        spec = check.obj(spec, where)
        code = check.get(spec, "dtype", where, str)
        if code not in NP_NAMES:
            check.fail(f"{where} has dtype {code!r}; dinb reads {sorted(NP_NAMES)}")
        dtype = np_dtype(NP_NAMES[code])
        shape = check.shape(check.get(spec, "shape", where, list), f"{where}.shape")
        offsets = check.ints(check.get(spec, "data_offsets", where, list), f"{where}.data_offsets", 0)
        if len(offsets) != 2:
            check.fail(f"{where}.data_offsets must be [begin, end], found {list(offsets)}")
        begin, end = offsets
        need = math.prod(shape) * dtype.itemsize
        if end < begin or end - begin != need:
            check.fail(f"{where} has data_offsets [{begin}, {end}] but shape {list(shape)} of {dtype} "
                       f"needs {need} bytes")
        if data_start + end > size:
            check.fail(f"the file ends inside {where} ({data_start + end} bytes needed, {size} "
                       "present); it is truncated")
        entries[name] = Entry(name, dtype, shape, data_start + begin, need)
    return Header(path, size, entries, metadata)


def read_tensor(fd: int, entry: Entry, path: Path, error: type[DinbError]) -> np.ndarray:
    """The tensor ``entry`` of the open file ``fd``, read straight into a new array."""
    out = np.empty(entry.shape, entry.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < entry.nbytes:
        got = os.preadv(fd, [view[done:]], entry.offset + done)
        if got <= 0:
            raise error(f"{path}: the file ends inside tensor {entry.name!r}; it is truncated")
        done += got
    return out


def write_file(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
    """Write ``tensors`` (in order) with ``metadata``; atomic: a crash leaves no half file."""
    path = Path(path)
    header: dict[str, object] = {}
    arrays = []
    offset = 0
    for name, arr in tensors.items():
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would make a 0-d tensor 1-d)
        code = DTYPES.get(str(arr.dtype))
        if code is None:
            raise DinbError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in a safetensors file")
        header[name] = {"dtype": code, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
    return path
