#!/usr/bin/env python
"""Data-pipeline benchmarks, ours against the reference approach, side by side in one run.

A. Tokenization throughput (conversations/s) on the same generated rows (`experiments/realistic_rows.py`):
   * ours, end to end: `llama2_sft.data.tokenize.prepare_dataset` (JSON -> Arrow -> batched encode -> truncation ->
     cache on disk) with num_proc=1 and num_proc=2, a fresh token cache *and* a fresh Hugging Face datasets cache per
     repetition, so every repetition really builds;
   * ours, encode step alone: `llama2_sft.data.encode_dialogs` over all dialogs in batches of 1000 (messages built
     beforehand), which separates tokenization cost from Arrow / IO overhead;
   * reference (the original project and most SFT repos): a SentencePiece tokenizer called one string at a time from
     Python, each turn's prompt and answer encoded separately, ids and labels built in Python lists, one sample at a
     time; once with `sentencepiece.SentencePieceProcessor.encode(str)` directly and once through the `transformers`
     Python slow path (`SentencePieceBackend`, `tokenizer(text)` per string).
   Reported: wall-clock rate, and the rate per CPU-second (user+system time of the process, its threads and its
   worker processes) = the per-core rate, which stays meaningful on a shared machine. Extrapolation: the full
   10,077,297-row set on 16 cores at the per-core rate (ideal scaling).
B. Token efficiency (real tokens / all tokens of the `input_ids` tensors) through the real `SFTLoader`, at
   max_length 512 and 4096: random pad-to-longest batches of 4 (reference), length-grouped batches, and packing
   (rows packed to max_length, micro-batches of 4 rows padded to their longest); plus the packing plan's fill.

Repetitions alternate (A: the methods in rotated order each repetition; B: one loader seed per repetition, modes
rotated); tables give medians. Results are written next to this script: bench_data.md, bench_data.png and
bench_data.json (raw figures).

Usage (defaults finish in a few minutes on 2 cores)::

    python experiments/bench_data.py
    python experiments/bench_data.py --rows 20000 --reps 5
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "assets"))

from llama2_sft.data import synthetic as realistic_rows  # noqa: E402
from bench_common import machine_info  # noqa: E402

FULL_ROWS = 10_077_297  # LinkSoul/instruction_merge_set
FULL_CORES = 16
GOAL_RATIO = 20.0
GOAL_PER_CORE = 1000.0
GOAL_PACKED = 0.97
IGNORE_INDEX = -100
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def resolve_tokenizer(choice: str) -> tuple[str, str]:
    """(directory, description): the real Llama-2 32k tokenizer if it can be built, else the project's tiny one."""
    if choice in ("auto", "real"):
        try:
            import make_llama2_tokenizer

            built = make_llama2_tokenizer.build()
        except Exception as error:  # noqa: BLE001 - fall back, and say so
            built = None
            print(f"real Llama-2 tokenizer unavailable: {error}", file=sys.stderr)
        if built is not None:
            return str(built), "real Llama-2 SentencePiece tokenizer (32,000 pieces, rebuilt by tests/assets/make_llama2_tokenizer.py)"
        if choice == "real":
            raise SystemExit("--tokenizer real: could not build the Llama-2 tokenizer (npm registry unreachable?)")
    return str(ROOT / "data" / "tokenizer"), "project tiny tokenizer data/tokenizer (1,024 pieces; token counts NOT realistic)"


# ---------------------------------------------------------------------------------------------------------------------
# Measurement


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # worker processes, once reaped
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(fn) -> tuple[float, float, object]:
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, _cpu_seconds() - cpu0, result


# ---------------------------------------------------------------------------------------------------------------------
# The reference approach: one sample at a time, one string per tokenizer call


