"""CPU latency of the serving API on a checkpoint: time to first streamed token and decode tokens/s.

    python experiments/bench_serve.py ckpt=outputs/embedded [requests=10] [max_tokens=64]

Runs a real uvicorn server on 127.0.0.1 in this process and streams /v1/chat/completions requests (temperature 1,
so replies run to max_tokens or EOS); writes bench_serve.md next to this script.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import threading
import time


def main(argv: list[str]) -> None:
    import httpx
    import uvicorn

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from llama2_sft.consolidate import load_model
    from llama2_sft.serve.api import ServeSettings, create_app

    options = dict(arg.split("=", 1) for arg in argv)
    loaded = load_model(options["ckpt"], "cpu", "fp32")
    requests, max_tokens = int(options.get("requests", 10)), int(options.get("max_tokens", 64))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, ServeSettings()), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    prompts = ["3 加 4 等于几？", "Reverse the letters: a b c", "Write cat in uppercase.", "37 后面的数是几？"]
    first_token, rates = [], []
    for index in range(requests + 1):
        body = {"messages": [{"role": "user", "content": prompts[index % len(prompts)]}], "max_tokens": max_tokens,
                "temperature": 1.0, "seed": index, "stream": True}
        started = time.perf_counter()
        first = None
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        total = time.perf_counter() - started
        if index == 0:
            continue  # warm-up
        first_token.append(first if first is not None else total)
        if tokens > 1 and first is not None:
            rates.append((tokens - 1) / max(total - first, 1e-9))
    server.should_exit = True
    params = sum(p.numel() for p in loaded.model.parameters())
    table = (f"# Serving latency (CPU)\n\nCheckpoint `{options['ckpt']}` ({params:,} parameters, fp32), {requests} streamed "
             f"requests after one warm-up, max_tokens={max_tokens}, one request at a time, 127.0.0.1.\n\n"
             "| metric | median | min | max |\n|---|---:|---:|---:|\n"
             f"| time to first token (ms) | {1000 * statistics.median(first_token):.1f} | {1000 * min(first_token):.1f} | {1000 * max(first_token):.1f} |\n"
             f"| decode tokens/s | {statistics.median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} |\n\n"
             f"Reproduce: `python experiments/bench_serve.py ckpt={options['ckpt']} requests={requests} max_tokens={max_tokens}`\n")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_serve.md"), "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
