"""Built-in models, by name: ``get_model("matmul")``, ``get_model("mlp", d_model=256)``.

Part of the core layer (with layouts, strategies, slice files and export): imports layouts and
strategies, never the job, the runtime or anything above.
"""

from __future__ import annotations

from typing import Any

from dinb.errors import DinbError
from dinb.models.base import ModelDef, TensorSpec
from dinb.models.bert import BertEncoder, minilm_dir
from dinb.models.hf_config import FAMILIES
from dinb.models.llama import LlamaDecoder
from dinb.models.matmul import MatMulNeg, matmul_layouts
from dinb.models.mlp import DeepMLP, MegatronMLP, deep_mlp_reference, mlp_reference

MODELS: dict[str, type[ModelDef]] = {"matmul": MatMulNeg, "mlp": MegatronMLP, "mlp-deep": DeepMLP,
                                     "minilm": BertEncoder, **dict.fromkeys(FAMILIES, LlamaDecoder)}
#: the models that read a Hugging Face folder (``--weights DIR``)
TAKES_WEIGHTS = ("minilm", *FAMILIES)


def get_model(name: str, **kwargs: Any) -> ModelDef:
    """A built-in model by name, constructed with ``kwargs``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise DinbError(f"no built-in model {name!r}; choose one of {sorted(MODELS)}") from None
    return cls(**kwargs)


__all__ = ["FAMILIES", "MODELS", "TAKES_WEIGHTS", "BertEncoder", "DeepMLP", "LlamaDecoder", "MatMulNeg",
           "MegatronMLP", "ModelDef", "TensorSpec", "get_model",
           "deep_mlp_reference", "matmul_layouts", "minilm_dir", "mlp_reference"]