def reference_row(encode, row: dict, system_prompt: str, bos: int, eos: int) -> tuple[list[int], list[int]]:
    """Llama-2 chat ids/labels of one row the way the original project (and most SFT repos) built them: per (user,
    assistant) turn, `encode(prompt)` and `encode(answer)`, one string per call, lists concatenated in Python."""
    conversations = row["conversations"]
    system = row["instruction"] if row["instruction"] and row["instruction"].strip() else system_prompt
    input_ids: list[int] = []
    labels: list[int] = []
    for k in range(0, len(conversations) - 1, 2):
        user, answer = conversations[k]["value"], conversations[k + 1]["value"]
        if k == 0 and system:
            user = B_SYS + system + E_SYS + user
        prompt_ids = encode(f"{B_INST} {user.strip()} {E_INST}")
        answer_ids = encode(f"{answer.strip()} ")
        input_ids += [bos] + prompt_ids + answer_ids + [eos]
        labels += [IGNORE_INDEX] * (1 + len(prompt_ids)) + answer_ids + [eos]
    return input_ids, labels


def reference_rows(encode, rows: list[dict], system_prompt: str, max_length: int, bos: int, eos: int) -> int:
    """The reference over `rows`, one sample at a time, each cut at max_length. Returns the number of tokens
    produced before the cut (comparable with encode_dialogs' output: a check that both did the same work)."""
    tokens = 0
    for row in rows:
        input_ids, labels = reference_row(encode, row, system_prompt, bos, eos)
        tokens += len(input_ids)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark A


class Throughput:
    def __init__(self, tok_dir: str, rows: list[dict], jsonl: str, work: Path, max_length: int, hf_slow: bool):
        import datasets
        import sentencepiece as spm
        from omegaconf import OmegaConf

        from llama2_sft.config import DatasetConfig
        from llama2_sft.data.sources import resolve_system_prompt, row_to_messages

        datasets.disable_progress_bars()
        logging.getLogger("llama2_sft").setLevel(logging.WARNING)
        self.datasets = datasets
        self.OmegaConf, self.DatasetConfig = OmegaConf, DatasetConfig
        self.tok_dir, self.rows, self.jsonl, self.work, self.max_length = tok_dir, rows, jsonl, work, max_length
        self.system_prompt = resolve_system_prompt("meta")
        self.messages = [row_to_messages(row, self.system_prompt)[0] for row in rows]
        assert all(m is not None for m in self.messages), "generator produced a row our pipeline skips"
        self.sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
        self.hf = None
        if hf_slow:
            from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

            # legacy=True: transformers 4.x LlamaTokenizer's default, ids identical to SentencePiece's.
            self.hf = SentencePieceBackend.from_pretrained(tok_dir, legacy=True)
        self.kept_cache: dict[int, str] = {}
        self.counter = 0

    def methods(self) -> dict:
        out = {
            "reference: sentencepiece, 1 string/call": self.ref_sp,
            "ours: encode_dialogs only (batches of 1000)": self.ours_encode,
            "ours: prepare_dataset num_proc=1": lambda: self.ours_prepare(1),
            "ours: prepare_dataset num_proc=2": lambda: self.ours_prepare(2),
        }
        if self.hf is not None:
            out = {"reference: transformers slow tokenizer(text)": self.ref_hf, **out}
        return out

    def ref_sp(self, rows=None) -> int:
        sp = self.sp
        return reference_rows(sp.encode, rows or self.rows, self.system_prompt, self.max_length, sp.bos_id(), sp.eos_id())

    def ref_hf(self, rows=None) -> int:
        tok = self.hf
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return reference_rows(encode, rows or self.rows, self.system_prompt, self.max_length, tok.bos_token_id, tok.eos_token_id)

    def ours_encode(self, messages=None) -> int:
        from llama2_sft.data import encode_dialogs

        messages = messages or self.messages
        tokens = 0
        for start in range(0, len(messages), 1000):
            tokens += sum(len(d) for d in encode_dialogs(self.tok_dir, messages[start: start + 1000]))
        return tokens

    def config(self, source: str, cache_dir: str, num_proc: int, max_length: int, max_skipped: float = 0.01):
        cfg = self.DatasetConfig(source=source, num_proc=num_proc, cache_dir=cache_dir, max_length=max_length,
                                 default_system="meta", max_skipped_fraction=max_skipped)
        return self.OmegaConf.structured(cfg)

    def ours_prepare(self, num_proc: int, source: str | None = None, max_length: int | None = None,
                     keep: bool = False, max_skipped: float = 0.01):
        """A cold build: fresh token cache and fresh HF datasets cache (the JSON -> Arrow conversion is redone)."""
        from llama2_sft.data.tokenize import prepare_dataset

        self.counter += 1
        run_dir = self.work / f"prep-{self.counter}"
        hf_cache = run_dir / "hf"
        hf_cache.mkdir(parents=True)
        saved = self.datasets.config.HF_DATASETS_CACHE
        self.datasets.config.HF_DATASETS_CACHE = hf_cache
        try:
            cfg = self.config(source or self.jsonl, str(run_dir / "tokens"), num_proc, max_length or self.max_length, max_skipped)
            prepared = prepare_dataset(cfg, self.tok_dir, self.tok_dir)
        finally:
            self.datasets.config.HF_DATASETS_CACHE = saved
        if keep:
            return prepared
        tokens = prepared.summary["splits"]["train"]["tokens"]
        del prepared
        shutil.rmtree(run_dir, ignore_errors=True)
        return tokens


