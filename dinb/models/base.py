"""What a dinb model is: a pure JAX function over a dict of named arrays, plus its strategies."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinb.errors import StrategyError
from dinb.models.rank_program import RankProgram
from dinb.strategy import Strategy


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


class ModelDef(ABC):
    """A model: ``apply(params, *inputs)`` plus the strategies it knows for N devices.

    Subclasses set ``name``, ``strategy_names`` and implement the abstract methods. Parameter
    names are the checkpoint keys, so a strategy file reads naturally.
    """

    name: str = "model"
    strategy_names: tuple[str, ...] = ()

    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shape of every parameter, by name."""

    @abstractmethod
    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Full-size parameters as numpy arrays (deterministic for a seed)."""

    @abstractmethod
    def apply(self, params: dict[str, Any], *inputs: Any) -> Any:
        """The forward pass, a pure JAX function (one output, or a tuple of outputs)."""

    @abstractmethod
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The inputs a predict call takes, with example shapes."""

    @abstractmethod
    def _strategy(self, device_num: int, name: str, input_shapes: Sequence[tuple[int, ...]]) -> Strategy:
        """The named strategy for ``device_num`` devices (name already validated)."""

    default_strategy: str = ""

    def output_names(self) -> tuple[str, ...]:
        return ("output_0",)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The outputs a predict returns (traced with ``jax.eval_shape`` unless a model knows)."""
        import jax

        out = jax.eval_shape(self.apply,
                             {k: jax.ShapeDtypeStruct(s, "float32") for k, s in self.param_shapes().items()},
                             *[jax.ShapeDtypeStruct(s.shape, s.dtype) for s in self.input_specs()])
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        names = self.output_names()
        return tuple(TensorSpec(names[i] if i < len(names) else f"output_{i}", tuple(o.shape),
                                str(o.dtype)) for i, o in enumerate(outs))

    def checkpoint(self) -> Any:
        """A checkpoint of the model's released weights (a path, or anything
        :class:`dinb.checkpoint.DistributedCheckpoint` opens), or None: export then uses
        :meth:`init_params`."""
        return None

    def rank_program(self, name: str, device_num: int) -> RankProgram | None:
        """What each rank computes under the named strategy, with explicit collectives (see
        :mod:`dinb.models.rank_program`); None when the model does not spell it out."""
        return None

    def strategy_name_of(self, strategy: Strategy) -> str | None:
        """Which of the model's named strategies ``strategy`` is (its layouts), or None."""
        n = strategy.device_num
        for name in self.strategy_names:
            try:
                known = self.strategy(n, name)
            except StrategyError:
                continue
            if (all(k in strategy and strategy[k] == known[k] for k in known) and len(known) == len(strategy)
                    and (not strategy.inputs or strategy.inputs == known.inputs)
                    and (not strategy.outputs or strategy.outputs == known.outputs)):
                return name
        return None

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this model (stored in exports); ``{}`` if unknown."""
        return {}

    def example_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Deterministic example inputs matching :meth:`input_specs`."""
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s.shape).astype(s.dtype) for s in self.input_specs()]

    def strategy(
        self,
        device_num: int,
        name: str | None = None,
        input_shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> Strategy:
        """The strategy ``name`` (default: the model's own) for ``device_num`` ranks."""
        if device_num < 1:
            raise StrategyError(f"device_num must be >= 1, got {device_num}")
        name = name or self.default_strategy
        if name not in self.strategy_names:
            raise StrategyError(
                f"model {self.name!r} has no strategy {name!r}; choose one of "
                f"{list(self.strategy_names)}"
            )
        shapes = [tuple(s) for s in input_shapes] if input_shapes else [s.shape for s in self.input_specs()]
        return self._strategy(device_num, name, shapes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
