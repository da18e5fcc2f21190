"""The tensorrt provider's ONNX path, checked on CPU with ONNX Runtime against the XLA path.

TensorRT itself is not installed on these machines: here ONNX Runtime's CPU provider runs the
same ONNX models TensorRT would be given, and the fallback is announced, never silent.
"""

import re
import warnings

import numpy as np
import pytest
from conftest import simulated

from dinb import Context, Model, ModelType, ProviderError, export_distributed
from dinb.cli import launch
from dinb.errors import ProviderFallbackWarning
from dinb.models import MatMulNeg, MegatronMLP, mlp_reference
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import Strategy


def both(path, n):
    """The export run by XLA and by the ONNX path on n simulated ranks."""
    simulated(n)
    xla, onnx = Model(), Model()
    xla.build_from_file(path, ModelType.DINB, Context(target=["cpu"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnx.build_from_file(path, ModelType.DINB, Context(target=["cpu"], provider="tensorrt"))
    assert any(issubclass(w.category, ProviderFallbackWarning) for w in caught)
    return xla, onnx


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("strategy", ["contraction", "batch", "columns"])
def test_seed_matmul_onnx_equals_xla(tmp_path, strategy, n):
    m = MatMulNeg()
    rng = np.random.default_rng(n)
    params = {"matmul_weight": rng.standard_normal((96, 16)).astype(np.float32)}
    x = rng.standard_normal((128, 96)).astype(np.float32)
    export_distributed(m, params, m.strategy(n, strategy), [x], tmp_path)
    xla, onnx = both(tmp_path, n)
    want = xla.predict([x])[0].get_data_to_numpy()
    got = onnx.predict([x])[0].get_data_to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert onnx.provider == "tensorrt: onnxruntime CPUExecutionProvider"
    assert "target cpu" in onnx.provider_notice
    assert sorted(onnx.rank_outputs()) == list(range(n))
    for outs in onnx.rank_outputs().values():  # the last stage's ranks all hold the same output
        np.testing.assert_array_equal(outs[0], got)
    ones = onnx.predict([np.ones((128, 96), np.float32)])[0].get_data_to_numpy()
    np.testing.assert_allclose(ones, -(np.ones((128, 96)) @ params["matmul_weight"]), rtol=1e-5, atol=1e-4)


def test_megatron_mlp_onnx_equals_xla_and_numpy(tmp_path):
    m = MegatronMLP(d_model=128, d_ff=512, batch=8)
    params, x = m.init_params(3), m.example_inputs(4)[0]
    export_distributed(m, params, m.strategy(2, "megatron"), [x], tmp_path)
    xla, onnx = both(tmp_path, 2)
    got = onnx.predict([x])[0].get_data_to_numpy()
    np.testing.assert_allclose(got, xla.predict([x])[0].get_data_to_numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, mlp_reference(params, x), rtol=2e-4, atol=2e-4)
    text = onnx.compiled_text()
    assert "onnx   h_r = gelu(x W1_r + b1_r) W2_r" in text and "all-reduce" in text


@pytest.mark.mpi
def test_onnx_ranks_under_mpiexec_use_mpi_collectives(tmp_path):
    m = MegatronMLP(d_model=128, d_ff=512, batch=8)
    params, x = m.init_params(3), m.example_inputs(4)[0]
    export_distributed(m, params, m.strategy(2, "megatron"), [x], tmp_path / "mlp")
    np.save(tmp_path / "x.npy", x)
    proc = launch(2, ["--model-dir", str(tmp_path / "mlp"), "--provider", "tensorrt", "--input",
                      str(tmp_path / "x.npy"), "--save-outputs", str(tmp_path / "out")], timeout_s=180)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^provider: tensorrt: onnxruntime CPUExecutionProvider \(target cpu", proc.stdout, re.M)
    for r in range(2):
        got = np.load(tmp_path / "out" / f"rank{r}_output_0.npy")
        np.testing.assert_allclose(got, mlp_reference(params, x), rtol=2e-4, atol=2e-4)


def test_onnx_path_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    m = MegatronMLP(d_model=64, d_ff=256, batch=4)
    params, x = m.init_params(), m.example_inputs()[0]
    custom = Strategy({"w1": Layout([2], [0, -1]), "b1": Layout([2], [-1]), "w2": Layout([2], [-1, 0]),
                       "b2": Layout([2], [0])})
    export_distributed(m, params, custom, [x], tmp_path / "custom")
    simulated(2)
    named = r"named strategies of 'mlp' \(\['megatron', 'batch', 'replicated'\]\)"
    with pytest.raises(ProviderError, match=named):
        Model().build_from_file(tmp_path / "custom", ModelType.DINB, Context(provider="tensorrt"))
    export_distributed(m, params, m.strategy(2), [x], tmp_path / "bf16", dtype="bfloat16")
    with pytest.raises(ProviderError, match="runs float32 exports"):
        Model().build_from_file(tmp_path / "bf16", ModelType.DINB, Context(provider="tensorrt"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax2onnx" else real(name, *a))
    with pytest.raises(ProviderError, match=r"needs jax2onnx, not installed: pip install 'dinb\[onnx\]'"):
        Context(provider="tensorrt").check_provider()
