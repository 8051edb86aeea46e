"""The Gradio demo, driven over HTTP with gradio_client: every slider reaches its own generation parameter, answers
are exactly `generate_reply`'s for the same prompt, they stream, retry / undo / clear edit the history, Stop frees the model, and
`python -m llama2_sft.serve.demo` serves a checkpoint with the training system prompt."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from llama2_sft.data.chat import DEFAULT_SYSTEM_PROMPT, generation_prompt  # noqa: E402
from llama2_sft.inference.chat import ChatGenerator  # noqa: E402
from llama2_sft.inference.generate import SamplingConfig, generate_reply  # noqa: E402
from llama2_sft.serve import demo as demo_module  # noqa: E402

pytestmark = pytest.mark.slow

SYSTEM = "Be brief."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_port_free(port: int) -> None:
    """Nothing listens on `port` any more (TIME_WAIT leftovers of closed connections are fine)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def last_answer(history: list[dict]) -> str:
    assert history and history[-1]["role"] == "assistant", history
    return demo_module.message_text(history[-1]["content"])


def plain(history: list[dict]) -> list[tuple[str, str]]:
    return [(message["role"], demo_module.message_text(message["content"])) for message in history]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from llama2_sft.inference.load import load_model

    return load_model(tiny_checkpoint, "cpu", "fp32")


CLI_TEST = "test_command_line_serves_the_checkpoint"


@pytest.fixture(scope="module")
def cli_demo(request, tiny_checkpoint, tmp_path_factory):
    """`python -m llama2_sft.serve.demo` on a free port, started before the in-process tests so that its imports
    (torch, transformers, gradio: most of its start-up) overlap with them; terminated at the end of the module."""
    if not any(item.name == CLI_TEST for item in request.session.items):
        yield None
        return
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo_cli") / "demo.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=REPO)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "llama2_sft.serve.demo", f"ckpt={tiny_checkpoint}",
                                    f"port={port}", "device=cpu", "dtype=fp32"], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield {"process": process, "port": port, "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert_port_free(port)


@pytest.fixture(scope="module")
def served(loaded, cli_demo):
    """The demo on a free localhost port in this process (so tests can watch its generations); closed afterwards."""
    from llama2_sft.inference.load import system_prompt_setting

    demo = demo_module.build_demo(loaded, system_prompt_setting(loaded, "default"))
    port = free_port()
    while cli_demo is not None and port == cli_demo["port"]:  # that one is reserved for the subprocess
        port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, verbose=False, analytics_enabled=False)
    try:
        yield {"client": client, "url": url, "demo": demo, "port": port}
    finally:
        client.close()
        demo.close()
        assert_port_free(port)  # the server is really gone


@pytest.fixture
def calls(monkeypatch):
    """Every generation the demo makes: its messages, SamplingConfig, streamed pieces and result (or error)."""
    records: list[dict] = []
    real = ChatGenerator.complete

    def recording(self, prompt, sampling, *, seed=None, on_text=None):
        record = {"messages": copy.deepcopy(prompt.messages), "sampling": copy.deepcopy(sampling), "pieces": 0}
        records.append(record)

        def counting(piece):
            record["pieces"] += 1
            on_text(piece)

        try:
            record["result"] = real(self, prompt, sampling, seed=seed, on_text=counting if on_text is not None else None)
        except BaseException as error:
            record["error"] = error
            raise
        return record["result"]

    monkeypatch.setattr(ChatGenerator, "complete", recording)
    return records


