"""Launchers' environments: which rank this is, which GPU it takes (no GPU needed), and ranks
started the way Slurm's ``srun`` starts them (real processes, CPU)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from dinb import export_distributed
from dinb.errors import DinbError
from dinb.job.addresses import free_port
from dinb.job.launchers import (
    GpuChoice,
    World,
    choose_gpu,
    expand_counts,
    first_slurm_host,
    slurm_coordinator,
    slurm_world,
)
from dinb.models import MatMulNeg


def test_each_rank_takes_its_local_gpu_without_hiding_the_others():
    # mpirun/mpiexec, notebook engines, startup_agents: local rank r -> CUDA device r, and
    # CUDA_VISIBLE_DEVICES stays as it is (NCCL needs to see the peers for NVLink)
    assert choose_gpu(5, 1, env={}, gpu_count=4) == GpuChoice(1, "1", None)
    assert choose_gpu(0, 0, device_id=3, env={}, gpu_count=4) == GpuChoice(3, "3", None)
    # the user listed several GPUs: the r-th of them
    assert choose_gpu(1, 1, env={"CUDA_VISIBLE_DEVICES": "2,3"}) == GpuChoice(1, "3", ("2", "3"))
    assert choose_gpu(0, 0, env={"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}).physical == "GPU-aa"
    # a launcher gave each rank one GPU of its own (srun --gpus-per-task=1): taken at its word
    assert choose_gpu(7, 3, env={"CUDA_VISIBLE_DEVICES": "5"}) == GpuChoice(0, "5", ("5",))


def test_a_rank_whose_gpu_does_not_exist_is_named():
    with pytest.raises(DinbError, match=r"rank 3 wants GPU 2 \(local rank 2 on this host\) but this host "
                                        r"has 2 GPU\(s\) \(0-1\)"):
        choose_gpu(3, 2, env={}, gpu_count=2)
    with pytest.raises(DinbError, match=r"rank 1 wants GPU 2 .* but sees 2: CUDA_VISIBLE_DEVICES=4,5"):
        choose_gpu(1, 2, env={"CUDA_VISIBLE_DEVICES": "4,5"})
    with pytest.raises(DinbError, match=r"rank 0 wants GPU 1 \(device_id=1\) but sees 1"):
        choose_gpu(0, 0, device_id=1, env={"CUDA_VISIBLE_DEVICES": "5"})
    with pytest.raises(DinbError, match="has no GPU"):
        choose_gpu(0, 0, env={}, gpu_count=0)
    for hidden in ("", "-1"):
        with pytest.raises(DinbError, match="hides every GPU"):
            choose_gpu(0, 0, env={"CUDA_VISIBLE_DEVICES": hidden})


def slurm_env(procid, ntasks=4, localid=None, nodeid=0, per_node="2(x2)"):
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_JOB_ID": "81234",
            "SLURM_STEP_ID": "0", "SLURM_LOCALID": str(procid % 2 if localid is None else localid),
            "SLURM_NODEID": str(nodeid), "SLURM_STEP_NODELIST": "gpu[007-008]",
            "SLURM_STEP_TASKS_PER_NODE": per_node}


def test_slurm_tasks_know_their_rank_host_and_coordinator():
    assert slurm_world(slurm_env(3, nodeid=1)) == World(3, 4, 1, 2, "slurm")
    assert slurm_world(slurm_env(0, ntasks=3, per_node="2,1")) == World(0, 3, 0, 2, "slurm")
    assert slurm_world(slurm_env(0, ntasks=1, per_node="1")) is None  # one task: not a job of ranks
    assert slurm_world({"SLURM_JOB_ID": "1"}) is None  # a batch script's shell, not a step's task
    assert expand_counts("4(x2),2") == [4, 4, 2] and expand_counts("8") == [8]
    with pytest.raises(DinbError, match="tasks per node"):
        expand_counts("4(y2)")
    assert first_slurm_host("gpu[007-008]") == "gpu007"
    assert first_slurm_host("gpu[003,005-009],login1") == "gpu003"
    assert first_slurm_host("node12,node13") == "node12"
    coordinators = {slurm_coordinator(slurm_env(r, nodeid=r // 2)) for r in range(4)}
    assert len(coordinators) == 1  # every task computes the same address
    host, port = coordinators.pop().split(":")
    assert host == "gpu007" and 61440 <= int(port) < 65536


def test_ranks_started_as_srun_starts_them(tmp_path):
    """Two processes with only Slurm's variables (no MPI): they find each other and run MindSpore's MatMul."""
    m = MatMulNeg()
    export_distributed(m, m.init_params(), m.strategy(2, "contraction"), [np.ones((128, 96), np.float32)],
                       tmp_path / "mm")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_", "SLURM_"))}
    base["DINB_COORDINATOR_ADDRESS"] = f"127.0.0.1:{free_port('127.0.0.1')}"  # the derived port may be taken
    one_host = {"SLURM_STEP_NODELIST": "localhost"}
    procs = [subprocess.Popen([sys.executable, "-m", "dinb", "run", "--model-dir", str(tmp_path / "mm")],
                              env=base | slurm_env(r, ntasks=2, per_node="2") | one_host,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert outs[0][0].count("output data is: " + " ".join(["-48.0"] * 10)) == 2
    assert "rank 1 of 2" in outs[0][0]
