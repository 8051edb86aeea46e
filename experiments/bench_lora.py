#!/usr/bin/env python
"""LoRA and QLoRA against full fine-tuning, side by side in one run: what they store, what they need at the peak of a
step, and what a CPU step costs. Every figure comes from `train.py` itself (`+experiment=bench_throughput`, plus
`peft=none | lora | qlora`) or from the package's model builders; all three methods start from the same saved
random-init base (QLoRA quantizes a saved checkpoint), so they see the same weights and the same batches.

1. Storage: trainable parameters, checkpoint size on disk and optimizer-state bytes. Tiny shape (conf/model/tiny.yaml)
   measured: `train.py` saves a checkpoint at step 2 and the script sums its files (`du -b`). 7B shape computed: the
   architecture built on the meta device (`build_meta_model`, adapters included) counts the trainable parameters; a
   checkpoint holds them in fp32 plus AdamW's two fp32 moments (12 bytes each; the tiny row checks that rule).
2. Peak memory: `memory_model.py` for the 7B recipes (full: FSDP over 8 GPUs; LoRA and QLoRA: one GPU), and the same
   model against measured peaks on CPU at small shapes. Measured: `train.py` in a fresh process whose RSS high-water
   mark (VmHWM) is reset just after the model is built; the peak over the first steps minus the RSS before the build
   (interpreter, libraries, data) is the step's own memory. The estimate is given the measured row length and
   supervised share; glibc is told to return every allocation of 128 KiB and more at once (MALLOC_MMAP_THRESHOLD_),
   so RSS follows the live tensors.
3. Step time on CPU at the 50M shape: full, LoRA and QLoRA with the same batches, alternating order; medians of the
   timed steps' `step_seconds` (from metrics.jsonl) and their ratio to full fine-tuning.

    python experiments/bench_lora.py           # ~8 min on 2 cores
    python experiments/bench_lora.py --quick   # tiny shapes only, fewer steps: about a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (HERE, ROOT, child_env, command_line, fmt, machine_info, median, rotated, run_train,
                          write_results)
from memory_model import GIB, LLAMA2_7B, Run, Shape, estimate

METHODS = {"full": "none", "lora": "lora", "qlora": "qlora"}  # name -> peft.method
SHAPES = {  # LlamaConfig fields of the random-init bases; vocab None = the repo tokenizer's 1,024 pieces
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": None},  # conf/model/tiny.yaml
    "50m": {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 10, "num_attention_heads": 10,
            "num_key_value_heads": 10, "vocab_size": None},  # bench_train.py's 50M
    "116m-32k": {"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "num_key_value_heads": 8, "vocab_size": 32000},  # Llama-2's vocabulary: a 7B-sized head share
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
MEMORY_CASES = [("tiny", 256, 8, "fp32"), ("50m", 512, 4, "fp32"), ("116m-32k", 512, 2, "fp32"),  # shape, packed row
                ("50m", 512, 4, "bf16")]  # length, rows per step, precision (bf16: autocast, a bf16 base)
RECIPES_7B = {  # the 7B peaks: the recipes' micro-batches at their longest (4 samples of 4096 tokens, all supervised)
    "full (sft_7b: FSDP, 8 GPUs)": Run(method="none", strategy="fsdp", world_size=8),
    "lora (sft_7b_lora: 1 GPU)": Run(method="lora", grad_accum_steps=8, lora_r=16),
    "qlora (sft_7b_qlora: 1 GPU)": Run(method="qlora", grad_accum_steps=8, lora_r=16),
}
CHECKPOINT_BYTES_PER_TRAINABLE = 12  # fp32 weight + AdamW exp_avg + exp_avg_sq


# --- shared ---------------------------------------------------------------------------------------------------------
def save_base(shape: str, directory: Path) -> Path:
    """A random-init Llama of `shape` saved like a Hugging Face checkpoint (fp32) with the repo tokenizer: the stand-in
    for Llama-2-7b-chat that every method starts from (QLoRA needs a saved base to quantize)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = ROOT / "data" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    arch = {key: value for key, value in SHAPES[shape].items() if value is not None}
    arch.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.unk_token_id, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, **arch)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(directory)  # fp16 as Llama-2: loads copy, no mmap
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(tokenizer_dir / name, directory / name)
    return directory


