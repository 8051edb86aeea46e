#!/usr/bin/env python
"""Training throughput on CPU: our loop (`train.py`) against the Hugging Face `Trainer` configured like the reference
recipe, side by side in one run.

Same tokenized data (the bundled `data/train.jsonl` through `llama2_sft.data.tokenize.prepare_dataset` with the repo
tokenizer `data/tokenizer`, max_length 512; `--data realistic` uses rows from `experiments/realistic_rows.py`
instead), same fp32 precision, same model init (`llama2_sft.model.build_model` with the run's seed), same
optimizer settings (AdamW lr 2e-5, betas 0.9/0.999, eps 1e-8, weight decay 0, cosine schedule with 3% warmup,
gradient clipping 1.0), same micro-batch size (4, the recipe's per-GPU batch) and the same global batch:

* ours, padded: `python train.py ... dataset.packing=false` (random pad-to-longest batches, as the reference);
* ours, packed: `python train.py ... dataset.packing=true`, rows of max_length, as many rows per step as hold about
  the same number of samples as the padded global batch;
* reference: `transformers.Trainer` (per-device batch = our micro-batch, gradient accumulation = ours,
  `DataCollatorForSeq2Seq` padding to the longest, labels -100 on prompts, no packing, HF's default optimizer
  `adamw_torch_fused`, `lr_scheduler_type=cosine`, `warmup_steps=0.03`, `max_grad_norm=1.0`, logging every step),
  fed exactly the samples of our padded run in the same order (a sequential sampler over our loader's order).

Measured: supervised tokens/s (labels != -100) over the steps after the warm-up steps. Ours: `num_supervised_tokens`
and `step_seconds` from `output_dir/metrics.jsonl` (the package's own per-step timing, which covers the loader and
the whole optimizer step); both sides are also timed the same way from outside (wall-clock and process CPU time
between consecutive per-step records: our `MetricsWriter.log` step records, the reference's `on_step_end`
callbacks), which includes everything the loop does per step. Each configuration runs in a fresh process, one
intra-op thread each (`--threads`; OpenMP with 2 threads on a shared 2-core machine stalls at every barrier when a
thread is descheduled); repetitions alternate (methods rotated each repetition), tables give medians.

A profiling pass (`--profile`, on by default) then runs each method once more under cProfile (Python-level
breakdown per step) and torch.profiler (operator breakdown of one step).

Results next to this script: bench_train.md, bench_train.png, bench_train.json.

    python experiments/bench_train.py                     # defaults: both shapes, 3 repetitions, a few minutes
    python experiments/bench_train.py --shapes tiny --reps 5
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import machine_info  # noqa: E402
ROOT = HERE.parent
GOAL_RATIO = 2.0
IGNORE_INDEX = -100

# The recipe's optimizer / schedule (conf/experiment/sft_7b.yaml), applied to both sides.
RECIPE = {"lr": 2e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "warmup_ratio": 0.03,
          "scheduler": "cosine", "max_grad_norm": 1.0}

SHAPES = {
    # conf/model/tiny.yaml (max_position_embeddings raised to max_length: positions up to 511 occur in padded rows)
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 512},
    # ~50M parameters with the repo tokenizer's 1,024-piece vocabulary
    "50m": {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 10, "num_attention_heads": 10,
            "num_key_value_heads": 10, "max_position_embeddings": 512},
}
TUNED = "ours (packed, tuned)"
METHODS = ("ours (padded)", "ours (packed)", "reference (HF Trainer)", TUNED)  # TUNED only with --tuned
TUNED_LENGTH = 256  # rows of 256 tokens: every bundled sample fits (max 138), so the samples are the same
PROFILE_FUNCTIONS = {
    # (path suffix of the file, function name, label); cProfile cumulative time per optimizer step
    "ours": [
        ("llama2_sft/data/loader.py", "next_step", "SFTLoader.next_step (Arrow rows -> collated tensors)"),
        ("llama2_sft/data/loader.py", "_collate", "  of which SFTLoader._collate"),
        ("llama2_sft/trainer.py", "train_step", "Trainer.train_step"),
        ("llama2_sft/loss.py", "batch_loss_sum", "  forward + loss (batch_loss_sum)"),
        ("transformers/masking_utils.py", "create_causal_mask", "    of which mask creation (create_causal_mask)"),
        ("llama2_sft/loss.py", "linear_cross_entropy", "    of which LM head + loss (linear_cross_entropy)"),
        ("llama2_sft/strategy/base.py", "backward", "  backward"),
        ("llama2_sft/strategy/base.py", "clip_grad_norm", "  clip_grad_norm"),
        ("llama2_sft/strategy/base.py", "optimizer_step", "  optimizer step"),
        ("llama2_sft/strategy/base.py", "zero_grad", "  zero_grad"),
        ("llama2_sft/metrics.py", "log", "MetricsWriter.log"),
        ("tqdm/std.py", "set_postfix", "tqdm set_postfix"),
    ],
    "reference": [
        ("transformers/trainer.py", "get_batch_samples", "Trainer.get_batch_samples (dataloader + collator)"),
        ("transformers/trainer.py", "training_step", "Trainer.training_step"),
        ("transformers/trainer.py", "compute_loss", "  forward + loss (compute_loss)"),
        ("transformers/masking_utils.py", "create_causal_mask", "    of which mask creation (create_causal_mask)"),
        ("transformers/loss/loss_utils.py", "ForCausalLMLoss", "    of which loss (ForCausalLMLoss)"),
        ("accelerate/accelerator.py", "backward", "  backward (accelerator.backward)"),
        ("transformers/trainer.py", "_clip_grad_norm", "Trainer._clip_grad_norm"),
        ("accelerate/optimizer.py", "step", "optimizer step (accelerate wrapper)"),
        ("torch/optim/lr_scheduler.py", "step", "lr scheduler step"),
        ("transformers/trainer.py", "_maybe_log_save_evaluate", "Trainer._maybe_log_save_evaluate"),
        ("transformers/trainer_callback.py", "on_step_end", "callbacks on_step_end"),
    ],
}


# ---------------------------------------------------------------------------------------------------------------------
# Configuration shared by the parent and the workers


def common_overrides(args_data: str, data_path: str | None, cache_dir: str, max_length: int) -> list[str]:
    """Overrides every run shares (data, recipe optimizer / schedule, no eval / checkpoints / generation)."""
    out = [
        f"dataset.max_length={max_length}", f"dataset.cache_dir={cache_dir}", "dataset.num_proc=1",
        f"optimizer.lr={RECIPE['lr']}", f"optimizer.betas=[{RECIPE['betas'][0]},{RECIPE['betas'][1]}]",
        f"optimizer.eps={RECIPE['eps']}", f"optimizer.weight_decay={RECIPE['weight_decay']}",
        f"scheduler.name={RECIPE['scheduler']}", f"scheduler.warmup_ratio={RECIPE['warmup_ratio']}",
        f"trainer.max_grad_norm={RECIPE['max_grad_norm']}", "precision=fp32",
        "trainer.eval_steps=0", "trainer.save_steps=0", "trainer.accuracy_samples=0", "trainer.generate_samples=0",
        "trainer.eval_max_samples=8", "trainer.eval_batch_size=8", "trainer.log_steps=1", "resume=false",
    ]
    if args_data == "realistic":
        out += ["dataset=jsonl", f"dataset.source={data_path}", "dataset.eval_fraction=0", "dataset.default_system=none",
                "dataset.max_skipped_fraction=0.2", "dataset.packing=false"]
    return out


def with_overrides(base: list[str], extra: list[str]) -> list[str]:
    """`base` with the keys of `extra` replaced (Hydra rejects a key given twice)."""
    keys = {item.split("=", 1)[0] for item in extra}
    return [item for item in base if item.split("=", 1)[0] not in keys] + list(extra)


def shape_overrides(shape: str) -> list[str]:
    return [f"model.arch.{key}={value}" for key, value in SHAPES[shape].items()]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llama2_sft.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name="train", overrides=list(overrides))


def quiet_logs() -> None:
    import logging

    for name in ("llama2_sft", "datasets", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# Workers (each configuration runs in its own process)


class ProfileWindows:
    """cProfile over the steps after warm-up (`warmup` < step < `torch_step`), then torch.profiler over step
    `torch_step` (the run's last step) with cProfile off, so neither profiler's overhead lands in the other's figures."""

    def __init__(self, cprofile_path: str | None, torch_path: str | None, warmup: int, torch_step: int):
        self.cprofile_path, self.torch_path = cprofile_path, torch_path
        self.warmup, self.torch_step = warmup, torch_step
        self.cprofile = cProfile.Profile() if cprofile_path else None
        self.cprofile_on = False
        self.prof = None

    def step_done(self, step: int) -> None:
        """Called when optimizer step `step` (1-based) has finished."""
        if self.prof is not None and step == self.torch_step:
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            table = averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
            total_us = sum(e.self_cpu_time_total for e in averages)
            with open(self.torch_path, "w") as handle:
                handle.write(f"total self CPU time of the step: {total_us / 1e6:.3f} s\n{table}\n")
            self.prof = None
        if self.cprofile is not None and step == self.warmup and step + 1 < self.torch_step:
            self.cprofile.enable()
            self.cprofile_on = True

    def step_starts(self, step: int) -> None:
        """Called just before optimizer step `step` runs its forward (after its batch was fetched)."""
        if step == self.torch_step:
            self._stop_cprofile()
            if self.torch_path:
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()

    def _stop_cprofile(self) -> None:
        if self.cprofile_on:
            self.cprofile.disable()
            self.cprofile_on = False

    def finish(self) -> None:
        self._stop_cprofile()
        if self.cprofile is not None:
            self.cprofile.dump_stats(self.cprofile_path)


def ours_worker(args: argparse.Namespace, overrides: list[str]) -> None:
    """Run train.py in this process (as `python train.py OVERRIDES`), recording wall / CPU time at each step record."""
    import runpy

    set_threads(args.threads)
    import llama2_sft.metrics as metrics_mod
    import llama2_sft.trainer as trainer_mod

    marks: list[dict] = []
    windows = ProfileWindows(args.cprofile, args.torch_profile, args.profile_warmup, args.torch_profile_step)
    original_log = metrics_mod.MetricsWriter.log
    original_step = trainer_mod.Trainer.train_step

    def log(self, record: dict) -> None:
        if "loss" in record:
            marks.append({"step": record["step"], "wall": time.perf_counter(), "cpu": time.process_time()})
        original_log(self, record)
        if "loss" in record:
            windows.step_done(record["step"])

    def train_step(self, micro_batches):
        windows.step_starts(self.step + 1)
        return original_step(self, micro_batches)

    metrics_mod.MetricsWriter.log = log
    trainer_mod.Trainer.train_step = train_step
    start = {"wall": time.perf_counter(), "cpu": time.process_time()}
    sys.argv = [str(ROOT / "train.py"), *overrides]
    os.chdir(ROOT)
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    finally:
        windows.finish()
    with open(args.marks, "w") as handle:
        json.dump({"start": start, "marks": marks}, handle)


def reference_worker(args: argparse.Namespace) -> None:
    """transformers.Trainer configured like the reference recipe, over our padded run's samples in its order."""
    set_threads(args.threads)
    quiet_logs()
    with open(args.spec) as handle:
        spec = json.load(handle)

    import random

    import numpy as np
    import torch
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from llama2_sft.data.tokenize import prepare_dataset
    from llama2_sft.model import build_model, load_tokenizer, tokenizer_path

    cfg = compose(spec["overrides"])
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.padding_side = "right"
    data = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model))
    model = build_model(cfg.model, tokenizer, "fp32", "cpu", cfg.seed)  # the same init as train.py's

    indices = spec["indices"]
    columns = data.train[indices]
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
            for ids, labels in zip(columns["input_ids"], columns["labels"])]

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            return dict(rows[index])

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    marks: list[dict] = []
    windows = ProfileWindows(args.cprofile, args.torch_profile, args.profile_warmup, args.torch_profile_step)

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kwargs):
            marks.append({"step": 0, "wall": time.perf_counter(), "cpu": time.process_time(), "begin": True})

        def on_step_begin(self, a, state, control, **kwargs):
            windows.step_starts(state.global_step + 1)

        def on_step_end(self, a, state, control, **kwargs):
            marks.append({"step": state.global_step, "wall": time.perf_counter(), "cpu": time.process_time()})
            windows.step_done(state.global_step)

        def on_log(self, a, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                marks[-1]["loss"] = float(logs["loss"])

    training_args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum_steps"], max_steps=spec["steps"],
        learning_rate=RECIPE["lr"], adam_beta1=RECIPE["betas"][0], adam_beta2=RECIPE["betas"][1],
        adam_epsilon=RECIPE["eps"], weight_decay=RECIPE["weight_decay"], lr_scheduler_type=RECIPE["scheduler"],
        warmup_steps=RECIPE["warmup_ratio"], max_grad_norm=RECIPE["max_grad_norm"], logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=cfg.seed,
        dataloader_num_workers=0, gradient_checkpointing=bool(cfg.model.gradient_checkpointing),
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    trainer = InOrder(model=model, args=training_args, train_dataset=Rows(), data_collator=collator, callbacks=[Timer()])
    start = {"wall": time.perf_counter(), "cpu": time.process_time()}
    try:
        trainer.train()
    finally:
        windows.finish()
    with open(args.marks, "w") as handle:
        json.dump({"start": start, "marks": marks, "optimizer": type(trainer.optimizer.optimizer).__name__,
                   "optimizer_defaults": {k: v for k, v in trainer.optimizer.optimizer.defaults.items()
                                          if isinstance(v, (bool, int, float, str, type(None)))},
                   "optim": str(training_args.optim)}, handle)


# ---------------------------------------------------------------------------------------------------------------------
# Parent: plan, run, collect


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "PYTHONWARNINGS": "ignore"})
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_process(cmd: list[str], env: dict, log_path: Path) -> float:
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - started


