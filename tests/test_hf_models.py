"""Hugging Face decoder folders as downloaded (``tests/fixtures/hf``, made by
``tools/make_hf_fixtures.py`` with transformers): Llama 3.x, Qwen2, Qwen3 and Mistral, their
sharded bfloat16 weights read rank by rank, their tokenizer, generation config and chat
template, against transformers' own logits and tokens."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated

from dinb import DinbError, Model, export_distributed
from dinb.checkpoint import DistributedCheckpoint
from dinb.cli import launch, main
from dinb.errors import CheckpointError
from dinb.models import LlamaDecoder
from dinb.models.hf_config import decoder_config
from dinb.models.text import token_codec

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ("llama3", "qwen2", "qwen3", "mistral")
TOL = 1e-4


def reference(family: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"{family}.npz"))


def exported(family: str, out: Path, n: int, dtype: str = "float32") -> Model:
    simulated(n)
    decoder = LlamaDecoder(FIXTURES / family, slots=2, max_len=48, buckets=[32])
    export_distributed(
        decoder,
        DistributedCheckpoint(decoder.checkpoint()),
        decoder.strategy(n),
        decoder.example_inputs(),
        out,
        dtype=dtype,
    )
    model = Model()
    model.build_from_file(out)
    return model


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_equals_transformers(family, n, tmp_path):
    """The bfloat16 weights widened to float32: logits within 1e-4 of transformers' at the
    prefill and every decode step, the same greedy tokens (4 ranks: each of the 2 key/value
    heads on 2)."""
    ref = reference(family)
    model = exported(family, tmp_path, n)
    for slot in range(2):
        logits = model.prefill(slot, ref[f"prompt_{slot}"])
        np.testing.assert_allclose(logits, ref[f"logits_{slot}"][0], atol=TOL)
    tokens = np.array([ref["tokens_0"][0], ref["tokens_1"][0]], np.int32)
    positions = np.array([len(ref["prompt_0"]), len(ref["prompt_1"])], np.int32)
    for step in range(1, len(ref["tokens_0"])):
        logits = model.decode_step(tokens, positions)
        for slot in range(2):
            np.testing.assert_allclose(logits[slot], ref[f"logits_{slot}"][step], atol=TOL)
        tokens, positions = np.array([ref["tokens_0"][step], ref["tokens_1"][step]], np.int32), positions + 1
    out = model.generate(
        [list(ref["prompt_0"]), list(ref["prompt_1"])], len(ref["tokens_0"]), temperature=0.0, stop_ids=()
    )
    assert out == [list(ref["tokens_0"]), list(ref["tokens_1"])]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chat_template_renders_as_transformers_does(family):
    chat = json.loads((FIXTURES / f"{family}_chat.json").read_text())
    codec = token_codec(
        FIXTURES / family, decoder_config(json.loads((FIXTURES / family / "config.json").read_text()))
    )
    for conversation, rendered in zip(chat["conversations"], chat["rendered"]):
        assert codec.render_chat(conversation) == rendered["text"]
        assert codec.encode_chat(conversation) == rendered["ids"]


def test_the_export_reads_bfloat16_slices_as_they_are(tmp_path):
    """The folder's own dtype is kept (no float32 copy), each rank's file holds its slices only
    and the bytes read from the shards are each rank's share."""
    simulated(2)
    decoder = LlamaDecoder(FIXTURES / "qwen2", slots=2, max_len=48, buckets=[32])
    ckpt = DistributedCheckpoint(decoder.checkpoint())
    assert len({t.path for held in ckpt._held.values() for _, t in held.values()}) == 3  # the shards
    export_distributed(decoder, ckpt, decoder.strategy(2), decoder.example_inputs(), tmp_path)
    total = sum(int(np.prod(s)) * 2 for s, _ in ckpt.param_specs().values())
    assert all(d == "bfloat16" for _, d in ckpt.param_specs().values())
    replicated = sum(
        int(np.prod(s)) * 2
        for n, (s, _) in ckpt.param_specs().items()
        if decoder.strategy(2)[n].tensor_map == (-1,) * len(s) or n.endswith("norm.weight")
    )
    for rank in range(2):
        assert ckpt.reads[rank] <= (total - replicated) / 2 + replicated
    model = Model()
    model.build_from_file(tmp_path)
    ref = reference("qwen2")
    assert model.generation_info()["cache"].dtype == "bfloat16"
    logits, want = model.prefill(0, ref["prompt_0"]), ref["logits_0"][0]  # computed in bfloat16
    assert np.abs(logits - want).max() < 0.01 * np.ptp(want)  # within 1% of the logits' range
    assert want.argmax() in np.argsort(-logits)[:2]  # its top two are 0.005 apart here


