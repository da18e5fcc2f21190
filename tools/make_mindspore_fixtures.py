"""Regenerate the MindSpore-made checkpoint fixtures under ``tests/fixtures/mindspore``.

Needs MindSpore (CPU), which dinb itself never imports::

    python3.11 -m venv /tmp/msvenv && /tmp/msvenv/bin/pip install mindspore==2.10.0
    /tmp/msvenv/bin/python tools/make_mindspore_fixtures.py

Everything in the fixture directory is written by MindSpore's own code: the full checkpoint by
``save_checkpoint`` with 0-d values from ``append_dict`` (and ``with_strings.ckpt`` and
``train4_strings/``, with string records from ``append_dict``), the
strategy files by MindSpore's ``node_strategy_pb2`` protobuf classes, the
per-rank slices and every resharded result by ``transform_checkpoints`` /
``transform_checkpoint_by_rank``, the merged weights by ``merge_sliced_parameter``, the rank lists by
``rank_list_for_transform``. ``expected.json`` records the answers the tests compare dinb against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mindspore"

# name -> (shape, MindSpore dtype)
PARAMS = {
    "dense.weight": ((16, 8), ms.float32),
    "dense.bias": ((16,), ms.float32),
    "embed.table": ((8, 12), ms.float16),
    "proj.weight": ((8, 4, 6), ms.float32),
    "head.weight": ((12, 8), ms.bfloat16),
    "global_step": ((1,), ms.int32),
}

# name -> (dev_matrix, tensor_map, opt_weight_shard_step, opt_weight_shard_size); global_step absent
STRATEGIES = {
    # 4 training ranks, one of them with an optimizer shard (ZeRO-style) on top of model parallelism
    "train4": {
        "dense.weight": ([2, 2], [1, 0], 0, 0),
        "dense.bias": ([2, 2], [1], 0, 0),
        "embed.table": ([2, 2], [-1, 0], 2, 2),
        "proj.weight": ([2, 2], [[1, 0], -1, -1], 0, 0),
        "head.weight": ([4], [-1, -1], 1, 4),
    },
    # 2 predict ranks: rows become columns, nested becomes flat
    "predict2": {
        "dense.weight": ([2], [-1, 0], 0, 0),
        "dense.bias": ([2], [-1], 0, 0),
        "embed.table": ([2], [0, -1], 0, 0),
        "proj.weight": ([2], [-1, -1, 0], 0, 0),
        "head.weight": ([2], [0, -1], 0, 0),
    },
    # 8 predict ranks
    "predict8": {
        "dense.weight": ([2, 4], [1, 0], 0, 0),
        "dense.bias": ([2, 4], [1], 0, 0),
        "embed.table": ([2, 4], [0, -1], 0, 0),
        "proj.weight": ([2, 4], [[1, 0], -1, -1], 0, 0),
        "head.weight": ([2, 4], [-1, 0], 0, 0),
    },
}


def full_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, (shape, _) in PARAMS.items():
        if name == "global_step":
            out[name] = np.array([1234], np.int32)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32).round(3)
    return out


def write_strategy(name: str) -> Path:
    m = ParallelStrategyMap()
    m.current_stage = 0
    for param, (dev, tmap, step, size) in STRATEGIES[name].items():
        item = m.parallel_layout_item.add()
        item.param_name = param
        lay = item.parallel_layouts
        lay.dev_matrix.add().dim.extend(dev)
        if any(isinstance(e, list) for e in tmap):  # MindSpore stores nested maps one entry each
            for e in tmap:
                lay.tensor_map.add().dim.extend(e if isinstance(e, list) else [e])
        else:
            lay.tensor_map.add().dim.extend(tmap)
        lay.param_split_shape.add()
        lay.indices_offset.add()
        lay.field = 0
        lay.opt_weight_shard_step = step
        lay.opt_weight_shard_size = size
    path = OUT / f"strategy_{name}.ckpt"
    path.write_bytes(m.SerializeToString())
    return path


def ckpt_arrays(path: Path) -> dict[str, np.ndarray]:
    return {k: _np(v) for k, v in ms.load_checkpoint(str(path)).items()}


def _np(p) -> np.ndarray:
    if p.data.dtype == ms.bfloat16:
        return p.data.float().asnumpy()
    return p.data.asnumpy()


# values saved beside the weights by save_checkpoint(..., append_dict=...): strings and scalars
APPENDED = {"note": "hi", "label": "distribución 分布式", "epoch_num": 3, "lr": 0.01}
# the scalars the full checkpoint carries (MindSpore's transforms carry them to every rank, but
# fail on string records, so the strings of a distributed checkpoint are added rank by rank)
APPENDED_SCALARS = {"step_num": 7, "epoch_num": 3, "lr": 0.01, "has_overflow": False}
APPENDED_STRINGS = {"note": "hi", "label": "distribución 分布式"}


def write_strings_fixture(full: dict[str, np.ndarray]) -> dict:
    """A checkpoint with string records; returns what MindSpore's load_checkpoint gives for it."""
    path = OUT / "with_strings.ckpt"
    ms.save_checkpoint(
        [{"name": "dense.weight", "data": ms.Tensor(full["dense.weight"])},
         {"name": "step", "data": ms.Tensor(np.array(7, np.int32))}],
        str(path), append_dict=APPENDED,
    )
    loaded = ms.load_checkpoint(str(path))
    return described(loaded)


