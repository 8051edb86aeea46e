#!/usr/bin/env python
"""Data-pipeline benchmarks, ours against the reference approach, side by side in one run.

A. Tokenization throughput (conversations/s) on the same rows of `llama2_sft.data.synthetic` (shaped like
   instruction_merge_set), with the real 32k Llama-2 SentencePiece vocabulary when it can be built
   (tests/assets/make_llama2_tokenizer.py), else the repo's tiny one:
   * reference (the original project and most SFT repos): one sample at a time, each turn's prompt and answer
     encoded separately, one string per call, ids and labels built in Python lists; through the `transformers` slow
     tokenizer (`SentencePieceBackend`) and through `sentencepiece` directly (the floor of any exact pipeline);
   * ours: `llama2_sft.data.encode_dialogs` alone (batches of 1000), and `prepare_dataset` end to end (JSON ->
     Arrow -> encode -> truncation -> cache) with num_proc 1 and 2, cold caches every repetition.
   Plain text for continued pretraining (dataset.type=text) on the same words: each row's turns joined into one
   document (jsonl `text`), so documents/s sits next to conversations/s:
   * reference: `sentencepiece`, one document per call, BOS + ids + EOS;
   * ours: `prepare_dataset` with dataset.type=text end to end (JSON -> Arrow -> encode -> pieces -> cache),
     num_proc 1 and 2.
   Rates per CPU-second (user + system of the process, its threads and workers) are per-core rates, which stay
   meaningful on a shared machine; wall-clock rates are given too; tokens per CPU-second as well.
B. Token efficiency (real tokens / all tokens of `input_ids`) of the batches the real `SFTLoader` yields at
   micro-batch 4, max_length 512 and 4096: random pad-to-longest (the reference), length-grouped, packing; and the
   packing plan's fill next to the best any packer keeping samples whole could reach.

Repetitions rotate the methods (A) and the loader seed (B); the table gives medians [min-max].

    python experiments/bench_data.py           # 6,000 rows, 3 repetitions (~2 min on 2 cores)
    python experiments/bench_data.py --quick   # 2,000 rows, one repetition (< 1 min)
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (HERE, ROOT, command_line, llama2_tokenizer, machine_info, median, rotated,
                          write_results)

IGNORE_INDEX = -100
MODES = ("pad-to-longest (random)", "length-grouped", "packing")


def resolve_tokenizer(choice: str) -> tuple[str, str]:
    """(directory, description): the real Llama-2 tokenizer if it can be built, else the repo's tiny one."""
    real = llama2_tokenizer(choice)
    if real is not None:
        return str(real), "Llama-2 SentencePiece, 32,000 pieces"
    return str(ROOT / "data" / "tokenizer"), "repo tokenizer, 1,024 pieces (token counts not realistic)"


