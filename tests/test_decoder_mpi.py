"""A decoder on CPU ranks of mpiexec: each rank's own steps with MPI's all-reduce between them
(dinb.runtime.runners.decoder_mpi), against one device and against the SPMD program's gloo."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated

from dinb import Model, export_distributed
from dinb.cli import launch
from dinb.models import LlamaDecoder

FIXTURE = Path(__file__).parent / "fixtures" / "llama"
REF = np.load(FIXTURE / "reference.npz")
CONFIG = json.loads((FIXTURE / "config.json").read_text())
PROMPTS = [[int(t) for t in REF["prompt_0"]], [int(t) for t in REF["prompt_0"][:5]]]
SAMPLED = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "7"]


def generate(model_dir: Path, n: int, *extra: str) -> dict:
    ids = [a for p in PROMPTS for a in ("--ids", ",".join(map(str, p)))]
    proc = launch(n, ["--model-dir", str(model_dir), *ids, "--max-new-tokens", "12", "--json", *extra],
                  command="generate", timeout_s=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_on_every_rank"]
    return result


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The reference config (8 query heads, 2 key/value heads, vocabulary 512) exported for 1, 2
    and 4 ranks, and the tokens of the one-device export."""
    root = tmp_path_factory.mktemp("decoder_mpi")
    decoder = LlamaDecoder(config=CONFIG, slots=2, max_len=48, buckets=[16])  # a paged cache
    slots = LlamaDecoder(config=CONFIG, slots=2, max_len=48, buckets=[16], cache="slots")  # what batch splits
    weights = decoder.init_params(int(REF["seed"]))
    for n, name in ((2, "megatron"), (4, "megatron"), (2, "replicated"), (2, "batch")):
        model = slots if name == "batch" else decoder
        export_distributed(model, weights, model.strategy(n, name), model.example_inputs(),
                           root / f"{name}{n}")
    simulated(1)
    export_distributed(decoder, weights, decoder.strategy(1), decoder.example_inputs(), root / "one")
    one = Model()
    one.build_from_file(root / "one")
    greedy = one.generate(PROMPTS, 12)
    sampled = one.generate(PROMPTS, 12, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    return root, greedy, sampled


@pytest.mark.mpi
@pytest.mark.parametrize("split", ["megatron2", "megatron4", "replicated2"])
def test_each_rank_runs_its_own_steps_and_picks_the_tokens_of_one_device(exports, split):
    """tp 2 splits the key/value heads, tp 4 replicates each over 2 ranks and gathers a vocabulary
    split 4 ways; replicated runs the whole model on each rank with no collective."""
    root, greedy, sampled = exports
    n = int(split[-1])
    result = generate(root / split, n)
    assert result["collectives"] == "mpi" and result["tokens"] == greedy
    assert result["tokens"][0] == list(REF["tokens_0"][:12])  # and Hugging Face's
    assert generate(root / split, n, *SAMPLED)["tokens"] == sampled


@pytest.mark.mpi
def test_the_spmd_program_over_gloo_gives_the_same_tokens_and_batch_stays_on_it(exports, tmp_path):
    root, greedy, _ = exports
    gloo = tmp_path / "gloo.ini"
    gloo.write_text("[runtime]\ncollectives = gloo\n")
    result = generate(root / "megatron2", 2, "--config-file", str(gloo))
    assert result["collectives"] == "gloo" and result["tokens"] == greedy
    result = generate(root / "batch2", 2)  # the slots split over the ranks: the SPMD program's
    assert result["collectives"] == "gloo" and result["tokens"] == greedy
    mpi = tmp_path / "mpi.ini"
    mpi.write_text("[runtime]\ncollectives = mpi\n")
    ids = [a for p in PROMPTS for a in ("--ids", ",".join(map(str, p)))]
    proc = launch(2, ["--model-dir", str(root / "batch2"), *ids, "--config-file", str(mpi)],
                  command="generate", timeout_s=300)
    assert proc.returncode != 0 and "collectives = mpi: a decoder's per-rank steps run" in proc.stderr
