"""Writes notebooks/02_notebook_ranks.ipynb; ``--execute`` stores the outputs nbval compares."""

from nbtools import CHECK, code, exercises, md, write_notebook

cells = [
    md("""# 02 · Notebook ranks: engines as ranks, the `%dinfer` magics

In notebook 01 the ranks were simulated inside the kernel. Here each rank is a real process: an
ipyparallel **engine**, started under `mpiexec`, bound to a device and joined with the others in one
JAX job. The notebook sends every step to all ranks together and shows what each rank returned.

Each `%dinfer` subcommand is one call of the Python API (`dinb.start_cluster`, then `context`,
`load`, `predict`, `outputs`, `strategy`, `status`, `restart`, `stop` on the cluster), so a script
can do the same without magics. `%dinfer?` lists them all."""),
    code(CHECK + """%load_ext dinb
%dinfer cluster start -n 2"""),
    md("""## 1 · The slices of notebook 01

MindSpore's MatMul example `y = -(x @ W)` with the contraction dimension split over 2 ranks: each rank holds
half of `W`'s rows, and an all-reduce adds the partial products. Export writes one slice file per
rank."""),
    code(CHECK + """import tempfile
import numpy as np
import dinb
from dinb.models import MatMulNeg

net = MatMulNeg(matmul_size=(96, 16))
x = np.ones((128, 96), np.float32)
strategy = dinb.infer_predict_layout(net, x, device_num=2, strategy="contraction")
out_dir = tempfile.mkdtemp()
paths = dinb.export_distributed(net, net.init_params(), strategy, [x], out_dir)
print([p.name for p in paths])"""),
    md("""## 2 · Context, load, predict

As in MindSpore Lite: every rank builds its `Context`, loads **only its own** slice file
(`matmul0.dinb` on rank 0, `matmul1.dinb` on rank 1) and compiles the one SPMD program."""),
    code(CHECK + "%dinfer context --target cpu --provider xla"),
    code("%dinfer load {out_dir}"),
    code(CHECK + """%dinfer strategy"""),
    md("""`predict EXPR` evaluates `EXPR` here and sends the same input to every rank (as MindSpore's examples do).
The last stage's ranks all hold the same output: dinb checks that they agree and returns one copy."""),
    code(CHECK + """y = %dinfer predict x
print(y[0, :5])"""),
    code(CHECK + "%dinfer outputs"),
    md("""## 3 · Look inside a rank

`%%dinfer` runs the cell on every rank (in each engine's own namespace) and groups what each rank
prints. `dinb.rank_side` is the rank's side: its rank, its loaded `Model`, its device."""),
    code("""%%dinfer
""" + CHECK + """from dinb import rank_side
model = rank_side.model()
own = model.rank_outputs()[rank_side.rank()][0]
print(f"rank {rank_side.rank()} of {model.world_size} on {rank_side.status()['device']}: "
      f"output slice {own.shape}, first value {own[0, 0]}")"""),
    md("""## 4 · When a rank fails

A rank that dies (or hangs inside its own part) stops the whole SPMD job: the other ranks wait in
the collective. dinb watches every call with a finite timeout and names the rank at fault. Below,
rank 1's engine is killed (`SIGKILL`, as the out-of-memory killer would), and the next predict
fails with a `RankFailedError` naming it, well before any timeout: dinb sees the process gone."""),
    code(CHECK + """import os
import signal

cluster = dinb.current_cluster()          # what %dinfer drives, as a Python object
os.kill(cluster.pids[1], signal.SIGKILL)
try:
    cluster.predict(x)
except dinb.RankFailedError as e:
    print(f"RankFailedError, ranks {list(e.ranks)}:", str(e).split(" (")[0])   # the pid left out"""),
    md("""`restart` gives fresh engines and reloads the model, and the notebook goes on."""),
    code(CHECK + """%dinfer cluster restart
y = %dinfer predict x
print(y[0, :3])"""),
    code("%dinfer cluster status"),
    *exercises(
        "The ranks are still running: the answer comes from them, not from this kernel.",
        ("""How many bytes of parameters does each rank hold? Ask the ranks themselves, as a dict
`{rank: bytes}` (hint: `%%dinfer` or `dinb.current_cluster().execute(code)` runs code on every rank and
returns what each printed; a rank's `Model` has `param_bytes()`). Does any byte sit on two ranks?""",
         """printed = dinb.current_cluster().execute(
    "from dinb import rank_side\\n"
    "print(sum(rank_side.model().param_bytes().values()))")
held = {rank: int(text) for rank, text in printed.items()}""",
         """exercises.bytes_held(held, out_dir)"""),
    ),
    code(CHECK + "%dinfer cluster stop"),
    code("""import shutil

shutil.rmtree(out_dir)  # the tutorial's files go with it"""),
]

write_notebook(cells, "02_notebook_ranks.ipynb")