def described(values: dict) -> dict:
    """What MindSpore's load_checkpoint gave, as JSON: strings as they are, tensors described."""
    return {n: v if isinstance(v, str) else {"dtype": str(v.dtype), "shape": list(v.shape),
                                             "values": _np(v).reshape(-1).tolist()}
            for n, v in values.items()}


def write_train4_with_strings() -> None:
    """train4's rank files saved again by MindSpore with string records appended."""
    for r in range(4):
        src = OUT / "train4" / f"rank_{r}" / f"ckpt_{r}.ckpt"
        dst = OUT / "train4_strings" / f"rank_{r}" / f"ckpt_{r}.ckpt"
        dst.parent.mkdir(parents=True)
        loaded = ms.load_checkpoint(str(src))
        ms.save_checkpoint([{"name": n, "data": p} for n, p in loaded.items()], str(dst),
                           append_dict=APPENDED_STRINGS)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    full = full_params()
    (OUT / "full" / "rank_0").mkdir(parents=True)
    ms.save_checkpoint(
        [{"name": n, "data": ms.Tensor(a, PARAMS[n][1])} for n, a in full.items()],
        str(OUT / "full" / "rank_0" / "full.ckpt"), append_dict=APPENDED_SCALARS,
    )
    ms.save_checkpoint(
        [{"name": n, "data": ms.Tensor(a, PARAMS[n][1])} for n, a in full.items()],
        str(OUT / "full_crc.ckpt"), append_dict=APPENDED_SCALARS,
        crc_check=True,
    )
    strategies = {name: str(write_strategy(name)) for name in STRATEGIES}

    # MindSpore slices the full model for 4 training ranks, then reshards those slices.
    ms.transform_checkpoints(str(OUT / "full"), str(OUT / "train4"), "ckpt_", None, strategies["train4"])
    for dst in ("predict2", "predict8"):
        ms.transform_checkpoints(
            str(OUT / "train4"), str(OUT / dst), "ckpt_", strategies["train4"], strategies[dst]
        )
    ms.transform_checkpoints(str(OUT / "train4"), str(OUT / "merged"), "ckpt_", strategies["train4"], None)

    expected: dict = {"rank_list_for_transform": {}, "merge_sliced_parameter": {}}
    for dst, n in (("predict2", 2), ("predict8", 8)):
        expected["rank_list_for_transform"][dst] = [
            sorted(int(r) for r in ms.rank_list_for_transform(i, strategies["train4"], strategies[dst]))
            for i in range(n)
        ]
    # merge_sliced_parameter on a parameter without optimizer shard (MindSpore's API takes the layout)
    train = [ckpt_arrays(OUT / "train4" / f"rank_{r}" / f"ckpt_{r}.ckpt") for r in range(4)]
    layouts = ms.build_searched_strategy(strategies["train4"])
    for name in ("dense.weight", "proj.weight"):
        sliced = [ms.Parameter(ms.Tensor(t[name]), name) for t in train]
        merged = ms.merge_sliced_parameter(sliced, {name: layouts[name]})
        expected["merge_sliced_parameter"][name] = bool(np.array_equal(merged.data.asnumpy(), full[name]))
    # one rank by transform_checkpoint_by_rank, from only the files rank_list_for_transform names
    needed = ms.rank_list_for_transform(1, strategies["train4"], strategies["predict2"])
    files = {r: str(OUT / "train4" / f"rank_{r}" / f"ckpt_{r}.ckpt") for r in needed}
    (OUT / "by_rank").mkdir()
    ms.transform_checkpoint_by_rank(
        1, files, str(OUT / "by_rank" / "predict2_rank1.ckpt"), strategies["train4"], strategies["predict2"]
    )
    expected["dtypes"] = {n: str(PARAMS[n][1]) for n in PARAMS}
    expected["load_checkpoint"] = {"with_strings.ckpt": write_strings_fixture(full)}
    write_train4_with_strings()
    appended = ms.load_checkpoint(str(OUT / "train4_strings" / "rank_2" / "ckpt_2.ckpt"))
    expected["appended"] = described({n: appended[n] for n in [*APPENDED_SCALARS, *APPENDED_STRINGS]})
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    np.savez(OUT / "full_params.npz", **full)
    print(json.dumps(expected, indent=1))
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(p.relative_to(OUT), p.stat().st_size)


if __name__ == "__main__":
    main()