def test_generation_config_gives_the_end_tokens_and_the_default_sampling(tmp_path):
    model = exported("llama3", tmp_path, 1)
    info = model.generation_info()
    assert info["end_tokens"] == [1, 4] and info["defaults"]["temperature"] == 0.7
    ref = reference("llama3")
    seeded = [model.generate(list(ref["prompt_0"]), 8, seed=s) for s in (1, 1, 2)]  # sampled by default
    assert seeded[0] == seeded[1] != seeded[2]


@pytest.mark.mpi
def test_qwen3_on_two_mpiexec_ranks_from_the_command_line(tmp_path):
    ref = reference("qwen3")
    assert (
        main(
            [
                "export",
                "--weights",
                str(FIXTURES / "qwen3"),
                "--ranks",
                "2",
                "--slots",
                "2",
                "--max-len",
                "48",
                "--buckets",
                "32",
                "--dtype",
                "float32",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("*.dinb")) == ["qwen3-0.dinb", "qwen3-1.dinb"]
    ids = ",".join(map(str, ref["prompt_0"]))
    proc = launch(
        2,
        [
            "--model-dir",
            str(tmp_path),
            "--ids",
            ids,
            "--max-new-tokens",
            str(len(ref["tokens_0"])),
            "--temperature",
            "0",
            "--json",
        ],
        command="generate",
        timeout_s=240,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    want = list(map(int, ref["tokens_0"]))
    cut = next((i + 1 for i, t in enumerate(want) if t in (6, 7)), len(want))  # its end tokens stop it
    assert result["tokens"] == [want[:cut]] and result["same_on_every_rank"]


def test_the_command_line_chat_puts_the_prompt_through_the_template(tmp_path, capsys):
    chat = json.loads((FIXTURES / "qwen3_chat.json").read_text())
    model = exported("qwen3", tmp_path, 2)
    want = model.generate(chat["rendered"][0]["ids"], 4, temperature=0.0)
    message = chat["conversations"][0][0]["content"]
    assert (
        main(
            [
                "generate",
                "--model-dir",
                str(tmp_path),
                "--simulate",
                "2",
                "--chat",
                message,
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == [want]


def test_what_dinb_does_not_read_is_named_before_any_work(tmp_path):
    def folder(name: str, **changes) -> Path:
        out = tmp_path / name
        shutil.copytree(FIXTURES / "mistral", out)
        config = json.loads((out / "config.json").read_text())
        config.update(changes)
        (out / "config.json").write_text(json.dumps(config))
        return out

    with pytest.raises(
        DinbError,
        match=r"model_type 'gemma2' is not a decoder dinb reads; it reads the families "
        r"llama, qwen2, qwen3, mistral",
    ):
        LlamaDecoder(folder("gemma", model_type="gemma2"))
    with pytest.raises(DinbError, match="rope type 'yarn' is not supported"):
        LlamaDecoder(folder("yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}))
    with pytest.raises(DinbError, match="past the model's sliding_window of 32 positions"):
        LlamaDecoder(folder("window", sliding_window=32), max_len=64)
    assert LlamaDecoder(folder("window2", sliding_window=64), max_len=64).max_len == 64
    broken = folder("broken")
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*the download is incomplete"):
        DistributedCheckpoint(broken)
    assert (
        main(
            [
                "export",
                "--model",
                "matmul",
                "--weights",
                str(FIXTURES / "qwen2"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert (
        main(
            ["export", "--model", "qwen3", "--weights", str(FIXTURES / "qwen2"), "--out", str(tmp_path / "q")]
        )
        == 2
    )
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()
