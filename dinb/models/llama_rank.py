"""What one rank of a Megatron-split decoder computes, with its two all-reduces a layer named.

Under ``megatron`` on ``tp`` ranks, rank ``r``'s slices are themselves the weights of a smaller
decoder: ``H / tp`` query heads, ``K_r`` key/value heads (``K / tp``, or 1 replicated where
``tp > K``), ``f / tp`` MLP columns, and the logits head's vocabulary rows ``V / tp`` where the
vocabulary divides (else whole). So a rank runs :class:`~dinb.models.llama.LlamaDecoder`'s own
functions on a *local* decoder of those sizes, except where a partial sum leaves the rank::

    per layer:  a_r = attention(local heads, local cache)       local
                x  += sum_r a_r Wo_r^T   (+ Wo's bias, once)     all-reduce of (rows, seq, hidden)
                x  += sum_r mlp_r(RMSNorm(x))                    all-reduce of (rows, seq, hidden)
    logits = concat_r RMSNorm(x) Wlm_r^T                         all-gather over the vocabulary

``replicated`` is the same with ``tp = 1`` on every rank (no collective). The runtime
(:mod:`dinb.runtime.runners.decoder_mpi`) compiles :mod:`dinb.models.decode_loop`'s programs over
:class:`RankModel`, its collectives host callbacks into MPI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dinb.errors import StrategyError


def local_decoder(model: Any, tp: int) -> Any:
    """The decoder of one rank's slices under ``megatron`` on ``tp`` ranks (same slots, lengths,
    windows and cache kind as ``model``)."""
    from dinb.models.llama import LlamaDecoder

    if tp not in model.valid_tp():
        raise StrategyError(f"megatron on {tp} ranks does not split {model.name!r}; sizes that would: "
                            f"{model.valid_tp()}")
    hf = dict(model.hf)
    kv = model.kv_heads // tp if tp <= model.kv_heads else 1
    hf.update(num_attention_heads=model.heads // tp, num_key_value_heads=kv,
              intermediate_size=hf["intermediate_size"] // tp, head_dim=model.head_dim)
    local = LlamaDecoder(config=hf, slots=model.slots, max_len=model.max_len, buckets=model.buckets,
                         decode_steps=model.decode_steps, windows=model.windows,
                         prefill_rows=model.row_counts, generation_defaults=model.generation_defaults,
                         cache="slots" if model.cache_blocks is None else "paged",
                         cache_blocks=model.cache_blocks, block_size=model.block_size)
    return local


class RankModel:
    """One rank's decoder (see the module docstring): ``step`` and ``prefill_rows`` as
    :class:`~dinb.models.llama.LlamaDecoder` has them, on this rank's slices, the sums and the
    gather done by ``all_reduce`` and ``all_gather`` (functions of a traced array: the runtime
    passes host callbacks into MPI), so :mod:`dinb.models.decode_loop`'s programs run on it."""

    def __init__(self, model: Any, tp: int, all_reduce: Callable[[Any], Any] | None = None,
                 all_gather: Callable[[Any], Any] | None = None):
        self.model, self.tp = model, tp
        self.local = local_decoder(model, tp) if tp > 1 else model
        self.layers, self.max_len = model.layers, model.max_len
        self.vocab_split = tp > 1 and not model.hf["tie_word_embeddings"] and model.vocab % tp == 0
        self.all_reduce = all_reduce if tp > 1 and all_reduce else (lambda x: x)
        self.all_gather = all_gather if self.vocab_split and all_gather else (lambda x: x)

    @staticmethod
    def embed(p: dict[str, Any], ids: Any) -> Any:
        import jax.numpy as jnp

        return jnp.take(p["model.embed_tokens.weight"], ids, axis=0)

    def logits(self, p: dict[str, Any], x: Any) -> Any:
        """The whole logits: this rank's vocabulary rows, gathered."""
        return self.all_gather(self.local.logits(p, x))

    def last_tokens(self, x: Any, lengths: Any, starts: Any = None) -> Any:
        return self.local.last_tokens(x, lengths, starts)

    def _layers(self, p: dict[str, Any], layers: range, x: Any, cache: Any,
                attend: Callable[[int, Any, Any], tuple[Any, Any]]) -> tuple[Any, Any]:
        """``layers``: this rank's attention, its sum, this rank's MLP, its sum."""
        for layer in layers:
            partial, cache = attend(layer, x, cache)
            x, partial = self.mlp(p, layer, x, self.all_reduce(partial))
            x = x + self.all_reduce(partial)
        return x, cache

    def decode_layers(self, p: dict[str, Any], layers: range, x: Any, positions: Any, active: Any, cache: Any,
                      window: int, tables: Any = None, rows: Any = None) -> tuple[Any, Any]:
        """:meth:`LlamaDecoder.decode_layers` on this rank (its heads, its cache of those layers)."""
        return self._layers(p, layers, x, cache, lambda layer, x, cache: self.attention(
            p, layer, x, positions, active, cache, window, tables, layer - layers.start, rows))

    def prompt_layers(self, p: dict[str, Any], layers: range, x: Any, slots: Any, cache: Any,
                      attention: str = "xla", tables: Any = None, starts: Any = None,
                      window: int | None = None) -> tuple[Any, Any]:
        """:meth:`LlamaDecoder.prompt_layers` on this rank (XLA's attention)."""
        return self._layers(p, layers, x, cache, lambda layer, x, cache: self.prompt_attention(
            p, layer, x, slots, starts, cache, window, tables, layer - layers.start))

    def step(self, p: dict[str, Any], tokens: Any, positions: Any, active: Any, cache: Any, window: int,
             tables: Any = None) -> tuple[Any, Any]:
        """:meth:`LlamaDecoder.step` on this rank: the whole logits (S, V) and this rank's cache."""
        x = self.embed(p, tokens)[:, None]
        x, cache = self.decode_layers(p, range(self.layers), x, positions, active, cache, window, tables)
        return self.logits(p, x[:, 0]), cache

    def prefill_rows(self, p: dict[str, Any], ids: Any, lengths: Any, slots: Any, cache: Any,
                     attention: str = "xla", tables: Any = None, starts: Any = None,
                     window: int | None = None) -> tuple[Any, Any]:
        """:meth:`LlamaDecoder.prefill_rows` on this rank (XLA's attention)."""
        x, cache = self.prompt_layers(p, range(self.layers), self.embed(p, ids), slots, cache, attention,
                                      tables, starts, window)
        return self.logits(p, self.last_tokens(x, lengths, starts)), cache

    def decode(self, p: dict[str, Any], tokens: Any, positions: Any, cache: Any,
               tables: Any = None) -> tuple[Any, Any]:
        """One decode step of every slot over the whole cache (the export's step program)."""
        import jax.numpy as jnp

        return self.step(p, tokens, positions, jnp.ones(tokens.shape, bool), cache, self.max_len, tables)

    def attention(self, p: dict[str, Any], layer: int, x: Any, positions: Any, active: Any, cache: Any,
                  window: int, tables: Any, at: int, rows: Any = None) -> tuple[Any, Any]:
        """Layer ``layer``'s attention on this rank's heads: its partial ``a_r Wo_r^T`` and the
        cache with this step's keys and values."""
        import jax.numpy as jnp

        m, pre = self.local, f"model.layers.{layer}."
        kv = m.kv_store(tables, rows)
        visible = jnp.arange(kv.window(window))[None, None, :] <= positions[:, None, None]
        q, k, v = m._qkv(p, pre, x, positions[:, None])
        cache = kv.write_one(cache, at, k[:, 0], v[:, 0], positions, active)
        a = m._attend(q, *kv.read(cache, at, window), visible)
        return a @ p[f"{pre}self_attn.o_proj.weight"].T, cache

    def mlp(self, p: dict[str, Any], layer: int, x: Any, attended: Any) -> tuple[Any, Any]:
        """``x`` after the attention's sum, and this rank's partial of the MLP."""
        import jax

        pre = f"model.layers.{layer}."
        x = x + attended
        if f"{pre}self_attn.o_proj.bias" in p:
            x = x + p[f"{pre}self_attn.o_proj.bias"]
        h = self.local._rms(p[f"{pre}post_attention_layernorm.weight"], x)
        inner = jax.nn.silu(h @ p[f"{pre}mlp.gate_proj.weight"].T) * (h @ p[f"{pre}mlp.up_proj.weight"].T)
        return x, inner @ p[f"{pre}mlp.down_proj.weight"].T

    def prompt_attention(self, p: dict[str, Any], layer: int, x: Any, slots: Any, starts: Any, cache: Any,
                         window: int | None, tables: Any, at: int) -> tuple[Any, Any]:
        """Layer ``layer``'s attention of ``R`` prompts at positions ``starts + 0 .. P-1``
        (causal over their own keys, or through the blocks over ``window`` positions after a
        cached prefix); the partial and the cache."""
        import jax.numpy as jnp

        m, pre = self.local, f"model.layers.{layer}."
        kv = m.kv_store(tables)
        r, p_len = x.shape[:2]
        offset = jnp.zeros((r,), jnp.int32) if starts is None else starts
        pos = offset[:, None] + jnp.arange(p_len, dtype=jnp.int32)[None]
        q, k, v = m._qkv(p, pre, x, pos)
        k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        cache = kv.write_prompts(cache, at, k_t, v_t, slots, offset)
        if starts is None:
            a = m._attend(q, k_t, v_t, pos[:, :, None] >= pos[:, None, :])
        else:
            visible = jnp.arange(kv.window(window))[None, None, :] <= pos[:, :, None]
            a = m._attend(q, *kv.read_rows(cache, at, slots, window), visible)
        return a @ p[f"{pre}self_attn.o_proj.weight"].T, cache
