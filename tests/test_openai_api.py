"""The OpenAI-compatible API of a served decoder, with the official ``openai`` client as the
client: a Qwen2 folder as downloaded (sharded bfloat16 safetensors, its tokenizer, generation
config and chat template), exported for 2 ranks and served by ``python -m dinb serve`` (Main,
the worker, 2 agent processes)."""

import json
import os
import signal
from pathlib import Path

import openai
import pytest
from conftest import simulated
from test_serving import Serve, wait_until

from dinb import Model, export_distributed
from dinb.checkpoint import DistributedCheckpoint
from dinb.models import LlamaDecoder
from dinb.models.text import token_codec

FOLDER = Path(__file__).parent / "fixtures" / "hf" / "qwen2"
CHAT = json.loads((FOLDER.parent / "qwen2_chat.json").read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    model = LlamaDecoder(FOLDER, slots=2, max_len=128, buckets=[32, 96])
    export_distributed(model, DistributedCheckpoint(model.checkpoint()), model.strategy(2),
                       model.example_inputs(), root, dtype="float32")
    server = Serve(root, batching=False)
    client = openai.OpenAI(base_url=f"http://{server.rest}/v1", api_key="none", max_retries=0, timeout=60)
    yield server, client, root
    server.stop()


@pytest.fixture(scope="module")
def local(served):
    """The same export in this process: what the server's answers must equal."""
    simulated(2)
    model = Model()
    model.build_from_file(served[2])
    return model, token_codec(FOLDER, model.export_meta()["model_config"]["config"])


def test_models_lists_the_servable(served):
    _, client, _ = served
    assert [m.id for m in client.models.list().data] == ["qwen2"]


def test_completions_equal_the_model_and_count_the_tokens(served, local):
    _, client, _ = served
    model, codec = local
    prompt = "The quick brown fox"
    want = model.generate(codec.encode(prompt), 6, temperature=0.0, stop_ids=())
    got = client.completions.create(model="qwen2", prompt=prompt, max_tokens=6, temperature=0)
    assert got.choices[0].text == codec.decode(want) and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(codec.encode(prompt)), 6)
    streamed = client.completions.create(model="qwen2", prompt=prompt, max_tokens=6, temperature=0,
                                         stream=True)
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == codec.decode(want)
    assert pieces[-1].choices[0].finish_reason == "length"


def test_chat_completions_apply_the_chat_template(served, local):
    _, client, _ = served
    model, codec = local
    messages = CHAT["conversations"][1]
    ids = codec.encode_chat(messages)
    assert ids == CHAT["rendered"][1]["ids"]  # transformers' apply_chat_template
    want = codec.decode(model.generate(ids, 8, temperature=0.0, stop_ids=()))
    got = client.chat.completions.create(model="qwen2", messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want
    assert got.usage.prompt_tokens == len(ids) and got.usage.total_tokens == len(ids) + 8
    stream = client.chat.completions.create(model="qwen2", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 8


def test_a_stop_string_ends_the_text_before_it(served, local):
    _, client, _ = served
    model, codec = local
    full = codec.decode(model.generate(codec.encode("Pipeline stages"), 12, temperature=0.0, stop_ids=()))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip() and full.find(stop) > 0
    got = client.completions.create(model="qwen2", prompt="Pipeline stages", max_tokens=12, temperature=0,
                                    stop=[stop])
    assert got.choices[0].text == full[:full.find(stop)] and got.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(served):
    _, client, _ = served
    runs = [client.completions.create(model="qwen2", prompt="The", max_tokens=8, temperature=0.9,
                                      seed=s).choices[0].text for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_bad_requests_are_400_and_an_unknown_model_404(served):
    _, client, _ = served
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="qwen2", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="qwen2", messages=[{"role": "user"}])
    with pytest.raises(openai.BadRequestError, match="cache positions"):
        client.completions.create(model="qwen2", prompt="x", max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="unsupported fields"):
        client.completions.create(model="qwen2", prompt="x", extra_body={"best_of": 2})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_a_killed_agent_is_a_503_naming_its_rank(served):
    server, client, _ = served
    agents = server.agents()
    os.kill(agents[1], signal.SIGKILL)

    def named() -> bool:
        try:
            client.completions.create(model="qwen2", prompt="x", max_tokens=2)
        except openai.APIStatusError as e:
            return e.status_code == 503 and "rank" in str(e)
        return False

    wait_until(named, 60, "a 503 naming the dead rank")
