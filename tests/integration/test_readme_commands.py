"""Every command of the README's Inference and Serving sections, run as typed through a real shell (bash), on a
short run of the embedded default instead of outputs/embedded and on free ports instead of 8000 / 7860 (and with a
short max_new_tokens for infer.py): nothing else is rewritten."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def section_commands(title: str) -> list[str]:
    """The lines of the first ```bash block under `## title`, without their trailing comments."""
    text = README.read_text(encoding="utf-8")
    assert f"\n## {title}\n" in text, f"README.md has no '## {title}' section"
    body = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    block = body.split("```bash\n", 1)[1].split("```", 1)[0]
    return [re.sub(r"\s+# .*$", "", line) for line in block.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shell(command: str, stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def start(command: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_listening(process: subprocess.Popen, url: str, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url}: the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url}: nothing listening after {timeout} s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A run of the embedded default, cut to 2 steps: what outputs/embedded is, minus the training."""
    out = tmp_path_factory.mktemp("readme") / "embedded"
    done = shell(f"python train.py output_dir={out} trainer.max_steps=2 trainer.eval_steps=0 trainer.accuracy_samples=0 "
                 f"dataset.cache_dir={out.parent / 'cache'}")
    assert done.returncode == 0, done.stderr[-3000:]
    return str(out)


def test_the_sections_hold_the_commands_this_module_runs():
    infer, serve = section_commands("Inference"), section_commands("Serving")
    assert len(infer) == 4 and all(line.startswith("python infer.py ckpt=outputs/embedded") for line in infer)
    assert [line.split()[0] for line in serve] == ["python", "curl", "curl", "python"]


def test_inference_commands(tiny_checkpoint, tmp_path):
    commands = [line.replace("ckpt=outputs/embedded", f"ckpt={tiny_checkpoint}") + " max_new_tokens=4 device=cpu"
                for line in section_commands("Inference")]
    one_answer, with_spaces, chat, batch = commands

    done = shell(one_answer)
    assert done.returncode == 0, done.stderr
    done = shell(one_answer + " --cfg job")  # the prompt as the model gets it
    assert done.returncode == 0 and "prompt: 把“花”重复三遍。" in done.stdout, done.stdout + done.stderr
    done = shell(with_spaces + " --cfg job")
    assert done.returncode == 0 and "prompt: 'Reverse the letters: a b c'" in done.stdout, done.stdout + done.stderr
    done = shell(with_spaces)
    assert done.returncode == 0, done.stderr

    done = shell(chat, stdin="你好\n/reset\n/system You are terse.\nhi\n/exit\n")
    assert done.returncode == 0, done.stderr

    questions = tmp_path / "questions.jsonl"
    rows = [{"prompt": "3 加 4 等于几？"}, {"messages": [{"role": "user", "content": "hi"}]}]
    questions.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    batch = batch.replace("input=questions.jsonl", f"input={questions}")
    batch = batch.replace("output=answers.jsonl", f"output={tmp_path / 'answers.jsonl'}")
    done = shell(batch)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(answers) == len(rows)


def test_serving_commands(tiny_checkpoint, tmp_path):
    serve, curl_original, curl_openai, demo = section_commands("Serving")
    api_port, demo_port = free_port(), free_port()
    assert "port=8000" in serve and "localhost:8000/" in curl_original and "localhost:8000/" in curl_openai
    serve = serve.replace("ckpt=outputs/embedded", f"ckpt={tiny_checkpoint}").replace("port=8000", f"port={api_port}")
    demo = demo.replace("ckpt=outputs/embedded", f"ckpt={tiny_checkpoint}") + f" port={demo_port}"
    servers = [(start(serve, tmp_path / "serve.log"), f"http://127.0.0.1:{api_port}/health", tmp_path / "serve.log"),
               (start(demo, tmp_path / "demo.log"), f"http://127.0.0.1:{demo_port}/", tmp_path / "demo.log")]
    try:
        for process, url, log in servers:
            wait_listening(process, url, log)

        done = shell(curl_original.replace("localhost:8000", f"localhost:{api_port}"))
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert body.get("status") == 200, body
        assert body["history"][0][0] == "3 加 4 等于几？"
        assert body["history"][0][1] == body["response"]

        done = shell(curl_openai.replace("localhost:8000", f"localhost:{api_port}"))
        assert done.returncode == 0, done.stderr
        events = [line[len("data: "):] for line in done.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 2, done.stdout
        assert json.loads(events[0])["object"] == "chat.completion.chunk"
    finally:
        for process, _, _ in servers:
            stop(process)