def direct(loaded, messages, max_new_tokens, temperature=0.0, top_p=1.0) -> dict:
    """The reference answer: the same prompt straight through `generate_reply`, not through the demo's generator."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return generate_reply(loaded.model, loaded.tokenizer, generation_prompt(loaded.tokenizer, messages), sampling,
                          next(loaded.model.parameters()).device)


def chat(client, message, history, system, temperature, top_p, max_new_tokens):
    textbox, history = client.predict(message, history, system, temperature, top_p, max_new_tokens, api_name="/chat")
    assert textbox == ""
    return history


def test_each_control_feeds_its_own_parameter(served):
    import httpx

    api = served["client"].view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/chat", "/retry", "/undo", "/clear"} <= set(api)
    expected = {"message": ("Message", "Textbox"), "history": ("Chat", "Chatbot"),
                "system": ("System prompt", "Textbox"), "temperature": ("Temperature", "Slider"),
                "top_p": ("Top-p", "Slider"), "max_new_tokens": ("Max new tokens", "Slider")}
    for endpoint, names in (("/chat", list(expected)), ("/retry", list(expected)[1:])):
        parameters = api[endpoint]["parameters"]
        assert [p["parameter_name"] for p in parameters] == names
        for p in parameters:  # the component behind each argument is the one labelled for it
            assert (p["label"], p["component"]) == expected[p["parameter_name"]], (endpoint, p["parameter_name"])
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in api["/chat"]["parameters"]}
    assert defaults["system"] == DEFAULT_SYSTEM_PROMPT  # a plain HF dir trained with Meta's default prompt
    assert defaults["temperature"] == demo_module.DEFAULT_TEMPERATURE and defaults["top_p"] == demo_module.DEFAULT_TOP_P

    config = httpx.get(served["url"] + "config", timeout=10).json()
    sliders = {c["props"]["label"]: c["props"] for c in config["components"] if c["type"] == "slider"}
    assert (sliders["Temperature"]["minimum"], sliders["Temperature"]["maximum"]) == (0, 2)
    assert (sliders["Top-p"]["minimum"], sliders["Top-p"]["maximum"]) == (0, 1)
    assert (sliders["Max new tokens"]["minimum"], sliders["Max new tokens"]["maximum"]) == (1, 256)  # model context

    # The server enforces each slider's range on its argument: top-p 1.5 is refused (and temperature 1.5, sent in
    # test_sampling_sliders_reach_generate, would be refused if that argument were wired to the top-p slider).
    with pytest.raises(AppError):
        chat(served["client"], "hi", [], SYSTEM, 0.5, 1.5, 4)


def test_greedy_answers_are_the_direct_reply_with_the_same_settings(served, loaded, calls):
    client = served["client"]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "3 加 4 等于几？"}]
    answers = {}
    for max_new_tokens in (4, 12):
        history = chat(client, "3 加 4 等于几？", [], SYSTEM, 0.0, 0.35, max_new_tokens)
        expected = direct(loaded, messages, max_new_tokens)
        assert expected["completion_tokens"] == max_new_tokens  # the tiny random model never stops early here
        assert plain(history) == [("user", "3 加 4 等于几？"), ("assistant", expected["text"])]
        assert calls[-1]["messages"] == messages
        assert calls[-1]["sampling"] == SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_p=0.35)
        answers[max_new_tokens] = expected["text"]
    assert len(answers[4]) < len(answers[12])
    again = chat(client, "3 加 4 等于几？", [], SYSTEM, 0.0, 0.35, 12)  # greedy: the same answer every time
    assert last_answer(again) == answers[12]

    chat(client, "hi", [], "", 0.0, 1.0, 3)  # an empty system prompt sends no system message
    assert calls[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_sampling_sliders_reach_generate(served, loaded, calls, monkeypatch):
    seen: list[dict] = []
    real_generate = loaded.model.generate

    def generate(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("do_sample", "temperature", "top_p", "max_new_tokens")})
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", generate)
    history = chat(served["client"], "Tell me a story", [], SYSTEM, 1.5, 0.35, 6)
    assert calls[-1]["sampling"] == SamplingConfig(max_new_tokens=6, temperature=1.5, top_p=0.35)
    assert seen == [{"do_sample": True, "temperature": 1.5, "top_p": 0.35, "max_new_tokens": 6}]
    assert last_answer(history) == calls[-1]["result"]["text"]


def test_multi_turn_retry_undo_and_clear(served, loaded, calls):
    client = served["client"]
    first = chat(client, "3 加 4 等于几？", [], SYSTEM, 0.0, 1.0, 6)
    second = chat(client, "and  5 + 5?", first, SYSTEM, 0.0, 1.0, 6)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "3 加 4 等于几？"},
                {"role": "assistant", "content": last_answer(first)}, {"role": "user", "content": "and  5 + 5?"}]
    assert calls[-1]["messages"] == messages  # history -> system + alternating user / assistant
    assert plain(second) == [(m["role"], m["content"]) for m in messages[1:]] + [
        ("assistant", direct(loaded, messages, 6)["text"])]

    retried = client.predict(second, SYSTEM, 0.0, 1.0, 6, api_name="/retry")
    assert calls[-1]["messages"] == messages  # the last answer is dropped, not fed back
    assert plain(retried) == plain(second)  # greedy: regenerated identically
    shorter = client.predict(second, SYSTEM, 0.0, 1.0, 3, api_name="/retry")  # retry uses the current sliders
    assert plain(shorter)[:-1] == plain(second)[:-1]
    assert last_answer(shorter) == direct(loaded, messages, 3)["text"] != last_answer(second)

    history, textbox = client.predict(second, api_name="/undo")
    assert plain(history) == plain(first) and textbox == "and  5 + 5?"
    assert client.predict(api_name="/clear") == ([], "")


def test_answers_stream(served, loaded):
    job = served["client"].submit("Tell me a story", [], SYSTEM, 0.0, 1.0, 24, api_name="/chat")
    _, history = job.result(timeout=60)
    partials = [last_answer(h) for _, h in job.outputs() if h and h[-1]["role"] == "assistant"]
    growing = [text for i, text in enumerate(partials) if i == 0 or text != partials[i - 1]]
    assert len(growing) >= 5, partials  # piece by piece, not one final message
    for before, after in zip(growing[:-2], growing[1:-1]):
        assert after.startswith(before)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story"}]
    assert last_answer(history) == direct(loaded, messages, 24)["text"]


def test_stop_aborts_the_generation_and_frees_the_model(served, loaded, calls):
    generator = ChatGenerator(loaded)
    stream = demo_module.stream_reply(generator, [{"role": "user", "content": "Tell me a story"}], None,
                                      SamplingConfig(max_new_tokens=200))
    assert next(stream)
    stream.close()  # what gradio does on Stop / Clear / a closed tab
    assert generator.lock.acquire(timeout=20)
    generator.lock.release()
    assert "error" in calls[-1] and calls[-1]["pieces"] < 100  # aborted at the next token, not run to 200

    # Through the server: cancel a long answer, and the next request is answered normally.
    client = served["client"]
    job = client.submit("Tell me a story", [], SYSTEM, 0.0, 1.0, 256, api_name="/chat")
    deadline = time.monotonic() + 30
    while not any(h and h[-1]["role"] == "assistant" for _, h in job.outputs()):
        assert time.monotonic() < deadline, "no streamed output"
        time.sleep(0.02)
    job.cancel()
    history = chat(client, "hi", [], SYSTEM, 0.0, 1.0, 3)
    assert last_answer(history) == direct(loaded, [{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": "hi"}], 3)["text"]
    long_call = next(c for c in calls if c["sampling"].max_new_tokens == 256)
    assert "error" in long_call and long_call["pieces"] < 200


def test_command_line_serves_the_checkpoint(cli_demo, loaded):
    process, port = cli_demo["process"], cli_demo["port"]
    deadline = time.monotonic() + 150
    while True:
        assert process.poll() is None, cli_demo["log"].read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "the demo did not start listening"
            time.sleep(0.25)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)
    try:  # the system prompt and top-p are left at their defaults: the training system prompt
        _, history = client.predict(message="Hello", temperature=0.0, max_new_tokens=8, api_name="/chat")
    finally:
        client.close()
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "Hello"}]
    assert last_answer(history) == direct(loaded, messages, 8)["text"]
    assert "127.0.0.1:%d" % port in cli_demo["log"].read_text()  # bound to localhost by default
