"""The index of a distributed checkpoint: which box of which tensor each rank's file holds.

:class:`DistributedCheckpoint` opens the rank files of one checkpoint (dinb's safetensors files
or MindSpore's ``.ckpt``) and plans reads for any target layout. A load never merges a tensor in
memory: for target rank ``t`` and each parameter,

    target box  B_t = the part of the full tensor rank t holds under the predict strategy
    source box  A_s = the part source rank s saved (from its file, or from the train strategy)
    read        A_s ∩ B_t from s's file, for one s per distinct A_s (replicas are read once)

and each intersection is read straight from its byte ranges (:mod:`dinb.checkpoint.stored`).
So loading "saved on 8 ranks by rows, served on 2 by columns" reads exactly each target slice's
bytes, and peak memory is the target slices plus one source piece.

Every record of the files comes through, whether the strategy names it or not. A record the
strategy does not name is whole on every rank (MindSpore's rule), and so is every 0-d tensor and
every string record (``append_dict``'s step, epoch or note). Tensors with axes are read once,
from the lowest rank holding them, as replicas are (MindSpore also takes the first file's copy).
Scalars and strings are a run's bookkeeping, so every given rank's copy is compared: files whose
copies differ come from different checkpoints or steps, and the error names the record and two
ranks instead of picking one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.checkpoint.boxes import (
    Box,
    box_shape,
    box_size,
    opt_shard_size,
    overlap_plan,
    param_box,
    relative,
)
from dinb.checkpoint.ckpt_file import MindSporeCheckpoint
from dinb.checkpoint.dinbfile import SUFFIX, DinbRankFile
from dinb.checkpoint.stored import OpenFiles, StoredTensor
from dinb.errors import CheckpointError, DinbError
from dinb.progress import progress
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import ParamLayout, Strategy

PathLike = str | Path
StrategyLike = Strategy | PathLike | None
AUTO_PROGRESS_BYTES = 256 * 2**20


def as_strategy(strategy: StrategyLike) -> Strategy | None:
    """A :class:`Strategy`, loading it when given a file path (JSON or MindSpore protobuf)."""
    if strategy is None or isinstance(strategy, Strategy):
        return strategy
    return Strategy.load(strategy)


def item_of(strategy: Strategy | None, name: str, ndim: int) -> ParamLayout:
    """The layout record of ``name``; parameters a strategy does not list are not split."""
    if strategy is not None and name in strategy:
        return strategy.item(name)
    n = strategy.stage_device_num if strategy is not None and len(strategy) else 1
    return ParamLayout(Layout.replicated(ndim, n))


def box_of(strategy: Strategy | None, name: str, rank: int, shape: tuple[int, ...]) -> Box | None:
    """The box of parameter ``name`` that global rank ``rank`` holds under ``strategy``; None when
    the parameter lives in another pipeline stage (a parameter the strategy does not list is
    whole on every rank)."""
    item = item_of(strategy, name, len(shape))
    if strategy is not None and len(strategy) and strategy.pipeline_stages > 1:
        if name in strategy and not strategy.holds(name, rank):
            return None
        rank %= strategy.stage_device_num
    return param_box(item, rank, shape, name)


def stage_note(strategy: Strategy | None, name: str) -> str:
    """Where a parameter lives, for messages: ``" (stage 1: ranks 2-3)"``, or nothing."""
    if strategy is None or name not in strategy or strategy.pipeline_stages == 1:
        return ""
    ranks = strategy.stage_ranks(strategy.stage_of(name))
    where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    return f" (stage {strategy.stage_of(name)}: {where})"


def device_num_of(strategy: Strategy | None) -> int:
    return strategy.device_num if strategy is not None and len(strategy) else 1


class DistributedCheckpoint:
    """The rank files of one checkpoint, indexed: which box of which tensor each rank holds.

    ``files`` are the rank files in rank order (dinb ``.safetensors`` or MindSpore ``.ckpt``), a
    ``{rank: file}`` map holding only some ranks, a directory of ``rank_{r}/`` folders, or a
    Hugging Face folder as downloaded (``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists: one device's checkpoint, every tensor whole).
    ``strategy`` is the layout the files were saved with; dinb files record their own boxes (a
    strategy given anyway is checked against them); MindSpore files need it unless there is one
    file holding whole tensors.
    """

    def __init__(
        self,
        files: Sequence[PathLike] | Mapping[int, PathLike] | PathLike,
        strategy: StrategyLike = None,
        verify: bool = True,
    ):
        self.strategy = as_strategy(strategy)
        self.verify = verify
        shards = hf_shards(Path(files)) if isinstance(files, (str, Path)) else None
        by_rank = {0: shards[0]} if shards else _resolve_files(files)
        self.ranks = sorted(by_rank)
        self.device_num = self._check_rank_count(by_rank, isinstance(files, Mapping))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.strings: dict[str, str] = {}  # string records, whole on every rank
        self._order: dict[str, None] = {}  # every record's name, tensors and strings, in file order
        self._held: dict[str, dict[int, tuple[Box, StoredTensor]]] = {}
        self._string_rank: dict[str, tuple[int, Path]] = {}  # whose copy self.strings holds
        for rank in self.ranks:
            self._add_file(rank, by_rank[rank])
        for shard in (shards or [])[1:]:  # a sharded folder: every shard holds whole tensors
            self._add_file(0, shard)
        self.bytes_read = 0
        self.reads: dict[int, int] = {}  # bytes read for each target rank loaded (load_rank)

    # ---- indexing ----------------------------------------------------------------------------
    def _check_rank_count(self, by_rank: dict[int, Path], partial: bool) -> int:
        n = device_num_of(self.strategy) if self.strategy is not None else None
        first = by_rank[self.ranks[0]]
        if n is None and first.suffix == ".ckpt" and len(by_rank) > 1:
            raise CheckpointError(
                f"{len(by_rank)} MindSpore .ckpt rank files ({first.parent.parent}) need the strategy "
                "file they were saved with; pass train_strategy_filename= (src_strategy_file=, or "
                "--src-strategy)"
            )
        if n is None:
            n = DinbRankFile(first).world_size if first.suffix == SUFFIX else len(by_rank)
        extra = [r for r in self.ranks if r >= n]
        missing = [r for r in range(n) if r not in by_rank]
        if extra:
            raise CheckpointError(
                f"the checkpoint has files for ranks {extra} ({[str(by_rank[r]) for r in extra]}) but "
                f"its strategy spans {n} ranks; remove them or give the strategy they were saved with"
            )
        if missing and not partial:
            raise CheckpointError(
                f"the checkpoint spans {n} ranks but the files of rank(s) {missing} are missing "
                f"(have {len(by_rank)}: {[str(by_rank[r]) for r in self.ranks]})"
            )
        return n

    def _add_file(self, rank: int, path: Path) -> None:
        if path.suffix == SUFFIX:
            self._add_dinb_file(rank, path)
        elif path.suffix == ".ckpt":
            self._add_ckpt_file(rank, path)
        else:
            raise CheckpointError(
                f"{path}: unknown checkpoint file type; dinb reads its own {SUFFIX} files and "
                "MindSpore .ckpt files"
            )

    def _add_dinb_file(self, rank: int, path: Path) -> None:
        """A dinb rank file: each tensor's box comes from the file, checked against the strategy."""
        f = DinbRankFile(path)
        if f.rank != rank:
            raise CheckpointError(
                f"{path} holds rank {f.rank}'s slices but is listed as rank {rank}; pass the files "
                "in rank order (or a directory of rank_{r}/ folders)"
            )
        if f.world_size != self.device_num:
            raise CheckpointError(
                f"{path} was saved by a job of {f.world_size} ranks, the other files by "
                f"{self.device_num}; they belong to different checkpoints"
            )
        for name, stored in f.tensors.items():
            box = f.box(name)
            if self.strategy is not None and name in self.strategy:
                want = box_of(self.strategy, name, rank, f.full_shape(name))
                if want != box:
                    puts = (f"puts {[list(b) for b in want]} on rank {rank}" if want is not None
                            else f"places it in another stage{stage_note(self.strategy, name)}")
                    raise CheckpointError(
                        f"{path} (rank {rank}): parameter {name!r} holds the part "
                        f"{[list(b) for b in box]} but the given strategy {puts}; the file was "
                        "saved with another strategy"
                    )
            self._record(path, rank, name, f.full_shape(name), box, stored)
        for name, text in f.strings.items():
            self._add_string(path, rank, name, text)

    def _add_ckpt_file(self, rank: int, path: Path) -> None:
        """A MindSpore .ckpt: each tensor's box comes from the strategy (the file holds none)."""
        ck = MindSporeCheckpoint(path, verify=self.verify)
        for name in ck.names:
            if name in ck.strings:
                self._add_string(path, rank, name, ck.strings[name])
                continue
            stored = ck.tensors[name]
            item = item_of(self.strategy, name, len(stored.shape))
            full = full_shape_of(item, stored.shape)
            if self.strategy is not None and name in self.strategy and item.shape:
                full = tuple(item.shape)
            try:
                held = box_of(self.strategy, name, rank, full)
            except DinbError as e:
                raise CheckpointError(f"{path} (rank {rank}): parameter {name!r}: {e}") from None
            if held is None:
                raise CheckpointError(
                    f"{path} (rank {rank}): the file holds parameter {name!r}, which the strategy "
                    f"places in another pipeline stage{stage_note(self.strategy, name)}; the "
                    "strategy does not belong to this checkpoint"
                )
            box = held
            if box_shape(box) != stored.shape:
                raise CheckpointError(
                    f"{path} (rank {rank}): parameter {name!r} has shape {list(stored.shape)} but "
                    f"the strategy gives rank {rank} a slice of shape {list(box_shape(box))} of "
                    f"{list(full)}; the strategy does not belong to this checkpoint"
                )
            self._record(path, rank, name, full, box, stored)

    def _add_string(self, path: Path, rank: int, name: str, text: str) -> None:
        if name in self.shapes:
            raise CheckpointError(
                f"{path} (rank {rank}): {name!r} is a string record, other ranks' files hold a tensor "
                "of that name; they belong to different checkpoints"
            )
        if name in self.strings and self.strings[name] != text:
            first, first_path = self._string_rank[name]
            raise CheckpointError(
                f"string record {name!r} is {self.strings[name]!r} in rank {first}'s file ({first_path}) "
                f"but {text!r} in rank {rank}'s ({path}); a record the strategy does not split is the "
                "same on every rank, so these files come from different checkpoints or steps. Give "
                "the files of one checkpoint."
            )
        if name not in self.strings:
            self.strings[name] = text
            self._string_rank[name] = (rank, path)
        self._order.setdefault(name)

    def _record(self, path: Path, rank: int, name: str, full: tuple[int, ...], box: Box,
                stored: StoredTensor) -> None:
        if name in self.strings:
            raise CheckpointError(
                f"{path} (rank {rank}): {name!r} is a tensor, other ranks' files hold a string record "
                "of that name; they belong to different checkpoints"
            )
        if name in self.shapes:
            if self.shapes[name] != full:
                raise CheckpointError(
                    f"{path} (rank {rank}): parameter {name!r} is part of a tensor of shape {list(full)}, "
                    f"other ranks' files say {list(self.shapes[name])}"
                )
            if self.dtypes[name] != stored.dtype:
                raise CheckpointError(
                    f"{path} (rank {rank}): parameter {name!r} is {stored.dtype}, other ranks' files "
                    f"hold {self.dtypes[name]}"
                )
        if rank in self._held.get(name, {}):
            raise CheckpointError(f"{path}: tensor {name!r} is also in {self._held[name][rank][1].path}; "
                                  "the folder mixes files of two checkpoints")
        self.shapes[name] = full
        self.dtypes[name] = stored.dtype
        self._order.setdefault(name)
        self._held.setdefault(name, {})[rank] = (box, stored)

    # ---- planning and reading ----------------------------------------------------------------
    def names(self) -> list[str]:
        """The tensors' names (the parameters; string records are in :meth:`records`)."""
        return [n for n in self._order if n in self.shapes]

    def records(self) -> list[str]:
        """Every record's name, tensors and strings, in the order of the files."""
        return list(self._order)

    def plan(self, name: str, target: Box) -> list[tuple[int, Box]]:
        """``[(source rank, part of the full tensor to read from it)]`` covering ``target``.

        Of the ranks holding the same box, the lowest whose file was given is read (a map of some
        ranks' files may lack rank 0, which holds whole copies of what the strategy does not split).
        """
        sources = self.source_boxes(name)
        given = self._held[name]
        pieces = [(r if r in given else next((g for g in sorted(given) if sources[g] == sources[r]), r), p)
                  for r, p in overlap_plan(target, sources)]
        covered = sum(box_size(p) for _, p in pieces)
        if covered != box_size(target):
            raise CheckpointError(
                f"parameter {name!r}: the rank files cover {covered} of the {box_size(target)} "
                f"elements of part {[list(b) for b in target]}; the checkpoint is incomplete"
            )
        return pieces

    def read_boxes(self, target: Mapping[str, Box], show_progress: bool | None = None,
                   desc: str = "load") -> dict[str, np.ndarray]:
        """Read ``{name: box}``; each result holds exactly that part of the full tensor."""
        plans = {name: self.plan(name, box) for name, box in target.items()}
        for name, plan in plans.items():
            missing = [r for r, _ in plan if r not in self._held[name]]
            if missing:
                raise CheckpointError(
                    f"parameter {name!r}: reading part {[list(b) for b in target[name]]} needs the "
                    f"files of rank(s) {missing}, which were not given"
                )
        total = sum(box_size(p) * self.dtypes[n].itemsize for n, plan in plans.items() for _, p in plan)
        show = total >= AUTO_PROGRESS_BYTES if show_progress is None else show_progress
        out = {name: np.empty(box_shape(box), self.dtypes[name]) for name, box in target.items()}
        steps = [(name, r, piece) for name, plan in plans.items() for r, piece in plan]
        bar = progress(steps, desc=desc, disable=not show, total=len(steps))
        # each piece is verified as soon as it is read, while its bytes are still in the cache
        # (a verifier thread was 1.44x the unverified load on 2 cores, inline 1.26x: the GIL)
        with OpenFiles() as files:
            for name, r, piece in bar:
                src_box, stored = self._held[name][r]
                dest = out[name][relative(piece, target[name])]
                self.bytes_read += stored.read_into(_local(piece, src_box), dest,
                                                    files.fd(stored.path), self.verify)
            self._compare_scalar_copies(out, files)
        return out

    def _compare_scalar_copies(self, values: Mapping[str, np.ndarray], files: OpenFiles) -> None:
        """Every given rank's copy of each 0-d tensor in ``values`` equals the one read (bit for
        bit, so a NaN equals itself); one that differs is named with the rank read."""
        for name, value in values.items():
            if value.ndim or len(self._held[name]) < 2:
                continue
            ranks = sorted(self._held[name])
            first = self.plan(name, ())[0][0]
            for r in ranks:
                if r == first:
                    continue
                stored = self._held[name][r][1]
                copy = np.empty((), stored.dtype)
                self.bytes_read += stored.read_into((), copy, files.fd(stored.path), self.verify)
                if copy.tobytes() != value.tobytes():
                    raise CheckpointError(
                        f"record {name!r} is {value} in rank {first}'s file "
                        f"({self._held[name][first][1].path}) but {copy} in rank {r}'s ({stored.path}); "
                        "a 0-d record is the same on every rank, so these files come from different "
                        "checkpoints or steps. Give the files of one checkpoint."
                    )

    def load_rank(self, strategy: StrategyLike, rank: int, names: Sequence[str] | None = None,
                  show_progress: bool | None = None) -> dict[str, np.ndarray | str]:
        """Rank ``rank``'s records under ``strategy`` (None: whole tensors), in file order: its
        slices, and the string records as ``str``. With pipeline stages only the parameters of
        the rank's stage are read (``names`` defaults to those and every string record)."""
        strategy = as_strategy(strategy)
        n = device_num_of(strategy)
        if not 0 <= rank < n:
            raise CheckpointError(f"rank {rank} is outside the target strategy's {n} ranks")
        if names is None:
            names = [k for k in self._order if k in self.strings
                     or box_of(strategy, k, rank, self.shapes[k]) is not None]
        target = {}
        for name in names:
            if name in self.strings:
                continue
            if name not in self.shapes:
                raise CheckpointError(
                    f"parameter {name!r} is not in the checkpoint; it holds {self.records()}"
                )
            box = box_of(strategy, name, rank, self.shapes[name])
            if box is None:
                raise CheckpointError(
                    f"rank {rank} is in pipeline stage {strategy.rank_stage(rank) if strategy else 0} of "
                    f"the target strategy and holds no part of parameter {name!r}"
                    f"{stage_note(strategy, name)}"
                )
            target[name] = box
        before = self.bytes_read
        read = self.read_boxes(target, show_progress, desc=f"load rank {rank}")
        self.reads[rank] = self.bytes_read - before
        return {name: self.strings[name] if name in self.strings else read[name] for name in names}

    def read_plan(self, strategy: StrategyLike, rank: int) -> list[dict[str, Any]]:
        """What loading ``rank`` under ``strategy`` reads: one row per (parameter, source rank).

        Each row: ``param``, ``source_rank``, ``file``, ``part`` (the box of the full tensor read)
        and ``bytes``. Nothing is read.
        """
        strategy = as_strategy(strategy)
        rows = []
        for name, shape in self.shapes.items():
            target = box_of(strategy, name, rank, shape)
            if target is None:
                continue  # another stage's parameter
            for r, piece in self.plan(name, target):
                held = self._held[name].get(r)
                rows.append({"param": name, "source_rank": r,
                             "file": str(held[1].path) if held else None,
                             "part": [list(b) for b in piece],
                             "bytes": box_size(piece) * self.dtypes[name].itemsize})
        return rows

    def source_boxes(self, name: str) -> list[Box | None]:
        """The box every source rank holds of parameter ``name``, in rank order (None: a rank of
        another pipeline stage, which holds none)."""
        given = set(self.ranks)  # a given file without the parameter holds none of it
        return [self._held[name][r][0] if r in self._held[name]
                else None if r in given else box_of(self.strategy, name, r, self.shapes[name])
                for r in range(self.device_num)]

    # ---- what export needs -------------------------------------------------------------------
    def param_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (self.shapes[n], str(self.dtypes[n])) for n in self.names()}


