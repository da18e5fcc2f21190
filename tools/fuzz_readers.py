"""Mutation fuzzing of every dinb reader of outside bytes: only typed errors may come out.

    python tools/fuzz_readers.py --seconds 600            # the long run; prints a table
    python tools/fuzz_readers.py --replay slice:123456    # one mutation again, with its traceback

The corpus is every MindSpore-made fixture (``.ckpt`` checkpoints and protobuf strategy files)
plus files dinb writes itself: a slice file, a checkpoint rank file, a JSON strategy file and a
``[runtime]`` config file. Each trial takes one file, applies 1-4 mutations (bit flips,
interesting bytes, truncation, insertion, deletion, duplicated or swapped ranges, over-long
varints, and edits of the JSON inside a safetensors header or a JSON file, length prefix kept
right), and hands the result to every reader of that kind. A reader may succeed or raise a
``DinbError``; anything else is *untyped* and reported with the mutation's seed. A trial that
makes a reader allocate more than the file's size allows (4x the file plus 8 MiB, measured with
tracemalloc) or run longer than 5 s is reported too. ``tests/test_fuzz_readers.py`` runs a few
seconds of this in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "mindspore"
TRIAL_TIMEOUT_S = 5
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x1A, 0x22, 0x2D, 0x30, 0x7B, 0x7D]


@dataclass
class Sample:
    """One corpus file: its kind (which readers take it), a file name and its bytes."""

    kind: str
    name: str
    data: bytes
    beside: dict[str, bytes] = field(default_factory=dict)  # files written unchanged next to it


@dataclass
class Report:
    trials: Counter = field(default_factory=Counter)
    typed: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    untyped: list[dict] = field(default_factory=list)
    oversized: list[dict] = field(default_factory=list)
    hangs: list[dict] = field(default_factory=list)

    @property
    def problems(self) -> list[dict]:
        return self.untyped + self.oversized + self.hangs

    def table(self) -> str:
        rows = [f"{'kind':<14}{'trials':>10}{'typed errors':>14}{'read fine':>11}"]
        for kind in sorted(self.trials):
            rows.append(f"{kind:<14}{self.trials[kind]:>10}{self.typed[kind]:>14}{self.accepted[kind]:>11}")
        rows.append(f"{'all':<14}{sum(self.trials.values()):>10}{sum(self.typed.values()):>14}"
                    f"{sum(self.accepted.values()):>11}")
        rows.append(f"untyped exceptions: {len(self.untyped)}   over-allocations: {len(self.oversized)}   "
                    f"hangs: {len(self.hangs)}")
        for p in self.problems[:20]:
            rows.append(f"  {p['kind']}:{p['seed']} {p['what']}")
        return "\n".join(rows)


# ---- the corpus and the readers ----------------------------------------------------------------
def corpus(work: Path) -> list[Sample]:
    """The MindSpore fixtures plus one file of each kind dinb writes (made here, small)."""
    import numpy as np

    import dinb
    from dinb.checkpoint import save_distributed_checkpoint
    from dinb.models import DeepMLP, MatMulNeg, MegatronMLP

    samples = []
    for p in sorted(FIXTURES.rglob("*.ckpt")):
        kind = "strategy_pb" if p.name.startswith("strategy_") else "ckpt"
        samples.append(Sample(kind, p.name, p.read_bytes()))
    m = MatMulNeg(matmul_size=(8, 4), batch=4)
    export = work / "export"
    dinb.export_distributed(m, m.init_params(), m.strategy(2), [np.ones((4, 8), np.float32)], export)
    samples.append(Sample("slice", "matmul1.dinb", (export / "matmul1.dinb").read_bytes(),
                          {"matmul0.dinb": (export / "matmul0.dinb").read_bytes()}))
    samples.append(Sample("strategy_json", "strategy.json", (export / "strategy.json").read_bytes()))
    deep = DeepMLP(d_model=8, d_ff=16, layers=2, batch=2)
    piped = work / "pipelined"
    x = np.ones((2, 8), np.float32)
    dinb.export_distributed(deep, deep.init_params(), deep.strategy(2, pipeline_stages=2), [x], piped)
    samples.append(Sample("slice", "mlp-deep1.dinb", (piped / "mlp-deep1.dinb").read_bytes(),
                          {"mlp-deep0.dinb": (piped / "mlp-deep0.dinb").read_bytes()}))
    samples.append(Sample("strategy_json", "strategy.json", (piped / "strategy.json").read_bytes()))
    mlp = MegatronMLP(d_model=8, d_ff=16, batch=2)
    ckpt = save_distributed_checkpoint(mlp.init_params(), mlp.strategy(2), work / "ckpt")
    samples.append(Sample("dinb_ckpt", "checkpoint_1.safetensors", ckpt[1].read_bytes()))
    samples.append(Sample("strategy_json", "train.json", (work / "ckpt" / "strategy.json").read_bytes()))
    samples.append(Sample("ini", "runtime.ini", b"[runtime]\ninit_timeout_s = 30\nagree_timeout_s = 60\n"
                                                b"verify_checksums = true\nmicro_batches = 2\n"
                                                b"stage_timeout_s = 60\nstage_transfer = auto\n"))
    return samples


def readers(kind: str) -> list[tuple[str, Callable[[Path], object]]]:
    """Every dinb function that reads a file of this kind from outside."""
    from dinb import Strategy
    from dinb.checkpoint import (
        DistributedCheckpoint,
        MindSporeCheckpoint,
        build_searched_strategy,
        load_checkpoint,
        load_distributed_checkpoint,
    )
    from dinb.checkpoint.dinbfile import DinbRankFile
    from dinb.export.slicefile import find_slice_files, read_meta, read_program, read_slice_file
    from dinb.runtime.config import load_config

    return {
        "ckpt": [("MindSporeCheckpoint", MindSporeCheckpoint), ("load_checkpoint", load_checkpoint),
                 ("load_distributed_checkpoint", lambda p: load_distributed_checkpoint(None, [p], None))],
        "strategy_pb": [("build_searched_strategy", build_searched_strategy)],
        "strategy_json": [("Strategy.load", Strategy.load)],
        "slice": [("read_meta", read_meta), ("read_program", read_program),
                  ("read_slice_file", read_slice_file),
                  ("find_slice_files", lambda p: find_slice_files(p.parent))],
        "dinb_ckpt": [("DinbRankFile", DinbRankFile), ("load_checkpoint", load_checkpoint),
                      ("DistributedCheckpoint", lambda p: DistributedCheckpoint({1: p}).read_boxes({}))],
        "ini": [("load_config", load_config)],
    }[kind]


# ---- mutations -----------------------------------------------------------------------------------
def _span(rng: random.Random, n: int) -> tuple[int, int]:
    a = rng.randrange(n + 1)
    return a, min(n, a + rng.choice([1, 2, 4, 8, rng.randrange(1, 64)]))


def _pos(rng: random.Random, n: int) -> int:
    """A position, biased towards the start of the file, where headers live."""
    return rng.randrange(min(n, 512) if rng.random() < 0.6 else n) if n else 0


def mutate_bytes(rng: random.Random, data: bytearray) -> str:
    n = len(data)
    op = rng.choice(["flip", "byte", "truncate", "insert", "delete", "duplicate", "swap", "varint"])
    if n == 0:
        op = "insert"
    if op == "flip":
        i = _pos(rng, n)
        data[i] ^= 1 << rng.randrange(8)
    elif op == "byte":
        data[_pos(rng, n)] = rng.choice(INTERESTING + [rng.randrange(256)])
    elif op == "truncate":
        del data[rng.randrange(n):]
    elif op == "insert":
        i = _pos(rng, n) if n else 0
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    elif op == "delete":
        a, b = _span(rng, n)
        del data[a:b]
    elif op == "duplicate":
        a, b = _span(rng, n)
        i = _pos(rng, n)
        data[i:i] = data[a:b]
    elif op == "swap":
        a, b = _span(rng, n)
        c, d = _span(rng, n)
        if b <= c:
            data[a:d] = data[c:d] + data[b:c] + data[a:b]
    else:  # an over-long or huge varint where a length or a key was
        i = _pos(rng, n)
        data[i:i + 1] = bytes([0xFF] * rng.randrange(1, 12) + [rng.randrange(128)])
    return op


def _mutate_json(rng: random.Random, value: object, depth: int = 0) -> object:
    """A copy of ``value`` with one node changed: a new type, an extreme number, a dropped key."""
    if isinstance(value, dict) and value and (depth < 6 and rng.random() < 0.8):
        key = rng.choice(list(value))
        out = dict(value)
        if rng.random() < 0.15:
            del out[key]
        else:
            out[key] = _mutate_json(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and (depth < 6 and rng.random() < 0.8):
        i = rng.randrange(len(value))
        out = list(value)
        if rng.random() < 0.1:
            del out[i]
        elif rng.random() < 0.1:
            out.append(out[i])
        else:
            out[i] = _mutate_json(rng, value[i], depth + 1)
        return out
    return rng.choice([None, True, -1, 0, 1, 2**31, 2**63, -2**63, 10**30, 1.5, float("nan"), "", "x",
                       "F32", [], {}, [0] * 70, [2] * 30, [-1, -1], {"a": 1}, "é"])


def mutate_json_text(rng: random.Random, text: bytes) -> bytes | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return json.dumps(_mutate_json(rng, value)).encode()


def mutate_safetensors_header(rng: random.Random, data: bytearray) -> bool:
    """Edit the JSON header (or the dinb JSON inside its metadata), keeping the length prefix right."""
    if len(data) < 8:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return False
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except ValueError:
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("dinb"), str) and rng.random() < 0.7:
        new = mutate_json_text(rng, meta["dinb"].encode())
        if new is None:
            return False
        header["__metadata__"] = dict(meta, dinb=new.decode())
    else:
        header = _mutate_json(rng, header)
    blob = json.dumps(header).encode()
    data[:8 + n] = struct.pack("<Q", len(blob)) + blob
    return True


def mutate(rng: random.Random, sample: Sample) -> tuple[bytes, list[str]]:
    data = bytearray(sample.data)
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4])):
        structured = sample.kind in ("slice", "dinb_ckpt", "strategy_json") and rng.random() < 0.5
        if structured and sample.kind == "strategy_json":
            new = mutate_json_text(rng, bytes(data))
            if new is not None:
                data = bytearray(new)
                ops.append("json")
                continue
        if structured and mutate_safetensors_header(rng, data):
            ops.append("header-json")
            continue
        ops.append(mutate_bytes(rng, data))
    return bytes(data), ops


# ---- running -------------------------------------------------------------------------------------
def pick(samples: list[Sample], seed: int) -> Sample:
    """The sample of a trial: every kind equally often, then any file of that kind."""
    kinds = sorted({s.kind for s in samples})
    of_kind = [s for s in samples if s.kind == kinds[seed % len(kinds)]]
    return of_kind[(seed // len(kinds)) % len(of_kind)]


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang()


def trial(sample: Sample, seed: int, work: Path, report: Report, verbose: bool = False) -> None:
    from dinb.errors import DinbError

    rng = random.Random(seed)
    data, ops = mutate(rng, sample)
    folder = work / sample.kind
    folder.mkdir(exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    for name, other in sample.beside.items():
        (folder / name).write_bytes(other)
    path = folder / sample.name
    path.write_bytes(data)
    limit = 4 * max(len(data), len(sample.data)) + 8 * 2**20
    report.trials[sample.kind] += 1
    typed = False
    for name, read in readers(sample.kind):
        where = {"kind": sample.kind, "seed": seed, "file": sample.name, "reader": name, "ops": ops}
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        signal.alarm(TRIAL_TIMEOUT_S)
        try:
            read(path)
        except DinbError:
            typed = True
        except _Hang:
            report.hangs.append(dict(where, what=f"{name} ran over {TRIAL_TIMEOUT_S} s"))
        except Exception as e:  # the point of the exercise: nothing else may escape
            frame = traceback.extract_tb(e.__traceback__)[-1]
            report.untyped.append(dict(where, what=f"{name}: {type(e).__name__}: {str(e)[:120]} "
                                                   f"at {Path(frame.filename).name}:{frame.lineno}"))
            if verbose:
                traceback.print_exc()
        finally:
            signal.alarm(0)
        peak = tracemalloc.get_traced_memory()[1] - base
        if peak > limit:
            report.oversized.append(dict(where, what=f"{name} allocated {peak} bytes for a "
                                                     f"{len(data)}-byte file"))
    if typed:
        report.typed[sample.kind] += 1
    else:
        report.accepted[sample.kind] += 1


def run(seconds: float, seed: int = 0, work: Path | None = None, verbose: bool = False) -> Report:
    """Fuzz every reader for ``seconds``; trial ``i`` uses seed ``seed * 10**9 + i`` (replayable)."""
    own = work is None
    tmp = tempfile.TemporaryDirectory(prefix="dinb-fuzz-") if own else None
    work = Path(tmp.name) if tmp else work
    assert work is not None
    samples = corpus(work / "corpus")
    report = Report()
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    try:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            trial_seed = seed * 10**9 + i
            trial(pick(samples, trial_seed), trial_seed, work, report, verbose)
            i += 1
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
        if tmp:
            tmp.cleanup()
    return report


def replay(spec: str) -> Report:
    kind, seed = spec.split(":")
    with tempfile.TemporaryDirectory(prefix="dinb-fuzz-") as d:
        samples = corpus(Path(d) / "corpus")
        sample = pick(samples, int(seed))
        assert sample.kind == kind, f"seed {seed} picks a {sample.kind} sample"
        report = Report()
        tracemalloc.start()
        signal.signal(signal.SIGALRM, _alarm)
        trial(sample, int(seed), Path(d), report, verbose=True)
        tracemalloc.stop()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 1000)
    parser.add_argument("--replay", default=None, help="KIND:SEED of one reported trial")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.monotonic()
    report = replay(args.replay) if args.replay else run(args.seconds, args.seed)
    print(f"fuzzed dinb's readers for {time.monotonic() - t0:.0f} s (seed {args.seed}), "
          f"python {sys.version.split()[0]}")
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps({
            "seconds": args.seconds, "seed": args.seed, "trials": dict(report.trials),
            "typed": dict(report.typed), "accepted": dict(report.accepted), "untyped": report.untyped,
            "oversized": report.oversized, "hangs": report.hangs}, indent=1))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