def rates_from(records: list[dict], warmup: int) -> dict:
    """Aggregate rates over the measured steps (after `warmup`)."""
    measured = [r for r in records if r["step"] > warmup]
    sup = sum(r["supervised"] for r in measured)
    tok = sum(r["tokens"] for r in measured)
    out = {"steps": len(measured), "supervised_tokens": sup, "tokens": tok}
    for key in ("seconds", "wall", "cpu"):
        values = [r[key] for r in measured if r.get(key) is not None]
        if len(values) == len(measured) and values:
            total = sum(values)
            out[f"sup_per_s_{key}"] = sup / total
            out[f"tok_per_s_{key}"] = tok / total
            out[f"mean_step_{key}"] = total / len(values)
    return out


def interval_records(marks: list[dict]) -> dict[int, dict]:
    """Wall / CPU seconds between consecutive step records (step k: from record k-1, or the first mark, to k)."""
    out = {}
    for prev, cur in zip(marks, marks[1:]):
        out[cur["step"]] = {"wall": cur["wall"] - prev["wall"], "cpu": cur["cpu"] - prev["cpu"]}
    return out


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="bench_train_"))
        self.env = worker_env(args.threads)
        self.data_path = None
        if args.data == "realistic":
            from llama2_sft.data import synthetic as realistic_rows

            self.data_path = str(self.work / "rows.jsonl")
            realistic_rows.write_jsonl(realistic_rows.generate(args.realistic_rows, 0), self.data_path)
        self.cache_dir = str(self.work / "tokens")
        self.results_path = self.work / "results.jsonl"  # every finished run, appended (for --reuse after a crash)
        self.reused: dict[str, dict] = {}
        if args.reuse:
            with open(args.reuse) as handle:
                for line in handle:
                    if line.strip():
                        item = json.loads(line)
                        self.reused[item["key"]] = item["result"]
        self.common = common_overrides(args.data, self.data_path, self.cache_dir, args.max_length)
        self.counter = 0

    # --- data: tokenize once, derive the batch plan -----------------------------------------------------------
    def prepare(self) -> dict:
        import numpy as np

        from llama2_sft.data.packing import pack
        from llama2_sft.data.tokenize import prepare_dataset
        from llama2_sft.model import load_tokenizer, tokenizer_path

        quiet_logs()
        cfg = compose(self.common + shape_overrides("tiny"))
        tokenizer = load_tokenizer(cfg.model)
        started = time.perf_counter()
        data = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model))
        seconds = time.perf_counter() - started
        self.train = data.train
        self.seed = int(cfg.seed)
        self.pad_id = tokenizer.pad_token_id
        lengths = np.asarray(data.train["length"], dtype=np.int64)
        supervised = np.asarray(data.train["num_supervised"], dtype=np.int64)
        plan = pack(lengths, self.args.max_length, cfg.dataset.seed)
        samples_per_row = len(plan.items) / len(plan)
        micro = self.args.micro_batch_size
        global_batch = self.args.global_batch or max(micro, micro * round(samples_per_row * self.args.packed_rows / micro))
        if global_batch % micro:
            raise SystemExit(f"--global-batch {global_batch} is not a multiple of --micro-batch-size {micro}")
        self.plan = {"global_batch": global_batch, "micro_batch_size": micro, "grad_accum_steps": global_batch // micro,
                     "packed_rows": self.args.packed_rows, "samples_per_row": samples_per_row}
        if self.args.tuned:
            tuned_cfg = compose(with_overrides(self.common + shape_overrides("tiny"), [f"dataset.max_length={TUNED_LENGTH}"]))
            tuned = prepare_dataset(tuned_cfg.dataset, tokenizer, tokenizer_path(cfg.model))
            tuned_lengths = np.asarray(tuned.train["length"], dtype=np.int64)
            if len(tuned_lengths) != len(lengths) or int(tuned_lengths.sum()) != int(lengths.sum()):
                raise SystemExit(f"--tuned: max_length {TUNED_LENGTH} changes the samples (some are longer); not comparable")
            tuned_plan = pack(tuned_lengths, TUNED_LENGTH, cfg.dataset.seed)
            rows = max(1, round(self.args.packed_rows * self.args.max_length / TUNED_LENGTH))
            self.plan["tuned"] = {"max_length": TUNED_LENGTH, "rows_per_step": rows,
                                  "samples_per_row": len(tuned_plan.items) / len(tuned_plan),
                                  "plan_fill": float(tuned_plan.unit_lengths.sum()) / (len(tuned_plan) * TUNED_LENGTH)}
        return {"rows": len(lengths), "mean_len": float(lengths.mean()), "median_len": float(np.median(lengths)),
                "p90_len": float(np.percentile(lengths, 90)), "max_len": int(lengths.max()),
                "supervised_share": float(supervised.sum() / lengths.sum()), "packed_rows": len(plan),
                "samples_per_row": samples_per_row, "plan_fill": float(plan.unit_lengths.sum()) / (len(plan) * self.args.max_length),
                "cache_dir": cfg.dataset.cache_dir, "prepare_seconds": seconds, "skipped": data.summary.get("splits", {}).get("train", {}).get("skipped")}

    def padded_order(self, steps: int) -> list[list[int]]:
        """Our padded loader's sample ids per step (what train.py dataset.packing=false will train on)."""
        from llama2_sft.data.loader import BatchLayout, SFTLoader

        layout = BatchLayout(self.plan["micro_batch_size"], self.plan["grad_accum_steps"], 1)
        loader = SFTLoader(self.train, layout=layout, rank=0, pad_id=self.pad_id, seed=self.seed, packing=False,
                           max_length=self.args.max_length)
        out = []
        for _ in range(steps):
            if loader.step_in_epoch >= loader.steps_per_epoch:
                loader.epoch += 1
                loader.step_in_epoch = 0
            out.append([int(u) for u in loader.global_batch_units(loader.epoch, loader.step_in_epoch)])
            loader.step_in_epoch += 1
        return out

    # --- one run ----------------------------------------------------------------------------------------------
    def run(self, shape: str, method: str, steps: int, warmup: int, profile: bool = False) -> dict:
        self.counter += 1
        run_dir = self.work / f"run-{self.counter:03d}"
        run_dir.mkdir()
        marks_path = run_dir / "marks.json"
        extra = []
        if profile:
            extra = ["--cprofile", str(run_dir / "cprofile.out"), "--torch-profile", str(run_dir / "torch_profile.txt"),
                     "--torch-profile-step", str(steps), "--profile-warmup", str(warmup)]
        base = [sys.executable, str(Path(__file__).resolve()), "--threads", str(self.args.threads),
                "--marks", str(marks_path), *extra]
        overrides = self.common + shape_overrides(shape) + [f"trainer.max_steps={steps}", f"output_dir={run_dir / 'out'}"]
        if method == TUNED:
            overrides = with_overrides(overrides, [
                "dataset.packing=true", f"dataset.max_length={TUNED_LENGTH}", "model.compile=true",
                f"trainer.micro_batch_size={self.plan['tuned']['rows_per_step']}", "trainer.grad_accum_steps=1"])
            cmd = [*base, "--worker", "ours", "--", *overrides]
        elif method.startswith("ours"):
            packed = method == "ours (packed)"
            overrides += [f"dataset.packing={'true' if packed else 'false'}",
                          f"trainer.micro_batch_size={1 if packed else self.plan['micro_batch_size']}",
                          f"trainer.grad_accum_steps={self.plan['packed_rows'] if packed else self.plan['grad_accum_steps']}"]
            cmd = [*base, "--worker", "ours", "--", *overrides]
        else:
            order = self.padded_order(steps)
            spec = {"overrides": overrides, "indices": [i for step in order for i in step], "steps": steps,
                    "micro_batch_size": self.plan["micro_batch_size"], "grad_accum_steps": self.plan["grad_accum_steps"],
                    "output_dir": str(run_dir / "out")}
            spec_path = run_dir / "spec.json"
            spec_path.write_text(json.dumps(spec))
            cmd = [*base, "--worker", "reference", "--spec", str(spec_path)]
        process_seconds = run_process(cmd, self.env, run_dir / "log.txt")
        timing = json.loads(marks_path.read_text())
        intervals = interval_records(timing["marks"])
        records = []
        if method.startswith("ours"):
            with open(run_dir / "out" / "metrics.jsonl") as handle:
                metrics = [json.loads(line) for line in handle if line.strip()]
            for m in (m for m in metrics if "loss" in m):
                records.append({"step": m["step"], "supervised": m["num_supervised_tokens"], "tokens": m["num_tokens"],
                                "seconds": m["step_seconds"], "loss": m["loss"], **intervals.get(m["step"], {})})
        else:
            order = self.padded_order(steps)
            sup = self.train["num_supervised"]
            lengths = self.train["length"]
            losses = {m["step"]: m.get("loss") for m in timing["marks"]}
            for step, ids in enumerate(order, start=1):
                records.append({"step": step, "supervised": int(sum(sup[i] for i in ids)),
                                "tokens": int(sum(lengths[i] for i in ids)), "loss": losses.get(step),
                                **intervals.get(step, {})})
        result = {"shape": shape, "method": method, "steps": steps, "records": records,
                  "warmup": warmup, "rates": rates_from(records, warmup), "process_seconds": process_seconds}
        if method.startswith("reference"):
            result["optimizer"] = {k: timing.get(k) for k in ("optimizer", "optimizer_defaults", "optim")}
        if profile:
            profiled_steps = max(1, steps - warmup - 1)
            result["cprofile"] = summarize_cprofile(run_dir / "cprofile.out", "ours" if method.startswith("ours") else "reference",
                                                    profiled_steps) if (run_dir / "cprofile.out").exists() else []
            result["profiled_steps"] = profiled_steps
            path = run_dir / "torch_profile.txt"
            result["torch_profile"] = path.read_text() if path.exists() else None
        if not self.args.keep:
            shutil.rmtree(run_dir / "out" / "checkpoints", ignore_errors=True)
        return result

    def run_or_reuse(self, key: str, *args, **kwargs) -> dict:
        """`run`, unless a --reuse file holds this run already; every result is appended to results.jsonl."""
        if key in self.reused:
            result = self.reused[key]
            result["reused"] = True
        else:
            result = self.run(*args, **kwargs)
        with open(self.results_path, "a") as handle:
            handle.write(json.dumps({"key": key, "result": result}, default=str) + "\n")
        return result


