"""MindSpore's checkpoint functions, by their MindSpore names, over dinb's checkpoint index.

``save_checkpoint`` writes one file of whole tensors (and ``append_dict``'s values),
``save_distributed_checkpoint`` per-rank slices (MindSpore's ``integrated_save=False``),
``load_checkpoint`` reads one file, ``load_distributed_checkpoint`` gives one rank its slices under
a predict strategy,
``merge_sliced_parameter`` rebuilds a full tensor, ``rank_list_for_transform`` /
``transform_checkpoint_by_rank`` / ``transform_checkpoints`` reshard offline, and
``build_searched_strategy`` reads a strategy file. Arguments follow MindSpore's; every read goes
through :class:`dinb.checkpoint.distributed.DistributedCheckpoint`, so only the bytes a target
rank needs are read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.checkpoint.boxes import Box, box_shape, full_box, overlap_plan, param_box, relative
from dinb.checkpoint.ckpt_file import MindSporeCheckpoint, write_ckpt
from dinb.checkpoint.dinbfile import SUFFIX, DinbRankFile, rank_file, write_rank_file
from dinb.checkpoint.distributed import (
    DistributedCheckpoint,
    PathLike,
    StrategyLike,
    as_strategy,
    box_of,
    device_num_of,
    full_shape_of,
    item_of,
    stage_note,
)
from dinb.checkpoint.stored import OpenFiles
from dinb.errors import CheckpointError, StrategyError
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import ParamLayout, Strategy


def load_checkpoint(ckpt_file_name: PathLike, verify: bool = True) -> dict[str, np.ndarray | str]:
    """Everything one checkpoint file holds, ``{name: array or str}`` (MindSpore's ``load_checkpoint``).

    A MindSpore ``.ckpt`` gives its tensors and its string records (``append_dict`` entries
    saved as text); a dinb rank file gives that rank's slices as stored. Nothing is returned
    until every tensor has been read and, with ``verify``, checked.
    """
    path = Path(ckpt_file_name)
    if path.suffix == ".ckpt":
        ck = MindSporeCheckpoint(path, verify=verify)
        tensors, strings, names = ck.tensors, ck.strings, ck.names
    elif path.suffix == SUFFIX:
        f = DinbRankFile(path)
        tensors, strings = f.tensors, f.strings
        names = [*tensors, *strings]
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint file type; dinb reads MindSpore .ckpt files and its own "
            f"{SUFFIX} rank files"
        )
    out: dict[str, np.ndarray | str] = {}
    with OpenFiles() as files:
        for name in names:
            out[name] = strings[name] if name in strings else tensors[name].read(files.fd(path), verify)
    return out


def build_searched_strategy(strategy_filename: PathLike) -> Strategy:
    """Read a strategy file (MindSpore's name): JSON when ``*.json``, protobuf otherwise."""
    return Strategy.load(strategy_filename)


def load_distributed_checkpoint(
    network_or_shapes: Any,
    checkpoint_filenames: Sequence[PathLike] | PathLike,
    predict_strategy: StrategyLike = None,
    train_strategy_filename: StrategyLike = None,
    rank: int | None = None,
    verify: bool = True,
    show_progress: bool | None = None,
) -> dict[str, np.ndarray | str]:
    """One rank's parameters from a distributed checkpoint, resharded for ``predict_strategy``.

    ``network_or_shapes``: a dinb model (its parameters are loaded), a ``{name: shape}`` map, or
    None (every record of the checkpoint, in file order: tensors, 0-d values such as a step
    counter, and string records as ``str``). ``checkpoint_filenames``: rank files in rank order, or a
    directory of ``rank_{r}/`` folders. ``predict_strategy`` None gives whole tensors (one
    device); otherwise ``rank`` (default: this process's rank in the current job) picks the slice,
    and with pipeline stages only the parameters of the rank's stage are loaded. Only the bytes of
    those slices are read. All parameters are read and checked before anything
    is returned, so a bad file never leaves a half-loaded model.
    """
    ckpt = DistributedCheckpoint(checkpoint_filenames, train_strategy_filename, verify=verify)
    predict = as_strategy(predict_strategy)
    wanted = _wanted_shapes(network_or_shapes, ckpt)
    if predict is not None and device_num_of(predict) > 1:
        for name, shape in wanted.items():
            if name in predict:
                predict[name].check_shape(shape, f"parameter {name!r} (predict strategy)")
        if rank is None:
            from dinb.job.ranks import current_job

            job = current_job()
            if job is None or job.process_count == 1:  # a simulated job holds every rank
                raise StrategyError(
                    f"the predict strategy spans {device_num_of(predict)} ranks; pass rank= (inside a "
                    "job of several processes it defaults to this process's rank)"
                )
            rank = job.process_index
    rank = rank or 0
    pool = ckpt.records() if network_or_shapes is None else list(wanted)  # strings too, in file order
    # with pipeline stages a rank loads only its own stage's parameters
    names = [n for n in pool if n in ckpt.strings or box_of(predict, n, rank, ckpt.shapes[n]) is not None]
    return ckpt.load_rank(predict, rank, names, show_progress)


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
    ``{name: layout}`` map as MindSpore passes). None concatenates the slices along axis 0, except
    for 0-d values and strings, which cannot be split: every rank holds the whole value. Replicas
    must agree; a rank whose copy differs is named.
    """
    if not sliced_parameters:
        raise CheckpointError("no slices given")
    if all(isinstance(s, str) for s in sliced_parameters):
        return _one_copy(list(sliced_parameters))
    slices = [np.asarray(s) for s in sliced_parameters]
    if strategy is None:
        if slices[0].ndim == 0:
            return _one_copy(slices)
        return np.concatenate(slices, axis=0)
    if isinstance(strategy, Mapping):
        if len(strategy) != 1:
            raise StrategyError(f"give the layout of one parameter, got {list(strategy)}")
        strategy = next(iter(strategy.values()))
    item = strategy if isinstance(strategy, ParamLayout) else ParamLayout(strategy)
    n = item.layout.device_num
    if len(slices) != n:
        raise CheckpointError(f"the layout spans {n} ranks but {len(slices)} slices were given")
    full = full_shape_of(item, slices[0].shape)
    out = np.empty(full, slices[0].dtype)
    first: dict[Box, int] = {}
    for r, s in enumerate(slices):
        box = param_box(item, r, full)
        if box_shape(box) != s.shape:
            raise CheckpointError(
                f"rank {r}'s slice has shape {list(s.shape)}, the layout gives it {list(box_shape(box))}"
            )
        if box in first:
            if out[relative(box, full_box(full))].tobytes() != s.tobytes():  # bit for bit: NaN too
                raise CheckpointError(
                    f"ranks {first[box]} and {r} should hold the same copy but their values differ"
                )
            continue
        first[box] = r
        out[relative(box, full_box(full))] = s
    return out


def _one_copy(copies: list[Any]) -> Any:
    """The value every rank holds whole (a 0-d tensor or a string); copies that differ are named."""
    first = copies[0]
    for r, c in enumerate(copies[1:], 1):
        same = (c == first) if isinstance(c, str) else (
            isinstance(first, np.ndarray) and c.shape == first.shape and c.tobytes() == first.tobytes())
        if not same:
            raise CheckpointError(
                f"ranks 0 and {r} should hold the same whole value but differ ({first!r} and {c!r})"
            )
    return first


def rank_list_for_transform(rank_id: int, src_strategy_file: StrategyLike = None,
                            dst_strategy_file: StrategyLike = None,
                            shapes: Mapping[str, Sequence[int]] | None = None) -> list[int]:
    """The source ranks whose files destination rank ``rank_id`` needs (at least one: every file
    holds the records that no strategy splits).

    Strategy files carry ``tensor_shape``; for ones that do not, give ``shapes``.
    """
    src, dst = as_strategy(src_strategy_file), as_strategy(dst_strategy_file)
    names = list(dict.fromkeys([*(src or {}), *(dst or {})]))
    needed: set[int] = set()
    for name in names:
        shape = _known_shape(name, src, dst, shapes)
        target = box_of(dst, name, rank_id, shape)
        if target is None:
            continue  # a parameter of another pipeline stage
        sources = [box_of(src, name, r, shape) for r in range(device_num_of(src))]
        needed.update(r for r, _ in overlap_plan(target, sources))
    # what no strategy splits (0-d values, strings) is whole in every file: one file at least
    return sorted(needed) or [0]


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
    n = device_num_of(dst)
    for rank in range(n):
        path = out_dir / f"rank_{rank}" / f"{ckpt_prefix}{rank}{ext}"
        paths.append(_write_rank(ckpt, dst, rank, path, show_progress))
    if dst is not None:
        dst.with_shapes(ckpt.shapes).save(out_dir / "strategy.json")
    return paths


def _write_rank(ckpt: DistributedCheckpoint, dst: Strategy | None, rank: int, path: Path,
                show_progress: bool | None) -> Path:
    values = ckpt.load_rank(dst, rank, show_progress=show_progress)
    if path.suffix == ".ckpt":
        return write_ckpt(path, values)
    slices = {k: v for k, v in values.items() if not isinstance(v, str)}
    strings = {k: v for k, v in values.items() if isinstance(v, str)}
    records = {name: _record(dst, name, rank, ckpt.shapes[name]) for name in slices}
    return write_rank_file(path, slices, records, rank, device_num_of(dst), strings)


def _record(strategy: Strategy | None, name: str, rank: int, shape: tuple[int, ...]) -> dict[str, Any]:
    item = item_of(strategy, name, len(shape))
    box = box_of(strategy, name, rank, shape)
    assert box is not None
    return {"shape": list(shape), "box": [list(b) for b in box],
            "layout": item.layout.to_json(), "opt_weight_shard_step": item.opt_weight_shard_step,
            "opt_weight_shard_size": item.opt_weight_shard_size}


def save_distributed_checkpoint(
    params: Mapping[str, Any], strategy: StrategyLike, out_dir: PathLike, rank: int | None = None,
    prefix: str = "checkpoint_", sliced: bool = False,
) -> list[Path]:
    """Save per-rank checkpoint slices (MindSpore's ``integrated_save=False``) and the strategy.

    ``params`` are whole tensors, sliced here for ``rank`` (every rank when None), or, with
    ``sliced=True``, already ``rank``'s own slices (what a rank holds in a job). Parameters the
    strategy does not name, 0-d values (a step, a learning rate) and ``str`` values are whole on
    every rank. Writes ``out_dir/rank_{r}/{prefix}{r}.safetensors`` and ``out_dir/strategy.json``.
    """
    strat = as_strategy(strategy)
    out_dir = Path(out_dir)
    n = device_num_of(strat)
    if sliced and rank is None:
        raise CheckpointError("sliced=True saves one rank's own slices; pass rank=")
    ranks = range(n) if rank is None else [rank]
    shapes: dict[str, tuple[int, ...]] = {}
    strings = {k: v for k, v in params.items() if isinstance(v, str)}
    arrays = {k: np.asarray(v) for k, v in params.items() if not isinstance(v, str)}
    for name, a in arrays.items():
        item = item_of(strat, name, a.ndim)
        shapes[name] = full_shape_of(item, a.shape) if sliced else tuple(a.shape)
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
            if box_of(strat, name, r, shapes[name]) is None:  # another pipeline stage's parameter
                if sliced:
                    raise CheckpointError(
                        f"parameter {name!r} belongs to another pipeline stage than rank {r}"
                        f"{stage_note(strat, name)}; save each rank's own stage's slices"
                    )
                continue
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
        paths.append(write_rank_file(rank_file(out_dir, prefix, r), slices, records, r, n, strings))
    if strat is not None:
        strat.with_shapes(shapes).save(out_dir / "strategy.json")
    return paths


def save_checkpoint(
    save_obj: Mapping[str, Any] | Sequence[Mapping[str, Any]], ckpt_file_name: PathLike,
    integrated_save: bool = True, async_save: bool = False, append_dict: Mapping[str, Any] | None = None,
    enc_key: bytes | None = None, enc_mode: str = "AES-GCM",
    choice_func: Callable[[str], bool] | None = None, crc_check: bool = False, format: str = "ckpt",
) -> None:
    """Save whole tensors to one checkpoint file, as MindSpore's ``save_checkpoint`` does.

    ``save_obj``: ``{name: array}`` or MindSpore's list of ``{"name": ..., "data": ...}``.
    ``append_dict`` values are saved after them the way MindSpore saves them: ``int`` as a 0-d
    int64 tensor, ``float`` as 0-d float32, ``bool`` as 0-d bool, ``str`` as a string record,
    arrays as they are. ``choice_func(name)`` keeps only the parameters it accepts (not the
    appended values). ``format="ckpt"`` writes MindSpore's ``.ckpt`` (with its trailing CRC when
    ``crc_check``), record for record the bytes MindSpore writes; ``"safetensors"`` writes a
    dinb checkpoint file of one rank (strings in its metadata). The suffix is added to
    ``ckpt_file_name`` when missing, as MindSpore does. The file is complete when the call
    returns (``async_save`` is accepted and changes nothing); ``integrated_save`` concerns
    MindSpore's parallel cells, whose parameters are slices: ``save_obj`` here holds whole
    tensors already (per-rank slices: :func:`save_distributed_checkpoint`). Encryption
    (``enc_key``) is not supported.
    """
    if format not in ("ckpt", "safetensors"):
        raise CheckpointError(f"format must be 'ckpt' or 'safetensors', not {format!r}")
    if enc_key is not None:
        raise CheckpointError("dinb does not write encrypted checkpoints (enc_key); save without it")
    path = Path(ckpt_file_name)
    if not path.name.endswith(format):
        path = path.with_name(f"{path.name}.{format}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; ckpt_file_name must name a file")
    values: dict[str, np.ndarray | str] = {}
    for name, data in _save_items(save_obj):
        if choice_func is None or choice_func(name):
            values[name] = data if isinstance(data, str) else np.asarray(data)
    for name, value in (append_dict or {}).items():
        if not isinstance(name, str):
            raise CheckpointError(f"append_dict keys must be str, found {name!r}")
        values[name] = _appended(name, value)
    if format == "ckpt":
        write_ckpt(path, values, crc_check=crc_check)
        return
    slices = {k: v for k, v in values.items() if not isinstance(v, str)}
    records = {k: _record(None, k, 0, v.shape) for k, v in slices.items()}
    write_rank_file(path, slices, records, 0, 1, {k: v for k, v in values.items() if isinstance(v, str)})


def _save_items(save_obj: Any) -> list[tuple[str, Any]]:
    if isinstance(save_obj, Mapping):
        return [(str(k), v) for k, v in save_obj.items()]
    if isinstance(save_obj, Sequence) and not isinstance(save_obj, str):
        items = []
        for i, entry in enumerate(save_obj):
            if not isinstance(entry, Mapping) or "name" not in entry or "data" not in entry:
                raise CheckpointError(
                    f"save_obj[{i}] must be a dict with 'name' and 'data' (MindSpore's list form), "
                    f"found {type(entry).__name__}"
                )
            items.append((str(entry["name"]), entry["data"]))
        return items
    raise CheckpointError(
        f"save_obj must be a {{name: array}} dict or a list of {{'name', 'data'}} dicts, not "
        f"{type(save_obj).__name__}"
    )


def _appended(name: str, value: Any) -> np.ndarray | str:
    """An ``append_dict`` value as MindSpore stores it (``Tensor(value)``'s dtype for Python scalars)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return np.array(value, np.bool_)
    if isinstance(value, int):
        return np.array(value, np.int64)
    if isinstance(value, float):
        return np.array(value, np.float32)
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    raise CheckpointError(
        f"append_dict[{name!r}] is a {type(value).__name__}; MindSpore takes int, float, bool, str or "
        "a tensor"
    )
