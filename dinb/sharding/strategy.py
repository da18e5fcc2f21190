"""A model's parallel strategy: ``{parameter name: layout}``, plus the layouts of inputs and outputs.

On disk it is MindSpore's JSON strategy schema::

    {"current_stage": 0,
     "parallel_layout_item": {
        "matmul_weight": {"dev_matrix": [2, 2], "tensor_map": [1, 0], "tensor_shape": [96, 16],
                          "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}}

dinb adds one key MindSpore does not know, ``"dinb"``, holding the layouts of the model's
inputs and outputs (MindSpore derives them from operator strategies at compile time).

**Pipeline stages.** A strategy of ``S`` stages of ``T`` ranks each spans ``S * T`` ranks: global
rank ``r`` belongs to stage ``r // T`` and is rank ``r % T`` of that stage's layouts, which all
span ``T`` devices (MindSpore's per-stage ``dev_matrix``). Each parameter lives in one stage; only
that stage's ranks hold it. On disk this is MindSpore's merged pipeline strategy
(``merge_pipeline_strategys``): every parameter named ``"{stage}-{name}"`` and
``current_stage`` 1. A file without those prefixes is one stage, whatever its ``current_stage``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.formats import strategy_pb
from dinb.formats.untrusted import Fields
from dinb.sharding.layout import MAX_DEVICES, Layout

if TYPE_CHECKING:
    from dinb.models.base import ModelDef


@dataclass(frozen=True)
class ParamLayout:
    """The layout of one parameter and MindSpore's per-parameter fields beside it."""

    layout: Layout
    shape: tuple[int, ...] | None = None
    stage: int = 0
    field: int = 0
    opt_weight_shard_step: int = 0
    opt_weight_shard_size: int = 0