def summarize_cprofile(path: Path, side: str, steps: int) -> list[dict]:
    """Cumulative seconds per optimizer step of the functions in PROFILE_FUNCTIONS[side]."""
    stats = pstats.Stats(str(path))
    rows = []
    for suffix, name, label in PROFILE_FUNCTIONS[side]:
        best = None
        for (filename, _line, function), (_cc, nc, tt, ct, _callers) in stats.stats.items():
            if function == name and filename.replace(os.sep, "/").endswith(suffix) and (best is None or ct > best[1]):
                best = (nc, ct, tt)
        if best:
            rows.append({"label": label, "calls": best[0], "cumulative_s": best[1], "per_step_s": best[1] / steps})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Report


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0, suffix=""):
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def count_params(shape: str, vocab: int) -> int:
    a = SHAPES[shape]
    h, i, n = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
    kv = h * a["num_key_value_heads"] // a["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * vocab * h + n * per_layer + h


def summarize(results: list[dict], shapes: list[str]) -> dict:
    table = {}
    for shape in shapes:
        table[shape] = {}
        for method in METHODS:
            runs = [r for r in results if r["shape"] == shape and r["method"] == method]
            if not runs:
                continue
            entry = {}
            for key in ("sup_per_s_seconds", "sup_per_s_wall", "sup_per_s_cpu", "tok_per_s_wall", "tok_per_s_cpu",
                        "mean_step_wall", "mean_step_cpu", "mean_step_seconds"):
                values = [r["rates"].get(key) for r in runs]
                entry[key] = median(values)
                entry[key + "_all"] = values
            entry["process_seconds"] = median([r["process_seconds"] for r in runs])
            entry["supervised_per_step"] = median([r["rates"]["supervised_tokens"] / max(1, r["rates"]["steps"]) for r in runs])
            entry["tokens_per_step"] = median([r["rates"]["tokens"] / max(1, r["rates"]["steps"]) for r in runs])
            table[shape][method] = entry
        ref = table[shape].get("reference (HF Trainer)")
        for method, entry in table[shape].items():
            for key in ("sup_per_s_wall", "sup_per_s_cpu"):
                entry[key.replace("sup_per_s", "ratio")] = (entry[key] / ref[key]) if ref and ref.get(key) and entry.get(key) else None
            entry["ratio_tok_wall"] = (entry["tok_per_s_wall"] / ref["tok_per_s_wall"]) \
                if ref and ref.get("tok_per_s_wall") and entry.get("tok_per_s_wall") else None
            # paired ratios: repetition i of this method over repetition i of the reference (run back to back)
            if ref:
                pairs = [a / b for a, b in zip(entry["sup_per_s_wall_all"], ref["sup_per_s_wall_all"]) if a and b]
                entry["paired_ratio_wall_median"] = median(pairs)
                entry["paired_ratio_wall_all"] = pairs
    return table


