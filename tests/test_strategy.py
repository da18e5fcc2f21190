import json

import numpy as np
import pytest

from dinb import Layout, Strategy, StrategyError, infer_predict_layout
from dinb.models import MatMulNeg, MegatronMLP, matmul_layouts

MINDSPORE_EXAMPLE = {"current_stage": 1, "parallel_layout_item": {"weight": {
    "dev_matrix": [2, 2], "tensor_map": [1, 0], "tensor_shape": [96, 16], "field": 0,
    "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}}


def test_reads_mindspore_json_schema(tmp_path):
    path = tmp_path / "strategy.json"
    path.write_text(json.dumps(MINDSPORE_EXAMPLE))
    s = Strategy.load(path)
    assert s["weight"] == Layout([2, 2], [1, 0])
    assert s.item("weight").shape == (96, 16)
    assert s.device_num == 4


def test_round_trip(tmp_path):
    s = MatMulNeg().strategy(4, "contraction").with_shapes({"matmul_weight": (96, 16)})
    back = Strategy.load(s.save(tmp_path / "s.json"))
    assert back == s and hash(back) == hash(s)
    item = json.loads((tmp_path / "s.json").read_text())["parallel_layout_item"]["matmul_weight"]
    assert set(item) == {"dev_matrix", "tensor_map", "tensor_shape", "field",
                         "opt_weight_shard_step", "opt_weight_shard_size"}


def test_bad_files_name_the_problem(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(StrategyError, match="bad.json"):
        Strategy.load(p)
    p.write_text(json.dumps({"parallel_layout_item": {"w": {"tensor_map": [0]}}}))
    with pytest.raises(StrategyError, match="'w' lacks field 'dev_matrix'"):
        Strategy.load(p)
    with pytest.raises(StrategyError, match="does not exist"):
        Strategy.load(tmp_path / "missing.json")


def test_mixed_device_counts_rejected():
    with pytest.raises(StrategyError, match="same number of devices"):
        Strategy({"a": Layout([2], [0]), "b": Layout([4], [0])})


@pytest.mark.parametrize("name, w_slice", [
    ("contraction", (48, 16)), ("batch", (96, 16)), ("columns", (96, 8))])
def test_matmul_strategies_as_mindspore_writes_them(name, w_slice):
    s = infer_predict_layout(MatMulNeg(), np.ones((128, 96), np.float32), device_num=2, strategy=name)
    assert s["matmul_weight"].slice_shape((96, 16)) == w_slice


def test_matmul_layout_with_repeat_dimension():
    x, w, out = matmul_layouts(((1, 2), (2, 1)), 8)
    assert w.dev_matrix == (4, 1, 2, 1) and w.tensor_map == (1, 0)
    assert len(w.replica_groups()) == 2
    with pytest.raises(StrategyError, match="does not divide"):
        matmul_layouts(((1, 3), (3, 1)), 8)


def test_infer_predict_layout_validates_shapes():
    with pytest.raises(Exception, match="Part counts that divide 96"):
        infer_predict_layout(MatMulNeg(), np.ones((128, 96), np.float32), device_num=5)
    with pytest.raises(StrategyError, match="takes 1 inputs"):
        infer_predict_layout(MatMulNeg(), device_num=2)
    with pytest.raises(StrategyError, match="no strategy 'diagonal'"):
        infer_predict_layout(MatMulNeg(), np.ones((128, 96)), device_num=2, strategy="diagonal")


def test_strategy_must_name_the_model_parameters():
    s = MegatronMLP(64, 128, 4).strategy(2)
    with pytest.raises(StrategyError, match="missing from the strategy: \\['w1'\\]"):
        Strategy({k: s[k] for k in ("b1", "w2", "b2")}).validate(MegatronMLP(64, 128, 4).param_shapes())
