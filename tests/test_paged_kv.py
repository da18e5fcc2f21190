"""A paged KV cache: the block pool on the host, the programs that read and write through block
tables, prefix caching, sequences that wait for blocks, and a paged decoder served."""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated
from test_serving import Serve, http
from test_serving_generate import events, post

from dinb import Model, export_distributed, read_meta
from dinb.checkpoint import DistributedCheckpoint
from dinb.cli import launch
from dinb.errors import DinbError, InputError, StrategyError
from dinb.models import LlamaDecoder
from dinb.models.tiny_adder import adder_dir, encode, questions
from dinb.runtime.block_pool import BlockPool, block_digest
from dinb.widgets.pictures import block_pool_svg

FIXTURE = Path(__file__).parent / "fixtures" / "llama"
REF = np.load(FIXTURE / "reference.npz")
CONFIG = json.loads((FIXTURE / "config.json").read_text())
PROMPT = [int(t) for t in REF["prompt_0"]]  # 11 tokens
LONG = PROMPT * 3


def loaded(decoder, out, n) -> Model:
    simulated(n)
    export_distributed(decoder, decoder.init_params(int(REF["seed"])), decoder.strategy(n),
                       decoder.example_inputs(), out)
    model = Model()
    model.build_from_file(out)
    return model


def decoders(blocks: int, slots: int = 2):
    """The reference config with a cache of slots and the same with ``blocks`` blocks of 8."""
    kw = dict(config=CONFIG, slots=slots, max_len=48, buckets=[16, 48])
    return LlamaDecoder(**kw, cache="slots"), LlamaDecoder(**kw, cache_blocks=blocks, block_size=8)


# ---- the pool ------------------------------------------------------------------------------------
def test_a_sequence_takes_the_blocks_of_its_positions_and_gives_them_back():
    pool = BlockPool(6, 4, prefix_caching=False)
    a = pool.admit("a", [1, 2, 3], 9)  # 9 positions: 3 blocks of 4
    assert a.table == [0, 1, 2] and a.cached_tokens == 0 and pool.in_use == 3
    assert pool.admit("b", [5], 17) is None  # 5 blocks; 3 free: it waits
    b = pool.admit("b", [5], 12)
    assert b.table == [3, 4, 5] and pool.available == 0
    pool.release("a")
    assert pool.stats()["free"] == 3 and pool.admit("c", [7], 12).table == [0, 1, 2]
    with pytest.raises(InputError, match=r"needs 25 cache positions = 7 blocks of 4.*6 blocks \(24 "
                                         r"positions\).*--cache-blocks 7"):
        pool.check_fits(25)


def test_sequences_grow_block_by_block_and_the_newest_is_preempted_when_the_pool_runs_out():
    pool = BlockPool(6, 4, prefix_caching=False)
    for name in "abc":
        pool.admit(name, [1, 2, 3], 5)  # a prompt and its first call: 2 blocks each, the pool full
    assert pool.available == 0 and pool.fits([("a", 8), ("b", 6)])  # within their blocks: nothing taken
    assert not pool.fits([("a", 9)]) and not pool.grow("a", 9) and pool.seqs["a"].table == [0, 1]
    assert pool.make_room([("a", 9), ("b", 13), ("c", 6)]) == ["c", "b"]  # c first, then b itself
    assert pool.seqs["a"].table == [0, 1, 4] and set(pool.seqs) == {"a"} and pool.stats()["preemptions"] == 2
    assert pool.make_room([("a", 24)]) == [] and len(pool.seqs["a"].table) == 6  # the oldest always goes on