def check_same_ids(bench: Throughput, count: int) -> tuple[int, int]:
    """How many of the first `count` rows get identical ids and labels from the reference and from ours."""
    from llama2_sft.data import encode_dialogs

    sp, same = bench.sp, 0
    ours = encode_dialogs(bench.tok_dir, bench.messages[:count])
    for row, mine in zip(bench.rows[:count], ours):
        ids, labels = reference_row(sp.encode, row, bench.system_prompt, sp.bos_id(), sp.eos_id())
        same += ids == mine.input_ids and labels == mine.labels
    return same, count


def encoded_characters(bench: Throughput) -> tuple[int, int]:
    """Characters handed to the tokenizer: ours as `encode_dialogs` splits them (prompt and "{answer} " per pair when
    the SentencePiece model splits at spaces, else prompt and prompt+answer) vs the reference (prompt, answer)."""
    from llama2_sft.data.chat import SentencePieceEncoder, dialog_strings

    splits = SentencePieceEncoder(os.path.join(bench.tok_dir, "tokenizer.model")).splits_at_spaces
    ours = reference = 0
    for messages in bench.messages:
        pairs, _ = dialog_strings(messages)
        split = splits and all(full[len(prompt) + 1:].strip() for prompt, full in pairs)
        for prompt, full in pairs:
            ours += len(prompt) + (len(full) - len(prompt) - 1 if split else len(full))
            reference += len(full) - 1  # prompt + answer + trailing space, without the separating space
    return ours, reference


def profile_encode_rows(bench: Throughput, count: int, top: int = 12) -> str:
    """cProfile of the package's batched map function (`encode_rows`) on `count` rows, sorted by own time."""
    from llama2_sft.data.chat import text_encoder
    from llama2_sft.data.tokenize import encode_rows

    rows = bench.rows[:count]
    encoder = text_encoder(bench.tok_dir)
    batches = [{key: [r[key] for r in rows[i: i + 1000]] for key in rows[0]} for i in range(0, len(rows), 1000)]
    profiler = cProfile.Profile()
    profiler.enable()
    for batch in batches:
        encode_rows(batch, encoder, bench.system_prompt, bench.max_length, "turns")
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
    stats.print_stats(top)
    text = stream.getvalue()
    text = text.replace(str(ROOT) + "/", "").replace(os.path.dirname(os.__file__) + "/site-packages/", "")
    lines = [line for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "function calls" in line), 0)
    return "\n".join(lines[start:])


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark B


