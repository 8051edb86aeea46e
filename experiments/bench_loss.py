#!/usr/bin/env python
"""The loss at the Llama-2-7B head shape: `trainer.cross_entropy=fused` against `logits`, side by side in one run.

One micro-batch's LM head + cross-entropy, forward and backward, at hidden 4096 and vocab 32,000 (Llama-2-7B's
head), fp32 on CPU, `--tokens` positions (default 4096: one packed row of the recipe, a quarter of its micro-batch; the
logits scale linearly with it):

* `logits` (`trainer.cross_entropy=logits`, the plain path): logits = hidden @ W.T for every position, then
  `llama2_sft.loss.summed_cross_entropy` (fp32 chunks of 4096 positions), backward through both;
* `fused` (`trainer.cross_entropy=fused`, the default): `llama2_sft.loss.linear_cross_entropy` with
  `trainer.ce_chunk_size` 2048 and `--chunk` (default 512): supervised positions only, head + loss a chunk at a time,
  gradients in the same pass.

For each supervised share (`--shares`, default 1.0 = every position supervised, the worst case for `fused`, and 0.3,
about what SFT rows with prompts have; the embedded data has 19%), each method runs in a fresh process (so peak RSS
belongs to it alone): peak RSS growth over the inputs (the step's peak RSS, VmHWM reset just before it, minus RSS
before it) and the step's
wall time. The two methods' loss and gradients are compared (max relative difference) in the same run. Repetitions
alternate the method order; tables give medians. Results next to this script: bench_loss.md, bench_loss.png,
bench_loss.json.

    python experiments/bench_loss.py                 # ~6 min on 2 cores
    python experiments/bench_loss.py --tokens 2048 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

HIDDEN, VOCAB = (int(x) for x in os.environ.get("BENCH_LOSS_SHAPE", "4096,32000").split(","))  # a toy shape in tests
METHODS = ("logits", "fused")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so the next peak is the step's own."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def problem(tokens: int, share: float, seed: int = 0):
    import torch

    from llama2_sft.data.chat import IGNORE_INDEX

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=gen).mul_(0.5).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).mul_(0.01).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), generator=gen)
    targets[torch.rand(tokens, generator=gen) >= share] = IGNORE_INDEX
    return hidden, weight, targets


def step(method: str, hidden, weight, targets, chunk: int):
    from llama2_sft.loss import linear_cross_entropy, summed_cross_entropy

    if method == "logits":
        loss = summed_cross_entropy(hidden @ weight.t(), targets)
    else:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    loss.backward()
    return loss


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    hidden, weight, targets = problem(args.tokens, args.share)
    step(args.worker, hidden[:64].detach().requires_grad_(), weight, targets[:64], args.chunk)  # warm the kernels
    weight.grad = None
    before = rss_mb()
    reset_peak_rss()
    started = time.perf_counter()
    loss = step(args.worker, hidden, weight, targets, args.chunk)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    out = {"method": args.worker, "seconds": seconds, "peak_growth_mb": peak - before, "loss": loss.item()}
    if args.save_grads:
        torch.save({"loss": loss.detach(), "hidden": hidden.grad, "weight": weight.grad}, args.save_grads)
    print(json.dumps(out))
    return 0


def run_one(method: str, tokens: int, share: float, chunk: int, threads: int, save: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--tokens", str(tokens), "--share",
           str(share), "--chunk", str(chunk), "--threads", str(threads)]
    if save:
        cmd += ["--save-grads", save]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(tokens: int, share: float, chunk: int, threads: int, tmp: Path) -> dict:
    import torch

    paths = {m: tmp / f"grads-{m}-{share}.pt" for m in METHODS}
    for m in METHODS:
        run_one(m, tokens, share, chunk, threads, str(paths[m]))
    a, b = (torch.load(paths[m]) for m in METHODS)
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))  # noqa: E731
    return {"loss": rel(b["loss"], a["loss"]), "grad_hidden": rel(b["hidden"], a["hidden"]),
            "grad_weight": rel(b["weight"], a["weight"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--shares", default="1.0,0.3", help="comma-separated supervised shares")
    parser.add_argument("--chunk", type=int, default=512, help="fused chunk (positions)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "bench_loss"))
    parser.add_argument("--worker", choices=METHODS)
    parser.add_argument("--share", type=float, default=1.0)
    parser.add_argument("--save-grads")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import tempfile

    started = time.time()
    shares = [float(x) for x in args.shares.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for share in shares:
            runs = {m: [] for m in METHODS}
            for rep in range(args.reps):
                order = METHODS if rep % 2 == 0 else METHODS[::-1]
                for m in order:
                    r = run_one(m, args.tokens, share, args.chunk, args.threads)
                    runs[m].append(r)
                    print(f"share {share} rep {rep} {m:7s} {r['seconds']:.2f} s, peak +{r['peak_growth_mb']:.0f} MB", file=sys.stderr)
            results[str(share)] = {
                "runs": runs,
                "median_seconds": {m: statistics.median(r["seconds"] for r in runs[m]) for m in METHODS},
                "median_peak_growth_mb": {m: statistics.median(r["peak_growth_mb"] for r in runs[m]) for m in METHODS},
                "agreement": agreement(args.tokens, share, args.chunk, args.threads, Path(tmp)),
            }
    out = {"args": vars(args), "hidden": HIDDEN, "vocab": VOCAB, "results": results, "runtime_s": time.time() - started,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    prefix = Path(args.out)
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    write_md(prefix, out)
    write_png(prefix, out)
    print(prefix.with_suffix(".md").read_text())
    return 0


def write_md(prefix: Path, out: dict) -> None:
    import torch

    args = out["args"]
    logits_mb = args["tokens"] * VOCAB * 4 / 2**20
    lines = [
        "# The loss at the Llama-2-7B head shape: fused vs logits", "",
        "Generated by `experiments/bench_loss.py`; do not edit by hand. Raw figures: `bench_loss.json`; chart: `bench_loss.png`.", "",
        "```bash", "python experiments/bench_loss.py", "```", "",
        "![bench_loss.png](bench_loss.png)", "",
        f"- Machine: {out['machine']}; Python {out['python']}, torch {torch.__version__}; {args['threads']} threads; fp32.",
        f"- One micro-batch: {args['tokens']:,} positions, hidden {HIDDEN}, vocab {VOCAB:,} (its fp32 logits alone: "
        f"{logits_mb:,.0f} MB; at the recipe's 4 x 4096 positions in bf16: 1,000 MB, and as much again for their gradient).",
        f"- `fused` chunk: {args['chunk']} positions. Each run in a fresh process; {args['reps']} alternating repetitions, medians.",
        f"- Runtime: {out['runtime_s'] / 60:.1f} min.", "",
        "| supervised share | method | step s (fwd + bwd) | peak RSS growth MB | fused / logits time | fused / logits memory | max rel. diff loss / grad hidden / grad weight |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for share, r in out["results"].items():
        s, m, ag = r["median_seconds"], r["median_peak_growth_mb"], r["agreement"]
        for method in METHODS:
            ratio_t = f"{s['fused'] / s['logits']:.2f}x" if method == "fused" else ""
            ratio_m = f"{m['fused'] / m['logits']:.2f}x" if method == "fused" else ""
            agree = f"{ag['loss']:.1e} / {ag['grad_hidden']:.1e} / {ag['grad_weight']:.1e}" if method == "fused" else ""
            lines.append(f"| {float(share):.0%} | {method} | {s[method]:.2f} | {m[method]:,.0f} | {ratio_t} | {ratio_m} | {agree} |")
    lines += ["", "Peak RSS growth counts everything the step allocates beyond its inputs: for `logits` the logits, "
              "their fp32 softmax and their gradient; for `fused` one chunk's worth of those plus the gradient buffers "
              "of the hidden states and the head weight (the latter 500 MB in fp32 at this shape, the floor of both).", ""]
    prefix.with_suffix(".md").write_text("\n".join(lines))


def write_png(prefix: Path, out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = list(out["results"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.38
    for ax, key, title in ((axes[0], "median_seconds", "step seconds (lower is better)"),
                           (axes[1], "median_peak_growth_mb", "peak RSS growth, MB (lower is better)")):
        for i, method in enumerate(METHODS):
            values = [out["results"][s][key][method] for s in shares]
            xs = [j + (i - 0.5) * width for j in range(len(shares))]
            ax.bar(xs, values, width, label=method)
        ax.set_xticks(range(len(shares)), [f"{float(s):.0%} supervised" for s in shares])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"LM head + CE, fwd+bwd, {out['args']['tokens']} x {HIDDEN} -> {VOCAB} (fp32, CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
