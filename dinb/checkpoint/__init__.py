"""Distributed checkpoints: per-rank slices, overlap-only resharding, MindSpore's files.

``save_checkpoint`` writes one file of whole tensors (MindSpore's signature);
``save_distributed_checkpoint`` writes ``rank_{r}/`` slice files; ``load_distributed_checkpoint`` reads one
rank's slices for another layout or rank count, touching only the bytes that rank needs;
``transform_checkpoints`` does the same offline for every rank. MindSpore ``.ckpt`` and
protobuf strategy files are read and written directly.

Modules: ``boxes`` (which part of a tensor a rank holds), ``stored`` (reading a box of a stored
tensor), ``dinbfile`` and ``ckpt_file`` (dinb's and MindSpore's file formats), ``distributed``
(the index of a checkpoint's rank files and its read plans), ``mindspore_api`` (the functions
with MindSpore's names).

Layer: above the core (layouts, strategies) and the job (a rank's own index); beside the runtime,
which it does not import, nor does the runtime import it.
"""

from dinb.checkpoint.boxes import param_box
from dinb.checkpoint.ckpt_file import MindSporeCheckpoint, write_ckpt
from dinb.checkpoint.dinbfile import DinbRankFile
from dinb.checkpoint.distributed import DistributedCheckpoint
from dinb.checkpoint.mindspore_api import (
    build_searched_strategy,
    load_checkpoint,
    load_distributed_checkpoint,
    merge_sliced_parameter,
    rank_list_for_transform,
    save_checkpoint,
    save_distributed_checkpoint,
    transform_checkpoint_by_rank,
    transform_checkpoints,
)

__all__ = [
    "DinbRankFile", "DistributedCheckpoint", "MindSporeCheckpoint", "param_box", "build_searched_strategy",
    "load_checkpoint",
    "load_distributed_checkpoint", "merge_sliced_parameter", "rank_list_for_transform",
    "save_checkpoint", "save_distributed_checkpoint", "transform_checkpoint_by_rank",
    "transform_checkpoints", "write_ckpt",
]
