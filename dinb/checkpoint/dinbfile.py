"""dinb's checkpoint slice file: one plain safetensors file per rank, ``rank_{r}/{prefix}{r}.safetensors``.

The tensors are the rank's slices under their parameter names (MindSpore's ``integrated_save=False``).
The header's ``__metadata__["dinb"]`` is JSON::

    {"format": "dinb-checkpoint", "format_version": 1, "rank": r, "world_size": n,
     "params": {name: {"shape": full shape, "dtype": ..., "box": [[start, stop], ...],
                       "layout": {...}, "opt_weight_shard_step": .., "opt_weight_shard_size": ..,
                       "tile_crc32": [...]}}}

so each file says which part of which full tensor it holds, and a reader needs neither the
strategy nor any other rank's file to know it. Any safetensors reader opens these files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dinb.checkpoint.boxes import Box
from dinb.checkpoint.stored import StoredTensor, tile_crcs
from dinb.errors import CheckpointError

FORMAT = "dinb-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"

_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name, bfloat16 included (through ml_dtypes, which JAX ships)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def rank_file(out_dir: Path, prefix: str, rank: int) -> Path:
    return Path(out_dir) / f"rank_{rank}" / f"{prefix}{rank}{SUFFIX}"


def write_rank_file(
    path: Path, slices: Mapping[str, np.ndarray], records: Mapping[str, dict[str, Any]], rank: int,
    world_size: int,
) -> Path:
    """Write one rank's slices with their records (shape, box, layout); adds the tile checksums."""
    header: dict[str, Any] = {}
    params: dict[str, Any] = {}
    offset = 0
    arrays = {}
    for name, arr in slices.items():
        arr = np.ascontiguousarray(arr)
        dt = str(arr.dtype)
        if dt not in _ST_DTYPES:
            raise CheckpointError(f"parameter {name!r}: dtype {dt} cannot be stored in a checkpoint")
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        params[name] = {**records[name], "dtype": dt, "tile_crc32": tile_crcs(arr)}
        offset += arr.nbytes
        arrays[name] = arr
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rank": rank,
            "world_size": world_size, "params": params}
    header["__metadata__"] = {"dinb": json.dumps(meta, separators=(",", ":"))}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
    return path


class DinbRankFile:
    """The index of one dinb checkpoint file: its rank, world size and where each tensor lies."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8 or n > 100 * 2**20:
                    raise ValueError("header length beyond the file")
                header = json.loads(f.read(n))
            meta = json.loads(header["__metadata__"]["dinb"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.path} does not exist") from None
        except (ValueError, KeyError, struct.error, TypeError) as e:
            raise CheckpointError(
                f"{self.path} is not a dinb checkpoint file ({e}); it may be truncated, or written "
                "by another tool (MindSpore .ckpt files are read by name ending in .ckpt)"
            ) from None
        self.rank = int(meta["rank"])
        self.world_size = int(meta["world_size"])
        self.records: dict[str, dict[str, Any]] = meta["params"]
        data_start = 8 + n
        self.tensors: dict[str, StoredTensor] = {}
        for name, rec in self.records.items():
            entry = header.get(name)
            if entry is None:
                raise CheckpointError(f"{self.path}: metadata lists {name!r} but the file has no such tensor")
            b, e = entry["data_offsets"]
            if data_start + e > size:
                raise CheckpointError(
                    f"{self.path}: file ends inside tensor {name!r} (rank {self.rank}); it is truncated"
                )
            if entry["dtype"] not in _NP_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
            dtype = np_dtype(_NP_DTYPES[entry["dtype"]])
            self.tensors[name] = StoredTensor(
                self.path, name, dtype, tuple(entry["shape"]), ((data_start + b, e - b),),
                tuple(rec.get("tile_crc32", ())),
            )

    def full_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.records[name]["shape"])

    def box(self, name: str) -> Box:
        return tuple((int(s), int(e)) for s, e in self.records[name]["box"])
