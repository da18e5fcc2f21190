"""A decoder over pipeline stages: each stage its layers and their cache, the activations forward,
the slots' state back from the last stage; simulated ranks and CPU ranks of mpiexec, against the
one-stage export and the Hugging Face reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated

from dinb import Model, export_distributed, read_meta
from dinb.cli import launch
from dinb.cli.common import mpiexec_path
from dinb.models import LlamaDecoder
from dinb.models.tiny_adder import questions
from dinb.sharding import decode_busy_fraction, decode_schedule

FIXTURE = Path(__file__).parent / "fixtures" / "llama"
REF = np.load(FIXTURE / "reference.npz")
CONFIG = json.loads((FIXTURE / "config.json").read_text())  # 4 layers, 8 query and 2 key/value heads
PROMPT = [int(t) for t in REF["prompt_0"]]
PROMPTS = [PROMPT, PROMPT[:5], PROMPT[2:9]]
SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.9, seed=3)


def loaded(decoder, weights, out, n, stages=1, groups=0) -> Model:
    strategy = decoder.strategy(n, pipeline_stages=stages)
    export_distributed(decoder, weights, strategy, decoder.example_inputs(), out)
    simulated(n)
    model = Model()
    config = out / "run.ini"
    config.write_text(f"[runtime]\ndecode_groups = {groups}\n")
    model.build_from_file(out, config_file=config)
    return model


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory):
    """The reference config in 3 slots (a paged cache), its weights, and the one-stage export's
    greedy and sampled tokens."""
    decoder = LlamaDecoder(config=CONFIG, slots=3, max_len=48, buckets=[16])
    weights = decoder.init_params(int(REF["seed"]))
    model = loaded(decoder, weights, tmp_path_factory.mktemp("one"), 1)
    return decoder, weights, model.generate(PROMPTS, 20), model.generate(PROMPTS, 20, **SAMPLED)


def test_each_stage_holds_its_layers_and_their_cache(one_stage, tmp_path):
    decoder, weights, _, _ = one_stage
    model = loaded(decoder, weights, tmp_path, 4, stages=2)
    first, last = read_meta(tmp_path / "llama0.dinb"), read_meta(tmp_path / "llama3.dinb")
    assert first["pipeline"]["layers"] == [0, 2] and last["pipeline"]["layers"] == [2, 4]
    assert "model.embed_tokens.weight" in first["params"] and "lm_head.weight" not in first["params"]
    assert {"model.norm.weight", "lm_head.weight"} <= set(last["params"])
    assert not any(n.startswith("model.layers.2.") for n in first["params"])
    cache = first["generation"]["cache"]
    assert cache["shape"][0] == 2 and cache["shape"] == last["generation"]["cache"]["shape"]  # 2 of 4 layers
    info = model.generation_info()
    assert info["stages"]["layers"] == {0: [0, 2], 1: [2, 4]} and info["stages"]["transfer"] == "local"
    assert "stage 1: layers 2..3 + norm and logits head" in model.runner.describe()


@pytest.mark.parametrize("n, stages", [(2, 2), (4, 2), (4, 4)])
def test_staged_tokens_equal_the_one_stage_export_and_hugging_face(one_stage, tmp_path, n, stages):
    """2 stages x 1 rank, 2 x 2 (megatron in each stage) and 4 x 1, the slots in one group a
    stage (3 for 4 stages: one a slot): the same greedy tokens (and Hugging Face's), the same
    sampled ones for a seed, streamed in order."""
    decoder, weights, greedy, sampled = one_stage
    model = loaded(decoder, weights, tmp_path, n, stages, groups=stages)
    assert model.generate(PROMPTS, 20) == greedy
    assert model.generation_info()["stages"]["groups"] == min(stages, len(PROMPTS))
    assert greedy[0][:12] == list(REF["tokens_0"][:12])
    streamed: list[tuple[int, int]] = []
    got = model.generate(PROMPTS, 20, on_token=lambda row, token: streamed.append((row, token)), **SAMPLED)
    assert got == sampled and [[t for r, t in streamed if r == row] for row in range(3)] == got


@pytest.mark.parametrize("stages, groups", [(2, 1), (2, 2), (4, 4), (3, 2), (2, 3)])
def test_the_decode_schedule_keeps_each_group_in_order_and_the_stages_busy(stages, groups):
    """A group's pass follows its pass on the stage before and its previous step on the last
    stage; a stage does one pass a tick; the busy share is the formula's."""
    steps, at = 8, {}
    ticks = decode_schedule(stages, groups, steps)
    for tick, s, g, t in ticks:
        at[s, g, t] = tick
    assert len({(tick, s) for tick, s, _, _ in ticks}) == len(ticks) == stages * groups * steps
    for (s, g, t), tick in at.items():
        assert s == 0 or at[s - 1, g, t] < tick
        assert s > 0 or t == 0 or at[stages - 1, g, t - 1] < tick
    span = max(at.values()) + 1
    assert decode_busy_fraction(stages, groups, steps) == pytest.approx(groups * steps / span)
    if groups >= stages:
        assert decode_busy_fraction(stages, groups, steps) >= 1 - 1 / (2 * stages)


def test_the_step_logits_and_the_cache_are_those_of_one_stage(one_stage, tmp_path):
    decoder, weights, _, _ = one_stage
    one = loaded(decoder, weights, tmp_path / "one", 1)
    staged = loaded(decoder, weights, tmp_path / "staged", 2, stages=2)
    for model in (one, staged):
        model.prefill(0, PROMPT)
    tokens, positions = np.array([3, 5, 7]), np.array([len(PROMPT), 0, 0])
    a, b = one.decode_step(tokens, positions), staged.decode_step(tokens, positions)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(staged.kv_cache(0, len(PROMPT) + 1), one.kv_cache(0, len(PROMPT) + 1),
                               rtol=1e-4, atol=1e-5)


def test_a_tied_head_goes_to_the_last_stage_as_a_copy_of_the_embedding(tmp_path):
    config = dict(CONFIG, tie_word_embeddings=True)
    decoder = LlamaDecoder(config=config, slots=2, max_len=48, buckets=[16])
    weights = decoder.init_params(1)
    assert "lm_head.weight" not in weights
    want = loaded(decoder, weights, tmp_path / "one", 1).generate(PROMPTS[:2], 12)
    model = loaded(decoder, weights, tmp_path / "staged", 4, stages=2)
    assert model.generate(PROMPTS[:2], 12) == want
    last = model.runner.built.params[1]
    np.testing.assert_array_equal(np.asarray(last["lm_head.weight"]), weights["model.embed_tokens.weight"])


def test_sequences_preempted_in_a_staged_pool_resume_with_their_tokens(tmp_path):
    """3 sequences of up to 40 positions in 7 blocks of 8 over 2 stages: the newest is preempted
    and prefilled again a bucket at a time, and every token is the slot cache's."""
    kw = dict(config=CONFIG, slots=3, max_len=48, buckets=[16])
    slots = LlamaDecoder(**kw, cache="slots")
    weights = slots.init_params(int(REF["seed"]))
    want = loaded(slots, weights, tmp_path / "slots", 1).generate(PROMPTS, 30, **SAMPLED)
    paged = loaded(LlamaDecoder(**kw, cache_blocks=7, block_size=8), weights, tmp_path / "paged", 2, stages=2,
                   groups=2)
    assert paged.generate(PROMPTS, 30, **SAMPLED) == want
    assert paged.generation_info()["paged"]["preemptions"] > 0


def test_the_command_line_exports_stages_and_generates_from_them(tmp_path):
    def dinb_cli(*args):
        return subprocess.run([sys.executable, "-m", "dinb", *args], capture_output=True, text=True,
                              timeout=600)

    done = dinb_cli("export", "--model", "llama", "--ranks", "2", "--pipeline-stages", "2",
                    "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "2 stages x 1 ranks" in done.stdout and "stage 1" in done.stdout
    q, want = questions()[0]
    gen = dinb_cli("generate", "--model-dir", str(tmp_path), "--simulate", "2", "--json", q)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.strip().splitlines()[-1])["texts"][0] == want


@pytest.fixture(scope="module")
def staged_exports(one_stage, tmp_path_factory):
    decoder, weights, _, _ = one_stage
    root = tmp_path_factory.mktemp("staged")
    for n in (2, 4):
        export_distributed(decoder, weights, decoder.strategy(n, pipeline_stages=2), decoder.example_inputs(),
                           root / f"s2x{n // 2}")
    return root


def mpi_generate(model_dir: Path, n: int, *extra: str) -> dict:
    ids = [a for p in PROMPTS for a in ("--ids", ",".join(map(str, p)))]
    proc = launch(n, ["--model-dir", str(model_dir), *ids, "--max-new-tokens", "20", "--json", *extra],
                  command="generate", timeout_s=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_on_every_rank"] and result["collectives"] == "mpi"
    return result


@pytest.mark.mpi
@pytest.mark.parametrize("split, n", [("s2x1", 2), ("s2x2", 4)])
def test_mpiexec_stages_pick_the_tokens_of_one_stage(one_stage, staged_exports, split, n, tmp_path):
    """Each rank runs its stage's programs, the activations over MPI to the next stage, the tokens
    broadcast from the last; 2 x 2 sums its heads over the stage's own communicator. Greedy in
    one group (the default on one host's CPU), sampled in 2 groups that follow each other."""
    _, _, greedy, sampled = one_stage
    got = mpi_generate(staged_exports / split, n)
    assert got["tokens"] == greedy and got["stages"]["groups"] == 1
    groups = tmp_path / "groups.ini"
    groups.write_text("[runtime]\ndecode_groups = 2\n")
    sample = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "3",
              "--config-file", str(groups)]
    got = mpi_generate(staged_exports / split, n, *sample)
    assert got["tokens"] == sampled and got["stages"]["groups"] == 2


HELPER = Path(__file__).parent / "helpers" / "decoder_stage_rank.py"


def mpirun_helper(model_dir: Path, n: int, *extra: str) -> subprocess.CompletedProcess:
    ids = [a for p in PROMPTS for a in ("--ids", ",".join(map(str, p)))]
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, str(HELPER), str(model_dir), *ids, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.mpi
def test_two_groups_follow_each_other_through_mpi_stages_and_a_stuck_last_stage_is_named(
        one_stage, staged_exports, tmp_path):
    """The slots in 2 groups (one a stage): each rank's share of the decode time spent computing
    is reported, with the one-stage tokens; then the last stage's rank stops after its 4th token
    and the first stage's rank, waiting for a group's tokens, names it within the stage timeout."""
    _, _, greedy, _ = one_stage
    groups = tmp_path / "groups.ini"
    groups.write_text("[runtime]\ndecode_groups = 2\n")
    proc = mpirun_helper(staged_exports / "s2x1", 2, "--config", str(groups))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines()[-2:]:
        got = json.loads(line)
        assert got["tokens"] == greedy and got["stages"]["groups"] == 2
        busy = got["stages"]["busy"]
        assert set(busy) == {"0", "1"} and all(0 < b <= 1 for b in busy.values())
    cfg = tmp_path / "c.ini"
    cfg.write_text("[runtime]\nstage_timeout_s = 3\ndecode_groups = 2\n")
    proc = mpirun_helper(staged_exports / "s2x1", 2, "--config", str(cfg), "--stuck", "1", "--after", "4")
    assert proc.returncode != 0
    assert "rank 0 received no tokens from rank 1 (the last stage) within 3 s; rank 1 is dead or stuck" \
        in proc.stderr, proc.stderr[-3000:]