def loss_parity(results: list[dict], shape: str) -> dict | None:
    ours = [r for r in results if r["shape"] == shape and r["method"] == "ours (padded)"]
    ref = [r for r in results if r["shape"] == shape and r["method"] == "reference (HF Trainer)"]
    if not ours or not ref:
        return None
    a = {rec["step"]: rec["loss"] for rec in ours[0]["records"]}
    b = {rec["step"]: rec["loss"] for rec in ref[0]["records"] if rec.get("loss") is not None}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [abs(a[s] - b[s]) for s in common]
    return {"steps": len(common), "max_abs_diff": max(diffs), "ours": [a[s] for s in common], "reference": [b[s] for s in common]}


def write_png(path: Path, table: dict, shapes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5.2 * (len(shapes) + 1), 4.8))
    colors = {"ours (padded)": "#6baed6", "ours (packed)": "#08519c", "reference (HF Trainer)": "#999999", TUNED: "#31a354"}
    for ax, shape in zip(axes, shapes):
        methods = [m for m in METHODS if m in table[shape]]
        wall = [table[shape][m]["sup_per_s_wall"] for m in methods]
        cpu = [table[shape][m]["sup_per_s_cpu"] for m in methods]
        xs = range(len(methods))
        ax.bar([x - 0.2 for x in xs], wall, width=0.4, color=[colors[m] for m in methods], label="per wall-clock second")
        ax.bar([x + 0.2 for x in xs], cpu, width=0.4, color="none", edgecolor=[colors[m] for m in methods], hatch="//",
               label="per CPU second")
        for x, v in zip(xs, wall):
            ax.text(x - 0.2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([m.replace(" (", "\n(") for m in methods], fontsize=8)
        ax.set_ylabel("supervised tokens / s (median)")
        ax.set_title(f"{shape} model")
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels, values, colours = [], [], []
    for shape in shapes:
        for m in ("ours (padded)", "ours (packed)", TUNED):
            if m in table[shape] and table[shape][m].get("ratio_wall"):
                labels.append(f"{shape}\n{m.replace('ours ', '').replace(', ', chr(10))}")
                values.append(table[shape][m]["ratio_wall"])
                colours.append(colors[m])
    ax.bar(range(len(values)), values, color=colours)
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(GOAL_RATIO, color="red", ls="--", lw=1, label=f"goal {GOAL_RATIO:.0f}x")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ours / reference (supervised tokens/s, wall)")
    ax.set_title("ratio vs HF Trainer")
    ax.legend(fontsize=8)
    fig.suptitle("llama2_sft training loop vs transformers.Trainer — CPU, fp32", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_share(torch_profile: str | None) -> float | None:
    """Share of the step's self CPU time in scaled-dot-product attention kernels (forward + backward)."""
    if not torch_profile:
        return None
    share = 0.0
    for line in torch_profile.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) > 2 and "scaled_dot_product" in parts[0] and parts[1].endswith("%"):
            share += float(parts[1][:-1]) / 100
    return share


def cprofile_value(prof: dict | None, label_start: str) -> float | None:
    for row in (prof or {}).get("cprofile") or []:
        if row["label"].strip().startswith(label_start):
            return row["per_step_s"]
    return None


def observations(out: dict) -> list[str]:
    """Facts read off the profiles: optimizer cost, attention share, loop overhead."""
    lines = []
    profiles = out.get("profiles") or {}
    methods = [m for m in METHODS if any(f"{s}|{m}" in profiles for s in out["shapes"])]
    for shape in out["shapes"]:
        get = lambda m: profiles.get(f"{shape}|{m}")  # noqa: E731
        ours, ref = get("ours (padded)"), get("reference (HF Trainer)")
        if not ours or not ref:
            continue
        opt_ours = cprofile_value(ours, "optimizer step")
        opt_ref = cprofile_value(ref, "optimizer step")
        step_ours = cprofile_value(ours, "Trainer.train_step")
        if opt_ours and opt_ref and step_ours:
            lines.append(f"- {shape}: optimizer step {opt_ours * 1e3:,.1f} ms/step in our loop (`torch.optim.AdamW(fused=True)`: "
                         "`build_adamw(fused='auto')` fuses on CPU too) vs "
                         f"{opt_ref * 1e3:,.1f} ms/step for the reference (HF default `adamw_torch_fused`, fused on CPU too): "
                         f"{opt_ours / opt_ref:.1f}x, {opt_ours / step_ours:.1%} of our train_step.")
        shares = {m: attention_share((get(m) or {}).get("torch_profile")) for m in methods}
        text = ", ".join(f"{m} {v:.0%}" for m, v in shares.items() if v is not None)
        if text:
            lines.append(f"- {shape}: share of one step's CPU time in sdpa attention kernels (forward + backward, "
                         f"torch.profiler): {text}. Packed rows carry no attention mask; transformers turns the restarting "
                         "position_ids into a block-diagonal mask, and the CPU sdpa kernel works through the whole "
                         f"{out['args']['max_length']} x {out['args']['max_length']} score matrix of each row (masked, not "
                         f"skipped), of which only the blocks inside each of its ~{out['data']['samples_per_row']:.0f} "
                         "samples are needed.")
        overhead = sum(v for v in (cprofile_value(ours, label) for label in
                                   ("SFTLoader.next_step", "clip_grad_norm", "zero_grad", "MetricsWriter.log", "tqdm")) if v)
        overhead_ref = sum(v for v in (cprofile_value(ref, label) for label in
                                       ("Trainer.get_batch_samples", "Trainer._clip_grad_norm", "lr scheduler",
                                        "Trainer._maybe_log_save_evaluate", "callbacks")) if v)
        if step_ours:
            lines.append(f"- {shape}: per-step work outside forward / backward / optimizer (batch fetch + collation, "
                         f"clipping, zero_grad, metrics, progress bar): ours {overhead * 1e3:,.1f} ms "
                         f"({overhead / (step_ours + overhead):.1%} of the step), reference {overhead_ref * 1e3:,.1f} ms.")
    return lines


def write_markdown(path: Path, out: dict) -> None:
    args, table, shapes, data = out["args"], out["table"], out["shapes"], out["data"]
    plan = out["plan"]
    steps_text = ", ".join(f"{s}: {out['steps'][s]} ({out['warmups'][s]} warm-up)" for s in shapes)
    lines = [
        "# Training throughput on CPU: our loop vs transformers.Trainer", "",
        "Generated by `experiments/bench_train.py`; do not edit by hand. Raw figures: `bench_train.json`; chart: "
        "`bench_train.png`.", "",
        "Reproduce (from the repository root):", "", "```bash", out["command"], "```", "",
        "![bench_train.png](bench_train.png)", "",
        "## Setup", "",
        f"- Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, {out['machine']['platform']}; Python "
        f"{out['machine']['python']}, torch {out['machine']['torch']}, transformers {out['machine']['transformers']}.",
        f"- Load average (1/5/15 min) before: {out['load_before']}; after: {out['load_after']}. The machine is shared, so "
        "wall-clock rates are noisy; each process runs with "
        f"{args['threads']} intra-op thread(s) (OMP/MKL_NUM_THREADS), and rates per CPU-second of the process are given next to "
        "the wall-clock ones.",
        f"- Data: {out['data_description']}: {data['rows']:,} training samples, tokens per sample mean {data['mean_len']:.1f}, "
        f"median {data['median_len']:.0f}, p90 {data['p90_len']:.0f}, max {data['max_len']}; supervised share "
        f"{data['supervised_share']:.1%}; packed into rows of {args['max_length']}: {data['samples_per_row']:.1f} samples/row, "
        f"fill {data['plan_fill']:.1%}.",
        f"- Global batch: {plan['global_batch']} samples = micro-batch {plan['micro_batch_size']} x accumulation "
        f"{plan['grad_accum_steps']} (ours padded and the reference, identical samples in identical order); ours packed: "
        f"{plan['packed_rows']} row(s) of {args['max_length']} tokens per step (about {plan['samples_per_row'] * plan['packed_rows']:.1f} samples).",
        *([f"- `{TUNED}` (`--tuned`, configuration only, no code change): `dataset.packing=true "
           f"dataset.max_length={plan['tuned']['max_length']} model.compile=true` (decoder layers compiled by inductor; compile time falls in the uncounted warm-up steps), {plan['tuned']['rows_per_step']} rows "
           f"of {plan['tuned']['max_length']} per step ({plan['tuned']['samples_per_row']:.1f} samples/row, fill "
           f"{plan['tuned']['plan_fill']:.1%}); every sample is shorter than {plan['tuned']['max_length']}, so the samples are "
           "the same as at 512."] if plan.get("tuned") else []),
        f"- Both: fp32, AdamW lr {RECIPE['lr']}, betas {RECIPE['betas']}, weight decay {RECIPE['weight_decay']}, cosine "
        f"schedule with {RECIPE['warmup_ratio']:.0%} warmup, clipping {RECIPE['max_grad_norm']}, sdpa attention, no "
        "gradient checkpointing, same seeded init. Ours: defaults, i.e. `trainer.cross_entropy=fused` (LM head + loss in "
        f"chunks, supervised positions only) and `torch.optim.AdamW(fused=True)` (the package's `fused: auto` on CPU); reference: HF default `optim={out.get('reference_optim', {}).get('optim')}` "
        f"({out.get('reference_optim', {}).get('optimizer')}, fused={out.get('reference_optim', {}).get('optimizer_defaults', {}).get('fused')}).",
        f"- Steps per run: {steps_text}; warm-up steps are not "
        f"counted. Repetitions: {args['reps']}, alternating (methods rotated each repetition); medians, all values in the JSON.",
        f"- Runtime of the whole benchmark: {out['runtime_s'] / 60:.1f} min.", "",
        "## Supervised tokens/s (median over repetitions)", "",
        "| shape | params | method | sup. tok/step | sup. tok/s (metrics.jsonl step_seconds) | sup. tok/s wall | sup. tok/s per CPU-s | ours / reference (wall) | paired ratio (wall) | ours / reference (CPU) | real tok/s wall | ours / reference (real tokens) | process s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in shapes:
        for method in METHODS:
            e = table[shape].get(method)
            if not e:
                continue
            ratio = "" if method.startswith("reference") else f"**{fmt(e.get('ratio_wall'), 2, 'x')}**"
            paired = "" if method.startswith("reference") else fmt(e.get("paired_ratio_wall_median"), 2, "x")
            ratio_cpu = "" if method.startswith("reference") else fmt(e.get("ratio_cpu"), 2, "x")
            jsonl = fmt(e.get("sup_per_s_seconds"), 1) if method.startswith("ours") else "—"
            ratio_tok = "" if method.startswith("reference") else fmt(e.get("ratio_tok_wall"), 2, "x")
            lines.append(f"| {shape} | {out['params'][shape] / 1e6:.1f}M | {method} | {fmt(e['supervised_per_step'])} | {jsonl} | "
                         f"{fmt(e['sup_per_s_wall'], 1)} | {fmt(e['sup_per_s_cpu'], 1)} | {ratio} | {paired} | {ratio_cpu} | "
                         f"{fmt(e.get('tok_per_s_wall'), 0)} | {ratio_tok} | {fmt(e['process_seconds'])} |")
    tuned_on = any(TUNED in table[shape] for shape in shapes)
    lines += ["", "Goal: ours >= 2x the reference (supervised tokens/s, wall clock).", "",
              "| shape | ours padded / reference | ours packed / reference |" + (f" {TUNED} / reference |" if tuned_on else "")
              + " goal >= 2x met (as configured: padded or packed)? |",
              "|---|---:|---:|" + ("---:|" if tuned_on else "") + ":---:|"]
    for shape in shapes:
        padded = table[shape].get("ours (padded)", {}).get("ratio_wall")
        packed = table[shape].get("ours (packed)", {}).get("ratio_wall")
        tuned = table[shape].get(TUNED, {}).get("ratio_wall")
        best = max((v for v in (padded, packed) if v is not None), default=None)
        met = "yes" if best and best >= GOAL_RATIO else "no"
        if tuned_on:
            met += f" (tuned: {'yes' if tuned and tuned >= GOAL_RATIO else 'no'})"
        lines.append(f"| {shape} | {fmt(padded, 2, 'x')} | {fmt(packed, 2, 'x')} |" + (f" {fmt(tuned, 2, 'x')} |" if tuned_on else "")
                     + f" {met} |")
    lines += ["", "Notes:", ""]
    for shape in shapes:
        parity = out["loss_parity"].get(shape)
        if parity:
            lines.append(f"- Same work ({shape}): per-step losses of ours (padded) and the reference on the same samples, "
                         f"first repetition: max |difference| {parity['max_abs_diff']:.2e} over {parity['steps']} steps "
                         f"(ours {', '.join(f'{v:.4f}' for v in parity['ours'][:4])}...; reference "
                         f"{', '.join(f'{v:.4f}' for v in parity['reference'][:4])}...).")
    lines += [
        "- Wall-clock rates are measured between consecutive per-step records on both sides (ours: the step records "
        "`MetricsWriter.log` writes; reference: `on_step_end` callbacks), i.e. everything the loop does per step "
        "(batch fetch and collation, forward, backward, clipping, optimizer, scheduler, logging). The "
        "`metrics.jsonl` column is the package's own `step_seconds` (loader + train_step, without the metrics "
        "write and progress bar).",
        "- Per-step sample mix differs between padded and packed runs (packing takes whole packed rows in its own "
        "seeded order), so compare them per supervised token, not per step. With only a few measured steps per run the "
        "supervised share of those steps varies around the data set's "
        f"{data['supervised_share']:.1%}, which moves the supervised-token ratio of packed runs by +-20%; the real-token "
        "ratio (all non-padding tokens, the compute-bound quantity) does not have that sampling noise.",
    ]
    lines += out.get("notes", [])
    found = observations(out)
    if found:
        lines += ["", "## What limits our loop (from the profiles below)", ""] + found
    if out.get("profiles"):
        lines += ["", "## Profiles", "",
                  "One extra run per method and shape: cProfile over the steps after warm-up except the last (Python-level "
                  "cumulative seconds per optimizer step, profiler overhead included), then torch.profiler over the last step "
                  "(operators, self CPU time; cProfile off).", ""]
        for shape in shapes:
            for method in METHODS:
                prof = out["profiles"].get(f"{shape}|{method}")
                if not prof:
                    continue
                lines += [f"### {shape} — {method}", "", f"| function (cProfile, {prof.get('profiled_steps')} step(s)) | s / step |", "|---|---:|"]
                for row in prof.get("cprofile") or []:
                    lines.append(f"| {row['label']} | {row['per_step_s']:.4f} |")
                if prof.get("torch_profile"):
                    lines += ["", "<details><summary>torch.profiler, one step (top operators by self CPU time)</summary>", "",
                              "```", prof["torch_profile"].rstrip(), "```", "", "</details>"]
                lines.append("")
    path.write_text("\n".join(lines) + "\n")


def load_avg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,50m", help="comma-separated: tiny, 50m")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", choices=("embedded", "realistic"), default="embedded")
    parser.add_argument("--realistic-rows", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="per-device samples (the recipe's 4)")
    parser.add_argument("--global-batch", type=int, default=0,
                        help="samples per step for padded runs (0 = the multiple of the micro-batch closest to what --packed-rows hold)")
    parser.add_argument("--packed-rows", type=int, default=1, help="packed rows per step for ours (packed)")
    parser.add_argument("--steps-tiny", type=int, default=8)
    parser.add_argument("--steps-50m", type=int, default=4)
    parser.add_argument("--warmup-tiny", type=int, default=2, help="steps excluded from the rates (tiny)")
    parser.add_argument("--warmup-50m", type=int, default=1, help="steps excluded from the rates (50m)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tuned", action="store_true",
                        help=f"also run {TUNED!r}: packed rows of {TUNED_LENGTH} (same samples) + model.compile=true, "
                             "config-only changes")
    parser.add_argument("--keep", action="store_true", help="keep run directories (under the temp dir)")
    parser.add_argument("--out", default=str(HERE / "bench_train"), help="output prefix (.md / .png / .json)")
    parser.add_argument("--render", metavar="JSON", help="only re-render .md / .png from a results JSON (no runs)")
    parser.add_argument("--reuse", metavar="JSONL", help="results.jsonl of an interrupted run: its finished runs are reused")
    # worker mode (internal)
    parser.add_argument("--worker", choices=("ours", "reference"))
    parser.add_argument("--marks")
    parser.add_argument("--spec")
    parser.add_argument("--cprofile")
    parser.add_argument("--torch-profile")
    parser.add_argument("--torch-profile-step", type=int, default=3)
    parser.add_argument("--profile-warmup", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.worker == "ours":
        ours_worker(args, overrides)
        return 0
    if args.worker == "reference":
        reference_worker(args)
        return 0

    if args.render:
        out = json.loads(Path(args.render).read_text())
        out["table"] = summarize(out["results"], out["shapes"])
        out["loss_parity"] = {s: loss_parity(out["results"], s) for s in out["shapes"]}
        prefix = Path(args.out)
        write_png(prefix.with_suffix(".png"), out["table"], out["shapes"])
        write_markdown(prefix.with_suffix(".md"), out)
        return 0
    started = time.perf_counter()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for shape in shapes:
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
    steps = {"tiny": args.steps_tiny, "50m": args.steps_50m}
    warmups = {"tiny": args.warmup_tiny, "50m": args.warmup_50m}
    for shape in shapes:
        if steps[shape] <= warmups[shape] + (1 if args.profile else 0):
            raise SystemExit(f"--steps-{shape} must exceed --warmup-{shape} (by 2 with --profile)")
    load_before = load_avg()
    bench = Bench(args)
    data = bench.prepare()
    print(f"runs are appended to {bench.results_path} (rerun with --reuse PATH after a crash)", flush=True)
    print(f"data: {data['rows']} samples, mean {data['mean_len']:.1f} tokens, {data['samples_per_row']:.1f} samples per "
          f"packed row; plan {bench.plan}", flush=True)
    results = []
    for rep in range(args.reps):
        methods = [m for m in METHODS if m != TUNED or args.tuned]
        methods = methods[rep % len(methods):] + methods[: rep % len(methods)]
        for shape in shapes:
            for method in methods:
                result = bench.run_or_reuse(f"timing|{rep}|{shape}|{method}", shape, method, steps[shape], warmups[shape])
                result["rep"] = rep
                results.append(result)
                r = result["rates"]
                print(f"rep {rep} {shape:5s} {method:24s} sup tok/s wall {r.get('sup_per_s_wall', 0):9.1f} "
                      f"cpu {r.get('sup_per_s_cpu', 0):9.1f} (process {result['process_seconds']:.0f} s)", flush=True)
    profiles = {}
    if args.profile:
        for shape in shapes:
            for method in (m for m in METHODS if m != TUNED or args.tuned):
                result = bench.run_or_reuse(f"profile|{shape}|{method}", shape, method, steps[shape], warmups[shape], profile=True)
                profiles[f"{shape}|{method}"] = {"cprofile": result["cprofile"], "torch_profile": result["torch_profile"],
                                                 "rates": result["rates"], "profiled_steps": result["profiled_steps"]}
                print(f"profiled {shape} {method}", flush=True)
    table = summarize(results, shapes)
    vocab = 1024
    try:
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=str(ROOT / "data" / "tokenizer" / "tokenizer.model")).vocab_size()
    except Exception:  # noqa: BLE001
        pass
    reference_optim = next((r.get("optimizer") for r in results if r.get("optimizer")), {})
    description = ("the bundled `data/train.jsonl` (embedded dataset config, default_system none)"
                   if args.data == "embedded" else f"{args.realistic_rows:,} rows from `experiments/realistic_rows.py` "
                   "(default_system none)")
    out = {
        "command": " ".join(["python experiments/bench_train.py", *(a for i, a in enumerate(argv) if not (
            a.startswith("--reuse") or (i > 0 and argv[i - 1] == "--reuse")))]),
        "args": vars(args), "shapes": shapes, "steps": steps, "warmups": warmups, "plan": bench.plan, "data": data,
        "data_description": description + f" tokenized by `prepare_dataset` with `data/tokenizer`, max_length {args.max_length}",
        "machine": machine_info("torch", "transformers"), "load_before": load_before, "load_after": load_avg(),
        "params": {s: count_params(s, vocab) for s in shapes}, "table": table,
        "loss_parity": {s: loss_parity(results, s) for s in shapes}, "reference_optim": reference_optim,
        "runtime_s": time.perf_counter() - started, "results": results, "profiles": profiles,
    }
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".json"), "w") as handle:
        json.dump(out, handle, indent=1, default=str)
    write_png(prefix.with_suffix(".png"), table, shapes)
    write_markdown(prefix.with_suffix(".md"), out)
    print(prefix.with_suffix(".md").read_text())
    if not args.keep:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