def base_overrides(base: Path, method: str) -> list[str]:
    """Start from the saved base with `method`'s adapters."""
    return [f"model.name_or_path={base}", "model.arch=null", f"peft={METHODS[method]}"]


def data_overrides(work: Path, seq: int) -> list[str]:
    """Synthetic rows (shaped like instruction_merge_set) packed into rows of `seq` tokens, no eval split."""
    return ["dataset=jsonl", f"dataset.source={work / 'rows.jsonl'}", f"dataset.cache_dir={work / 'cache'}",
            "dataset.eval_fraction=0", "dataset.packing=true", f"dataset.max_length={seq}",
            "dataset.max_skipped_fraction=1.0", "dataset.num_proc=1"]


def du_bytes(path: Path) -> int:
    """Bytes of the files under `path` (`du -b`)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- 1. storage -----------------------------------------------------------------------------------------------------
def storage_measured(base: Path, work: Path, threads: int) -> dict:
    """Tiny shape: trainable parameters (metrics), checkpoint bytes on disk (a step-2 checkpoint) per method."""
    out = {}
    for method in METHODS:
        run_dir = work / f"storage-{method}"
        # the step-2 checkpoint is complete once step 3 is logged; the run is ended there
        records = run_train(base_overrides(base, method) + data_overrides(work, 256) + [
            "trainer.micro_batch_size=2", "trainer.save_steps=2", "trainer.max_steps=4"], run_dir, 3, threads, True)["records"]
        checkpoint = run_dir / "checkpoints" / "step_00000002"
        if not (checkpoint / "COMPLETE").exists():
            raise RuntimeError(f"{method}: no complete checkpoint at {checkpoint}")
        log = (run_dir / "train.log").read_text()
        out[method] = {"checkpoint_bytes": du_bytes(checkpoint), "model_optim_bytes": du_bytes(checkpoint / "model_optim"),
                       "trainable_params": _trainable_from_state(checkpoint), "log_tail": log[-300:],
                       "step_seconds": [r["step_seconds"] for r in records]}
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _trainable_from_state(checkpoint: Path) -> dict:
    """Trainable parameters and optimizer-state bytes, read from a checkpoint's DCP metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    from llama2_sft.inference.load import _QUANT_STATE

    metadata = FileSystemReader(str(checkpoint / "model_optim")).read_metadata().state_dict_metadata
    params = optim = 0
    for key, meta in metadata.items():
        size = getattr(meta, "size", None)
        if size is None:
            continue
        numel = 1
        for dim in size:
            numel *= dim
        if key.startswith("model.") and not _QUANT_STATE.search(key):  # a QLoRA base's 4-bit constants are not trained
            params += numel
        elif key.startswith("optimizer.state.") and (key.endswith(".exp_avg") or key.endswith(".exp_avg_sq")):
            optim += numel * 4
    return {"params": params, "optimizer_bytes": optim}


def storage_computed_7b() -> dict:
    """7B shape on the meta device: trainable parameters of each method at the recipes' rank 16 (QLoRA trains
    LoRA's adapters)."""
    from omegaconf import OmegaConf

    from llama2_sft.config import PeftConfig
    from llama2_sft.model import build_meta_model

    arch = dict(SHAPES["7b"], max_position_embeddings=4096, rms_norm_eps=1e-5)
    model_cfg = OmegaConf.create({"name_or_path": None, "arch": arch, "attn_implementation": "sdpa", "revision": None})

    class Tokenizer:  # what model_config reads from a tokenizer for a random init
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self) -> int:
            return 32000

    out = {}
    for method in ("full", "lora"):
        peft_cfg = OmegaConf.structured(PeftConfig(method=METHODS[method], r=16))  # the recipes' rank
        model = build_meta_model(model_cfg, Tokenizer(), "fp32", peft_cfg, "bf16")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[method] = {"total_params": total, "trainable_params": trainable,
                       "checkpoint_bytes": CHECKPOINT_BYTES_PER_TRAINABLE * trainable, "optimizer_bytes": 8 * trainable}
        del model
    out["qlora"] = dict(out["lora"])
    return out


