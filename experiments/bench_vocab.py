#!/usr/bin/env python
"""Chinese vocabulary extension (issue 13 §5), measured on the realistic zh/en rows: what the extended vocabulary
saves in tokens, in truncation at 4096, and in training time per character of supervised text.

1. The extension: `llama2_sft.vocab.build_vocabulary` (what `python -m llama2_sft.vocab` runs) on the real 32k
   Llama-2 vocabulary rebuilt by tests/assets/make_llama2_tokenizer.py (the bundled 1,024-piece one if it cannot be
   built), trained on a Chinese corpus (`--corpus`):
   * `auto` (default): the Chinese text this machine carries, the zh_CN gettext catalogs
     (/usr/share/locale/zh_CN/LC_MESSAGES/*.mo) and the Chinese "Rust by Example" pages of a rustup toolchain, when
     they hold at least 100,000 Chinese characters; else `synthetic`;
   * `synthetic`: the Chinese-dominant rows of `llama2_sft.data.synthetic.generate(..., seed=1)`: other rows than
     the measured ones but the same closed word lists, so an optimistic case;
   * FILE...: text / jsonl / parquet files as `python -m llama2_sft.vocab corpus=` takes them.
2. Tokens per Chinese character and per English word, before and after, on the realistic rows
   (`synthetic.generate(N, seed=0)`, shaped like instruction_merge_set: the rows of bench_data). Every token is
   attributed to the characters it covers (SentencePiece's offsets; the byte pieces of one character go with it):
   tokens covering a Chinese character (ideographs, CJK punctuation: `llama2_sft.vocab.CHINESE`) per Chinese
   character, over all rows; on the English-dominant rows, all other tokens (words, numbers, punctuation, code) per
   English word (a run of Latin letters).
3. Truncation at 4096. The realistic rows are short (median ~0.9 KB per JSON line), so a fraction of a percent
   reaches 4096 tokens (`tokens.*.over_max_length` in the JSON); long conversations are built from them to make the
   question meaningful: for each
   long row a target is drawn log-uniformly between 1,024 and 16,384 tokens of the base vocabulary, and the (user,
   assistant) pairs of consecutive synthetic rows (seed 2) of one language are appended until an estimate of its
   length (the turns encoded alone, plus 10 tokens of template per turn) reaches it; half the rows are
   Chinese-dominant. About half then exceed 4096 base tokens by construction. Lengths are those of
   `encode_dialogs` (chat template and default system prompt included) with each tokenizer.
4. Training speed: a random-init Llama of the 50M shape of bench_train / bench_lora (hidden 640, 10 layers; here with
   the base's 32,000-piece vocabulary, so ~91M parameters) saved with the base tokenizer, then `train.py
   +experiment=bench_throughput` on the realistic rows packed into rows of 512 tokens, micro-batch 4, with
   `model.tokenizer` = the base (as saved) or the extended one (the model grows at load), the same rows, alternating
   order per repetition, one intra-op thread each. Supervised characters per second = tokens per second (all tokens
   of the packed rows: what the model computes on) x supervised characters per token of that tokenizer over the
   run's own prepared samples (each supervised span decoded back to text, over all tokens of the samples): the
   throughput is measured on a few steps, the text per token over every sample, so which samples the timed steps
   happened to draw does not matter. Seconds are CPU-seconds of the train.py process over the timed steps (read
   from /proc whenever a step record appears), which other jobs on a shared machine barely move; wall-clock rates
   (metrics.jsonl's step_seconds) are given too.

    python experiments/bench_vocab.py           # ~7 min on 2 cores
    python experiments/bench_vocab.py --quick   # synthetic corpus, tiny shape, both runs at once: ~20 s
"""

from __future__ import annotations

import argparse
import glob
import gettext
import html
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import (HERE, ROOT, child_env, command_line, fmt, llama2_tokenizer, machine_info, median, rotated,
                          step_records, write_results)

