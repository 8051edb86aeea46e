#!/usr/bin/env python
"""One-GPU training-step benchmark: `train.py` itself at the Llama-2-7B (and ~1.3B) shape, random init, bf16, packed
4096-token rows, with the package's fast-path switches side by side.

Every variant is a set of overrides of `python train.py +experiment=bench_throughput strategy=single precision=bf16`
(fp32 master weights and AdamW state, bf16 autocast compute: what one GPU trains with), run in a fresh process for
`--warmup` + `--steps` optimizer steps; the table gives the medians of the timed steps' `metrics.jsonl` records
(`step_seconds`, `tokens_per_s`, `mfu`, `peak_memory_gb`), so it measures exactly what a training run logs.
Repetitions rotate the variant order. Variants change one switch from the baseline (full activation checkpointing,
sdpa, no compile, `trainer.cross_entropy=logits`), then combine the fast ones:

* `model.attn_implementation=flash_attention_2` (varlen kernels over packed rows; needs CUDA and `flash_attn`);
* `model.checkpoint_policy=selective`, `model.checkpoint_every_n_layers=2`, `model.gradient_checkpointing=false`;
* `model.compile=true` (inductor on CUDA, aot_eager on CPU);
* `trainer.cross_entropy=fused` (the package default);
* `peft.method=lora` and `qlora` (the one-GPU recipes' methods; QLoRA loads a random-init base saved in bf16 first).

Data: rows of `llama2_sft.data.synthetic` (shaped like instruction_merge_set), tokenized by the repo tokenizer and
packed into rows of `--seq` tokens. The model's vocabulary is Llama-2's 32,000 whatever the tokenizer, so the LM
head costs what it costs in the recipe. MFU is the trainer's (PaLM formula, peak by device name or `--peak-tflops`).

    python experiments/bench_gpu.py                    # CUDA: 1.3b and 7b, every variant (~1 min per process at 7B)
    python experiments/bench_gpu.py --quick            # CUDA: 7b, five variants, one repetition
    python experiments/bench_gpu.py --device cpu       # CPU plumbing check: tiny shape, fp32, 128-token rows (< 1 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_common import HERE, command_line, fmt, machine_info, median, rotated, run_train, write_results

SHAPES = {  # model.arch of a random-init Llama; vocab None = the tokenizer's (1,024 pieces)
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "max_position_embeddings": 4096, "vocab_size": 32000},
    "1.3b": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 16, "max_position_embeddings": 4096, "vocab_size": 32000},
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 256, "vocab_size": None},
}
BASELINE = {"model.attn_implementation": "sdpa", "model.gradient_checkpointing": "true", "model.checkpoint_policy": "full",
            "model.checkpoint_every_n_layers": "1", "model.compile": "false", "trainer.cross_entropy": "logits",
            "peft.method": "none"}
FLASH, SELECTIVE = {"model.attn_implementation": "flash_attention_2"}, {"model.checkpoint_policy": "selective"}
COMPILE, FUSED = {"model.compile": "true"}, {"trainer.cross_entropy": "fused"}
VARIANTS = {  # name -> what it changes from the baseline
    "baseline": {},
    "flash-attn varlen": FLASH,
    "selective AC": SELECTIVE,
    "AC every 2nd layer": {"model.checkpoint_every_n_layers": "2"},
    "no AC": {"model.gradient_checkpointing": "false"},
    "compile": COMPILE,
    "CE fused": FUSED,
    "combined sdpa": {**SELECTIVE, **COMPILE, **FUSED},
    "combined": {**FLASH, **SELECTIVE, **COMPILE, **FUSED},
    # sft_7b_lora / sft_7b_qlora's methods (rank 8 on every decoder linear; QLoRA's base saved, then loaded in NF4)
    "LoRA": {**FUSED, "peft.method": "lora"},
    "QLoRA": {**FUSED, "peft.method": "qlora"},
}
QUICK = ("baseline", "flash-attn varlen", "selective AC", "CE fused", "combined")


def why_not_flash(device: str) -> str | None:
    """None when flash_attention_2 can run here, else why not."""
    if device != "cuda":
        return "flash-attention needs a CUDA device"
    return None if importlib.util.find_spec("flash_attn") else "flash_attn is not installed"


def settings(variant: str) -> dict:
    """The baseline's switches with the variant's changes applied."""
    return {**BASELINE, **VARIANTS[variant]}


def save_base(shape: str, directory: Path) -> Path:
    """A random-init Llama of `shape` saved in bf16 (QLoRA quantizes a saved checkpoint; LoRA and full fine-tuning
    initialise the same shape in memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return directory
    arch = {key: value for key, value in SHAPES[shape].items() if value is not None}
    arch.setdefault("vocab_size", 1024)  # the repo tokenizer's pieces
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         **arch)
    with torch.device("cpu"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def overrides(shape: str, variant: str, args: argparse.Namespace, data: Path) -> list[str]:
    """train.py overrides of one run: model shape, data, precision, then the variant's switches."""
    arch = [f"++model.arch.{key}={value}" for key, value in SHAPES[shape].items() if value is not None]
    if settings(variant)["peft.method"] == "qlora":
        arch = [f"model.name_or_path={save_base(shape, data / f'base-{shape}')}", "model.arch=null"]
    out = arch + [
        "dataset=jsonl", f"dataset.source={data / 'rows.jsonl'}", f"dataset.cache_dir={data / 'cache'}",
        "dataset.eval_fraction=0", "dataset.packing=true", f"dataset.max_length={args.seq}",
        "dataset.max_skipped_fraction=1.0", "dataset.num_proc=1", f"trainer.micro_batch_size={args.rows}",
        "trainer.grad_accum_steps=1", "strategy=single", f"precision={'bf16' if args.device == 'cuda' else 'fp32'}",
        f"model.compile_backend={args.compile_backend}",
    ] + [f"{key}={value}" for key, value in settings(variant).items()]
    return out + ([f"trainer.peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])


def summarize(runs: list[dict], warmup: int) -> dict:
    """Medians over the timed steps (after `warmup`) of every repetition of one variant."""
    timed = [r for run in runs for r in run["records"][warmup:]]
    if not timed:
        return {}
    return {"step_seconds": median(r["step_seconds"] for r in timed),
            "tokens_per_s": median(r["tokens_per_s"] for r in timed),
            "supervised_per_s": median(r["num_supervised_tokens"] / r["step_seconds"] for r in timed),
            "mfu": median(r.get("mfu") for r in timed),
            "peak_memory_gb": max((r.get("peak_memory_gb") or 0) for r in timed) or None,  # None on CPU
            "loss_first": runs[0]["records"][0]["loss"], "loss_last": runs[0]["records"][-1]["loss"]}


def plot(plt, out: dict):
    """Tokens/s and peak memory per variant, one row of panels per shape."""
    shapes = list(out["results"])
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.2 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes):
        done = {n: e for n, e in out["results"][shape].items() if e.get("tokens_per_s")}
        for ax, key, label in ((row[0], "tokens_per_s", "tokens / s (median step)"),
                               (row[1], "peak_memory_gb", "peak memory GB (n/a on CPU)")):
            ax.barh(list(done), [e.get(key) or 0 for e in done.values()])
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(f"{shape}: {label.split(' (')[0]}", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--shapes", default=None, help="7b, 1.3b, tiny (default: 1.3b,7b on CUDA, tiny on CPU)")
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all; --quick: a subset)")
    parser.add_argument("--quick", action="store_true", help="fewer variants and shapes, one repetition")
    parser.add_argument("--seq", type=int, default=None, help="packed row length (default 4096; 128 on CPU)")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
    parser.add_argument("--reps", type=int, default=None, help="default 2 (1 with --quick or on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (compilation falls here)")
    parser.add_argument("--samples", type=int, default=3000, help="synthetic rows to pack")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by device name (H100/H200: 989)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads per run")
    parser.add_argument("--out", default=str(HERE / "bench_gpu"), help="output prefix (.json / .md / .png)")
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = args.device == "cpu"
    shapes = (args.shapes or ("tiny" if on_cpu else "7b" if args.quick else "1.3b,7b")).split(",")
    names = args.variants.split(",") if args.variants else list(QUICK if args.quick else VARIANTS)
    unknown = [n for n in names if n not in VARIANTS] + [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown variants / shapes {unknown}: {', '.join(VARIANTS)} / {', '.join(SHAPES)}")
    args.seq = args.seq or (128 if on_cpu else 4096)
    args.reps = args.reps or (1 if args.quick or on_cpu else 2)
    args.compile_backend = "aot_eager" if on_cpu else "inductor"
    flash = [n for n in names if settings(n)["model.attn_implementation"] == "flash_attention_2"]
    skipped = {n: why_not_flash(args.device) for n in flash if why_not_flash(args.device)}
    runnable = [n for n in names if n not in skipped]

    from llama2_sft.data import synthetic

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    synthetic.write_jsonl(synthetic.generate(args.samples, seed=0), str(work / "rows.jsonl"))
    runs = {shape: {n: [] for n in runnable} for shape in shapes}
    errors: dict[str, dict[str, str]] = {shape: {} for shape in shapes}
    try:
        for rep in range(args.reps):
            for shape in shapes:
                for name in rotated(runnable, rep):
                    if name in errors[shape]:
                        continue
                    run_dir = work / f"{shape}-{name.replace(' ', '_')}-{rep}"
                    try:
                        run = run_train(overrides(shape, name, args, work), run_dir, args.warmup + args.steps,
                                        args.threads, cpu_only=on_cpu)
                    except RuntimeError as error:  # an OOM or a missing kernel: record it, go on with the rest
                        errors[shape][name] = str(error).strip().splitlines()[-1][:300]
                        print(f"{shape} {name}: {errors[shape][name]}", file=sys.stderr)
                        continue
                    runs[shape][name].append(run)
                    shutil.rmtree(run_dir, ignore_errors=True)  # a killed run may leave a partial checkpoint
                    last = run["records"][-1]
                    print(f"rep {rep} {shape} {name}: {last['step_seconds']:.3f} s/step, {last['tokens_per_s']:,.0f} tok/s",
                          file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {shape: {n: {"settings": settings(n), **summarize(runs[shape][n], args.warmup)} for n in runnable}
               for shape in shapes}
    for shape in shapes:
        for name, reason in {**skipped, **errors[shape]}.items():
            results[shape][name] = {"settings": settings(name), "note": reason}
    out = {"command": command_line("bench_gpu.py", argv), "machine": machine_info("torch", "transformers"),
           "args": vars(args), "results": results, "runs": runs, "runtime_s": time.time() - started}
    header = ["shape", "variant", "peft", "attention", "AC", "compile", "CE", "step s", "tokens/s", "sup. tokens/s", "MFU",
              "peak GB", "loss first -> last", "note"]
    rows = []
    for shape, variants in results.items():
        for name, e in variants.items():
            s = e["settings"]
            ac = "none" if s["model.gradient_checkpointing"] == "false" else s["model.checkpoint_policy"] + (
                " every 2nd" if s["model.checkpoint_every_n_layers"] == "2" else "")
            loss = f"{e['loss_first']:.3f} -> {e['loss_last']:.3f}" if "loss_first" in e else ""
            rows.append([shape, name, s["peft.method"], s["model.attn_implementation"], ac, "on" if s["model.compile"] == "true" else "off",
                         s["trainer.cross_entropy"], fmt(e.get("step_seconds"), ".3f"), fmt(e.get("tokens_per_s")),
                         fmt(e.get("supervised_per_s")), fmt(e.get("mfu"), ".1%"), fmt(e.get("peak_memory_gb"), ".1f"),
                         loss, e.get("note", "")])
    title = f"Training step on one {'GPU' if not on_cpu else 'CPU (plumbing check, not a GPU figure)'}"
    write_results(Path(args.out), title, out, header, rows, plot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
