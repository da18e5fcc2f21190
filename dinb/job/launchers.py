"""Who started this process, and which GPU it takes: the launchers' environments, read.

A rank needs four numbers before it joins a job: its rank, the world size, its rank among the
processes on its host (``local_rank``) and how many share the host (``local_size``). MPI's
launchers (mpich's ``mpiexec``, Open MPI's ``mpirun``, ``srun --mpi=...``) are asked through
mpi4py (:func:`dinb.job.mpi_world.mpi_world`); Slurm's ``srun`` without an MPI plugin is read here from
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; notebook engines and serving agents are
handed theirs by the process that starts them.

Which GPU (:func:`choose_gpu`): rank ``local_rank`` takes CUDA device ``local_rank`` of those it
sees (``device_id`` overrides), or, when ``CUDA_VISIBLE_DEVICES`` lists several, the
``local_rank``-th of them; a launcher that gave each rank one GPU of its own
(``CUDA_VISIBLE_DEVICES`` of one entry, as ``srun --gpus-per-task=1`` does) is taken at its word.
``CUDA_VISIBLE_DEVICES`` itself is left alone: JAX is told the device's index
(``local_device_ids``), so NCCL still sees the host's other GPUs and joins the ranks over
NVLink (peer-to-peer needs both GPUs visible to CUDA; with one GPU visible per process NCCL falls
back to copies through host memory).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dinb.errors import DinbError


@dataclass(frozen=True)
class World:
    """This process's place in a job: ``rank`` of ``size``, ``local_rank`` of ``local_size`` here."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str


def slurm_world(env: Mapping[str, str] | None = None) -> World | None:
    """The job as ``srun`` describes it (several tasks), or None outside a Slurm step."""
    env = os.environ if env is None else env
    keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_NODELIST")
    if not all(k in env for k in keys) or int(env["SLURM_NTASKS"]) < 2:
        return None
    per_node = expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    node = int(env.get("SLURM_NODEID", "0"))
    local_size = per_node[node] if node < len(per_node) else int(env["SLURM_NTASKS"])
    return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]),
                 local_size, "slurm")


def expand_counts(spec: str) -> list[int]:
    """Slurm's task counts per node, ``"4(x2),2"`` -> ``[4, 4, 2]``."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise DinbError(f"cannot read Slurm's tasks per node {spec!r} (at {part!r})")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``"gpu[003-005,009],login1"`` -> ``"gpu003"``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        raise DinbError(f"cannot read Slurm's node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def slurm_coordinator(env: Mapping[str, str] | None = None) -> str:
    """``host:port`` of rank 0's coordinator in a Slurm step: the step's first host (task 0 runs
    there), a port in the ephemeral range derived from the job and step ids, the same on every
    task (``DINB_COORDINATOR_ADDRESS`` or ``--coordinator-address`` choose another)."""
    env = os.environ if env is None else env
    ids = int(env.get("SLURM_JOB_ID", "0")) * 31 + int(env.get("SLURM_STEP_ID", "0") or 0)
    return f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{61440 + ids % 4096}"


@dataclass(frozen=True)
class GpuChoice:
    """The GPU one rank computes on: ``index`` among the CUDA devices this process sees (what
    JAX is told), and which physical GPU that is (an entry of ``CUDA_VISIBLE_DEVICES``, or the
    index itself)."""

    index: int
    physical: str
    visible: tuple[str, ...] | None  # CUDA_VISIBLE_DEVICES's entries, None when unset

    def describe(self) -> str:
        seen = f" (CUDA_VISIBLE_DEVICES={','.join(self.visible)})" if self.visible is not None else ""
        return f"GPU {self.physical}{seen}"


def choose_gpu(rank: int, local_rank: int, device_id: int | None = None,
               env: Mapping[str, str] | None = None, gpu_count: int | None = None) -> GpuChoice:
    """Which GPU rank ``rank`` (``local_rank`` on its host) takes; see the module's docstring.

    ``gpu_count`` is how many GPUs the host has (:func:`host_gpu_count`); a rank whose GPU does
    not exist gets an error naming the rank, the device it wanted and the devices it sees.
    """
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    want = local_rank if device_id is None else device_id
    why = f"device_id={device_id}" if device_id is not None else f"local rank {local_rank} on this host"
    if raw is not None:
        visible = tuple(v.strip() for v in raw.split(",") if v.strip())
        if not visible or visible[0] in ("-1", "none", "NoDevFiles"):
            raise DinbError(
                f"rank {rank}: CUDA_VISIBLE_DEVICES={raw!r} hides every GPU; unset it or list the "
                "GPUs the ranks may use"
            )
        if len(visible) == 1 and device_id is None:
            return GpuChoice(0, visible[0], visible)  # the launcher gave this rank its own GPU
        if want >= len(visible):
            raise DinbError(
                f"rank {rank} wants GPU {want} ({why}) but sees {len(visible)}: "
                f"CUDA_VISIBLE_DEVICES={raw}. Launch at most {len(visible)} ranks per host, or list "
                "more GPUs in CUDA_VISIBLE_DEVICES"
            )
        return GpuChoice(want, visible[want], visible)
    if gpu_count is not None and want >= gpu_count:
        have = "no GPU" if gpu_count == 0 else f"{gpu_count} GPU(s) (0-{gpu_count - 1})"
        raise DinbError(
            f"rank {rank} wants GPU {want} ({why}) but this host has {have}. Launch at most "
            f"{gpu_count} GPU ranks per host, or run with --target cpu"
        )
    return GpuChoice(want, str(want), None)


def host_gpu_count() -> int | None:
    """How many NVIDIA GPUs the driver shows (without starting CUDA), or None when unknown."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return sum(1 for _ in gpus.iterdir())
    devs = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    return len(devs) if devs else None


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the mpich wheel's), else the one on PATH, else None."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@functools.cache
def is_open_mpi(mpiexec: str) -> bool:
    """Whether ``mpiexec`` is Open MPI's (what GPU clusters ship) rather than mpich's hydra: their
    flags differ, and Open MPI refuses to start as root without ``--allow-run-as-root``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def mpiexec_command(mpiexec: str, n: int) -> list[str]:
    """``mpiexec -n N`` as this MPI takes it (``--allow-run-as-root`` for Open MPI as root)."""
    root = ["--allow-run-as-root"] if is_open_mpi(mpiexec) and os.geteuid() == 0 else []
    return [mpiexec, *root, "-n", str(n)]