SHAPES = {  # LlamaConfig fields of the random-init base; the vocabulary is the base tokenizer's
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4},  # conf/model/tiny.yaml
    "50m": {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 10, "num_attention_heads": 10,
            "num_key_value_heads": 10},  # bench_train.py / bench_lora.py's 50M (with 1,024 pieces)
}
MACHINE_ZH_MO = "/usr/share/locale/zh_CN/LC_MESSAGES/*.mo"
MACHINE_ZH_HTML = "~/.rustup/toolchains/*/share/doc/rust/html/rust-by-example/zh/**/*.html"
MIN_MACHINE_CHINESE = 100_000  # Chinese characters the machine's text must hold to be used
METHODS = ("base", "extended")
MAX_LENGTH = 4096
VOCAB_THREADS = 2  # of the SentencePiece trainer: the pieces it trains depend on it
LONG_MIN, LONG_MAX = 1024, 16384  # base tokens: the log-uniform range of the long rows' target lengths
LATIN_WORD = re.compile("[A-Za-z]+")


# --- 1. the extension -------------------------------------------------------------------------------------------------
def resolve_tokenizer(choice: str) -> tuple[Path, str]:
    """(directory, description): the real Llama-2 tokenizer if it can be built, else the repo's tiny one."""
    real = llama2_tokenizer(choice)
    if real is not None:
        return real, "Llama-2 32k"
    return ROOT / "data" / "tokenizer", "bundled 1,024"


