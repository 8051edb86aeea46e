"""Metrics: `metrics.jsonl` (one JSON object per optimizer step / eval, rank 0), W&B (online when logged in, else
offline; never fatal), the progress bar, and the arithmetic of a step record: throughput, MFU by the PaLM formula,
memory."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "H800": 989e12, "L40S": 362e12, "A10G": 125e12}


def flops_per_token(num_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6N for the matmuls + 12·L·H·Q·T for attention."""
    return 6 * num_params + 12 * num_layers * num_heads * head_dim * seq_len


def model_flops_utilization(tokens_per_s: float, flops_per_token_: float, peak_flops_per_device: float,
                            num_devices: int = 1) -> float:
    """MFU: achieved model FLOP/s (tokens/s x training FLOPs per token) over the devices' peak."""
    return tokens_per_s * flops_per_token_ / (peak_flops_per_device * num_devices)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: `override_tflops` (trainer.peak_tflops) if set, else by GPU name."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count of a training step depends on."""

    num_params: int
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any, num_params: int) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(num_params, config.num_hidden_layers, config.num_attention_heads, head_dim)


def wandb_scalars(record: dict) -> dict:
    """The numbers of a record for W&B; a dict of numbers becomes `key/name` series (source_samples/chat, ...)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{name}": v for name, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


class MetricsWriter:
    """Rank 0 appends records to metrics.jsonl, forwards them to W&B and draws the progress bar; other ranks only
    count. `log_step` turns a step result into the record (throughput, MFU, memory) on its own cadence."""

    def __init__(self, output_dir: str, ctx: Any, *, log_steps: int = 1, total_steps: int = 0,
                 shape: ModelShape | None = None, peak_flops_per_device: float | None = None,
                 wandb_cfg: Any = None, run_config: dict | None = None, progress: bool = True):
        self.output_dir = output_dir
        self.ctx = ctx
        self.enabled = ctx.is_main
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.log_steps = log_steps
        self.total_steps = total_steps
        self.shape = shape
        self.peak = peak_flops_per_device
        self.wandb_cfg = wandb_cfg
        self.run_config = run_config or {}
        self.show_progress = progress
        self.wandb = None
        self.wandb_run_id: str | None = None
        self.progress = None

    # --- state: a resumed run logs to the same W&B run ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict) -> None:
        self.wandb_run_id = state.get("wandb_run_id")

    def start(self, step: int) -> None:
        """Open W&B (resuming the saved run id) and the progress bar at `step`."""
        if not self.enabled:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        if self.wandb_cfg is not None and self.wandb_cfg.enabled:
            self._start_wandb(self.wandb_cfg)
        if self.show_progress:
            from tqdm import tqdm

            self.progress = tqdm(total=self.total_steps, initial=step, desc="train", dynamic_ncols=True)

    def _start_wandb(self, cfg: Any) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("logger.wandb.enabled but wandb is not installed: metrics.jsonl only")
            return
        mode = str(cfg.mode)  # a str Enum whose str() is its value
        if mode == "auto":
            try:
                logged_in = bool(os.environ.get("WANDB_API_KEY")) or bool(wandb.Api().api_key)
            except Exception:  # noqa: BLE001 - no credentials, no network: stay offline
                logged_in = False
            mode = "online" if logged_in else "offline"
        if mode == "disabled":
            return
        self.wandb_run_id = self.wandb_run_id or uuid.uuid4().hex[:12]  # kept in checkpoints: resume logs here
        try:
            self.wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags or []), config=self.run_config,
                id=self.wandb_run_id, resume="allow", mode=mode, dir=self.output_dir,
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B init failed (%s): metrics.jsonl only", error)
            self.wandb = None

    # --- records --------------------------------------------------------------------------------------------
    def log_step(self, result: Any, lr: float, seconds: float, totals: dict, extra: dict | None = None) -> dict:
        """The record of one optimizer step (`result`: a `StepResult`; `totals`: the trainer's counters after it,
        `step` among them; `extra`: more keys, e.g. a mix's per-source counts), written every `log_steps` and at the
        last step."""
        step = totals["step"]
        tokens_per_s = result.num_tokens / max(seconds, 1e-9)
        record = {**totals, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "num_tokens": result.num_tokens, "num_supervised_tokens": result.num_supervised_tokens,
                  "tokens_per_s": tokens_per_s, "step_seconds": seconds, "row_length": result.row_length,
                  "peak_memory_gb": peak_memory_gb(self.ctx.device), **(extra or {})}
        if self.peak and self.shape and self.shape.num_params:
            # T of the PaLM formula: the row length (max_length when packing; the padded width otherwise)
            flops = flops_per_token(self.shape.num_params, self.shape.num_layers, self.shape.num_heads,
                                    self.shape.head_dim, result.row_length)
            record["mfu"] = model_flops_utilization(tokens_per_s, flops, self.peak, self.ctx.world_size)
        if step % self.log_steps == 0 or step == self.total_steps:
            self.log(record)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
        return record

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in record.items() if v is not None}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(wandb_scalars(clean), step=int(clean["step"]))
            except Exception as error:  # noqa: BLE001
                log.warning("W&B log failed: %s", error)

    def log_generations(self, step: int, rows: list[dict]) -> None:
        """A table of prompts, references and greedy answers (W&B only; jsonl gets the accuracy)."""
        if self.wandb is None or not rows:
            return
        try:
            import wandb

            table = wandb.Table(columns=["prompt", "reference", "generated"],
                                data=[[r["prompt"], r["reference"], r["generated"]] for r in rows])
            self.wandb.log({"samples": table}, step=step)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B table failed: %s", error)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass
