"""Export + runtime in this process as a simulated 8-rank job (and smaller simulated jobs)."""

import json

import numpy as np
import pytest
from conftest import simulated

import dinb
from dinb import (
    Context,
    InputError,
    Model,
    ModelType,
    ProviderError,
    RankMismatchError,
    SliceFileError,
    Tensor,
    export_distributed,
    infer_predict_layout,
)
from dinb.models import MatMulNeg, MegatronMLP, mlp_reference


def build(path, n):
    simulated(n)
    model = Model()
    model.build_from_file(path, ModelType.DINB, Context(target=["cpu"]))
    return model


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory):
    m = MegatronMLP(d_model=64, d_ff=256, batch=4)
    params, x = m.init_params(1), m.example_inputs(2)[0]
    return m, params, x


@pytest.mark.parametrize("strategy", ["contraction", "batch", "columns"])
def test_seed_matmul_gives_minus_48_on_8_simulated_ranks(tmp_path, strategy):
    m = MatMulNeg()
    x = np.ones((128, 96), np.float32)
    s = infer_predict_layout(m, x, device_num=8, strategy=strategy)
    export_distributed(m, m.init_params(), s, [x], tmp_path)
    model = build(tmp_path, 8)
    inputs = model.get_inputs()
    assert [(t.name, t.shape) for t in inputs] == [("x", [128, 96])]
    inputs[0].set_data_from_numpy(x)
    (out,) = model.predict(inputs)
    assert out.shape == [128, 16] and out.element_num == 2048 and out.data_size == 8192
    np.testing.assert_array_equal(out.get_data_to_numpy(), np.full((128, 16), -48, np.float32))
    per_rank = model.rank_outputs()
    assert sorted(per_rank) == list(range(8))
    for outs in per_rank.values():
        np.testing.assert_array_equal(outs[0], out.get_data_to_numpy())


@pytest.mark.parametrize("strategy", ["contraction", "batch", "columns"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_every_strategy_equals_the_single_device_result(tmp_path, strategy, n):
    m = MatMulNeg()
    rng = np.random.default_rng(n)
    params = {"matmul_weight": rng.standard_normal((96, 16)).astype(np.float32)}
    x = rng.standard_normal((128, 96)).astype(np.float32)
    export_distributed(m, params, m.strategy(n, strategy), [x], tmp_path)
    model = build(tmp_path, n)
    (out,) = model.predict([Tensor(x)])
    np.testing.assert_allclose(out.get_data_to_numpy(), -(x @ params["matmul_weight"]),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strategy", ["megatron", "batch", "replicated"])
def test_mlp_matches_numpy(tmp_path, mlp_case, strategy):
    m, params, x = mlp_case
    export_distributed(m, params, m.strategy(4, strategy), [x], tmp_path)
    model = build(tmp_path, 4)
    (out,) = model.predict([x])
    np.testing.assert_allclose(out.get_data_to_numpy(), mlp_reference(params, x), rtol=2e-4, atol=2e-4)


def test_megatron_program_has_exactly_one_all_reduce(tmp_path, mlp_case):
    m, params, x = mlp_case
    export_distributed(m, params, m.strategy(4), [x], tmp_path)
    hlo = build(tmp_path, 4).compiled_text()
    assert hlo.count("all-reduce(") == 1
    assert "all-gather(" not in hlo


def test_each_rank_file_holds_only_its_slice(tmp_path, mlp_case):
    m, params, x = mlp_case
    paths = export_distributed(m, params, m.strategy(4), [x], tmp_path)
    assert [p.name for p in paths] == [f"mlp{r}.dinb" for r in range(4)]
    sf = dinb.read_slice_file(paths[3])
    np.testing.assert_array_equal(sf.params["w1"], params["w1"][:, 192:256])
    np.testing.assert_array_equal(sf.params["w2"], params["w2"][192:256])
    assert sf.meta["world_size"] == 4 and sf.meta["rank"] == 3
    assert sf.meta["params"]["w1"]["layout"] == {"dev_matrix": [4], "tensor_map": [-1, 0]}
    assert (tmp_path / "strategy.json").exists()


# ---- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def matmul2(tmp_path):
    m = MatMulNeg()
    x = np.ones((128, 96), np.float32)
    export_distributed(m, m.init_params(), m.strategy(2), [x], tmp_path, batch_buckets=None)
    return tmp_path


def test_wrong_input_shape_and_dtype(matmul2):
    model = build(matmul2, 2)
    with pytest.raises(InputError, match=r"input 'x' must be float32\[128, 96\].*float64\[128, 96\]"):
        model.predict([np.ones((128, 96))])
    with pytest.raises(InputError, match=r"got float32\[4, 96\]"):
        model.predict([np.ones((4, 96), np.float32)])
    with pytest.raises(InputError, match="takes 1 inputs"):
        model.predict([])
    t = model.get_inputs()[0]
    with pytest.raises(InputError, match="tensor 'x'"):
        t.set_data_from_numpy(np.ones((2, 2), np.float32))
    (out,) = model.predict([np.ones((128, 96), np.float32)])  # still usable afterwards
    assert out.get_data_to_numpy()[0, 0] == -48


def test_rank_count_does_not_match_slices(matmul2):
    with pytest.raises(RankMismatchError, match="slice files for 2 ranks but this job has 4"):
        build(matmul2, 4)


def test_program_for_n_devices_run_on_m(matmul2, tmp_path_factory):
    """A file lying about its world size is caught by its header; a program swapped in from a
    2-rank export still cannot run on 1 rank."""

    from safetensors import safe_open
    from safetensors.numpy import save_file

    def rewrite(src, dst, **change):
        with safe_open(str(src), framework="numpy") as f:  # dinb's files are plain safetensors
            meta = json.loads(f.metadata()["dinb"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key, value in change.items():
            (tensors if key == "program" else meta)[key] = value
        if "program" in change:
            meta["program"] = {"xxh3_64": dinb.export.slicefile.digest(change["program"]),
                               "nbytes": len(change["program"])}
        save_file(tensors, str(dst), metadata={"dinb": json.dumps(meta)})

    lone = tmp_path_factory.mktemp("lone")
    rewrite(matmul2 / "matmul0.dinb", lone / "matmul0.dinb", world_size=1)
    simulated(1)
    with pytest.raises(SliceFileError, match=r"matmul0.dinb: inputs\[0\].layout spans 2 ranks, the export 1"):
        Model().build_from_file(lone / "matmul0.dinb")

    one = tmp_path_factory.mktemp("one")
    m = MatMulNeg()
    export_distributed(m, m.init_params(), m.strategy(1), [np.ones((128, 96), np.float32)], one)
    program = np.frombuffer(dinb.export.slicefile.read_program(matmul2 / "matmul0.dinb")[1], np.uint8)
    rewrite(one / "matmul0.dinb", lone / "matmul0.dinb", program=program)
    with pytest.raises(RankMismatchError, match="exported for 2 devices but this job has 1"):
        Model().build_from_file(lone / "matmul0.dinb")


def test_corrupted_truncated_missing_files(matmul2):
    path = matmul2 / "matmul1.dinb"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(SliceFileError, match=r"matmul1.dinb \(rank 1\).*checksum"):
        build(matmul2, 2)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SliceFileError, match="matmul1.dinb.*truncated"):
        build(matmul2, 2)
    path.unlink()
    with pytest.raises(SliceFileError, match=r"export is for 2 ranks but the slice files of ranks \[1\]"):
        build(matmul2, 2)
    with pytest.raises(SliceFileError, match="does not exist"):
        build(matmul2 / "nope", 2)


def test_version_1_slice_files_with_sha256_are_still_verified(matmul2, tmp_path):
    from safetensors.numpy import load_file, save_file

    for r in range(2):
        src = matmul2 / f"matmul{r}.dinb"
        meta = json.loads(_raw_meta(src))
        tensors = load_file(str(src))
        assert meta["format_version"] == 2 and "xxh3_64" in meta["program"]
        meta["format_version"] = 1
        for name, rec in [*meta["params"].items(), ("program", meta["program"])]:
            key = name if name == "program" else "param/" + name
            del rec["xxh3_64"]
            rec["sha256"] = dinb.export.slicefile.digest(tensors[key], "sha256")
        save_file(tensors, str(tmp_path / src.name), metadata={"dinb": json.dumps(meta)})
    model = build(tmp_path, 2)
    x = np.ones((128, 96), np.float32)
    assert model.predict([x])[0].get_data_to_numpy().shape == (128, 16)
    data = bytearray((tmp_path / "matmul1.dinb").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "matmul1.dinb").write_bytes(bytes(data))
    with pytest.raises(SliceFileError, match=r"matmul1.dinb \(rank 1\).*checksum"):
        build(tmp_path, 2)


def _raw_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()["dinb"]


def test_missing_middle_rank_is_named(tmp_path):
    m = MatMulNeg()
    export_distributed(m, m.init_params(), m.strategy(4), [np.ones((128, 96), np.float32)], tmp_path)
    (tmp_path / "matmul2.dinb").unlink()
    with pytest.raises(SliceFileError, match=r"slice files of ranks \[2\] are missing"):
        build(tmp_path, 4)


def test_providers_and_targets():
    # tensorrt runs each rank's ONNX program with the best provider ONNX Runtime has, TensorRT first;
    # the fallback is announced at build time (tests/test_onnx.py)
    assert Context(target=["cpu"], provider="tensorrt").check_provider() == "tensorrt"
    with pytest.raises(ProviderError, match="unknown"):
        Context(provider="onnx").check_provider()
    ctx = Context()
    ctx.target = ["gpu"]
    ctx.gpu.provider = "tensorrt"
    assert ctx.check_provider() == "tensorrt" and ctx.device_info is ctx.gpu
    with pytest.raises(dinb.DinbError, match="Ascend"):
        Context(target=["Ascend"]).check_provider()


def test_config_file(tmp_path, matmul2):
    from dinb.runtime import load_config

    ini = tmp_path / "config.ini"
    ini.write_text("[runtime]\ninit_timeout_s = 5\nverify_checksums = false\n")
    cfg = load_config(ini)
    assert cfg.init_timeout_s == 5 and cfg.verify_checksums is False
    ini.write_text("[runtime]\ninit_timout_s = 5\n")
    with pytest.raises(dinb.DinbError, match="unknown key 'init_timout_s'"):
        load_config(ini)
    ini.write_text("[runtime]\nagree_timeout_s = soon\n")
    with pytest.raises(dinb.DinbError, match="'soon' is not a float"):
        load_config(ini)


def test_mindir_is_refused_clearly(matmul2):
    simulated(2)
    with pytest.raises(SliceFileError, match="MindIR files are MindSpore's own format"):
        Model().build_from_file(matmul2, ModelType.MINDIR)


def test_predict_before_build():
    with pytest.raises(dinb.DinbError, match="not built"):
        Model().get_inputs()


def test_the_guides_config_example_loads_with_its_comments(tmp_path):
    from pathlib import Path

    from dinb.runtime.config import RuntimeConfig, load_config

    guide = (Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    block = guide.split("```ini\n", 1)[1].split("```", 1)[0]
    (tmp_path / "run.ini").write_text(block)
    assert load_config(tmp_path / "run.ini") == RuntimeConfig()
