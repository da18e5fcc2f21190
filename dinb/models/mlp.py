"""A Megatron-style tensor-parallel MLP: ``y = gelu(x @ W1 + b1) @ W2 + b2``.

Shapes: ``x`` (batch, d), ``W1`` (d, ff), ``b1`` (ff), ``W2`` (ff, d), ``b2`` (d).

The ``megatron`` strategy on N ranks (``dev_matrix = [N]``):

* ``W1 = [W1_1, ..., W1_N]`` is split by **columns** (tensor_map ``[-1, 0]``) and ``b1`` with it:
  rank r computes ``h_r = gelu(x @ W1_r + b1_r)``, its own ff/N hidden units, with no
  communication (gelu acts element-wise, so it commutes with the column split).
* ``W2 = [W2_1; ...; W2_N]`` is split by **rows** (tensor_map ``[0, -1]``): rank r computes the
  partial output ``h_r @ W2_r``; ``y = sum_r h_r @ W2_r + b2`` needs **one all-reduce** of a
  (batch, d) tensor. ``b2`` is replicated and added once, after the sum.

Other strategies: ``batch`` (rows of x split, weights replicated: no communication until the
outputs are gathered) and ``replicated`` (every rank computes everything).

:class:`DeepMLP` (``mlp-deep``) stacks ``L`` such blocks with residual connections,
``x_{i+1} = x_i + mlp_i(x_i)``, parameters ``layer{i}.w1`` ... : the model for pipeline stages,
where stage ``s`` of ``S`` holds blocks ``s L/S .. (s+1) L/S - 1`` and sends its ``(batch, d)``
activations to stage ``s + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dinb.models.base import ModelDef, TensorSpec
from dinb.models.rank_program import AllGather, AllReduce, Local, RankProgram
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import Strategy


class MegatronMLP(ModelDef):
    """Column-parallel then row-parallel MLP (see the module docstring)."""

    name = "mlp"
    strategy_names = ("megatron", "batch", "replicated")
    default_strategy = "megatron"

    def __init__(self, d_model: int = 1024, d_ff: int = 4096, batch: int = 8):
        self.d_model, self.d_ff, self.batch = d_model, d_ff, batch

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.d_model, self.d_ff
        return {"w1": (d, f), "b1": (f,), "w2": (f, d), "b2": (d,)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        d, f = self.d_model, self.d_ff
        return {
            "w1": (rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32),
            "b1": (0.1 * rng.standard_normal(f)).astype(np.float32),
            "w2": (rng.standard_normal((f, d)) / np.sqrt(f)).astype(np.float32),
            "b2": (0.1 * rng.standard_normal(d)).astype(np.float32),
        }

    def apply(self, params: dict[str, Any], x: Any) -> Any:
        return mlp_block(params, x)

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", (self.batch, self.d_model)),)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("output_0", (self.batch, self.d_model)),)

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "d_ff": self.d_ff, "batch": self.batch}

    def rank_program(self, name: str, device_num: int) -> RankProgram | None:
        """Rank r's part of each strategy (see the module docstring)."""
        import jax

        def partial(p: dict[str, Any], x: Any) -> tuple[Any, ...]:
            return (jax.nn.gelu(x @ p["w1"] + p["b1"], approximate=True) @ p["w2"],)

        if name == "megatron":
            return RankProgram((Local(partial, "h_r = gelu(x W1_r + b1_r) W2_r"), AllReduce(),
                                Local(lambda p, h: (h + p["b2"],), "y = sum_r h_r + b2")))
        whole = Local(lambda p, x: (self.apply(p, x),), "y_r = mlp(x_r)")
        return RankProgram((whole, AllGather(axis=0)) if name == "batch" else (whole,))

    def _strategy(self, device_num: int, name: str, input_shapes: Sequence[tuple[int, ...]]) -> Strategy:
        return block_strategy(device_num, name, [""])


def mlp_block(p: dict[str, Any], x: Any, prefix: str = "") -> Any:
    """``gelu(x W1 + b1) W2 + b2`` with the parameters named ``{prefix}w1`` ..."""
    import jax

    h = jax.nn.gelu(x @ p[f"{prefix}w1"] + p[f"{prefix}b1"], approximate=True)
    return h @ p[f"{prefix}w2"] + p[f"{prefix}b2"]


