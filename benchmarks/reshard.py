"""Loading a checkpoint saved on 8 ranks (rows split) for 2 ranks (columns split).

A synthetic model of ``--count`` float32 matrices of ``--size`` x ``--size`` (default 16 of
4096 x 4096 = 1 GiB) is saved as 8 rank slices, each matrix split by rows. Each of 2 target
ranks then loads its slices under a columns split, so every target rank needs a piece of every
source file. For each target rank, in a fresh process each (same warm page cache, rounds in
alternation, median kept):

  floor         the same byte ranges read raw with os.preadv into preallocated arrays
  dinb          load_distributed_checkpoint (tile checksums verified: XXH3-64)
  dinb-crc32    the same files as format version 1 (CRC-32 tiles, as written before)
  dinb-noverify load_distributed_checkpoint(verify=False)

reporting wall time (the best of ``--rounds``: on a warm cache the noise is one-sided, page
faults and stalls of a busy machine), bytes read, and peak RSS above the interpreter's base. Ratios are to the
floor and to the target slice bytes. With ``--mindspore-python`` (an interpreter that has
MindSpore), the whole 8 -> 2 job is also timed as MindSpore ``.ckpt`` files through
``mindspore.transform_checkpoints`` against dinb's ``transform_checkpoints`` on the same files.

    python benchmarks/reshard.py [--size 4096 --count 16 --rounds 3 --mindspore-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SRC_RANKS, DST_RANKS = 8, 2


def strategies(count: int):
    from dinb import Layout, Strategy

    names = [f"layer{i}.weight" for i in range(count)]
    src = Strategy({n: Layout([SRC_RANKS], [0, -1]) for n in names})  # rows over 8 ranks
    dst = Strategy({n: Layout([DST_RANKS], [-1, 0]) for n in names})  # columns over 2 ranks
    return names, src, dst


def rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- one measurement, in its own process --------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import dinb.checkpoint  # noqa: F401  (every method loads the same modules before the base)

    names, src, dst = strategies(args.count)
    ckpt_dir = Path(args.workdir) / ("src_v1" if args.worker == "dinb-crc32" else "src")
    np.empty(1)  # numpy warmed up before the base is taken
    base = rss_bytes()
    t0 = time.perf_counter()
    if args.worker == "floor":
        nread = floor_read(ckpt_dir, names, args.size, args.rank)
    else:
        from dinb.checkpoint import DistributedCheckpoint

        ckpt = DistributedCheckpoint(ckpt_dir, verify=args.worker != "dinb-noverify")
        out = ckpt.load_rank(dst, args.rank, show_progress=False)
        nread = ckpt.bytes_read
        assert len(out) == args.count
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "bytes_read": nread, "peak_rss": rss_bytes(), "base_rss": base}))


def floor_read(ckpt_dir: Path, names: list[str], size: int, rank: int) -> int:
    """Read the target rank's bytes with plain preadv: columns [c0, c1) of every source row."""
    from dinb.checkpoint.dinbfile import DinbRankFile

    cols = size // DST_RANKS
    c0 = rank * cols
    rows = size // SRC_RANKS
    total = 0
    out = {n: np.empty((size, cols), np.float32) for n in names}
    for s in range(SRC_RANKS):
        f = DinbRankFile(ckpt_dir / f"rank_{s}" / f"checkpoint_{s}.safetensors")
        fd = os.open(f.path, os.O_RDONLY)
        try:
            for n in names:
                start = f.tensors[n].segments[0][0]
                dest = out[n][s * rows : (s + 1) * rows]
                flat = memoryview(dest.reshape(-1).view(np.uint8))
                run = cols * 4
                for i in range(rows):
                    total += os.preadv(fd, [flat[i * run : (i + 1) * run]], start + (i * size + c0) * 4)
        finally:
            os.close(fd)
    return total


# ---- driver ----------------------------------------------------------------------------------
def prepare(workdir: Path, size: int, count: int) -> None:
    from dinb.checkpoint import save_distributed_checkpoint

    names, src, _ = strategies(count)
    rng = np.random.default_rng(0)
    params = {n: rng.random((size, size), dtype=np.float32) for n in names}
    save_distributed_checkpoint(params, src, workdir / "src")
    as_version_1(workdir / "src", workdir / "src_v1")


def as_version_1(src: Path, dst: Path) -> None:
    """Copies of dinb checkpoint files as format version 1 wrote them: CRC-32 tile checksums."""
    from dinb.checkpoint import load_checkpoint
    from dinb.checkpoint.stored import tile_checksums
    from dinb.errors import CheckpointError
    from dinb.formats import safetensors as st

    for path in sorted(src.rglob("*.safetensors")):
        meta = json.loads(st.read_header(path, CheckpointError, "checkpoint").metadata["dinb"])
        tensors = load_checkpoint(path)
        for name, rec in meta["params"].items():
            del rec["tile_xxh3_64"]
            rec["tile_crc32"] = tile_checksums(tensors[name], "crc32")
        meta["format_version"] = 1
        st.write_file(dst / path.relative_to(src), tensors, {"dinb": json.dumps(meta)})