def cpu_seconds() -> float:
    """User + system seconds of this process, its threads and its reaped worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def reference_row(encode, row: dict, system: str, bos: int, eos: int) -> tuple[list[int], list[int]]:
    """Ids and labels of one row the way the original project built them: per (user, assistant) pair, encode the
    prompt and the answer, one string per call, lists concatenated in Python."""
    from llama2_sft.data.chat import B_INST, B_SYS, E_INST, E_SYS

    turns, system = row["conversations"], row["instruction"] if (row["instruction"] or "").strip() else system
    input_ids, labels = [], []
    for k in range(0, len(turns) - 1, 2):
        user = (B_SYS + system + E_SYS if k == 0 and system else "") + turns[k]["value"]
        prompt, answer = encode(f"{B_INST} {user.strip()} {E_INST}"), encode(f"{turns[k + 1]['value'].strip()} ")
        input_ids += [bos] + prompt + answer + [eos]
        labels += [IGNORE_INDEX] * (1 + len(prompt)) + answer + [eos]
    return input_ids, labels


class Methods:
    """The throughput methods of part A over the same rows; each returns the number of tokens it produced."""

    def __init__(self, tok_dir: str, rows: list[dict], work: Path, hf_slow: bool):
        import sentencepiece

        from llama2_sft.data import DEFAULT_SYSTEM_PROMPT
        from llama2_sft.data.sources import row_to_messages
        from llama2_sft.data.synthetic import write_jsonl

        self.tok_dir, self.rows, self.work, self.system = tok_dir, rows, work, DEFAULT_SYSTEM_PROMPT
        self.messages = [row_to_messages(row, DEFAULT_SYSTEM_PROMPT)[0] for row in rows]
        self.sp = sentencepiece.SentencePieceProcessor(model_file=f"{tok_dir}/tokenizer.model")
        self.hf = None
        if hf_slow:
            from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

            self.hf = SentencePieceBackend.from_pretrained(tok_dir, legacy=True)  # ids identical to SentencePiece's
        work.mkdir(parents=True, exist_ok=True)
        self.jsonl = str(work / "rows.jsonl")
        write_jsonl(rows, self.jsonl)
        self.documents = ["\n".join(turn["value"] for turn in row["conversations"]) for row in rows]
        self.text_jsonl = str(work / "documents.jsonl")
        write_jsonl([{"text": document} for document in self.documents], self.text_jsonl)
        self.builds = 0

    def all(self) -> dict:
        methods = {"reference: transformers slow tokenizer, per turn": self.reference_hf} if self.hf else {}
        return {**methods, "reference: sentencepiece, one string per call": self.reference_sp,
                "ours: encode_dialogs (batches of 1000)": self.encode,
                "ours: prepare_dataset num_proc=1": lambda: self.prepare(1),
                "ours: prepare_dataset num_proc=2": lambda: self.prepare(2),
                "text reference: sentencepiece, one document per call": self.reference_text,
                "text ours: prepare_dataset type=text num_proc=1": lambda: self.prepare(1, text=True),
                "text ours: prepare_dataset type=text num_proc=2": lambda: self.prepare(2, text=True)}

    def reference_text(self) -> int:
        sp = self.sp
        return sum(len([sp.bos_id(), *sp.encode(document), sp.eos_id()]) for document in self.documents)

    def reference_sp(self) -> int:
        sp = self.sp
        return sum(len(reference_row(sp.encode, r, self.system, sp.bos_id(), sp.eos_id())[0]) for r in self.rows)

    def reference_hf(self) -> int:
        tok = self.hf
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return sum(len(reference_row(encode, r, self.system, tok.bos_token_id, tok.eos_token_id)[0]) for r in self.rows)

    def encode(self) -> int:
        from llama2_sft.data import encode_dialogs

        return sum(len(d.input_ids) for start in range(0, len(self.messages), 1000)
                   for d in encode_dialogs(self.tok_dir, self.messages[start: start + 1000]))

    def prepare(self, num_proc: int, max_length: int = 4096, keep: bool = False, text: bool = False):
        """A cold build: fresh token cache and fresh HF datasets cache (JSON -> Arrow is redone); `text`: the
        documents as a dataset.type=text corpus."""
        import datasets
        from omegaconf import OmegaConf

        from llama2_sft.config import DatasetConfig
        from llama2_sft.data.tokenize import prepare_dataset

        self.builds += 1
        run_dir = self.work / f"build-{self.builds}"
        saved, datasets.config.HF_DATASETS_CACHE = datasets.config.HF_DATASETS_CACHE, run_dir / "hf"
        try:
            cfg = OmegaConf.structured(DatasetConfig(source=self.text_jsonl if text else self.jsonl, num_proc=num_proc,
                                                     cache_dir=str(run_dir / "tokens"), max_length=max_length,
                                                     max_skipped_fraction=1.0, type="text" if text else "chat"))
            prepared = prepare_dataset(cfg, self.tok_dir, self.tok_dir)
        finally:
            datasets.config.HF_DATASETS_CACHE = saved
        if keep:
            return prepared
        shutil.rmtree(run_dir, ignore_errors=True)
        return prepared.summary["splits"]["train"]["tokens"]

    def same_ids(self, count: int = 500) -> int:
        """How many of the first `count` rows get identical ids and labels from the reference and from ours."""
        from llama2_sft.data import encode_dialogs

        sp = self.sp
        ours = encode_dialogs(self.tok_dir, self.messages[:count])
        return sum(reference_row(sp.encode, row, self.system, sp.bos_id(), sp.eos_id()) == (mine.input_ids, mine.labels)
                   for row, mine in zip(self.rows[:count], ours))


def efficiency(dataset, mode: str, max_length: int, seed: int, max_steps: int) -> dict:
    """Real / all tokens of the batches SFTLoader yields in `mode` (and the packing plan's fill and its bound)."""
    import numpy as np

    from llama2_sft.data.loader import BatchLayout, SFTLoader

    loader = SFTLoader(dataset, layout=BatchLayout(4, 1, 1), rank=0, pad_id=0, seed=seed, packing=mode == "packing",
                       max_length=max_length, group_by_length=mode == "length-grouped")
    real = total = 0
    for _ in range(min(loader.steps_per_epoch, max_steps)):
        for batch in loader.next_step():
            real, total = real + batch["num_real_tokens"], total + batch["input_ids"].numel()
    out = {"efficiency": real / total}
    if mode == "packing":
        lengths = np.asarray(dataset["length"], dtype=np.int64)
        # samples longer than half a row cannot share one: no packer keeping samples whole needs fewer rows
        min_rows = max(-(-int(lengths.sum()) // max_length), int((lengths > max_length // 2).sum()))
        out["plan_fill"] = float(loader.plan.unit_lengths.sum()) / (len(loader.plan) * max_length)
        out["fill_bound"] = float(lengths.sum()) / (min_rows * max_length)
    return out


def spread(values: list[float], spec: str) -> str:
    """`median [min-max]` of `values`, each formatted with `spec`."""
    return f"{format(median(values), spec)} [{format(min(values), spec)}-{format(max(values), spec)}]"


def plot(plt, out: dict):
    """Per-core throughput per method (A) and token efficiency per batching mode (B)."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    names = list(out["throughput"])
    rates = [median(r["cpu_rate"] for r in out["throughput"][n]) for n in names]
    axes[0].barh(names, rates, color=["#999999" if "reference" in n else "#2ca02c" if n.startswith("text") else "#1f77b4"
                                      for n in names])
    axes[0].invert_yaxis()
    axes[0].tick_params(axis="y", labelsize=8)
    axes[0].set_xlabel("conversations (text: documents) / CPU-second (= per core), median")
    axes[0].set_title("A. Tokenization throughput", fontsize=10)
    for j, (max_length, per_mode) in enumerate(out["efficiency"].items()):
        values = [100 * median(r["efficiency"] for r in per_mode[m]) for m in MODES]
        axes[1].bar([i + (j - 0.5) * 0.38 for i in range(len(MODES))], values, 0.38, label=f"max_length {max_length}")
    axes[1].set_xticks(range(len(MODES)), MODES, fontsize=9)
    axes[1].set_ylabel("real tokens / all tokens (%)")
    axes[1].set_title("B. Token efficiency, micro-batch 4", fontsize=10)
    axes[1].legend(fontsize=8, loc="lower right")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6000, help="synthetic rows (>= 2000 so num_proc=2 really forks)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokenizer", choices=("auto", "real", "tiny"), default="auto")
    parser.add_argument("--no-hf-slow", action="store_true", help="skip the transformers slow-tokenizer reference")
    parser.add_argument("--eff-max-steps", type=int, default=600, help="loader steps per efficiency run")
    parser.add_argument("--quick", action="store_true", help="2,000 rows, one repetition, 100 loader steps")
    parser.add_argument("--out", default=str(HERE / "bench_data"), help="output prefix (.json / .md / .png)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.reps, args.eff_max_steps = 2000, 1, 100
    import datasets

    from llama2_sft.data import synthetic

    datasets.disable_progress_bars()
    logging.getLogger("llama2_sft").setLevel(logging.WARNING)
    started = time.time()
    tok_dir, tokenizer = resolve_tokenizer(args.tokenizer)
    rows = synthetic.generate(args.rows, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        for method in Methods(tok_dir, rows[:200], work / "warm", not args.no_hf_slow).all().values():
            method()  # warm-up, not counted: imports, tokenizer loads, first-call paths
        bench = Methods(tok_dir, rows, work, hf_slow=not args.no_hf_slow)
        methods = bench.all()
        throughput = {name: [] for name in methods}
        for rep in range(args.reps):
            for name in rotated(list(methods), rep):
                cpu, wall = cpu_seconds(), time.perf_counter()
                tokens = methods[name]()
                cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
                throughput[name].append({"cpu_rate": len(rows) / cpu, "wall_rate": len(rows) / wall, "tokens": tokens})
                print(f"A rep {rep} {name}: {throughput[name][-1]}", file=sys.stderr)
        same = bench.same_ids()
        prepared = {n: bench.prepare(1, max_length=n, keep=True).train for n in (512, 4096)}
        eff = {str(n): {mode: [efficiency(prepared[n], mode, n, seed, args.eff_max_steps) for seed in range(args.reps)]
                        for mode in MODES} for n in prepared}
        lengths = prepared[4096]["length"]
        del prepared
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reference = next(iter(throughput))
    base = median(r["cpu_rate"] for r in throughput[reference])
    out = {"command": command_line("bench_data.py", argv), "machine": machine_info("torch", "datasets", "transformers",
           "sentencepiece"), "args": vars(args), "tokenizer": tokenizer, "rows": synthetic.describe(rows),
           "tokens_per_sample": {"mean": sum(lengths) / len(lengths), "median": median(lengths), "max": max(lengths)},
           "same_ids_of_500": same, "throughput": throughput, "efficiency": eff, "runtime_s": time.time() - started}
    header = ["measure", "method", "median [min-max]",
              f"vs {reference.split(', ')[0]} (text: vs text reference)"]
    table = []
    text_reference = next((n for n in throughput if n.startswith("text reference")), None)
    for name, runs in throughput.items():
        rate = median(r["cpu_rate"] for r in runs)
        unit = "documents" if name.startswith("text") else "conversations"
        baseline = median(r["cpu_rate"] for r in throughput[text_reference]) if unit == "documents" else base
        table.append([f"{unit} / CPU-s (per core)", name, spread([r["cpu_rate"] for r in runs], ",.0f"),
                      f"{rate / baseline:.2f}x"])
        table.append([f"{unit} / s (wall)", name, spread([r["wall_rate"] for r in runs], ",.0f"), ""])
        table.append(["tokens / CPU-s (per core)", name,
                      spread([r["cpu_rate"] * r["tokens"] / len(rows) for r in runs], ",.0f"), ""])
    for max_length, per_mode in eff.items():
        pad = median(r["efficiency"] for r in per_mode[MODES[0]])
        for mode in MODES:
            values = [r["efficiency"] for r in per_mode[mode]]
            table.append([f"real / all tokens, max_length {max_length}", mode, spread(values, ".2%"),
                          f"{median(values) / pad:.2f}x"])
        packing = per_mode["packing"][0]
        table.append([f"packing plan fill (bound), max_length {max_length}", "packing",
                      f"{packing['plan_fill']:.2%} ({packing['fill_bound']:.2%})", ""])
    write_results(Path(args.out), f"Data pipeline: {args.rows:,} synthetic rows, {tokenizer}", out, header, table, plot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
