"""One rank of a decoder over pipeline stages under mpiexec: generate, or play a rank that gets
stuck in the middle of the generation (``--stuck RANK --after N``: after its N-th token)."""

import argparse
import json
import time

import dinb

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("--ids", action="append", required=True)
p.add_argument("--max-new-tokens", type=int, default=20)
p.add_argument("--config", default=None)
p.add_argument("--stuck", type=int, default=None)
p.add_argument("--after", type=int, default=4)
args = p.parse_args()

model = dinb.Model()
model.build_from_file(args.model_dir, dinb.ModelType.DINB, dinb.Context(), args.config)
rank, seen = model.job.process_index, []


def on_token(row: int, token: int) -> None:
    seen.append(token)
    if rank == args.stuck and len(seen) == args.after:
        time.sleep(120)  # stuck mid-generation: its peers must name it, not hang


prompts = [[int(t) for t in ids.split(",")] for ids in args.ids]
tokens = model.generate(prompts, args.max_new_tokens, on_token=on_token)
print(json.dumps({"rank": rank, "tokens": tokens, "stages": model.generation_info()["stages"]}))
dinb.shutdown_ranks()
