"""A strategy being explored: a mesh, a layout per tensor, and what follows from them.

The plan is a value: every change (``with_devices``, ``with_mesh``, ``with_axis``,
``with_preset``) returns a new plan, so the explorer widget only renders plans. For a mesh
``dev_matrix = [d_{k-1}, ..., d_0]`` every tensor (parameter, input, output) has a tensor_map
with one entry per axis: ``-1`` (whole), a device dimension ``j`` (split into ``d_j`` parts) or
several (split into their product). From that:

* **tiles**: the replica groups of :meth:`Layout.replica_groups`, each with the box
  :meth:`Layout.slice_of` gives its first rank: ``prod(parts)`` distinct slices, each held by
  ``N / prod(parts)`` ranks;
* **bytes per rank**: ``sum over tensors of prod(shape[a] / parts(a)) * itemsize``, split into
  parameters (and how much of that is a copy held elsewhere too), inputs and outputs, and a
  tensor that is both an input and an output (a decoder's KV cache, donated: one buffer) once,
  as the cache; the compiled program adds XLA's own workspace (temp buffers);
* **cost**: ``flops / compute rate`` beside ``sum of bytes sent per rank / link bandwidth`` for
  the collectives XLA inserted (see :mod:`dinb.explore.hlo` for the traffic model).

An axis choice that does not divide the axis, or reuses a device dimension another axis of the
same tensor already splits, is offered but marked invalid with the reason.

**Pipeline stages.** With ``stages = S`` the mesh is one stage's (``T`` devices) and the plan
spans ``S * T`` ranks: a parameter lives on the ranks of its layer's stage only
(:meth:`ModelDef.stage_layers`), the inputs on the first stage's, the outputs on the last's.
Each stage's program is compiled on its own, and the activations one stage hands the next
(``sends``) are a transfer per rank pair per micro-batch.
"""


from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dinb.errors import DinbError
from dinb.explore.costs import CostEstimate, RankBytes, Transfer, carry_bytes
from dinb.explore.mesh import AxisChoice, Tile, dims_entry, entry_dims, entry_label, mesh_choices, mesh_label
from dinb.explore.plan_source import CUSTOM, ROLES, PlanSource, TensorInfo
from dinb.explore.xla_view import CompiledView
from dinb.models.base import ModelDef
from dinb.sharding.layout import Layout, MapEntry, common_dev_matrix
from dinb.sharding.strategy import ParamLayout, Strategy
from dinb.units import fmt_bytes


