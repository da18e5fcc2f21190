"""What a plan is made for: a model definition or an export on disk (``PlanSource``), and its
tensors (``TensorInfo``: role, shape, dtype, stage)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, StrategyError
from dinb.explore.xla_view import CompiledView, viewer
from dinb.models.base import ModelDef
from dinb.sharding.layout import Layout
from dinb.sharding.strategy import ParamLayout, Strategy

ROLES = ("parameter", "input", "output")


CUSTOM = "custom"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the model: its role, full shape and dtype."""

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


# ---- where the tensors come from -------------------------------------------------------------
class PlanSource:
    """A model to explore: its tensors, its named strategies, and how to compile a strategy."""

    def __init__(self, name: str, tensors: Sequence[TensorInfo], model: ModelDef | None,
                 presets: Sequence[str] = (), exported: tuple[Strategy, Path] | None = None):
        self.name = name
        self.tensors = tuple(tensors)
        self.model = model
        self.presets = tuple(presets) + (("exported",) if exported else ())
        self.exported = exported
        self._compiled: dict[str, CompiledView] = {}

    @classmethod
    def from_model(cls, model: ModelDef) -> PlanSource:
        tensors = [TensorInfo(n, "parameter", tuple(s)) for n, s in model.param_shapes().items()]
        tensors += [TensorInfo(s.name, "input", tuple(s.shape), s.dtype) for s in model.input_specs()]
        tensors += [TensorInfo(s.name, "output", tuple(s.shape), s.dtype) for s in model.output_specs()]
        return cls(model.name, tensors, model, model.strategy_names)

    @classmethod
    def from_export(cls, directory: str | Path) -> PlanSource:
        """An export directory: its tensors and strategy (its stages' too); layouts stay editable
        when the model is a built-in one (the export records how to rebuild it)."""
        from dinb.export.slicefile import TensorMeta, find_slice_files, read_meta
        from dinb.models import MODELS, get_model

        directory = Path(directory)
        files = find_slice_files(directory)
        first = files[0]
        meta = read_meta(first)
        pipe = meta.get("pipeline")
        stage_metas = ([read_meta(files[s * pipe["stage_ranks"]]) for s in range(pipe["stages"])]
                       if pipe else [meta])
        params = {n: (p, s) for s, m in enumerate(stage_metas) for n, p in m["params"].items()}
        tensors = [TensorInfo(n, "parameter", tuple(p["shape"]), p["dtype"]) for n, (p, _) in params.items()]
        ins = [TensorMeta.from_json(m) for m in meta["inputs"]]
        outs = [TensorMeta.from_json(m) for m in meta["outputs"]]
        tensors += [TensorInfo(m.name, "input", m.shape, m.dtype) for m in ins]
        tensors += [TensorInfo(m.name, "output", m.shape, m.dtype) for m in outs]
        layouts = {n: ParamLayout(Layout.from_json(p["layout"]), stage=s) for n, (p, s) in params.items()}
        strategy = Strategy(layouts, [m.layout for m in ins], [m.layout for m in outs], len(stage_metas))
        model = None
        if meta["model"] in MODELS and "model_config" in meta:
            model = get_model(meta["model"], **meta["model_config"])
        return cls(f"{meta['model']} ({directory})", tensors, model, (), (strategy, first))

    def preset_strategy(self, preset: str, device_num: int, stages: int = 1) -> Strategy:
        if preset == "exported" and self.exported:
            strategy = self.exported[0]
            if (strategy.device_num, strategy.pipeline_stages) != (device_num, stages):
                raise StrategyError(
                    f"the export is for {strategy.pipeline_stages} stage(s) of {strategy.stage_device_num} "
                    f"ranks, not {stages} of {device_num // stages}")
            return strategy
        if self.model is None or preset not in self.presets:
            raise StrategyError(f"{self.name} has no strategy {preset!r}; choose one of {list(self.presets)}")
        return self.model.strategy(device_num, preset, pipeline_stages=stages)

    def stage_choices(self, device_num: int) -> list[int]:
        """Stage counts that divide both the model's layers and ``device_num`` (1 always)."""
        layers = self.model.pipeline_layers() if self.model is not None else None
        if not layers:
            return [1]
        return [s for s in range(1, len(layers) + 1) if len(layers) % s == 0 and device_num % s == 0]

    def compile(self, strategy: Strategy) -> CompiledView | list[CompiledView]:
        """What XLA makes of ``strategy`` (cached per strategy): one view, or one per stage."""
        key = json.dumps(strategy.to_json(), sort_keys=True)
        if key not in self._compiled and strategy.pipeline_stages > 1:
            if self.model is None:
                raise DinbError(f"{self.name}: the export does not say how to rebuild its model, so "
                                "its stages cannot be compiled here")
            params = {t.name: (t.shape, t.dtype) for t in self.tensors if t.role == "parameter"}
            ins = [(t.shape, t.dtype) for t in self.tensors if t.role == "input"]
            self._compiled[key] = viewer().compile_stages(self.model, strategy, ins, params)  # type: ignore[assignment]
        if key not in self._compiled:
            if self.exported and _same_layouts(strategy, self.exported[0]):
                view = viewer().compile_export(self.exported[1], strategy.device_num)
            elif self.model is not None:
                params = {t.name: (t.shape, t.dtype) for t in self.tensors if t.role == "parameter"}
                ins = [(t.shape, t.dtype) for t in self.tensors if t.role == "input"]
                view = viewer().compile_model(self.model, strategy, ins, params)
            else:
                raise DinbError(
                    f"{self.name}: the export does not say how to rebuild its model, so only its own "
                    "strategy can be compiled; choose the preset 'exported'"
                )
            self._compiled[key] = view
        return self._compiled[key]

    def weights(self, seed: int = 0) -> Any:
        """What an export reads its weights from: the model's released checkpoint (each rank
        reads only its slices), else :meth:`full_params`."""
        if not self.exported and self.model is not None and self.model.checkpoint() is not None:
            from dinb.checkpoint import DistributedCheckpoint

            return DistributedCheckpoint(self.model.checkpoint())
        return self.full_params(seed)

    def full_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Whole parameters: the model's own (``init_params(seed)``) or assembled from the export."""
        if self.exported:
            from dinb.export.slicefile import find_slice_files, read_slice_file

            out: dict[str, np.ndarray] = {}
            for path in find_slice_files(self.exported[1].parent).values():
                sf = read_slice_file(path)
                local = sf.rank % (sf.pipeline["stage_ranks"] if sf.pipeline else sf.world_size)
                for name, meta in sf.param_meta().items():
                    whole = out.setdefault(name, np.empty(meta.shape, meta.dtype))
                    whole[meta.layout.slice_of(local, meta.shape, name)] = sf.params[name]
            return out
        assert self.model is not None
        return self.model.init_params(seed)


def _same_layouts(a: Strategy, b: Strategy) -> bool:
    return ({n: a.item(n).layout for n in a} == {n: b.item(n).layout for n in b}
            and a.pipeline_stages == b.pipeline_stages
            and list(a.inputs) == list(b.inputs) and list(a.outputs) == list(b.outputs))
