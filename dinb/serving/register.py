"""What a servable's ``servable_config.py`` declares: its distributed model, and methods of stages.

As in MindSpore Serving::

    from dinb.serving import distributed, register

    model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=False)

    @register.register_method(output_names=["y"])
    def predict(x):
        y = register.add_stage(model, x, outputs_count=1)
        return y

A method is traced once when the servable loads: it is called with placeholders for its inputs,
and every ``add_stage`` records a stage (the distributed model, run by the agents, or a Python
function run in the serving process) and returns placeholders for its outputs. Serving a request
replays the stages on the request's arrays.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dinb.errors import DinbError


class ServableError(DinbError):
    """A servable is declared wrongly, or cannot be served."""


@dataclass(frozen=True)
class DistributedModel:
    """The model a servable declares: ``rank_size`` agents in ``stage_size`` pipeline stages."""

    rank_size: int
    stage_size: int = 1
    with_batch_dim: bool = True
    without_batch_dim_inputs: tuple[int, ...] = ()


@dataclass(frozen=True)
class Value:
    """A placeholder for one array while a method is traced."""

    index: int


@dataclass(frozen=True)
class Stage:
    target: DistributedModel | Callable[..., Any]
    args: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass
class Method:
    """A traced method: named inputs, stages over numbered values, named outputs."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    stages: list[Stage]
    results: tuple[int, ...]

    def model_stage(self) -> Stage | None:
        return next((s for s in self.stages if isinstance(s.target, DistributedModel)), None)

    def direct_inputs(self) -> dict[str, int]:
        """Method inputs that go straight into the model stage, with their model input index."""
        stage = self.model_stage()
        if stage is None:
            return {}
        return {self.input_names[v]: i for i, v in enumerate(stage.args) if v < len(self.input_names)}


@dataclass
class ServableSpec:
    """Everything one ``servable_config.py`` declared."""

    name: str
    model: DistributedModel | None = None
    methods: dict[str, Method] = field(default_factory=dict)


_collecting: ServableSpec | None = None
_tracing: list[Stage] | None = None
_next_value = 0


def declare(model: DistributedModel) -> DistributedModel:
    """Record the servable's model (``distributed.declare_servable`` calls this)."""
    if _collecting is None:
        raise ServableError(
            "declare_servable belongs in a servable's servable_config.py, which "
            "distributed.start_servable loads"
        )
    if _collecting.model is not None:
        raise ServableError(
            f"servable {_collecting.name!r} declares its model twice; a distributed servable has one model"
        )
    _collecting.model = model
    return model


def register_method(output_names: str | Sequence[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as a method of the servable, with its outputs' names."""
    names = (output_names,) if isinstance(output_names, str) else tuple(output_names)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        global _tracing, _next_value
        if _collecting is None:
            raise ServableError(
                "register_method belongs in a servable's servable_config.py, which "
                "distributed.start_servable loads"
            )
        params = list(inspect.signature(fn).parameters.values())
        if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
            raise ServableError(
                f"method {fn.__name__!r}: inputs are plain positional parameters, one per input tensor"
            )
        inputs = tuple(p.name for p in params)
        _tracing, _next_value = [], len(inputs)
        try:
            result = fn(*[Value(i) for i in range(len(inputs))])
        finally:
            stages, _tracing = _tracing, None
        results = result if isinstance(result, tuple) else (result,)
        if not all(isinstance(r, Value) for r in results):
            raise ServableError(f"method {fn.__name__!r} must return what add_stage returned (or its inputs)")
        if len(results) != len(names):
            raise ServableError(
                f"method {fn.__name__!r} returns {len(results)} values but output_names "
                f"names {len(names)}: {list(names)}"
            )
        if sum(isinstance(s.target, DistributedModel) for s in stages) > 1:
            raise ServableError(f"method {fn.__name__!r} calls the distributed model more than once")
        _collecting.methods[fn.__name__] = Method(
            fn.__name__, inputs, names, stages, tuple(r.index for r in results)
        )
        return fn

    return decorate


def add_stage(target: DistributedModel | Callable[..., Any], *args: Any, outputs_count: int) -> Any:
    """A stage of the method being registered: the distributed model, or a Python function of
    numpy arrays. Returns the placeholder of its output (a tuple when ``outputs_count > 1``)."""
    global _next_value
    if _tracing is None:
        raise ServableError("add_stage is called inside a method registered with @register.register_method")
    if not all(isinstance(a, Value) for a in args):
        raise ServableError("add_stage takes the method's inputs or earlier stages' outputs, not constants")
    if outputs_count < 1:
        raise ServableError(f"outputs_count must be at least 1, got {outputs_count}")
    if not isinstance(target, DistributedModel) and not callable(target):
        raise ServableError(f"add_stage needs the declared model or a Python function, got {target!r}")
    outs = tuple(range(_next_value, _next_value + outputs_count))
    _next_value += outputs_count
    _tracing.append(Stage(target, tuple(a.index for a in args), outs))
    values = tuple(Value(i) for i in outs)
    return values[0] if outputs_count == 1 else values