def block_strategy(n: int, name: str, prefixes: Sequence[str]) -> Strategy:
    """The named strategy for MLP blocks with parameter prefixes ``prefixes``, on ``n`` ranks."""
    rep1, rep2 = Layout([n], [-1]), Layout([n], [-1, -1])
    if name == "megatron":
        block = {"w1": Layout([n], [-1, 0]), "b1": Layout([n], [0]), "w2": Layout([n], [0, -1]), "b2": rep1}
    else:
        block = {"w1": rep2, "b1": rep1, "w2": rep2, "b2": rep1}
    x = Layout([n], [0, -1]) if name == "batch" else rep2
    params = {f"{pre}{k}": lay for pre in prefixes for k, lay in block.items()}
    return Strategy(params, inputs=[x], outputs=[rep2])


class DeepMLP(ModelDef):
    """``layers`` residual Megatron blocks, ``x_{i+1} = x_i + mlp_i(x_i)`` (see the module docstring)."""

    name = "mlp-deep"
    strategy_names = ("megatron", "batch", "replicated")
    default_strategy = "megatron"

    def __init__(self, d_model: int = 1024, d_ff: int = 4096, layers: int = 8, batch: int = 8):
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.d_model, self.d_ff, self.layers, self.batch = d_model, d_ff, layers, batch

    def _prefixes(self) -> list[str]:
        return [f"layer{i}." for i in range(self.layers)]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.d_model, self.d_ff
        return {f"{pre}{k}": s for pre in self._prefixes()
                for k, s in (("w1", (d, f)), ("b1", (f,)), ("w2", (f, d)), ("b2", (d,)))}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        one = MegatronMLP(self.d_model, self.d_ff)
        return {f"{pre}{k}": v for i, pre in enumerate(self._prefixes())
                for k, v in one.init_params(seed + i).items()}

    def apply(self, params: dict[str, Any], x: Any) -> Any:
        return self.apply_layers(params, 0, self.layers, x)[0]

    def pipeline_layers(self) -> list[list[str]]:
        return [[f"{pre}{k}" for k in ("w1", "b1", "w2", "b2")] for pre in self._prefixes()]

    def apply_layers(self, params: dict[str, Any], start: int, stop: int, *values: Any) -> tuple[Any, ...]:
        (x,) = values
        for pre in self._prefixes()[start:stop]:
            x = x + mlp_block(params, x, pre)
        return (x,)

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", (self.batch, self.d_model)),)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("output_0", (self.batch, self.d_model)),)

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "d_ff": self.d_ff, "layers": self.layers, "batch": self.batch}

    def rank_program(self, name: str, device_num: int) -> RankProgram | None:
        """Rank r's part: per block, its columns' partial sum, one all-reduce, the residual."""
        import jax

        if name != "megatron":
            whole = Local(lambda p, x: (self.apply(p, x),), "y_r = deep_mlp(x_r)")
            return RankProgram((whole, AllGather(axis=0)) if name == "batch" else (whole,))
        steps: list[Any] = []
        for i, pre in enumerate(self._prefixes()):
            def part(p: dict[str, Any], x: Any, pre: str = pre) -> tuple[Any, ...]:
                h = jax.nn.gelu(x @ p[f"{pre}w1"] + p[f"{pre}b1"], approximate=True)
                return x, h @ p[f"{pre}w2"]

            def residual(p: dict[str, Any], x: Any, h: Any, pre: str = pre) -> tuple[Any, ...]:
                return (x + h + p[f"{pre}b2"],)

            steps += [Local(part, f"block {i}: h_r = gelu(x W1_r + b1_r) W2_r"), AllReduce(),
                      Local(residual, f"block {i}: x = x + sum_r h_r + b2")]
        return RankProgram(tuple(steps))

    def _strategy(self, device_num: int, name: str, input_shapes: Sequence[tuple[int, ...]]) -> Strategy:
        return block_strategy(device_num, name, self._prefixes())


def mlp_reference(params: dict[str, np.ndarray], x: np.ndarray, prefix: str = "") -> np.ndarray:
    """The same MLP block in plain numpy (float64), for checking results."""
    p = {k: params[f"{prefix}{k}"].astype(np.float64) for k in ("w1", "b1", "w2", "b2")}
    z = x.astype(np.float64) @ p["w1"] + p["b1"]
    h = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    return h @ p["w2"] + p["b2"]


def deep_mlp_reference(params: dict[str, np.ndarray], x: np.ndarray, layers: int) -> np.ndarray:
    """:class:`DeepMLP` in plain numpy (float64)."""
    x = x.astype(np.float64)
    for i in range(layers):
        x = x + mlp_reference(params, x, f"layer{i}.")
    return x
