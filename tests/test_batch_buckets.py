"""Batch buckets: an export with programs for several batch sizes runs each at its own size."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import simulated

from dinb import Context, InputError, Model, ModelType, StrategyError, export_distributed
from dinb.cli import mpiexec_path
from dinb.export.slicefile import read_meta, read_slice_file
from dinb.models import DeepMLP, MegatronMLP, mlp_reference
from dinb.sharding import batch_buckets
from dinb.sharding.layout import Layout


def build(path, n, provider="xla"):
    simulated(n)
    model = Model()
    model.build_from_file(path, ModelType.DINB, Context(target=["cpu"], provider=provider))
    return model


def test_the_default_buckets_are_the_powers_of_two_the_layouts_divide():
    whole, split = Layout.replicated(2, 2), Layout([2], [0, -1])
    assert batch_buckets.choices([whole], [(32, 8)]) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets.choices([split], [(32, 8)]) == [2, 4, 8, 16, 32]
    assert batch_buckets.choices([whole], [(12, 8)]) == [1, 2, 4, 8, 12]
    assert batch_buckets.smallest([1, 2, 4, 8], 3) == 4 and batch_buckets.smallest([2, 4], 1) == 2


@pytest.mark.parametrize("strategy", ["megatron", "batch"])
def test_every_bucket_runs_at_its_size_and_equals_numpy(tmp_path, strategy):
    net = MegatronMLP(d_model=64, d_ff=256, batch=8)
    params = net.init_params(1)
    buckets = [2, 4] if strategy == "batch" else [1, 2, 4]
    export_distributed(net, params, net.strategy(2, strategy), net.example_inputs(), tmp_path,
                       batch_buckets=buckets)
    sf = read_slice_file(tmp_path / "mlp0.dinb")
    assert sf.batch_buckets == [*buckets, 8] and sorted(sf.extra_programs) == [f"batch_{b}" for b in buckets]
    model = build(tmp_path, 2)
    assert model.batch_buckets == [*buckets, 8]
    for b in model.batch_buckets:
        x = np.random.default_rng(b).standard_normal((b, 64)).astype(np.float32)
        (y,) = model.predict([x])
        assert y.shape == [b, 64]
        np.testing.assert_allclose(y.get_data_to_numpy(), mlp_reference(params, x), rtol=2e-4, atol=2e-4)
    with pytest.raises(InputError, match=r"\[8, 64\] \(or \[.*4, 8\] rows\)"):
        model.predict([np.zeros((3, 64), np.float32)])


def test_the_onnx_path_runs_every_bucket(tmp_path):
    pytest.importorskip("onnxruntime")
    net = MegatronMLP(d_model=32, d_ff=64, batch=4)
    params = net.init_params(2)
    export_distributed(net, params, net.strategy(2), net.example_inputs(), tmp_path, batch_buckets=[1])
    model = build(tmp_path, 2, provider="tensorrt")
    for b in (1, 4):
        x = np.ones((b, 32), np.float32)
        np.testing.assert_allclose(model.predict([x])[0].get_data_to_numpy(), mlp_reference(params, x),
                                   rtol=2e-4, atol=2e-4)


RUN_BUCKETS = """
import sys
import numpy as np
from dinb import Context, Model, ModelType
from dinb.models import MegatronMLP, mlp_reference
model = Model()
model.build_from_file(sys.argv[1], ModelType.DINB, Context(target=["cpu"]))
params = MegatronMLP(d_model=64, d_ff=256, batch=8).init_params(1)
for b in model.batch_buckets:
    x = np.random.default_rng(b).standard_normal((b, 64)).astype(np.float32)
    y = model.predict([x])[0].get_data_to_numpy()
    np.testing.assert_allclose(y, mlp_reference(params, x), rtol=2e-4, atol=2e-4)
print(f"rank {model.job.process_index}: {model.collectives} buckets {model.batch_buckets} ok")
"""


def test_mpiexec_ranks_run_every_bucket_with_mpi_collectives(tmp_path):
    net = MegatronMLP(d_model=64, d_ff=256, batch=8)
    export_distributed(net, net.init_params(1), net.strategy(2), net.example_inputs(), tmp_path / "m",
                       batch_buckets=[1, 2, 4])
    (tmp_path / "run.py").write_text(RUN_BUCKETS)
    cmd = [mpiexec_path(), "-n", "2", sys.executable, str(tmp_path / "run.py"), str(tmp_path / "m")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        assert f"rank {r}: mpi buckets [1, 2, 4, 8] ok" in proc.stdout


def test_auto_buckets_are_the_ones_the_layouts_divide(tmp_path):
    net = MegatronMLP(d_model=32, d_ff=64, batch=8)
    for strategy, want in (("megatron", [1, 2, 4, 8]), ("batch", [2, 4, 8])):
        export_distributed(net, net.init_params(), net.strategy(2, strategy), net.example_inputs(),
                           tmp_path / strategy, batch_buckets="auto")
        assert read_meta(tmp_path / strategy / "mlp0.dinb")["batch_buckets"] == want


def test_bucket_errors_say_what_would_do(tmp_path):
    net = MegatronMLP(d_model=64, d_ff=256, batch=8)
    params, x = net.init_params(1), net.example_inputs()
    with pytest.raises(StrategyError, match=r"buckets \[1\].*would do: \[2, 4, 8\]"):
        export_distributed(net, params, net.strategy(2, "batch"), x, tmp_path / "a", batch_buckets=[1, 4])
    with pytest.raises(StrategyError, match=r"\[16\] are outside 1\.\.8"):
        export_distributed(net, params, net.strategy(2), x, tmp_path / "b", batch_buckets=[16])
    deep = DeepMLP(d_model=32, d_ff=64, layers=2, batch=4)
    with pytest.raises(StrategyError, match="one-stage exports"):
        export_distributed(deep, deep.init_params(), deep.strategy(2, pipeline_stages=2),
                           deep.example_inputs(), tmp_path / "c", batch_buckets=[1])
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").glob("*.dinb"))


def test_buckets_are_on_by_default_and_the_cli_says_which(tmp_path):
    net = MegatronMLP(d_model=32, d_ff=64, batch=4)
    export_distributed(net, net.init_params(), net.strategy(2), net.example_inputs(), tmp_path / "py")
    assert read_meta(tmp_path / "py" / "mlp0.dinb")["batch_buckets"] == [1, 2, 4]
    run = [sys.executable, "-m", "dinb", "export", "--model", "mlp", "--d-model", "32", "--d-ff", "64",
           "--batch", "8"]
    auto = subprocess.run([*run, "--out", str(tmp_path / "auto")], capture_output=True, text=True,
                          timeout=120)
    assert auto.returncode == 0 and "batch buckets [1, 2, 4, 8]:" in auto.stdout, auto.stdout + auto.stderr
    off = subprocess.run([*run, "--out", str(tmp_path / "off"), "--batch-buckets", "none"],
                         capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and "batch buckets" not in off.stdout, off.stdout + off.stderr
    assert "batch_buckets" not in read_meta(tmp_path / "off" / "mlp0.dinb")


def test_an_export_without_buckets_says_so(tmp_path):
    net = MegatronMLP(d_model=32, d_ff=64, batch=4)
    export_distributed(net, net.init_params(), net.strategy(2), net.example_inputs(), tmp_path,
                       batch_buckets=None)
    assert "batch_buckets" not in read_meta(tmp_path / "mlp0.dinb")
    model = build(tmp_path, 2)
    assert model.batch_buckets == []
    with pytest.raises(InputError, match=r"must be float32\[4, 32\] \(as exported\)"):
        model.predict([np.zeros((1, 32), np.float32)])
