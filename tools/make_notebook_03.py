"""Writes notebooks/03_strategy_explorer.ipynb; ``--execute`` stores the outputs nbval compares."""

from nbtools import CHECK, code, exercises, md, write_notebook

IGNORE = "# NBVAL_IGNORE_OUTPUT\n"

cells = [
    md("""# 03 · The strategy explorer: see the split, the memory and the traffic

A strategy says, for every tensor, which device dimensions split which of its axes. Three things
follow from it, and the explorer shows all three as you change it:

1. **the tiles**: which slice of each tensor sits on which rank (a colour per rank; a slice held
   by several ranks, a *replica group*, shows all their colours along its bottom edge);
2. **the bytes per rank**: parameters (and how much of that is a copy other ranks hold too),
   inputs, outputs and XLA's workspace, against a device capacity;
3. **the collectives**: what XLA inserted into the per-rank program, read from the program it
   compiled for that many simulated devices (a helper process with virtual CPU devices, so no
   cluster is needed), with a time estimate: bytes each rank sends over a link bandwidth, beside
   the FLOPs over a compute rate.

Invalid choices (a split that does not divide an axis, a device dimension used twice) are greyed
out with the reason. Nothing here sends tensor values to the browser: only shapes, slices and
byte counts."""),
    code("""import numpy as np

import dinb
from dinb.models import MatMulNeg, MegatronMLP
from dinb.widgets import StrategyExplorer"""),
    md("""## 1 · MindSpore's MatMul example, three ways

`y = -(x @ W)` with `x` of shape (m, k) = (128, 96) and `W` (k, n) = (96, 16). Write an axis split
over N ranks with a subscript, as in the scaling book's sharded-matmul cases:

* **batch**: `x[m_N, k] · W[k, n] → y[m_N, n]`. Each rank multiplies its rows of `x` by the whole
  `W`: no communication is needed to compute. MindSpore's example wants every rank to hold all of `y`, so
  XLA adds one **all-gather** of `y` at the end.
* **columns**: `x[m, k] · W[k, n_N] → y[m, n_N]`. Each rank holds all of `x` and its columns of
  `W`; again no communication to compute, and an **all-gather** assembles `y`.
* **contraction**: `x[m, k_N] · W[k_N, n] → y_r[m, n]`. Each rank holds a slice of the dimension
  being summed over, so each computes a *partial sum* of the whole output:
  `y = Σ_r x[:, k_r] · W[k_r, :]`. Adding them is an **all-reduce**; in a ring each rank sends
  `2 (N-1)/N · |y|` bytes. This is the split MindSpore's example uses: it divides `W` (and `x`) but pays a
  reduction of the full output.

The plan below is what the explorer renders; printing it shows the same numbers as text."""),
    code(CHECK + """for preset in ("batch", "columns", "contraction"):
    plan = dinb.StrategyPlan.create(MatMulNeg(), 4, preset)
    print(plan.summary())
    print(plan.cost(plan.compile(), link_gb_per_s=100).collectives_summary())
    print()"""),
    md("""Beside the traffic, the estimate puts XLA's own count of each rank's FLOPs over a compute
rate (the exact count differs a little between XLA versions, so this cell is not compared):"""),
    code("""for preset in ("batch", "columns", "contraction"):
    plan = dinb.StrategyPlan.create(MatMulNeg(), 4, preset)
    print(preset, plan.cost(plan.compile(), link_gb_per_s=100, tflop_per_s=100).compute_summary())"""),
    md("""Try it: switch the strategy, the device count (5 devices do not divide 96 or 128: the
explorer falls back to whole tensors and greys those splits out), or click a split per axis."""),
    code(IGNORE + """StrategyExplorer("matmul", devices=4, preset="contraction", capacity_gib=0.0001)"""),
    md("""## 2 · The Megatron MLP at 2 and 4 ranks

`y = gelu(x @ W1 + b1) @ W2 + b2`. Megatron splits `W1` by columns and `W2` by rows:
`h[b, f_N] = gelu(x[b, d] · W1[d, f_N] + b1[f_N])` needs nothing from the other ranks (gelu acts
element by element), then `h[b, f_N] · W2[f_N, d]` is a contraction over the split `f`, so one
**all-reduce** of the (batch, d) output finishes the layer. Parameters per rank fall as 1/N
(only `b2` is replicated); the all-reduce stays the size of the output, and each rank's share of
it, `2 (N-1)/N`, *grows* with N."""),
    code(CHECK + """for n in (2, 4):
    plan = dinb.StrategyPlan.create(MegatronMLP(), n, "megatron")
    print(plan.summary())
    print(plan.cost(plan.compile(), link_gb_per_s=100).collectives_summary())
    print()"""),
    code("""for n in (2, 4):
    plan = dinb.StrategyPlan.create(MegatronMLP(), n, "megatron")
    print(n, "ranks:", plan.cost(plan.compile(), link_gb_per_s=100, tflop_per_s=100).compute_summary())"""),
    code(IGNORE + """explorer = StrategyExplorer("mlp", devices=2, capacity_gib=0.02)
explorer"""),
    md("""## 3 · Two mesh axes: data and tensor parallel together

Four devices as a 2 × 2 mesh (`d1=2 × d0=2`): keep Megatron's split on `d0` and split the batch
of `x` over `d1`. Each weight slice is now held by two ranks (a replica group per `d1` row), the
all-reduce runs within each `d0` group only, `{0,1}` and `{2,3}`, and an all-gather over `d1`
assembles the output: `{0,2}` and `{1,3}`."""),
    code(CHECK + """plan = (dinb.StrategyPlan.create(MegatronMLP(), 4, "megatron")
        .with_mesh((2, 2))
        .with_axis("x", 0, 1))
print(plan.summary())
print(plan.cost(plan.compile()).collectives_summary())"""),
    md("""Invalid choices come with the reason. On 5 devices no axis of the MatMul divides:"""),
    code(CHECK + """plan = dinb.StrategyPlan.create(MatMulNeg(), 5, "contraction")
print(plan.notes[0].split(":")[0])
for choice in plan.axis_choices("matmul_weight", 0):
    print(f"{choice.label:>6}: {'ok' if choice.valid else choice.reason}")"""),
    md("""## 4 · From the explorer to running ranks

The explorer's strategy is an ordinary strategy file, and `export` writes one slice file per
rank under it (with a progress bar). Here the 2-rank Megatron strategy runs on two simulated
ranks in this kernel and `RankOutputs` shows what each rank returned, against numpy."""),
    code(CHECK + """import tempfile
from pathlib import Path

job = dinb.init_ranks("cpu", simulate=2)  # before the first JAX call in this kernel (export traces)
work = Path(tempfile.mkdtemp())
path = explorer.save(work / "mlp_strategy.json")
print(dinb.Strategy.load(path))"""),
    code(IGNORE + """paths = explorer.export(work / "mlp")  # a slice file per rank, with a progress bar"""),
    code(CHECK + """print([p.name for p in paths])"""),
    code(IGNORE + """from dinb import Context, Model, ModelType
from dinb.models import mlp_reference
from dinb.widgets import RankOutputs

model = Model()
model.build_from_file(work / "mlp", ModelType.DINB, Context())
x = MegatronMLP().example_inputs()[0]
model.predict([x])
view = RankOutputs.from_model(model, reference=mlp_reference(MegatronMLP().init_params(), x),
                              rtol=1e-4, atol=1e-4)
view"""),
    code(CHECK + """print("all ranks agree:", view.agree)
print("every rank within tolerance of numpy:", view.within_reference)"""),
    *exercises(
        "Megatron's split pays one all-reduce of the output per layer. Is there another way?",
        ("""Find a plan of the Megatron MLP on **2** ranks in which every rank holds **at most 60%**
of the parameters and XLA inserts **no all-reduce**. Start from a preset and change axes with
`with_axis(name, axis, entry)` (`-1`: whole, `0`: split over device dimension d0), or click it in an
explorer and look at its `plan`. What does XLA insert instead, and does it send more or less?""",
         """plan = (dinb.StrategyPlan.create(MegatronMLP(), 2, "megatron")
        .with_axis("w2", 0, -1)   # w2's rows (the contraction) whole again ...
        .with_axis("w2", 1, 0))   # ... and its columns split instead
print(plan.summary())""",
         """exercises.mlp_without_allreduce(plan)"""),
    ),
    code("""import shutil

shutil.rmtree(work)  # the tutorial's files go with it"""),
]

write_notebook(cells, "03_strategy_explorer.ipynb")
