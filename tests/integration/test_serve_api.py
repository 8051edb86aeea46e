"""The serving API: both contracts, validation, the queue bound, disconnects, API keys, and the openai client."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from llama2_sft.inference.load import load_model

    return load_model(tiny_checkpoint, "cpu", "fp32")


def make_client(loaded, **settings):
    from fastapi.testclient import TestClient

    from llama2_sft.serve.api import ServeSettings, create_app

    return TestClient(create_app(loaded, ServeSettings(**settings)))


def greedy(loaded, messages, max_new_tokens):
    from llama2_sft.data.chat import generation_prompt
    from llama2_sft.inference.generate import SamplingConfig, generate_reply

    return generate_reply(loaded.model, loaded.tokenizer, generation_prompt(loaded.tokenizer, messages),
                          SamplingConfig(max_new_tokens=max_new_tokens), torch.device("cpu"))["text"]


def test_legacy_endpoint_keeps_the_original_contract_and_honours_sampling(loaded):
    client = make_client(loaded)
    response = client.post("/", json={"prompt": "3 加 4 等于几？", "history": [["hi", "hello"]], "max_length": 8,
                                      "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"response", "history", "status", "time"} and body["status"] == 200
    assert body["history"] == [["hi", "hello"], ["3 加 4 等于几？", body["response"]]]
    assert time.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    expected = greedy(loaded, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "3 加 4 等于几？"}], 8)
    assert body["response"] == expected  # same prompt as encode_dialog builds, temperature 0 = greedy
    assert client.post("/", json={"prompt": "hi"}).status_code == 200  # history optional


def test_openai_endpoint_answers_with_usage_counts(loaded):
    client = make_client(loaded)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse a b c"}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 6}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": greedy(loaded, messages, 6)}
    usage = body["usage"]
    assert usage["completion_tokens"] <= 6 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert client.get("/v1/models").json()["data"][0]["id"] == "llama2_sft"
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages[1]"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "limit"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "context"),
    ],
)
def test_invalid_requests_get_a_4xx_with_a_message(loaded, payload, fragment):
    client = make_client(loaded, max_new_tokens_limit=64)
    response = client.post("/v1/chat/completions", json=payload)
    assert 400 <= response.status_code < 500
    assert fragment in response.text


def test_bad_json_is_a_4xx(loaded):
    client = make_client(loaded)
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_api_key_is_enforced_on_every_route_but_health(loaded):
    client = make_client(loaded, api_key="sekret")
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.post("/", json={"prompt": "hi"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_user_text_with_control_strings_stays_text(loaded):
    from llama2_sft.data import encode_dialog

    ids = encode_dialog(loaded.tokenizer, [{"role": "user", "content": "</s><s>[INST]"}]).input_ids
    assert ids.count(loaded.tokenizer.eos_token_id) == 0 and ids.count(loaded.tokenizer.bos_token_id) == 1
    client = make_client(loaded)
    assert client.post("/", json={"prompt": "</s><s>[INST]", "max_length": 2}).status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(loaded):
    """A real uvicorn server on 127.0.0.1 in a thread."""
    import uvicorn

    from llama2_sft.serve.api import ServeSettings, create_app

    port = free_port()
    app = create_app(loaded, ServeSettings(max_queue=2, default_max_new_tokens=16))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)


def test_official_openai_client_works_streaming_included(server, loaded):
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    whole = client.chat.completions.create(model="llama2_sft", messages=messages, temperature=0, max_tokens=10)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="llama2_sft", messages=messages, temperature=0, max_tokens=10, stream=True) if c.choices]
    assert whole.choices[0].message.content == greedy(loaded, messages, 10)
    assert "".join(pieces).strip() == whole.choices[0].message.content


def test_stream_ends_with_done_and_a_stop_string_cuts_it(server, loaded):
    import httpx

    base, _ = server
    messages = [{"role": "user", "content": "hello"}]
    full = greedy(loaded, messages, 12)
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"messages": messages, "temperature": 0,
                                                                    "max_tokens": 12, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(l[6:])["choices"][0]["delta"].get("content", "") for l in lines[:-1])
    assert text.strip() == full
    if len(full) > 2:
        stop = full[1:3]
        body = httpx.post(f"{base}/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 12,
                                                                 "stop": stop}, timeout=60).json()
        assert stop not in body["choices"][0]["message"]["content"]


def test_full_queue_answers_429_and_disconnected_clients_free_their_slots(server):
    import httpx

    base, app = server
    service = app.state.service
    payload = {"messages": [{"role": "user", "content": "count"}], "temperature": 1.0, "max_tokens": 2000, "stream": True}
    # Hold the model: the two streams are admitted (max_queue=2) but cannot finish, so the third is refused.
    service.lock.acquire()
    try:
        streams = [httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=60) for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        for response in responses:
            next(response.iter_lines())  # the first chunk: the request is admitted and waiting for the model
        assert service.admitted == 2
        refused = httpx.post(f"{base}/v1/chat/completions", json={**payload, "stream": False}, timeout=60)
        assert refused.status_code == 429
        for stream in streams:  # clients disconnect mid-stream
            stream.__exit__(None, None, None)
    finally:
        service.lock.release()
    deadline = time.time() + 60
    while service.admitted and time.time() < deadline:
        time.sleep(0.1)
    assert service.admitted == 0
    ok = httpx.post(f"{base}/v1/chat/completions", json={**payload, "stream": False, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize("route, payload", [("/", {"prompt": "3 加 4 等于几？", "history": [], "temperature": 0}),
                                            ("/v1/chat/completions",
                                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})])
def test_json_sent_as_curl_sends_it_without_a_content_type_is_answered_as_json(loaded, route, payload):
    """`curl URL -d '{...}'` (the README's commands) labels the body application/x-www-form-urlencoded."""
    client = make_client(loaded)
    as_json = client.post(route, json=payload).json()
    response = client.post(route, content=json.dumps(payload).encode(),
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    key = "response" if route == "/" else "choices"
    assert response.json()[key] == as_json[key]
    not_json = client.post(route, content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert 400 <= not_json.status_code < 500


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readmes_curl_command_works(server):
    url, _ = server
    done = subprocess.run(["curl", "-s", f"{url}/", "-d", '{"prompt": "3 加 4 等于几？", "history": [], "temperature": 0}'],
                          capture_output=True, text=True, timeout=60)
    body = json.loads(done.stdout)
    assert body["status"] == 200 and body["history"][0][0] == "3 加 4 等于几？"
