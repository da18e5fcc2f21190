"""The strategy explorer and the per-rank outputs viewer, in Python: plans, pictures, widgets.

The collectives come from programs XLA really compiles (in the explorer's helper process with
simulated devices); nothing here is mocked.
"""

import json
import math

import numpy as np
import pytest
from conftest import simulated

import dinb
from dinb import Context, DinbError, Model, ModelType, Strategy
from dinb.explore.mesh import mesh_choices
from dinb.explore.plan import StrategyPlan
from dinb.explore.plan_source import PlanSource
from dinb.models import MatMulNeg, MegatronMLP, mlp_reference
from dinb.sharding.layout import Layout
from dinb.widgets import RankOutputs, StrategyExplorer
from dinb.widgets.outputs import downsample


def all_plans():
    yield StrategyPlan.create(MatMulNeg(), 4, "contraction")
    yield StrategyPlan.create(MegatronMLP(), 4, "megatron").with_mesh((2, 2)).with_axis("x", 0, 1)
    yield StrategyPlan.create(MegatronMLP(), 8, "megatron").with_mesh((2, 2, 2)).with_axis("w1", 0, (2, 1))
    yield StrategyPlan.create(MatMulNeg(), 6, "batch").with_mesh((2, 3)).with_axis("matmul_weight", 0, 0)