@dataclass(frozen=True)
class Strategy(Mapping[str, Layout]):
    """``{parameter name: Layout}`` for a whole model; a frozen, hashable value.

    ``strategy["w"]`` is the layout of parameter ``w``; ``strategy.item("w")`` the full record
    (shape, pipeline stage, optimizer-shard fields). ``inputs`` and ``outputs`` are the layouts
    of the model's positional inputs (taken by the first stage) and outputs (given by the last),
    replicated when not given. ``pipeline_stages`` is the number of stages (default: one past the
    highest stage of a parameter); every stage must hold at least one parameter.
    """

    items_: tuple[tuple[str, ParamLayout], ...]
    inputs: tuple[Layout, ...] = ()
    outputs: tuple[Layout, ...] = ()
    pipeline_stages: int = 1
    _index: dict[str, ParamLayout] = field(init=False, repr=False, compare=False, hash=False)

    def __init__(
        self,
        params: Mapping[str, Layout | ParamLayout],
        inputs: Sequence[Layout] = (),
        outputs: Sequence[Layout] = (),
        pipeline_stages: int | None = None,
    ):
        items = tuple(
            (str(n), p if isinstance(p, ParamLayout) else ParamLayout(p)) for n, p in params.items()
        )
        object.__setattr__(self, "items_", items)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "outputs", tuple(outputs))
        object.__setattr__(self, "_index", dict(items))
        counts = {lay.device_num for lay in self._all_layouts()}
        if len(counts) > 1:
            detail = ", ".join(f"{n}: {lay.device_num}" for n, lay in self._named_layouts())
            raise StrategyError(
                f"the layouts of one strategy must span the same number of devices; got {detail}"
            )
        stages = sorted({p.stage for _, p in items})
        count = pipeline_stages if pipeline_stages is not None else (stages[-1] + 1 if stages else 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise StrategyError(f"pipeline_stages must be a whole number >= 1, got {count!r}")
        odd = [(n, p.stage) for n, p in items if not 0 <= p.stage < count]
        if odd:
            raise StrategyError(
                f"parameter {odd[0][0]!r} is in stage {odd[0][1]}, outside the {count} pipeline "
                f"stages 0..{count - 1}"
            )
        if items and len(stages) < count:  # every stage holds a parameter: count <= len(items)
            held = set(stages)
            empty = [s for s in range(min(count, len(stages) + 8)) if s not in held][:8]
            more = ", ..." if count - len(stages) > len(empty) else ""
            raise StrategyError(
                f"pipeline stage(s) {empty}{more} of {count} hold no parameter; every stage needs "
                "its own layers (a merged strategy file must contain every stage's file)"
            )
        if counts and count * next(iter(counts)) > MAX_DEVICES:
            raise StrategyError(f"{count} stages of {next(iter(counts))} ranks exceed {MAX_DEVICES} ranks")
        object.__setattr__(self, "pipeline_stages", count)

    # ---- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Layout:
        try:
            return self._index[name].layout
        except KeyError:
            raise KeyError(f"strategy has no parameter {name!r}; it has {list(self._index)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __hash__(self) -> int:
        return hash((self.items_, self.inputs, self.outputs, self.pipeline_stages))

    def item(self, name: str) -> ParamLayout:
        """The full record of parameter ``name``."""
        self[name]
        return self._index[name]

    def _all_layouts(self) -> list[Layout]:
        return [p.layout for _, p in self.items_] + list(self.inputs) + list(self.outputs)

    def _named_layouts(self) -> list[tuple[str, Layout]]:
        return (
            [(n, p.layout) for n, p in self.items_]
            + [(f"input {i}", lay) for i, lay in enumerate(self.inputs)]
            + [(f"output {i}", lay) for i, lay in enumerate(self.outputs)]
        )

    @property
    def stage_device_num(self) -> int:
        """Ranks per pipeline stage: the number every layout of the strategy spans."""
        layouts = self._all_layouts()
        if not layouts:
            raise StrategyError("an empty strategy spans no devices")
        return layouts[0].device_num

    @property
    def device_num(self) -> int:
        """Ranks of the whole job: ``pipeline_stages * stage_device_num``."""
        return self.pipeline_stages * self.stage_device_num

    # ---- pipeline stages ---------------------------------------------------------------------
    def stage_of(self, name: str) -> int:
        """The pipeline stage holding parameter ``name``."""
        return self.item(name).stage

    def stage_params(self, stage: int) -> list[str]:
        """The parameters of one stage, in strategy order."""
        return [n for n, p in self.items_ if p.stage == stage]

    def stage_ranks(self, stage: int) -> range:
        """The global ranks of one stage: ``stage * T .. stage * T + T - 1``."""
        t = self.stage_device_num
        return range(stage * t, (stage + 1) * t)

    def rank_stage(self, rank: int) -> int:
        """The stage of global rank ``rank``."""
        if not 0 <= rank < self.device_num:
            raise StrategyError(f"rank {rank} is outside the strategy's {self.device_num} ranks")
        return rank // self.stage_device_num

    def holds(self, name: str, rank: int) -> bool:
        """Whether global rank ``rank`` holds a slice of parameter ``name`` (its stage's ranks do)."""
        return self.rank_stage(rank) == self.stage_of(name)

    def slice_of(self, name: str, rank: int, shape: Sequence[int]) -> tuple[slice, ...] | None:
        """Global rank ``rank``'s slice of parameter ``name``, or None outside its stage."""
        if not self.holds(name, rank):
            return None
        return self[name].slice_of(rank % self.stage_device_num, shape, name)

    def stage(self, stage: int) -> Strategy:
        """One stage as a strategy of its own (its parameters, over its ``T`` ranks)."""
        params = {n: ParamLayout(p.layout, p.shape, 0, p.field, p.opt_weight_shard_step,
                                 p.opt_weight_shard_size) for n, p in self.items_ if p.stage == stage}
        return Strategy(params, self.inputs if stage == 0 else (),
                        self.outputs if stage == self.pipeline_stages - 1 else ())

    # ---- checks ------------------------------------------------------------------------------
    def validate(
        self,
        param_shapes: Mapping[str, Sequence[int]],
        input_shapes: Sequence[Sequence[int]] = (),
    ) -> None:
        """Check that the strategy names exactly the model's parameters and divides every shape."""
        missing = [n for n in param_shapes if n not in self._index]
        extra = [n for n in self._index if n not in param_shapes]
        if missing or extra:
            raise StrategyError(
                "strategy and model disagree on parameter names: "
                + (f"missing from the strategy: {missing}. " if missing else "")
                + (f"not in the model: {extra}. " if extra else "")
                + "Use a strategy written for this model (dinb.infer_predict_layout makes one)."
            )
        for name, shape in param_shapes.items():
            rec = self._index[name]
            if rec.shape is not None and tuple(rec.shape) != tuple(shape):
                raise StrategyError(
                    f"parameter {name!r}: the strategy records tensor_shape {list(rec.shape)} but "
                    f"the model's parameter has shape {list(shape)}"
                )
            if rec.opt_weight_shard_size > 1:
                raise StrategyError(
                    f"parameter {name!r} carries an optimizer shard (opt_weight_shard_size="
                    f"{rec.opt_weight_shard_size}); predict strategies hold whole model-parallel "
                    "slices, so reshard the checkpoint first"
                )
            rec.layout.check_shape(shape, f"parameter {name!r}")
        if self.inputs and len(self.inputs) != len(input_shapes):
            raise StrategyError(
                f"strategy has layouts for {len(self.inputs)} inputs, the model takes "
                f"{len(input_shapes)}"
            )
        for i, (lay, shape) in enumerate(zip(self.inputs, input_shapes)):
            lay.check_shape(shape, f"input {i}")

    def with_shapes(self, param_shapes: Mapping[str, Sequence[int]]) -> Strategy:
        """A copy whose records carry the given full shapes (``tensor_shape`` in the file)."""
        params = {
            n: ParamLayout(
                p.layout,
                tuple(int(s) for s in param_shapes[n]) if n in param_shapes else p.shape,
                p.stage,
                p.field,
                p.opt_weight_shard_step,
                p.opt_weight_shard_size,
            )
            for n, p in self.items_
        }
        return Strategy(params, self.inputs, self.outputs, self.pipeline_stages)

    # ---- files -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """MindSpore's strategy JSON (plus the ``dinb`` key for input/output layouts); with
        several stages, MindSpore's merged form (``"{stage}-{name}"``, ``current_stage`` 1)."""
        items = {}
        merged = self.pipeline_stages > 1
        for name, p in self.items_:
            items[f"{p.stage}-{name}" if merged else name] = {
                **p.layout.to_json(),
                "tensor_shape": list(p.shape) if p.shape is not None else [],
                "field": p.field,
                "opt_weight_shard_step": p.opt_weight_shard_step,
                "opt_weight_shard_size": p.opt_weight_shard_size,
            }
        extra: dict[str, Any] = {
            "inputs": [lay.to_json() for lay in self.inputs],
            "outputs": [lay.to_json() for lay in self.outputs],
        }
        if merged:
            extra["pipeline_stages"] = self.pipeline_stages
        return {"current_stage": 1 if merged else 0, "parallel_layout_item": items, "dinb": extra}

    @classmethod
    def from_json(cls, data: Any, source: str = "strategy") -> Strategy:
        """Parse MindSpore's JSON strategy schema; errors name ``source`` and the field."""
        check = Fields(StrategyError, source)
        data = check.obj(data, "the strategy")
        if "parallel_layout_item" not in data:
            check.fail("no 'parallel_layout_item' key; is this a MindSpore/dinb strategy file?")
        check.int(data.get("current_stage", 0), "current_stage", minimum=0)
        items = check.obj(data["parallel_layout_item"], "parallel_layout_item")
        staged = {key: _STAGED.fullmatch(key) for key in items}
        merged = any(staged.values())
        if merged and not all(staged.values()):
            bare = next(k for k, m in staged.items() if m is None)
            check.fail(
                f"parameter {bare!r} has no pipeline stage: a merged pipeline strategy names every "
                "parameter '{stage}-{name}' (as mindspore.merge_pipeline_strategys writes it)"
            )
        params: dict[str, ParamLayout] = {}
        for key, item in items.items():
            found = staged[key]
            name, stage = (found.group(2), int(found.group(1))) if found else (key, 0)
            if name in params:
                check.fail(
                    f"parameter {name!r} is in stages {params[name].stage} and {stage}; dinb keeps "
                    "each parameter in one stage (a parameter shared by stages is not supported)"
                )
            where = f"parameter {key!r}"
            item = check.obj(item, where)
            layout = _layout(check, item, where)
            shape = check.shape(check.get(item, "tensor_shape", where, list, []), f"{where}.tensor_shape")
            params[name] = ParamLayout(
                layout, shape or None, stage,
                *(check.int(check.get(item, key, where, int, 0), f"{where}.{key}")
                  for key in ("field", "opt_weight_shard_step", "opt_weight_shard_size")),
            )
        extra = check.obj(data.get("dinb", {}), "dinb")
        count = extra.get("pipeline_stages")
        if count is not None:
            count = check.int(count, "dinb.pipeline_stages", 1)
        inputs = [_layout(check, check.obj(d, f"dinb.inputs[{i}]"), f"dinb.inputs[{i}]")
                  for i, d in enumerate(check.get(extra, "inputs", "dinb", list, []))]
        outputs = [_layout(check, check.obj(d, f"dinb.outputs[{i}]"), f"dinb.outputs[{i}]")
                   for i, d in enumerate(check.get(extra, "outputs", "dinb", list, []))]
        try:
            return cls(params, inputs, outputs, count)
        except DinbError as e:
            raise StrategyError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write the strategy file: JSON when the name ends in ``.json``, else MindSpore's protobuf."""
        path = Path(path)
        if path.suffix != ".json":
            path.write_bytes(strategy_pb.serialize(self.to_json()))
            return path
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Strategy:
        """Read a strategy file as MindSpore does: JSON when named ``*.json``, else protobuf."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise StrategyError(f"strategy file {path} does not exist") from None
        except OSError as e:
            raise StrategyError(f"strategy file {path} cannot be read ({e.strerror or e})") from None
        if path.suffix != ".json":
            return cls.from_json(strategy_pb.parse(raw, source=str(path)), source=str(path))
        check = Fields(StrategyError, f"strategy file {path}")
        return cls.from_json(check.json(raw, "the file (dinb reads MindSpore's JSON schema)"),
                             source=str(path))

    def __repr__(self) -> str:
        body = ", ".join(f"{n!r}: {p.layout!r}" for n, p in self.items_)
        stages = f", pipeline_stages={self.pipeline_stages}" if self.pipeline_stages > 1 else ""
        return f"Strategy({{{body}}}, device_num={self.device_num if self.items_ else 0}{stages})"


def infer_predict_layout(
    model: ModelDef, *predict_data: Any, device_num: int, strategy: str | None = None,
    pipeline_stages: int = 1,
) -> Strategy:
    """The predict strategy of ``model`` on ``device_num`` ranks, checked against the data.

    Mirrors MindSpore's ``Model.infer_predict_layout(*predict_data)``: the model's operator
    shardings (``strategy`` names one of ``model.strategy_names``; the model's default when None)
    give a layout per parameter and input; every layout is validated against the parameter
    shapes and the shapes of ``predict_data`` (arrays or ``(shape, dtype)`` specs).
    ``pipeline_stages = S`` cuts the model's layers into ``S`` stages of ``device_num / S`` ranks
    (MindSpore's ``pipeline_stages``); each parameter records its stage.
    """
    shapes = [tuple(np.shape(d)) if not _is_spec(d) else tuple(d[0]) for d in predict_data]
    specs = model.input_specs()
    if len(shapes) != len(specs):
        raise StrategyError(
            f"model {model.name!r} takes {len(specs)} inputs ({[s.name for s in specs]}), "
            f"got {len(shapes)} predict_data arrays"
        )
    strat = model.strategy(device_num, strategy, input_shapes=shapes, pipeline_stages=pipeline_stages)
    param_shapes = model.param_shapes()
    strat.validate(param_shapes, shapes)
    return strat.with_shapes(param_shapes)


_STAGED = re.compile(r"(\d{1,6})-(.+)", re.DOTALL)


def _is_spec(d: Any) -> bool:
    return isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], (tuple, list))


def _layout(check: Fields, d: dict[str, Any], where: str) -> Layout:
    """The layout in a JSON record: ``dev_matrix`` and ``tensor_map`` lists, checked."""
    dev_matrix = check.get(d, "dev_matrix", where, list)
    tensor_map = check.get(d, "tensor_map", where, list)
    for i, e in enumerate(tensor_map):
        check.check(e, f"{where}.tensor_map[{i}]", (int, list))
    try:
        return Layout(dev_matrix, tensor_map)
    except DinbError as e:
        check.fail(f"{where}: {e}")
