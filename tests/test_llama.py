"""The Llama decoder against Hugging Face's, its split, the KV cache and generation.

The reference (``tests/fixtures/llama/reference.npz``, made by ``tools/make_llama_reference.py``
with transformers' ``LlamaForCausalLM``) holds, for two prompts, the prefill's logits, the KV
cache after it and 32 greedy decode steps (tokens and logits) of the weights
``LlamaDecoder(config).init_params(seed)``.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated

from dinb import InputError, Model, SliceFileError, StrategyError, export_distributed, read_meta
from dinb.cli import launch, main
from dinb.models import LlamaDecoder
from dinb.models.tiny_adder import adder_dir, decode, encode, questions

FIXTURE = Path(__file__).parent / "fixtures" / "llama"
REF = np.load(FIXTURE / "reference.npz")
CONFIG = json.loads((FIXTURE / "config.json").read_text())
STEPS = len(REF["tokens_0"])
TOL = 1e-4


@pytest.fixture(scope="module")
def decoder():
    """The cache of slots, what ``batch`` splits and the pictures of the cache by position read
    (the paged one: tests/test_paged_kv.py)."""
    return LlamaDecoder(config=CONFIG, slots=2, max_len=48, buckets=[8, 16], cache="slots")


@pytest.fixture(scope="module")
def weights(decoder):
    return decoder.init_params(int(REF["seed"]))


def export(decoder, weights, out, n, strategy="megatron", **kw):
    export_distributed(decoder, weights, decoder.strategy(n, strategy), decoder.example_inputs(), out, **kw)
    return out


def loaded(path) -> Model:
    model = Model()
    model.build_from_file(path)
    return model


def test_the_forward_pass_equals_hugging_face(decoder, weights):
    import jax.numpy as jnp

    for i in range(2):
        params = {k: jnp.asarray(v) for k, v in weights.items()}
        logits = decoder.forward(params, jnp.asarray(REF[f"prompt_{i}"][None]))
        np.testing.assert_allclose(np.asarray(logits[0]), REF[f"prefill_logits_{i}"], atol=TOL)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_prefill_and_every_decode_step_equal_hugging_face(decoder, weights, tmp_path, n):
    """Logits within 1e-4 at every step and the same greedy tokens, on 1, 2 and 4 ranks (4 ranks
    exceed the 2 key/value heads: each head is held by 2 ranks); the cache after the prefill is
    Hugging Face's ``past_key_values``."""
    simulated(n)
    model = loaded(export(decoder, weights, tmp_path, n))
    prompts = [REF["prompt_0"], REF["prompt_1"]]
    tokens = np.zeros(2, np.int32)
    for slot, prompt in enumerate(prompts):
        logits = model.prefill(slot, prompt)
        np.testing.assert_allclose(logits, REF[f"prefill_logits_{slot}"][-1], atol=TOL)
        np.testing.assert_allclose(model.kv_cache(slot, len(prompt)), REF[f"cache_{slot}"], atol=TOL)
        tokens[slot] = logits.argmax()
    positions = np.array([len(p) for p in prompts], np.int32)
    for step in range(STEPS):
        for slot in range(2):
            assert tokens[slot] == REF[f"tokens_{slot}"][step], (slot, step)
        logits = model.decode_step(tokens, positions)
        for slot in range(2):
            np.testing.assert_allclose(logits[slot], REF[f"decode_logits_{slot}"][step], atol=TOL)
        tokens, positions = logits.argmax(-1).astype(np.int32), positions + 1
    assert model.generate([list(p) for p in prompts], STEPS) == [list(REF["tokens_0"]), list(REF["tokens_1"])]


