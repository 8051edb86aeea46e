#!/usr/bin/env python
"""Single-GPU training-step benchmark: Llama-2-7B (and ~1.3B) shapes, random init, bf16, packed 4096-token rows,
activation checkpointing; tokens/s, MFU and peak memory, variants side by side in one run.

What one step is (the same work as an optimizer step of `llama2_sft.trainer.Trainer` on one device):

* data: packed rows of `--seq` tokens (whole synthetic samples with a long-tailed length distribution, the last one
  of a row cut to fill it, so there is no padding), built by `llama2_sft.data.collate.collate_packed`: positions
  restart per sample and no attention mask is passed (`use_cache=False`), so attention stays within a sample
  (a block-diagonal mask for sdpa, varlen kernels for flash-attention);
* forward through `llama2_sft.model.forward_logits`, loss = summed token cross-entropy / supervised tokens,
  backward, gradient clipping at 1.0, AdamW (`llama2_sft.optim.build_adamw`: fused on CUDA), zero_grad.

Precision (`--precision`; the compute dtype is `--compute-dtype`, bf16 by default on CUDA):

* `fsdp` (default; what `strategy=fsdp precision=bf16` does): the model is wrapped like `FSDPStrategy` wraps it
  (`fully_shard` per decoder layer + the root) on a one-rank process group, so parameters and AdamW state stay fp32
  (the master copy), are cast to bf16 for compute and gradients are reduced in fp32: 16 bytes per parameter;
* `pure`: parameters, gradients and AdamW state all in the compute dtype (pure bf16 + fused AdamW on CUDA): 8 bytes
  per parameter, no fp32 master copy (not what the package trains with; shown for memory / speed headroom).

On CPU (`--device cpu`, a plumbing check) the defaults are one intra-op thread, fp32 compute (bf16 matmuls have no
fast path on AVX2 CPUs: about 40x slower than fp32 here), a 128-token row, fewer steps, and torch.compile with the
aot_eager backend; MFU and peak memory are n/a.

Variants (one factor at a time from the baseline, then the combination):

* attention: `sdpa` (block-diagonal mask from position_ids) vs `flash_attention_2` (varlen; skipped with a note when
  `flash_attn` is not importable or the device is not CUDA);
* activation checkpointing (`llama2_sft.model.enable_activation_checkpointing`): `full` (every decoder layer, as
  `model.gradient_checkpointing=true`), `selective` (`model.checkpoint_policy=selective`: matmul and attention outputs
  kept, the cheap ops between them recomputed), `alternate` (every other layer, `model.checkpoint_every_n_layers=2`),
  `none`;
* `torch.compile` of each decoder layer on / off (`--compile-backend`, inductor on CUDA; aot_eager on CPU by default);
* cross-entropy: `logits` (`trainer.cross_entropy=logits`: the model's bf16 logits, then fp32 chunks of 4096
  positions), `full` (plain `F.cross_entropy` over the whole fp32-upcast logits), `fused` (`trainer.cross_entropy=fused`,
  the package default: `llama2_sft.loss.linear_cross_entropy`, LM head + loss in chunks of 2048 positions, gradients
  computed in the same pass; the [tokens, vocab] logits never exist whole).

MFU by the PaLM definition: tokens/s x (6 N + 12 L H Q T) / peak, N = all parameters, T = `--seq`, peak = 989
TFLOP/s dense bf16 (H100 / H200; `llama2_sft.metrics.peak_flops`), or `--peak-tflops`; computed by
`llama2_sft.metrics.model_flops_utilization`, as the trainer's `mfu` in metrics.jsonl. On CPU MFU is n/a.

Repetitions alternate over the variants (`--reps`, variants rotated each repetition); each block runs `--warmup`
unmeasured steps then `--steps` timed steps; tables give medians. Results next to this script: bench_gpu.md,
bench_gpu.json, bench_gpu.png (or `--out PREFIX`).

    python experiments/bench_gpu.py                          # CUDA: 7b and 1.3b, all variants (a few minutes on an H200)
    python experiments/bench_gpu.py --quick                  # fewer variants and steps
    python experiments/bench_gpu.py --device cpu --shape tiny # plumbing check on CPU, well under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llama2_sft.data.chat import IGNORE_INDEX  # noqa: E402
from llama2_sft.data.collate import collate_packed  # noqa: E402
from llama2_sft.loss import batch_loss_sum, forward_logits, install_fused_head, uses_varlen_kernels  # noqa: E402
from llama2_sft.metrics import flops_per_token, model_flops_utilization, peak_flops  # noqa: E402
from llama2_sft.model import selective_checkpoint_context, count_parameters, enable_activation_checkpointing, reset_rotary_buffers  # noqa: E402
from llama2_sft.optim import build_adamw  # noqa: E402

GOAL_MFU = 0.50
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
H200_MEMORY_GB = 141.0
PRESETS = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "1.3b": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 16, "vocab_size": 32000},
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 1024},
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    attn: str = "sdpa"  # sdpa | flash_attention_2
    ac: str = "full"  # full | selective (op-level: keep matmul + attention outputs) | alternate (every 2nd layer) | none
    compile: bool = False
    ce: str = "logits"  # logits (model logits + fp32 chunked CE) | full (one fp32 upcast) | fused (package default)

    def describe(self) -> str:
        return f"attn={self.attn} ac={self.ac} compile={'on' if self.compile else 'off'} ce={self.ce}"


BASELINE = Variant("baseline")
ALL_VARIANTS = [
    BASELINE,
    Variant("flash-attn varlen", attn="flash_attention_2"),
    Variant("selective AC", ac="selective"),
    Variant("AC every 2nd layer", ac="alternate"),
    Variant("no AC", ac="none"),
    Variant("compile", compile=True),
    Variant("CE full logits", ce="full"),
    Variant("CE fused", ce="fused"),
    Variant("combined sdpa", ac="selective", compile=True, ce="fused"),
    Variant("combined", attn="flash_attention_2", ac="selective", compile=True, ce="fused"),
]
QUICK_NAMES = ("baseline", "flash-attn varlen", "selective AC", "compile", "CE fused", "combined sdpa", "combined")


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and FLOPs


def param_count(shape: str) -> int:
    """Parameters of a preset (untied embeddings and LM head, RMSNorm weights, no biases)."""
    p = PRESETS[shape]
    h, i, n, v = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"], p["vocab_size"]
    kv = h * p["num_key_value_heads"] // p["num_attention_heads"]
    return 2 * v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def shape_flops_per_token(shape: str, seq: int, num_params: int | None = None) -> float:
    p = PRESETS[shape]
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    return flops_per_token(num_params or param_count(shape), p["num_hidden_layers"], p["num_attention_heads"], head_dim, seq)


def flash_attn_status(device: torch.device) -> str | None:
    """None when flash_attention_2 can run here, else why not."""
    if device.type != "cuda":
        return "flash-attention needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not importable (pip install flash-attn)"
    try:
        import flash_attn  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"flash_attn import failed: {error}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Data: packed rows


def packed_batches(num_batches: int, rows: int, seq: int, vocab: int, seed: int = 0, mean_len: int = 520,
                   prompt_share: float = 0.4) -> list[dict]:
    """`num_batches` micro-batches of `rows` packed rows of exactly `seq` tokens (no padding), via collate_packed."""
    gen = torch.Generator().manual_seed(seed)
    sigma = 0.9
    mu = math.log(mean_len) - sigma * sigma / 2  # log-normal with the given mean (long tail, like chat SFT data)
    batches = []
    for _ in range(num_batches):
        units = []
        for _ in range(rows):
            unit, filled = [], 0
            while filled < seq:
                length = int(math.exp(mu + sigma * float(torch.randn((), generator=gen))))
                length = max(8, min(length, seq - filled))
                if seq - filled - length < 8:  # do not leave a sliver: extend to fill the row
                    length = seq - filled
                ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
                ids[0] = 1  # BOS
                prompt = max(1, int(length * prompt_share))
                labels = [IGNORE_INDEX] * prompt + ids[prompt:]
                unit.append({"input_ids": ids, "labels": labels})
                filled += length
            units.append(unit)
        batches.append(collate_packed(units, pad_id=0))
    return batches


# ---------------------------------------------------------------------------------------------------------------------
# Model


class StepModule(torch.nn.Module):
    """The FSDP root: the Llama model plus the loss, so embeddings, final norm and LM head form the root group as in
    FSDPStrategy, and the fused-CE variant can call the LM head inside the root's forward."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.ce = "logits"
        install_fused_head(lm, chunk_size=2048)  # trainer.ce_chunk_size default; lm(...) without targets is unchanged

    def forward(self, batch: dict) -> torch.Tensor:
        varlen = uses_varlen_kernels(self.lm.config._attn_implementation)  # segment boundaries for flash-attention
        if self.ce != "full":  # the package's loss (trainer.cross_entropy=fused | logits), inside the FSDP root's forward
            return batch_loss_sum(self.lm, batch, fused=self.ce == "fused", varlen=varlen)
        logits = forward_logits(self.lm, batch, varlen)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["target_ids"].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")


