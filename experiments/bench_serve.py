#!/usr/bin/env python
"""Latency of the serving API on a checkpoint, on CPU: time to the first streamed token and decode tokens/s.

Starts the package's server (`python -m llama2_sft.serve ckpt=... port=...`, as the README does) on 127.0.0.1 in a
child process, sends one warm-up and then `--requests` streamed /v1/chat/completions requests one at a time
(temperature 1, so replies run to max_tokens or EOS), and stops it.

    python experiments/bench_serve.py                    # outputs/embedded (train it first: python train.py)
    python experiments/bench_serve.py --ckpt PATH --quick
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import HERE, ROOT, child_env, command_line, fmt, machine_info, median, write_results

PROMPTS = ["3 加 4 等于几？", "Reverse the letters: a b c", "Write cat in uppercase.", "37 后面的数是几？"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_one(client, url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streamed request: seconds to the first content chunk, total seconds, completion tokens."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 1.0,
            "seed": seed, "stream": True}
    started, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    total = time.perf_counter() - started
    first = total if first is None else first
    return {"first_token_s": first, "total_s": total, "tokens": tokens,
            "decode_tokens_per_s": (tokens - 1) / max(total - first, 1e-9) if tokens > 1 else None}


def plot(plt, out: dict):
    """Time to first token and decode rate of every request."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    requests = out["requests"]
    axes[0].bar(range(len(requests)), [1000 * r["first_token_s"] for r in requests])
    axes[0].set_title("time to first token (ms), per request", fontsize=9)
    axes[1].bar(range(len(requests)), [r["decode_tokens_per_s"] or 0 for r in requests])
    axes[1].set_title("decode tokens/s, per request", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="outputs/embedded", help="a checkpoint (or run directory) train.py wrote")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="3 requests of 16 tokens")
    parser.add_argument("--out", default=str(HERE / "bench_serve"), help="output prefix (.json / .md / .png)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens = 3, 16
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llama2_sft.serve", f"ckpt={args.ckpt}", f"port={port}"]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen(cmd, cwd=ROOT, env=child_env(2, cpu_only=True), stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client() as client:
            deadline = time.time() + 180
            while True:  # wait for the model to load
                if server.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server exited: {log.read()[-2000:]}")
                try:
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    raise SystemExit("the server did not come up within 180 s")
                time.sleep(0.2)
            stream_one(client, url, PROMPTS[0], args.max_tokens, seed=0)  # warm-up
            requests = [stream_one(client, url, PROMPTS[i % len(PROMPTS)], args.max_tokens, seed=i + 1)
                        for i in range(args.requests)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = {"command": command_line("bench_serve.py", argv), "machine": machine_info("torch"), "args": vars(args),
           "requests": requests}
    first = [1000 * r["first_token_s"] for r in requests]
    rates = [r["decode_tokens_per_s"] for r in requests if r["decode_tokens_per_s"]]
    rows = [["time to first token (ms)", fmt(median(first), ".1f"), fmt(min(first), ".1f"), fmt(max(first), ".1f")],
            ["decode tokens/s", fmt(median(rates), ".1f"), fmt(min(rates, default=None), ".1f"),
             fmt(max(rates, default=None), ".1f")]]
    title = f"Serving latency on CPU: `{args.ckpt}`, {args.requests} streamed requests of up to {args.max_tokens} tokens"
    write_results(Path(args.out), title, out, ["metric", "median", "min", "max"], rows, plot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
