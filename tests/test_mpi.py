"""Real rank processes: ``mpiexec -n N python -m dinb run`` and the simulated CLI mode."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dinb import export_distributed
from dinb.cli import launch
from dinb.models import MatMulNeg, MegatronMLP, mlp_reference

pytestmark = pytest.mark.mpi
SEED_LINE = "output data is: " + " ".join(["-48.0"] * 10)


def export_matmul(path, n, strategy):
    m = MatMulNeg()
    export_distributed(m, m.init_params(), m.strategy(n, strategy), [np.ones((128, 96), np.float32)], path)
    return path


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("strategy", ["contraction", "batch", "columns"])
def test_seed_matmul_on_real_ranks(tmp_path, n, strategy):
    proc = launch(n, ["--model-dir", str(export_matmul(tmp_path, n, strategy))], timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    headers = re.findall(r"^rank (\d+) of (\d+) \(pid (\d+)", proc.stdout, re.M)
    assert [(int(r), int(w)) for r, w, _ in headers] == [(r, n) for r in range(n)]
    assert len({pid for _, _, pid in headers}) == n  # n distinct processes
    assert proc.stdout.count("tensor's name is:output_0 data size is:8192 tensor elements num is:2048") == n
    assert proc.stdout.count(SEED_LINE) == n


@pytest.mark.parametrize("collectives", ["auto", "gloo"])
def test_mlp_on_two_real_ranks_matches_numpy(tmp_path, collectives):
    """By default the ranks run their own programs with MPI's all-reduce; gloo stays available."""
    m = MegatronMLP(d_model=128, d_ff=512, batch=8)
    params = m.init_params(3)
    x = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    export_distributed(m, params, m.strategy(2), [x], tmp_path / "model")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.ini").write_text(f"[runtime]\ncollectives = {collectives}\n")
    proc = launch(2, ["--model-dir", str(tmp_path / "model"), "--input", str(tmp_path / "x.npy"),
                      "--save-outputs", str(tmp_path / "out"), "--config-file", str(tmp_path / "run.ini")],
                  timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    assert f"provider: xla; collectives: {'mpi' if collectives == 'auto' else 'gloo'}" in proc.stdout
    for r in range(2):
        got = np.load(tmp_path / "out" / f"rank{r}_output_0.npy")
        np.testing.assert_allclose(got, mlp_reference(params, x), rtol=2e-4, atol=2e-4)


def test_collectives_mpi_without_a_rank_program_is_a_clear_error_and_auto_falls_back(tmp_path):
    from dinb import Layout, Strategy

    m = MegatronMLP(d_model=64, d_ff=128, batch=8)
    odd = Strategy({"w1": Layout([2], [-1, 0]), "b1": Layout([2], [0]), "w2": Layout([2], [-1, -1]),
                    "b2": Layout([2], [-1])})  # no named strategy: no per-rank program
    export_distributed(m, m.init_params(0), odd, [np.ones((8, 64), np.float32)], tmp_path / "model")
    (tmp_path / "mpi.ini").write_text("[runtime]\ncollectives = mpi\n")
    proc = launch(2, ["--model-dir", str(tmp_path / "model"), "--config-file", str(tmp_path / "mpi.ini")],
                  timeout_s=120)
    assert proc.returncode != 0
    assert "collectives = mpi: " in proc.stderr and "use collectives = gloo or auto" in proc.stderr
    proc = launch(2, ["--model-dir", str(tmp_path / "model")], timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    assert "provider: xla; collectives: gloo" in proc.stdout


def test_slices_for_four_ranks_on_two_is_a_clear_error(tmp_path):
    proc = launch(2, ["--model-dir", str(export_matmul(tmp_path, 4, "contraction"))], timeout_s=120)
    assert proc.returncode != 0
    assert "slice files for 4 ranks but this job has 2" in proc.stderr
    assert "mpiexec -n 4" in proc.stderr


def test_a_corrupted_slice_on_one_rank_is_named_by_every_rank(tmp_path):
    export_matmul(tmp_path, 2, "contraction")
    path = tmp_path / "matmul1.dinb"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = launch(2, ["--model-dir", str(tmp_path)], timeout_s=120)
    assert proc.returncode != 0
    assert "[rank 1] error:" in proc.stderr and "checksum" in proc.stderr
    assert re.search(r"\[rank 0\] error: load slice files failed on rank\(s\) \[1\]", proc.stderr)


@pytest.mark.parametrize("n", [4, 8])
def test_simulated_mode_runs_the_same_files(tmp_path, n):
    export_matmul(tmp_path, n, "contraction")
    proc = subprocess.run([sys.executable, "-m", "dinb", "run", "--model-dir", str(tmp_path),
                           "--simulate", str(n)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(SEED_LINE) == n
    assert f"rank {n - 1} of {n}" in proc.stdout


def test_demo_says_where_its_files_are_and_removes_them_unless_out_is_given(tmp_path):
    cli = [sys.executable, "-m", "dinb", "demo", "--strategy", "contraction"]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(SEED_LINE) == 2
    where = re.search(r"slice files in (\S+)", proc.stdout).group(1)
    assert f"removed the demo's slice files from {where}" in proc.stdout
    assert not os.path.exists(where)
    kept = subprocess.run(cli + ["--out", str(tmp_path / "demo")], capture_output=True, text=True,
                          timeout=180)
    assert kept.returncode == 0 and "removed" not in kept.stdout
    assert (tmp_path / "demo" / "contraction" / "matmul1.dinb").is_file()
