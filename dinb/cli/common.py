"""What the subcommands share: argument types, the inputs they make, launching ranks."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np

from dinb.errors import DinbError

NOISE = re.compile(
    r"(\[Gloo\]|is connected to \d+ peer ranks|^[IWE]0000 |^WARNING: All log messages before absl)"
)


def counts_arg(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts separated by commas, e.g. 1,2,4") from None


def buckets_arg(text: str) -> list[int] | str | None:
    """``auto``, ``none`` or batch sizes separated by commas."""
    return {"auto": "auto", "none": None}.get(text) if text in ("auto", "none") else counts_arg(text)


def lite_sample_lines(name: str, data: np.ndarray) -> list[str]:
    """What MindSpore Lite's sample prints for one output tensor."""
    flat = data.flatten()
    return [
        f"tensor's name is:{name} data size is:{data.nbytes} tensor elements num is:{data.size}",
        "output data is: " + " ".join(str(v) for v in flat[:10]),
    ]


def make_input(kind: str, shape: list[int], dtype: Any, seed: int, name: str = "") -> np.ndarray:
    if kind.endswith(".npz"):
        try:
            with np.load(kind, allow_pickle=False) as arrays:
                if name not in arrays:
                    raise DinbError(f"--input {kind}: no array named {name!r}; it holds "
                                    f"{sorted(arrays.files)} (one array per input name)")
                return np.asarray(arrays[name]).astype(dtype)
        except (OSError, ValueError) as e:
            raise DinbError(f"--input {kind!r}: not a readable .npz file ({e})") from None
    if kind == "ones":
        return np.ones(shape, dtype=dtype)
    if kind == "random":
        return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    try:
        return np.load(kind, allow_pickle=False).astype(dtype)
    except (OSError, ValueError) as e:
        raise DinbError(f"--input {kind!r}: give 'ones', 'random' or a readable .npy file ({e})") from None


def ids_arg(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give token ids separated by commas, e.g. 1,5,9") from None


def mpiexec_path() -> str:
    from dinb.job.launchers import find_mpiexec

    found = find_mpiexec()
    if not found:
        raise DinbError("mpiexec not found; install dinb with its dependencies (the mpich wheel)")
    return found


def launch(
    n: int, run_args: list[str], timeout_s: float = 300, quiet: bool = True, command: str = "run"
) -> subprocess.CompletedProcess[str]:
    """Run ``mpiexec -n N python -m dinb COMMAND ARGS``; output without the stack's start-up noise."""
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, "-m", "dinb", command, *run_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if quiet:
        keep = [ln for ln in proc.stdout.splitlines() if not NOISE.search(ln)]
        proc.stdout = "\n".join(keep) + ("\n" if keep else "")
        errs = [ln for ln in proc.stderr.splitlines() if not NOISE.search(ln)]
        proc.stderr = "\n".join(errs) + ("\n" if errs else "")
    return proc


def coordinator_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator-address", default=None, metavar="HOST[:PORT]",
                   help="where rank 0 hosts the JAX coordinator when ranks are on several hosts "
                        "(default: $DINB_COORDINATOR_ADDRESS, the config's coordinator_address, "
                        "127.0.0.1 on one host, else rank 0's address on the route to the others)")
