"""What a dinb model is: a pure JAX function over a dict of named arrays, plus its strategies."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.models.rank_program import RankProgram
from dinb.sharding.strategy import Strategy


def read_config_json(path: Path, model_type: str | None, family: str) -> dict[str, Any]:
    """A Hugging Face ``config.json``, checked to be a JSON object of ``model_type`` (a config
    without the field is taken to be one; None: any); ``family`` names the checkpoint in the
    errors."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DinbError(f"{path} does not exist; a {family} checkpoint directory holds config.json") from None
    except (OSError, ValueError) as e:
        raise DinbError(f"{path} is not a readable JSON config ({e})") from None
    if not isinstance(data, dict) or (model_type is not None and
                                      data.get("model_type", model_type) != model_type):
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise DinbError(f"{path}: not a {family} config (model_type {found!r})")
    return data


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

    # ---- pipeline stages ---------------------------------------------------------------------
    def pipeline_layers(self) -> list[list[str]] | None:
        """The model as a stack of layers, for pipeline stages: the parameter names of each layer,
        in order, every parameter in exactly one layer (embeddings go with the first, a head with
        the last). None when the model is not a stack of layers."""
        return None

    def apply_layers(self, params: dict[str, Any], start: int, stop: int, *values: Any) -> tuple[Any, ...]:
        """Layers ``start .. stop - 1`` alone, a pure JAX function.

        ``values`` are the model's inputs when ``start`` is 0, else what layer ``start - 1``
        returned (the *carry*: the activations one stage sends the next). The result is the
        carry, or the model's outputs when ``stop`` is the layer count, so that
        ``apply_layers(p, 0, L, *inputs) == apply(p, *inputs)``. Every value carries the batch
        on axis 0, which is what micro-batching splits.
        """
        raise StrategyError(f"model {self.name!r} is not a stack of layers; it runs as one stage")

    def tied_copies(self) -> dict[str, str]:
        """``{copy: source}``: parameters a staged strategy places in a second stage under a name
        of their own, read from ``source`` (none by default)."""
        return {}

    def stage_layers(self, stages: int) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of each stage when ``stages`` stages share the layers equally."""
        count = self._layer_count(stages)
        if stages < 1 or count % stages:
            valid = [s for s in range(1, count + 1) if count % s == 0]
            raise StrategyError(
                f"model {self.name!r} has {count} layers, which do not split into {stages} equal "
                f"stages; stage counts that would: {', '.join(map(str, valid))}"
            )
        per = count // stages
        return [(s * per, (s + 1) * per) for s in range(stages)]

    def _layer_count(self, stages: int) -> int:
        layers = self.pipeline_layers()
        if layers is None:
            raise StrategyError(
                f"model {self.name!r} is not a stack of layers and cannot be split into {stages} "
                "pipeline stages; use pipeline_stages=1 (or a model with layers, such as mlp-deep)"
            )
        return len(layers)

    def _staged(self, base: Strategy, stages: int) -> Strategy:
        """``base`` (over one stage's ranks) with every parameter placed in its layer's stage."""
        layers = self.pipeline_layers() or []
        stage_of: dict[str, int] = {}
        for s, (start, stop) in enumerate(self.stage_layers(stages)):
            for layer in layers[start:stop]:
                stage_of.update(dict.fromkeys(layer, s))
        lost = [n for n in base if n not in stage_of]
        if lost:
            raise StrategyError(
                f"model {self.name!r}: parameter {lost[0]!r} is in no layer of pipeline_layers(), so "
                "it has no pipeline stage; every parameter must belong to one layer"
            )
        return Strategy({n: replace(base.item(n), stage=stage_of[n]) for n in base},
                        base.inputs, base.outputs, stages)

    def rank_program(self, name: str, device_num: int) -> RankProgram | None:
        """What each rank computes under the named strategy, with explicit collectives (see
        :mod:`dinb.models.rank_program`); None when the model does not spell it out."""
        return None

    def strategy_name_of(self, strategy: Strategy) -> str | None:
        """Which of the model's named strategies ``strategy`` is (its layouts), or None."""
        n, stages = strategy.device_num, strategy.pipeline_stages
        for name in self.strategy_names:
            try:
                known = self.strategy(n, name, pipeline_stages=stages)
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
        pipeline_stages: int = 1,
    ) -> Strategy:
        """The strategy ``name`` (default: the model's own) for ``device_num`` ranks.

        With ``pipeline_stages = S > 1`` the ranks form ``S`` stages of ``T = device_num / S``
        ranks; stage ``s`` holds layers ``s L/S .. (s+1) L/S - 1`` (see :meth:`stage_layers`), each
        split over its stage's ``T`` ranks by the named strategy.
        """
        if device_num < 1:
            raise StrategyError(f"device_num must be >= 1, got {device_num}")
        if isinstance(pipeline_stages, bool) or not isinstance(pipeline_stages, int) or pipeline_stages < 1:
            raise StrategyError(f"pipeline_stages must be a whole number >= 1, got {pipeline_stages!r}")
        name = name or self.default_strategy
        if name not in self.strategy_names:
            raise StrategyError(
                f"model {self.name!r} has no strategy {name!r}; choose one of "
                f"{list(self.strategy_names)}"
            )
        shapes = [tuple(s) for s in input_shapes] if input_shapes else [s.shape for s in self.input_specs()]
        if pipeline_stages == 1:
            return self._strategy(device_num, name, shapes)
        count = self._layer_count(pipeline_stages)
        if count % pipeline_stages or device_num % pipeline_stages:
            valid = [s for s in range(1, count + 1) if count % s == 0 and device_num % s == 0]
            what = " and ".join(f"the {n} {w}" for n, w in ((count, "layers"), (device_num, "ranks"))
                                if n % pipeline_stages)
            raise StrategyError(
                f"{pipeline_stages} pipeline stages of model {self.name!r}: {what} do not split into "
                f"{pipeline_stages} equal parts; stage counts that divide both the {count} layers and "
                f"the {device_num} ranks: {', '.join(map(str, valid))}"
            )
        return self._staged(self._strategy(device_num // pipeline_stages, name, shapes), pipeline_stages)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