# ---- the plan -----------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", list(all_plans()), ids=lambda p: f"{p.source.name}-{p.mesh}")
def test_tiles_are_the_layout_slices_and_cover_every_rank_once(plan):
    for t in plan.tensors:
        layout = Layout(plan.mesh, plan.maps[t.name])
        seen = []
        for tile in plan.tiles(t.name):
            for r in tile.ranks:
                assert tuple((s.start, s.stop) for s in layout.slice_of(r, t.shape)) == tile.box
            seen += tile.ranks
        assert sorted(seen) == list(range(plan.device_num))
        boxes = {tile.box for tile in plan.tiles(t.name)}
        assert len(boxes) == math.prod(layout.parts(a) for a in range(len(t.shape)))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_bytes_per_rank_of_megatron(n):
    d, f, b = 1024, 4096, 8
    plan = StrategyPlan.create(MegatronMLP(d, f, b), n, "megatron")
    rows = plan.bytes_per_rank()
    assert len(rows) == n
    for row in rows:
        assert row.parameters == 4 * (d * f // n + f // n + f * d // n + d)
        assert row.replicated == (4 * d if n > 1 else 0)  # b2 is a copy on every rank
        assert row.inputs == row.outputs == 4 * b * d


@pytest.mark.parametrize("n", [2, 4, 8])
def test_contraction_split_of_the_seed_matmul_needs_one_all_reduce_of_the_output(n):
    plan = StrategyPlan.create(MatMulNeg(), n, "contraction")
    compiled = plan.compile()
    reduces = [c for c in compiled.collectives if c.kind == "all-reduce"]
    assert len(reduces) == 1
    (ar,) = reduces
    assert ar.bytes == 128 * 16 * 4  # the whole (m, n) float32 output, on every rank
    assert ar.groups == (tuple(range(n)),)
    assert ar.bytes_sent_per_rank == pytest.approx(2 * (n - 1) / n * 8192)


@pytest.mark.parametrize("preset", ["batch", "columns"])
def test_batch_and_column_splits_need_no_reduction(preset):
    kinds = [c.kind for c in StrategyPlan.create(MatMulNeg(), 4, preset).compile().collectives]
    assert "all-reduce" not in kinds and kinds == ["all-gather"]


@pytest.mark.parametrize("dim", [0, 1])
def test_all_reduce_groups_follow_the_split_device_dimension(dim):
    """On a 2x2 mesh the partial sums are added among the ranks that differ only along ``dim``."""
    plan = (StrategyPlan.create(MatMulNeg(), 4, "contraction").with_mesh((2, 2))
            .with_axis("x", 1, dim).with_axis("matmul_weight", 0, dim))
    (ar,) = [c for c in plan.compile().collectives if c.kind == "all-reduce"]
    grid = Layout((2, 2), [-1])
    other = 1 - dim
    expected = {tuple(r for r in range(4) if grid.coord(r)[1 - other] == c) for c in (0, 1)}
    assert set(ar.groups) == expected


def test_cost_numbers_follow_from_the_inputs():
    plan = StrategyPlan.create(MegatronMLP(), 4, "megatron")
    compiled = plan.compile()
    cost = plan.cost(compiled, link_gb_per_s=50, tflop_per_s=20)
    assert cost.compute_s == pytest.approx(compiled.flops / 20e12)
    for c, seconds in cost.collectives:
        assert seconds == pytest.approx(c.bytes_sent_per_rank / 50e9)
    assert cost.comm_s == pytest.approx(sum(c.bytes_sent_per_rank for c in compiled.collectives) / 50e9)
    faster = plan.cost(compiled, link_gb_per_s=100, tflop_per_s=40)
    assert faster.comm_s == pytest.approx(cost.comm_s / 2)
    assert faster.compute_s == pytest.approx(cost.compute_s / 2)
    # XLA's FLOPs for one rank's share of the two matmuls (2 flops per multiply-add)
    d, f, b = 1024, 4096, 8
    assert compiled.flops >= 2 * 2 * b * d * f / 4
    with pytest.raises(DinbError, match="positive"):
        plan.cost(compiled, link_gb_per_s=0)


def test_invalid_choices_are_offered_with_the_reason():
    plan = StrategyPlan.create(MatMulNeg(), 5, "contraction")
    assert plan.preset == "custom" and "does not fit 5 devices" in plan.notes[0]
    (whole, split) = plan.axis_choices("matmul_weight", 0)
    assert whole.valid and not split.valid
    assert "96 does not split into 5 equal parts" in split.reason and "1, 2, 3, 4, 6, 8" in split.reason
    with pytest.raises(DinbError, match="matmul_weight axis 0"):
        plan.with_axis("matmul_weight", 0, 0)
    two = StrategyPlan.create(MegatronMLP(), 4, "megatron").with_mesh((2, 2))
    reused = {c.label: c for c in two.axis_choices("w1", 0)}["d0 ×2"]
    assert not reused.valid and "d0 already splits axis 1" in reused.reason


def test_meshes_and_device_changes():
    assert mesh_choices(8) == [(8,), (2, 4), (4, 2), (2, 2, 2)]
    assert mesh_choices(1) == [(1,)]
    plan = StrategyPlan.create(MegatronMLP(), 2, "megatron")
    assert plan.with_devices(4).preset == "megatron" and plan.with_devices(4).mesh == (4,)
    custom = plan.with_axis("x", 0, 0)  # batch split too: now custom
    assert custom.with_devices(16).maps["w1"] == (-1, 0) and custom.with_devices(16).maps["x"] == (-1, -1)
    with pytest.raises(DinbError, match="holds 6 devices"):
        plan.with_mesh((2, 3))


def test_strategy_saves_and_exports_and_runs(tmp_path):
    plan = StrategyPlan.create(MegatronMLP(64, 256, 4), 2, "megatron").with_axis("x", 0, 0)
    path = plan.save(tmp_path / "s.json")
    loaded = Strategy.load(path)
    assert {n: loaded[n] for n in loaded} == {n: plan.strategy()[n] for n in plan.strategy()}
    assert loaded.inputs == plan.strategy().inputs
    plan.export(tmp_path / "out", show_progress=False)
    simulated(2)
    model = Model()
    model.build_from_file(tmp_path / "out", ModelType.DINB, Context())
    net = MegatronMLP(64, 256, 4)
    x = net.example_inputs()[0]
    (y,) = model.predict([x])
    expected = mlp_reference(net.init_params(), x)
    np.testing.assert_allclose(y.get_data_to_numpy(), expected, rtol=1e-4, atol=1e-4)

    # the export itself can be explored: its own program, and other layouts through its model
    source = PlanSource.from_export(tmp_path / "out")
    exported = StrategyPlan.create(source)
    assert exported.preset == "exported" and exported.maps == plan.maps
    assert sorted(c.kind for c in exported.compile().collectives) == ["all-gather", "all-reduce"]
    changed = exported.with_axis("x", 0, -1)
    assert [c.kind for c in changed.compile().collectives] == ["all-reduce"]


def test_load_reports_read_and_compiled(tmp_path):
    plan = StrategyPlan.create(MatMulNeg(), 2, "contraction")
    plan.export(tmp_path, show_progress=False)
    simulated(2)
    phases = []
    Model().build_from_file(tmp_path, ModelType.DINB, Context(), on_phase=phases.append)
    assert phases == ["read", "compiled"]


# ---- the explorer widget --------------------------------------------------------------------------
def tiles_attr(explorer, tensor):
    svg = next(c.children[1].children[1].value for c in explorer.tensors_w.children
               if f'data-tensor="{tensor}"' in c.children[1].children[1].value)
    return int(svg.split('data-tiles="')[1].split('"')[0])


def bars_attr(explorer):
    return int(explorer.bytes_w.value.split('data-ranks="')[1].split('"')[0])


def widget_state_bytes(widget) -> int:
    """JSON size of everything the widget and its children would send to the browser."""
    import ipywidgets as w

    total = len(json.dumps(widget.get_state(), default=lambda b: "x" * len(b)))
    for key in widget.keys:
        value = getattr(widget, key)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, w.Widget):
                total += widget_state_bytes(item)
    return total


