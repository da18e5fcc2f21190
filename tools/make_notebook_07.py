"""Writes notebooks/07_generation.ipynb; ``--execute`` stores the outputs nbval compares."""

from nbtools import CHECK, code, exercises, md, write_notebook

cells = [
    md("""# 07 · A decoder that generates: prefill, decode and a KV cache split over ranks

The models of notebooks 01-06 answer in one call. A decoder writes its answer one token at a
time, and every token is a call of the model. Generation runs two programs:

* **prefill**: the whole prompt at once; it fills the **KV cache** (each layer's keys and values
  of every token so far) and gives the first new token;
* **decode**: one token per call, reading the cache instead of recomputing the past, writing its
  own keys and values into it. This is the loop that runs for every token, and it is bound by
  reading weights and cache, not by arithmetic: a step of a batch of 4 costs about what a step of 1
  costs.

The model here is dinb's **tiny adder**: a Llama-style decoder (RMSNorm, rotary positions,
grouped-query attention, SwiGLU) that dinb trained itself to add two numbers below 1000
(`tools/train_tiny_decoder.py`, under 2 minutes on 2 CPU cores). It is split the way Megatron-LM and
vLLM split Llama: query heads and MLP columns over the ranks, and each rank keeps the KV cache of
**its own key/value heads only**."""),
    code(CHECK + """import numpy as np
import dinb
from dinb.models import LlamaDecoder
from dinb.models.tiny_adder import adder_dir, decode, encode, questions

adder = LlamaDecoder(adder_dir(), slots=4, max_len=16, buckets=[8], cache="slots")   # 4 sequences, 16 positions
print(f"{adder.layers} layers, hidden {adder.hf['hidden_size']}, {adder.heads} query heads sharing "
      f"{adder.kv_heads} key/value heads of {adder.head_dim} numbers, vocabulary {adder.vocab}")
print(f"{sum(int(np.prod(s)) for s in adder.param_shapes().values())} parameters")
print("a question and its answer:", questions()[0])
print("as tokens:", encode(questions()[0][0]), "->", encode(questions()[0][1]), "+ the end token 1")"""),
    md("""## 1 · Who holds what: weights and cache per rank

With `tp` ranks, rank *r* holds query heads `r H/tp ..` and the rows of `W_q` that make them,
the matching columns of `W_o`, and its share of the MLP. Key/value heads are fewer (2 here):

* `tp` divides them (tp = 2): each rank holds one key/value head and **its** cache;
* `tp` exceeds them (tp = 4): the ranks form a 2 × 2 grid and the two ranks of a row both hold
  the key/value head their query heads read, with its cache: the head is replicated, never split.

The cache here is a cache of **slots** (`cache="slots"`), `(layers, 2, slots, kv_heads, positions,
head_dim)`, the simplest picture of it; dinb's default, a pool of blocks, comes at the end of
section 2. Its size per rank is what limits how many sequences and how long a context a device
can hold."""),
    code(CHECK + """from dinb.units import fmt_bytes

shapes = adder.param_shapes()
q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
for tp in (1, 2, 4):
    s = adder.strategy(tp)
    weights = sum(int(np.prod(s[n].slice_shape(shape))) * 4 for n, shape in shapes.items())
    cache = int(np.prod(s.inputs[2].slice_shape(adder.cache_shape()))) * 4
    heads = [s[q].slice_of(r, shapes[q])[0].start // adder.head_dim for r in range(tp)]
    kv = [s[k].slice_of(r, shapes[k])[0].start // adder.head_dim for r in range(tp)]
    print(f"tp={tp}: query heads from {heads}, key/value head from {kv}; per rank "
          f"weights {fmt_bytes(weights)}, KV cache {fmt_bytes(cache)}")"""),
    md("""## 2 · Export, then prefill and decode by hand

One export holds, per rank, the weight slices and the **generation programs**:

* **prefill** programs, one per (prompts at once × prompt bucket): `prefill_4x8` writes up to 4
  prompts of up to 8 tokens into their slots and picks each one's first token;
* **decode** programs `decode_{k}_w{W}`: *k* decode steps in one call (the tokens are picked on the
  device, so the host reads only the k × slots new tokens), attending over the first *W* positions
  of the cache. The runtime takes the smallest window that holds every slot's positions, so a short
  context reads a short cache; each comes in a greedy form and a `_sample` form (temperature, top-k,
  top-p, a seed).

The runtime allocates the cache once on the device and *donates* it to every call, so XLA writes
into it in place: no copy per token."""),
    code(CHECK + """import tempfile
from pathlib import Path

from dinb.checkpoint import DistributedCheckpoint

work = Path(tempfile.mkdtemp())
job = dinb.init_ranks("cpu", simulate=1)     # this kernel: one device
for tp in (1, 2):
    dinb.export_distributed(adder, DistributedCheckpoint(adder.checkpoint()), adder.strategy(tp),
                            adder.example_inputs(), work / f"tp{tp}")
    gen = dinb.read_meta(work / f"tp{tp}" / "llama0.dinb")["generation"]
    print(f"tp={tp}: cache per rank {gen['cache_bytes']} bytes, windows {gen['windows']}, "
          f"decode steps per call {gen['decode_steps']}")
print("programs:", ", ".join(sorted(gen["programs"])))
one = dinb.Model()
one.build_from_file(work / "tp1")"""),
    code(CHECK + """prompt = encode("123+045=")
logits = one.prefill(0, prompt)                      # slot 0: the prompt's 8 tokens fill positions 0..7
token, position = int(logits.argmax()), len(prompt)
answer = [token]
print(f"prefill: {len(prompt)} tokens -> first new token {decode([token])!r}")
while token != 1:                                    # until the end token
    tokens = np.zeros(4, np.int32); tokens[0] = token
    positions = np.full(4, 15, np.int32); positions[0] = position   # idle slots write where no one reads
    logits = one.decode_step(tokens, positions)      # one step of all 4 slots
    token, position = int(logits[0].argmax()), position + 1
    answer.append(token)
    print(f"decode at position {position - 1}: -> {decode([token]) or '<end>'!r}")
print("123+045 =", decode(answer))
by_hand = [one.kv_cache(slot, adder.max_len) for slot in range(4)]   # (layers, 2, kv heads, positions, dim)"""),
    md("""`Model.generate` runs this loop for up to 4 prompts together (one slot each), greedy or sampled
(temperature, top-k, top-p, a seed), and streams tokens through `on_token`:"""),
    code(CHECK + """batch = [q for q, _ in questions()[:4]]
out = one.generate([encode(q) for q in batch], 5, stop_ids=[1])
for q, tokens in zip(batch, out):
    print(q, decode(tokens))"""),
    md("""### Where each rank's cache lives, and how it grows

Read back from the cache itself (`Model.kv_cache`): a row is a slot, a column a position, the
colour the size of the key stored there in layer 0 (white: nothing written). Under tp = 2,
key/value head 0 is rank 0's and head 1 rank 1's: each rank holds its head's keys and values of
every slot and position. After the hand-run loop slot 0 holds its sequence, and the idle slots
hold what they wrote at position 15, where no query of theirs reads; after `generate`, all four
slots hold their prompt and answer from position 0 (the last token picked is not written: no
step has read it yet)."""),
    code("""# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt

after = [one.kv_cache(slot, adder.max_len) for slot in range(4)]
fig, axes = plt.subplots(2, 2, figsize=(10, 3.6), sharex=True, sharey=True)
for col, (title, caches) in enumerate((("after the loop by hand", by_hand), ("after generate", after))):
    for head in range(adder.kv_heads):
        size = np.array([np.linalg.norm(c[0, 0, head], axis=-1) for c in caches])   # (slots, positions)
        ax = axes[head, col]
        ax.imshow(np.where(size > 0, size, np.nan), cmap="Blues" if head == 0 else "Oranges", aspect="auto")
        ax.set_title(f"key/value head {head} (rank {head}'s at tp=2): {title}", fontsize=8)
        ax.set_yticks(range(4), [f"slot {i}" for i in range(4)], fontsize=7)
axes[1, 0].set_xlabel("position in the cache"); axes[1, 1].set_xlabel("position in the cache")
fig.tight_layout()"""),
    code(CHECK + """filled = [np.abs(c[0, 0]).sum(axis=(0, 2)) > 0 for c in after]     # per slot: (positions,)
written = [int(np.cumprod(f).sum()) for f in filled]                 # the run from position 0
print("positions written per slot:", written, "= prompt + answer - 1:",
      [len(encode(q)) + len(t) - 1 for q, t in zip(batch, out)])"""),
    md("""### A paged cache: memory by the tokens a sequence holds

A cache of slots reserves `max_len` positions for every slot, used or not: 4 slots × 16 positions
here, whatever the questions hold. A **paged** cache (vLLM's PagedAttention, and dinb's default
for decoder exports) is a pool of
**blocks** of a few positions; each sequence holds a **block table**, the blocks of its positions
in order (position *p* lies in block `table[p // block_size]` at offset `p % block_size`), so it
takes only the blocks of its own tokens. Prompts that begin alike share their full blocks: a
block is named by a digest of its parent block's name and its tokens (the **prefix cache**), and
stays in the pool after its sequence ends, until its space is needed.

Below, the adder with a pool of 10 blocks of 4 positions (`--cache-blocks 10 --block-size 4`):
a question and its 5 answer tokens take 3 blocks. One question first, then four together; the
picture is taken while the four generate. Every rank holds these same blocks, each for its own
key/value heads."""),
    code(CHECK + """from dinb.explore import describe_block_pool, draw_block_pool

pooled_adder = LlamaDecoder(adder_dir(), slots=4, max_len=16, buckets=[8], cache_blocks=10, block_size=4)
dinb.export_distributed(pooled_adder, DistributedCheckpoint(pooled_adder.checkpoint()), pooled_adder.strategy(1),
                        pooled_adder.example_inputs(), work / "paged")
pooled = dinb.Model()
pooled.build_from_file(work / "paged")
print("123+045=", decode(pooled.generate(encode("123+045="), 5, stop_ids=[1])))
four = ["123+045=", "123+046=", "123+047=", "500+500="]
seen = []

def snapshot_once(row, token):
    if row == 3 and not seen:   # the last question's first token: all four hold their blocks
        seen.append(pooled.block_pool().snapshot())

out = pooled.generate([encode(q) for q in four], 5, stop_ids=[1], on_token=snapshot_once)
print([decode(t) for t in out])
pool_at_tp2 = pooled_adder.strategy(2).inputs[2].slice_shape(pooled_adder.cache_shape())
per_rank = [f"rank {r} at tp=2: key/value head {r} of every block, {fmt_bytes(int(np.prod(pool_at_tp2)) * 4)}"
            for r in range(2)]
print("\\n".join(describe_block_pool(seen[0], per_rank)))
print("prefix blocks found:", pooled.generation_info()["paged"]["prefix_hits"])"""),
    code("""# NBVAL_IGNORE_OUTPUT
draw_block_pool(seen[0]);"""),
    md("""The pool as a generation runs: `dinb.PoolPicture` redraws it at every decode step (blocks
join a sequence as its tokens cross into them, go back when it ends, and a prompt's full blocks
stay cached, grey, for the next prompt that begins the same way); the slider goes back over the
steps. When the pool runs out, the sequence that joined last is *preempted*: its blocks go back,
and it is prefilled again from its prompt and tokens when blocks are free, with the same tokens
as if it had never stopped (`tests/test_paged_kv.py`)."""),
    code("""# NBVAL_IGNORE_OUTPUT
picture = dinb.PoolPicture(pooled)
display(picture)
next_four = [q for q, _ in questions()[4:8]]
answers = picture.follow([encode(q) for q in next_four], 5, stop_ids=[1])"""),
    code(CHECK + """for q, tokens in zip(next_four, answers):
    print(q, decode(tokens))
held = [f["blocks"] - len(f["free"]) - len(f["evictable"]) for f in picture.frames]
print(f"{len(picture.frames)} pictures; blocks held at each: {held}")"""),
    md("""Three questions begin with `123+`, so they share the first block, the one the first question
left in the pool (×3, and marked `*` in their tables); the rest of each prompt is prefilled into
blocks of its own (the last prompt token is always computed again: its logits pick the first new
token). The last question found no free block left for its third and took the oldest cached one.
Held at once: 10 blocks = 40 positions for what a cache of slots holds in 64. On a GPU the gather through the block tables costs nothing
measurable (`benchmarks/generate.py`, one H200: 0.91-1.02x the slot cache's step) while a
3B-shaped model's cache for 32 sequences at max_len 2048 goes from 7.5 GB to 0.29 GB."""),
    md("""## 3 · What each token costs

XLA compiles the 2-rank decode step (in a helper process with virtual devices). Per token it runs
**two all-reduces per layer** (after attention's output projection and after the MLP), each of
one `(slots, 1, hidden)` activation, and one all-gather for the output head, which is split by
vocabulary rows: XLA gathers whichever is smaller, here the head's own (64, 14) weight, on a real
vocabulary the `(slots, vocabulary)` logits. Nothing moves the cache: each rank reads and writes
its own heads."""),
    code(CHECK + """
plan = dinb.StrategyPlan.create(adder, 2, "megatron")
collectives = plan.compile().collectives
for c in collectives:
    print(f"{c.kind:10s} of {c.shape_text():20s} = {fmt_bytes(c.bytes)}, each rank sends "
          f"{fmt_bytes(c.bytes_sent_per_rank)}")
print(f"{len(collectives)} collectives per decode step for {adder.layers} layers, "
      f"{fmt_bytes(sum(c.bytes_sent_per_rank for c in collectives))} sent per rank per step")"""),
    md("""## 4 · Two notebook ranks answer

Two ipyparallel engines under `mpiexec` load the 2-rank export, each its own slice file, and
generate together; `%dinfer generate` prints the tokens as rank 0 picks them."""),
    code(CHECK + """%load_ext dinb
%dinfer cluster start -n 2"""),
    code("""# NBVAL_IGNORE_OUTPUT
%dinfer load {work / "tp2"}"""),
    code('# NBVAL_IGNORE_OUTPUT\n%dinfer generate "123+045="'),
    md("""The accuracy over fixed questions the model never saw in training, on 2 ranks, against the one
device of this kernel: the same answers, token for token."""),
    code(CHECK + """cluster = dinb.current_cluster()   # what %dinfer drives, as a Python object
qs = questions()[:40]

def answers(run):
    got = []
    for i in range(0, len(qs), 4):
        got += [decode(t) for t in run([encode(q) for q, _ in qs[i:i + 4]])]
    return got

on_two = answers(lambda p: cluster.generate(p, 5, stop_ids=[1]))
on_one = answers(lambda p: one.generate(p, 5, stop_ids=[1]))
print("2 ranks give the answers of 1 device:", on_two == on_one)
print(f"accuracy on {len(qs)} questions: {np.mean([a == w for a, (_, w) in zip(on_two, qs)]):.0%}")
for (q, want), got in list(zip(qs, on_two))[:4]:
    print(f"{q}{got}", "right" if got == want else f"wrong (the answer is {want})")"""),
    md("""## 5 · Time per token, and tokens per second against ranks

Each decode step is one call of the decode program for all 4 slots. Below, when each token of a
batch of 4 arrived on the kernel's one device and on the 2 notebook ranks, and the tokens per
second. A model this small is bound by the per-step overheads (the call, and on 2 ranks the
all-reduces between processes), not by arithmetic: splitting it does not make it faster. Splitting
pays when one device cannot hold the weights and cache, or reads them too slowly
(`benchmarks/generate.py` measures larger configurations)."""),
    code("""# NBVAL_IGNORE_OUTPUT
import time

prompts = [encode(q) for q, _ in qs[:4]]
arrivals = []
t0 = time.perf_counter()
one.generate(prompts, 5, on_token=lambda row, t: arrivals.append(time.perf_counter() - t0))
one_timings = one.generation_info()["timings"]
cluster.generate(prompts, 5)
two_timings = cluster.last_generation["timings"]
rates = {name: 4 * t["decode_steps"] / t["decode_s"] for name, t in
         (("1 device", one_timings), ("2 ranks", two_timings))}
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3))
a.plot(np.array(arrivals) * 1e3, range(1, len(arrivals) + 1), "o-")
a.set_xlabel("ms since the call"); a.set_ylabel("tokens received"); a.set_title("one device: tokens as they come")
b.bar(list(rates), list(rates.values()), color=["tab:blue", "tab:orange"])
b.set_ylabel("tokens / s (batch 4)"); b.set_title("decode throughput")
fig.tight_layout()
for name, t in (("1 device", one_timings), ("2 ranks", two_timings)):
    print(f"{name}: prefill {t['prefill_s'] * 1e3:.1f} ms, decode {t['decode_s'] / t['decode_steps'] * 1e3:.2f} ms "
          f"per step, {t['decode_calls']} decode calls for {t['decode_steps']} steps")"""),
    code(CHECK + """%dinfer cluster stop"""),
    md("""## 6 · On a GPU: a step against its memory floor

A decode step reads every weight and the cache in use once, so its floor is those bytes over the
memory bandwidth. Below, numbers stored from one run of `benchmarks/generate.py` on one NVIDIA
H200 (a Llama-3.2-3B-shaped model in bfloat16, random weights, 80 positions in use): the floor
from the copy bandwidth measured in the same run, dinb's step, and the same model written as a plain
JAX loop on the device (`jax.lax.fori_loop` over the decode step, nothing else around it)."""),
    code(CHECK + """import json

stored = json.loads(Path("../benchmarks/results/generate_gpu.json").read_text())["run_2"]
print(f"measured copy bandwidth {stored['copy_bandwidth_TBs']:.2f} TB/s ({stored['machine']['gpu']}, jax {stored['machine']['jax']})")
print("batch | floor ms | plain JAX loop ms | dinb ms | x floor | dinb - loop ms")
for r in stored["rows"]:
    if r["config"] == "3b" and r["max_len"] == 80:
        print(f"{r['batch']:5d} | {r['floor_ms']:8.2f} | {r['jax_loop']:17.2f} | {r['dinb']:7.2f} | "
              f"{r['dinb'] / r['floor_ms']:7.2f} | {r['dinb'] - r['jax_loop']:.2f}")"""),
    md("""Where a token's time goes: the floor is the bytes; the plain loop's excess over it is XLA's
kernels for the step (about a dozen a layer, each reading and writing its activations); dinb's
excess over the loop is everything around the program (the host's calls, the windows, the
state), 0.04-0.11 ms a step here, since each call runs 8 steps and the next is queued before the
last is read."""),
    md("""## 7 · A model as you download it

dinb reads Hugging Face folders as they come (Llama 3.x, Qwen2/2.5, Qwen3, Mistral; sharded
`model-0000k-of-0000n.safetensors` files with their index, bfloat16 included): the family from
`config.json`, the tokenizer, `generation_config.json`'s end tokens and sampling defaults, the
chat template. Each rank's slice file is written from its own bytes only, read straight from the
files. The folder below is a small random-weight Qwen3 that the tests make with transformers; a
downloaded `Qwen/Qwen3-0.6B` folder splits the same way."""),
    code(CHECK + """import re
import subprocess
import sys

folder = Path("../tests/fixtures/hf/qwen3")
print(sorted(p.name for p in folder.iterdir()))
split = subprocess.run([sys.executable, "-m", "dinb", "export", "--weights", str(folder), "--ranks", "2",
                        "--slots", "2", "--max-len", "48", "--buckets", "32", "--out", str(work / "qwen3")],
                       capture_output=True, text=True, check=True).stdout
# WORK: this tutorial's temporary folder; N: a slice file's size (its programs' bytes vary by machine)
print(re.sub(r"dinb  \\d+ bytes", "dinb  N bytes", split.replace(str(work), "WORK")))"""),
    md("""`python -m dinb generate --model-dir DIR --chat "..."` then puts a message through the chat
template and generates (add `--simulate 2`, or run it under `mpiexec -n 2`); `python -m dinb
serve --model-dir DIR` serves it, with OpenAI's `/v1/chat/completions` beside the v2 routes."""),
    code("""# NBVAL_IGNORE_OUTPUT
print(subprocess.run([sys.executable, "-m", "dinb", "generate", "--model-dir", str(work / "qwen3"), "--simulate", "2",
                      "--chat", "Hello!", "--max-new-tokens", "8"], capture_output=True, text=True).stdout)"""),
    md("""## 8 · A decoder over pipeline stages

With `--pipeline-stages S` a decoder's layers are cut into `S` runs, one a stage: the first stage
holds the embedding, the last the final norm and the logits head, and each stage's ranks hold the
KV cache **of their stage's layers only**. A decode step sends the activations `(slots, 1,
hidden)` forward, stage to stage, and the last stage picks the tokens and sends the slots' state
back to the first for the next step. Below, the adder as 2 stages of 2 ranks (tensor parallel
inside each stage): what each rank's slice file holds."""),
    code(CHECK + """import json

staged = work / "staged"
split = subprocess.run([sys.executable, "-m", "dinb", "export", "--model", "llama", "--ranks", "4",
                        "--pipeline-stages", "2", "--out", str(staged)], capture_output=True, text=True,
                       check=True).stdout
print(split.splitlines()[0].split(" to ")[0])
for r in range(4):
    meta = dinb.read_meta(staged / f"llama{r}.dinb")
    first, stop = meta["pipeline"]["layers"]
    extra = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in meta["params"]]
    cache = meta["generation"]["cache"]["shape"]
    print(f"  rank {r}: stage {r // 2}, layers {first}..{stop - 1}, KV cache {cache}"
          + "".join(f" + {n}" for n in extra))"""),
    md("""Four notebook ranks load it, each its own slice file (ranks 0 and 1 are stage 0, ranks 2 and 3
stage 1), and answer the questions of section 4 with the tokens of this kernel's one device."""),
    code(CHECK + """%dinfer cluster start -n 4"""),
    code("""# NBVAL_IGNORE_OUTPUT
%dinfer load {staged}"""),
    code(CHECK + """staged_ranks = dinb.current_cluster()
on_stages = answers(lambda p: staged_ranks.generate(p, 5, stop_ids=[1]))
print("2 stages x 2 notebook ranks give the answers of 1 device:", on_stages == on_one)"""),
    code(CHECK + """%dinfer cluster stop"""),
    md("""With one group of sequences, a step goes through the stages one after the other: each stage
works `1/S` of the time. So the slots are dealt into groups (slot `i` in group `i % G`) that
follow each other through the stages: stage 1 works on group 0 while stage 0 works on group 1,
and a group's next step starts as soon as its tokens are back. `decode_groups` in the run-time
config sets `G`; by default it is one group a stage where the stages compute side by side (GPUs,
CPU ranks on several hosts), and one group where they share one host's CPU cores, as the
notebook ranks above do. The ticks of 4 decode steps, each column a tick, each digit the group
a stage works on (`.`: idle):"""),
    code(CHECK + """from dinb.sharding import decode_busy_fraction, draw_decode_schedule

for groups in (1, 2):
    print(f"{groups} group(s): each stage busy {decode_busy_fraction(2, groups, 4):.0%} of the ticks")
    print(draw_decode_schedule(2, groups, 4))"""),
    md("""Measured: 2 stages of one rank each under `mpiexec` (one process a rank, the activations and
the tokens over MPI), 4 sequences of 24 tokens (`--ignore-eos`: past the answers too), each
rank's share of the decode time spent computing, against the schedule's share for calls of 8
steps, `G k / ((k - 1) max(S, G) + G + S - 1)`. The host's loop and the messages between the
stages add to the formula's idle time. Two groups double each stage's share of the time spent
computing, but not the tokens per second: both ranks share this machine's cores, so the groups'
passes take turns on the same cores, and a pass of 2 sequences of this tiny model costs about
what a pass of 4 costs (fixed costs, not arithmetic), so a step takes as long or longer. That is
why one host's CPU runs one group by default; the groups pay off where the stages have their own
devices."""),
    code("""# NBVAL_IGNORE_OUTPUT
from dinb.cli import launch

two = work / "staged2"
subprocess.run([sys.executable, "-m", "dinb", "export", "--model", "llama", "--ranks", "2", "--pipeline-stages",
                "2", "--slots", "4", "--out", str(two)], capture_output=True, check=True)
prompts = [a for q, _ in questions()[:4] for a in ("--ids", ",".join(map(str, encode(q))))]
print("groups | stage 0 busy | stage 1 busy | formula (k = 8) | ms per step")
for groups in (1, 2):
    (work / "groups.ini").write_text(f"[runtime]\\ndecode_groups = {groups}\\n")
    run = launch(2, ["--model-dir", str(two), *prompts, "--max-new-tokens", "24", "--ignore-eos", "--json",
                     "--config-file", str(work / "groups.ini")], command="generate")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    busy = out["stages"]["busy"]
    print(f"{groups:6d} | {busy['0']:12.0%} | {busy['1']:12.0%} | {decode_busy_fraction(2, groups, 8):15.0%} | "
          f"{out['decode_ms_per_step']:.2f}")"""),
    *exercises(
        "Work it out first, then check it against the runtime's own plan.",
        ("""A prompt of 120 tokens, 24 new tokens, an export with attention windows (128, 512, 2048) and
decode calls of 1, 2, 4 or 8 steps: the prefill picks the first token, and each decode call runs the most
steps it has that the tokens left fill (else 1). Which window does each decode call attend over, in
order? (hint: a call of k steps from position p writes positions p .. p + k - 1, and needs a window
that holds p + k positions)""",
         """windows = [128, 512, 512, 512, 512]""",
         """exercises.decode_windows(windows)"""),
    ),
    code("""import shutil

shutil.rmtree(work)  # the tutorial's files go with it"""),
    md("""The same export serves over HTTP: `python -m dinb serve --model-dir DIR` adds Triton's generate
extension, `POST /v2/models/llama/generate` and `/generate_stream` (one server-sent event per token),
with continuous batching over the slots (notebook 08 shows the server)."""),
]

write_notebook(cells, "07_generation.ipynb")