def warm(workdir: Path) -> None:
    for p in sorted(workdir.rglob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass


def run_worker(kind: str, rank: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--rank", str(rank), "--workdir", str(args.workdir),
           "--size", str(args.size), "--count", str(args.count)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mindspore_job(args: argparse.Namespace) -> dict:
    """Time MindSpore's transform_checkpoints and dinb's on the same .ckpt files, whole 8 -> 2 job."""
    from dinb.checkpoint import DistributedCheckpoint, write_ckpt

    names, src, dst = strategies(args.count)
    work = Path(args.workdir)
    ms_src = work / "ms_src"
    if not ms_src.exists():
        ckpt = DistributedCheckpoint(work / "src")
        for r in range(SRC_RANKS):
            write_ckpt(ms_src / f"rank_{r}" / f"ckpt_{r}.ckpt", ckpt.load_rank(src, r, show_progress=False))
    src.save(work / "src_strategy.ckpt")
    dst.save(work / "dst_strategy.ckpt")
    job_args = (str(ms_src), str(work / "ms_out"), "ckpt_", str(work / "src_strategy.ckpt"),
                str(work / "dst_strategy.ckpt"))
    report = ("import json, time\n"
              "from pathlib import Path\n"
              "t = time.perf_counter()\n"
              "{call}\n"
              "hwm = [x for x in Path('/proc/self/status').read_text().splitlines()\n"
              "       if x.startswith('VmHWM')]\n"
              "print(json.dumps({{'wall_s': time.perf_counter() - t, "
              "'peak_rss': int(hwm[0].split()[1]) * 1024}}))\n")
    calls = {
        "mindspore": (args.mindspore_python,
                      f"import mindspore as ms\nms.transform_checkpoints(*{job_args!r})"),
        "dinb": (sys.executable, "from dinb.checkpoint import transform_checkpoints\n"
                 f"transform_checkpoints(*{job_args!r}, output_format='ckpt', show_progress=False)"),
    }
    results = {}
    for label, (python, call) in calls.items():
        shutil.rmtree(work / "ms_out", ignore_errors=True)
        out = subprocess.run([python, "-c", report.format(call=call)], capture_output=True, text=True,
                             check=True).stdout
        results[label] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", default="/tmp/dinb-reshard-bench")
    p.add_argument("--mindspore-python", default=None)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from predict_overhead import machine

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    prepare(work, args.size, args.count)
    print(f"saved {args.count} x {args.size}x{args.size} float32 as {SRC_RANKS} rank files "
          f"in {time.perf_counter() - t:.1f} s")
    target_bytes = args.count * args.size * (args.size // DST_RANKS) * 4
    kinds = ["floor", "dinb", "dinb-crc32", "dinb-noverify"]
    samples: dict[tuple[int, str], list[dict]] = {(r, k): [] for r in range(DST_RANKS) for k in kinds}
    for _ in range(args.rounds):
        for r in range(DST_RANKS):
            for k in kinds:
                warm(work)
                samples[(r, k)].append(run_worker(k, r, args))
    rows = []
    for r in range(DST_RANKS):
        floor = min(s["wall_s"] for s in samples[(r, "floor")])
        for k in kinds:
            ss = samples[(r, k)]
            wall = min(s["wall_s"] for s in ss)
            over = max(s["peak_rss"] - s["base_rss"] for s in ss)
            rows.append({"rank": r, "method": k, "wall_s": round(wall, 3),
                         "ratio_to_floor": round(wall / floor, 2),
                         "bytes_read": ss[0]["bytes_read"],
                         "bytes_read_ratio": round(ss[0]["bytes_read"] / target_bytes, 3),
                         "peak_rss_over_base_mib": round(over / 2**20, 1),
                         "peak_rss_ratio": round(over / target_bytes, 3),
                         "base_rss_mib": round(ss[0]["base_rss"] / 2**20, 1)})
    print(f"\ntarget slice per rank: {target_bytes / 2**20:.0f} MiB; best of {args.rounds} rounds, "
          "warm cache")
    print(f"{'rank':>4} {'method':<14} {'wall s':>7} {'/floor':>7} {'read MiB':>9} {'/slice':>7} "
          f"{'RSS+ MiB':>9} {'/slice':>7}")
    for row in rows:
        print(f"{row['rank']:>4} {row['method']:<14} {row['wall_s']:>7.3f} {row['ratio_to_floor']:>7.2f} "
              f"{row['bytes_read'] / 2**20:>9.1f} {row['bytes_read_ratio']:>7.3f} "
              f"{row['peak_rss_over_base_mib']:>9.1f} {row['peak_rss_ratio']:>7.3f}")
    result = {"machine": machine(), "size": args.size, "count": args.count, "rounds": args.rounds,
              "target_slice_bytes": target_bytes, "rows": rows}
    if args.mindspore_python:
        job = mindspore_job(args)
        result["whole_job_ckpt"] = job
        ms_s, dinb_s = job["mindspore"]["wall_s"], job["dinb"]["wall_s"]
        print(f"\nwhole 8 -> 2 job on MindSpore .ckpt files ({2 * target_bytes / 2**20:.0f} MiB in, "
              "2 rank files out):\n"
              f"  mindspore.transform_checkpoints {ms_s:.2f} s, peak RSS "
              f"{job['mindspore']['peak_rss'] / 2**30:.2f} GiB\n"
              f"  dinb transform_checkpoints      {dinb_s:.2f} s, peak RSS "
              f"{job['dinb']['peak_rss'] / 2**30:.2f} GiB\n"
              f"  MindSpore / dinb time: {ms_s / dinb_s:.2f}x")
    out = ROOT / "benchmarks" / "results" / "reshard.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten {out.relative_to(ROOT)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