def _layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    return list(lm.model.layers)


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A one-process torch.distributed group (FSDP2 needs a mesh); reuses an existing one-rank group."""
    import torch.distributed as dist

    created = False
    tmp = None
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("bench_gpu runs on one rank; a multi-rank process group is already initialised")
    else:
        tmp = tempfile.NamedTemporaryFile(prefix="bench_gpu_store_", delete=False)
        tmp.close()
        store = dist.FileStore(tmp.name, 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
            with contextlib.suppress(OSError):
                os.unlink(tmp.name)


class StepBench:
    """One model + optimizer whose variant (attention, checkpointing, compile, loss) can be switched between steps."""

    def __init__(self, shape: str, device: torch.device, precision: str = "fsdp", compile_backend: str | None = None,
                 want_compile: bool = True, seed: int = 0, lr: float = 2e-5, compute_dtype: torch.dtype = torch.bfloat16,
                 max_position_embeddings: int = 4096):
        from transformers import LlamaConfig, LlamaForCausalLM

        if precision not in ("fsdp", "pure"):
            raise ValueError(f"precision {precision!r}: fsdp | pure")
        self.shape, self.device, self.precision, self.compute_dtype = shape, device, precision, compute_dtype
        preset = PRESETS[shape]
        config = LlamaConfig(**preset, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        with torch.device("meta"):
            lm = LlamaForCausalLM(config)
        lm.config.use_cache = False
        enable_activation_checkpointing(lm, "full")  # the per-layer flags and functions are switched per variant
        self._full_ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        self._selective_ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                                                 context_fn=selective_checkpoint_context)
        self.compiled: dict[int, object] = {}
        if want_compile:
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
            self.compile_backend = backend
            for layer in _layers(lm):
                layer.compile(backend=backend)
                self.compiled[id(layer)] = layer._compiled_call_impl
                layer._compiled_call_impl = None  # off until a variant asks for it
        else:
            self.compile_backend = None
        module = StepModule(lm)
        if precision == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(device.type, (1,))
            policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
                if compute_dtype != torch.float32 else MixedPrecisionPolicy()
            for layer in _layers(lm):
                fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
            module.to_empty(device=device)
        else:
            module.to_empty(device=device)
            module.to(compute_dtype)
        self._init_weights(module, config.initializer_range, seed)
        reset_rotary_buffers(lm, device)
        module.train()
        self.module, self.lm, self.config = module, lm, config
        self.num_params = count_parameters(lm)
        self.optimizer = build_adamw(module.named_parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.variant: Variant | None = None

    @staticmethod
    @torch.no_grad()
    def _init_weights(module: torch.nn.Module, std: float, seed: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for _name, param in module.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if local.ndim >= 2:
                # per-tensor seed drawn on the CPU, normal_ on the device (fast for 7B)
                local.normal_(0.0, std, generator=torch.Generator(device=local.device).manual_seed(
                    int(torch.randint(0, 2**31 - 1, (1,), generator=gen))))
            else:
                local.fill_(1.0)

    def set_variant(self, variant: Variant) -> None:
        if variant.attn != self.config._attn_implementation:
            self.lm.set_attn_implementation(variant.attn)
        for index, layer in enumerate(_layers(self.lm)):
            layer.gradient_checkpointing = variant.ac in ("full", "selective") or (variant.ac == "alternate" and index % 2 == 0)
            layer._gradient_checkpointing_func = self._selective_ckpt if variant.ac == "selective" else self._full_ckpt
            if variant.compile and not self.compiled:
                raise RuntimeError("StepBench was built with want_compile=False")
            layer._compiled_call_impl = self.compiled.get(id(layer)) if variant.compile else None
        self.module.ce = variant.ce
        self.variant = variant

    def step(self, batch: dict) -> dict:
        """One optimizer step on one micro-batch: forward, loss / supervised tokens, backward, clip 1.0, AdamW."""
        device = self.device
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        supervised = int((batch["target_ids"] != IGNORE_INDEX).sum())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss_sum = self.module(batch)
        (loss_sum / supervised).backward()
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        return {"loss": float(loss_sum.detach()) / supervised, "grad_norm": float(norm), "seconds": seconds,
                "tokens": int(batch["input_ids"].numel()), "supervised": supervised}


# ---------------------------------------------------------------------------------------------------------------------
# Blocks, repetitions, report


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_block(bench: StepBench, variant: Variant, batches: list[dict], warmup: int, steps: int, cursor: list[int]) -> dict:
    """`warmup` + `steps` steps of one variant; returns the timed steps and peak memory (CUDA)."""
    bench.set_variant(variant)
    device = bench.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"warmup": [], "timed": []}
    for index in range(warmup + steps):
        batch = batches[cursor[0] % len(batches)]
        cursor[0] += 1
        record = bench.step(batch)
        (out["warmup"] if index < warmup else out["timed"]).append(record)
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def bench_shape(shape: str, precision: str, variants: list[Variant], args, device: torch.device, log=print) -> dict:
    """All variants of one (shape, precision): build once, alternate blocks, summarise."""
    skipped = {}
    fa_reason = flash_attn_status(device)
    runnable = []
    for v in variants:
        if v.attn == "flash_attention_2" and fa_reason:
            skipped[v.name] = fa_reason
        elif v.ac == "none" and shape == "7b" and precision == "fsdp" and not args.allow_no_ac_7b:
            skipped[v.name] = ("not run by default for 7b with fp32 master weights (108 GB of state + un-checkpointed "
                               "activations of 32 layers; an OOM mid-step would disturb the other variants): --allow-no-ac-7b")
        else:
            runnable.append(v)
    info = {"shape": shape, "precision": precision, "skipped": skipped, "variants": {}}
    if not runnable:
        return info
    built = time.perf_counter()
    try:
        bench = StepBench(shape, device, precision, compile_backend=args.compile_backend,
                          want_compile=any(v.compile for v in runnable), seed=args.seed,
                          compute_dtype=DTYPES[args.compute_dtype], max_position_embeddings=max(4096, args.seq))
    except Exception as error:  # noqa: BLE001
        if is_oom(error):
            info["error"] = f"OOM while building: {str(error).splitlines()[0]}"
            return info
        raise
    info["build_seconds"] = time.perf_counter() - built
    info["num_params"] = bench.num_params
    info["compile_backend"] = bench.compile_backend
    batches = packed_batches(args.batches, args.rows, args.seq, PRESETS[shape]["vocab_size"], seed=args.seed,
                             mean_len=min(520, max(16, args.seq // 4)))
    fpt = shape_flops_per_token(shape, args.seq, bench.num_params)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    info.update({"flops_per_token": fpt, "peak_flops": peak, "seq": args.seq, "rows": args.rows,
                 "compute_dtype": args.compute_dtype})
    blocks: dict[str, list[dict]] = {v.name: [] for v in runnable}
    cursor = [0]
    failed: dict[str, str] = {}
    for rep in range(args.reps):
        order = runnable[rep % len(runnable):] + runnable[: rep % len(runnable)]
        for variant in order:
            if variant.name in failed:
                continue
            first = not blocks[variant.name]
            try:
                block = run_block(bench, variant, batches, args.warmup + (args.first_warmup_extra if first else 0),
                                  args.steps, cursor)
            except Exception as error:  # noqa: BLE001
                if is_oom(error):
                    failed[variant.name] = "OOM: " + str(error).splitlines()[0][:200]
                else:
                    if args.strict:
                        raise
                    failed[variant.name] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
                bench.optimizer.zero_grad(set_to_none=True)
                for module in bench.module.modules():  # FSDP2 modules left unsharded by the failed step
                    if hasattr(module, "reshard"):
                        with contextlib.suppress(Exception):
                            module.reshard()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log(f"  {shape} {precision} {variant.name}: {failed[variant.name]}")
                continue
            blocks[variant.name].append(block)
            times = [r["seconds"] for r in block["timed"]]
            log(f"  rep {rep} {shape} {precision} {variant.name:18s} step {statistics.median(times):.3f} s "
                f"loss {block['timed'][-1]['loss']:.4f}" + (f" peak {block.get('peak_allocated_gb', 0):.1f} GB" if device.type == "cuda" else ""))
    for variant in runnable:
        entry = {"variant": dataclasses.asdict(variant), "describe": variant.describe()}
        if variant.name in failed:
            entry["error"] = failed[variant.name]
        runs = blocks[variant.name]
        if runs:
            times = [r["seconds"] for b in runs for r in b["timed"]]
            block_medians = [statistics.median(r["seconds"] for r in b["timed"]) for b in runs]
            tokens = runs[0]["timed"][0]["tokens"]
            step = statistics.median(times)
            losses = [r["loss"] for b in runs for r in b["warmup"] + b["timed"]]
            entry.update({
                "step_seconds_median": step, "step_seconds_all": times, "block_medians": block_medians,
                "tokens_per_step": tokens, "tokens_per_s": tokens / step,
                "supervised_per_s": statistics.median(r["supervised"] for b in runs for r in b["timed"]) / step,
                "mfu": model_flops_utilization(tokens / step, fpt, peak) if peak else None,
                "peak_allocated_gb": max((b.get("peak_allocated_gb") or 0) for b in runs) if device.type == "cuda" else None,
                "peak_reserved_gb": max((b.get("peak_reserved_gb") or 0) for b in runs) if device.type == "cuda" else None,
                "losses": losses, "grad_norms": [r["grad_norm"] for b in runs for r in b["timed"]],
                "compile_warmup_seconds": [r["seconds"] for r in runs[0]["warmup"]],
            })
        info["variants"][variant.name] = entry
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


def fmt(value, spec=",.0f", none="n/a") -> str:
    return none if value is None else format(value, spec)


def fmt_params(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    else:
        try:
            with open("/proc/cpuinfo") as handle:
                info["cpu"] = next((l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")), "")
        except OSError:
            info["cpu"] = platform.processor()
        info["cores"] = os.cpu_count()
    info["flash_attn"] = flash_attn_status(device) or "available"
    return info


def write_markdown(path: Path, out: dict) -> None:
    device = out["machine"]["device"]
    on_cuda = device.startswith("cuda")
    lines = ["# Single-GPU training step benchmark", "",
             "Generated by `experiments/bench_gpu.py`; do not edit by hand. Raw figures: `bench_gpu.json`; chart: "
             "`bench_gpu.png`.", "", "Reproduce (from the repository root):", "", "```bash", out["command"], "```", ""]
    if not on_cuda:
        lines += ["> **No GPU in this run.** These figures come from the CPU plumbing check (tiny shape); they say nothing "
                  "about GPU throughput. Run `python experiments/bench_gpu.py` (a few minutes) or "
                  "`python experiments/bench_gpu.py --quick` on an H100/H200 to fill this table for the 7B and 1.3B shapes.", ""]
    lines += ["![bench_gpu.png](bench_gpu.png)", "", "## Setup", ""]
    m = out["machine"]
    where = f"{m.get('gpu')} ({m.get('gpu_memory_gb', 0):.0f} GiB), CUDA {m.get('cuda')}" if on_cuda else f"CPU {m.get('cpu')} ({m.get('cores')} cores)"
    lines += [f"- Device: {where}; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; flash-attn: {m['flash_attn']}.",
              f"- Step: {out['args']['rows']} packed row(s) x {out['args']['seq']} tokens (synthetic samples, log-normal lengths, "
              f"mean ~{min(520, max(16, out['args']['seq'] // 4))} tokens, 40% of each sample unsupervised prompt), one micro-batch per optimizer step, clip 1.0, "
              "AdamW (fused on CUDA).",
              f"- Timing: {out['args']['reps']} alternating repetitions x {out['args']['steps']} timed steps per variant after "
              f"{out['args']['warmup']} warm-up step(s) per block (+{out['args']['first_warmup_extra']} on a variant's first "
              "block, which holds compilation); median step time. Peak memory = `torch.cuda.max_memory_allocated` over the variant's blocks.",
              "- MFU (PaLM): tokens/s x (6N + 12·L·H·Q·T) / peak, T = row length, peak "
              + (f"{out['results'][0].get('peak_flops', 0) / 1e12:.0f} TFLOP/s." if on_cuda and out["results"] and out["results"][0].get("peak_flops")
                 else "n/a (CPU)."),
              f"- Compute dtype: {out['args']['compute_dtype']}. Precision `fsdp`: FSDP2 on a one-rank group as `strategy=fsdp "
              "precision=bf16` (fp32 master params + AdamW state, compute-dtype compute, fp32 gradient reduction; 16 B/param). "
              "`pure`: params, grads and AdamW state in the compute dtype (8 B/param with bf16).",
              f"- Runtime: {out['runtime_s']:.0f} s.", "",
              "## Results", "",
              "| shape | params | precision | variant | attention | AC | compile | CE | step s | tokens/s | sup. tokens/s | MFU | peak GB | loss first -> last | note |",
              "|---|---:|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for res in out["results"]:
        params = res.get("num_params")
        for name, e in res["variants"].items():
            v = e["variant"]
            note = e.get("error", "")
            if "step_seconds_median" in e:
                loss = f"{e['losses'][0]:.3f} -> {e['losses'][-1]:.3f}"
                lines.append(f"| {res['shape']} | {fmt_params(params)} | {res['precision']} | {name} | "
                             f"{v['attn']} | {v['ac']} | {'on' if v['compile'] else 'off'} | {v['ce']} | "
                             f"{e['step_seconds_median']:.3f} | {fmt(e['tokens_per_s'])} | {fmt(e['supervised_per_s'])} | "
                             f"{fmt(e['mfu'], '.1%')} | {fmt(e['peak_allocated_gb'], '.1f')} | {loss} | {note} |")
            else:
                lines.append(f"| {res['shape']} | {fmt_params(params)} | {res['precision']} | {name} | "
                             f"{v['attn']} | {v['ac']} | {'on' if v['compile'] else 'off'} | {v['ce']} | | | | | | | {note} |")
        for name, reason in res.get("skipped", {}).items():
            lines.append(f"| {res['shape']} | | {res['precision']} | {name} | | | | | | | | | | | skipped: {reason} |")
        if res.get("error"):
            lines.append(f"| {res['shape']} | | {res['precision']} | (all) | | | | | | | | | | | {res['error']} |")
    lines += ["", "## Goals (7B)", "", "| goal | measured | met? |", "|---|---|:---:|"]
    seven = [r for r in out["results"] if r["shape"] == "7b"]
    if seven:
        best = max(((e.get("mfu") or 0, r["precision"], n) for r in seven for n, e in r["variants"].items() if "mfu" in e),
                   default=(0, None, None))
        fit = [(r["precision"], n, e.get("peak_allocated_gb")) for r in seven for n, e in r["variants"].items()
               if "step_seconds_median" in e]
        lines.append(f"| MFU >= 50% (7B, 4096, one GPU) | best {best[0]:.1%} ({best[1]}, {best[2]}) | {'yes' if best[0] >= GOAL_MFU else 'no'} |")
        fsdp_fit = [f for f in fit if f[0] == "fsdp"]
        lines.append("| full 7B fine-tune step (fp32 master + AdamW) fits in one 141 GB H200 at 4096 | "
                     + (", ".join(f"{n}: {g:.1f} GB" for _, n, g in fsdp_fit) if fsdp_fit else "no completed step")
                     + f" | {'yes' if fsdp_fit else 'no'} |")
    else:
        lines.append("| MFU >= 50% (7B) | not measured in this run (no GPU) | n/a |")
        lines.append("| 7B step fits in 141 GB | not measured in this run (no GPU) | n/a |")
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in out.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def write_png(path: Path, out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in out["results"] if any("tokens_per_s" in e for e in r["variants"].values())]
    if not results:
        return
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 3.6 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        names = [n for n, e in res["variants"].items() if "tokens_per_s" in e]
        tps = [res["variants"][n]["tokens_per_s"] for n in names]
        ax = row[0]
        ax.barh(names, tps, color="#1f77b4")
        for i, v in enumerate(tps):
            mfu = res["variants"][names[i]].get("mfu")
            ax.text(v, i, f" {v:,.0f}" + (f" ({mfu:.0%} MFU)" if mfu else ""), va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("tokens / s (median step)")
        ax.set_title(f"{res['shape']} ({res['precision']}) throughput")
        ax = row[1]
        mem = [res["variants"][n].get("peak_allocated_gb") or 0 for n in names]
        ax.barh(names, mem, color="#ff7f0e")
        if any(mem):
            ax.axvline(H200_MEMORY_GB, color="red", ls="--", lw=1, label="H200 141 GB")
            ax.legend(fontsize=8)
        else:
            ax.set_xlim(0, 1)
            ax.text(0.5, 0.5, "n/a on CPU", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.invert_yaxis()
        ax.set_xlabel("peak allocated GB" + (" (n/a on CPU)" if not any(mem) else ""))
        ax.set_title(f"{res['shape']} ({res['precision']}) peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    parser.add_argument("--shape", default=None, help="comma-separated presets: 7b, 1.3b, tiny (default: 7b,1.3b on CUDA, tiny on CPU)")
    parser.add_argument("--precision", default="fsdp", help="comma-separated: fsdp (fp32 master, bf16 compute), pure (all bf16)")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1 on CPU)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all; --quick: a subset)")
    parser.add_argument("--quick", action="store_true", help="fewer variants, repetitions and steps")
    parser.add_argument("--seq", type=int, default=None, help="packed row length (default 4096; 128 for tiny alone)")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per block")
    parser.add_argument("--first-warmup-extra", type=int, default=None,
                        help="extra untimed steps on a variant's first block (default 1 on CUDA, 0 on CPU)")
    parser.add_argument("--batches", type=int, default=4, help="distinct packed batches cycled through")
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, aot_eager on CPU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak (default: by device name)")
    parser.add_argument("--allow-no-ac-7b", action="store_true", help="also try the 7B fsdp step without checkpointing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="raise on a variant's non-OOM error instead of recording it")
    parser.add_argument("--out", default=str(HERE / "bench_gpu"), help="output prefix (.md / .json / .png)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shapes = (args.shape or ("1.3b,7b" if device.type == "cuda" else "tiny")).split(",")
    for shape in shapes:
        if shape not in PRESETS:
            raise SystemExit(f"unknown shape {shape!r}: {', '.join(PRESETS)}")
    if args.seq is None:
        args.seq = 4096 if any(s != "tiny" for s in shapes) else 128
    on_cpu = device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(args.threads or 1)
    if args.compute_dtype is None:
        args.compute_dtype = "fp32" if on_cpu else "bf16"
    if args.reps is None:
        args.reps = 2 if (args.quick or on_cpu) else 3
    if args.steps is None:
        args.steps = 1 if on_cpu else (2 if args.quick else 3)
    if args.first_warmup_extra is None:
        args.first_warmup_extra = 0 if on_cpu else 1
    names = args.variants.split(",") if args.variants else (QUICK_NAMES if args.quick else [v.name for v in ALL_VARIANTS])
    by_name = {v.name: v for v in ALL_VARIANTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: {', '.join(by_name)}")
    variants = [by_name[n] for n in names]
    precisions = args.precision.split(",")
    notes = []
    results = []
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    command = "python experiments/bench_gpu.py" + ("" if not argv and len(sys.argv) <= 1 else " " + " ".join(argv if argv is not None else sys.argv[1:]))
    with one_rank_group(device) if "fsdp" in precisions else contextlib.nullcontext():
        for shape in shapes:
            for precision in precisions:
                print(f"{shape} {precision}: {len(variants)} variants", flush=True)
                try:
                    res = bench_shape(shape, precision, variants, args, device)
                except Exception as error:  # noqa: BLE001 - record it, go on with the next shape (one GPU session is precious)
                    import traceback

                    res = {"shape": shape, "precision": precision, "skipped": {}, "variants": {},
                           "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
                           "traceback": traceback.format_exc()[-4000:]}
                    print(res["traceback"], file=sys.stderr, flush=True)
                finally:
                    release(device)
                results.append(res)
                # partial results after every shape: a later failure or timeout still leaves a table
                write_outputs(prefix, command, args, device, results, notes, started, final=False)
    fa = flash_attn_status(device)
    if fa:
        notes.append(f"flash-attention variants skipped: {fa}.")
    if device.type == "cpu":
        notes.append(f"CPU run ({torch.get_num_threads()} thread(s), {args.compute_dtype} compute): a plumbing check, not a "
                     "measurement of the GPU recipe; MFU and peak memory are n/a. torch.compile used backend "
                     f"{next((r.get('compile_backend') for r in results if r.get('compile_backend')), None)} "
                     "(--compile-backend inductor to generate kernels).")
    notes.append("MFU counts 6N + 12·L·H·Q·T FLOPs per token (PaLM): activation recomputation and the block-diagonal "
                 "attention savings of packing are not counted.")
    notes.append("`CE fused` is the package's default loss (`trainer.cross_entropy=fused`); the baseline uses "
                 "`trainer.cross_entropy=logits`.")
    write_outputs(prefix, command, args, device, results, notes, started, final=True)
    print(prefix.with_suffix(".md").read_text())
    return 0


def release(device: torch.device) -> None:
    """Free what a finished shape left behind (compiled graphs hold module references)."""
    import gc

    with contextlib.suppress(Exception):
        import torch._dynamo as dynamo

        dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_outputs(prefix: Path, command: str, args, device: torch.device, results: list, notes: list, started: float,
                  final: bool) -> None:
    out = {"command": command, "args": vars(args), "machine": machine_info(device), "results": results,
           "notes": notes if final else notes + ["partial results: the run had not finished when this was written"],
           "runtime_s": time.perf_counter() - started, "complete": final,
           "sanity": {"7b_params": param_count("7b"), "7b_flops_per_token_4096": shape_flops_per_token("7b", 4096)}}
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    write_markdown(prefix.with_suffix(".md"), out)
    with contextlib.suppress(Exception):  # the plot is a convenience; never lose the table over it
        write_png(prefix.with_suffix(".png"), out)


if __name__ == "__main__":
    sys.exit(main())
