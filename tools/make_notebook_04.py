"""Writes notebooks/04_checkpoint_resharding.ipynb (outputs are produced when nbval runs it)."""

from nbtools import CHECK, code, exercises, md, write_notebook

cells = [
    md("""# 04 · Saved on 4 ranks, served on 2: resharding a checkpoint

A model trained with one layout and rank count must often be served with another. MindSpore's
answer (`load_distributed_checkpoint`, `transform_checkpoints`) merges every parameter in host
memory and cuts it again. dinb keeps MindSpore's API and files but **reads only what each target
rank needs**: for every parameter it intersects the target rank's slice with each source slice
and reads just those byte ranges.

We train-shard a Megatron MLP over 4 ranks (2-way data parallel × 2-way tensor parallel, with a
ZeRO-style optimizer shard), save one checkpoint file per rank, then load it for 2 ranks with the
predict strategy and check the predictions against the single-device model."""),
    code(CHECK + """import dinb

job = dinb.init_ranks("cpu", simulate=2)   # the 2 serving ranks, simulated in this kernel
print(f"{job.world_size} simulated ranks")"""),
    md("""## 1 · The training strategy and the per-rank checkpoint

`dev_matrix = [2, 2]`: device dimension 1 is data parallel, dimension 0 tensor parallel. `w1` is
split by columns over dimension 0 and `w2` by rows; along the data-parallel dimension the ranks
would hold copies, so the optimizer shard (`opt_weight_shard_size = 2`, ranks `step = 2` apart)
splits each copy again by rows. Every rank ends up with a different quarter of `w1` and `w2`."""),
    code(CHECK + """import numpy as np
from dinb import Layout, ParamLayout, Strategy
from dinb.models import MegatronMLP, mlp_reference

net = MegatronMLP(d_model=64, d_ff=256, batch=4)
params = net.init_params(seed=0)
x = net.example_inputs(seed=1)[0]
zero = dict(opt_weight_shard_step=2, opt_weight_shard_size=2)
train = Strategy({
    "w1": ParamLayout(Layout([2, 2], [-1, 0]), **zero),
    "b1": ParamLayout(Layout([2, 2], [0])),
    "w2": ParamLayout(Layout([2, 2], [0, -1]), **zero),
    "b2": ParamLayout(Layout([2, 2], [-1])),
})
for name in train:
    rec = train.item(name)
    print(f"{name:3} {params[name].shape!s:11} {rec.layout}  opt shard {rec.opt_weight_shard_size}")"""),
    md("""`save_distributed_checkpoint` writes what each rank holds (MindSpore's `integrated_save=False`), one
`rank_{r}/` folder per rank like MindSpore, as plain safetensors with the layout, the part of the
full tensor and a checksum per tile in the header, plus `strategy.json`."""),
    code(CHECK + """import tempfile
from pathlib import Path
from dinb.checkpoint import save_distributed_checkpoint
from dinb.checkpoint import DinbRankFile

work = Path(tempfile.mkdtemp())
paths = save_distributed_checkpoint(params, train, work / "train")
for p in paths:
    f = DinbRankFile(p)
    parts = ", ".join(f"{n}{list(f.tensors[n].shape)}" for n in f.tensors)
    print(p.relative_to(work), "->", parts)"""),
    md("""## 2 · The predict strategy, and what each serving rank reads

For 2 serving ranks, `infer_predict_layout` gives the Megatron split: `w1` by columns, `w2` by rows,
one all-reduce. For each target rank, `read_plan` lists the source files and the parts of the full
tensors it will read, without reading anything."""),
    code(CHECK + """from dinb.checkpoint import DistributedCheckpoint

predict = dinb.infer_predict_layout(net, x, device_num=2)
ckpt = DistributedCheckpoint(work / "train")
for rank in range(2):
    plan = ckpt.read_plan(predict, rank)
    total = sum(row["bytes"] for row in plan)
    print(f"target rank {rank}: reads {total} bytes from source ranks "
          f"{sorted({row['source_rank'] for row in plan})}")
    for row in plan:
        if row["param"] in ("w1", "w2"):
            print(f"   {row['param']} from rank {row['source_rank']}: "
                  f"part {row['part']} ({row['bytes']} bytes)")"""),
    md("""The picture: source slices coloured by the rank that saved them (`s0`…`s3`), the target
rank's slice outlined in red, and the part read from each source hatched. The `b1`/`b2` copies
held by several ranks are read once."""),
    code("""import matplotlib.pyplot as plt
from dinb.checkpoint import param_box
from dinb.explore import draw_reshard

fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
for ax, (name, rank) in zip(axes, [("w1", 0), ("w1", 1), ("w2", 0), ("w2", 1)]):
    target = param_box(predict.item(name), rank, ckpt.shapes[name])
    draw_reshard(ckpt.source_boxes(name), target, ckpt.shapes[name], f"{name} -> target rank {rank}", ax=ax)
fig.tight_layout()"""),
    md("""## 3 · Load for each serving rank

`load_distributed_checkpoint(network, files, predict_strategy, rank=r)` returns rank *r*'s slices.
The bytes read equal the bytes of the slices: no merge, replicas read once, every byte checked
against its tile checksum."""),
    code(CHECK + """from dinb.checkpoint import load_distributed_checkpoint

for rank in range(2):
    ckpt = DistributedCheckpoint(work / "train")
    mine = ckpt.load_rank(predict, rank)
    slice_bytes = sum(a.nbytes for a in mine.values())
    exact = all(np.array_equal(mine[n], params[n][predict[n].slice_of(rank, params[n].shape)]) for n in mine)
    print(f"rank {rank}: read {ckpt.bytes_read} bytes for {slice_bytes} bytes of slices; exact: {exact}")

same = load_distributed_checkpoint(net, work / "train", predict, rank=1)
print(sorted((n, a.shape) for n, a in same.items()))"""),
    md("""## 4 · From the resharded checkpoint to slice files, and predict

`export_distributed` takes the checkpoint itself: each rank's slice file is filled from the
checkpoint rank by rank, so no whole tensor is ever held. Then the MindSpore-Lite-shaped runtime
predicts on the 2 ranks."""),
    code(CHECK + """from dinb import Context, Model, ModelType, export_distributed

export_distributed(net, DistributedCheckpoint(work / "train"), predict, [x], work / "slices")
model = Model()
model.build_from_file(work / "slices", ModelType.DINB, Context(target=["cpu"]))
(y,) = model.predict([x])
ref = mlp_reference(params, x)
print("output", y.shape, "matches the single-device model:",
      bool(np.allclose(y.get_data_to_numpy(), ref, rtol=2e-4, atol=2e-4)))
print("max |difference| < 1e-4:", bool(np.abs(y.get_data_to_numpy() - ref).max() < 1e-4))"""),
    md("""## 5 · MindSpore's files

dinb reads and writes MindSpore's own formats: `.ckpt` (protobuf records, optional CRC) and
protobuf strategy files (any name not ending in `.json`). `transform_checkpoints` is the offline
form of the load above, for every destination rank at once; the test suite checks it byte for byte
against files MindSpore 2.10 made."""),
    code(CHECK + """from dinb.checkpoint import build_searched_strategy, transform_checkpoints

predict.save(work / "predict_strategy.ckpt")               # MindSpore's protobuf form
out = transform_checkpoints(work / "train", work / "ms", "ckpt_", None,
                            work / "predict_strategy.ckpt", output_format="ckpt")
print([str(p.relative_to(work)) for p in out])
back = load_distributed_checkpoint(None, out, None, train_strategy_filename=work / "predict_strategy.ckpt")
print("whole again:", all(np.array_equal(back[n], params[n]) for n in params))
print(build_searched_strategy(str(work / "predict_strategy.ckpt"))["w1"])"""),
    md("""From the shell, the same job is

```
python -m dinb reshard train/ tp2/ --dst-strategy predict.json
python -m dinb export --model mlp --checkpoint tp2/ --strategy-file predict.json --out slices/
mpiexec -n 2 python -m dinb run --model-dir slices/
```

`benchmarks/reshard.py` measures the 8 → 2 case at 1 GiB: bytes read, peak memory and time
against a raw read of the same bytes."""),
    *exercises(
        "A checkpoint saved by **8** ranks is loaded by **3**: a case MindSpore handles by merging "
        "everything first.",
        ("""Take a Megatron MLP with `d_model=48, d_ff=192, batch=6`, save it under its Megatron
strategy for 8 ranks, and plan its load under the Megatron strategy for 3 ranks. Which **target rank**
reads `w1` from the most source files? Try to work it out on paper first (`w1`'s 192 columns), then
with `read_plan`.""",
         """net8 = MegatronMLP(d_model=48, d_ff=192, batch=6)
x8 = net8.example_inputs()[0]
save_distributed_checkpoint(net8.init_params(0), dinb.infer_predict_layout(net8, x8, device_num=8),
                            work / "eight")
eight = DistributedCheckpoint(work / "eight")
three = dinb.infer_predict_layout(net8, x8, device_num=3)
files = {r: {row["source_rank"] for row in eight.read_plan(three, r) if row["param"] == "w1"}
         for r in range(3)}
rank = max(files, key=lambda r: len(files[r]))""",
         """exercises.most_source_files(rank)"""),
    ),
    code("""import shutil

shutil.rmtree(work)  # the tutorial's files go with it"""),
]

write_notebook(cells, "04_checkpoint_resharding.ipynb")