def test_the_batch_strategy_splits_the_slots(decoder, weights, tmp_path):
    """``batch``: every rank holds every weight and the cache of its own slots."""
    simulated(2)
    model = loaded(export(decoder, weights, tmp_path, 2, "batch"))
    full = int(np.prod(decoder.cache_shape())) * 4
    assert read_meta(tmp_path / "llama0.dinb")["generation"]["cache_bytes"] == [full // 2] * 2
    out = model.generate([list(REF["prompt_0"]), list(REF["prompt_1"])], STEPS)
    assert out == [list(REF["tokens_0"]), list(REF["tokens_1"])]


def test_the_cache_is_updated_in_place(decoder, weights, tmp_path):
    simulated(2)
    model = loaded(export(decoder, weights, tmp_path, 2))
    model.prefill(0, REF["prompt_0"])
    cache = model.runner.cache
    pointers = [s.data.unsafe_buffer_pointer() for s in cache.addressable_shards]
    model.decode_step(np.zeros(2, np.int32), np.array([11, 0], np.int32))
    assert cache.is_deleted()  # donated: the step wrote into its buffers
    assert [s.data.unsafe_buffer_pointer() for s in model.runner.cache.addressable_shards] == pointers


def test_each_rank_holds_its_own_heads_and_their_cache(decoder, weights, tmp_path):
    simulated(4)
    export(decoder, weights, tmp_path, 4)
    meta = read_meta(tmp_path / "llama1.dinb")
    assert meta["format_version"] == 4 and meta["generation"]["buckets"] == [8, 16]
    assert meta["params"]["model.layers.0.self_attn.q_proj.weight"]["slice"] == [[64, 128], [0, 256]]
    assert meta["params"]["model.layers.0.self_attn.k_proj.weight"]["slice"] == [[0, 32], [0, 256]]
    full = int(np.prod(decoder.cache_shape())) * 4
    assert meta["generation"]["cache_bytes"] == [full // 2] * 4  # one of 2 heads each, replicated twice
    model = loaded(tmp_path)
    assert model.generation_info()["cache"].shape == decoder.cache_shape()
    text = model.compiled_text()
    assert len(re.findall(r"= \S+ all-reduce\(", text)) == 2 * decoder.layers  # per token, per layer 2
    assert len(re.findall(r"= \S+ all-gather\(", text)) == 1  # the logits, split by vocabulary


def test_sampling_is_the_same_for_a_seed_on_every_rank_count(decoder, weights, tmp_path):
    runs = {}
    for n in (1, 2):
        simulated(n)
        model = loaded(export(decoder, weights, tmp_path / str(n), n))
        runs[n] = [model.generate(REF["prompt_0"], 12, temperature=0.9, top_k=50, top_p=0.9, seed=s)
                   for s in (1, 2)]
        assert model.generate(REF["prompt_0"], 12, temperature=1.0, top_k=1) == list(REF["tokens_0"][:12])
    assert runs[1] == runs[2] and runs[1][0] != runs[1][1]
    streamed = list(model.generate_stream(REF["prompt_0"], 12, temperature=0.9, top_k=50, top_p=0.9, seed=1))
    assert streamed == runs[1][0]


def test_stop_tokens_end_a_sequence(decoder, weights, tmp_path):
    simulated(1)
    model = loaded(export(decoder, weights, tmp_path, 1))
    stop = int(REF["tokens_0"][3])
    got = []
    out = model.generate([REF["prompt_0"], REF["prompt_1"]], 10, stop_ids=[stop],
                         on_token=lambda row, t: got.append((row, t)))
    assert out[0] == list(REF["tokens_0"][:4]) and len(out[1]) == 10
    assert [t for r, t in got if r == 0] == out[0]


def test_bad_requests_get_clear_errors(decoder, weights, tmp_path):
    with pytest.raises(StrategyError, match="tensor-parallel sizes that would: 1, 2, 4, 8"):
        decoder.strategy(3)
    with pytest.raises(StrategyError, match="rank counts that would: 1, 2"):
        decoder.strategy(4, "batch")
    with pytest.raises(StrategyError, match="divide both the 4 layers and the 6 ranks: 1, 2"):
        decoder.strategy(6, pipeline_stages=3)
    simulated(1)
    model = loaded(export(decoder, weights, tmp_path, 1))
    with pytest.raises(InputError, match="largest bucket \\(16 tokens\\)"):
        model.generate(list(range(17)), 2)
    with pytest.raises(InputError, match="3 prompts for an export of 2 sequence slots"):
        model.generate([[1], [2], [3]], 2)
    with pytest.raises(InputError, match="token ids must lie in 0 .. 511"):
        model.generate([1, 512], 2)
    with pytest.raises(InputError, match="ask for at most 38 new tokens"):
        model.generate(list(range(11)), 39)
    with pytest.raises(InputError, match="top_p"):
        model.generate([1, 2], 2, temperature=1.0, top_p=0)
    with pytest.raises(InputError, match="call generate"):
        model.predict([])


def test_a_damaged_prefill_program_is_found(decoder, weights, tmp_path):
    simulated(1)
    export(decoder, weights, tmp_path, 1)
    path = tmp_path / "llama0.dinb"
    data = bytearray(path.read_bytes())
    meta = read_meta(path)
    end = len(data) - 100  # the last tensor written is a program; flip a byte inside it
    assert min(p["nbytes"] for p in meta["programs"].values()) > 100
    data[end] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SliceFileError, match="fails its checksum"):
        loaded(path)


def test_bfloat16_export_keeps_the_greedy_tokens_close(decoder, weights, tmp_path):
    simulated(2)
    model = loaded(export(decoder, weights, tmp_path, 2, dtype="bfloat16"))
    assert model.generation_info()["cache"].dtype == "bfloat16"
    out = model.generate(REF["prompt_0"], 8)
    assert len(out) == 8 and out[0] == REF["tokens_0"][0]


def test_the_tiny_adder_adds_on_every_rank_count(tmp_path):
    """The trained adder, its weights read through the checkpoint layer rank by rank, answers the
    fixed questions alike on 1 and 2 ranks."""
    adder = LlamaDecoder(adder_dir(), slots=8, max_len=16, buckets=[8])
    from dinb.checkpoint import DistributedCheckpoint

    qs = questions()[:32]
    answers = {}
    for n in (1, 2):
        simulated(n)
        export_distributed(adder, DistributedCheckpoint(adder.checkpoint()), adder.strategy(n),
                           adder.example_inputs(), tmp_path / str(n))
        model = loaded(tmp_path / str(n))
        answers[n] = []
        for i in range(0, len(qs), 8):
            out = model.generate([encode(q) for q, _ in qs[i:i + 8]], 5, stop_ids=[1])
            answers[n] += [decode(o) for o in out]
    assert answers[1] == answers[2]
    right = sum(a == want for a, (_, want) in zip(answers[1], qs))
    assert right >= 0.9 * len(qs), answers[1]


@pytest.mark.mpi
def test_generate_streams_on_two_mpiexec_ranks(tmp_path):
    assert main(["export", "--model", "llama", "--ranks", "2", "--slots", "2", "--max-len", "16",
                 "--buckets", "8", "--out", str(tmp_path)]) == 0
    proc = launch(2, ["--model-dir", str(tmp_path), "123+456="], command="generate", timeout_s=240)
    assert proc.returncode == 0, proc.stderr
    assert "123+456=0579\n" in proc.stdout
    assert "collectives mpi" in proc.stdout and "every rank generated the same tokens: True" in proc.stdout


@pytest.mark.mpi
def test_hugging_face_tokens_on_two_mpiexec_ranks(decoder, weights, tmp_path):
    export(decoder, weights, tmp_path, 2)
    ids = ",".join(map(str, REF["prompt_0"]))
    proc = launch(2, ["--model-dir", str(tmp_path), "--ids", ids, "--max-new-tokens", str(STEPS), "--json"],
                  command="generate", timeout_s=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == [list(map(int, REF["tokens_0"]))] and result["same_on_every_rank"]


def test_the_explorer_counts_the_kv_cache_once_beside_the_weights():
    from dinb.explore.plan import StrategyPlan
    from dinb.widgets import StrategyExplorer

    adder = LlamaDecoder()  # dinb's tiny adder: 4 slots, 32 positions
    full = int(np.prod(adder.cache_shape())) * 4
    for n, share in ((1, 1), (2, 2), (4, 2)):  # 4 ranks: each of the 2 heads on 2 ranks
        rows = StrategyPlan.create(adder, n, "megatron").bytes_per_rank()
        assert [r.cache for r in rows] == [full // share] * n
        assert all(r.outputs == adder.slots * adder.vocab * 4 for r in rows)  # the logits only
    explorer = StrategyExplorer("llama", devices=2)
    assert "KV cache" in explorer.bytes_w.value