@dataclass(frozen=True)
class StrategyPlan:
    """A mesh and a tensor_map per tensor, for one :class:`PlanSource` (see the module docstring)."""

    source: PlanSource
    mesh: tuple[int, ...]
    maps: Mapping[str, tuple[MapEntry, ...]]
    preset: str = CUSTOM
    notes: tuple[str, ...] = field(default=())
    stages: int = 1

    # ---- making plans ------------------------------------------------------------------------
    @classmethod
    def create(cls, source: ModelDef | PlanSource | str | Path, device_num: int | None = None,
               preset: str | None = None, stages: int | None = None) -> StrategyPlan:
        """A plan for a model (or an export directory) on ``device_num`` devices in ``stages``
        pipeline stages under ``preset`` (the model's default strategy when None; ``"exported"``
        for an export)."""
        if isinstance(source, (str, Path)):
            source = PlanSource.from_export(source)
        elif isinstance(source, ModelDef):
            source = PlanSource.from_model(source)
        if device_num is None:
            device_num = source.exported[0].device_num if source.exported else 2
        if stages is None:
            stages = source.exported[0].pipeline_stages if source.exported else 1
        if preset is None:
            preset = "exported" if source.exported else (
                source.model.default_strategy if source.model else CUSTOM)
        if device_num % stages:
            raise DinbError(f"{device_num} devices do not form {stages} stages of equal size; choose "
                            f"one of {source.stage_choices(device_num)} stages")
        plan = cls(source, (device_num // stages,), {t.name: (-1,) * len(t.shape) for t in source.tensors},
                   stages=stages)
        return plan.with_preset(preset) if preset != CUSTOM else plan

    @property
    def device_num(self) -> int:
        """Ranks of the whole plan: ``stages`` times one stage's mesh."""
        return self.stages * math.prod(self.mesh)

    @property
    def stage_device_num(self) -> int:
        """Ranks of one pipeline stage (the mesh's size)."""
        return math.prod(self.mesh)

    def stage_of(self, name: str) -> int:
        """The pipeline stage holding tensor ``name`` (inputs: the first; outputs: the last)."""
        t = self.tensor(name)
        if self.stages == 1 or t.role == "input":
            return 0
        if t.role == "output":
            return self.stages - 1
        return self._stage_map()[name]

    def _stage_map(self) -> dict[str, int]:
        model = self.source.model
        if model is None:  # an export of a model dinb cannot rebuild: its own stages
            assert self.source.exported is not None
            return {n: self.source.exported[0].stage_of(n) for n in self.source.exported[0]}
        layers = model.pipeline_layers() or []
        return {n: s for s, (a, b) in enumerate(model.stage_layers(self.stages))
                for layer in layers[a:b] for n in layer}

    def stage_ranks(self, stage: int) -> range:
        t = self.stage_device_num
        return range(stage * t, (stage + 1) * t)

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return self.source.tensors

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise DinbError(f"{self.source.name} has no tensor {name!r}; it has {[t.name for t in self.tensors]}")

    def with_preset(self, preset: str, device_num: int | None = None,
                    stages: int | None = None) -> StrategyPlan:
        """The named strategy on ``device_num`` devices (default: this plan's) in ``stages``
        stages (default: this plan's), on its own mesh.

        The strategy's layouts may use several device grids; they are put on their common grid
        (:func:`common_dev_matrix`) with size-1 dimensions dropped.
        """
        n = device_num or self.device_num
        s = self.stages if stages is None else stages
        if preset == CUSTOM:
            return replace(self, preset=CUSTOM, notes=())
        try:
            strategy = self.source.preset_strategy(preset, n, s)
            layouts = self._strategy_layouts(strategy)
            grid = tuple(d for d in common_dev_matrix(list(layouts.values())) if d > 1) or (1,)
            maps = {name: lay.refine(grid).tensor_map for name, lay in layouts.items()}
            for t in self.tensors:
                Layout(grid, maps[t.name]).check_shape(t.shape, t.name)
        except DinbError as e:
            fits = n % s == 0
            plan = self._remap((n // s if fits else n,), s if fits else 1)
            where = f" in {s} stages" if s > 1 else ""
            return replace(plan, preset=CUSTOM,
                           notes=(f"strategy {preset!r} does not fit {n} devices{where}: {e}",))
        return StrategyPlan(self.source, grid, maps, preset, stages=s)

    def with_stages(self, stages: int) -> StrategyPlan:
        """The same devices in ``stages`` pipeline stages (one of :meth:`PlanSource.stage_choices`)."""
        choices = self.source.stage_choices(self.device_num)
        if stages not in choices:
            raise DinbError(f"{stages} stages do not divide {self.source.name}'s layers and the "
                            f"{self.device_num} devices; choose one of {choices}")
        if self.preset != CUSTOM:
            return self.with_preset(self.preset, self.device_num, stages)
        return self._remap((self.device_num // stages,), stages)

    def _strategy_layouts(self, strategy: Strategy) -> dict[str, Layout]:
        n = strategy.stage_device_num
        out: dict[str, Layout] = {}
        for role, layouts in (("input", strategy.inputs), ("output", strategy.outputs)):
            named = [t for t in self.tensors if t.role == role]
            for i, t in enumerate(named):
                out[t.name] = layouts[i] if i < len(layouts) else Layout.replicated(len(t.shape), n)
        for t in self.tensors:
            if t.role == "parameter":
                out[t.name] = strategy[t.name]
        return out

    def with_devices(self, device_num: int) -> StrategyPlan:
        """Another device count: a named strategy is re-made for it; a custom one keeps every
        axis choice that still fits the one-axis mesh ``[N]`` and makes the others whole."""
        if device_num < 1:
            raise DinbError(f"device count must be >= 1, got {device_num}")
        stages = self.stages if device_num % self.stages == 0 else 1
        if self.preset != CUSTOM:
            return self.with_preset(self.preset, device_num, stages)
        return self._remap((device_num // stages,), stages)

    def with_mesh(self, mesh: Sequence[int]) -> StrategyPlan:
        """Another mesh for one stage's devices; axis choices that no longer fit become whole."""
        mesh = tuple(int(s) for s in mesh)
        t = self.stage_device_num
        if math.prod(mesh) != t:
            raise DinbError(f"mesh {list(mesh)} holds {math.prod(mesh)} devices, not {t}; "
                            f"choose one of {[list(m) for m in mesh_choices(t)]}")
        return self._remap(mesh)

    def _remap(self, mesh: tuple[int, ...], stages: int | None = None) -> StrategyPlan:
        maps, dropped = {}, []
        k = len(mesh)
        for t in self.tensors:
            entries = []
            for a, e in enumerate(self.maps[t.name]):
                dims = entry_dims(e)
                parts = math.prod(mesh[k - 1 - d] for d in dims) if all(d < k for d in dims) else 0
                if dims and (not parts or t.shape[a] % parts):
                    dropped.append(f"{t.name} axis {a}")
                    entries.append(-1)
                else:
                    entries.append(e)
            maps[t.name] = tuple(entries)
        notes = (f"made whole on the new mesh: {', '.join(dropped)}",) if dropped else ()
        return StrategyPlan(self.source, mesh, maps, CUSTOM, notes, self.stages if stages is None else stages)

    def with_axis(self, name: str, axis: int, entry: MapEntry | Sequence[int]) -> StrategyPlan:
        """Split axis ``axis`` of tensor ``name`` by ``entry``; an invalid choice is an error."""
        entry = dims_entry(tuple(entry)) if isinstance(entry, (list, tuple)) else int(entry)
        for choice in self.axis_choices(name, axis):
            if choice.entry == entry:
                if not choice.valid:
                    raise DinbError(f"{name} axis {axis}: {choice.label} is not allowed: {choice.reason}")
                maps = dict(self.maps)
                entries = list(maps[name])
                entries[axis] = entry
                maps[name] = tuple(entries)
                return StrategyPlan(self.source, self.mesh, maps, CUSTOM, stages=self.stages)
        raise DinbError(f"{name} axis {axis}: {entry!r} is not a device dimension of mesh {list(self.mesh)}")

    # ---- what follows from the plan ----------------------------------------------------------
    def layout(self, name: str) -> Layout:
        return Layout(self.mesh, self.maps[name])

    def axis_choices(self, name: str, axis: int) -> list[AxisChoice]:
        """Every way to split this axis on this mesh, each marked valid or not (with the reason)."""
        t = self.tensor(name)
        k = len(self.mesh)
        size = t.shape[axis]
        others = {d: a for a, e in enumerate(self.maps[name]) if a != axis for d in entry_dims(e)}
        dims_big_first = list(range(k - 1, -1, -1))
        options: list[tuple[int, ...]] = [()]
        for r in range(1, k + 1):
            options += [c for c in itertools.combinations(dims_big_first, r)
                        if all(self.mesh[k - 1 - d] > 1 for d in c)]
        current = entry_dims(self.maps[name][axis])
        if current not in options:
            options.append(current)
        choices = []
        for dims in options:
            parts = math.prod(self.mesh[k - 1 - d] for d in dims)
            label = entry_label(dims_entry(dims), self.mesh)
            reason = ""
            taken = [d for d in dims if d in others]
            if taken:
                reason = (f"d{taken[0]} already splits axis {others[taken[0]]}; a device dimension "
                          "splits one axis only")
            elif size % parts:
                divisors = [p for p in range(1, size + 1) if size % p == 0]
                shown = ", ".join(map(str, divisors[:12])) + (", …" if len(divisors) > 12 else "")
                reason = (f"{size} does not split into {parts} equal parts (part counts that divide "
                          f"{size}: {shown})")
            choices.append(AxisChoice(dims_entry(dims), label, parts, not reason, reason))
        return choices

    def problems(self) -> list[str]:
        """Why the current layouts cannot run (empty when they can)."""
        out = []
        for t in self.tensors:
            try:
                self.layout(t.name).check_shape(t.shape, t.name)
            except DinbError as e:
                out.append(str(e))
        return out

    def tiles(self, name: str) -> list[Tile]:
        """The distinct slices of a tensor with the (global) ranks holding each (``Layout``
        decides, within the tensor's stage)."""
        t = self.tensor(name)
        lay = self.layout(name)
        first = self.stage_of(name) * self.stage_device_num
        return [Tile(tuple(first + r for r in group),
                     tuple((s.start, s.stop) for s in lay.slice_of(group[0], t.shape, name)))
                for group in lay.replica_groups()]

    def bytes_per_rank(self, compiled: CompiledView | Sequence[CompiledView] | None = None
                       ) -> list[RankBytes]:
        """Bytes each rank holds (see the module docstring); workspace from ``compiled``. With
        stages, a rank holds its stage's tensors, and the activations it receives and sends
        (known once the stages are compiled) count as its inputs and outputs."""
        views = list(compiled) if isinstance(compiled, Sequence) else [compiled] * self.stages
        t = self.stage_device_num
        first_input = next((self.layout(x.name) for x in self.tensors if x.role == "input"), None)
        names = {role: {x.name for x in self.tensors if x.role == role} for role in ("input", "output")}
        kept = names["input"] & names["output"]  # given back by every call: the KV cache, held once
        rows = []
        for r in range(self.device_num):
            stage, local = divmod(r, t)
            sums = dict.fromkeys((*ROLES, "cache"), 0)
            replicated = 0
            for x in self.tensors:
                if self.stage_of(x.name) != stage or (x.role == "output" and stage != self.stages - 1):
                    continue
                if x.name in kept and x.role == "output":
                    continue
                lay = self.layout(x.name)
                box = lay.slice_of(local, x.shape, x.name)
                nbytes = math.prod(s.stop - s.start for s in box) * x.itemsize
                sums["cache" if x.name in kept else x.role] += nbytes
                if x.role == "parameter" and lay.device_num > len(lay.replica_groups()):
                    replicated += nbytes
            if self.stages > 1 and views[0] is not None:
                if stage > 0:
                    sums["input"] += carry_bytes(views[stage - 1].sends, first_input, local, t)
                if stage < self.stages - 1:
                    sums["output"] += carry_bytes(views[stage].sends, first_input, local, t)
            view = views[stage]
            rows.append(RankBytes(r, sums["parameter"], replicated, sums["input"], sums["output"],
                                  view.temp_bytes if view else 0, stage, sums["cache"]))
        return rows

    def strategy(self) -> Strategy:
        """The plan as a :class:`Strategy` (what :meth:`save` writes and export takes)."""
        params = {t.name: ParamLayout(self.layout(t.name), t.shape, self.stage_of(t.name))
                  for t in self.tensors if t.role == "parameter"}
        return Strategy(params, [self.layout(t.name) for t in self.tensors if t.role == "input"],
                        [self.layout(t.name) for t in self.tensors if t.role == "output"], self.stages)

    def compile(self) -> CompiledView | list[CompiledView]:
        """Compile the plan's strategy on simulated devices (see :mod:`dinb.explore.xla_view`); with
        stages, one view per stage."""
        problems = self.problems()
        if problems:
            raise DinbError("the plan cannot be compiled: " + "; ".join(problems))
        return self.source.compile(self.strategy())

    def cost(self, compiled: CompiledView, link_gb_per_s: float = 100.0,
             tflop_per_s: float = 100.0) -> CostEstimate:
        """Compute and communication estimates (bandwidth in GB/s = 1e9 bytes/s; 1e12 flop/s)."""
        if link_gb_per_s <= 0 or tflop_per_s <= 0:
            raise DinbError("link bandwidth and compute rate must be positive")
        rows = tuple((c, c.seconds(link_gb_per_s * 1e9)) for c in compiled.collectives)
        return CostEstimate(compiled.flops, compiled.flops / (tflop_per_s * 1e12), rows, link_gb_per_s,
                            tflop_per_s)

    def transfers(self, views: Sequence[CompiledView], link_gb_per_s: float = 100.0) -> list[Transfer]:
        """The activations each stage hands the next: one message per rank pair per micro-batch
        (for the whole batch here; ``M`` micro-batches send ``1/M`` of it ``M`` times)."""
        t = self.stage_device_num
        first_input = next((self.layout(x.name) for x in self.tensors if x.role == "input"), None)
        out = []
        for s in range(self.stages - 1):
            per_rank = carry_bytes(views[s].sends, first_input, 0, t)
            out.append(Transfer(s, tuple(views[s].sends), per_rank, t, per_rank / (link_gb_per_s * 1e9)))
        return out

    # ---- leaving the explorer ----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the strategy file (JSON for ``*.json``, MindSpore protobuf otherwise)."""
        return self.strategy().save(path)

    def export(self, out_dir: str | Path, seed: int = 0, show_progress: bool = True) -> list[Path]:
        """Export the model under this strategy: one slice file per rank (see :mod:`dinb.export`)."""
        from dinb.export import export_distributed

        model = self.source.model
        if model is None:
            raise DinbError(f"{self.source.name}: the export does not say how to rebuild its model; "
                            "export it again with this dinb version")
        inputs = [(t.shape, t.dtype) for t in self.tensors if t.role == "input"]
        return export_distributed(model, self.source.weights(seed), self.strategy(), inputs, out_dir,
                                  show_progress=show_progress)

    def summary(self) -> str:
        """The plan as text: mesh, each tensor's layout and tiles (and stage), bytes per rank."""
        staged = f" in {self.stages} stages of {self.stage_device_num}" if self.stages > 1 else ""
        lines = [f"{self.source.name} on {self.device_num} devices{staged}, mesh {mesh_label(self.mesh)}, "
                 f"strategy {self.preset}"]
        for t in self.tensors:
            tiles = self.tiles(t.name)
            held = len(tiles[0].ranks)
            stage = f"stage {self.stage_of(t.name)} " if self.stages > 1 else ""
            lines.append(f"  {stage}{t.role:<9} {t.name:<14} {str(list(t.shape)):<12} tensor_map "
                         f"{str(self.layout(t.name).to_json()['tensor_map']):<10} {len(tiles)} slice"
                         + ("s" if len(tiles) > 1 else "")
                         + (f", each on {held} ranks" if held > 1 else ""))
        rows = self.bytes_per_rank()
        for s in range(self.stages):
            b = rows[s * self.stage_device_num]
            where = f"  stage {s} per rank" if self.stages > 1 else "  per rank"
            lines.append(f"{where}: parameters {fmt_bytes(b.parameters)} ({fmt_bytes(b.replicated)} of it "
                         f"copies), inputs {fmt_bytes(b.inputs)}, outputs {fmt_bytes(b.outputs)}"
                         + (f", KV cache {fmt_bytes(b.cache)}" if b.cache else ""))
        return "\n".join(lines)