def test_prompts_share_their_cached_prefix_blocks_by_digest():
    pool = BlockPool(8, 4)
    first = pool.admit("a", list(range(10)), 12)  # full blocks [0..3], [4..7]; the rest prefilled
    pool.prefilled("a")
    root = block_digest(b"dinb-prefix", [0, 1, 2, 3])
    assert first.cached_tokens == 0 and pool.digest_of == {0: root, 1: block_digest(root, [4, 5, 6, 7])}
    second = pool.admit("b", list(range(9)) + [99], 12)
    assert second.table[:2] == first.table[:2] and second.cached_tokens == 8
    assert pool.refs[first.table[0]] == 2 and pool.stats()["prefix_hits"] == 2
    other = pool.admit("c", [0, 1, 2, 9, 4, 5, 6, 7], 8)  # a different first block: nothing shared
    assert other.cached_tokens == 0
    # a prompt of exactly its cached blocks still prefills its last token (it picks the first new one)
    pool.release("c")
    exact = pool.admit("d", list(range(8)), 8)
    assert exact.cached_tokens == 4 and exact.table[0] == first.table[0] and exact.table[1] != first.table[1]


def test_cached_blocks_stay_findable_until_the_least_recently_used_is_evicted():
    pool = BlockPool(4, 2)
    for name, start in (("a", 10), ("b", 20)):
        pool.admit(name, [start, start + 1, start + 2], 4)  # one full block and one more
        pool.prefilled(name)
        pool.release(name)
    assert pool.stats()["cached"] == 2 and pool.stats()["free"] == 4
    again = pool.admit("a2", [10, 11, 12], 4)  # a's block found again after a finished
    assert again.cached_tokens == 2
    pool.release("a2")  # a's block is now the most recently used
    pool.admit("big", [1, 2, 3, 4, 5, 6, 7], 6)  # 3 blocks: 2 free and the oldest cached one (b's)
    assert pool.evictions == 1 and pool.stats()["cached"] == 1
    pool.release("big")
    assert pool.admit("b3", [20, 21, 22], 4).cached_tokens == 0  # b's prefix is gone
    assert pool.admit("a3", [10, 11, 12], 4).cached_tokens == 2  # a's is still there
    snap = pool.snapshot()
    assert snap["tables"]["a3"][0] == again.table[0] and snap["shared"] == {"b3": 0, "a3": 1}


# ---- the programs --------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_paged_tokens_equal_the_slot_cache_and_the_reference(tmp_path, ranks):
    slots, paged = decoders(blocks=12)
    a, b = loaded(slots, tmp_path / "slots", ranks), loaded(paged, tmp_path / "paged", ranks)
    assert b.generate(PROMPT, 12) == list(REF["tokens_0"][:12]) == a.generate(PROMPT, 12)
    pair = [PROMPT, PROMPT[:5]]
    sampled = dict(temperature=0.9, top_k=50, top_p=0.9, seed=3)
    assert b.generate(pair, 20, **sampled) == a.generate(pair, 20, **sampled)
    info = b.generation_info()
    layers, heads, dh = CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"], 32
    assert info["cache"].shape == (layers, 2, 12, heads, 8, dh) and info["paged"]["in_use"] == 0
    # 12 blocks of 8 positions: each rank holds its key/value heads' share (2 heads on 4 ranks: 1 each)
    share = layers * 2 * 12 * 8 * heads * dh * 4 // min(ranks, heads)
    assert info["cache_bytes"] == dict.fromkeys(range(ranks), share)


def test_a_cached_prefix_is_prefilled_only_past_it_and_gives_the_same_tokens(tmp_path):
    slots, paged = decoders(blocks=12)
    a, b = loaded(slots, tmp_path / "slots", 1), loaded(paged, tmp_path / "paged", 1)
    want = a.generate(LONG[:30], 10)
    assert b.generate(LONG[:30], 10) == want
    before = b.generation_info()["paged"]["prefix_hits"]
    assert b.generate(LONG[:30], 10) == want  # its first 3 blocks are found
    info = b.generation_info()
    assert info["paged"]["prefix_hits"] - before == 3 and "prefill_1x16_w48" in b.runner.ran
    np.testing.assert_allclose(b.kv_cache(0, 30), a.kv_cache(0, 30), atol=1e-5)


def test_a_sequence_that_does_not_fit_yet_waits_for_the_blocks_of_one_that_finishes(tmp_path):
    slots, paged = decoders(blocks=7)  # each prompt below needs 6 blocks: one at a time
    a, b = loaded(slots, tmp_path / "slots", 1), loaded(paged, tmp_path / "paged", 1)
    pair = [LONG[:30], LONG[1:31]]
    assert b.generate(pair, 18) == a.generate(pair, 18)
    assert b.generation_info()["paged"]["in_use"] == 0  # every block back after the generation
    with pytest.raises(InputError, match="cache positions; the export has 48"):
        b.generate(LONG[:33], 17)


