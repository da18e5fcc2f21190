"""Distributed checkpoints: save per-rank slices, load them for another layout, transform offline.

The API follows MindSpore's (``load_distributed_checkpoint``, ``merge_sliced_parameter``,
``rank_list_for_transform``, ``transform_checkpoint_by_rank``, ``transform_checkpoints``), but a
load never merges a tensor in memory: for target rank ``t`` and each parameter,

    target box  B_t = the part of the full tensor rank t holds under the predict strategy
    source box  A_s = the part source rank s saved (from its file, or from the train strategy)
    read        A_s ∩ B_t from s's file, for one s per distinct A_s (replicas are read once)

and each intersection is read straight from its byte ranges (:mod:`dinb.checkpoint.stored`).
So loading "saved on 8 ranks by rows, served on 2 by columns" reads exactly each target slice's
bytes, and peak memory is the target slices plus one source piece.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dinb.checkpoint.boxes import (
    Box,
    box_shape,
    box_size,
    full_box,
    opt_shard_size,
    overlap_plan,
    param_box,
    relative,
)
from dinb.checkpoint.dinbfile import SUFFIX, DinbRankFile, rank_file, write_rank_file
from dinb.checkpoint.mindspore import MindSporeCheckpoint, write_ckpt
from dinb.checkpoint.stored import OpenFiles, StoredTensor
from dinb.errors import CheckpointError, DinbError, StrategyError
from dinb.layout import Layout
from dinb.progress import progress
from dinb.strategy import ParamLayout, Strategy

PathLike = str | Path
StrategyLike = Strategy | PathLike | None
AUTO_PROGRESS_BYTES = 256 * 2**20


def as_strategy(strategy: StrategyLike) -> Strategy | None:
    """A :class:`Strategy`, loading it when given a file path (JSON or MindSpore protobuf)."""
    if strategy is None or isinstance(strategy, Strategy):
        return strategy
    return Strategy.load(strategy)


def _item(strategy: Strategy | None, name: str, ndim: int) -> ParamLayout:
    """The layout record of ``name``; parameters a strategy does not list are not split."""
    if strategy is not None and name in strategy:
        return strategy.item(name)
    n = strategy.device_num if strategy is not None and len(strategy) else 1
    return ParamLayout(Layout.replicated(ndim, n))


def _device_num(strategy: Strategy | None) -> int:
    return strategy.device_num if strategy is not None and len(strategy) else 1


class DistributedCheckpoint:
    """The rank files of one checkpoint, indexed: which box of which tensor each rank holds.

    ``files`` are the rank files in rank order (dinb ``.safetensors`` or MindSpore ``.ckpt``), a
    ``{rank: file}`` map holding only some ranks, or a directory of ``rank_{r}/`` folders.
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
        by_rank = _resolve_files(files)
        self.ranks = sorted(by_rank)
        self.device_num = self._check_rank_count(by_rank, isinstance(files, Mapping))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self._held: dict[str, dict[int, tuple[Box, StoredTensor]]] = {}
        for rank in self.ranks:
            self._add_file(rank, by_rank[rank])
        self.bytes_read = 0

    # ---- indexing ----------------------------------------------------------------------------
    def _check_rank_count(self, by_rank: dict[int, Path], partial: bool) -> int:
        n = _device_num(self.strategy) if self.strategy is not None else None
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
                    want = param_box(self.strategy.item(name), rank, f.full_shape(name), name)
                    if want != box:
                        raise CheckpointError(
                            f"{path} (rank {rank}): parameter {name!r} holds the part "
                            f"{[list(b) for b in box]} but the given strategy puts "
                            f"{[list(b) for b in want]} on rank {rank}; the file was saved with "
                            "another strategy"
                        )
                self._record(path, rank, name, f.full_shape(name), box, stored)
        elif path.suffix == ".ckpt":
            ck = MindSporeCheckpoint(path, verify=self.verify)
            for name, stored in ck.tensors.items():
                item = _item(self.strategy, name, len(stored.shape))
                full = _full_shape(item, stored.shape)
                if self.strategy is not None and name in self.strategy and item.shape:
                    full = tuple(item.shape)
                try:
                    box = param_box(item, rank, full, name)
                except DinbError as e:
                    raise CheckpointError(f"{path} (rank {rank}): parameter {name!r}: {e}") from None
                if box_shape(box) != stored.shape:
                    raise CheckpointError(
                        f"{path} (rank {rank}): parameter {name!r} has shape {list(stored.shape)} but "
                        f"the strategy gives rank {rank} a slice of shape {list(box_shape(box))} of "
                        f"{list(full)}; the strategy does not belong to this checkpoint"
                    )
                self._record(path, rank, name, full, box, stored)
        else:
            raise CheckpointError(
                f"{path}: unknown checkpoint file type; dinb reads its own {SUFFIX} files and "
                "MindSpore .ckpt files"
            )

    def _record(self, path: Path, rank: int, name: str, full: tuple[int, ...], box: Box,
                stored: StoredTensor) -> None:
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
        self.shapes[name] = full
        self.dtypes[name] = stored.dtype
        self._held.setdefault(name, {})[rank] = (box, stored)

    # ---- planning and reading ----------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.shapes)

    def plan(self, name: str, target: Box) -> list[tuple[int, Box]]:
        """``[(source rank, part of the full tensor to read from it)]`` covering ``target``."""
        pieces = overlap_plan(target, self.source_boxes(name))
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
        checks: list[Future[None]] = []
        # one thread checks the tiles of a piece while the next piece is read
        with OpenFiles() as files, ThreadPoolExecutor(max_workers=1) as verifier:
            try:
                for name, r, piece in bar:
                    src_box, stored = self._held[name][r]
                    dest = out[name][relative(piece, target[name])]
                    self.bytes_read += stored.read_into(
                        _local(piece, src_box), dest, files.fd(stored.path), self.verify,
                        defer=lambda check: checks.append(verifier.submit(check)),
                    )
            except BaseException:
                for c in checks:
                    c.cancel()  # a read failed: drop the checks not started yet
                raise
            for c in checks:
                c.result()  # re-raises the first checksum error; nothing is returned unchecked
        return out

    def load_rank(self, strategy: StrategyLike, rank: int, names: Sequence[str] | None = None,
                  show_progress: bool | None = None) -> dict[str, np.ndarray]:
        """Rank ``rank``'s slices under ``strategy`` (None: whole tensors)."""
        strategy = as_strategy(strategy)
        names = list(names) if names is not None else self.names()
        n = _device_num(strategy)
        if not 0 <= rank < n:
            raise CheckpointError(f"rank {rank} is outside the target strategy's {n} ranks")
        target = {}
        for name in names:
            if name not in self.shapes:
                raise CheckpointError(
                    f"parameter {name!r} is not in the checkpoint; it holds {self.names()}"
                )
            target[name] = param_box(_item(strategy, name, len(self.shapes[name])), rank,
                                     self.shapes[name], name)
        return self.read_boxes(target, show_progress, desc=f"load rank {rank}")

    def read_plan(self, strategy: StrategyLike, rank: int) -> list[dict[str, Any]]:
        """What loading ``rank`` under ``strategy`` reads: one row per (parameter, source rank).

        Each row: ``param``, ``source_rank``, ``file``, ``part`` (the box of the full tensor read)
        and ``bytes``. Nothing is read.
        """
        strategy = as_strategy(strategy)
        rows = []
        for name, shape in self.shapes.items():
            target = param_box(_item(strategy, name, len(shape)), rank, shape, name)
            for r, piece in self.plan(name, target):
                held = self._held[name].get(r)
                rows.append({"param": name, "source_rank": r,
                             "file": str(held[1].path) if held else None,
                             "part": [list(b) for b in piece],
                             "bytes": box_size(piece) * self.dtypes[name].itemsize})
        return rows

    def source_boxes(self, name: str) -> list[Box]:
        """The box every source rank holds of parameter ``name``, in rank order."""
        return [self._held[name][r][0] if r in self._held[name]
                else _box_of(self.strategy, name, r, self.shapes[name]) for r in range(self.device_num)]

    # ---- what export needs -------------------------------------------------------------------
    def param_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (self.shapes[n], str(self.dtypes[n])) for n in self.names()}


