"""The API under hostile input: 1,000+ generated malformed / adversarial requests and 32 concurrent clients.
No 5xx, every answer a 2xx / 4xx / 429, memory flat, slots freed."""

from __future__ import annotations

import gc
import json
import threading

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

ALLOWED = {200, 400, 401, 404, 405, 413, 422, 429}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "USER", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=30), st.integers(), st.none(),
                                                                              st.just("</s><s>[INST] <<SYS>>"))}), max_size=4)
chat_bodies = st.fixed_dictionaries(
    {"messages": messages},
    optional={"temperature": st.one_of(st.floats(-5, 5, allow_nan=False), st.text(max_size=3)),
              "top_p": st.floats(-1, 2, allow_nan=False), "max_tokens": st.integers(-5, 10**6),
              "stream": st.booleans(), "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
              "seed": st.integers(-1, 2**31)},
)
legacy_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=30), st.integers(), st.none())},
    optional={"history": st.one_of(st.lists(st.lists(st.text(max_size=8), max_size=3), max_size=3), json_values),
              "max_length": st.integers(-3, 10**6), "top_p": st.floats(-1, 2, allow_nan=False),
              "temperature": st.floats(-1, 3, allow_nan=False)},
)


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from llama2_sft.inference.load import load_model
    from llama2_sft.serve.api import ServeSettings, create_app

    loaded = load_model(tiny_checkpoint, "cpu", "fp32")
    app = create_app(loaded, ServeSettings(max_new_tokens_limit=3, default_max_new_tokens=2, max_queue=4))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


COUNTS = {"requests": 0}


def _check(response):
    COUNTS["requests"] += 1
    assert response.status_code in ALLOWED, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "error" in response.text or "detail" in response.text  # a message, not an empty body


@settings(max_examples=450, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=chat_bodies)
def test_generated_chat_requests_never_get_a_5xx(client, body):
    _check(client.post("/v1/chat/completions", json=body))


@settings(max_examples=350, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=legacy_bodies)
@example(body={"prompt": "0", "temperature": 9.920037932099873e-262})  # found by this test: overflowed sampling
def test_generated_legacy_requests_never_get_a_5xx(client, body):
    _check(client.post("/", json=body))


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.one_of(st.binary(max_size=60), json_values.map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/", "/v1/chat/completions", "/v1/models", "/health", "/nope"]))
def test_arbitrary_bytes_to_any_route_never_get_a_5xx(client, raw, path):
    _check(client.post(path, content=raw, headers={"content-type": "application/json"}))


def test_thousand_requests_were_fuzzed_and_memory_stayed_flat(client):
    """Runs after the fuzz tests in this module: counts them, then measures memory over 300 more requests."""
    process = psutil.Process()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(50):  # warm up allocator and caches
        client.post("/v1/chat/completions", json=body)
    gc.collect()
    before = process.memory_info().rss
    for index in range(300):
        _check(client.post("/v1/chat/completions", json=body if index % 2 else {"messages": [{"role": "bot"}]}))
    gc.collect()
    grown = (process.memory_info().rss - before) / 2**20
    print(f"fuzzed {COUNTS['requests']} requests; RSS grew {grown:.1f} MiB over 300 requests")
    assert COUNTS["requests"] >= 1000
    assert grown < 50


def test_32_concurrent_clients_get_answers_or_429_and_every_slot_is_freed(client):
    results: list[int] = []
    lock = threading.Lock()

    def worker():
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "count"}],
                                                             "max_tokens": 3, "temperature": 1.0})
        with lock:
            results.append(response.status_code)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 32 and set(results) <= {200, 429}
    assert results.count(200) >= 4  # max_queue=4: at least the first four are served
    assert client.app.state.service.admitted == 0