def machine_chinese_lines() -> list[str]:
    """Chinese lines found on this machine: zh_CN gettext catalogs and the Chinese Rust by Example pages (their
    prose; code blocks dropped), each line once, in file order."""
    from llama2_sft.vocab import has_chinese

    lines: list[str] = []
    for path in sorted(glob.glob(MACHINE_ZH_MO)):
        try:
            with open(path, "rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog  # msgid -> msgstr
        except (OSError, gettext.error, UnicodeDecodeError):
            continue
        lines += [line for key, text in catalog.items() if key and isinstance(text, str) for line in text.split("\n")]
    for path in sorted(glob.glob(os.path.expanduser(MACHINE_ZH_HTML), recursive=True)):
        text = Path(path).read_text(encoding="utf-8", errors="ignore")
        text = re.sub(r"(?s)<(script|style|pre|code)[^>]*>.*?</\1>", " ", text)
        lines += html.unescape(re.sub(r"<[^>]+>", "\n", text)).split("\n")
    return list(dict.fromkeys(line.strip() for line in lines if has_chinese(line)))


def chinese_corpus(choice: list[str], work: Path, quick: bool) -> tuple[list[str], str]:
    """(files, description) of the corpus the Chinese vocabulary is trained on (see the module docstring)."""
    from llama2_sft.data import synthetic
    from llama2_sft.vocab import CHINESE

    if choice not in (["auto"], ["synthetic"]):
        return choice, "files: " + ", ".join(choice)
    if choice == ["auto"] and not quick:
        lines = machine_chinese_lines()
        chinese = sum(len(CHINESE.findall(line)) for line in lines)
        if chinese >= MIN_MACHINE_CHINESE:
            path = work / "machine_zh.txt"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            return [str(path)], (f"this machine's Chinese text: zh_CN gettext catalogs + Rust by Example (zh), "
                                 f"{len(lines):,} lines, {sum(map(len, lines)):,} characters, {chinese:,} Chinese")
    rows = [row for row in synthetic.generate(300 if quick else 3000, seed=1) if synthetic.is_chinese_dominant(row)]
    path = work / "synthetic_zh.jsonl"
    synthetic.write_jsonl(rows, str(path))
    return [str(path)], f"synthetic Chinese-dominant rows (seed 1, {len(rows):,} rows): the measured rows' word lists"


def build_extension(base_dir: Path, corpus: list[str], vocab_size: int, out: Path, threads: int) -> dict:
    """The extended tokenizer directory at `out`, by llama2_sft.vocab; its report."""
    from llama2_sft.config import VocabConfig
    from llama2_sft.vocab import build_vocabulary

    return build_vocabulary(VocabConfig(base=str(base_dir), corpus=corpus, out=str(out), vocab_size=vocab_size,
                                        num_threads=threads))


# --- 2. tokens per Chinese character / English word -------------------------------------------------------------------
def attributed_counts(sp, texts: list[str]) -> dict:
    """Tokens covering a Chinese character, other tokens, Chinese characters, Latin-letter words, byte pieces."""
    from llama2_sft.vocab import CHINESE

    counts = dict.fromkeys(("zh_tokens", "other_tokens", "zh_chars", "en_words", "tokens", "byte_tokens"), 0)
    for text, encoded in zip(texts, sp.encode(texts, return_type="proto")):
        counts["zh_chars"] += len(CHINESE.findall(text))
        counts["en_words"] += len(LATIN_WORD.findall(text))
        pending = 0  # pieces without a surface (a character's leading byte pieces, a lone dummy prefix) so far
        for piece in encoded.pieces:
            counts["tokens"] += 1
            counts["byte_tokens"] += piece.piece.startswith("<0x")
            pending += 1
            if piece.surface:
                counts["zh_tokens" if CHINESE.search(piece.surface) else "other_tokens"] += pending
                pending = 0
        counts["other_tokens"] += pending
    return counts


def token_rates(tokenizers: dict, rows: list[dict]) -> dict:
    """Per tokenizer, over the rows' turn texts and instructions: tokens per Chinese character (all rows), tokens not
    covering a Chinese character per English word (English-dominant rows), the byte-piece share, and chat-template
    tokens per row by language."""
    import sentencepiece as spm

    from llama2_sft.data import DEFAULT_SYSTEM_PROMPT, encode_dialogs
    from llama2_sft.data.sources import row_to_messages
    from llama2_sft.data.synthetic import is_chinese_dominant

    chinese = [is_chinese_dominant(row) for row in rows]
    texts = {zh: [text for row, flag in zip(rows, chinese) if flag == zh
                  for text in [row["instruction"]] + [t["value"] for t in row["conversations"]] if text]
             for zh in (True, False)}
    messages = [row_to_messages(row, DEFAULT_SYSTEM_PROMPT)[0] for row in rows]
    out = {}
    for name, directory in tokenizers.items():
        sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        zh_rows, en_rows = attributed_counts(sp, texts[True]), attributed_counts(sp, texts[False])
        lengths = [len(d.input_ids) for d in encode_dialogs(str(directory), messages)]
        zh_tokens, zh_chars = zh_rows["zh_tokens"] + en_rows["zh_tokens"], zh_rows["zh_chars"] + en_rows["zh_chars"]
        out[name] = {"zh_dominant_rows": zh_rows, "en_dominant_rows": en_rows,
                     "zh_tokens_per_char": zh_tokens / max(1, zh_chars),
                     "tokens_per_en_word": en_rows["other_tokens"] / max(1, en_rows["en_words"]),
                     "byte_share": ((zh_rows["byte_tokens"] + en_rows["byte_tokens"])
                                    / (zh_rows["tokens"] + en_rows["tokens"])),
                     "row_tokens_zh": sum(n for n, zh in zip(lengths, chinese) if zh) / max(1, sum(chinese)),
                     "row_tokens_en": (sum(n for n, zh in zip(lengths, chinese) if not zh)
                                       / max(1, len(rows) - sum(chinese))),
                     "over_max_length": sum(n > MAX_LENGTH for n in lengths)}
    return out


# --- 3. truncation at 4096 --------------------------------------------------------------------------------------------
def long_rows(count: int, base_dir: Path, seed: int = 2) -> list[dict]:
    """`count` long conversations (half Chinese-dominant): target lengths log-uniform in [LONG_MIN, LONG_MAX] base
    tokens (estimated), filled with the (user, assistant) pairs of consecutive synthetic rows of one language."""
    import sentencepiece as spm

    from llama2_sft.data import synthetic

    sp = spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))
    pool = synthetic.generate(max(600, count * 12), seed=seed)
    by_language = {zh: [row for row in pool if synthetic.is_chinese_dominant(row) == zh] for zh in (True, False)}
    cursor = {True: 0, False: 0}
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        zh = index % 2 == 0
        target = math.exp(rng.uniform(math.log(LONG_MIN), math.log(LONG_MAX)))
        conversations, length = [], 0
        while length < target:
            source = by_language[zh][cursor[zh] % len(by_language[zh])]
            cursor[zh] += 1
            turns = source["conversations"]
            conversations += turns
            length += sum(len(ids) + 2 for ids in sp.encode([t["value"] for t in turns])) + 8 * len(turns)
        rows.append({"id": f"long-{index}", "conversations": conversations, "instruction": "", "zh": zh,
                     "target_tokens": round(target)})
    return rows


