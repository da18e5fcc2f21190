"""dinb: distributed inference in the notebook.

Layers, bottom up: ``layout``/``strategy`` (how tensors are split), ``models`` (pure JAX
functions), ``export`` (per-rank slice files), ``runtime`` (``Context``/``Model``/``Tensor``),
``ranks`` (joining a job), ``checkpoint`` (sharded checkpoints), ``cluster`` + ``magics``
(notebook engines as ranks, ``%load_ext dinb``), ``plan`` + ``widgets`` (the strategy
explorer and the per-rank outputs viewer). Importing dinb does not import JAX: a rank must
configure JAX first; the widgets (and ipywidgets) load on first use.
"""

from dinb.checkpoint import (
    DistributedCheckpoint,
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
from dinb.errors import (
    CheckpointError,
    DinbError,
    InputError,
    LayoutError,
    ProviderError,
    RankFailedError,
    RankMismatchError,
    SliceFileError,
    StrategyError,
)
from dinb.explore.plan import StrategyPlan
from dinb.export import export_distributed
from dinb.export.slicefile import read_meta, read_slice_file
from dinb.job.ranks import Job, current_job
from dinb.job.ranks import init as init_ranks
from dinb.job.ranks import shutdown as shutdown_ranks
from dinb.models import DeepMLP, LlamaDecoder, MatMulNeg, MegatronMLP, ModelDef, TensorSpec, get_model
from dinb.notebook.cluster import RankCluster, start_cluster
from dinb.notebook.cluster import current as current_cluster
from dinb.runtime import Context, Model, ModelType, Tensor
from dinb.sharding.layout import Layout, common_dev_matrix
from dinb.sharding.strategy import ParamLayout, Strategy, infer_predict_layout
from dinb.version import __version__


def __getattr__(name: str) -> object:
    if name in ("StrategyExplorer", "RankOutputs", "SchedulePicture", "PoolPicture"):
        from dinb import widgets

        return getattr(widgets, name)
    if name == "rank_side":  # a rank's own side, in a cell that runs on the ranks (%%dinfer)
        from dinb.notebook import engine

        return engine
    raise AttributeError(f"module 'dinb' has no attribute {name!r}")


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext dinb``: registers the ``%dinfer`` magics."""
    from dinb.notebook.magics import load_ipython_extension as load

    load(ipython)


__all__ = [
    "CheckpointError", "DistributedCheckpoint", "RankCluster", "build_searched_strategy",
    "load_distributed_checkpoint", "merge_sliced_parameter", "rank_list_for_transform",
    "load_checkpoint", "save_checkpoint", "save_distributed_checkpoint", "start_cluster",
    "current_cluster",
    "transform_checkpoint_by_rank", "transform_checkpoints",
    "Context", "DinbError", "InputError", "Job", "Layout", "LayoutError", "MatMulNeg",
    "DeepMLP", "LlamaDecoder", "MegatronMLP", "Model", "ModelDef", "ModelType", "ParamLayout",
    "ProviderError",
    "RankFailedError", "RankMismatchError", "SliceFileError", "Strategy", "StrategyError",
    "Tensor", "TensorSpec", "__version__", "common_dev_matrix", "current_job",
    "export_distributed", "get_model", "infer_predict_layout", "init_ranks", "read_meta",
    "read_slice_file", "shutdown_ranks", "StrategyPlan", "StrategyExplorer", "RankOutputs", "PoolPicture",
    "rank_side",
]
