"""dinb's checkpoint slice file: one plain safetensors file per rank, ``rank_{r}/{prefix}{r}.safetensors``.

The tensors are the rank's slices under their parameter names (MindSpore's ``integrated_save=False``).
The header's ``__metadata__["dinb"]`` is JSON::

    {"format": "dinb-checkpoint", "format_version": 2, "rank": r, "world_size": n,
     "params": {name: {"shape": full shape, "dtype": ..., "box": [[start, stop], ...],
                       "layout": {...}, "opt_weight_shard_step": .., "opt_weight_shard_size": ..,
                       "tile_xxh3_64": [...]}},
     "strings": {name: text}}

so each file says which part of which full tensor it holds, and a reader needs neither the
strategy nor any other rank's file to know it. ``strings`` holds the checkpoint's string records
(MindSpore's ``append_dict`` texts), whole on every rank; a file that holds some is written as
format version 3, so a dinb too old to carry them refuses the file instead of dropping them.
Any safetensors reader opens these files. A safetensors file without that metadata (a Hugging
Face ``model.safetensors``) is read as the checkpoint of one device: every tensor whole. Every
field is checked when the file is opened (:class:`DinbRankFile`): a box inside the full shape and
of the stored tensor's shape, one checksum per tile. Format version 1 files hold
``"tile_crc32"`` instead (zlib's CRC-32, 7x slower to verify); they are still read and verified.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dinb.checkpoint.boxes import Box, box_shape
from dinb.checkpoint.stored import WRITTEN_CHECKSUM, StoredTensor, tile_checksums, tile_grid
from dinb.errors import CheckpointError
from dinb.formats import safetensors as st
from dinb.formats.untrusted import Fields
from dinb.sharding.layout import MAX_DEVICES

FORMAT = "dinb-checkpoint"
FORMAT_VERSION = 3  # 1: tile checksums were CRC-32; 3: the file holds string records
SUFFIX = ".safetensors"


def rank_file(out_dir: Path, prefix: str, rank: int) -> Path:
    return Path(out_dir) / f"rank_{rank}" / f"{prefix}{rank}{SUFFIX}"


def write_rank_file(
    path: Path, slices: Mapping[str, np.ndarray], records: Mapping[str, dict[str, Any]], rank: int,
    world_size: int, strings: Mapping[str, str] | None = None,
) -> Path:
    """Write one rank's slices with their records (shape, box, layout) and the checkpoint's string
    records; adds the tile checksums."""
    strings = dict(strings or {})
    both = sorted(set(strings) & set(slices))
    if both:
        raise CheckpointError(f"record(s) {both} are given both as a tensor and as a string")
    params = {}
    for name, arr in slices.items():
        if str(arr.dtype) not in st.DTYPES:
            raise CheckpointError(f"parameter {name!r}: dtype {arr.dtype} cannot be stored in a checkpoint")
        params[name] = {**records[name], "dtype": str(arr.dtype),
                        f"tile_{WRITTEN_CHECKSUM}": tile_checksums(arr)}
    meta: dict[str, Any] = {"format": FORMAT, "format_version": 3 if strings else 2, "rank": rank,
                            "world_size": world_size, "params": params}
    if strings:
        meta["strings"] = strings
    return st.write_file(path, slices, {"dinb": json.dumps(meta, separators=(",", ":"))})


class DinbRankFile:
    """The index of one dinb checkpoint file: its rank, world size and where each tensor lies."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = st.read_header(self.path, CheckpointError, "dinb checkpoint file")
        check = Fields(CheckpointError, str(self.path))
        if "dinb" not in header.metadata:
            self._whole_tensors(header)
            return
        meta = check.obj(check.json(header.metadata["dinb"], "the dinb metadata"), "the dinb metadata")
        if meta.get("format") != FORMAT:
            check.fail(f"format is {meta.get('format')!r}, not {FORMAT!r}; not a dinb checkpoint file")
        version = check.int(check.get(meta, "format_version", "metadata", int, 1), "format_version", 1)
        if version > FORMAT_VERSION:
            check.fail(f"format_version {version} is newer than this dinb reads ({FORMAT_VERSION}); "
                       "upgrade dinb")
        self.world_size = check.int(check.get(meta, "world_size", "metadata", int), "world_size", 1)
        self.rank = check.int(check.get(meta, "rank", "metadata", int), "rank", 0)
        if self.rank >= self.world_size or self.world_size > MAX_DEVICES:
            check.fail(f"rank {self.rank} of a world of {self.world_size} ranks; the file is damaged")
        params = check.obj(check.get(meta, "params", "metadata", dict), "params")
        self.records: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, StoredTensor] = {}
        self._boxes: dict[str, Box] = {}
        self.strings = {name: check.check(text, f"strings.{name}", str) for name, text in
                        check.obj(check.get(meta, "strings", "metadata", dict, {}), "strings").items()}
        for name in self.strings:
            if name in params:
                check.fail(f"{name!r} is both a tensor and a string record; the file is damaged")
        for name, rec in params.items():
            where = f"parameter {name!r} (rank {self.rank})"
            rec = check.obj(rec, where)
            entry = header.entries.get(name)
            if entry is None:
                check.fail(f"the metadata lists {name!r} but the file has no such tensor")
            full = check.shape(check.get(rec, "shape", where, list), f"{where}.shape")
            spans = [check.ints(b, f"{where}.box[{i}]", 0)
                     for i, b in enumerate(check.get(rec, "box", where, list))]
            if len(spans) != len(full) or any(len(b) != 2 or not b[0] <= b[1] <= s
                                              for b, s in zip(spans, full)):
                check.fail(f"{where}: box {[list(b) for b in spans]} is not a part of shape {list(full)}")
            box: Box = tuple((b[0], b[1]) for b in spans)
            if box_shape(box) != entry.shape:
                check.fail(f"{where}: the tensor has shape {list(entry.shape)} but its box "
                           f"{[list(b) for b in box]} has shape {list(box_shape(box))}")
            algorithm = "crc32" if version == 1 else WRITTEN_CHECKSUM
            field = f"tile_{algorithm}"
            sums = check.ints(check.get(rec, field, where, list, []), f"{where}.{field}", 0)
            tiles = math.prod(tile_grid(entry.shape))
            if sums and len(sums) != tiles:
                check.fail(f"{where}: {len(sums)} tile checksums for a tensor of {tiles} tiles")
            self.records[name] = rec
            self._boxes[name] = box
            self.tensors[name] = StoredTensor(self.path, name, entry.dtype, entry.shape,
                                              ((entry.offset, entry.nbytes),), sums, algorithm)

    def _whole_tensors(self, header: st.Header) -> None:
        """A safetensors file from another tool (a Hugging Face ``model.safetensors``): one device's
        checkpoint, every tensor whole."""
        self.world_size, self.rank = 1, 0
        self.records, self.tensors, self._boxes, self.strings = {}, {}, {}, {}
        for name, entry in header.entries.items():
            self.records[name] = {"shape": list(entry.shape)}
            self._boxes[name] = tuple((0, s) for s in entry.shape)
            self.tensors[name] = StoredTensor(self.path, name, entry.dtype, entry.shape,
                                              ((entry.offset, entry.nbytes),))

    def full_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.records[name]["shape"])

    def box(self, name: str) -> Box:
        return self._boxes[name]
