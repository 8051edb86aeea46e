#!/usr/bin/env python
"""Training throughput on CPU: our loop (`train.py`) against the Hugging Face `Trainer` configured like the reference
recipe, side by side in one run.

Both sides get the same samples (the bundled data set, max_length 512, tokenized once by `prepare_dataset`), fp32,
the same init (`build_model` with the run's seed), the recipe's optimizer and schedule
(`conf/experiment/bench_throughput.yaml`: AdamW lr 2e-5, betas 0.9/0.999, cosine, 3% warm-up, clipping 1.0) and the
same global batch of micro-batches of 4 (the recipe's per-GPU batch):

* `ours (padded)`: `train.py dataset.packing=false`, random pad-to-longest batches like the reference's;
* `ours (packed)`: `train.py dataset.packing=true`, `--packed-rows` rows of 512 per step (about the padded batch's
  samples);
* `ours (packed, tuned)` (`--tuned`): packed rows of 256 (every bundled sample is shorter) + `model.compile=true`;
* `reference (HF Trainer)`: `transformers.Trainer` over exactly the samples of `ours (padded)` in the same order
  (`DataCollatorForSeq2Seq` padding to the longest, its default `adamw_torch_fused`, logging every step).

Measured: supervised tokens/s (labels != -100) over the steps after the warm-up. Ours: `num_supervised_tokens /
step_seconds` from metrics.jsonl (batch fetch + collation + step); the reference: the time between consecutive
`on_step_end` callbacks (the same, plus its per-step logging). Every run is a fresh process with one intra-op thread
(OpenMP with 2 threads on a shared 2-core machine stalls at every barrier); repetitions rotate the methods; the table
gives medians. `loss max abs diff`: per-step losses of `ours (padded)` against the reference on the same samples.

    python experiments/bench_train.py --tuned   # tiny and 50M shapes, 3 repetitions (~15 min on 2 cores)
    python experiments/bench_train.py --quick   # tiny shape, one repetition, 4 steps (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (HERE, ROOT, child_env, command_line, fmt, machine_info, median, rotated, run_train,
                          write_results)

SHAPES = {  # model.arch (max_position_embeddings raised to max_length: padded rows reach position 511)
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 512},  # conf/model/tiny.yaml
    "50m": {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 10, "num_attention_heads": 10,
            "num_key_value_heads": 10, "max_position_embeddings": 512},  # ~50M with the 1,024-piece vocabulary
}
PADDED, PACKED, TUNED, REFERENCE = "ours (padded)", "ours (packed)", "ours (packed, tuned)", "reference (HF Trainer)"
TUNED_LENGTH = 256


def config_overrides(shape: str, work: Path, max_length: int) -> list[str]:
    """What every run of `shape` shares: model shape, data, token cache."""
    return [f"++model.arch.{key}={value}" for key, value in SHAPES[shape].items()] + [
        f"dataset.max_length={max_length}", f"dataset.cache_dir={work / 'cache'}", "dataset.num_proc=1"]


def compose(overrides: list[str]):
    """The run config train.py would see for `overrides` (the reference reads its optimizer settings from it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llama2_sft.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name="train", overrides=["+experiment=bench_throughput", *overrides])


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Tokenize once (the runs hit this cache) and plan the batches: global batch, padded sample order."""
    import numpy as np

    from llama2_sft.data.loader import BatchLayout, SFTLoader
    from llama2_sft.data.packing import pack
    from llama2_sft.data.tokenize import prepare_dataset
    from llama2_sft.model import load_tokenizer, tokenizer_path

    cfg = compose(config_overrides("tiny", work, args.max_length))
    tokenizer = load_tokenizer(cfg.model)
    train = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model)).train
    lengths = np.asarray(train["length"], dtype=np.int64)
    if args.tuned and lengths.max() > TUNED_LENGTH:
        raise SystemExit(f"--tuned: samples longer than {TUNED_LENGTH} tokens would be cut, the runs not comparable")
    samples_per_row = len(lengths) / len(pack(lengths, args.max_length, cfg.dataset.seed))
    micro = args.micro_batch_size
    global_batch = max(micro, micro * round(samples_per_row * args.packed_rows / micro))
    layout = BatchLayout(micro, global_batch // micro, 1)
    loader = SFTLoader(train, layout=layout, rank=0, pad_id=tokenizer.pad_token_id, seed=cfg.seed, packing=False,
                       max_length=args.max_length)
    order = [[int(i) for i in loader.global_batch_units(step // loader.steps_per_epoch, step % loader.steps_per_epoch)]
             for step in range(max(args.steps.values()))]
    return {"global_batch": global_batch, "grad_accum_steps": global_batch // micro, "samples_per_row": samples_per_row,
            "order": order, "supervised": [int(x) for x in train["num_supervised"]], "lengths": lengths.tolist()}


def method_overrides(method: str, args: argparse.Namespace, plan: dict) -> list[str]:
    """The train.py overrides that make `method` (batching, rows per step, compile)."""
    if method == PADDED:
        return ["dataset.packing=false", f"trainer.micro_batch_size={args.micro_batch_size}",
                f"trainer.grad_accum_steps={plan['grad_accum_steps']}"]
    if method == PACKED:
        return ["dataset.packing=true", "trainer.micro_batch_size=1", f"trainer.grad_accum_steps={args.packed_rows}"]
    rows = args.packed_rows * args.max_length // TUNED_LENGTH  # the same tokens per step in shorter rows
    return ["dataset.packing=true", f"dataset.max_length={TUNED_LENGTH}", "model.compile=true",
            f"trainer.micro_batch_size={rows}", "trainer.grad_accum_steps=1"]


def run(method: str, shape: str, args: argparse.Namespace, plan: dict, work: Path, run_dir: Path) -> list[dict]:
    """One run in a fresh process; per step: supervised and real tokens, seconds, loss."""
    steps = args.steps[shape]
    base = config_overrides(shape, work, args.max_length)
    if method != REFERENCE:
        overrides = base + method_overrides(method, args, plan)
        records = run_train(overrides, run_dir, steps, args.threads, cpu_only=True)["records"]
        return [{"supervised": r["num_supervised_tokens"], "tokens": r["num_tokens"], "seconds": r["step_seconds"],
                 "loss": r["loss"]} for r in records]
    run_dir.mkdir(parents=True)
    spec = {"overrides": base, "order": plan["order"][:steps], "micro_batch_size": args.micro_batch_size,
            "grad_accum_steps": plan["grad_accum_steps"], "output_dir": str(run_dir)}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reference", str(run_dir / "spec.json")]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(args.threads, cpu_only=True), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reference failed:\n{done.stderr[-3000:]}")
    marks = json.loads((run_dir / "marks.json").read_text())
    return [{"supervised": sum(plan["supervised"][i] for i in ids), "tokens": sum(plan["lengths"][i] for i in ids),
             "seconds": mark["seconds"], "loss": mark.get("loss")} for ids, mark in zip(plan["order"], marks)]


def reference_worker(spec_path: str) -> None:
    """transformers.Trainer configured like the reference recipe, over the given samples in the given order."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from llama2_sft.data.tokenize import prepare_dataset
    from llama2_sft.model import build_model, load_tokenizer, tokenizer_path

    spec = json.loads(Path(spec_path).read_text())
    cfg = compose(spec["overrides"])
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model)).train
    model = build_model(cfg.model, tokenizer, "fp32", "cpu", cfg.seed)  # train.py's init
    columns = train[[i for ids in spec["order"] for i in ids]]
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
            for ids, labels in zip(columns["input_ids"], columns["labels"])]

    class InOrder(Trainer):  # the samples of our padded run, in its order
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(rows)

    marks: list[dict] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            marks.append({"seconds": now - self.last})
            self.last = now

        def on_log(self, *args, logs=None, **kwargs):
            if logs and "loss" in logs:
                marks[-1]["loss"] = float(logs["loss"])

    opt, sched = cfg.optimizer, cfg.scheduler
    training_args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum_steps"], max_steps=len(spec["order"]), learning_rate=opt.lr,
        adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_epsilon=opt.eps, weight_decay=opt.weight_decay,
        lr_scheduler_type=sched.name, warmup_steps=sched.warmup_ratio, max_grad_norm=cfg.trainer.max_grad_norm,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=cfg.seed,
        dataloader_num_workers=0)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    InOrder(model=model, args=training_args, train_dataset=rows, data_collator=collator, callbacks=[Timer()]).train()
    (Path(spec["output_dir"]) / "marks.json").write_text(json.dumps(marks))