def test_explorer_updates_tiles_bytes_and_collectives_on_every_change(tmp_path):
    e = StrategyExplorer("mlp", devices=2)
    assert tiles_attr(e, "w1") == 2 and bars_attr(e) == 2
    assert 'data-kind="all-reduce"' in e.collectives_w.value
    e.set_devices(4)
    assert e.plan.device_num == 4 and tiles_attr(e, "w1") == 4 and bars_attr(e) == 4
    assert 'data-group-size="4"' in e.collectives_w.value
    e.mesh_w.value = (2, 2)
    assert e.plan.mesh == (2, 2) and tiles_attr(e, "w1") == 2  # each slice now on 2 ranks
    # click "d1 ×2" on axis 0 of x: the batch split on the other mesh axis
    panel = next(c for c in e.tensors_w.children if 'data-tensor="x"' in c.children[1].children[1].value)
    axis0 = panel.children[1].children[0].children[0]
    button = next(b for b in axis0.children[1:] if b.description == "d1 ×2")
    button.click()
    assert e.plan.maps["x"] == (1, -1) and e.preset_w.value == "custom"
    assert 'data-kind="all-gather"' in e.collectives_w.value
    disabled = [b for b in axis0.children[1:] if b.disabled]
    assert not disabled  # x axis 0 may take any dimension; w1 axis 0 may not reuse d0:
    w1 = next(c for c in e.tensors_w.children if 'data-tensor="w1"' in c.children[1].children[1].value)
    assert [b.description for b in w1.children[1].children[0].children[0].children[1:] if b.disabled] == [
        "d0 ×2", "d1·d0 ×4"]
    e.model_w.value = "matmul"
    assert e.plan.source.name == "matmul" and e.plan.preset == "contraction"
    e.preset_w.value = "batch"
    assert 'data-kind="all-gather"' in e.collectives_w.value and "all-reduce" not in e.collectives_w.value
    e.set_devices(5)
    assert "does not fit 5 devices" in e.notes_w.value
    e.capacity_w.value = 0.00001
    assert "OVER" in e.bytes_w.value
    e.path_w.value = str(tmp_path / "chosen.json")
    e.save_w.click()
    assert "saved" in e.status_w.value and Strategy.load(tmp_path / "chosen.json").device_num == 5


def test_explorer_sends_metadata_only():
    big = MegatronMLP(d_model=4096, d_ff=16384, batch=8)  # 512 MiB of parameters
    e = StrategyExplorer(big, devices=4, compile=False)
    assert widget_state_bytes(e) < 200_000
    assert "not compiled" in e.collectives_w.value


def test_explorer_names_a_bad_model():
    with pytest.raises(DinbError, match="neither a built-in model"):
        StrategyExplorer("resnet")


# ---- per-rank outputs -------------------------------------------------------------------------------
def test_rank_outputs_agreement_reference_and_text():
    y = np.full((128, 16), -48.0, np.float32)
    view = RankOutputs({0: [y], 1: [y.copy()]}, reference=y)
    assert view.agree and view.within_reference
    assert repr(view).splitlines() == [
        "rank 0: output_0 [128, 16] float32 min -48 max -48 mean -48; max |diff| vs reference 0.00e+00 "
        "(within rtol=1e-05, atol=1e-05)",
        "rank 1: output_0 [128, 16] float32 min -48 max -48 mean -48; max |diff| vs reference 0.00e+00 "
        "(within rtol=1e-05, atol=1e-05)",
        "output_0: all 2 ranks agree (bitwise)"]
    bad = y.copy()
    bad[3, 4] = 0
    view = RankOutputs([[y], [y], [bad]], reference=y)
    assert not view.agree and view.within_reference is False
    assert "output_0: ranks [2] differ" in repr(view)
    rows = Layout([2, 2], [1, -1])  # ranks {0, 1} hold rows 0:64, ranks {2, 3} rows 64:128
    halves = {0: [y[:64]], 1: [y[:64]], 2: [y[64:] + 1], 3: [y[64:] + 1]}
    sharded = RankOutputs(halves, layouts=[rows])
    assert sharded.agree and "sharded; the ranks holding each slice agree" in repr(sharded)
    halves[3] = [y[64:]]
    assert RankOutputs(halves, layouts=[rows]).agreement == [("sharded", [3])]
    assert "shapes differ" in repr(RankOutputs({0: [y[:64]], 1: [y[:32]]}))


