"""Distributed checkpoints: per-rank slices, overlap-only resharding, MindSpore's files.

``save_checkpoint`` writes ``rank_{r}/`` slice files; ``load_distributed_checkpoint`` reads one
rank's slices for another layout or rank count, touching only the bytes that rank needs;
``transform_checkpoints`` does the same offline for every rank. MindSpore ``.ckpt`` and
protobuf strategy files are read and written directly.
"""

from dinb.checkpoint.mindspore import MindSporeCheckpoint, write_ckpt
from dinb.checkpoint.reshard import (
    DistributedCheckpoint,
    load_distributed_checkpoint,
    merge_sliced_parameter,
    rank_list_for_transform,
    save_checkpoint,
    transform_checkpoint_by_rank,
    transform_checkpoints,
)
from dinb.strategy import Strategy


def build_searched_strategy(strategy_filename: str) -> Strategy:
    """Read a strategy file (MindSpore's name): JSON when ``*.json``, protobuf otherwise."""
    return Strategy.load(strategy_filename)


__all__ = [
    "DistributedCheckpoint", "MindSporeCheckpoint", "build_searched_strategy",
    "load_distributed_checkpoint", "merge_sliced_parameter", "rank_list_for_transform",
    "save_checkpoint", "transform_checkpoint_by_rank", "transform_checkpoints", "write_ckpt",
]
