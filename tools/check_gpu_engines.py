"""Notebook engines on GPUs, checked end to end (run it where there are GPUs).

    python tools/check_gpu_engines.py [-n 1] [--engines local|mpi]

Starts N engines bound to GPUs 0..N-1 (``dinb.start_cluster(n, devices="gpu")``), prints the
status table (GPU name and memory per rank), runs the seeds' MatMul (every element -48) and the
Megatron MLP against numpy through the cluster, and stops. Exit status 0 when all agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1)
    parser.add_argument("--engines", default="local", choices=["local", "mpi"])
    parser.add_argument("--devices", default="gpu", choices=["gpu", "cpu"], help="cpu: try the script here")
    args = parser.parse_args()

    import dinb
    from dinb.magics import rank_table
    from dinb.models import MatMulNeg, MegatronMLP, mlp_reference

    work = Path(tempfile.mkdtemp(prefix="dinb-gpu-engines-"))
    matmul, mlp = MatMulNeg(), MegatronMLP(d_model=1024, d_ff=4096, batch=8)
    x = np.ones((128, 96), np.float32)
    dinb.export_distributed(matmul, matmul.init_params(), matmul.strategy(args.n, "contraction"), [x],
                            work / "matmul")
    params, xm = mlp.init_params(1), mlp.example_inputs(2)[0]
    dinb.export_distributed(mlp, params, mlp.strategy(args.n, "megatron"), [xm], work / "mlp")

    t0 = time.perf_counter()
    cluster = dinb.start_cluster(args.n, engines=args.engines, devices=args.devices, timeout_s=120)
    ok = True
    try:
        print(f"{args.n} {args.engines} engine(s) started and joined in {time.perf_counter() - t0:.1f} s")
        cluster.context(args.devices, "xla")
        cluster.load(work / "matmul", show_progress=False)
        print(rank_table(cluster.status()))
        y = cluster.predict(x)
        seed = bool(np.all(y.outputs[0] == -48)) and y.agree
        print(f"seeds' MatMul (contraction over {args.n}): every element -48: {seed}; "
              f"ranks agree: {y.agree}; first row {y.outputs[0][0, :4]}")
        cluster.load(work / "mlp", show_progress=False)
        got = cluster.predict(xm)
        err = float(np.abs(got.outputs[0] - mlp_reference(params, xm)).max())
        times = [cluster.predict(xm).seconds for _ in range(50)]
        print(f"Megatron MLP d=1024 ff=4096 batch 8: max |dinb - numpy| = {err:.2e}; "
              f"ranks agree: {got.agree}; %dinfer predict median {1e3 * float(np.median(times)):.2f} ms")
        print(rank_table(cluster.status()))
        ok = seed and got.agree and err < 1e-2
    finally:
        cluster.stop()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