def truncation(tokenizers: dict, rows: list[dict]) -> dict:
    """Chat-template lengths of the long rows per tokenizer; how many exceed MAX_LENGTH, by language."""
    from llama2_sft.data import DEFAULT_SYSTEM_PROMPT, encode_dialogs
    from llama2_sft.data.sources import row_to_messages

    messages = [row_to_messages(row, DEFAULT_SYSTEM_PROMPT)[0] for row in rows]
    lengths = {name: [len(d.input_ids) for d in encode_dialogs(str(directory), messages)]
               for name, directory in tokenizers.items()}
    out = {"lengths": lengths, "zh": [row["zh"] for row in rows], "by_language": {}}
    for language, keep in (("zh", True), ("en", False), ("all", None)):
        picked = [i for i, row in enumerate(rows) if keep is None or row["zh"] == keep]
        over = {name: {i for i in picked if lengths[name][i] > MAX_LENGTH} for name in tokenizers}
        rescued = over["base"] - over["extended"]
        out["by_language"][language] = {
            "rows": len(picked), "over_base": len(over["base"]), "over_extended": len(over["extended"]),
            "rescued": len(rescued), "rescued_share_of_over_base": len(rescued) / max(1, len(over["base"])),
            "rescued_share_of_rows": len(rescued) / max(1, len(picked)),
            "newly_over": len(over["extended"] - over["base"]),
            "median_length_ratio": median(lengths["extended"][i] / lengths["base"][i] for i in picked)}
    return out


