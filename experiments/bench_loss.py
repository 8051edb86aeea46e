#!/usr/bin/env python
"""The loss at the Llama-2-7B head shape: `trainer.cross_entropy=fused` against `logits`, side by side in one run.

One micro-batch's LM head + cross-entropy, forward and backward, hidden 4096 x vocab 32,000 (Llama-2-7B's head), fp32
on CPU, `--tokens` positions (4096: one packed row of the recipe):

* `logits`: hidden @ W.T for every position, then `llama2_sft.loss.summed_cross_entropy`;
* `fused` (the default): `llama2_sft.loss.linear_cross_entropy`, supervised positions only, head + loss a chunk of
  `--chunk` positions at a time, gradients in the same pass.

For each supervised share (`--shares`: 100%, the worst case for `fused`, and 30%, about SFT rows with prompts) each
method runs in a fresh process, so the peak RSS is its own: peak RSS growth over the inputs (VmHWM reset just before
the step) and the step's wall time. Repetitions alternate the order; the table gives medians. The first repetition's
loss and gradients of the two methods are compared (max relative difference).

    python experiments/bench_loss.py           # ~6 min on 2 cores
    python experiments/bench_loss.py --quick   # 128 positions, one repetition: under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import HERE, ROOT, command_line, fmt, machine_info, median, write_results

METHODS = ("logits", "fused")


def worker(args: argparse.Namespace) -> None:
    """One method, one step, in this (fresh) process; prints its figures as JSON."""
    import torch

    from llama2_sft.data.chat import IGNORE_INDEX
    from llama2_sft.loss import linear_cross_entropy, summed_cross_entropy

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)  # the same problem in every process
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).mul_(0.5).requires_grad_()
    weight = torch.randn(args.vocab, args.hidden, generator=gen).mul_(0.01).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    targets[torch.rand(args.tokens, generator=gen) >= args.share] = IGNORE_INDEX

    def step(h, t):
        if args.worker == "logits":
            loss = summed_cross_entropy(h @ weight.t(), t)
        else:
            loss = linear_cross_entropy(h, weight, t, chunk_size=args.chunk)
        loss.backward()
        return loss

    step(hidden[:64].detach().requires_grad_(), targets[:64])  # warm the kernels
    weight.grad = None
    with open("/proc/self/statm") as handle:
        before_mb = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # Linux: resets the peak RSS (VmHWM), so the next peak is the step's own
    started = time.perf_counter()
    loss = step(hidden, targets)
    seconds = time.perf_counter() - started
    with open("/proc/self/status") as handle:
        peak_mb = next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:"))
    if args.save_grads:
        torch.save({"loss": loss.detach(), "hidden": hidden.grad, "weight": weight.grad}, args.save_grads)
    print(json.dumps({"seconds": seconds, "peak_growth_mb": peak_mb - before_mb, "loss": loss.item()}))


def run_one(args: argparse.Namespace, method: str, share: float, save: str | None) -> dict:
    """One method in a fresh process (so its peak RSS is its own); its figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--share", str(share), "--tokens",
           str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk),
           "--threads", str(args.threads)] + (["--save-grads", save] if save else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(paths: dict[str, str]) -> dict:
    """Max relative difference of fused against logits: loss, gradient of the hidden states, of the head weight."""
    import torch

    a, b = (torch.load(paths[m]) for m in METHODS)
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))  # noqa: E731
    return {key: rel(b[key], a[key]) for key in ("loss", "hidden", "weight")}


def plot(plt, out: dict):
    """Step time and peak memory of both methods per supervised share."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    shares = list(out["results"])
    for ax, key, title in ((axes[0], "seconds", "step seconds (lower is better)"),
                           (axes[1], "peak_growth_mb", "peak RSS growth, MB (lower is better)")):
        for i, method in enumerate(METHODS):
            values = [out["results"][s]["median"][method][key] for s in shares]
            ax.bar([j + (i - 0.5) * 0.38 for j in range(len(shares))], values, 0.38, label=method)
        ax.set_xticks(range(len(shares)), [f"{float(s):.0%} supervised" for s in shares])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"LM head + CE, fwd+bwd, {out['args']['tokens']} x {out['args']['hidden']} -> {out['args']['vocab']} "
                 "(fp32, CPU)", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shares", default="1.0,0.3", help="comma-separated supervised shares")
    parser.add_argument("--chunk", type=int, default=512, help="fused chunk (positions)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="128 positions, one repetition")
    parser.add_argument("--out", default=str(HERE / "bench_loss"), help="output prefix (.json / .md / .png)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--save-grads", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.tokens, args.reps = min(args.tokens, 128), 1

    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for share in (float(x) for x in args.shares.split(",")):
            runs = {m: [] for m in METHODS}
            saved = {m: f"{tmp}/grads-{m}-{share}.pt" for m in METHODS}
            for rep in range(args.reps):
                for method in METHODS if rep % 2 == 0 else METHODS[::-1]:
                    runs[method].append(run_one(args, method, share, saved[method] if rep == 0 else None))
                    print(f"share {share} rep {rep} {method}: {runs[method][-1]}", file=sys.stderr)
            results[str(share)] = {"runs": runs, "agreement": agreement(saved), "median": {
                m: {k: median(r[k] for r in runs[m]) for k in ("seconds", "peak_growth_mb")} for m in METHODS}}
    out = {"command": command_line("bench_loss.py", argv), "machine": machine_info("torch"), "args": vars(args),
           "results": results, "runtime_s": time.time() - started}
    header = ["supervised share", "method", "step s (fwd + bwd)", "peak RSS growth MB", "fused / logits time",
              "fused / logits memory", "max rel. diff loss / grad hidden / grad weight"]
    rows = []
    for share, r in results.items():
        m, ag = r["median"], r["agreement"]
        for method in METHODS:
            fused = method == "fused"
            rows.append([f"{float(share):.0%}", method, fmt(m[method]["seconds"], ".2f"), fmt(m[method]["peak_growth_mb"]),
                         f"{m['fused']['seconds'] / m['logits']['seconds']:.2f}x" if fused else "",
                         f"{m['fused']['peak_growth_mb'] / m['logits']['peak_growth_mb']:.2f}x" if fused else "",
                         f"{ag['loss']:.1e} / {ag['hidden']:.1e} / {ag['weight']:.1e}" if fused else ""])
    write_results(Path(args.out), f"The loss at the {args.hidden} x {args.vocab:,} head: fused vs logits", out, header,
                  rows, plot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
