"""Metrics: `metrics.jsonl` (one JSON object per optimizer step / eval, rank 0), W&B (online when logged in, else
offline; never fatal), throughput and MFU by the PaLM formula."""

from __future__ import annotations

import json
import logging
import os
import uuid
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
    """MFU: achieved model FLOP/s (tokens/s x training FLOPs per token) over the devices' peak. The trainer's
    `mfu` in metrics.jsonl / W&B and experiments/bench_gpu.py both call this with `flops_per_token`."""
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


class MetricsWriter:
    """Rank 0 appends records to metrics.jsonl and forwards them to W&B; other ranks do nothing."""

    def __init__(self, output_dir: str, enabled: bool, wandb_cfg: Any = None, config: dict | None = None,
                 wandb_run_id: str | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        if enabled and wandb_cfg is not None and wandb_cfg.enabled:
            self._start_wandb(output_dir, wandb_cfg, config or {})

    def _start_wandb(self, output_dir: str, cfg: Any, config: dict) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("logger.wandb.enabled but wandb is not installed: metrics.jsonl only")
            return
        mode = cfg.mode
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
                project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags or []), config=config,
                id=self.wandb_run_id, resume="allow", mode=mode, dir=output_dir,
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B init failed (%s): metrics.jsonl only", error)
            self.wandb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in record.items() if v is not None}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=int(clean["step"]))
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
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass
