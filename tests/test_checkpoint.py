"""Distributed checkpoints: resharding against MindSpore-made fixtures, N->M, integrity errors."""

import filecmp
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated

from dinb import Context, Layout, Model, ModelType, ParamLayout, Strategy, export_distributed
from dinb.checkpoint import (
    DistributedCheckpoint,
    MindSporeCheckpoint,
    build_searched_strategy,
    load_checkpoint,
    load_distributed_checkpoint,
    merge_sliced_parameter,
    rank_list_for_transform,
    save_checkpoint,
    save_distributed_checkpoint,
    transform_checkpoint_by_rank,
    transform_checkpoints,
    write_ckpt,
)
from dinb.checkpoint.boxes import param_box
from dinb.errors import CheckpointError, LayoutError, StrategyError
from dinb.models import MegatronMLP, mlp_reference

MS = Path(__file__).parent / "fixtures" / "mindspore"
TRAIN = MS / "strategy_train4.ckpt"


def ms_tensors(path):
    ck = MindSporeCheckpoint(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {k: t.read(fd) for k, t in ck.tensors.items()}
    finally:
        os.close(fd)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---- MindSpore-made fixtures ---------------------------------------------------------------------
@pytest.mark.parametrize("dst,n", [("predict2", 2), ("predict8", 8)])
def test_reshards_mindspore_checkpoints_exactly_as_mindspore(dst, n):
    for rank in range(n):
        got = load_distributed_checkpoint(None, MS / "train4", MS / f"strategy_{dst}.ckpt", TRAIN, rank=rank)
        want = ms_tensors(MS / dst / f"rank_{rank}" / f"ckpt_{rank}.ckpt")
        assert sorted(got) == sorted(want)
        for name in want:
            assert same(got[name], want[name]), (dst, rank, name)


def test_merges_to_one_device_as_mindspore_and_to_the_original():
    got = load_distributed_checkpoint(None, MS / "train4", None, TRAIN)
    want = ms_tensors(MS / "merged" / "rank_0" / "ckpt_0.ckpt")
    full = np.load(MS / "full_params.npz")
    assert list(got) == list(want)  # the appended scalars too, in MindSpore's order
    for name in want:
        assert same(got[name], want[name]), name
        if name in full:
            np.testing.assert_allclose(got[name].astype(np.float32), full[name], atol=2e-2)


def test_writes_mindspore_files_byte_for_byte(tmp_path):
    paths = transform_checkpoints(MS / "train4", tmp_path / "p2", "ckpt_", TRAIN,
                                  MS / "strategy_predict2.ckpt", output_format="ckpt")
    for p in paths:
        assert filecmp.cmp(p, MS / "predict2" / p.parent.name / p.name, shallow=False)
    whole = load_distributed_checkpoint(None, [MS / "full" / "rank_0" / "full.ckpt"])
    write_ckpt(tmp_path / "crc.ckpt", whole, crc_check=True)
    assert filecmp.cmp(tmp_path / "crc.ckpt", MS / "full_crc.ckpt", shallow=False)
    strategy = build_searched_strategy(str(TRAIN))
    strategy.save(tmp_path / "s.ckpt")
    assert filecmp.cmp(tmp_path / "s.ckpt", TRAIN, shallow=False)


def test_string_records_load_as_mindspore_loads_them(tmp_path):
    """save_distributed_checkpoint(..., append_dict={"note": "hi"}) writes "str" records: they load as str."""
    want = json.loads((MS / "expected.json").read_text())["load_checkpoint"]["with_strings.ckpt"]
    got = load_checkpoint(MS / "with_strings.ckpt")
    assert list(got) == list(want)
    for name, w in want.items():
        if isinstance(w, str):
            assert got[name] == w, name
        else:
            assert str(got[name].dtype) == w["dtype"].lower() and list(got[name].shape) == w["shape"], name
            np.testing.assert_array_equal(got[name].reshape(-1), np.array(w["values"], got[name].dtype))
    assert got["note"] == "hi" and got["label"] == "distribución 分布式" and got["step"].shape == ()
    write_ckpt(tmp_path / "again.ckpt", got)  # strings and 0-d tensors are written as MindSpore does
    assert filecmp.cmp(tmp_path / "again.ckpt", MS / "with_strings.ckpt", shallow=False)
    ck = DistributedCheckpoint([MS / "with_strings.ckpt"])  # strings are not parameters
    assert ck.names() == ["dense.weight", "step", "epoch_num", "lr"]
    assert ck.records() == list(want) and ck.strings == {"note": "hi", "label": "distribución 分布式"}


# ---- every record survives: 0-d values and strings (MindSpore's append_dict) --------------------------
APPENDED = json.loads((MS / "expected.json").read_text())["appended"]
SCALARS = [n for n, v in APPENDED.items() if not isinstance(v, str)]


def assert_appended(got, names=tuple(APPENDED), where=""):
    """``got`` holds ``names`` with the values MindSpore wrote (dtype, 0-d shape and value)."""
    for name in names:
        want = APPENDED[name]
        assert name in got, (where, name, sorted(got))
        if isinstance(want, str):
            assert got[name] == want, (where, name)
            continue
        value = got[name]
        assert str(value.dtype) == want["dtype"].lower() and list(value.shape) == want["shape"], (where, name)
        assert value.reshape(-1).tolist() == np.array(want["values"], value.dtype).tolist(), (where, name)


def test_every_loader_keeps_the_values_mindspore_appended(tmp_path):
    """step/epoch/lr/overflow (0-d) and note/label (str), written by MindSpore, through every loader."""
    one = MS / "full" / "rank_0" / "full.ckpt"
    assert_appended(load_checkpoint(one), SCALARS, "load_checkpoint")
    assert_appended(load_distributed_checkpoint(None, [one], None), SCALARS, "one-rank source")
    strings = MS / "train4_strings"
    for r in range(4):
        assert_appended(load_checkpoint(strings / f"rank_{r}" / f"ckpt_{r}.ckpt"), where=f"rank file {r}")
    for r in range(2):
        got = load_distributed_checkpoint(None, strings, MS / "strategy_predict2.ckpt", TRAIN, rank=r)
        assert_appended(got, where=f"predict2 rank {r}")
        assert_appended(DistributedCheckpoint(strings, TRAIN).load_rank(MS / "strategy_predict2.ckpt", r))
    assert_appended(load_distributed_checkpoint(None, strings, None, TRAIN), where="merged")
    # the network's parameters only, when a network (or its shapes) is given
    assert sorted(load_distributed_checkpoint({"dense.bias": (16,)}, strings, None, TRAIN)) == ["dense.bias"]
    for fmt in ("safetensors", "ckpt"):
        paths = transform_checkpoints(strings, tmp_path / fmt, "c_", TRAIN, MS / "strategy_predict8.ckpt",
                                      output_format=fmt)
        for p in paths:
            assert_appended(load_checkpoint(p), where=str(p))
        assert_appended(load_distributed_checkpoint(None, tmp_path / fmt, None,
                                                    MS / "strategy_predict8.ckpt" if fmt == "ckpt" else None))
    needed = rank_list_for_transform(1, TRAIN, MS / "strategy_predict2.ckpt",
                                     shapes=DistributedCheckpoint(strings, TRAIN).shapes)
    for suffix in (".ckpt", ".safetensors"):
        out = transform_checkpoint_by_rank(
            1, {r: strings / f"rank_{r}" / f"ckpt_{r}.ckpt" for r in needed}, tmp_path / f"r1{suffix}",
            TRAIN, MS / "strategy_predict2.ckpt")
        assert_appended(load_checkpoint(out), where=str(out))
    # a map of some ranks' files without rank 0: the whole values come from a given rank
    rows = Strategy({"w": Layout([4], [0])})
    save_distributed_checkpoint({"w": np.arange(8.0)} | load_checkpoint(strings / "rank_0" / "ckpt_0.ckpt"),
                                rows, tmp_path / "rows")
    assert rank_list_for_transform(3, rows, rows, shapes={"w": (8,)}) == [3]
    out = transform_checkpoint_by_rank(3, {3: tmp_path / "rows" / "rank_3" / "checkpoint_3.safetensors"},
                                       tmp_path / "r3.ckpt", rows, rows)
    assert_appended(load_checkpoint(out))
    copies = [load_checkpoint(strings / f"rank_{r}" / f"ckpt_{r}.ckpt") for r in range(4)]
    for name in APPENDED:
        assert_appended({name: merge_sliced_parameter([c[name] for c in copies])}, [name])
    # dinb's own rank files carry them too
    saved = save_distributed_checkpoint(copies[0] | {"dense.weight": np.ones((16, 8), np.float32)},
                                        Strategy({"dense.weight": Layout([2], [0, -1])}), tmp_path / "own")
    for p in saved:
        assert_appended(load_checkpoint(p), where=str(p))
    assert_appended(load_distributed_checkpoint(None, tmp_path / "own"))


def test_save_checkpoint_writes_what_mindspore_writes(tmp_path):
    """MindSpore's signature and bytes: the list form, append_dict's conversions, the CRC."""
    dense = load_checkpoint(MS / "with_strings.ckpt")["dense.weight"]
    appended = {"note": "hi", "label": "distribución 分布式", "epoch_num": 3, "lr": 0.01}
    save_obj = [{"name": "dense.weight", "data": dense}, {"name": "step", "data": np.array(7, np.int32)}]
    assert save_checkpoint(save_obj, str(tmp_path / "strings"), append_dict=appended) is None
    assert filecmp.cmp(tmp_path / "strings.ckpt", MS / "with_strings.ckpt", shallow=False)
    whole = load_checkpoint(MS / "full" / "rank_0" / "full.ckpt")
    params = {n: v for n, v in whole.items() if n not in APPENDED}
    scalars = {"step_num": 7, "epoch_num": 3, "lr": 0.01, "has_overflow": False}
    save_checkpoint(params, tmp_path / "crc.ckpt", append_dict=scalars, crc_check=True)
    assert filecmp.cmp(tmp_path / "crc.ckpt", MS / "full_crc.ckpt", shallow=False)
    save_checkpoint(params, tmp_path / "dense", choice_func=lambda n: n.startswith("dense."))
    assert list(load_checkpoint(tmp_path / "dense.ckpt")) == ["dense.weight", "dense.bias"]
    save_checkpoint(params, tmp_path / "one", append_dict=scalars | {"note": "hi"}, format="safetensors")
    got = load_checkpoint(tmp_path / "one.safetensors")
    assert_appended(got, [*SCALARS, "note"])
    assert all(same(got[n], params[n]) for n in params)
    with pytest.raises(CheckpointError, match=r"append_dict\['x'\] is a list"):
        save_checkpoint(params, tmp_path / "bad", append_dict={"x": [1]})
    with pytest.raises(CheckpointError, match=r"save_obj\[0\] must be a dict with 'name' and 'data'"):
        save_checkpoint([dense], tmp_path / "bad")
    with pytest.raises(CheckpointError, match="encrypted"):
        save_checkpoint(params, tmp_path / "bad", enc_key=b"0" * 16)


def test_rank_files_whose_whole_values_differ_are_named(tmp_path):
    """A step or a note that differs between rank files: files of different checkpoints or steps."""
    w = np.arange(8, dtype=np.float32)
    strategy = Strategy({"w": Layout([2], [0])})
    save_distributed_checkpoint({"w": w, "step": np.array(7), "note": "hi"}, strategy, tmp_path / "a")
    save_distributed_checkpoint({"w": w, "step": np.array(8), "note": "hi"}, strategy, tmp_path / "b")
    save_distributed_checkpoint({"w": w, "step": np.array(7), "note": "ho"}, strategy, tmp_path / "c")
    mixed = [tmp_path / "a" / "rank_0" / "checkpoint_0.safetensors",
             tmp_path / "b" / "rank_1" / "checkpoint_1.safetensors"]
    with pytest.raises(CheckpointError, match=r"record 'step' is 7 in rank 0's file .* but 8 in rank 1's"):
        load_distributed_checkpoint(None, mixed, strategy, rank=0)
    with pytest.raises(CheckpointError, match=r"string record 'note' is 'hi' in rank 0's file .* but 'ho'"):
        DistributedCheckpoint([mixed[0], tmp_path / "c" / "rank_1" / "checkpoint_1.safetensors"])
    with pytest.raises(CheckpointError, match="ranks 0 and 1 should hold the same whole value"):
        merge_sliced_parameter([np.array(7), np.array(8)])
    # MindSpore files: the same rule
    for r, step in enumerate((7, 9)):
        write_ckpt(tmp_path / "ms" / f"rank_{r}" / f"ckpt_{r}.ckpt",
                   {"w": w[4 * r : 4 * r + 4], "step": np.array(step)})
    with pytest.raises(CheckpointError, match=r"record 'step' is 7 in rank 0's file .* but 9 in rank 1's"):
        load_distributed_checkpoint(None, tmp_path / "ms", None, strategy)


def test_reads_mindspore_strategy_fields():
    s = build_searched_strategy(str(TRAIN))
    assert s["proj.weight"] == Layout([2, 2], [(1, 0), -1, -1])
    rec = s.item("embed.table")
    assert (rec.opt_weight_shard_step, rec.opt_weight_shard_size) == (2, 2)
    # optimizer shard: rows split again over the replica dimension, ranks `step` apart
    assert [param_box(rec, r, (8, 12)) for r in range(4)] == [
        ((0, 4), (0, 6)), ((0, 4), (6, 12)), ((4, 8), (0, 6)), ((4, 8), (6, 12))]
    head = s.item("head.weight")
    assert [param_box(head, r, (12, 8))[0] for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_rank_lists_and_transform_by_rank_match_mindspore(tmp_path):
    expected = json.loads((MS / "expected.json").read_text())
    shapes = DistributedCheckpoint(MS / "train4", TRAIN).shapes
    for dst, lists in expected["rank_list_for_transform"].items():
        got = [rank_list_for_transform(r, TRAIN, MS / f"strategy_{dst}.ckpt", shapes=shapes)
               for r in range(len(lists))]
        assert got == lists
    needed = rank_list_for_transform(1, TRAIN, MS / "strategy_predict2.ckpt", shapes=shapes)
    files = {r: MS / "train4" / f"rank_{r}" / f"ckpt_{r}.ckpt" for r in needed}
    out = transform_checkpoint_by_rank(1, files, tmp_path / "r1.ckpt", TRAIN, MS / "strategy_predict2.ckpt")
    assert filecmp.cmp(out, MS / "by_rank" / "predict2_rank1.ckpt", shallow=False)


def test_merge_sliced_parameter():
    s = build_searched_strategy(str(TRAIN))
    full = np.load(MS / "full_params.npz")
    for name in ("dense.weight", "proj.weight", "embed.table"):
        slices = [ms_tensors(MS / "train4" / f"rank_{r}" / f"ckpt_{r}.ckpt")[name] for r in range(4)]
        merged = merge_sliced_parameter(slices, {name: s.item(name)})
        np.testing.assert_allclose(merged.astype(np.float32), full[name], atol=2e-3)
    a = np.arange(8.0).reshape(4, 2)
    np.testing.assert_array_equal(merge_sliced_parameter([a[:2], a[2:]]), a)
    bad = [a, a + 1]  # replicas that differ
    with pytest.raises(CheckpointError, match="ranks 0 and 1"):
        merge_sliced_parameter(bad, Layout([2], [-1, -1]))


# ---- dinb files: N -> M ---------------------------------------------------------------------------
def strategies():
    """(name, shape, source layout record, target layout record) cases."""
    return [
        ("8->2 rows->cols", (64, 32), ParamLayout(Layout([8], [0, -1])), ParamLayout(Layout([2], [-1, 0]))),
        ("2->8", (64, 32), ParamLayout(Layout([2], [-1, 0])), ParamLayout(Layout([4, 2], [1, 0]))),
        ("4->1", (64, 32), ParamLayout(Layout([2, 2], [0, 1])), None),
        ("nested", (64, 8, 4), ParamLayout(Layout([2, 2], [(1, 0), -1, -1])),
         ParamLayout(Layout([2, 2], [-1, 0, 1]))),
        ("opt shard", (64, 32), ParamLayout(Layout([4, 2], [-1, 0]), opt_weight_shard_step=2,
                                            opt_weight_shard_size=4), ParamLayout(Layout([2], [0, -1]))),
    ]


@pytest.mark.parametrize("case", strategies(), ids=lambda c: c[0])
def test_n_to_m_reads_only_the_target_bytes(tmp_path, case):
    _, shape, src, dst = case
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    save_distributed_checkpoint({"w": w}, Strategy({"w": src}), tmp_path)
    dst_strategy = Strategy({"w": dst}) if dst else None
    n = dst.layout.device_num if dst else 1
    for rank in range(n):
        ckpt = DistributedCheckpoint(tmp_path)
        got = ckpt.load_rank(dst_strategy, rank)["w"]
        want = w[dst.layout.slice_of(rank, shape)] if dst else w
        np.testing.assert_array_equal(got, want)
        assert ckpt.bytes_read == want.nbytes  # replicas read once, nothing outside the slice
        again = load_distributed_checkpoint({"w": shape}, tmp_path, dst_strategy, rank=rank)
        np.testing.assert_array_equal(again["w"], want)


def test_saved_slices_are_plain_safetensors(tmp_path):
    from safetensors import safe_open

    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    paths = save_distributed_checkpoint({"w": w}, Strategy({"w": Layout([2], [0, -1])}), tmp_path,
                                        prefix="m_")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["rank_0/m_0.safetensors",
                                                                   "rank_1/m_1.safetensors"]
    with safe_open(paths[1], "np") as f:
        np.testing.assert_array_equal(f.get_tensor("w"), w[4:])
    assert Strategy.load(tmp_path / "strategy.json")["w"] == Layout([2], [0, -1])


def test_a_rank_saves_its_own_slice(tmp_path):
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    strategy = Strategy({"w": Layout([2], [-1, 0])})
    for r in range(2):
        save_distributed_checkpoint({"w": w[:, 2 * r : 2 * r + 2]}, strategy, tmp_path, rank=r, sliced=True)
    np.testing.assert_array_equal(load_distributed_checkpoint(None, tmp_path)["w"], w)
    with pytest.raises(CheckpointError, match=r"records tensor_shape \[8, 4\]"):
        save_distributed_checkpoint({"w": w}, strategy.with_shapes({"w": (8, 4)}), tmp_path, rank=0,
                                    sliced=True)


def test_resharded_checkpoint_becomes_slice_files_and_predicts(tmp_path):
    m = MegatronMLP(d_model=64, d_ff=256, batch=4)
    params, x = m.init_params(3), m.example_inputs(4)[0]
    save_distributed_checkpoint(params, m.strategy(4, "megatron"), tmp_path / "ckpt")
    ckpt = DistributedCheckpoint(tmp_path / "ckpt")
    export_distributed(m, ckpt, m.strategy(2, "megatron"), [x], tmp_path / "slices")
    simulated(2)
    model = Model()
    model.build_from_file(tmp_path / "slices", ModelType.DINB, Context(target=["cpu"]))
    (out,) = model.predict([x])
    np.testing.assert_allclose(out.get_data_to_numpy(), mlp_reference(params, x), rtol=2e-4, atol=2e-4)


# ---- integrity --------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    strategy = Strategy({"w": Layout([4], [0, -1]), "b": Layout([4], [-1])})
    save_distributed_checkpoint({"w": w, "b": np.ones(8, np.float32)}, strategy, tmp_path / "c")
    return tmp_path / "c", strategy


def files(root):
    return [root / f"rank_{r}" / f"checkpoint_{r}.safetensors" for r in range(4)]


def test_missing_extra_and_duplicated_rank_files(saved):
    root, strategy = saved
    f = files(root)
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[2, 3\] are missing"):
        DistributedCheckpoint([f[0], f[1]], strategy)
    shutil.move(root / "rank_2", root.parent / "away")
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[2\] are missing"):
        DistributedCheckpoint(root)
    shutil.move(root.parent / "away", root / "rank_2")
    with pytest.raises(CheckpointError, match="listed twice"):
        DistributedCheckpoint([f[0], f[1], f[1], f[3]])
    with pytest.raises(CheckpointError, match="holds rank 3's slices but is listed as rank 2"):
        DistributedCheckpoint([f[0], f[1], f[3], f[2]])
    shutil.copy(f[1], root / "rank_1" / "other.safetensors")
    with pytest.raises(CheckpointError, match="keep one file per rank folder"):
        DistributedCheckpoint(root)
    (root / "rank_1" / "other.safetensors").unlink()
    shutil.copytree(root / "rank_3", root / "rank_4")
    with pytest.raises(CheckpointError, match=r"files for ranks \[4\]"):
        DistributedCheckpoint(root, strategy)


def test_layout_or_shape_disagreeing_with_the_strategy(saved):
    root, _ = saved
    other = Strategy({"w": Layout([4], [-1, 0]), "b": Layout([4], [-1])})
    with pytest.raises(CheckpointError, match=r"rank_0.*rank 0\): parameter 'w' holds the part"):
        DistributedCheckpoint(root, other)
    with pytest.raises(CheckpointError, match=r"parameter 'w': the network expects shape \[8, 4\]"):
        load_distributed_checkpoint({"w": (8, 4)}, root)
    with pytest.raises(CheckpointError, match=r"lacks parameter\(s\) \['v'\]"):
        load_distributed_checkpoint({"v": (8,)}, root)
    with pytest.raises(LayoutError, match="Part counts that divide 8: 1, 2, 4, 8"):
        load_distributed_checkpoint(None, root, Strategy({"w": Layout([3], [0, -1])}), rank=0)
    with pytest.raises(StrategyError, match="pass rank="):
        load_distributed_checkpoint(None, root, Strategy({"w": Layout([2], [0, -1])}))
    # a MindSpore checkpoint read with a strategy it was not saved with
    p2 = build_searched_strategy(str(MS / "strategy_predict2.ckpt"))
    rows = Strategy({**{n: p2.item(n) for n in p2}, "dense.weight": ParamLayout(Layout([2], [0, -1]))})
    rows = rows.with_shapes(DistributedCheckpoint(MS / "train4", TRAIN).shapes)  # JSON files carry shapes
    with pytest.raises(CheckpointError, match=r"rank_0.*'dense.weight' has shape \[16, 4\].*does not belong"):
        DistributedCheckpoint([MS / "predict2" / f"rank_{r}" / f"ckpt_{r}.ckpt" for r in range(2)], rows)


def test_corrupted_truncated_and_wrong_dtype_files(saved, tmp_path):
    root, strategy = saved
    f = files(root)
    data = bytearray(f[2].read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 0xFF  # the first byte of w's slice
    f[2].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank_2.*tensor 'w' is corrupted"):
        load_distributed_checkpoint(None, root, strategy, rank=2)
    # a rank that does not need the corrupted part still loads; the error is never silent
    load_distributed_checkpoint({"w": (8, 8)}, root, strategy, rank=1)
    f[2].write_bytes(bytes(data[:-40]))
    with pytest.raises(CheckpointError, match=r"rank_2.*truncated"):
        DistributedCheckpoint(root)
    # a rank whose slice has another dtype than the others
    save_distributed_checkpoint({"w": np.zeros((8, 8), np.float16), "b": np.ones(8, np.float32)}, strategy,
                    tmp_path / "h", rank=2)
    shutil.copy(tmp_path / "h" / "rank_2" / "checkpoint_2.safetensors", f[2])
    with pytest.raises(CheckpointError, match=r"rank 2\): parameter 'w' is float16, other ranks"):
        DistributedCheckpoint(root)
    # MindSpore file with a CRC that does not match
    bad = bytearray((MS / "full_crc.ckpt").read_bytes())
    bad[100] ^= 0xFF
    (tmp_path / "bad.ckpt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="CRC does not match"):
        MindSporeCheckpoint(tmp_path / "bad.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((MS / "full" / "rank_0" / "full.ckpt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cut.ckpt is not a readable MindSpore checkpoint"):
        MindSporeCheckpoint(tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match="need the strategy"):
        DistributedCheckpoint(MS / "train4")


def test_large_tensors_split_over_records_read_back(tmp_path, monkeypatch):
    import dinb.checkpoint.ckpt_file as msf

    monkeypatch.setattr(msf, "SLICE_BYTES", 256)  # force MindSpore's multi-record form
    w = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    write_ckpt(tmp_path / "big.ckpt", {"w": w})
    ck = MindSporeCheckpoint(tmp_path / "big.ckpt")
    assert len(ck.tensors["w"].segments) == 4
    got = load_distributed_checkpoint(None, [tmp_path / "big.ckpt"])
    np.testing.assert_array_equal(got["w"], w)
    part = DistributedCheckpoint([tmp_path / "big.ckpt"]).read_boxes({"w": ((5, 33), (2, 5))})
    np.testing.assert_array_equal(part["w"], w[5:33, 2:5])


def test_cli_reshards_and_exports_from_a_checkpoint(tmp_path):
    import subprocess
    import sys

    m = MegatronMLP(d_model=64, d_ff=256, batch=4)
    params, x = m.init_params(5), m.example_inputs(6)[0]
    save_distributed_checkpoint(params, m.strategy(4, "megatron"), tmp_path / "train")
    m.strategy(2, "megatron").save(tmp_path / "predict.json")
    cli = [sys.executable, "-m", "dinb"]
    out = subprocess.run(cli + ["reshard", str(tmp_path / "train"), str(tmp_path / "tp2"),
                                "--dst-strategy", str(tmp_path / "predict.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "(4 ranks) to" in out and "rank_1/checkpoint_1.safetensors" in out
    subprocess.run(cli + ["export", "--model", "mlp", "--d-model", "64", "--d-ff", "256", "--batch", "4",
                          "--checkpoint", str(tmp_path / "tp2"), "--strategy-file",
                          str(tmp_path / "predict.json"), "--out", str(tmp_path / "slices")],
                   capture_output=True, text=True, check=True)
    simulated(2)
    model = Model()
    model.build_from_file(tmp_path / "slices", ModelType.DINB, Context(target=["cpu"]))
    (y,) = model.predict([x])
    np.testing.assert_allclose(y.get_data_to_numpy(), mlp_reference(params, x), rtol=2e-4, atol=2e-4)
    bad = subprocess.run(cli + ["reshard", str(MS / "train4"), str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--src-strategy" in bad.stderr


def test_version_1_files_with_crc32_tiles_are_still_verified(tmp_path):
    """Files written before XXH3-64 record CRC-32 tiles; they load, and corruption is still caught."""
    from dinb.checkpoint.dinbfile import DinbRankFile
    from dinb.checkpoint.stored import tile_checksums
    from dinb.formats import safetensors as st

    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    strategy = Strategy({"w": Layout([2], [0, -1])})
    for path in save_distributed_checkpoint({"w": w}, strategy, tmp_path):
        meta = json.loads(st.read_header(path, CheckpointError, "test").metadata["dinb"])
        assert meta["format_version"] == 2 and "tile_xxh3_64" in meta["params"]["w"]
        part = load_checkpoint(path)["w"]
        rec = meta["params"]["w"]
        rec["tile_crc32"] = tile_checksums(part, "crc32")
        del rec["tile_xxh3_64"]
        meta["format_version"] = 1
        st.write_file(path, {"w": part}, {"dinb": json.dumps(meta)})
        assert DinbRankFile(path).tensors["w"].algorithm == "crc32"
    np.testing.assert_array_equal(load_distributed_checkpoint(None, tmp_path)["w"], w)
    path = tmp_path / "rank_1" / "checkpoint_1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank_1.*tensor 'w' is corrupted"):
        load_distributed_checkpoint(None, tmp_path)
    meta["format_version"] = 4
    st.write_file(path, {"w": part}, {"dinb": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="format_version 4 is newer than this dinb reads"):
        DistributedCheckpoint(tmp_path)