@pytest.mark.parametrize("ranks", [1, 2])
def test_preempted_sequences_resume_with_the_tokens_they_would_have_had(tmp_path, ranks):
    """3 sequences of up to 40 positions in 7 blocks of 8: they join with their prompts' blocks,
    grow, and the newest is preempted when the pool runs out; it is prefilled again from its
    prompt and tokens (past the largest bucket, 16: a bucket at a time) and goes on."""
    kw = dict(config=CONFIG, slots=3, max_len=48, buckets=[16])
    a = loaded(LlamaDecoder(**kw, cache="slots"), tmp_path / "slots", ranks)
    b = loaded(LlamaDecoder(**kw, cache_blocks=7, block_size=8), tmp_path / "paged", ranks)
    prompts = [PROMPT, PROMPT[:5], PROMPT[2:9]]
    assert b.generate(prompts, 30) == a.generate(prompts, 30)
    first = b.generation_info()["paged"]
    assert first["preemptions"] > 0 and first["in_use"] == 0
    sampled = dict(temperature=0.9, top_k=50, top_p=0.9, seed=3)
    streamed: list[tuple[int, int]] = []
    got = b.generate(prompts, 30, on_token=lambda row, token: streamed.append((row, token)), **sampled)
    assert got == a.generate(prompts, 30, **sampled)
    assert b.generation_info()["paged"]["preemptions"] > first["preemptions"]
    assert [[t for r, t in streamed if r == row] for row in range(3)] == got  # no token twice, none lost
    assert {"prefill_1x16_w32", "prefill_1x16_w48"} & b.runner.ran  # a resumed prompt past 16 tokens


def test_a_paged_export_refuses_what_it_cannot_hold():
    with pytest.raises(DinbError, match="takes 6 blocks of 8; give --cache-blocks 6 or more"):
        LlamaDecoder(config=CONFIG, slots=2, max_len=48, cache_blocks=5, block_size=8)
    paged = LlamaDecoder(config=CONFIG, slots=2, max_len=48, cache_blocks=12, block_size=8)
    with pytest.raises(StrategyError, match="batch on 2 ranks with a paged cache"):
        paged.strategy(2, "batch")


