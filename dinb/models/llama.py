"""A Llama-style decoder that generates, as pure JAX functions over a KV cache.

Parameters keep the Hugging Face names (``model.layers.0.self_attn.q_proj.weight``, ...) and
PyTorch's ``Linear`` layout, ``y = x W^T``. One layer, pre-norm, no biases::

    h = RMSNorm(x)                               x * rsqrt(mean(x^2) + eps) * w, in float32
    q, k, v = h Wq^T, h Wk^T, h Wv^T             H query heads, K key/value heads of dh each
    q, k = rope(q, pos), rope(k, pos)            rotary embedding, rotate_half form
    a = softmax(q k^T / sqrt(dh) + causal) v     query head i reads key/value head i // (H / K)
    x = x + a Wo^T
    x = x + (silu(h2 Wg^T) * (h2 Wu^T)) Wd^T     h2 = RMSNorm(x): the SwiGLU MLP

after ``x = embed[ids]``; the logits are ``RMSNorm(x) Wlm^T`` (``Wlm`` is the embedding when the
config ties them).

**Two computations and a cache.** Generation is a prefill, once per prompt, then one decode
step per token. Both read and write the KV cache, one array of shape ``(L, 2, S, K, T, dh)``: per
layer, keys and values of ``S`` sequence *slots* for ``K`` heads at ``T`` positions. Each takes
the cache and gives it back (the runtime donates it, so it is updated in place):

* ``prefill_rows(params, ids (R, P), lengths (R,), slots (R,), cache) -> (logits (R, V), cache)``:
  ``R`` prompts, padded to a bucket of ``P`` tokens, fill positions ``0 .. P-1`` of their slots;
  the logits are those after each one's last real token, ``length - 1``;
* ``step(params, tokens (S,), positions (S,), active (S,), cache, W) -> (logits (S, V), cache)``:
  one token per slot at its own position (slots are independent sequences: continuous
  batching), the keys at positions ``<= position`` among the first ``W`` attended.

By default the cache is a pool of blocks, ``(L, 2, B, K, b, dh)``, and both take the slots'
block tables (:mod:`dinb.models.kv_cache`: how a position maps to a block); ``cache="slots"``
keeps ``max_len`` positions per slot, ``(L, 2, S, K, T, dh)`` (what ``batch`` splits).

:mod:`dinb.models.decode_loop` builds the programs an export holds from them: tokens picked on
the device, several decode steps per call.

**The split** (``megatron`` on ``tp`` ranks, Megatron-LM's, with vLLM's rule for the KV heads):
query heads and the MLP's columns are split over ``tp`` ranks (``Wq, Wg, Wu`` by rows, ``Wo,
Wd`` by columns: **two all-reduces** of ``(batch, seq, hidden)`` per layer). Key/value heads:

* ``tp`` divides ``K``: rank r holds heads ``r K/tp .. (r+1) K/tp`` and their cache;
* ``tp`` is a multiple of ``K``: the ranks form a ``K x tp/K`` grid; the ``tp/K`` ranks of row
  ``g`` all hold key/value head ``g`` (the one their query heads read) and its cache: each head
  is *replicated* ``tp/K`` times, never split.

The logits head is split by vocabulary rows (its outputs gathered) when ``tp`` divides the
vocabulary, else replicated; the embedding and the norms are replicated. ``batch`` splits the
slots over the ranks, every rank holding every weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.models.base import ModelDef, TensorSpec
from dinb.models.hf_config import decoder_config, read_decoder_config, rope_frequencies
from dinb.models.kv_cache import PagedCache, SlotCache
from dinb.models.text import generation_defaults as read_generation_defaults
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import Strategy

DEFAULT_DECODE_STEPS = 8  # the most decode steps one call runs (the powers of two below it are there too)
WINDOWS = (128, 512, 2048, 8192, 32768)  # attention windows below max_len, each a decode program
PREFILL_TOKENS = 4096  # the most tokens one prefill call holds (rows x bucket)
def powers_up_to(most: int) -> list[int]:
    """The decode programs an export of ``decode_steps=most`` holds: ``most`` and the powers of
    two below it, ``8 -> [1, 2, 4, 8]``. A generation's tail (fewer tokens left than ``most``)
    then runs in at most log2(most) calls instead of one call per token."""
    return sorted({most, *(1 << i for i in range(max(most, 1).bit_length()) if 1 << i < most)})


class LlamaDecoder(ModelDef):
    """The Llama architecture with a KV cache (see the module docstring), and the families that
    are configurations of it (Qwen2/2.5, Qwen3, Mistral: see :mod:`dinb.models.hf_config`; the
    model takes its family's name). ``model_dir``: a Hugging Face folder as downloaded (default:
    dinb's tiny adder); or ``config=`` (a ``config.json``'s fields) for random weights."""

    name = "llama"
    strategy_names = ("megatron", "batch", "replicated")
    default_strategy = "megatron"
    generates = True

    def __init__(self, model_dir: str | Path | None = None, config: dict[str, Any] | None = None,
                 slots: int = 4, max_len: int | None = None, buckets: Sequence[int] | None = None,
                 tokenizer: str | None = None, decode_steps: int | Sequence[int] = DEFAULT_DECODE_STEPS,
                 windows: Sequence[int] | None = None, prefill_rows: Sequence[int] | None = None,
                 generation_defaults: dict[str, Any] | None = None, cache: str = "paged",
                 cache_blocks: int | None = None, block_size: int = 16):
        self.model_dir = Path(model_dir) if model_dir else None
        if config is None:
            if self.model_dir is None:  # dinb's own trained decoder
                from dinb.models.tiny_adder import adder_dir

                self.model_dir = adder_dir()
            config = read_decoder_config(self.model_dir / "config.json")
        self.hf = decoder_config(dict(config))
        self.name = self.hf["hf_family"]
        #: generation_config.json's end tokens and default sampling (see dinb.models.text)
        self.generation_defaults = (read_generation_defaults(self.model_dir) if generation_defaults is None
                                    else dict(generation_defaults))
        self.slots = int(slots)
        self.max_len = int(max_len or min(128, self.hf["max_position_embeddings"]))
        if not 1 <= self.max_len <= self.hf["max_position_embeddings"]:
            raise DinbError(f"max_len {max_len}: give 1 to the model's {self.hf['max_position_embeddings']} "
                            "positions")
        if self.slots < 1:
            raise DinbError(f"slots {slots}: give at least 1 sequence slot")
        window = self.hf.get("sliding_window")
        if window is not None and self.max_len > window:
            raise DinbError(f"max_len {self.max_len} is past the model's sliding_window of {window} "
                            "positions, where its attention would look at the last window only, which "
                            f"dinb does not compute; export with --max-len {window} or less")
        default = [b for b in (16, 64, 256) if b < self.max_len] + [self.max_len]
        self.buckets = tuple(sorted({int(b) for b in (buckets or default)}))
        bad = [b for b in self.buckets if not 1 <= b <= self.max_len]
        if bad:
            raise DinbError(f"prompt buckets {bad} do not fit max_len {self.max_len}; give lengths 1 to "
                            f"{self.max_len}")
        self.tokenizer = tokenizer
        steps = (powers_up_to(int(decode_steps)) if isinstance(decode_steps, int)
                 else [int(k) for k in decode_steps])
        if not steps or min(steps) < 1:
            raise DinbError(f"decode_steps {decode_steps}: give the decode steps one call runs, 1 or more")
        self.decode_steps = tuple(sorted({1, *steps}))
        default = [w for w in WINDOWS if w < self.max_len] + [self.max_len]
        self.windows = tuple(sorted({int(w) for w in (windows or default)}))
        if self.windows[-1] != self.max_len or self.windows[0] < 1:
            raise DinbError(f"attention windows {list(self.windows)}: give lengths up to max_len "
                            f"{self.max_len}, the largest equal to it")
        self.paged(cache, cache_blocks, block_size)
        rows = prefill_rows or [r for r in (1, 4, 16, 64, 256) if r < self.slots] + [self.slots]
        self.row_counts = tuple(sorted({int(r) for r in rows} | {1}))  # the prefill programs' rows
        if self.row_counts[-1] > self.slots:
            raise DinbError(f"prefill rows {list(self.row_counts)}: give 1 to the {self.slots} slots")

    def paged(self, cache: str, cache_blocks: int | None, block_size: int) -> None:
        """The KV cache (see :mod:`dinb.models.kv_cache`): ``paged``, a pool of ``cache_blocks``
        blocks of ``block_size`` positions (default: as many positions as ``slots x max_len``,
        the memory of a cache of slots), or ``slots``, ``max_len`` positions per slot."""
        if cache not in ("paged", "slots"):
            raise DinbError(f"cache {cache!r}: give 'paged' (a pool of blocks) or 'slots' (max_len positions "
                            "per sequence slot)")
        if cache == "slots" and cache_blocks is not None:
            raise DinbError(f"cache_blocks {cache_blocks} is the size of a paged cache; leave it out for a "
                            "cache of slots, or ask for cache='paged' (--cache paged)")
        self.block_size = int(block_size)
        if self.block_size < 1:
            raise DinbError(f"block_size {block_size}: give the positions of a cache block, 1 or more")
        self.cache_blocks = None if cache == "slots" else \
            int(cache_blocks) if cache_blocks is not None else self.slots * self.table_width
        need = self.table_width
        if self.cache_blocks is not None and self.cache_blocks < need:
            raise DinbError(f"cache_blocks {cache_blocks}: one sequence of max_len {self.max_len} takes "
                            f"{need} blocks of {self.block_size}; give --cache-blocks {need} or more "
                            "(or a smaller --max-len)")

    @property
    def table_width(self) -> int:
        """Block table entries of one sequence slot: ``ceil(max_len / block_size)``."""
        return -(-self.max_len // self.block_size)

    def prefix_shapes(self) -> list[tuple[int, int]]:
        """``(bucket, window)`` of the prefill programs for a prompt whose first blocks are cached
        (a paged export): the rest of it, up to ``bucket`` tokens, attends over ``window``
        positions of its blocks."""
        if self.cache_blocks is None:
            return []
        return [(p, w) for p in self.buckets for w in self.windows if w >= p]

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """``(rows, bucket)`` of every prefill program: for each prompt bucket ``P``, the
        ``prefill_rows`` (default 1, 4, 16, ... and the slot count) that hold at most
        :data:`PREFILL_TOKENS` tokens (or one prompt); more prompts at once run in several calls."""
        return [(r, p) for p in self.buckets for r in self.row_counts if r == 1 or r * p <= PREFILL_TOKENS]

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return int(self.hf["num_hidden_layers"])

    @property
    def heads(self) -> int:
        return int(self.hf["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.hf["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.hf["head_dim"])

    @property
    def vocab(self) -> int:
        return int(self.hf["vocab_size"])

    @property
    def end_tokens(self) -> tuple[int, ...]:
        """The end-of-sequence ids of the config and of ``generation_config.json``."""
        ids = list(self.hf.get("eos_token_id") or []) + list(self.generation_defaults.get("eos_token_id", []))
        return tuple(dict.fromkeys(int(t) for t in ids))

    def cache_shape(self) -> tuple[int, ...]:
        """``(layers, 2, slots, kv_heads, max_len, head_dim)``: keys (0) and values (1); paged:
        ``(layers, 2, cache_blocks, kv_heads, block_size, head_dim)``."""
        if self.cache_blocks is not None:
            return (self.layers, 2, self.cache_blocks, self.kv_heads, self.block_size, self.head_dim)
        return (self.layers, 2, self.slots, self.kv_heads, self.max_len, self.head_dim)

    def kv_store(self, tables: Any = None, rows: Any = None) -> SlotCache | PagedCache:
        """How the programs reach the cache: by slot, or through the block ``tables``; ``rows``:
        a step of those slots only (see :class:`~dinb.models.kv_cache.SlotCache`)."""
        if tables is None:
            return SlotCache(self.max_len, rows)
        return PagedCache(tables if rows is None else tables[rows], self.block_size)

    # ---- parameters ----------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        h, f, dh = self.hf["hidden_size"], self.hf["intermediate_size"], self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                f"{p}input_layernorm.weight": (h,),
                f"{p}self_attn.q_proj.weight": (self.heads * dh, h),
                f"{p}self_attn.k_proj.weight": (self.kv_heads * dh, h),
                f"{p}self_attn.v_proj.weight": (self.kv_heads * dh, h),
                f"{p}self_attn.o_proj.weight": (h, self.heads * dh),
                f"{p}post_attention_layernorm.weight": (h,),
                f"{p}mlp.gate_proj.weight": (f, h),
                f"{p}mlp.up_proj.weight": (f, h),
                f"{p}mlp.down_proj.weight": (h, f),
            })
            if self.hf["qkv_bias"]:
                shapes.update({f"{p}self_attn.q_proj.bias": (self.heads * dh,),
                               f"{p}self_attn.k_proj.bias": (self.kv_heads * dh,),
                               f"{p}self_attn.v_proj.bias": (self.kv_heads * dh,)})
            if self.hf["o_bias"]:
                shapes[f"{p}self_attn.o_proj.bias"] = (h,)
            if self.hf["qk_norm"]:
                shapes.update({f"{p}self_attn.q_norm.weight": (dh,), f"{p}self_attn.k_norm.weight": (dh,)})
        shapes["model.norm.weight"] = (h,)
        if not self.hf["tie_word_embeddings"]:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Random weights of the right shapes, deterministic for a seed: a matrix ``(out, in)`` is
        ``N(0, 1/in)`` (activations stay of order 1, so the logits have clear winners), a norm
        ``1 + N(0, 0.1^2)``. The Hugging Face reference (``tools/make_llama_reference.py``) loads
        the same numbers."""
        rng = np.random.default_rng(seed)
        out = {}
        for n, s in self.param_shapes().items():
            if n.endswith("norm.weight"):
                out[n] = (1 + 0.1 * rng.standard_normal(s)).astype(np.float32)
            elif n.endswith(".bias"):
                out[n] = (0.1 * rng.standard_normal(s)).astype(np.float32)
            else:
                out[n] = (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
        return out

    def checkpoint(self) -> Path | None:
        """The folder's weights: ``model.safetensors``, or the folder when its weights are sharded
        (``model.safetensors.index.json``); None without weights."""
        if self.model_dir is None:
            return None
        if (self.model_dir / "model.safetensors.index.json").is_file():
            return self.model_dir
        if (self.model_dir / "model.safetensors").is_file():
            return self.model_dir / "model.safetensors"
        return None

    # ---- the model -----------------------------------------------------------------------------
    def _rms(self, w: Any, x: Any) -> Any:
        import jax
        import jax.numpy as jnp

        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + self.hf["rms_norm_eps"])
        return w * normed.astype(x.dtype)

    def _rope(self, x: Any, pos: Any) -> Any:
        """Rotary embedding of ``x`` (..., seq, heads, dh) at positions ``pos`` (..., seq)."""
        import jax.numpy as jnp

        dh = self.head_dim
        angles = pos.astype(jnp.float32)[..., None] * rope_frequencies(self.hf)  # (..., seq, dh/2)
        cos = jnp.cos(jnp.concatenate([angles, angles], -1))[..., None, :].astype(x.dtype)
        sin = jnp.sin(jnp.concatenate([angles, angles], -1))[..., None, :].astype(x.dtype)
        half = dh // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _qkv(self, p: dict[str, Any], pre: str, x: Any, pos: Any) -> tuple[Any, Any, Any]:
        """``q`` (b, s, K, H/K, dh), ``k`` and ``v`` (b, s, K, dh): the projections (with their
        biases, Qwen2's), each head's q and k normed (Qwen3's), the rotary embedding applied."""
        b, s, _ = x.shape
        h = self._rms(p[f"{pre}input_layernorm.weight"], x)
        k_, g, dh = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q, k, v = (self._linear(p, f"{pre}self_attn.{n}_proj", h) for n in "qkv")
        q, k, v = q.reshape(b, s, self.heads, dh), k.reshape(b, s, k_, dh), v.reshape(b, s, k_, dh)
        if self.hf["qk_norm"]:
            q = self._rms(p[f"{pre}self_attn.q_norm.weight"], q)
            k = self._rms(p[f"{pre}self_attn.k_norm.weight"], k)
        q, k = self._rope(q, pos), self._rope(k, pos)
        return q.reshape(b, s, k_, g, dh), k, v

    @staticmethod
    def _linear(p: dict[str, Any], name: str, x: Any) -> Any:
        """``x W^T (+ b)``: PyTorch's ``Linear`` with the weight (and bias, where present) of ``name``."""
        y = x @ p[f"{name}.weight"].T
        return y + p[f"{name}.bias"] if f"{name}.bias" in p else y

    def _attend(self, q: Any, keys: Any, values: Any, visible: Any) -> Any:
        """``q`` (b, s, K, G, dh) over ``keys``/``values`` (b, K, t, dh); ``visible`` (b, s, t)."""
        import jax
        import jax.numpy as jnp

        scores = jnp.einsum("bskgd,bktd->bkgst", q, keys) / np.sqrt(self.head_dim).astype(q.dtype)
        scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgst,bktd->bskgd", weights, values)
        b, s = out.shape[:2]
        return out.reshape(b, s, self.heads * self.head_dim)

    def _mlp_block(self, p: dict[str, Any], pre: str, x: Any) -> Any:
        import jax

        h = self._rms(p[f"{pre}post_attention_layernorm.weight"], x)
        inner = jax.nn.silu(h @ p[f"{pre}mlp.gate_proj.weight"].T) * (h @ p[f"{pre}mlp.up_proj.weight"].T)
        return x + inner @ p[f"{pre}mlp.down_proj.weight"].T

    def logits(self, p: dict[str, Any], x: Any) -> Any:
        """``RMSNorm(x) Wlm^T`` in float32: the logits head, or the embedding where the config ties
        them (a pipeline stage's copy of it is ``lm_head.weight``: see :meth:`pipeline_layers`)."""
        import jax.numpy as jnp

        head = p["lm_head.weight" if "lm_head.weight" in p else "model.embed_tokens.weight"]
        return (self._rms(p["model.norm.weight"], x) @ head.T).astype(jnp.float32)

    @staticmethod
    def embed(p: dict[str, Any], ids: Any) -> Any:
        """The embedding's rows of token ``ids``."""
        import jax.numpy as jnp

        return jnp.take(p["model.embed_tokens.weight"], ids, axis=0)

    def decode_layers(self, p: dict[str, Any], layers: range, x: Any, positions: Any, active: Any, cache: Any,
                      window: int, tables: Any = None, rows: Any = None) -> tuple[Any, Any]:
        """``layers`` of a decode step on ``x`` (S, 1, h), the cache holding those layers only
        (layer ``i`` at ``i - layers.start``: a pipeline stage's cache; the whole model's for
        ``range(L)``); see :meth:`step`. ``rows`` (R,): ``x`` is those slots' only, (R, 1, h)."""
        import jax.numpy as jnp

        kv = self.kv_store(tables, rows)
        visible = (jnp.arange(kv.window(window))[None, None, :] <= positions[:, None, None])  # (S, 1, W)
        for i in layers:
            pre, at = f"model.layers.{i}.", i - layers.start
            q, k, v = self._qkv(p, pre, x, positions[:, None])
            cache = kv.write_one(cache, at, k[:, 0], v[:, 0], positions, active)
            a = self._attend(q, *kv.read(cache, at, window), visible)
            x = x + self._linear(p, f"{pre}self_attn.o_proj", a)
            x = self._mlp_block(p, pre, x)
        return x, cache

    def prompt_layers(self, p: dict[str, Any], layers: range, x: Any, slots: Any, cache: Any,
                      attention: str = "xla", tables: Any = None, starts: Any = None,
                      window: int | None = None) -> tuple[Any, Any]:
        """``layers`` of a prefill on ``x`` (R, P, h), the cache holding those layers only (see
        :meth:`decode_layers` and :meth:`prefill_rows`)."""
        import jax.numpy as jnp

        kv = self.kv_store(tables)
        r, p_len = x.shape[:2]
        offset = jnp.zeros((r,), jnp.int32) if starts is None else starts
        pos = offset[:, None] + jnp.arange(p_len, dtype=jnp.int32)[None]  # (R, P)
        if starts is None:
            causal = pos[:, :, None] >= pos[:, None, :]
        else:
            causal = jnp.arange(kv.window(window))[None, None, :] <= pos[:, :, None]  # (R, P, W')
        for i in layers:
            pre, at = f"model.layers.{i}.", i - layers.start
            q, k, v = self._qkv(p, pre, x, pos)
            k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (R, K, P, dh)
            cache = kv.write_prompts(cache, at, k_t, v_t, slots, offset)
            if starts is not None:
                a = self._attend(q, *kv.read_rows(cache, at, slots, window), causal)
            elif attention == "cudnn":
                a = self._flash(q, k, v)
            else:
                a = self._attend(q, k_t, v_t, causal)
            x = x + self._linear(p, f"{pre}self_attn.o_proj", a)
            x = self._mlp_block(p, pre, x)
        return x, cache

    @staticmethod
    def last_tokens(x: Any, lengths: Any, starts: Any = None) -> Any:
        """Each prompt's row of ``x`` (R, P, h) after its last token (``lengths - starts - 1``)."""
        import jax.numpy as jnp

        offset = jnp.zeros_like(lengths) if starts is None else starts
        return jnp.take_along_axis(x, (lengths - offset - 1)[:, None, None], axis=1)[:, 0]

    def step(self, params: dict[str, Any], tokens: Any, positions: Any, active: Any, cache: Any,
             window: int, tables: Any = None) -> tuple[Any, Any]:
        """One token per slot: ``tokens`` (S,) at ``positions`` (S,); logits (S, V).

        Each active slot writes its key and value at its position; an inactive one (``active``
        false) writes nothing (its position points past the cache, where a scatter drops it).
        Attention reads the first ``window`` positions of every slot (a static slice: the
        program's cost follows the window, not ``max_len``), the keys at positions ``<=
        position`` visible. ``tables``: the slots' block tables of a paged cache."""
        x = self.embed(params, tokens)[:, None]  # (S, 1, h)
        x, cache = self.decode_layers(params, range(self.layers), x, positions, active, cache, window, tables)
        return self.logits(params, x[:, 0]), cache

    def prefill_rows(self, params: dict[str, Any], ids: Any, lengths: Any, slots: Any, cache: Any,
                     attention: str = "xla", tables: Any = None, starts: Any = None,
                     window: int | None = None) -> tuple[Any, Any]:
        """Prompts ``ids`` (R, P), each padded to the bucket ``P``, into sequence slots ``slots``
        (R,) of the cache (a slot past the last one: a padding row, written nowhere); the logits
        (R, V) after each prompt's last token ``lengths - 1``. ``attention``: ``xla`` (einsum and
        softmax, every platform) or ``cudnn`` (cuDNN's flash attention, CUDA only).

        A paged cache (``tables``, the slots' block tables) may hold each prompt's first
        ``starts`` (R,) positions already (a cached prefix, whole blocks): ``ids`` are then the
        rest, at positions ``starts + 0 .. P-1``, ``lengths`` the whole prompts', and attention
        reads the first ``window`` positions of the rows' blocks."""
        x, cache = self.prompt_layers(params, range(self.layers), self.embed(params, ids), slots, cache,
                                      attention, tables, starts, window)
        return self.logits(params, self.last_tokens(x, lengths, starts)), cache

    def _flash(self, q: Any, k: Any, v: Any) -> Any:
        """Causal attention by cuDNN's fused kernel: ``q`` (R, P, K, G, dh), ``k``/``v`` (R, P, K, dh)."""
        import jax

        r, p_len = q.shape[:2]
        out = jax.nn.dot_product_attention(q.reshape(r, p_len, self.heads, self.head_dim), k, v,
                                           is_causal=True, implementation="cudnn")
        return out.reshape(r, p_len, self.heads * self.head_dim)

    def decode(self, params: dict[str, Any], tokens: Any, positions: Any, cache: Any,
               tables: Any = None) -> tuple[Any, Any]:
        """One decode step of every slot over the whole cache; logits (S, V) (see :meth:`step`)."""
        import jax.numpy as jnp

        return self.step(params, tokens, positions, jnp.ones(tokens.shape, bool), cache, self.max_len, tables)

    def apply(self, params: dict[str, Any], tokens: Any, positions: Any, cache: Any,
              tables: Any = None) -> Any:
        """The decode step (what ``predict``, the explorer and the plans run); see :meth:`decode`."""
        return self.decode(params, tokens, positions, cache, tables)

    def forward(self, params: dict[str, Any], ids: Any) -> Any:
        """Logits of every position of ``ids`` (batch, seq), no cache: the plain forward pass
        (training, and the check of the cached programs)."""
        import jax.numpy as jnp

        b, s = ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        x = jnp.take(params["model.embed_tokens.weight"], ids, axis=0)
        visible = jnp.broadcast_to(pos[0][None, :, None] >= pos[0][None, None, :], (b, s, s))
        for i in range(self.layers):
            pre = f"model.layers.{i}."
            q, k, v = self._qkv(params, pre, x, pos)
            a = self._attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), visible)
            x = x + self._linear(params, f"{pre}self_attn.o_proj", a)
            x = self._mlp_block(params, pre, x)
        return self.logits(params, x)

    # ---- inputs and outputs ----------------------------------------------------------------------
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The decode step's inputs (the program ``predict`` runs; prefill has its own)."""
        specs = (TensorSpec("tokens", (self.slots,), "int32"),
                 TensorSpec("positions", (self.slots,), "int32"), TensorSpec("kv_cache", self.cache_shape()))
        if self.cache_blocks is None:
            return specs
        return (*specs, TensorSpec("block_tables", (self.slots, self.table_width), "int32"))

    def output_names(self) -> tuple[str, ...]:
        return ("logits", "kv_cache")

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", (self.slots, self.vocab)), TensorSpec("kv_cache", self.cache_shape()))

    def example_inputs(self, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        inputs = [rng.integers(0, self.vocab, self.slots).astype(np.int32), np.zeros(self.slots, np.int32),
                  np.zeros(self.cache_shape(), np.float32)]
        if self.cache_blocks is not None:  # slot s in blocks s N .. s N + N - 1, where the pool has them
            tables = np.arange(self.slots * self.table_width).reshape(self.slots, self.table_width)
            inputs.append(np.where(tables < self.cache_blocks, tables, self.cache_blocks).astype(np.int32))
        return inputs

    def config(self) -> dict[str, Any]:
        return {"config": dict(self.hf), "slots": self.slots, "max_len": self.max_len,
                "buckets": list(self.buckets), "tokenizer": self.tokenizer,
                "decode_steps": list(self.decode_steps), "windows": list(self.windows),
                "prefill_rows": list(self.row_counts),
                "cache": "slots" if self.cache_blocks is None else "paged", "cache_blocks": self.cache_blocks,
                "block_size": self.block_size,
                "generation_defaults": dict(self.generation_defaults),
                "model_dir": str(self.model_dir) if self.model_dir else None}

    # ---- strategies ----------------------------------------------------------------------------
    def valid_tp(self) -> list[int]:
        """Tensor-parallel sizes: dividing the query heads, and dividing or a multiple of the
        key/value heads."""
        return [t for t in range(1, self.heads + 1)
                if self.heads % t == 0 and (self.kv_heads % t == 0 or t % self.kv_heads == 0)
                and self.hf["intermediate_size"] % t == 0]

    def _grid(self, tp: int) -> tuple[list[int], Any, Any]:
        """The device matrix, the map entry of query-head (and MLP) axes, that of key/value heads."""
        if tp not in self.valid_tp():
            raise StrategyError(
                f"megatron on {tp} ranks: {self.heads} query heads, {self.kv_heads} key/value heads and "
                f"{self.hf['intermediate_size']} MLP columns do not split into {tp} groups (tp must divide "
                "the query heads and the MLP, and divide or be a multiple of the key/value heads); the "
                "tensor-parallel sizes that would: "
                f"{', '.join(map(str, self.valid_tp()))}"
            )
        if tp <= self.kv_heads:
            return [tp], 0, 0
        return [self.kv_heads, tp // self.kv_heads], (1, 0), 1

    def pipeline_layers(self) -> list[list[str]]:
        """Each layer's parameters, for pipeline stages: the embedding goes with the first layer,
        the final norm and the logits head with the last. Where the config ties the head to the
        embedding, the last stage holds a copy of it as ``lm_head.weight`` (see
        :meth:`tied_copies`): both ends of the pipeline need it."""
        names = list(self.param_shapes())
        layers = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(self.layers)]
        layers[0].insert(0, "model.embed_tokens.weight")
        layers[-1] += ["model.norm.weight", "lm_head.weight"]
        return layers

    def tied_copies(self) -> dict[str, str]:
        """``{copy: source}``: parameters a staged export holds that the checkpoint has under
        another name (the tied logits head is the embedding)."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.hf["tie_word_embeddings"] else {}

    def _staged(self, base: Strategy, stages: int) -> Strategy:
        if self.hf["tie_word_embeddings"]:  # the last stage's copy, laid out as the embedding is
            embed = base.item("model.embed_tokens.weight")
            base = Strategy({**{n: base.item(n) for n in base}, "lm_head.weight": embed}, base.inputs,
                            base.outputs)
        return super()._staged(base, stages)

    def _strategy(self, device_num: int, name: str, input_shapes: Sequence[tuple[int, ...]]) -> Strategy:
        n = device_num
        if name == "batch" and self.cache_blocks is not None and n > 1:
            raise StrategyError(f"batch on {n} ranks with a paged cache: the pool of blocks is one for all "
                                "sequences, split by key/value heads; use --strategy megatron or replicated, "
                                "or a cache of slots (cache='slots', export --cache slots)")
        if name == "batch" and self.slots % n:
            sizes = [d for d in range(1, self.slots + 1) if self.slots % d == 0]
            raise StrategyError(f"batch on {n} ranks: {self.slots} sequence slots do not split into {n} "
                                f"equal parts; rank counts that would: {', '.join(map(str, sizes))}")
        if name == "megatron":
            dm, q_axis, kv_axis = self._grid(n)
        else:
            dm, q_axis, kv_axis = [n], -1, -1
        params = {}
        vocab_axis = q_axis if self.vocab % n == 0 else -1  # a vocabulary that does not divide: whole
        for pname, shape in self.param_shapes().items():
            params[pname] = Layout(dm, self._tensor_map(pname, len(shape), q_axis, kv_axis, vocab_axis))
        slot_axis = 0 if name == "batch" else -1
        cache = Layout(dm, [-1, -1, slot_axis, kv_axis, -1, -1])
        inputs = [Layout(dm, [slot_axis]), Layout(dm, [slot_axis]), cache]
        if self.cache_blocks is not None:
            inputs.append(Layout(dm, [-1, -1]))  # the block tables: whole on every rank
        outputs = [Layout(dm, [-1, -1]), cache]  # logits whole on every rank: all pick alike
        return Strategy(params, inputs=inputs, outputs=outputs)

    @staticmethod
    def _tensor_map(name: str, ndim: int, q_axis: Any, kv_axis: Any, vocab_axis: Any) -> list[Any]:
        """How parameter ``name`` splits: the q, gate and up rows (and q's bias) by query heads,
        k and v rows (and biases) by key/value heads, o and down columns by query heads, the
        logits head by vocabulary; norms, the embedding and o's bias whole."""
        if name == "lm_head.weight":
            return [vocab_axis, -1]
        parts = name.split(".")
        kind = next((k for k in ("q_proj", "gate_proj", "up_proj", "k_proj", "v_proj", "o_proj", "down_proj")
                     if k in parts), None)
        if kind is None or (ndim == 1 and kind == "o_proj"):
            return [-1] * ndim
        axis = kv_axis if kind in ("k_proj", "v_proj") else q_axis
        if ndim == 1:
            return [axis]
        return [-1, axis] if kind in ("o_proj", "down_proj") else [axis, -1]

    def cache_layout(self, strategy: Strategy) -> Layout:
        """The KV cache's layout under ``strategy`` (the decode step's third input)."""
        return strategy.inputs[2]
