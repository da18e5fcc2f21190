"""Exporting a downloaded decoder folder: time and peak memory against their floors.

    python benchmarks/export.py                     # a Llama-3.2-3B-shaped folder, tp 1, 2, 4
    python benchmarks/export.py --config reference  # the small test config (a quick look)

The benchmark first writes a Hugging Face folder of random bfloat16 weights of the config's shape
(sharded at 2 GB, with its index, as downloads come: about 6.4 GB for the 3B shape), then, in
a fresh process per tensor-parallel size, runs ``python -m dinb export --weights DIR --ranks N``
and records:

  seconds          the whole export, and its parts: tracing the programs (which does not depend
                   on the weights), reading the ranks' slices, writing the slice files
  disk floor       seconds to read every file of the folder once (page cache as the export
                   finds it: the same files, read just before), and to write as many bytes
                   (the slice files hold every weight once more)
  peak RSS         the export process's own peak resident memory (VmHWM: a forked child's
                   getrusage would count the parent's pages), against the largest rank's share
                   of the weights plus the largest tensor

Results go to ``benchmarks/results/export.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import CONFIGS  # noqa: E402
from predict_overhead import machine  # noqa: E402

SHARD_BYTES = 2 * 2**30


def write_folder(config: dict[str, Any], out: Path) -> None:
    """Random bfloat16 weights in shards of at most 2 GB, with the index, and config.json."""
    from dinb.formats.safetensors import np_dtype, write_file
    from dinb.models import LlamaDecoder

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"])))
    rng = np.random.default_rng(0)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, shape in LlamaDecoder(config=config).param_shapes().items():
        a = rng.standard_normal(shape, dtype=np.float32).astype(np_dtype("bfloat16"))
        if size + a.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(out / file, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_once(nbytes: int, folder: Path) -> float:
    """Seconds to write ``nbytes`` into a new file in ``folder`` (64 MiB at a time, as the export
    writes: into the page cache, the kernel writing back), the file removed after."""
    buf = np.ones(64 * 2**20, np.uint8).data
    path = folder / "write-floor.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(-(-nbytes // len(buf))):
            f.write(buf)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def read_once(folder: Path) -> float:
    """Seconds to read every file of ``folder`` (64 MiB at a time)."""
    buf = bytearray(64 * 2**20)
    t0 = time.perf_counter()
    for p in sorted(folder.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def export_case(folder: Path, ranks: int, out: Path) -> dict[str, Any]:
    """One export in a child process: its seconds, the seconds of its slice files and its peak RSS."""
    code = (
        "import sys, time, json\n"
        "import dinb.export.distributed as d\n"
        "spent = {'trace_s': 0.0, 'read_s': 0.0, 'write_s': 0.0}\n"
        "def timed(key, f):\n"
        "    def run(*a, **k):\n"
        "        t0 = time.perf_counter(); r = f(*a, **k); spent[key] += time.perf_counter() - t0; return r\n"
        "    return run\n"
        "d.trace_programs = timed('trace_s', d.trace_programs)\n"
        "d.ParamSource.slices = timed('read_s', d.ParamSource.slices)\n"
        "d.write_slice_file = timed('write_s', d.write_slice_file)\n"
        "from dinb.cli import main\n"
        "t0 = time.perf_counter()\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(json.dumps(dict(spent, rc=rc, seconds=time.perf_counter() - t0, peak_rss=hwm)))\n"
    )
    args = [
        "export",
        "--weights",
        str(folder),
        "--ranks",
        str(ranks),
        "--slots",
        "1",
        "--max-len",
        "64",
        "--buckets",
        "64",
        "--out",
        str(out),
    ]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rank_shares(folder: Path, ranks: int) -> tuple[int, int]:
    """The largest rank's bytes of weights under the decoder's strategy, and the largest tensor's."""
    from dinb.checkpoint import DistributedCheckpoint
    from dinb.models import LlamaDecoder

    decoder = LlamaDecoder(folder, slots=1, max_len=64, buckets=[64])
    specs = DistributedCheckpoint(decoder.checkpoint()).param_specs()
    strategy = decoder.strategy(ranks)
    per_rank = [
        sum(
            int(np.prod([b - a for a, b in ((s.start, s.stop) for s in strategy.slice_of(n, r, shape))])) * 2
            for n, (shape, _) in specs.items()
        )
        for r in range(ranks)
    ]
    return max(per_rank), max(int(np.prod(shape)) * 2 for shape, _ in specs.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="3b", help="3b (Llama-3.2-3B's shape) or reference")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "export.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dinb-bench-export-"))
    rows = []
    try:
        folder = work / "folder"
        t0 = time.perf_counter()
        write_folder(CONFIGS[args.config], folder)
        made_s = time.perf_counter() - t0
        total = sum(p.stat().st_size for p in folder.iterdir())
        for n in [int(r) for r in args.ranks.split(",")]:
            write_floor = write_once(total, work)
            read_floor = read_once(folder)
            result = export_case(folder, n, work / f"tp{n}")
            share, largest = rank_shares(folder, n)
            row = {
                "ranks": n,
                "export_s": result["seconds"],
                "trace_s": result["trace_s"],
                "read_s": result["read_s"],
                "write_s": result["write_s"],
                "read_floor_s": read_floor,
                "write_floor_s": write_floor,
                "x_read_floor": (result["read_s"] + result["write_s"]) / read_floor,
                "x_disk_floor": (result["read_s"] + result["write_s"]) / (read_floor + write_floor),
                "peak_rss_GB": result["peak_rss"] / 1e9,
                "rank_share_GB": share / 1e9,
                "largest_tensor_GB": largest / 1e9,
                "x_share_plus_tensor": result["peak_rss"] / (share + largest),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / f"tp{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nexport of a {args.config}-shaped bfloat16 folder ({total / 1e9:.2f} GB, made in {made_s:.0f} s)"
    )
    print("ranks | export s | trace s | read s | write s | read floor s | write floor s | "
          "(read+write) / read floor | / disk floor | peak RSS GB | share + tensor GB | ratio")
    for r in rows:
        print(f"{r['ranks']} | {r['export_s']:.1f} | {r['trace_s']:.1f} | {r['read_s']:.1f} | "
              f"{r['write_s']:.1f} | {r['read_floor_s']:.1f} | {r['write_floor_s']:.1f} | "
              f"{r['x_read_floor']:.2f} | {r['x_disk_floor']:.2f} | {r['peak_rss_GB']:.2f} | "
              f"{r['rank_share_GB'] + r['largest_tensor_GB']:.2f} | {r['x_share_plus_tensor']:.2f}")
    print(f"machine: {machine()}")
    Path(args.out).write_text(
        json.dumps(
            {"machine": machine(), "config": args.config, "folder_GB": total / 1e9, "rows": rows}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