def _local(piece: Box, held: Box) -> Box:
    return tuple((s - h, e - h) for (s, e), (h, _) in zip(piece, held))


def full_shape_of(item: ParamLayout, stored: tuple[int, ...]) -> tuple[int, ...]:
    full = [s * item.layout.parts(a) if a < item.layout.rank else s for a, s in enumerate(stored)]
    if full:
        full[0] *= opt_shard_size(item)
    return tuple(full)


def hf_shards(root: Path) -> list[Path] | None:
    """The weight files of a Hugging Face folder, or None when ``root`` is not one: the shards
    ``model.safetensors.index.json`` maps the tensors to (each checked to exist), else
    ``model.safetensors``."""
    index = root / "model.safetensors.index.json"
    if root.is_dir() and index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (a weight_map of tensor to "
                                  f"file): {e}") from None
        missing = [n for n in names if not (root / n).is_file()]
        if missing or not names:
            raise CheckpointError(f"{index} names shard(s) {missing or 'none'} that {root} does not "
                                  "hold; the download is incomplete")
        return [root / n for n in names]
    if root.is_dir() and (root / "model.safetensors").is_file() and not any(root.glob("rank_*")):
        return [root / "model.safetensors"]
    return None


def _resolve_files(files: Any) -> dict[int, Path]:
    if isinstance(files, Mapping):
        if not files:
            raise CheckpointError("no checkpoint files given (the {rank: file} map is empty)")
        return {int(r): Path(p) for r, p in files.items()}
    if isinstance(files, (str, Path)):
        root = Path(files)
        if root.is_file():
            return {0: root}
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        out: dict[int, Path] = {}
        for d in sorted(root.glob("rank_*")):
            m = re.fullmatch(r"rank_(\d+)", d.name)
            if not m or not d.is_dir():
                continue
            found = sorted(p for p in d.iterdir() if p.suffix in (SUFFIX, ".ckpt"))
            if len(found) > 1:
                raise CheckpointError(
                    f"{d} holds {len(found)} checkpoint files ({[p.name for p in found]}); keep one "
                    "file per rank folder"
                )
            if found:
                out[int(m.group(1))] = found[0]
        if not out:
            raise CheckpointError(f"{root} has no rank_{{r}}/ folders with checkpoint files")
        return out
    paths = [Path(p) for p in files]
    if not paths:
        raise CheckpointError("no checkpoint files given")
    seen: dict[Path, int] = {}
    for i, p in enumerate(paths):
        if p.resolve() in seen:
            raise CheckpointError(f"{p} is listed twice (as rank {seen[p.resolve()]} and rank {i})")
        seen[p.resolve()] = i
    return dict(enumerate(paths))
