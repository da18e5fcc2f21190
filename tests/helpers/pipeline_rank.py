"""One rank of a pipelined job under mpiexec: predict at several micro-batch counts, save what
this rank returned (``--out``), or play a stuck rank (``--stuck RANK``)."""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import dinb

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("--input", required=True)
p.add_argument("--out", required=True)
p.add_argument("--micro", default="1,2,4")
p.add_argument("--config", default=None)
p.add_argument("--stuck", type=int, default=None)
args = p.parse_args()

model = dinb.Model()
model.build_from_file(args.model_dir, dinb.ModelType.DINB, dinb.Context(), args.config)
rank = model.job.process_index
out = Path(args.out)
if rank == args.stuck:
    time.sleep(60)  # never predicts: its peers must name it, not hang
x = np.load(args.input)
info = model.pipeline_info()
for m in [int(v) for v in args.micro.split(",")]:
    first_stage = rank < info["stage_ranks"]
    outs = model.predict([x] if first_stage else [], micro_batches=int(m))
    for i, t in enumerate(outs):
        np.save(out / f"rank{rank}_m{m}_{i}.npy", t.get_data_to_numpy())
    events = [[e.stage, e.micro, e.start, e.end] for e in model.timeline()]
    (out / f"rank{rank}_m{m}.json").write_text(json.dumps({"outputs": len(outs), "events": events,
                                                             "info": info}))
dinb.shutdown_ranks()
