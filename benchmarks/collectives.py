"""All-reduce between CPU rank processes: JAX's collectives (gloo) beside raw ``mpi4py``, one run.

    python benchmarks/collectives.py [--ranks 2 --repeat 200]

Starts ``--ranks`` processes with the ``mpich`` wheel's ``mpiexec``; each joins dinb's job
(``dinb.init_ranks``: one CPU device a process, gloo collectives) and times, on the same
processes and buffers, for float32 payloads of 32 KiB, 1 MiB and 4 MiB per rank:

  jax     a jitted ``psum`` over the processes' devices (``shard_map``), host array in, result
          waited for: what an all-reduce inside a predict costs, dispatch included
  noop    the same jitted call without the collective (the identity): the dispatch floor
  dinb    the all-reduce of a predict with ``collectives = mpi`` (the default under mpiexec):
          ``MpiCollectives.collect``, the output buffer allocated per call
  mpi4py  ``COMM_WORLD.Allreduce`` of a numpy buffer into a preallocated one

Every figure is the median over ``--repeat`` calls after a warm-up, the slowest rank's; ratios
are to ``mpi4py``. Results go to ``benchmarks/results/collectives.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = (32 * 2**10, 2**20, 4 * 2**20)


def _median_s(fn, repeat: int) -> float:
    for _ in range(max(5, repeat // 10)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_main(repeat: int) -> None:
    import dinb

    job = dinb.init_ranks("cpu")
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from mpi4py import MPI

    from dinb.models.rank_program import AllReduce
    from dinb.runtime.runners.rank_steps import MpiCollectives
    from dinb.sharding.layout import Layout

    comm = MPI.COMM_WORLD
    mpi = MpiCollectives(job.process_count, "the benchmark")
    n = job.process_count
    mesh = Layout([n], [0]).mesh(job.devices)
    spec = PartitionSpec(mesh.axis_names[0])
    sharding = NamedSharding(mesh, spec)
    mine = job.devices[job.process_index]
    allreduce = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, mesh.axis_names[0]), mesh=mesh,
                                      in_specs=spec, out_specs=spec))
    identity = jax.jit(jax.shard_map(lambda a: a + 0, mesh=mesh, in_specs=spec, out_specs=spec))
    def one_size(nbytes: int) -> dict[str, float]:
        local = np.full(nbytes // 4, job.process_index + 1, np.float32)

        def global_array():
            shard = jax.device_put(local, mine)
            return jax.make_array_from_single_device_arrays((n * local.size,), sharding, [shard])

        out = np.asarray(allreduce(global_array()).addressable_data(0))
        assert np.all(out == n * (n + 1) / 2), "the all-reduce gave a wrong sum"
        res = {
            "jax": _median_s(lambda: np.asarray(allreduce(global_array()).addressable_data(0)), repeat),
            "noop": _median_s(lambda: np.asarray(identity(global_array()).addressable_data(0)), repeat),
        }
        recv = np.empty_like(local)
        comm.Barrier()
        res["mpi4py"] = _median_s(lambda: comm.Allreduce(local, recv), repeat)
        comm.Barrier()
        res["dinb_mpi"] = _median_s(lambda: mpi.collect(AllReduce(0), local), repeat)
        slowest = {k: comm.allreduce(v, op=MPI.MAX) for k, v in res.items()}
        return {"bytes": nbytes, **{f"{k}_ms": v * 1e3 for k, v in slowest.items()}}

    rows = [one_size(nbytes) for nbytes in SIZES]
    if job.process_index == 0:
        print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        rank_main(args.repeat)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from predict_overhead import machine

    from dinb.cli import mpiexec_path

    cmd = [mpiexec_path(), "-n", str(args.ranks), sys.executable, __file__, "--rank-main", "--repeat",
           str(args.repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"all-reduce of float32 between {args.ranks} CPU rank processes (mpiexec), median of "
          f"{args.repeat}, slowest rank")
    print(f"{'payload':>9} {'jax (gloo) ms':>14} {'jit no-op ms':>13} {'dinb mpi ms':>12} {'mpi4py ms':>10} "
          f"{'jax/mpi4py':>11} {'dinb/mpi4py':>12}")
    for r in rows:
        print(f"{r['bytes'] // 1024:>6} KiB {r['jax_ms']:>14.3f} {r['noop_ms']:>13.3f} "
              f"{r['dinb_mpi_ms']:>12.3f} {r['mpi4py_ms']:>10.3f} {r['jax_ms'] / r['mpi4py_ms']:>11.2f} "
              f"{r['dinb_mpi_ms'] / r['mpi4py_ms']:>12.2f}")
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, jax {m['jax']}")
    out = ROOT / "benchmarks" / "results" / "collectives.json"
    out.write_text(json.dumps({"benchmark": "collectives", "machine": m, "ranks": args.ranks,
                               "repeat": args.repeat, "rows": rows}, indent=1) + "\n")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
