"""The MindSpore-Lite-shaped runtime: ``Context``, ``Model``, ``ModelType``, ``Tensor``.

Layer: runs slice files on a job's ranks; imports the core and the job, never checkpoints,
serving, the explorer or the notebook side (which build on it).
"""

from dinb.runtime.config import RuntimeConfig, load_config
from dinb.runtime.context import Context, DeviceInfo, ModelType
from dinb.runtime.model import Model
from dinb.runtime.tensor import Tensor

__all__ = ["Context", "DeviceInfo", "Model", "ModelType", "RuntimeConfig", "Tensor", "load_config"]