# --- 4. training speed ------------------------------------------------------------------------------------------------
def save_base(shape: str, tokenizer_dir: Path, directory: Path) -> Path:
    """A random-init Llama of `shape` with the base tokenizer's vocabulary, saved as a Hugging Face checkpoint
    (fp16, as Llama-2 is) together with that tokenizer, which `vocab_plan` checks the extended one against."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.unk_token_id,
                         max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(directory)
    for name in os.listdir(tokenizer_dir):
        if name != "report.json":
            shutil.copy2(tokenizer_dir / name, directory / name)
    return directory


def run_overrides(base: Path, tokenizer: Path, work: Path, args: argparse.Namespace) -> list[str]:
    """The saved base with `tokenizer` (the base's own, or the extended one: grown at load), the realistic rows
    packed into rows of `args.seq`."""
    return [f"model.name_or_path={base}", "model.arch=null", f"model.tokenizer={tokenizer}",
            "dataset=jsonl", f"dataset.source={work / 'rows.jsonl'}", f"dataset.cache_dir={work / 'cache'}",
            "dataset.eval_fraction=0", "dataset.packing=true", f"dataset.max_length={args.seq}",
            "dataset.max_skipped_fraction=1.0", "dataset.num_proc=1", f"trainer.micro_batch_size={args.rows}",
            "trainer.save_steps=0"]


def run_train_cpu(overrides: list[str], run_dir: Path, steps: int, threads: int) -> dict:
    """`bench_common.run_train`, also reading the process's CPU time (all its threads, /proc/PID/stat) whenever a new
    step record appears: CPU-seconds per step stay meaningful on a machine other jobs load, where wall time does not
    (with one intra-op thread a core spins for no one)."""
    import subprocess

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics, log_path = run_dir / "metrics.jsonl", run_dir / "train.log"
    cmd = [sys.executable, "train.py", "+experiment=bench_throughput", f"trainer.max_steps={steps}", *overrides,
           f"output_dir={run_dir}"]
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_at_record: list[float] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads, cpu_only=True), stdout=log,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None and len(cpu_at_record) < steps:
            count = len(step_records(metrics))
            if count > len(cpu_at_record):
                try:
                    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    break
                cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
                cpu_at_record += [cpu] * (count - len(cpu_at_record))
            time.sleep(0.1)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        elif proc.returncode != 0:
            raise RuntimeError(f"train.py failed ({proc.returncode}): {' '.join(cmd)}\n{log_path.read_text()[-3000:]}")
    return {"records": step_records(metrics), "cpu_at_record": cpu_at_record}


def supervised_text(overrides: list[str]) -> dict:
    """Tokenize the run's data as train.py will (it then hits this cache); supervised tokens and the characters they
    decode to over all prepared training samples."""
    import sentencepiece as spm
    from hydra import compose, initialize_config_dir

    from llama2_sft.config import register_configs
    from llama2_sft.data import IGNORE_INDEX
    from llama2_sft.data.tokenize import prepare_dataset
    from llama2_sft.model import load_tokenizer, tokenizer_path

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=["+experiment=bench_throughput", *overrides])
    path = tokenizer_path(cfg.model)
    prepared = prepare_dataset(cfg.dataset, load_tokenizer(cfg.model), path)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    tokens = characters = 0
    for labels in prepared.train["labels"]:
        span: list[int] = []
        for label in list(labels) + [IGNORE_INDEX]:
            if label != IGNORE_INDEX:
                span.append(label)
            elif span:
                tokens, characters, span = tokens + len(span), characters + len(sp.decode(span)), []
    all_tokens = int(sum(prepared.train["length"]))
    return {"samples": len(prepared.train), "tokens": all_tokens, "supervised_tokens": tokens,
            "supervised_characters": characters, "characters_per_supervised_token": characters / tokens,
            "supervised_characters_per_token": characters / all_tokens}


def training(base: Path, tokenizers: dict, work: Path, args: argparse.Namespace) -> dict:
    """Base vs extended vocabulary on the same saved base and rows: supervised tokens and characters per second."""
    text = {name: supervised_text(run_overrides(base, directory, work, args)) for name, directory in tokenizers.items()}
    print(f"training data prepared: {text}", file=sys.stderr)
    runs: dict = {name: [] for name in METHODS}

    def one(rep: int, name: str) -> None:
        run_dir = work / f"run-{rep}-{name}"
        result = run_train_cpu(run_overrides(base, tokenizers[name], work, args), run_dir, args.steps, args.threads)
        grown = "vocabulary grown from" in (run_dir / "train.log").read_text()
        timed, cpu = result["records"][args.warmup:args.steps], result["cpu_at_record"]
        seconds = sum(r["step_seconds"] for r in timed)
        tokens = sum(r["num_tokens"] for r in timed)
        cpu_seconds = cpu[args.steps - 1] - cpu[args.warmup - 1] if args.warmup else None
        runs[name].append({"grown": grown, "step_seconds": [r["step_seconds"] for r in timed],
                           "losses": [r["loss"] for r in timed], "cpu_seconds": cpu_seconds,
                           "num_supervised_tokens": [r["num_supervised_tokens"] for r in timed],
                           "tokens_per_s": tokens / seconds,
                           "tokens_per_cpu_s": tokens / cpu_seconds if cpu_seconds else None})
        print(f"train rep {rep} {name}: {runs[name][-1]['tokens_per_s']:.1f} tokens/s, "
              f"{fmt(runs[name][-1]['tokens_per_cpu_s'], '.1f')} per CPU-s", file=sys.stderr)

    for rep in range(args.reps):
        if args.side_by_side:  # plumbing only (--quick): both runs at once, their speeds mean nothing
            with ThreadPoolExecutor(len(METHODS)) as pool:
                list(pool.map(lambda name: one(rep, name), METHODS))
        else:
            for name in rotated(list(METHODS), rep):
                one(rep, name)
    out = {}
    for name in METHODS:
        rate = median(r["tokens_per_s"] for r in runs[name])
        cpu_rate = median(r["tokens_per_cpu_s"] for r in runs[name])
        per_token = text[name]["supervised_characters_per_token"]
        out[name] = {**text[name], "runs": runs[name], "tokens_per_s": rate, "tokens_per_cpu_s": cpu_rate,
                     "step_seconds": median(median(r["step_seconds"]) for r in runs[name]),
                     "step_cpu_seconds": median(r["cpu_seconds"] / len(r["step_seconds"]) for r in runs[name]
                                                if r["cpu_seconds"]),
                     "supervised_characters_per_s": rate * per_token,
                     "supervised_characters_per_cpu_s": None if cpu_rate is None else cpu_rate * per_token}
    return out


# --- output -----------------------------------------------------------------------------------------------------------
def plot(plt, out: dict):
    """Tokens per unit of text, long-row lengths against 4096, supervised characters per second."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1.4, 1]})
    rates, names = out["tokens"], list(METHODS)
    measures = [("zh_tokens_per_char", "per Chinese character"), ("tokens_per_en_word", "per English word")]
    for j, name in enumerate(names):
        axes[0].bar([i + (j - 0.5) * 0.38 for i in range(len(measures))], [rates[name][key] for key, _ in measures],
                    0.38, label=out["tokenizers"][name])
    axes[0].set_xticks(range(len(measures)), [label for _, label in measures])
    axes[0].set_ylabel("tokens")
    axes[0].set_title("tokens per unit of text (realistic rows)", fontsize=10)
    axes[0].legend(fontsize=8)
    lengths, zh = out["truncation"]["lengths"], out["truncation"]["zh"]
    for language, keep, marker in (("zh", True, "o"), ("en", False, "x")):
        picked = [i for i, flag in enumerate(zh) if flag == keep]
        axes[1].scatter([lengths["base"][i] for i in picked], [lengths["extended"][i] for i in picked], s=12,
                        marker=marker, label=f"{language}-dominant rows")
    top = max(max(lengths["base"]), max(lengths["extended"]))
    axes[1].plot([0, top], [0, top], color="#999999", linewidth=0.8)
    axes[1].axhline(MAX_LENGTH, color="red", linewidth=0.8)
    axes[1].axvline(MAX_LENGTH, color="red", linewidth=0.8)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("tokens, base vocabulary")
    axes[1].set_ylabel("tokens, extended vocabulary")
    axes[1].set_title(f"long rows against max_length {MAX_LENGTH} (red)", fontsize=10)
    axes[1].legend(fontsize=8)
    train = out["training"]
    key = "supervised_characters_per_cpu_s" if train["base"]["supervised_characters_per_cpu_s"] else \
        "supervised_characters_per_s"
    axes[2].bar(names, [train[name][key] for name in names], color=["#999999", "#1f77b4"])
    axes[2].set_ylabel(f"{key.replace('_', ' ').replace('per cpu s', 'per CPU-second')} (median)")
    axes[2].set_title(f"training, {out['args']['shape']} shape, {out['args']['rows']} x {out['args']['seq']} packed",
                      fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", choices=("auto", "real", "tiny"), default="auto")
    parser.add_argument("--corpus", nargs="+", default=["auto"], help="auto | synthetic | FILE...")
    parser.add_argument("--vocab-size", type=int, default=20000,
                        help="Chinese pieces to train (Chinese-LLaMA's 20,000)")
    parser.add_argument("--measure-rows", type=int, default=3000, help="realistic rows for tokens per character/word")
    parser.add_argument("--long-rows", type=int, default=400, help="long rows for the truncation count")
    parser.add_argument("--train-rows", type=int, default=600, help="realistic rows the training runs read")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="50m")
    parser.add_argument("--seq", type=int, default=512, help="packed row length of the training runs")
    parser.add_argument("--rows", type=int, default=4, help="rows per step")
    parser.add_argument("--steps", type=int, default=5, help="steps per run (the first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the training runs")
    parser.add_argument("--side-by-side", action="store_true", help="run base and extended at once (plumbing only)")
    parser.add_argument("--quick", action="store_true", help="synthetic corpus, few rows, tiny shape, 2 steps, runs "
                                                            "at once (plumbing, < 30 s)")
    parser.add_argument("--out", default=str(HERE / "bench_vocab"), help="output prefix (.json / .md / .png)")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab_size, args.measure_rows, args.long_rows, args.train_rows = 800, 200, 24, 120
        args.shape, args.seq, args.rows, args.steps, args.warmup, args.reps = "tiny", 256, 2, 2, 1, 1
        args.threads, args.side_by_side = 1, True
    import datasets

    from llama2_sft.data import synthetic

    datasets.disable_progress_bars()
    logging.getLogger("llama2_sft").setLevel(logging.WARNING)
    started = time.time()
    base_dir, base_name = resolve_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="bench_vocab_"))
    try:
        corpus, corpus_description = chinese_corpus(args.corpus, work, args.quick)
        report = build_extension(base_dir, corpus, args.vocab_size, work / "extended", VOCAB_THREADS)
        tokenizers = {"base": base_dir, "extended": work / "extended"}
        names = {"base": f"base ({base_name}: {report['base_pieces']:,})",
                 "extended": f"extended ({report['vocab_size']:,})"}
        print(f"extension: {report['added_pieces']:,} pieces added ({time.time() - started:.0f} s)", file=sys.stderr)
        tokens = token_rates(tokenizers, synthetic.generate(args.measure_rows, seed=0))
        cut = truncation(tokenizers, long_rows(args.long_rows, base_dir))
        print(f"tokens and truncation measured ({time.time() - started:.0f} s)", file=sys.stderr)
        synthetic.write_jsonl(synthetic.generate(args.train_rows, seed=0), str(work / "rows.jsonl"))
        base = save_base(args.shape, base_dir, work / "base-model")
        train = training(base, tokenizers, work, args)
        print(f"training measured ({time.time() - started:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    vocab = {key: report[key] for key in ("base_pieces", "vocab_size", "added_pieces", "padding_pieces",
                                          "dropped_unreachable", "heldout", "english", "hf_matches_sentencepiece")}
    out = {"command": command_line("bench_vocab.py", argv), "machine": machine_info("torch", "transformers",
           "sentencepiece"), "args": vars(args), "corpus": corpus_description, "tokenizers": names, "vocab": vocab,
           "rows": synthetic.describe(synthetic.generate(args.measure_rows, seed=0)), "tokens": tokens,
           "truncation": cut, "training": train, "runtime_s": time.time() - started}

    def row(label: str, values: tuple, spec: str, ratio: bool = True) -> list:
        cells = [fmt(value, spec) for value in values]
        known = ratio and values[0] and values[1] is not None
        return [label, *cells, f"{values[1] / values[0]:.2f}x" if known else ""]

    header = ["measure", names["base"], names["extended"], "extended / base"]
    pick = lambda table, key: tuple(table[name][key] for name in METHODS)  # noqa: E731
    table = [row("tokens per Chinese character", pick(tokens, "zh_tokens_per_char"), ".3f"),
             row("tokens per English word", pick(tokens, "tokens_per_en_word"), ".3f"),
             row("byte pieces, share of tokens", pick(tokens, "byte_share"), ".1%"),
             row("tokens per Chinese-dominant row (chat template)", pick(tokens, "row_tokens_zh"), ",.0f"),
             row("tokens per English-dominant row (chat template)", pick(tokens, "row_tokens_en"), ",.0f")]
    for language, label in (("zh", "Chinese-dominant"), ("en", "English-dominant"), ("all", "all")):
        part = cut["by_language"][language]
        table.append([f"long rows over {MAX_LENGTH} tokens, {label} ({part['rows']})",
                      f"{part['over_base']} ({part['over_base'] / part['rows']:.0%})",
                      f"{part['over_extended']} ({part['over_extended'] / part['rows']:.0%})",
                      f"{part['rescued_share_of_over_base']:.0%} of those fit now"])
    shape = f"{args.shape}, {args.rows} x {args.seq} packed, {args.threads} thread(s)"
    table += [row(f"training: CPU-s / step ({shape})", pick(train, "step_cpu_seconds"), ".2f"),
              row("training: wall s / step", pick(train, "step_seconds"), ".2f"),
              row("training: tokens / CPU-s (prompts and template included)", pick(train, "tokens_per_cpu_s"), ",.1f"),
              row("training data: characters per supervised token", pick(train, "characters_per_supervised_token"),
                  ".3f"),
              row("training data: supervised characters per token", pick(train, "supervised_characters_per_token"),
                  ".3f"),
              row("**training: supervised characters / CPU-s**", pick(train, "supervised_characters_per_cpu_s"),
                  ",.1f"),
              row("training: supervised characters / s (wall)", pick(train, "supervised_characters_per_s"), ",.1f")]
    title = (f"Chinese vocabulary extension: {names['base']} -> {names['extended']}, realistic zh/en rows; "
             f"corpus: {corpus_description.split(':')[0]}")
    write_results(Path(args.out), title, out, header, table, plot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
