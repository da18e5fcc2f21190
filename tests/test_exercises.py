"""The tutorials' exercises: every notebook from 01 to 08 ends with them, and each check tells a
right answer from a wrong one with the reason (the notebooks run the reference answers)."""

import json
from pathlib import Path

import numpy as np
import pytest

import dinb
from dinb import exercises
from dinb.explore.plan import StrategyPlan
from dinb.models import MatMulNeg, MegatronMLP

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("0[1-8]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_tutorial_ends_with_checked_exercises(path):
    cells = json.loads(path.read_text())["cells"]
    titles = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
              and "".join(c["source"]).startswith("## Exercises")]
    assert titles, f"{path.name} has no Exercises section"
    checks = [c for c in cells[titles[0]:] if c["cell_type"] == "code"
              and "exercises." in "".join(c["source"])]
    assert 1 <= len(checks) <= 2
    for cell in checks:
        assert "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT")
        printed = "".join("".join(o.get("data", {}).get("text/plain", [])) for o in cell["outputs"])
        assert printed.startswith("Right: "), f"{path.name}: the reference answer gives {printed!r}"
    answers = [c for c in cells[titles[0]:] if c["cell_type"] == "code"
               and c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert len(answers) == len(checks), "each reference answer is folded"


def test_an_unanswered_exercise_says_what_to_fill_in():
    verdict = exercises.smallest_micro_batches(None)
    assert not verdict and "set micro_batches" in str(verdict)


def test_matmul_shards_with_and_without_an_all_reduce():
    right = exercises.no_allreduce_shard(((2, 1), (1, 2)))
    assert right and "all-gather" in right.why
    wrong = exercises.no_allreduce_shard(((1, 4), (4, 1)))
    assert not wrong and "partial sum" in wrong.why
    assert "does not divide" in exercises.no_allreduce_shard(((3, 1), (1, 1))).why
    assert exercises.w_replica_groups([[2, 0], [3, 1]])
    assert not exercises.w_replica_groups([[0, 1], [2, 3]])


def test_bytes_held_counts_copies(tmp_path):
    net = MegatronMLP(d_model=16, d_ff=32, batch=2)
    dinb.export_distributed(net, net.init_params(), net.strategy(2), net.example_inputs(), tmp_path)
    per_rank = {r: sum(a.nbytes for a in dinb.read_slice_file(p).params.values())
                for r, p in enumerate(sorted(tmp_path.glob("*.dinb")))}
    verdict = exercises.bytes_held(per_rank, tmp_path)
    assert verdict and "64 bytes are copies" in verdict.why  # b2, held whole by both ranks
    assert not exercises.bytes_held({0: per_rank[0]}, tmp_path)


def test_the_resharding_exercise_names_the_straddling_rank():
    assert exercises.most_source_files(1)
    wrong = exercises.most_source_files(0)
    assert not wrong and "{0: [0, 1, 2], 1: [2, 3, 4, 5], 2: [5, 6, 7]}" in wrong.why


def test_mlp_plans_with_and_without_an_all_reduce():
    megatron = StrategyPlan.create(MegatronMLP(), 2, "megatron")
    assert "all-reduce" in exercises.mlp_without_allreduce(megatron).why
    batch = StrategyPlan.create(MegatronMLP(), 2, "batch")
    assert "copies every weight" in exercises.mlp_without_allreduce(batch).why
    verdict = exercises.mlp_without_allreduce(megatron.with_axis("w2", 0, -1).with_axis("w2", 1, 0))
    assert verdict and "all-gather" in verdict.why


def test_minilm_tp_sizes():
    assert exercises.minilm_tp_sizes([1, 2, 3, 4, 6, 12])
    refused = exercises.minilm_tp_sizes([1, 2, 4, 8])
    assert not refused and "tp=8 is refused" in refused.why and "heads" in refused.why
    assert "you missed [3, 6, 12]" in exercises.minilm_tp_sizes([1, 2, 4]).why


def test_batch_bucket_of_a_small_request(tmp_path):
    net = MatMulNeg(batch=8)
    x = np.ones((8, 96), np.float32)
    strategy = dinb.infer_predict_layout(net, x, device_num=2, strategy="columns")
    dinb.export_distributed(net, net.init_params(), strategy, [x], tmp_path, batch_buckets="auto")
    assert exercises.batch_bucket([1, 2, 4, 8], 4, tmp_path)
    wrong = exercises.batch_bucket([1, 2, 4, 8], 8, tmp_path)
    assert not wrong and "1 padded row(s), against 5 without buckets" in wrong.why


@pytest.mark.parametrize("m, right, reason", [
    (16, True, "3/19 = 16%"), (8, False, "3/11 = 27%"), (13, False, "does not divide"),
    (32, False, "a smaller one does too"),
])
def test_micro_batches_for_a_small_bubble(m, right, reason):
    verdict = exercises.smallest_micro_batches(m)
    assert bool(verdict) is right and reason in verdict.why