def test_heatmaps_are_block_means_and_small():
    a = np.arange(130 * 70, dtype=np.float64).reshape(130, 70)
    cells = downsample(a, 64)
    assert cells.shape == (44, 35)  # blocks of 3 x 2
    assert cells[0, 0] == pytest.approx(a[0:3, 0:2].mean())
    assert cells[-1, -1] == pytest.approx(a[129:130, 68:70].mean())  # a partial block
    big = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    view = RankOutputs({0: [big], 1: [big]})
    assert widget_state_bytes(view) < 64_000


def test_magic_outputs_displays_the_viewer():
    from dinb.notebook import magics

    assert "RankOutputs" in magics.USAGE and "%dinfer explore" in magics.USAGE
    assert dinb.RankOutputs is RankOutputs and dinb.StrategyExplorer is StrategyExplorer


def test_the_compiler_helper_leaves_no_log_file_however_its_client_ends(tmp_path):
    """The helper's log has no name on disk: a killed notebook leaves nothing in the temp folder."""
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    before = set(Path(tempfile.gettempdir()).glob("dinb-xla-view-*"))
    code = ("import os, signal, dinb\n"
            "plan = dinb.StrategyPlan.create(dinb.MatMulNeg(), 2)\n"
            "plan.compile()\n"
            "print('compiled', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "compiled" in proc.stdout, proc.stderr
    assert set(Path(tempfile.gettempdir()).glob("dinb-xla-view-*")) <= before


# ---- pipeline stages ----------------------------------------------------------------------------
def test_a_plan_with_stages_places_tensors_and_ranks_by_stage():
    from dinb.models import DeepMLP

    plan = StrategyPlan.create(DeepMLP(256, 1024, 4, 8), 4).with_stages(2)
    assert (plan.stages, plan.mesh, plan.device_num) == (2, (2,), 4)
    assert plan.stage_of("layer3.w1") == 1 and plan.stage_of("x") == 0 and plan.stage_of("output_0") == 1
    assert [t.ranks for t in plan.tiles("layer3.w1")] == [(2,), (3,)]
    strategy = plan.strategy()
    assert strategy.pipeline_stages == 2 and strategy.stage_of("layer1.b2") == 0
    views = plan.compile()
    assert len(views) == 2 and views[0].sends == [((8, 256), "float32")]
    assert [c.kind for c in views[1].collectives] == ["all-reduce", "all-reduce"]  # one per block
    rows = plan.bytes_per_rank(views)
    layer = (256 * 1024 * 2 // 2 + 1024 // 2 + 256) * 4  # a block's slices on one rank
    assert [r.parameters for r in rows] == [2 * layer] * 4 and [r.stage for r in rows] == [0, 0, 1, 1]
    assert rows[0].inputs == rows[0].outputs == 8 * 256 * 4  # x in, activations out
    (transfer,) = plan.transfers(views, link_gb_per_s=1.0)
    assert (transfer.bytes_per_rank, transfer.pairs) == (8192, 2)
    assert transfer.seconds == pytest.approx(8.192e-6)
    with pytest.raises(DinbError, match=r"3 stages do not divide .* choose one of \[1, 2, 4\]"):
        plan.with_stages(3)
    assert plan.with_devices(8).mesh == (4,) and plan.with_stages(4).mesh == (1,)
    assert StrategyPlan.create(MegatronMLP(), 4).source.stage_choices(4) == [1]


def test_the_explorer_shows_stages_transfers_and_the_schedule(tmp_path):
    from dinb.models import DeepMLP

    ex = StrategyExplorer(DeepMLP(256, 1024, 4, 8), devices=4, stages=2, micro_batches=4)
    headers = [c for c in ex.tensors_w.children if "dinb-stage-header" in c._dom_classes]
    assert [h.value.split("</b>")[0][-7:] for h in headers] == ["stage 0", "stage 1"]
    assert 'data-stage="1"' in ex.bytes_w.value and "s1 r3" in ex.bytes_w.value
    assert ex.collectives_w.value.count("dinb-stage-cost") == 2
    text = "".join(c.value for c in ex.pipeline_w.children if hasattr(c, "value"))
    assert "bubble (S-1)/(M+S-1) = 1/5 = <b>0.20</b>" in text and 'class="dinb-transfer"' in text
    assert ex.estimated_bubble >= 0.2
    ex.micro_w.value = 1
    assert ex.estimated_bubble >= 0.5
    ex.set_stages(1)
    assert ex.pipeline_w.children == () and ex.plan.mesh == (4,)
    ex.set_stages(2)
    paths = ex.export(tmp_path / "out")
    assert dinb.read_slice_file(paths[3]).pipeline["stage"] == 1
    back = StrategyPlan.create(tmp_path / "out")  # an export with stages explores as one
    assert back.stages == 2 and back.preset == "exported" and back.stage_of("layer3.b2") == 1