# --- 2. measured peak memory (CPU) ------------------------------------------------------------------------------------
def _status() -> dict:
    """This process's RSS figures (bytes) from /proc/self/status."""
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def _trim() -> None:
    """Collect garbage and hand freed heap back to the system, so RSS is what is live."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, with bitsandbytes' quantization constants."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            total += 0 if getattr(state, "offset", None) is None else state.offset.numel() * 4
            state = getattr(state, "state2", None)
    return total


class AnonSampler:
    """Samples this process's anonymous RSS (RssAnon: heap and tensors, not the code pages that libraries fault in
    as new code paths run) every millisecond in a thread; torch releases the GIL in its kernels, so it keeps up."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status()["RssAnon"])

    def start(self) -> "AnonSampler":
        self.peak = _status()["RssAnon"]
        self._thread.start()
        return self


def rss_worker(spec_path: str) -> None:
    """Run train.py in this process with `spec`'s overrides; record memory before the model is built, reset the peaks
    after it is built, and write the peaks after `spec['steps']` steps (then end, skipping the final eval and save)."""
    started = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import bitsandbytes  # noqa: F401 - imported now, so that the libraries' own memory falls in the baseline
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import llama2_sft.model as model_module
    from llama2_sft.train import metrics

    state: dict = {"records": []}
    build = model_module.build_model

    def build_model(*args, **kwargs):
        _trim()
        state["before_build"] = {**_status(), "seconds": time.perf_counter() - started}
        model = build(*args, **kwargs)
        _trim()
        state["after_build"] = _status()
        state["model_tensor_bytes"] = _tensor_bytes(model)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: VmHWM := VmRSS, so the peaks below are training's, not loading's
        state["sampler"] = AnonSampler().start()
        return model

    log_step = metrics.MetricsWriter.log_step

    def logged(self, result, lr, seconds, totals, **kwargs):
        record = log_step(self, result, lr, seconds, totals, **kwargs)
        state["records"].append({"step": totals["step"], "loss": result.loss, "num_tokens": result.num_tokens,
                                 "num_supervised_tokens": result.num_supervised_tokens,
                                 "row_length": result.row_length, "step_seconds": seconds,
                                 "anon_peak": state["sampler"].peak, **_status()})
        if totals["step"] >= spec["steps"]:
            state.pop("sampler")
            state["seconds"] = time.perf_counter() - started
            Path(spec["out"]).write_text(json.dumps(state))
            os._exit(0)
        return record

    model_module.build_model = build_model
    metrics.MetricsWriter.log_step = logged
    sys.argv = ["train.py", "+experiment=bench_throughput", *spec["overrides"]]
    os.chdir(ROOT)
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    raise RuntimeError("train.py ended before the last measured step")


