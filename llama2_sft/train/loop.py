"""The training loop. One optimizer step:

    lr <- schedule(step)
    micro-batches <- loader (this rank's share of the global batch)
    N <- supervised tokens in the whole global batch (all micro-batches, all ranks: one small all-reduce)
    for each micro-batch: backward( sum of token cross-entropies / N )     # x world size, see below
    clip, step, zero grad; log; eval; checkpoint

Dividing by the *global* supervised-token count makes the gradient the mean over every supervised token of the
global batch, whatever the split into ranks and micro-batches. Data-parallel strategies average gradients over ranks,
so the loss is multiplied by the world size to turn that average back into the sum.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
from omegaconf import OmegaConf

from llama2_sft.checkpoint import load_checkpoint, save_checkpoint
from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.data.loader import SFTLoader, eval_batches
from llama2_sft.distributed import DistContext, all_reduce_sum
from llama2_sft.inference.generate import SamplingConfig, generate_ids
from llama2_sft.metrics import MetricsWriter, flops_per_token, model_flops_utilization, peak_flops, peak_memory_gb
from llama2_sft.loss import FusedLMHead, batch_loss_sum, uses_varlen_kernels
from llama2_sft.model import count_parameters
from llama2_sft.optim import lr_at, warmup_steps_for
from llama2_sft.strategy.base import Strategy

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised (trainer.on_nan=stop) when a step's loss or gradient norm is NaN or infinite."""


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def answer_split(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Split a tokenized dialog into (prompt for the last reply, that reply's ids without EOS)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(labels[start: end - 1])


class Trainer:
    """Runs the loop for a strategy-wrapped model over an `SFTLoader`."""

    def __init__(self, cfg: Any, ctx: DistContext, strategy: Strategy, tokenizer: Any, loader: SFTLoader,
                 eval_set: Any | None, tokenizer_dir: str | None = None):
        self.cfg = cfg
        self.ctx = ctx
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.loader = loader
        self.eval_set = eval_set
        self.tokenizer_dir = tokenizer_dir
        trainer = cfg.trainer
        if trainer.max_steps > 0:
            self.total_steps = trainer.max_steps
        else:
            self.total_steps = max(1, math.ceil(trainer.epochs * loader.steps_per_epoch))
        self.warmup = warmup_steps_for(self.total_steps, cfg.scheduler.warmup_ratio, cfg.scheduler.warmup_steps)
        self.base_lr = float(cfg.optimizer.lr)
        self.step = 0
        self.tokens_seen = 0
        self.supervised_tokens_seen = 0
        self.nan_skipped = 0
        self.first_eval_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.wandb_run_id: str | None = None
        self.resumed_from: str | None = None
        model = strategy.unwrapped_model()
        self.fused_loss = cfg.trainer.cross_entropy == "fused"
        self.varlen = uses_varlen_kernels(cfg.model.attn_implementation)
        if self.fused_loss and not isinstance(model.get_output_embeddings(), FusedLMHead):
            raise ValueError("trainer.cross_entropy=fused but the model has no fused head: build the strategy with a "
                             "ModelFactory whose prepare is llama2_sft.model.prepare_for_training")
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_params = count_parameters(model) if not hasattr(strategy, "engine") else None
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.model_config = config
        self._flops_args = (config.num_hidden_layers, config.num_attention_heads, head_dim)
        self.metrics: MetricsWriter | None = None

    # --- state --------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "tokens_seen": self.tokens_seen,
            "supervised_tokens_seen": self.supervised_tokens_seen,
            "nan_skipped": self.nan_skipped,
            "loader": self.loader.state_dict(),
            "wandb_run_id": self.metrics.wandb_run_id if self.metrics else self.wandb_run_id,
            "first_eval_loss": self.first_eval_loss,
            "last_eval_loss": self.last_eval_loss,
            "total_steps": self.total_steps,
        }

    def resume(self, path: str | None) -> None:
        """Continue from a complete checkpoint (model, optimizer, loader position, RNG, counters)."""
        if path is None:
            return
        state = load_checkpoint(self.strategy, self.ctx, path)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.supervised_tokens_seen = int(state["supervised_tokens_seen"])
        self.nan_skipped = int(state.get("nan_skipped", 0))
        self.loader.load_state_dict(state["loader"])
        self.wandb_run_id = state.get("wandb_run_id")
        self.first_eval_loss = state.get("first_eval_loss")
        self.last_eval_loss = state.get("last_eval_loss")
        self.resumed_from = path
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> str:
        path = save_checkpoint(self.strategy, self.ctx, self.cfg.output_dir, self.step, self.trainer_state(),
                               self.config_yaml, self.model_config, self.tokenizer_dir, self.cfg.trainer.save_total_limit)
        if self.ctx.is_main:
            log.info("saved checkpoint %s", path)
        return path

    # --- one step -----------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        """Forward/backward every micro-batch with the globally token-normalised loss, then clip and step."""
        strategy, device = self.strategy, self.ctx.device
        local_supervised = sum(int((mb["target_ids"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        local_tokens = sum(int(mb["num_real_tokens"]) for mb in micro_batches)
        global_supervised, global_tokens = all_reduce_sum([local_supervised, local_tokens], device)
        if global_supervised == 0:
            raise RuntimeError(f"step {self.step}: global batch has no supervised tokens")
        scale = self.ctx.world_size if strategy.averages_gradients_over_ranks else 1
        local_loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for index, batch in enumerate(micro_batches):
            is_last = index == len(micro_batches) - 1
            batch = _to_device(batch, device)
            with strategy.micro_step_context(is_last):
                with strategy.forward_context():
                    loss_sum = batch_loss_sum(strategy.model, batch, self.fused_loss, self.varlen)
                strategy.backward(loss_sum * (scale / global_supervised), is_last)
            local_loss_sum = local_loss_sum + loss_sum.detach()  # stays on the device: one sync per step, below
            del loss_sum
        (global_loss_sum,) = all_reduce_sum([float(local_loss_sum)], device)
        loss = global_loss_sum / global_supervised
        grad_norm = strategy.clip_grad_norm(self.cfg.trainer.max_grad_norm)
        skipped = False
        if not math.isfinite(loss) or (not math.isnan(grad_norm) and not math.isfinite(grad_norm)) or \
                (math.isnan(grad_norm) and not hasattr(strategy, "engine")):
            ids = [i for mb in micro_batches for i in mb.get("sample_ids", [])][:16]
            message = f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}; sample ids on rank {self.ctx.rank}: {ids}"
            if self.cfg.trainer.on_nan == "stop":
                raise NonFiniteLossError(message + " (trainer.on_nan=stop; set trainer.on_nan=skip to skip such steps)")
            log.warning("%s: skipping the update (trainer.on_nan=skip)", message)
            self.nan_skipped += 1
            skipped = True
            strategy.zero_grad()
        if not skipped:
            strategy.optimizer_step()
            strategy.zero_grad()
            grad_norm = getattr(strategy, "last_grad_norm", grad_norm)
        row_length = round(sum(mb["input_ids"].shape[1] for mb in micro_batches) / len(micro_batches))
        return {"loss": loss, "grad_norm": grad_norm, "num_tokens": int(global_tokens), "row_length": row_length,
                "num_supervised_tokens": int(global_supervised), "skipped": skipped}

    # --- eval ---------------------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """Token-normalised loss over the held-out split (summed over ranks)."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return None
        dataset = self.eval_set
        if self.cfg.trainer.eval_max_samples and len(dataset) > self.cfg.trainer.eval_max_samples:
            dataset = dataset.select(range(self.cfg.trainer.eval_max_samples))
        loss_sum, supervised = 0.0, 0
        pad_id = self.tokenizer.pad_token_id
        with self.strategy.eval_mode():
            for batch in eval_batches(dataset, self.cfg.trainer.eval_batch_size, self.ctx.rank, self.ctx.world_size, pad_id):
                batch = _to_device(batch, self.ctx.device)
                with self.strategy.forward_context():
                    loss_sum += float(batch_loss_sum(self.strategy.model, batch, self.fused_loss, self.varlen))
                supervised += int((batch["target_ids"] != IGNORE_INDEX).sum())
        total_loss, total_supervised = all_reduce_sum([loss_sum, supervised], self.ctx.device)
        return total_loss / max(total_supervised, 1)

    def sample_answers(self, count: int) -> list[dict]:
        """Greedy answers to the last turn of the first `count` held-out dialogs (same prompts on every rank)."""
        if self.eval_set is None or count <= 0:
            return []
        rows = self.eval_set.select(range(min(count, len(self.eval_set))))
        split = [answer_split(ids, labels) for ids, labels in zip(rows["input_ids"], rows["labels"])]
        prompts = [prompt for prompt, _ in split]
        sampling = SamplingConfig(max_new_tokens=self.cfg.trainer.max_new_tokens, temperature=0.0)
        model = self.strategy.unwrapped_model()
        outputs: list[list[int]] = []
        batch_size = self.cfg.trainer.eval_batch_size
        with self.strategy.eval_mode(), self.strategy.forward_context():
            for start in range(0, len(prompts), batch_size):
                outputs += generate_ids(model, prompts[start: start + batch_size], pad_id=self.tokenizer.pad_token_id,
                                        eos_id=self.tokenizer.eos_token_id, sampling=sampling, device=self.ctx.device,
                                        synced_ranks=self.ctx.distributed)
        decode = self.tokenizer.decode
        return [
            {"prompt": decode(prompt[-200:]), "reference": decode(reference).strip(), "generated": decode(output).strip()}
            for (prompt, reference), output in zip(split, outputs)
        ]

    # --- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to `total_steps`, evaluating and checkpointing on cadence; returns a summary."""
        cfg, trainer, ctx = self.cfg, self.cfg.trainer, self.ctx
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.metrics = MetricsWriter(cfg.output_dir, ctx.is_main, cfg.logger.wandb,
                                     OmegaConf.to_container(cfg, resolve=True), self.wandb_run_id)
        started = time.time()
        if self.step == 0 or self.first_eval_loss is None:
            self.first_eval_loss = self.evaluate()
            self.metrics.log({"step": self.step, "eval_loss": self.first_eval_loss})
        progress = None
        if ctx.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        peak = peak_flops(ctx.device, trainer.peak_tflops)
        window_start, window_tokens = time.time(), 0
        last_saved = None
        stop_at = self.step + trainer.stop_after_steps if trainer.stop_after_steps > 0 else None
        while self.step < self.total_steps:
            if stop_at is not None and self.step >= stop_at:
                break
            lr = lr_at(self.step, base_lr=self.base_lr, total_steps=self.total_steps, warmup=self.warmup,
                       name=cfg.scheduler.name, min_lr_ratio=cfg.scheduler.min_lr_ratio)
            self.strategy.set_lr(lr)
            step_started = time.time()
            result = self.train_step(self.loader.next_step())
            step_seconds = time.time() - step_started
            self.step += 1
            self.tokens_seen += result["num_tokens"]
            self.supervised_tokens_seen += result["num_supervised_tokens"]
            window_tokens += result["num_tokens"]
            tokens_per_s = result["num_tokens"] / max(step_seconds, 1e-9)
            record = {"step": self.step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                      "num_tokens": result["num_tokens"], "num_supervised_tokens": result["num_supervised_tokens"],
                      "tokens_per_s": tokens_per_s, "step_seconds": step_seconds, "tokens_seen": self.tokens_seen,
                      "row_length": result["row_length"],
                      "nan_skipped": self.nan_skipped, "peak_memory_gb": peak_memory_gb(ctx.device)}
            if peak and self.num_params:
                # T of the PaLM formula: the row length (max_length when packing; the padded width otherwise)
                record["mfu"] = model_flops_utilization(
                    tokens_per_s, flops_per_token(self.num_params, *self._flops_args, result["row_length"]), peak, ctx.world_size)
            if self.step % trainer.log_steps == 0 or self.step == self.total_steps:
                self.metrics.log(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
            if trainer.eval_steps and self.step % trainer.eval_steps == 0 and self.step != self.total_steps:
                self.last_eval_loss = self.evaluate()
                self.metrics.log({"step": self.step, "eval_loss": self.last_eval_loss})
                self.metrics.log_generations(self.step, self.sample_answers(trainer.generate_samples) if ctx.is_main or ctx.distributed else [])
            if trainer.save_steps and self.step % trainer.save_steps == 0:
                last_saved = self.save()
        if progress is not None:
            progress.close()
        if self.step < self.total_steps:  # stopped early (trainer.stop_after_steps): checkpoint and hand over
            if last_saved is None or not last_saved.endswith(f"step_{self.step:08d}"):
                last_saved = self.save()
            self.metrics.close()
            return {"steps": self.step, "seconds": time.time() - started, "eval_loss_start": self.first_eval_loss,
                    "eval_loss_end": self.last_eval_loss, "accuracy": None, "checkpoint": last_saved, "samples": [],
                    "resumed_from": self.resumed_from, "tokens_seen": self.tokens_seen, "stopped_early": True}
        self.last_eval_loss = self.evaluate()
        answers = self.sample_answers(trainer.accuracy_samples)
        accuracy = sum(a["generated"] == a["reference"] for a in answers) / len(answers) if answers else None
        self.metrics.log({"step": self.step, "eval_loss": self.last_eval_loss, "eval_accuracy": accuracy})
        self.metrics.log_generations(self.step, answers[: trainer.generate_samples])
        if last_saved is None or not last_saved.endswith(f"step_{self.step:08d}"):
            last_saved = self.save()
        self.metrics.close()
        return {"steps": self.step, "seconds": time.time() - started, "eval_loss_start": self.first_eval_loss,
                "eval_loss_end": self.last_eval_loss, "accuracy": accuracy, "checkpoint": last_saved,
                "samples": answers[:3], "resumed_from": self.resumed_from, "tokens_seen": self.tokens_seen}
