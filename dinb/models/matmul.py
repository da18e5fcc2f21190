"""MindSpore's example network: ``y = -(x @ W)`` with ``W`` of shape (96, 16) filled with 0.5.

With ``x = ones((128, 96))`` every output element is ``-(96 * 0.5) = -48``, whatever the split.

MindSpore shards the MatMul with ``matmul.shard(((a, b), (b, c)))``: ``x`` (m, k) is cut into
``a x b`` blocks, ``W`` (k, n) into ``b x c``. The device grid is ``dev_matrix = [a, b, c]``
(a repeat dimension ``N / (a*b*c)`` is put in front when the product is smaller than N), and

    x: tensor_map [2, 1]     W: tensor_map [1, 0]     partial y: tensor_map [2, 0]

The three strategies of MindSpore's example, for N ranks:

* ``contraction`` ``((1, N), (N, 1))``: rank r holds ``x[:, k_r]`` and ``W[k_r, :]``; each
  computes a partial sum ``x[:, k_r] @ W[k_r, :]`` of the full (m, n) output, and an
  **all-reduce** adds the N partial sums.
* ``batch`` ``((N, 1), (1, 1))``: rank r holds rows ``x[m_r, :]`` and all of ``W``; it computes
  its rows of y with no communication (an all-gather assembles y on every rank).
* ``columns`` ``((1, 1), (1, N))``: rank r holds all of x and the columns ``W[:, n_r]``; it
  computes y's columns ``n_r`` (an all-gather assembles y on every rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dinb.errors import StrategyError
from dinb.models.base import ModelDef, TensorSpec
from dinb.models.rank_program import AllGather, AllReduce, Local, RankProgram
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import Strategy

MATMUL_SHARDS = {
    "contraction": lambda n: ((1, n), (n, 1)),
    "batch": lambda n: ((n, 1), (1, 1)),
    "columns": lambda n: ((1, 1), (1, n)),
}


def matmul_layouts(
    shard: tuple[tuple[int, int], tuple[int, int]], device_num: int
) -> tuple[Layout, Layout, Layout]:
    """MindSpore's layouts of ``x``, ``W`` and the (partial) output for ``MatMul.shard(shard)``."""
    (a, b), (b2, c) = shard
    if b != b2:
        raise StrategyError(
            f"MatMul shard {shard}: the contraction dimension must be split the same way in x and "
            f"W ({b} vs {b2})"
        )
    used = a * b * c
    if device_num % used:
        raise StrategyError(
            f"MatMul shard {shard} uses {used} devices, which does not divide device_num="
            f"{device_num}; use a shard whose product divides {device_num}"
        )
    repeat = device_num // used
    dev = [repeat, a, b, c] if repeat > 1 else [a, b, c]
    return Layout(dev, [2, 1]), Layout(dev, [1, 0]), Layout(dev, [2, 0])


class MatMulNeg(ModelDef):
    """MindSpore's MatMul+Neg example network (see the module docstring for the three splits)."""

    name = "matmul"
    strategy_names = tuple(MATMUL_SHARDS)
    default_strategy = "contraction"

    def __init__(self, matmul_size: tuple[int, int] = (96, 16), batch: int = 128,
                 shard: tuple[tuple[int, int], tuple[int, int]] | None = None):
        self.matmul_size = tuple(matmul_size)
        self.batch = batch
        self.shard = tuple(tuple(int(v) for v in s) for s in shard) if shard else None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"matmul_weight": self.matmul_size}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        return {"matmul_weight": np.full(self.matmul_size, 0.5, dtype=np.float32)}

    def apply(self, params: dict[str, Any], x: Any) -> Any:
        return -(x @ params["matmul_weight"])

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", (self.batch, self.matmul_size[0])),)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("output_0", (self.batch, self.matmul_size[1])),)

    def config(self) -> dict[str, Any]:
        return {"matmul_size": list(self.matmul_size), "batch": self.batch,
                "shard": [list(s) for s in self.shard] if self.shard else None}

    def example_inputs(self, seed: int = 0) -> list[np.ndarray]:
        return [np.ones((self.batch, self.matmul_size[0]), np.float32)]

    def strategy(self, device_num: int, name: str | None = None,
                 input_shapes: Sequence[tuple[int, ...]] | None = None, pipeline_stages: int = 1) -> Strategy:
        if name is None and self.shard is not None and pipeline_stages == 1:
            return self._from_shard(self.shard, device_num)
        return super().strategy(device_num, name, input_shapes, pipeline_stages)

    def _strategy(self, device_num: int, name: str, input_shapes: Sequence[tuple[int, ...]]) -> Strategy:
        return self._from_shard(MATMUL_SHARDS[name](device_num), device_num)

    def rank_program(self, name: str, device_num: int) -> RankProgram | None:
        """Rank r's part of each named split (see the module docstring)."""
        def neg_matmul(p: dict[str, Any], x: Any) -> tuple[Any, ...]:
            return (-(x @ p["matmul_weight"]),)

        if name == "contraction":
            return RankProgram((
                Local(lambda p, x: (x @ p["matmul_weight"],), "partial y_r = x[:, k_r] @ W[k_r, :]"),
                AllReduce(),
                Local(lambda p, y: (-y,), "y = -(sum_r y_r)"),
            ))
        if name in ("batch", "columns"):
            return RankProgram((Local(neg_matmul, "y_r = -(x_r @ W_r)"),
                                AllGather(axis=0 if name == "batch" else 1)))
        return None

    def _from_shard(self, shard: Any, device_num: int) -> Strategy:
        x_layout, w_layout, _ = matmul_layouts(shard, device_num)
        return Strategy({"matmul_weight": w_layout}, inputs=[x_layout],
                        outputs=[Layout.replicated(2, device_num)])