def _box_of(strategy: Strategy | None, name: str, rank: int, shape: tuple[int, ...]) -> Box:
    return param_box(_item(strategy, name, len(shape)), rank, shape, name)


def _local(piece: Box, held: Box) -> Box:
    return tuple((s - h, e - h) for (s, e), (h, _) in zip(piece, held))


def _full_shape(item: ParamLayout, stored: tuple[int, ...]) -> tuple[int, ...]:
    full = [s * item.layout.parts(a) if a < item.layout.rank else s for a, s in enumerate(stored)]
    if full:
        full[0] *= opt_shard_size(item)
    return tuple(full)


def _resolve_files(files: Any) -> dict[int, Path]:
    if isinstance(files, Mapping):
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


# ---- the MindSpore-shaped API ------------------------------------------------------------------
def load_distributed_checkpoint(
    network_or_shapes: Any,
    checkpoint_filenames: Sequence[PathLike] | PathLike,
    predict_strategy: StrategyLike = None,
    train_strategy_filename: StrategyLike = None,
    rank: int | None = None,
    verify: bool = True,
    show_progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """One rank's parameters from a distributed checkpoint, resharded for ``predict_strategy``.

    ``network_or_shapes``: a dinb model (its parameters are loaded), a ``{name: shape}`` map, or
    None (everything in the checkpoint). ``checkpoint_filenames``: rank files in rank order, or a
    directory of ``rank_{r}/`` folders. ``predict_strategy`` None gives whole tensors (one
    device); otherwise ``rank`` (default: this process's rank in the current job) picks the slice.
    Only the bytes of that slice are read. All parameters are read and checked before anything
    is returned, so a bad file never leaves a half-loaded model.
    """
    ckpt = DistributedCheckpoint(checkpoint_filenames, train_strategy_filename, verify=verify)
    predict = as_strategy(predict_strategy)
    wanted = _wanted_shapes(network_or_shapes, ckpt)
    if predict is not None and _device_num(predict) > 1:
        for name, shape in wanted.items():
            if name in predict:
                predict[name].check_shape(shape, f"parameter {name!r} (predict strategy)")
        if rank is None:
            from dinb.ranks import current_job

            job = current_job()
            if job is None or job.process_count == 1:  # a simulated job holds every rank
                raise StrategyError(
                    f"the predict strategy spans {_device_num(predict)} ranks; pass rank= (inside a "
                    "job of several processes it defaults to this process's rank)"
                )
            rank = job.process_index
    return ckpt.load_rank(predict, rank or 0, list(wanted), show_progress)


def _wanted_shapes(network_or_shapes: Any, ckpt: DistributedCheckpoint) -> dict[str, tuple[int, ...]]:
    if network_or_shapes is None:
        return dict(ckpt.shapes)
    shapes = (network_or_shapes.param_shapes() if hasattr(network_or_shapes, "param_shapes")
              else dict(network_or_shapes))
    missing = [n for n in shapes if n not in ckpt.shapes]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks parameter(s) {missing} of the network; it holds {ckpt.names()}"
        )
    for n, s in shapes.items():
        if tuple(s) != ckpt.shapes[n]:
            raise CheckpointError(
                f"parameter {n!r}: the network expects shape {list(s)}, the checkpoint holds "
                f"{list(ckpt.shapes[n])}"
            )
    return {n: tuple(s) for n, s in shapes.items()}