@pytest.mark.mpi
def test_paged_tokens_are_the_same_on_two_mpiexec_ranks(tmp_path):
    """The preemption case above on 2 ranks of mpiexec: each rank runs the same pool."""
    kw = dict(config=CONFIG, slots=3, max_len=48, buckets=[16])
    paged = LlamaDecoder(**kw, cache_blocks=7, block_size=8)
    export_distributed(paged, paged.init_params(int(REF["seed"])), paged.strategy(2), paged.example_inputs(),
                       tmp_path)
    prompts = [PROMPT, PROMPT[:5], PROMPT[2:9]]
    ids = [a for p in prompts for a in ("--ids", ",".join(map(str, p)))]
    proc = launch(2, ["--model-dir", str(tmp_path), *ids, "--max-new-tokens", "30", "--json"],
                  command="generate", timeout_s=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    want = loaded(LlamaDecoder(**kw, cache="slots"), tmp_path / "slots", 1).generate(prompts, 30)
    assert result["tokens"] == want and result["same_on_every_rank"] and result["collectives"] == "mpi"
    assert result["paged"]["preemptions"] > 0


# ---- served --------------------------------------------------------------------------------------
def metric(rest: str, name: str, label: str) -> dict[str, float]:
    """The values of a Prometheus metric by one of its labels."""
    text = http("GET", f"http://{rest}/metrics")[1].decode()
    return {dict(re.findall(r'(\w+)="([^"]*)"', m[1]))[label]: float(m[2])
            for m in re.finditer(rf"^{name}{{(.*)}} (\S+)$", text, re.M)}


def test_a_served_paged_decoder_admits_by_blocks_shares_prefixes_and_reports_them(tmp_path):
    """6 blocks of 4 for 3 slots: a question and its 5 tokens take 3 blocks, so two run at once
    and the third waits for blocks; the second asking of a question finds its first block."""
    model = LlamaDecoder(adder_dir(), slots=3, max_len=16, buckets=[8], cache_blocks=6, block_size=4)
    export_distributed(model, DistributedCheckpoint(model.checkpoint()), model.strategy(2),
                       model.example_inputs(), tmp_path)
    server = Serve(tmp_path, batching=False)
    try:
        q, want = questions()[0]
        status, body = post(server.rest, "llama/generate", {"text_input": q, "parameters": {"max_tokens": 5}})
        assert status == 200 and body["text_output"] == want, body
        full_blocks = len(encode(q)) // 4  # the prompt's full blocks stay cached after it
        blocks = metric(server.rest, "dinb_kv_blocks", "state")
        assert blocks == {"in_use": 0, "free": 6, "cached": full_blocks}
        status, body = post(server.rest, "llama/generate", {"text_input": q, "parameters": {"max_tokens": 5}})
        assert status == 200 and body["text_output"] == want  # its first block found, not prefilled
        shared = (len(encode(q)) - 1) // 4  # the last prompt token is always prefilled again
        lookups = metric(server.rest, "dinb_prefix_cache_blocks_total", "result")
        assert lookups == {"hit": shared, "miss": shared}
        qs = questions()[:6]
        with ThreadPoolExecutor(6) as threads:
            runs = list(threads.map(lambda qa: events(server.rest, "llama", {
                "text_input": qa[0], "parameters": {"max_tokens": 5}}), qs))
        answers = ["".join(e["text_output"] for e in run if "index" in e) for run in runs]
        assert answers == [a for _, a in qs]
        assert metric(server.rest, "dinb_kv_waiting_requests", "servable") == {"llama": 0.0}
    finally:
        server.stop()


def test_a_served_paged_decoder_preempts_the_newest_sequence_and_resumes_it(tmp_path):
    """10 blocks of 2 for 3 slots, one decode step a call: a question (8 tokens) joins with 5
    blocks and grows to 6 for its 5 tokens, so two questions in flight outgrow the pool and the
    newer is preempted, then resumed from its prompt and tokens: every answer is still right.
    Rounds of 6 at once until one round had a preemption (each round has them unless the
    requests never overlap)."""
    model = LlamaDecoder(adder_dir(), slots=3, max_len=16, buckets=[8], cache_blocks=10, block_size=2,
                         decode_steps=1)
    export_distributed(model, DistributedCheckpoint(model.checkpoint()), model.strategy(2),
                       model.example_inputs(), tmp_path)
    server = Serve(tmp_path, batching=False)
    try:
        for round_ in range(5):
            qs = questions()[6 * round_:6 * round_ + 6]
            with ThreadPoolExecutor(6) as threads:
                runs = list(threads.map(lambda qa: events(server.rest, "llama", {
                    "text_input": qa[0], "parameters": {"max_tokens": 5}}), qs))
            answers = ["".join(e["text_output"] for e in run if "index" in e) for run in runs]
            assert answers == [a for _, a in qs]
            if metric(server.rest, "dinb_kv_preemptions_total", "servable").get("llama", 0) > 0:
                break
        else:
            pytest.fail("no preemption in 5 rounds of 6 requests at once")
        assert metric(server.rest, "dinb_kv_blocks", "state")["in_use"] == 0
    finally:
        server.stop()


def test_the_pool_is_described_and_drawn_from_its_snapshot():
    import matplotlib

    matplotlib.use("Agg")
    from dinb.explore import describe_block_pool, draw_block_pool

    pool = BlockPool(5, 2)
    pool.admit(0, [1, 2, 3], 4)
    pool.prefilled(0)
    pool.admit(1, [1, 2, 9], 4)
    lines = describe_block_pool(pool.snapshot(), ["rank 0: key/value head 0"])
    assert lines == ["pool: 5 blocks of 2 positions: 3 held, 0 cached, 2 free",
                     "sequence 0: blocks [0 1] = positions 0 .. 3",
                     "sequence 1: blocks [0* 2] = positions 0 .. 3",
                     "blocks 0 .. 4: 211..   (n: held by n sequences, c: cached, .: free)",
                     "rank 0: key/value head 0"]
    ax = draw_block_pool(pool.snapshot())
    assert len(ax.patches) == 5 + 4  # the pool's blocks and the two tables' entries
    matplotlib.pyplot.close(ax.figure)


def test_the_pool_picture_follows_a_generation_step_by_step(tmp_path):
    from dinb import PoolPicture

    model = LlamaDecoder(adder_dir(), slots=4, max_len=16, buckets=[8], cache_blocks=10, block_size=4)
    simulated(1)
    export_distributed(model, DistributedCheckpoint(model.checkpoint()), model.strategy(1),
                       model.example_inputs(), tmp_path / "paged")
    paged = Model()
    paged.build_from_file(tmp_path / "paged")
    picture = PoolPicture(paged)
    four = [q for q, _ in questions()[:4]]
    out = picture.follow([encode(q) for q in four], 5, stop_ids=[1])
    assert out == paged.generate([encode(q) for q in four], 5, stop_ids=[1])
    held = [int(re.search(r'data-held="(\d+)"', block_pool_svg(f)).group(1)) for f in picture.frames]
    assert held[0] == 0 and max(held) >= 4 and held[-1] == 0  # the four's blocks, then all back
    assert len(picture.frames) >= 5 and picture.slider.max == len(picture.frames) - 1
    picture.slider.value = 2
    assert picture.picture.value == block_pool_svg(picture.frames[2]) and "step 2" in picture.caption.value
    simulated(1)
    slots = LlamaDecoder(adder_dir(), slots=2, max_len=16, buckets=[8], cache="slots")
    export_distributed(slots, DistributedCheckpoint(slots.checkpoint()), slots.strategy(1),
                       slots.example_inputs(), tmp_path / "slots")
    contiguous = Model()
    contiguous.build_from_file(tmp_path / "slots")
    with pytest.raises(InputError, match="not a pool of blocks"):
        PoolPicture(contiguous)


def test_the_command_line_exports_a_paged_cache_and_generates_from_it(tmp_path):
    def dinb_cli(*args):
        return subprocess.run([sys.executable, "-m", "dinb", *args], capture_output=True, text=True,
                              timeout=600)

    sizes = ["--slots", "3", "--max-len", "16", "--buckets", "8", "--block-size", "4"]
    refused = dinb_cli("export", "--model", "llama", *sizes, "--cache-blocks", "3",
                       "--out", str(tmp_path / "no"))
    assert refused.returncode != 0 and "give --cache-blocks 4 or more" in refused.stderr
    done = dinb_cli("export", "--model", "llama", "--ranks", "2", *sizes, "--cache-blocks", "8",
                    "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert read_meta(tmp_path / "llama0.dinb")["generation"]["paged"]["blocks"] == 8
    q, want = questions()[0]
    gen = dinb_cli("generate", "--model-dir", str(tmp_path), "--simulate", "2", "--json", q, "123+046=")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.strip().splitlines()[-1])["texts"][0] == want


def test_prefill_and_decode_by_hand_read_the_same_cache_through_the_blocks(tmp_path):
    slots, paged = decoders(blocks=12)
    a, b = loaded(slots, tmp_path / "slots", 2), loaded(paged, tmp_path / "paged", 2)
    np.testing.assert_allclose(b.prefill(1, PROMPT), a.prefill(1, PROMPT), atol=1e-4)
    tokens, positions = np.array([0, int(REF["tokens_0"][0])]), np.array([0, len(PROMPT)])
    np.testing.assert_allclose(b.decode_step(tokens, positions)[1], a.decode_step(tokens, positions)[1],
                               atol=1e-4)
    assert b.block_pool().stats()["in_use"] == 6  # slot 1 holds max_len's blocks until a generate
    b.generate(PROMPT, 2)
    assert b.block_pool().stats()["in_use"] == 0
