"""Writes notebooks/06_pipeline_stages.ipynb; ``--execute`` stores the outputs nbval compares."""

from nbtools import CHECK, code, exercises, md, write_notebook

IGNORE = "# NBVAL_IGNORE_OUTPUT\n"

cells = [
    md("""# 06 · Pipeline stages: each group of ranks holds its own layers

Tensor parallelism (notebooks 01-05) cuts **every layer** across the ranks, so the ranks talk
inside every layer. Pipeline parallelism cuts the **stack of layers**: with `S` stages of `T` ranks
each (`S x T` ranks in all), stage `s` holds only its own layers, split over its `T` ranks, and
hands its activations to stage `s + 1`. This is MindSpore's `pipeline_stages` and the contract of its
distributed-inference and serving documents: *each stage only loads its own stage's checkpoint files*, *the first stage receives
the input, other stages receive no data, the last stage's ranks all return the same data*.

A stage waits while the stages before it work: the **bubble**. Cutting the batch into `M`
micro-batches lets the stages work on different micro-batches at once (GPipe), and the bubble
shrinks to `(S - 1) / (M + S - 1)`."""),
    md("""## 1 · Why stages: memory per rank against what the ranks send

The deep MLP (`mlp-deep`): 8 residual Megatron blocks, d=1024, ff=4096, batch 32. On 4 ranks,
three ways: `1 x 4` (tensor parallel only), `2 x 2` and `4 x 1` (pipeline only). The explorer's
plan compiles each stage's program for simulated devices and counts the bytes each rank holds
and sends (collectives inside a stage, activations between stages)."""),
    code(CHECK + """import numpy as np

import dinb
from dinb.models import DeepMLP

job = dinb.init_ranks("cpu", simulate=4)  # before the first JAX call in this kernel (export traces)

big = DeepMLP(d_model=1024, d_ff=4096, layers=8, batch=32)
print(f"{'S x T':<7}{'params/rank':>13}{'collectives':>13}{'sent in them':>14}{'transfers':>11}{'sent':>10}")
for stages in (1, 2, 4):
    plan = dinb.StrategyPlan.create(big, 4).with_stages(stages)
    views = plan.compile()
    views = views if isinstance(views, list) else [views]
    collectives = [c for c in views[0].collectives]  # stage 0's (every stage runs the same)
    sent = sum(c.bytes_sent_per_rank for c in collectives)
    moves = plan.transfers(views) if stages > 1 else []
    params = plan.bytes_per_rank(views if stages > 1 else views[0])[0].parameters
    print(f"{stages} x {4 // stages:<3}{params / 2**20:>10.1f} MiB{len(collectives):>13}"
          f"{sent / 2**10:>10.0f} KiB{len(moves):>11}{sum(t.bytes_per_rank for t in moves) / 2**10:>6.0f} KiB")"""),
    md("""Every layout holds a quarter of the weights per rank. Tensor parallelism pays for it with an
all-reduce of the `(32, 1024)` activations in every block (a ring all-reduce sends
`2 (T-1)/T` of the tensor per rank); four stages of one rank send the activations once per stage
boundary, rank to rank, and need no collective at all. The price of stages is time: the bubble."""),
    md("""## 2 · A strategy with stages

`infer_predict_layout(..., pipeline_stages=S)` cuts the model's layers into `S` equal runs
(`ModelDef.pipeline_layers()` says which parameters make a layer) and splits each stage's layers
over its own ranks. On disk it is MindSpore's merged pipeline strategy: every parameter named
`"{stage}-{name}"`. A stage count that does not divide the layers or the ranks is refused with
the counts that would."""),
    code(CHECK + """import json, tempfile
from pathlib import Path

net = DeepMLP(d_model=256, d_ff=1024, layers=4, batch=8)
params = net.init_params(0)
x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
strategy = dinb.infer_predict_layout(net, x, device_num=4, pipeline_stages=2)
work = Path(tempfile.mkdtemp())
saved = json.loads(strategy.save(work / "strategy.json").read_text())
print("current_stage", saved["current_stage"], "| parameters:", list(saved["parallel_layout_item"])[:5], "...")
for s in range(2):
    print(f"stage {s}: ranks {list(strategy.stage_ranks(s))}, {len(strategy.stage_params(s))} parameters")
try:
    dinb.infer_predict_layout(net, x, device_num=4, pipeline_stages=3)
except dinb.StrategyError as e:
    print("StrategyError:", e)"""),
    md("""## 3 · Export: each rank gets its stage only

One slice file per rank, holding only its stage's parameter slices and its stage's programs,
one per micro-batch count (the program of a stage is compiled for the stage's own `T` ranks)."""),
    code(CHECK + """paths = dinb.export_distributed(net, params, strategy, [x], work / "deep")
for p in paths:
    sf = dinb.read_slice_file(p)
    pipe = sf.pipeline
    print(f"{p.name}: stage {pipe['stage']}, layers {pipe['layers'][0]}..{pipe['layers'][1] - 1}, "
          f"{len(sf.params)} parameter slices, {sum(a.nbytes for a in sf.params.values()) / 2**10:.0f} KiB, "
          f"programs for {pipe['micro_batches']} micro-batches, sends {[v['shape'] for v in pipe['sends']]}")"""),
    md("""## 4 · Run it: simulated ranks, micro-batches

In this kernel, 4 virtual CPU devices play the 4 ranks; each stage runs in its own thread and
hands its activations to the next through a queue. `predict(..., micro_batches=M)` cuts the batch
into `M` micro-batches (MindSpore's default, and dinb's, is 1). The outputs equal one device's,
for every `M`."""),
    code(CHECK + """from dinb.models import deep_mlp_reference

model = dinb.Model()
model.build_from_file(work / "deep", dinb.ModelType.DINB, dinb.Context())
reference = deep_mlp_reference(params, x, 4)
for m in (1, 2, 4, 8):
    y = model.predict([x], micro_batches=m)[0].get_data_to_numpy()
    print(f"M={m}: equals one device (1e-5): {np.allclose(y, reference, atol=1e-5, rtol=1e-5)}")
print({rank: len(outs) for rank, outs in model.rank_outputs().items()}, "outputs per rank")"""),
    md("""Only the last stage's ranks give outputs; the per-rank viewer says so."""),
    code(IGNORE + """dinb.RankOutputs.from_model(model, reference=reference)"""),
    md("""## 5 · The schedule and its bubble

GPipe's schedule: micro-batch `m` runs on stage `s` at tick `m + s`. Colours are micro-batches;
the white is the bubble."""),
    code(CHECK + """from dinb.widgets import SchedulePicture

SchedulePicture(stages=4, micro_batches=1)"""),
    code(CHECK + """SchedulePicture(stages=4, micro_batches=8)"""),
    md("""Now measured: 4 stages of one rank each (`4 x 1`) of a larger deep MLP, each micro-batch's
computation timed on its rank. Transfers between stages, stages of unequal speed, and this
machine's cores (2 here, shared by all 4 simulated ranks) add to the formula's bubble."""),
    code(IGNORE + """import time

from dinb.sharding import bubble_fraction, measured_bubble

deep = DeepMLP(d_model=512, d_ff=2048, layers=8, batch=32)
xs = np.random.default_rng(1).standard_normal((32, 512)).astype(np.float32)
four = dinb.infer_predict_layout(deep, xs, device_num=4, pipeline_stages=4)
dinb.export_distributed(deep, deep.init_params(1), four, [xs], work / "four")
staged = dinb.Model()
staged.build_from_file(work / "four", dinb.ModelType.DINB, dinb.Context())
print(f"{'M':>3}{'formula':>9}{'measured':>10}{'predict ms':>12}")
for m in (1, 2, 4, 8):
    staged.predict([xs], micro_batches=m)  # compile and warm up
    t0 = time.perf_counter()
    staged.predict([xs], micro_batches=m)
    ms = (time.perf_counter() - t0) * 1e3
    events = staged.timeline()
    print(f"{m:>3}{bubble_fraction(4, m):>9.2f}{measured_bubble(events):>10.2f}{ms:>12.1f}")
SchedulePicture(staged.timeline())"""),
    md("""## 6 · Real ranks: four notebook engines

The same export on 4 engines under `mpiexec` (2 stages x 2 ranks). `%dinfer predict` sends the
input to the first stage's ranks only and takes one copy of the output from the last stage's,
checking that they agree; the activations go from rank to rank over MPI."""),
    code(CHECK + """%load_ext dinb
%dinfer cluster start -n 4"""),
    code(IGNORE + """%dinfer load {work / "deep"}"""),
    code(CHECK + """y = %dinfer predict x --micro-batches 4
print("equals one device:", np.allclose(y, reference, atol=1e-5, rtol=1e-5))
print({rank: len(outs) for rank, outs in dinb.current_cluster().outputs().per_rank.items()}, "outputs per rank")"""),
    code(IGNORE + """%dinfer schedule"""),
    code(CHECK + """%dinfer cluster stop"""),
    md("""## 7 · Checkpoints: a stage reads its own parameters only

A checkpoint saved by a `2 x 2` job (each rank saved its stage's slices) loads into a `4 x 1`
predict job: each rank reads only the bytes of its own stage's parameters. MindSpore refuses a
changed stage count; dinb's reads are planned per tensor box, so any stage count and split works."""),
    code(CHECK + """train = dinb.infer_predict_layout(net, x, device_num=4, pipeline_stages=2)
dinb.save_distributed_checkpoint(params, train, work / "ckpt")
predict = dinb.infer_predict_layout(net, x, device_num=4, pipeline_stages=4)
ckpt = dinb.DistributedCheckpoint(work / "ckpt")
for rank in range(4):
    slices = ckpt.load_rank(predict, rank)
    print(f"rank {rank} (stage {predict.rank_stage(rank)}): {sorted({k.split('.')[0] for k in slices})}, "
          f"{ckpt.reads[rank] / 2**10:.0f} KiB read from source ranks "
          f"{sorted({row['source_rank'] for row in ckpt.read_plan(predict, rank)})}")"""),
    md("""## 8 · Serving a pipelined export

`distributed.declare_servable(rank_size=4, stage_size=2)` serves such an export (`python -m dinb
serve --model-dir DIR` declares it from the export): the worker sends each request to the first
stage's agents and answers with the last stage's outputs. The benchmark
`benchmarks/pipeline.py` compares `4 x 1`, `2 x 2` and `1 x 4` on real ranks at 1-8 micro-batches."""),
    *exercises(
        "The bubble shrinks as micro-batches grow; but a micro-batch count must cut the batch evenly.",
        ("""With **4** stages and a batch of **32** rows, what is the smallest number of micro-batches
`M` that divides the batch and brings the bubble under **20%**? Use the formula, then
`dinb.sharding.bubble_fraction(stages, M)` to confirm.""",
         """from dinb.sharding import bubble_fraction

micro_batches = next(m for m in range(1, 33) if 32 % m == 0 and bubble_fraction(4, m) < 0.2)
print(micro_batches, f"{bubble_fraction(4, micro_batches):.0%}")""",
         """exercises.smallest_micro_batches(micro_batches)"""),
    ),
    code("""import shutil

shutil.rmtree(work)  # the tutorial's files go with it"""),
]

write_notebook(cells, "06_pipeline_stages.ipynb")