def merge_sliced_parameter(
    sliced_parameters: Sequence[np.ndarray], strategy: Layout | ParamLayout | Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The full tensor from every rank's slice (rank order) under ``strategy``.

    ``strategy`` is the parameter's layout (a :class:`Layout`, :class:`ParamLayout`, or a one-entry
    ``{name: layout}`` map as MindSpore passes). None concatenates the slices along axis 0.
    Replicas must agree; a rank whose copy differs is named.
    """
    slices = [np.asarray(s) for s in sliced_parameters]
    if not slices:
        raise CheckpointError("no slices given")
    if strategy is None:
        return np.concatenate(slices, axis=0)
    if isinstance(strategy, Mapping):
        if len(strategy) != 1:
            raise StrategyError(f"give the layout of one parameter, got {list(strategy)}")
        strategy = next(iter(strategy.values()))
    item = strategy if isinstance(strategy, ParamLayout) else ParamLayout(strategy)
    n = item.layout.device_num
    if len(slices) != n:
        raise CheckpointError(f"the layout spans {n} ranks but {len(slices)} slices were given")
    full = _full_shape(item, slices[0].shape)
    out = np.empty(full, slices[0].dtype)
    first: dict[Box, int] = {}
    for r, s in enumerate(slices):
        box = param_box(item, r, full)
        if box_shape(box) != s.shape:
            raise CheckpointError(
                f"rank {r}'s slice has shape {list(s.shape)}, the layout gives it {list(box_shape(box))}"
            )
        if box in first:
            if not np.array_equal(out[relative(box, full_box(full))], s):
                raise CheckpointError(
                    f"ranks {first[box]} and {r} should hold the same copy but their values differ"
                )
            continue
        first[box] = r
        out[relative(box, full_box(full))] = s
    return out


def rank_list_for_transform(rank_id: int, src_strategy_file: StrategyLike = None,
                            dst_strategy_file: StrategyLike = None,
                            shapes: Mapping[str, Sequence[int]] | None = None) -> list[int]:
    """The source ranks whose files destination rank ``rank_id`` needs.

    Strategy files carry ``tensor_shape``; for ones that do not, give ``shapes``.
    """
    src, dst = as_strategy(src_strategy_file), as_strategy(dst_strategy_file)
    names = list(dict.fromkeys([*(src or {}), *(dst or {})]))
    needed: set[int] = set()
    for name in names:
        shape = _known_shape(name, src, dst, shapes)
        target = _box_of(dst, name, rank_id, shape)
        sources = [_box_of(src, name, r, shape) for r in range(_device_num(src))]
        needed.update(r for r, _ in overlap_plan(target, sources))
    return sorted(needed)


def _known_shape(name: str, src: Strategy | None, dst: Strategy | None,
                 shapes: Mapping[str, Sequence[int]] | None) -> tuple[int, ...]:
    if shapes and name in shapes:
        return tuple(shapes[name])
    for s in (src, dst):
        if s is not None and name in s and s.item(name).shape:
            return tuple(s.item(name).shape)
    raise StrategyError(
        f"parameter {name!r}: the strategy files record no tensor_shape; pass shapes={{name: shape}}"
    )


def transform_checkpoint_by_rank(
    rank_id: int, checkpoint_files_map: Mapping[int, PathLike], save_checkpoint_file_name: PathLike,
    src_strategy_file: StrategyLike = None, dst_strategy_file: StrategyLike = None,
    verify: bool = True,
) -> Path:
    """Write destination rank ``rank_id``'s checkpoint from the source files it needs.

    ``checkpoint_files_map`` maps source rank to file and may hold only the ranks
    :func:`rank_list_for_transform` names. The output is a MindSpore ``.ckpt`` when its name ends
    in ``.ckpt``, a dinb file otherwise.
    """
    ckpt = DistributedCheckpoint(dict(checkpoint_files_map), src_strategy_file, verify=verify)
    dst = as_strategy(dst_strategy_file)
    return _write_rank(ckpt, dst, rank_id, Path(save_checkpoint_file_name), None)


def transform_checkpoints(
    src_checkpoints_dir: PathLike, dst_checkpoints_dir: PathLike, ckpt_prefix: str = "checkpoint_",
    src_strategy_file: StrategyLike = None, dst_strategy_file: StrategyLike = None,
    output_format: str = "safetensors", verify: bool = True, show_progress: bool | None = None,
) -> list[Path]:
    """Reshard a checkpoint directory (``rank_{r}/`` folders) for ``dst_strategy_file``, offline.

    Writes ``dst/rank_{r}/{ckpt_prefix}{r}.safetensors`` (or ``.ckpt`` with
    ``output_format="ckpt"``) for every destination rank, plus ``dst/strategy.json``;
    ``dst_strategy_file`` None writes one checkpoint of whole tensors. Each destination rank reads
    only its own slices, so memory stays at one destination rank's worth.
    """
    if output_format not in ("safetensors", "ckpt"):
        raise CheckpointError(f"output_format must be 'safetensors' or 'ckpt', not {output_format!r}")
    ckpt = DistributedCheckpoint(src_checkpoints_dir, src_strategy_file, verify=verify)
    dst = as_strategy(dst_strategy_file)
    out_dir = Path(dst_checkpoints_dir)
    ext = SUFFIX if output_format == "safetensors" else ".ckpt"
    paths = []
    n = _device_num(dst)
    for rank in range(n):
        path = out_dir / f"rank_{rank}" / f"{ckpt_prefix}{rank}{ext}"
        paths.append(_write_rank(ckpt, dst, rank, path, show_progress))
    if dst is not None:
        dst.with_shapes(ckpt.shapes).save(out_dir / "strategy.json")
    return paths


def _write_rank(ckpt: DistributedCheckpoint, dst: Strategy | None, rank: int, path: Path,
                show_progress: bool | None) -> Path:
    slices = ckpt.load_rank(dst, rank, show_progress=show_progress)
    if path.suffix == ".ckpt":
        return write_ckpt(path, slices)
    records = {name: _record(dst, name, rank, ckpt.shapes[name]) for name in slices}
    return write_rank_file(path, slices, records, rank, _device_num(dst))


def _record(strategy: Strategy | None, name: str, rank: int, shape: tuple[int, ...]) -> dict[str, Any]:
    item = _item(strategy, name, len(shape))
    return {"shape": list(shape), "box": [list(b) for b in param_box(item, rank, shape, name)],
            "layout": item.layout.to_json(), "opt_weight_shard_step": item.opt_weight_shard_step,
            "opt_weight_shard_size": item.opt_weight_shard_size}


def save_checkpoint(
    params: Mapping[str, np.ndarray], strategy: StrategyLike, out_dir: PathLike, rank: int | None = None,
    prefix: str = "checkpoint_", sliced: bool = False,
) -> list[Path]:
    """Save per-rank checkpoint slices (MindSpore's ``integrated_save=False``) and the strategy.

    ``params`` are whole tensors, sliced here for ``rank`` (every rank when None), or, with
    ``sliced=True``, already ``rank``'s own slices (what a rank holds in a job). Writes
    ``out_dir/rank_{r}/{prefix}{r}.safetensors`` and ``out_dir/strategy.json``.
    """
    strat = as_strategy(strategy)
    out_dir = Path(out_dir)
    n = _device_num(strat)
    if sliced and rank is None:
        raise CheckpointError("sliced=True saves one rank's own slices; pass rank=")
    ranks = range(n) if rank is None else [rank]
    shapes: dict[str, tuple[int, ...]] = {}
    arrays = {k: np.asarray(v) for k, v in params.items()}
    for name, a in arrays.items():
        item = _item(strat, name, a.ndim)
        shapes[name] = _full_shape(item, a.shape) if sliced else tuple(a.shape)
        if item.shape and tuple(item.shape) != shapes[name]:
            raise CheckpointError(
                f"parameter {name!r}: the strategy records tensor_shape {list(item.shape)}, but the "
                f"array given {'is a slice of' if sliced else 'has shape'} {list(shapes[name])}"
            )
        item.layout.check_shape(shapes[name], f"parameter {name!r}")
    paths = []
    for r in ranks:
        if not 0 <= r < n:
            raise CheckpointError(f"rank {r} is outside the strategy's {n} ranks")
        slices, records = {}, {}
        for name, a in arrays.items():
            records[name] = _record(strat, name, r, shapes[name])
            box = tuple(tuple(b) for b in records[name]["box"])
            if sliced:
                if a.shape != box_shape(box):
                    raise CheckpointError(
                        f"parameter {name!r}: rank {r}'s slice should have shape "
                        f"{list(box_shape(box))}, got {list(a.shape)}"
                    )
                slices[name] = a
            else:
                slices[name] = a[relative(box, full_box(shapes[name]))]
        paths.append(write_rank_file(rank_file(out_dir, prefix, r), slices, records, r, n))
    if strat is not None:
        strat.with_shapes(shapes).save(out_dir / "strategy.json")
    return paths