def rates(records: list[dict], warmup: int) -> dict:
    """Supervised and real tokens per second over the steps after `warmup`."""
    timed = records[warmup:]
    seconds = sum(r["seconds"] for r in timed)
    return {"supervised_per_s": sum(r["supervised"] for r in timed) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "supervised_per_step": sum(r["supervised"] for r in timed) / len(timed)}


def plot(plt, out: dict):
    """Supervised tokens/s per method, one panel per shape, ratios to the reference on the bars."""
    shapes = list(out["results"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        methods = out["results"][shape]
        values = [m["supervised_per_s"] for m in methods.values()]
        ax.bar(range(len(values)), values, color=["#999999" if n == REFERENCE else "#1f77b4" for n in methods])
        for x, (name, m) in enumerate(methods.items()):
            ax.text(x, m["supervised_per_s"], f"{m['supervised_per_s']:,.0f}" + (
                "" if name == REFERENCE else f"\n{m['vs_reference']:.2f}x"), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(values)), [n.replace(" (", "\n(") for n in methods], fontsize=8)
        ax.set_ylabel("supervised tokens / s (median)")
        ax.set_title(f"{shape} model, CPU fp32", fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,50m", help="comma-separated: tiny, 50m")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps-tiny", type=int, default=8)
    parser.add_argument("--steps-50m", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the rates")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="per-device samples (the recipe's 4)")
    parser.add_argument("--packed-rows", type=int, default=1, help="packed rows per step for ours (packed)")
    parser.add_argument("--tuned", action="store_true", help=f"also run {TUNED!r}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny shape, one repetition, 4 steps")
    parser.add_argument("--out", default=str(HERE / "bench_train"), help="output prefix (.json / .md / .png)")
    parser.add_argument("--reference", metavar="SPEC", help=argparse.SUPPRESS)  # internal: the HF Trainer worker
    args = parser.parse_args(argv)
    if args.reference:
        reference_worker(args.reference)
        return 0
    if args.quick:
        args.shapes, args.reps, args.steps_tiny = "tiny", 1, 4
    shapes = args.shapes.split(",")
    args.steps = {"tiny": args.steps_tiny, "50m": args.steps_50m}
    if min(args.steps[s] for s in shapes) <= args.warmup:
        raise SystemExit("--steps-* must exceed --warmup")
    methods = [PADDED, PACKED, REFERENCE] + ([TUNED] if args.tuned else [])

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    runs: dict = {shape: {m: [] for m in methods} for shape in shapes}
    try:
        plan = prepare(args, work)
        for rep in range(args.reps):
            for shape in shapes:
                for method in rotated(methods, rep):
                    run_dir = work / f"{shape}-{rep}-{methods.index(method)}"
                    records = run(method, shape, args, plan, work, run_dir)
                    runs[shape][method].append(records)
                    print(f"rep {rep} {shape} {method}: {rates(records, args.warmup)}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for shape in shapes:
        results[shape] = {m: {k: median(rates(r, args.warmup)[k] for r in runs[shape][m])
                              for k in ("supervised_per_s", "tokens_per_s", "supervised_per_step")} for m in methods}
        ref = results[shape][REFERENCE]
        for m in methods:
            results[shape][m]["vs_reference"] = results[shape][m]["supervised_per_s"] / ref["supervised_per_s"]
            results[shape][m]["vs_reference_tokens"] = results[shape][m]["tokens_per_s"] / ref["tokens_per_s"]
        ours, theirs = runs[shape][PADDED][0], runs[shape][REFERENCE][0]  # the same samples: the losses must agree
        results[shape][PADDED]["loss_max_abs_diff"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs))
    out = {"command": command_line("bench_train.py", argv), "machine": machine_info("torch", "transformers"),
           "args": vars(args), "plan": {k: v for k, v in plan.items() if k in ("global_batch", "samples_per_row")},
           "results": results, "runs": runs, "runtime_s": time.time() - started}
    header = ["shape", "method", "sup. tokens / step", "sup. tokens/s", "vs reference", "real tokens/s",
              "vs reference (real tokens)", "loss max abs diff vs reference"]
    rows = [[shape, m, fmt(e["supervised_per_step"]), fmt(e["supervised_per_s"], ",.1f"), f"{e['vs_reference']:.2f}x",
             fmt(e["tokens_per_s"]), f"{e['vs_reference_tokens']:.2f}x",
             fmt(e["loss_max_abs_diff"], ".1e") if m == PADDED else ""]
            for shape, per_method in results.items() for m, e in per_method.items()]
    write_results(Path(args.out), "Training throughput on CPU: our loop vs transformers.Trainer", out, header, rows, plot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
