"""Writes notebooks/01_distributed_matmul.ipynb (outputs are produced when nbval runs it)."""

from nbtools import CHECK, code, exercises, md, write_notebook

cells = [
    md("""# 01 · MindSpore's distributed MatMul example, rank by rank

The network of the MindSpore distributed-inference examples: `y = -(x @ W)` with `W` of shape
(96, 16) filled with 0.5 and `x = ones(128, 96)`, so every output element is `-(96 * 0.5) = -48`
whatever the split. We follow MindSpore Lite's flow:

**strategy → export slices → `build_from_file` → `get_inputs` → `predict` → outputs**

This notebook runs in the *simulated* mode: one process with 2 virtual CPU devices, one per
rank. The same slice files run unchanged on real rank processes (`mpiexec -n 2 python -m dinb run`,
last section)."""),
    code(CHECK + """import dinb

job = dinb.init_ranks("cpu", simulate=2)   # before any other JAX call in this kernel
print(f"{job.world_size} simulated ranks: {job.local_ranks}")"""),
    md("""## 1 · The strategy

MindSpore shards the MatMul with `matmul.shard(((a, b), (b, c)))`: `x` is cut into `a x b`
blocks, `W` into `b x c`. MindSpore's example splits the contraction dimension, `((1, 2), (2, 1))`:
rank *r* holds the columns `k_r` of `x` and the rows `k_r` of `W`, computes a partial sum
`x[:, k_r] @ W[k_r, :]`, and an **all-reduce** adds the partial sums.
`infer_predict_layout` turns that into a layout per parameter (`dev_matrix` + `tensor_map`)."""),
    code(CHECK + """import numpy as np
from dinb.models import MatMulNeg

net = MatMulNeg(matmul_size=(96, 16))
x = np.ones((128, 96), np.float32)
strategy = dinb.infer_predict_layout(net, x, device_num=2, strategy="contraction")
print(strategy)
print(strategy.to_json()["parallel_layout_item"])"""),
    md("""Which slice of `W` does each rank hold? `tensor_map = [1, 0]` over `dev_matrix = [1, 2, 1]`:
axis 0 of `W` follows device dimension 1 (size 2), axis 1 follows dimension 0 (size 1)."""),
    code(CHECK + """from dinb.explore import describe_slices

for name in ("contraction", "batch", "columns"):
    s = dinb.infer_predict_layout(net, x, device_num=2, strategy=name)
    print(name, "->", "; ".join(describe_slices(s["matmul_weight"], (96, 16), "W")))"""),
    code("""import matplotlib.pyplot as plt
from dinb.explore import draw_layout

fig, axes = plt.subplots(1, 3, figsize=(9, 4.5))
for ax, name in zip(axes, ("contraction", "batch", "columns")):
    s = dinb.infer_predict_layout(net, x, device_num=2, strategy=name)
    draw_layout(s["matmul_weight"], (96, 16), f"W ({name})", ax=ax)
fig.tight_layout()"""),
    md("""## 2 · Export one slice file per rank

`export_distributed` traces the model once with every tensor annotated by its layout and writes
`matmul0.dinb` and `matmul1.dinb` (the analogue of `Matmul0.mindir` / `Matmul1.mindir`): each
holds that rank's weight slice, the serialized SPMD program and the metadata."""),
    code(CHECK + """import tempfile
from pathlib import Path

work = Path(tempfile.mkdtemp())
out_dir = work / "matmul"
paths = dinb.export_distributed(net, net.init_params(), strategy, [x], out_dir)
for p in paths:
    meta = dinb.read_meta(p)
    w = meta["params"]["matmul_weight"]
    print(p.name, "rank", meta["rank"], "of", meta["world_size"], "| W slice", w["slice"])"""),
    md("""## 3 · The Lite flow: context, build, inputs, predict

Exactly the calls of the MindSpore Lite sample. `build_from_file` loads the slices of the ranks
this process hosts and compiles the program once; `predict` can then be called many times."""),
    code(CHECK + """from dinb import Context, Model, ModelType

context = Context()
context.target = ["cpu"]
context.cpu.provider = "xla"

model = Model()
model.build_from_file(out_dir, ModelType.DINB, context)

inputs = model.get_inputs()
for input_i in inputs:
    input_i.set_data_from_numpy(np.ones(input_i.shape, dtype=np.float32))

outputs = model.predict(inputs)
for output in outputs:
    print("tensor's name is:%s data size is:%s tensor elements num is:%s"
          % (output.name, output.data_size, output.element_num))
    print("output data is:", output.get_data_to_numpy().flatten()[:10])"""),
    md("""Every rank of the last stage holds the same output (the program ends with the all-reduce):"""),
    code(CHECK + """for rank, (out,) in model.rank_outputs().items():
    print(f"rank {rank}: shape {out.shape}, all -48: {bool(np.all(out == -48))}")"""),
    md("""## 4 · Three strategies, one answer, different communication

Each strategy gives the single-device result; what differs is the collective XLA inserts
(read from the compiled per-rank program). Splitting the contraction dimension needs an
**all-reduce** of partial sums; splitting rows of `x` or columns of `W` needs no reduction,
only an **all-gather** so that every rank holds the whole output."""),
    code(CHECK + """rng = np.random.default_rng(0)
w_rand = {"matmul_weight": rng.standard_normal((96, 16)).astype(np.float32)}
x_rand = rng.standard_normal((128, 96)).astype(np.float32)
reference = -(x_rand @ w_rand["matmul_weight"])

lines = []
for name in ("contraction", "batch", "columns"):
    s = dinb.infer_predict_layout(net, x_rand, device_num=2, strategy=name)
    d = work / name
    dinb.export_distributed(net, w_rand, s, [x_rand], d)
    m = Model()
    m.build_from_file(d, ModelType.DINB, context)
    (y,) = m.predict([x_rand])
    hlo = m.compiled_text()
    same = bool(np.allclose(y.get_data_to_numpy(), reference, rtol=1e-5, atol=1e-4))
    lines.append(f"{name:12s} equals single device: {same}  all-reduce: {hlo.count('all-reduce(')}"
                 f"  all-gather: {hlo.count('all-gather(')}")
print("\\n".join(lines))"""),
    md("""## 5 · The same files on real rank processes

`mpiexec -n 2 python -m dinb run --model-dir DIR` starts two processes; each reads only its own
slice file, joins the job, runs predict on the same input and prints what MindSpore Lite's sample
prints. (`dinb.cli.launch` runs that command and strips the stack's start-up noise.)"""),
    code("""from dinb.cli import launch

proc = launch(2, ["--model-dir", str(out_dir)])
print(proc.stdout or proc.stderr)"""),
    *exercises(
        "Both are about MindSpore's `matmul.shard(((a, b), (b, c)))` on **4** ranks: `x` (m, k) is "
        "cut into `a x b` blocks, `W` (k, n) into `b x c`, over `dev_matrix = [a, b, c]`.",
        ("""Find a shard for 4 ranks whose program needs **no all-reduce**. (The check exports nothing:
it compiles your shard for 4 simulated devices and reads the collectives from XLA's program.)""",
         """shard = ((2, 1), (1, 2))  # rows of x over a = 2, columns of W over c = 2, k whole""",
         """exercises.no_allreduce_shard(shard)"""),
        ("""Under `((2, 1), (1, 2))`, which ranks hold the **same** slice of `W`? Give the groups of
ranks, e.g. `[[0, 1], [2, 3]]`. (`describe_slices` above, or `Layout.replica_groups()`, can tell you;
try it in your head first: a `tensor_map` counts device dimensions from the right.)""",
         """groups = [[0, 2], [1, 3]]""",
         """exercises.w_replica_groups(groups)"""),
    ),
    code("""import shutil

shutil.rmtree(work)  # the tutorial's files go with it"""),
]

write_notebook(cells, "01_distributed_matmul.ipynb")
