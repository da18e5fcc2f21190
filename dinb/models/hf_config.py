"""Hugging Face decoder configs as downloaded: Llama 3.x, Qwen2/2.5, Qwen3 and Mistral, read into
the one set of fields :class:`dinb.models.llama.LlamaDecoder` computes with.

The four families are one decoder (pre-norm RMSNorm, rotary positions, grouped-query attention,
SwiGLU) that differ in a few switches, so dinb reads them as configurations of it rather than as
models of their own:

==========  =======================================================================================
family      what it adds to the Llama shape
==========  =======================================================================================
llama       ``rope_scaling`` of type ``llama3`` (Llama 3.1/3.2) or ``linear``; an explicit
            ``head_dim``; tied embeddings (3.2-1B/3B); ``attention_bias`` (q, k, v and o biases)
qwen2       biases on q, k and v (``Qwen2.5`` too); often tied embeddings; a large rope theta
qwen3       an RMSNorm on each head's q and k (``q_norm``, ``k_norm``) before the rotary embedding;
            ``head_dim`` other than hidden / heads
mistral     the Llama shape; ``sliding_window`` attention, refused where it would matter (an
            export whose ``max_len`` exceeds the window)
==========  =======================================================================================

Rotary settings come from ``rope_parameters`` (what transformers 5 writes) or from
``rope_scaling`` and ``rope_theta`` (transformers 4, most of the Hub's folders). The frequencies
of ``llama3`` scaling, for wavelength ``w = 2 pi / f`` of each frequency ``f``::

    w < L / high:   f                       (high frequencies kept)
    w > L / low:    f / factor              (low frequencies slowed)
    otherwise:      (1 - s) f / factor + s f,  s = (L / w - low) / (high - low)

with ``L = original_max_position_embeddings`` and ``low``/``high`` the two frequency factors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError
from dinb.models.base import read_config_json

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def read_decoder_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face decoder folder, checked and normalized (see the module)."""
    return decoder_config(read_config_json(path, None, "decoder"), str(path))


def family_of(data: dict[str, Any], where: str) -> str:
    """The family of a config's ``model_type`` (a config without one is a Llama), or a clear error."""
    family = data.get("model_type", "llama")
    if family not in FAMILIES:
        raise DinbError(f"{where}: model_type {family!r} is not a decoder dinb reads; it reads the families "
                        f"{', '.join(FAMILIES)} (Llama 3.x, Qwen2/2.5, Qwen3, Mistral)")
    return str(family)


def decoder_config(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """``data`` (a ``config.json``) checked and completed with its family's defaults: the fields
    :class:`~dinb.models.llama.LlamaDecoder` reads."""
    if "hf_family" in data:  # normalized already (an export's model_config)
        return dict(data)
    family = family_of(data, where)
    if data.get("hidden_act", "silu") != "silu":
        raise DinbError(f"{where}: hidden_act {data['hidden_act']!r}; these decoders compute SwiGLU with "
                        "silu")
    if data.get("mlp_bias"):
        raise DinbError(f"{where}: mlp_bias = true is not supported (no family dinb reads has MLP biases)")
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise DinbError(f"{where}: missing {missing}")
    heads = int(data["num_attention_heads"])
    cfg = {k: data[k] for k in REQUIRED}
    cfg.update(
        hf_family=family,
        model_type=family,
        num_key_value_heads=int(data.get("num_key_value_heads") or heads),
        head_dim=int(data.get("head_dim") or data["hidden_size"] // heads),
        max_position_embeddings=int(data.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        qkv_bias=bool(family == "qwen2" or data.get("attention_bias", False)),
        o_bias=bool(family in ("llama", "mistral") and data.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=_sliding_window(family, data),
        eos_token_id=_ids(data.get("eos_token_id")),
        bos_token_id=data.get("bos_token_id"),
    )
    cfg.update(_rope(data, where))
    if heads % cfg["num_key_value_heads"]:
        raise DinbError(f"{where}: {heads} query heads do not share {cfg['num_key_value_heads']} key/value "
                        "heads evenly")
    if family == "llama" and "head_dim" not in data and data["hidden_size"] % heads:
        raise DinbError(f"{where}: hidden_size {data['hidden_size']} does not split into {heads} heads")
    return cfg


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _sliding_window(family: str, data: dict[str, Any]) -> int | None:
    """The attention window of a config, when its layers use one (Mistral's; Qwen's only with
    ``use_sliding_window``)."""
    window = data.get("sliding_window")
    if family.startswith("qwen") and not data.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _rope(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``rope_theta`` and a normalized ``rope_scaling`` (None: plain rotary positions)."""
    params = data.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5
        theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = data.get("rope_theta", 10000.0)
        scaling = data.get("rope_scaling")
    if scaling is None:
        return {"rope_theta": float(theta), "rope_scaling": None}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return {"rope_theta": float(theta), "rope_scaling": {"rope_type": "linear",
                                                             "factor": float(scaling["factor"])}}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        lost = [k for k in keys if k not in scaling]
        if lost:
            raise DinbError(f"{where}: rope_scaling of type llama3 lacks {lost}")
        return {"rope_theta": float(theta), "rope_scaling": {"rope_type": "llama3",
                                                             **{k: float(scaling[k]) for k in keys}}}
    raise DinbError(f"{where}: rope type {kind!r} is not supported; dinb computes rotary positions plain, "
                    "with linear scaling or with Llama 3's (rope_type 'llama3')")


def rope_frequencies(cfg: dict[str, Any]) -> np.ndarray:
    """The rotary embedding's ``head_dim / 2`` inverse frequencies (float32), scaled as the
    config says (see the module docstring)."""
    dh = int(cfg["head_dim"])
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return inv.astype(np.float32)
    if scaling["rope_type"] == "linear":
        return (inv / scaling["factor"]).astype(np.float32)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)