def loader_efficiency(dataset, mode: str, max_length: int, seed: int, max_steps: int) -> dict:
    import numpy as np

    from llama2_sft.data.loader import BatchLayout, SFTLoader

    loader = SFTLoader(
        dataset, layout=BatchLayout(micro_batch_size=4, grad_accum_steps=1, world_size=1), rank=0, pad_id=0,
        seed=seed, packing=mode == "packing", max_length=max_length, group_by_length=mode == "length-grouped",
    )
    steps = min(loader.steps_per_epoch, max_steps) if max_steps > 0 else loader.steps_per_epoch
    real = total = 0
    started = time.perf_counter()
    for _ in range(steps):
        for batch in loader.next_step():
            real += batch["num_real_tokens"]
            total += batch["input_ids"].numel()
            if "attention_mask" in batch:  # padded batches: cross-check the loader's own count
                assert int(batch["attention_mask"].sum()) == batch["num_real_tokens"]
    seconds = time.perf_counter() - started
    plan = loader.plan
    out = {"real": real, "total": total, "efficiency": real / total, "steps": steps,
           "steps_per_epoch": loader.steps_per_epoch, "units": len(plan), "seconds": seconds}
    if mode == "packing":
        out["plan_fill"] = float(plan.unit_lengths.sum()) / (len(plan) * max_length)
        # No packer that keeps samples whole can beat this: samples longer than max_length / 2 need a row each.
        lengths = np.asarray(dataset.data.column("length").to_numpy(), dtype=np.int64)
        min_rows = max(-(-int(lengths.sum()) // max_length), int((lengths > max_length // 2).sum()))
        out["fill_bound"] = float(lengths.sum()) / (min_rows * max_length)
        out["samples_per_row"] = float(len(plan.items)) / len(plan)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Report


def median(values):
    return statistics.median(values)


def fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def write_png(path: Path, tput: dict, eff: dict, lengths: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.15, 1]})
    ax = axes[0]
    names = list(tput)
    cpu_rates = [tput[n]["cpu_rate"] for n in names]
    wall_rates = [tput[n]["wall_rate"] for n in names]
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], cpu_rates, height=0.4, color=["#999999" if n.startswith("reference") else "#1f77b4" for n in names],
            label="per CPU-second (= per core)")
    ax.barh([i - 0.2 for i in y], wall_rates, height=0.4, color="none", edgecolor="black", hatch="//", label="wall clock")
    for i, value in enumerate(cpu_rates):
        ax.text(value, i + 0.2, f" {value:,.0f}", va="center", fontsize=8)
    ax.axvline(GOAL_PER_CORE, color="red", ls="--", lw=1, label=f"goal {GOAL_PER_CORE:,.0f}/s per core")
    ax.set_yticks(list(y))
    ax.set_yticklabels([n.replace(": ", ":\n", 1) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("conversations / s (median)")
    ax.set_title("A. Tokenization throughput")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    modes = ["pad-to-longest (random)", "length-grouped", "packing"]
    width = 0.38
    for j, max_length in enumerate(sorted(eff)):
        values = [eff[max_length][m]["efficiency"] * 100 for m in modes]
        xs = [i + (j - 0.5) * width for i in range(len(modes))]
        bars = ax.bar(xs, values, width=width, label=f"max_length {max_length}")
        for x, v in zip(xs, values):
            ax.text(x, v + 0.8, f"{v:.1f}", ha="center", fontsize=8)
        del bars
    ax.axhline(GOAL_PACKED * 100, color="red", ls="--", lw=1, label=f"goal {GOAL_PACKED:.0%} (packing)")
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels(modes, fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel("real tokens / all tokens (%)")
    ax.set_title("B. Token efficiency, micro-batch 4 (median over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"llama2_sft data pipeline vs reference — {len(lengths):,} generated rows", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6000, help="generated rows (>= 2000 so num_proc=2 really forks)")
    parser.add_argument("--seed", type=int, default=0, help="row generator seed")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (>= 3 for a median)")
    parser.add_argument("--tokenizer", choices=("auto", "real", "tiny"), default="auto")
    parser.add_argument("--no-hf-slow", action="store_true", help="skip the transformers slow-tokenizer reference")
    parser.add_argument("--eff-max-steps", type=int, default=600, help="loader steps per efficiency run (0 = epoch)")
    parser.add_argument("--profile-rows", type=int, default=3000, help="rows for the cProfile of encode_rows (0 = skip)")
    parser.add_argument("--out-dir", default=str(HERE), help="where bench_data.{md,png,json} go")
    args = parser.parse_args(argv)
    if args.rows < 2000:
        parser.error("--rows must be >= 2000 (prepare_dataset only forks workers from 2000 rows)")

    run_started = time.perf_counter()
    load_before = os.getloadavg()
    command = "python experiments/bench_data.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    tok_dir, tok_desc = resolve_tokenizer(args.tokenizer)
    print(f"tokenizer: {tok_desc} at {tok_dir}", file=sys.stderr)

    rows = realistic_rows.generate(args.rows, args.seed)
    row_stats = realistic_rows.describe(rows)
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        jsonl = str(work / "rows.jsonl")
        realistic_rows.write_jsonl(rows, jsonl)
        warm_jsonl = str(work / "warm.jsonl")
        realistic_rows.write_jsonl(rows[:2000], warm_jsonl)
        bench = Throughput(tok_dir, rows, jsonl, work, 4096, hf_slow=not args.no_hf_slow)

        # Warm-up (not counted): imports, model loads, worker start-up code paths.
        bench.ref_sp(rows[:200])
        if bench.hf is not None:
            bench.ref_hf(rows[:200])
        bench.ours_encode(bench.messages[:200])
        bench.ours_prepare(1, source=warm_jsonl)
        bench.ours_prepare(2, source=warm_jsonl)

        same, checked = check_same_ids(bench, min(500, len(rows)))
        chars_ours, chars_ref = encoded_characters(bench)

        # ---- A: alternating repetitions ----
        methods = bench.methods()
        names = list(methods)
        raw: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                wall, cpu, tokens = measure(methods[name])
                raw[name].append({"wall": wall, "cpu": cpu, "tokens": tokens})
                print(f"[A rep {rep + 1}/{args.reps}] {name}: {len(rows) / wall:,.0f} conv/s wall, "
                      f"{len(rows) / cpu:,.0f} conv/CPU-s, {tokens:,} tokens", file=sys.stderr)
        tput = {}
        for name in names:
            walls = [r["wall"] for r in raw[name]]
            cpus = [r["cpu"] for r in raw[name]]
            tput[name] = {
                "wall_s": median(walls), "cpu_s": median(cpus),
                "wall_rate": len(rows) / median(walls), "cpu_rate": len(rows) / median(cpus),
                "wall_rate_range": (len(rows) / max(walls), len(rows) / min(walls)),
                "cpu_rate_range": (len(rows) / max(cpus), len(rows) / min(cpus)),
                "tokens": raw[name][-1]["tokens"],
            }

        profile_text = profile_encode_rows(bench, min(args.profile_rows, len(rows))) if args.profile_rows else ""

        # ---- B: token efficiency through the real loader ----
        prepared = {
            4096: bench.ours_prepare(1, max_length=4096, keep=True),
            512: bench.ours_prepare(1, max_length=512, keep=True, max_skipped=1.0),
        }
        modes = ["pad-to-longest (random)", "length-grouped", "packing"]
        eff_raw: dict[int, dict[str, list[dict]]] = {m: {k: [] for k in modes} for m in prepared}
        for rep in range(args.reps):
            for max_length in (512, 4096):
                order = modes[rep % 3:] + modes[: rep % 3]
                for mode in order:
                    result = loader_efficiency(prepared[max_length].train, mode, max_length, seed=rep,
                                               max_steps=args.eff_max_steps)
                    eff_raw[max_length][mode].append(result)
                    print(f"[B rep {rep + 1}/{args.reps}] max_length {max_length} {mode}: "
                          f"{result['efficiency']:.2%} over {result['steps']} steps", file=sys.stderr)
        eff = {}
        for max_length, per_mode in eff_raw.items():
            eff[max_length] = {}
            for mode, results in per_mode.items():
                values = [r["efficiency"] for r in results]
                entry = {"efficiency": median(values), "min": min(values), "max": max(values),
                         "steps": results[0]["steps"], "steps_per_epoch": results[0]["steps_per_epoch"],
                         "units": results[0]["units"], "seconds": median(r["seconds"] for r in results)}
                if mode == "packing":
                    entry["plan_fill"] = median(r["plan_fill"] for r in results)
                    entry["samples_per_row"] = median(r["samples_per_row"] for r in results)
                    entry["fill_bound"] = results[0]["fill_bound"]
                eff[max_length][mode] = entry
        summaries = {m: p.summary["splits"]["train"] for m, p in prepared.items()}
        lengths = [int(x) for x in prepared[4096].train.data.column("length").to_numpy()]
        del prepared
    finally:
        shutil.rmtree(work, ignore_errors=True)

    runtime = time.perf_counter() - run_started
    load_after = os.getloadavg()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info("torch", "datasets", "transformers", "sentencepiece")
    result = {"command": command, "tokenizer": tok_desc, "machine": info, "rows": row_stats,
              "load_average_before": load_before, "load_average_after": load_after, "runtime_s": runtime,
              "same_ids": [same, checked], "encoded_chars": {"ours": chars_ours, "reference": chars_ref},
              "throughput": tput, "throughput_raw": raw, "efficiency": {str(k): v for k, v in eff.items()},
              "efficiency_raw": {str(k): v for k, v in eff_raw.items()}, "cache_summaries": {str(k): v for k, v in summaries.items()}}
    (out_dir / "bench_data.json").write_text(json.dumps(result, indent=1, ensure_ascii=False, default=list) + "\n")
    write_png(out_dir / "bench_data.png", tput, eff, lengths)
    (out_dir / "bench_data.md").write_text(render_md(result, tput, eff, lengths, profile_text, args))
    print(f"wrote {out_dir / 'bench_data.md'}, bench_data.png, bench_data.json in {fmt_duration(runtime)}", file=sys.stderr)
    return 0


def render_md(result: dict, tput: dict, eff: dict, lengths: list[int], profile_text: str, args) -> str:
    rows = result["rows"]
    info = result["machine"]
    n = rows["rows"]
    ref_name = "reference: sentencepiece, 1 string/call"
    ref = tput[ref_name]
    sorted_lengths = sorted(lengths)
    pct = lambda f: sorted_lengths[min(len(sorted_lengths) - 1, int(f * len(sorted_lengths)))]  # noqa: E731
    lines = [
        "# Data pipeline benchmarks",
        "",
        "Generated by `experiments/bench_data.py`; do not edit by hand. Raw figures: `bench_data.json`; chart: `bench_data.png`.",
        "",
        "Reproduce (from the repository root):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        "![bench_data.png](bench_data.png)",
        "",
        "## Setup",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['platform']}; Python {info['python']}, torch {info['torch']}, "
        f"datasets {info['datasets']}, transformers {info['transformers']}, sentencepiece {info['sentencepiece']}.",
        f"- Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in result['load_average_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in result['load_average_after'])}. The machine is shared with other work, so wall-clock "
        "rates are noisy; rates per CPU-second (user+system time of the process, its threads and reaped worker processes) "
        "are the per-core figures.",
        f"- Tokenizer: {result['tokenizer']}.",
        f"- Rows: {n:,} from `experiments/realistic_rows.py` (seed {args.seed}): mean {rows['mean_bytes']:,.0f} B/row (UTF-8 JSON line), "
        f"median {rows['median_bytes']:,} B, p90 {rows['p90_bytes']:,} B, p99 {rows['p99_bytes']:,} B, max {rows['max_bytes']:,} B, "
        f"{rows['share_over_5KB']:.1%} over 5 KB; pairs per row {rows['pairs_histogram']}; {rows['share_chinese_dominant']:.0%} "
        f"Chinese-dominant, {rows['share_with_instruction']:.0%} with an instruction (others get Meta's default system prompt), "
        f"{rows['share_with_code']:.0%} with code.",
        f"- Tokens per conversation (ours, max_length 4096, system prompt folded in): mean {statistics.fmean(lengths):,.0f}, "
        f"median {pct(0.5):,}, p90 {pct(0.9):,}, p99 {pct(0.99):,}, max {sorted_lengths[-1]:,}.",
        f"- Same work: the reference and ours produce identical input ids and labels for {result['same_ids'][0]} of the first "
        f"{result['same_ids'][1]} rows.",
        f"- Repetitions: {args.reps}, alternating (methods in rotated order each repetition); medians, [min-max] in brackets.",
        "",
        "## A. Tokenization throughput (conversations/s)",
        "",
        "| method | wall s | conv/s wall [range] | CPU s | conv/s per CPU-s = per core [range] | per core vs reference | "
        f"full set ({FULL_ROWS:,} rows) on {FULL_CORES} cores | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in tput.items():
        ratio = t["cpu_rate"] / ref["cpu_rate"]
        lo, hi = t["wall_rate_range"]
        clo, chi = t["cpu_rate_range"]
        full = FULL_ROWS / (t["cpu_rate"] * FULL_CORES)
        lines.append(
            f"| {name} | {t['wall_s']:.2f} | {t['wall_rate']:,.0f} [{lo:,.0f}-{hi:,.0f}] | {t['cpu_s']:.2f} | "
            f"**{t['cpu_rate']:,.0f}** [{clo:,.0f}-{chi:,.0f}] | {ratio:.2f}x | {fmt_duration(full)} | {t['tokens']:,} |"
        )
    ours_end = tput["ours: prepare_dataset num_proc=1"]
    ours_enc = tput["ours: encode_dialogs only (batches of 1000)"]
    np2 = tput["ours: prepare_dataset num_proc=2"]
    lines += [
        "",
        "Goals:",
        "",
        "| goal | target | measured (ours, prepare_dataset num_proc=1, per core) | met? |",
        "|---|---:|---:|:---:|",
        f"| ours / reference (sentencepiece direct), per core | >= {GOAL_RATIO:.0f}x | {ours_end['cpu_rate'] / ref['cpu_rate']:.2f}x "
        f"(encode step alone {ours_enc['cpu_rate'] / ref['cpu_rate']:.2f}x) | "
        f"{'yes' if ours_end['cpu_rate'] / ref['cpu_rate'] >= GOAL_RATIO else 'no'} |",
    ]
    if "reference: transformers slow tokenizer(text)" in tput:
        hf = tput["reference: transformers slow tokenizer(text)"]
        lines.append(
            f"| ours / reference (transformers slow tokenizer), per core | >= {GOAL_RATIO:.0f}x | "
            f"{ours_end['cpu_rate'] / hf['cpu_rate']:.2f}x | {'yes' if ours_end['cpu_rate'] / hf['cpu_rate'] >= GOAL_RATIO else 'no'} |")
    lines += [
        f"| conversations/s per core | >= {GOAL_PER_CORE:,.0f} | {ours_end['cpu_rate']:,.0f} | "
        f"{'yes' if ours_end['cpu_rate'] >= GOAL_PER_CORE else 'no'} |",
        "",
        "Notes:",
        "",
        f"- Wall-clock num_proc=2 vs num_proc=1: {np2['wall_rate'] / ours_end['wall_rate']:.2f}x on this 2-core, shared machine "
        f"(includes pool start-up, which a {FULL_ROWS:,}-row build amortises). `encode_dialogs` hands whole batches to "
        "SentencePiece, which may use several threads, so its wall-clock rate at num_proc=1 is not a single-core figure; the "
        "CPU-second rate is.",
        f"- Arrow / IO / truncation overhead of the end-to-end build over the encode step: "
        f"{ours_end['cpu_s'] - ours_enc['cpu_s']:.2f} CPU-s of {ours_end['cpu_s']:.2f} "
        f"({(ours_end['cpu_s'] - ours_enc['cpu_s']) / ours_end['cpu_s']:.0%}).",
        f"- Characters handed to the tokenizer: ours {result['encoded_chars']['ours']:,}, reference "
        f"{result['encoded_chars']['reference']:,} ({result['encoded_chars']['ours'] / result['encoded_chars']['reference']:.2f}x): "
        "`llama2_sft/data/chat.py` `encode_dialogs` encodes each pair's prompt and `{answer} ` separately when the "
        "SentencePiece model splits at spaces (Llama-2's does; tested equal to whole-pair encoding), else the prompt *and* "
        "prompt+answer, checking the prefix.",
        "- Both sides use the same SentencePiece C++ encoder, whose cost per character is the floor for either; the reference "
        "timing excludes JSON parsing (rows are already in memory), ours (prepare_dataset) includes JSON -> Arrow, the "
        "cache write and truncation.",
        f"- Extrapolation: {FULL_ROWS:,} / (per-core rate x {FULL_CORES}), i.e. ideal scaling over {FULL_CORES} cores.",
        "",
    ]
    if profile_text:
        lines += [
            f"Profile of the package's map function `encode_rows` (batches of 1000, {min(args.profile_rows, n):,} rows, "
            "sorted by own time):",
            "",
            "```",
            profile_text,
            "```",
            "",
        ]
    lines += [
        "## B. Token efficiency (real tokens / all tokens in `input_ids`)",
        "",
        "Batches from the real `llama2_sft.data.loader.SFTLoader` (micro-batch 4, 1 rank, no accumulation); one loader "
        f"seed per repetition (seeds 0..{args.reps - 1}); at most {args.eff_max_steps or 'all'} steps per run (a random "
        "sample of the epoch). Real tokens = the loader's `num_real_tokens`; all tokens = `input_ids.numel()`.",
        "",
        "| max_length | mode | real / all [min-max over seeds] | steps measured / per epoch | units (samples or packed rows) | "
        "plan fill | fill upper bound (whole samples) | samples per packed row | loader s (median) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for max_length in sorted(eff):
        for mode, e in eff[max_length].items():
            fill = f"{e['plan_fill']:.2%}" if "plan_fill" in e else ""
            per_row = f"{e['samples_per_row']:.2f}" if "samples_per_row" in e else ""
            bound = f"{e['fill_bound']:.2%}" if "fill_bound" in e else ""
            lines.append(
                f"| {max_length} | {mode} | **{e['efficiency']:.2%}** [{e['min']:.2%}-{e['max']:.2%}] | "
                f"{e['steps']:,} / {e['steps_per_epoch']:,} | {e['units']:,} | {fill} | {bound} | {per_row} | {e['seconds']:.1f} |"
            )
    lines += ["", "Ratios and goal:", "", "| max_length | packing / pad-to-longest | length-grouped / pad-to-longest | "
              f"packing >= {GOAL_PACKED:.0%}? |", "|---:|---:|---:|:---:|"]
    for max_length in sorted(eff):
        e = eff[max_length]
        base = e["pad-to-longest (random)"]["efficiency"]
        lines.append(f"| {max_length} | {e['packing']['efficiency'] / base:.2f}x | {e['length-grouped']['efficiency'] / base:.2f}x | "
                     f"{'yes' if e['packing']['efficiency'] >= GOAL_PACKED else 'no'} ({e['packing']['efficiency']:.2%}; upper bound "
                     f"{e['packing']['fill_bound']:.2%}) |")
    lines += ["", "Notes:", "",
              "- Plan fill = real tokens / (packed rows x max_length). Fill upper bound = the same with a lower bound on the rows any "
              "packer that keeps samples whole needs (max of total tokens / max_length and the number of samples longer "
              "than max_length / 2, which cannot share a row).",
              "- Packing micro-batches are padded to their longest packed row, so packing's real/all can sit slightly below "
              "the plan fill; pad-to-longest and length-grouped rows hold one sample each."]
    for max_length in sorted(eff):
        e = eff[max_length]
        if e["length-grouped"]["efficiency"] > e["packing"]["efficiency"]:
            lines.append(f"- At max_length {max_length}, length grouping ({e['length-grouped']['efficiency']:.2%}) beats packing "
                         f"({e['packing']['efficiency']:.2%}): many samples sit at or near max_length after truncation, so "
                         "they group into batches of equal length but leave gaps that short samples cannot fill in a row.")
    lines += ["", "Token caches behind B (`summary.json` of each build):", ""]
    for max_length, summary in sorted(result["cache_summaries"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"- max_length {max_length}: {summary['rows']:,} rows -> {summary['kept']:,} kept, skipped "
                     f"{summary['skipped'] or 'none'}, outcomes {summary['outcomes']}, {summary['tokens']:,} tokens.")
    lines += ["", f"Total runtime: {fmt_duration(result['runtime_s'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
