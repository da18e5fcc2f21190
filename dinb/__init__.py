"""dinb: distributed inference in the notebook.

Layers, bottom up: ``layout``/``strategy`` (how tensors are split), ``models`` (pure JAX
functions), ``export`` (per-rank slice files), ``runtime`` (``Context``/``Model``/``Tensor``),
``ranks`` (joining a job). Importing dinb does not import JAX: a rank must configure JAX first.
"""

from dinb.errors import (
    DinbError,
    InputError,
    LayoutError,
    ProviderError,
    RankFailedError,
    RankMismatchError,
    SliceFileError,
    StrategyError,
)
from dinb.export import export_distributed
from dinb.layout import Layout, common_dev_matrix
from dinb.models import MatMulNeg, MegatronMLP, ModelDef, TensorSpec, get_model
from dinb.ranks import Job, current_job
from dinb.ranks import init as init_ranks
from dinb.ranks import shutdown as shutdown_ranks
from dinb.runtime import Context, Model, ModelType, Tensor
from dinb.slicefile import read_meta, read_slice_file
from dinb.strategy import ParamLayout, Strategy, infer_predict_layout
from dinb.version import __version__

__all__ = [
    "Context", "DinbError", "InputError", "Job", "Layout", "LayoutError", "MatMulNeg",
    "MegatronMLP", "Model", "ModelDef", "ModelType", "ParamLayout", "ProviderError",
    "RankFailedError", "RankMismatchError", "SliceFileError", "Strategy", "StrategyError",
    "Tensor", "TensorSpec", "__version__", "common_dev_matrix", "current_job",
    "export_distributed", "get_model", "infer_predict_layout", "init_ranks", "read_meta",
    "read_slice_file", "shutdown_ranks",
]
