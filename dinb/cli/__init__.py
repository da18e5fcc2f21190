"""``python -m dinb``: export a model, run the ranks of a job, serve, or MindSpore's MatMul demo.

Subcommands::

    python -m dinb export --model matmul --strategy contraction --ranks 2 --out out/
    mpiexec -n 2 python -m dinb run --model-dir out/       # one process per rank
    python -m dinb run --model-dir out/ --simulate 2        # one process, 2 virtual devices
    python -m dinb demo                                     # export + mpiexec -n 2, all strategies
    python -m dinb reshard ckpt/ out/ --src-strategy train.ckpt --dst-strategy predict.json
    python -m dinb export --model mlp --checkpoint out/ --strategy-file predict.json --out slices/
    python -m dinb export --model minilm --strategy megatron --ranks 2 --out minilm/
    python -m dinb export --model mlp-deep --ranks 4 --pipeline-stages 2 --out deep/   # 2 x 2
    mpiexec -n 4 python -m dinb run --model-dir deep/ --micro-batches 4
    mpiexec -n 2 python -m dinb embed --model-dir minilm/ "a sentence" "another sentence"
    python -m dinb export --model llama --ranks 2 --out adder/          # the tiny adder, 2 ranks
    mpiexec -n 2 python -m dinb generate --model-dir adder/ "123+456="  # streams "579"

Layer: the top one. One module per group of subcommands (``export_cmds``, ``run_cmds``,
``serve_cmds``), each adding its parsers; it may import everything, nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import sys

from dinb.cli import export_cmds, run_cmds, serve_cmds
from dinb.cli.common import NOISE, launch, mpiexec_path
from dinb.errors import DinbError

__all__ = ["NOISE", "mpiexec_path", "build_parser", "launch", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinb", description=__doc__.split("\nLayer:")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (export_cmds, run_cmds, serve_cmds):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DinbError as e:
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
        where = f"[rank {rank}] " if rank is not None else ""
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2

