"""A decoder served: the generate extension (Triton's), streams, continuous batching, failures.

Real processes: ``python -m dinb serve`` (Main, the worker, 2 agent processes) and HTTP clients.
"""

import http.client as http_client
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated
from test_serving import Serve, http, ready, wait_until

from dinb import Model, export_distributed
from dinb.checkpoint import DistributedCheckpoint
from dinb.models import LlamaDecoder
from dinb.models.tiny_adder import adder_dir, decode, encode, questions

FIXTURE = Path(__file__).parent / "fixtures" / "llama"
CONFIG = json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def adder(tmp_path_factory):
    """The tiny adder on 2 ranks with 3 sequence slots, served."""
    root = tmp_path_factory.mktemp("adder")
    model = LlamaDecoder(adder_dir(), slots=3, max_len=16, buckets=[8])
    export_distributed(model, DistributedCheckpoint(model.checkpoint()), model.strategy(2),
                       model.example_inputs(), root)
    server = Serve(root, batching=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """The reference config's random weights, one slot, 160 positions, no queue: long streams
    that never stop early (its vocabulary has no end token)."""
    root = tmp_path_factory.mktemp("llama")
    model = LlamaDecoder(config=CONFIG, slots=1, max_len=160, buckets=[16])
    export_distributed(model, model.init_params(0), model.strategy(2), model.example_inputs(), root)
    server = Serve(root, batching=False, extra=["--max-queue", "0"])
    yield server, model
    server.stop()


def post(rest, path, body, timeout=60):
    url = f"http://{rest}/v2/models/{path}"
    status, data, _ = http("POST", url, json.dumps(body).encode(), timeout=timeout)
    return status, json.loads(data)


def events(rest, model, body, timeout=60, stop_after=None):
    """The server-sent events of one generate_stream call, as dicts (``stop_after`` events, then
    the connection is closed)."""
    host, port = rest.split(":")
    conn = http_client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", f"/v2/models/{model}/generate_stream", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out = [{"status": resp.status, **json.loads(resp.read())}]
        conn.close()
        return out
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    out = []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
            if "finish_reason" in out[-1] or "error" in out[-1] or len(out) == stop_after:
                break
    conn.close()
    return out


def test_generate_answers_sums(adder):
    q, want = questions()[0]
    status, body = post(adder.rest, "llama/generate", {"text_input": q, "parameters": {"max_tokens": 5}})
    assert status == 200, body
    assert body["model_name"] == "llama" and body["text_output"] == want and body["finish_reason"] == "stop"
    assert body["output_ids"] == encode(want) + [1]
    status, body = post(adder.rest, "llama/generate",
                        {"input_ids": encode(q), "parameters": {"max_tokens": 2}})
    assert status == 200 and body["text_output"] == want[:2] and body["finish_reason"] == "length"
    status, meta = http("GET", f"http://{adder.rest}/v2")[:2]
    assert "generate" in json.loads(meta)["extensions"]


def test_concurrent_streams_share_the_slots_and_answer_right(adder, tmp_path):
    """Twelve streams on 3 slots: they join as slots free up (continuous batching); every one
    streams its answer token by token, equal to the same model run by itself."""
    qs = questions()[:12]
    with ThreadPoolExecutor(12) as pool:
        runs = list(pool.map(lambda q: events(adder.rest, "llama", {"text_input": q[0],
                                                                      "parameters": {"max_tokens": 5}}), qs))
    simulated(1)
    model = LlamaDecoder(adder_dir(), slots=1, max_len=16, buckets=[8])
    alone = Model()
    export_distributed(model, DistributedCheckpoint(model.checkpoint()), model.strategy(1),
                       model.example_inputs(), tmp_path)
    alone.build_from_file(tmp_path)
    for (q, _), run in zip(qs, runs):
        tokens = [e["output_ids"][0] for e in run if "index" in e]
        assert [e["index"] for e in run if "index" in e] == list(range(len(tokens)))
        assert "".join(e["text_output"] for e in run) == decode(tokens)
        assert run[-1]["finish_reason"] == "stop"
        assert tokens == alone.generate(encode(q), 5, stop_ids=[1])
    answers = [decode([e["output_ids"][0] for e in run if "index" in e]) for run in runs]
    assert sum(a == want for a, (_, want) in zip(answers, qs)) == len(qs)


def test_bad_generate_requests_get_400(adder):
    cases = [
        ({"text_input": "1" * 9, "parameters": {"max_tokens": 2}}, "largest bucket (8 tokens)"),
        ({"text_input": "123+456=", "parameters": {"max_tokens": 2, "beam_width": 4}}, "unknown parameters"),
        ({"text_input": "123+456=", "prompt": "x"}, "unknown fields"),
        ({"text_input": "123+456=", "input_ids": [3]}, "one of the two"),
        ({"text_input": 5}, "text_input must be a string"),
        ({"input_ids": [99]}, "token ids in 0 .. 13"),
        ({"text_input": "123+456=", "parameters": {"max_tokens": 10}}, "at most 9 tokens"),
        ({"text_input": "123+456=", "parameters": {"temperature": -1}}, "temperature"),
    ]
    for body, message in cases:
        status, reply = post(adder.rest, "llama/generate", body)
        assert status == 400 and message in reply["error"], (body, reply)
        stream = events(adder.rest, "llama", body)
        assert stream[0]["status"] == 400 and message in stream[0]["error"]
    status, reply = post(adder.rest, "nothing/generate", {"text_input": "1+1="})
    assert status == 404
    assert ready(adder.rest)


def test_a_client_that_leaves_frees_its_slot_and_a_full_server_says_503(random_llama):
    server, model = random_llama
    ids = [int(t) for t in np.load(FIXTURE / "reference.npz")["prompt_0"]]
    body = {"input_ids": ids, "parameters": {"max_tokens": 150}}
    host, port = server.rest.split(":")
    conn = http_client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v2/models/llama/generate_stream", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the one slot is taken
    status, reply = post(server.rest, "llama/generate", {"input_ids": ids, "parameters": {"max_tokens": 2}})
    assert status == 503 and "slots are busy" in reply["error"]
    conn.close()  # the client leaves mid-stream: its slot must come free
    done = {}

    def second():
        done["reply"] = post(server.rest, "llama/generate",
                             {"input_ids": ids, "parameters": {"max_tokens": 3}})

    def answered():
        t = threading.Thread(target=second)
        t.start()
        t.join(30)
        return done.get("reply", (0,))[0] == 200

    wait_until(answered, 60, "a request after the client left")
    ref = np.load(FIXTURE / "reference.npz")
    assert done["reply"][1]["output_ids"] == [int(t) for t in ref["tokens_0"][:3]]


def test_a_stuck_rank_fails_the_generation_in_flight_naming_it(random_llama):
    server, _ = random_llama
    wait_until(lambda: ready(server.rest) and len(server.agents()) == 2, 60, "two ready agents")
    victim = [p for p in server.agents()
              if "--rank 1" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")][0]
    os.kill(victim, signal.SIGSTOP)
    try:
        status, reply = post(server.rest, "llama/generate",
                             {"input_ids": [1, 2, 3], "parameters": {"max_tokens": 5}})
        assert status == 503 and "rank 1 died" in reply["error"], reply
    finally:
        os.kill(victim, signal.SIGKILL)
    wait_until(lambda: ready(server.rest), 60, "the relaunched agents")
    run = events(server.rest, "llama", {"input_ids": [1, 2, 3], "parameters": {"max_tokens": 4}})
    assert run[-1]["finish_reason"] == "length" and len(run) == 5


@pytest.fixture(scope="module")
def staged_adder(tmp_path_factory):
    """The tiny adder as 2 pipeline stages of 2 ranks (the servable's rank_size=4, stage_size=2),
    3 slots, served by 4 agents of one MPI job."""
    root = tmp_path_factory.mktemp("staged")
    model = LlamaDecoder(adder_dir(), slots=3, max_len=16, buckets=[8])
    export_distributed(model, DistributedCheckpoint(model.checkpoint()), model.strategy(4, pipeline_stages=2),
                       model.example_inputs(), root)
    server = Serve(root, batching=False)
    yield server
    server.stop()


@pytest.mark.mpi
def test_a_decoder_over_two_stages_answers_concurrent_streams_and_names_a_stuck_last_stage(staged_adder):
    """Six streams on 3 slots through 2 stages of 2 agents: each its answer; then an agent of the
    second stage stops and the request in flight gets the 503 that names it."""
    server = staged_adder
    wait_until(lambda: ready(server.rest) and len(server.agents()) == 4, 60, "four ready agents")
    qs = questions()[:6]
    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(lambda q: events(server.rest, "llama", {"text_input": q[0],
                                                                       "parameters": {"max_tokens": 5}}), qs))
    answers = ["".join(e["text_output"] for e in run) for run in runs]
    assert answers == [want for _, want in qs] and all(run[-1]["finish_reason"] == "stop" for run in runs)
    victim = [p for p in server.agents()
              if "--rank 3" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")][0]
    os.kill(victim, signal.SIGSTOP)
    try:
        status, reply = post(server.rest, "llama/generate",
                             {"text_input": qs[0][0], "parameters": {"max_tokens": 5}})
        assert status == 503 and "rank 3 died" in reply["error"], reply
    finally:
        os.kill(victim, signal.SIGKILL)