def measure_peak(overrides: list[str], steps: int, threads: int, work: Path, name: str) -> dict:
    """One train.py run in a fresh process under `rss_worker`: its peak anonymous memory over the steps, less what
    it held before the model was built."""
    spec = {"overrides": overrides + [f"output_dir={work / name}", f"trainer.max_steps={steps + 1}"], "steps": steps,
            "out": str(work / f"{name}.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(child_env(threads, cpu_only=True), MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-worker", str(spec_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0 or not Path(spec["out"]).exists():
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    state = json.loads(Path(spec["out"]).read_text())
    before, records = state["before_build"], state["records"]
    # two lower bounds of the anonymous peak: the sampled maximum, and the RSS peak less the file pages at the end
    sampled = max(r["anon_peak"] for r in records)
    hwm = max(r["VmHWM"] for r in records) - records[-1]["RssFile"]
    return {"peak_bytes": max(sampled, hwm) - before["RssAnon"], "sampled_peak_bytes": sampled - before["RssAnon"],
            "hwm_less_file_bytes": hwm - before["RssAnon"],
            "weights_anon_bytes": state["after_build"]["RssAnon"] - before["RssAnon"],
            "model_tensor_bytes": state["model_tensor_bytes"],
            "row_length": max(r["row_length"] for r in records),
            "supervised_fraction": max(r["num_supervised_tokens"] / max(1, r["num_tokens"]) for r in records),
            "losses": [r["loss"] for r in records], "seconds": state["seconds"],
            "seconds_to_build": before["seconds"], "records": records}


def memory_check(bases: dict[str, Path], work: Path, args: argparse.Namespace) -> list[dict]:
    """Each case x method: measured peak (CPU, full activation checkpointing) against the memory model."""
    out = []
    for shape, seq, rows, precision in args.memory_cases:
        for method in METHODS:
            overrides = base_overrides(bases[shape], method) + data_overrides(work, seq) + [
                f"trainer.micro_batch_size={rows}", "model.gradient_checkpointing=true", f"precision={precision}"]
            measured = measure_peak(overrides, args.memory_steps, args.threads, work, f"mem-{shape}-{precision}-{method}")
            config = json.loads((bases[shape] / "config.json").read_text())
            run = Run(method=METHODS[method], precision=precision, micro_batch_size=rows, seq_len=measured["row_length"],
                      supervised_fraction=measured["supervised_fraction"], device="cpu")
            model = estimate(Shape.of(config), run)
            entry = {"shape": shape, "seq": seq, "rows": rows, "precision": precision, "method": method, "measured": measured,
                     "model_peak_bytes": model.peak, "model_phase": model.peak_phase,
                     "model_components": model.components, "model_phases": model.phases,
                     "ratio": model.peak / measured["peak_bytes"]}
            out.append(entry)
            print(f"memory {shape} {precision} {method}: measured {measured['peak_bytes'] / 2**20:,.0f} MiB, model "
                  f"{model.peak / 2**20:,.0f} MiB ({entry['ratio']:.2f}x)", file=sys.stderr)
    return out


# --- 3. step time (CPU) -----------------------------------------------------------------------------------------------
def step_times(base: Path, work: Path, args: argparse.Namespace) -> dict:
    """Median `step_seconds` of the timed steps per method, the same batches, the order rotated per repetition."""
    runs: dict = {method: [] for method in METHODS}
    for rep in range(args.reps):
        for method in rotated(list(METHODS), rep):
            overrides = base_overrides(base, method) + data_overrides(work, args.seq) + [
                f"trainer.micro_batch_size={args.rows}", "model.gradient_checkpointing=true", "trainer.save_steps=0"]
            records = run_train(overrides, work / f"time-{rep}-{method}", args.steps, args.threads, True)["records"]
            runs[method].append([r["step_seconds"] for r in records[args.warmup:]])
            print(f"time rep {rep} {method}: {median(runs[method][-1]):.3f} s/step", file=sys.stderr)
    full = median(median(r) for r in runs["full"])
    out = {}
    for method, per_rep in runs.items():
        seconds = median(median(r) for r in per_rep)
        out[method] = {"step_seconds": seconds, "per_rep": per_rep, "vs_full": seconds / full}
    return out


def quick_step_times(storage: dict, args: argparse.Namespace) -> dict:
    """--quick: the step times of the tiny storage runs (2 rows of 256 tokens), the first --warmup steps dropped."""
    args.time_shape, args.rows, args.seq = "tiny", 2, 256
    full = median(storage["full"]["step_seconds"][args.warmup:])
    return {method: {"step_seconds": median(entry["step_seconds"][args.warmup:]),
                     "per_rep": [entry["step_seconds"][args.warmup:]],
                     "vs_full": median(entry["step_seconds"][args.warmup:]) / full} for method, entry in storage.items()}


def plot(plt, out: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    cases = out["memory"]
    labels = [f"{c['shape']} {c['precision']} {c['method']}" for c in cases]
    xs = list(range(len(cases)))
    left.bar([x - 0.2 for x in xs], [c["measured"]["peak_bytes"] / 2**20 for c in cases], 0.4, label="measured (CPU)")
    left.bar([x + 0.2 for x in xs], [c["model_peak_bytes"] / 2**20 for c in cases], 0.4, label="memory_model.py")
    left.set_xticks(xs, labels, fontsize=7, rotation=40, ha="right")
    left.set_ylabel("peak step memory (MiB, log)")
    left.set_yscale("log")
    left.legend()
    left.set_title("peak memory: model vs measured")
    names = list(out["recipes_7b"])
    right.barh(names, [out["recipes_7b"][n]["peak_gib"] for n in names])
    right.set_xlabel("GiB per GPU (computed)")
    right.set_title("7B recipes, micro-batch 4 x 4096 tokens")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run (the first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--time-shape", default="50m")
    parser.add_argument("--seq", type=int, default=512, help="packed row length of the timed runs")
    parser.add_argument("--rows", type=int, default=4, help="rows per step of the timed runs")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes only, one repetition, fewer steps")
    parser.add_argument("--out", default=str(HERE / "bench_lora"), help="output prefix (.json / .md / .png)")
    args = parser.parse_args(argv)
    args.memory_cases = MEMORY_CASES
    if args.quick:
        args.reps, args.steps, args.time_shape, args.memory_cases = 1, 3, "tiny", [MEMORY_CASES[0]]
    started = time.time()
    from llama2_sft.data.synthetic import generate, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    try:
        write_jsonl(generate(400, seed=0), str(work / "rows.jsonl"))
        shapes = {"tiny", args.time_shape} | {case[0] for case in args.memory_cases}
        bases = {shape: save_base(shape, work / f"base-{shape}") for shape in sorted(shapes)}
        storage = storage_measured(bases["tiny"], work, args.threads)
        memory = memory_check(bases, work, args)
        # --quick (a plumbing check) times the storage runs' steps instead of running three more processes
        timing = quick_step_times(storage, args) if args.quick else step_times(bases[args.time_shape], work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    computed = storage_computed_7b()
    recipes = {}
    for name, run in RECIPES_7B.items():
        settings = {**run.__dict__, "precision": "bf16", "micro_batch_size": 4, "seq_len": 4096}
        estimate_7b = estimate(LLAMA2_7B, Run(**settings))
        recipes[name] = {"peak_gib": estimate_7b.peak_gib, "phase": estimate_7b.peak_phase,
                         "components_gib": estimate_7b.gib}
    for entry in storage.values():  # the 12-bytes-per-trainable rule, checked on the tiny checkpoint
        entry["model_optim_bytes_per_trainable"] = entry["model_optim_bytes"] / entry["trainable_params"]["params"]
    out = {"command": command_line("bench_lora.py", argv),
           "machine": machine_info("torch", "transformers", "peft", "bitsandbytes"),
           "args": {k: v for k, v in vars(args).items()}, "storage_tiny": storage, "storage_7b": computed,
           "memory": memory, "recipes_7b": recipes, "step_time": timing, "runtime_s": time.time() - started}
    header = ["what", "full", "lora", "qlora"]
    rows = [["trainable params, 7B (computed)", *(fmt(computed[m]["trainable_params"]) for m in METHODS)],
            ["checkpoint GB (fp32 weights + AdamW), 7B", *(fmt(computed[m]["checkpoint_bytes"] / 1e9, ",.2f")
                                                          for m in METHODS)],
            ["peak GiB per GPU, 7B recipe (computed)", *(f"{recipes[n]['peak_gib']:.1f}" for n in RECIPES_7B)],
            ["trainable params, tiny", *(fmt(storage[m]["trainable_params"]["params"]) for m in METHODS)],
            ["checkpoint bytes, tiny (measured)", *(fmt(storage[m]["checkpoint_bytes"]) for m in METHODS)],
            ["checkpoint model+optimizer bytes per trainable, tiny",
             *(f"{storage[m]['model_optim_bytes_per_trainable']:.1f}" for m in METHODS)]]
    for case_shape, seq, rows_per_step, precision in args.memory_cases:
        entries = {c["method"]: c for c in memory
                   if (c["shape"], c["seq"], c["precision"]) == (case_shape, seq, precision)}
        rows.append([f"peak MiB measured / model, {case_shape} {precision} {rows_per_step}x{seq}",
                     *(f"{entries[m]['measured']['peak_bytes'] / 2**20:,.0f} / "
                       f"{entries[m]['model_peak_bytes'] / 2**20:,.0f} ({entries[m]['ratio']:.2f}x)" for m in METHODS)])
    rows.append([f"CPU s/step, {args.time_shape} {args.rows}x{args.seq} (vs full)",
                 *(f"{timing[m]['step_seconds']:.3f} ({timing[m]['vs_full']:.2f}x)" for m in METHODS)])
    write_results(Path(args.out), "LoRA and QLoRA against full fine-tuning: storage, peak memory, CPU step time", out,
                  header, rows, plot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rss-worker"]:
        rss_worker(sys.argv[2])
    else:
        sys.exit(main())
