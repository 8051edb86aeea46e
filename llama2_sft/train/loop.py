"""The training loop: for each optimizer step, lr -> step -> log -> validate -> checkpoint; then one summary.

The loop only calls components, each owning its cadence and arithmetic: `train_step` (the globally
token-normalised step, llama2_sft.train.step), `MetricsWriter` (records, throughput, MFU), `Validator` (eval loss,
answers, accuracy), `Checkpointer` (when and what to save). It never knows which strategy runs it.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any

from omegaconf import OmegaConf

from llama2_sft.adapters import BaseReference, uses_adapters
from llama2_sft.data.loader import SFTLoader
from llama2_sft.distributed import DistContext
from llama2_sft.loss import FusedLMHead, uses_varlen_kernels
from llama2_sft.optim import lr_at, warmup_steps_for
from llama2_sft.strategy.base import Strategy
from llama2_sft.train.checkpointer import Checkpointer
from llama2_sft.train.metrics import MetricsWriter, ModelShape, peak_flops
from llama2_sft.train.preemption import PreemptionWatch
from llama2_sft.train.step import StepResult, train_step
from llama2_sft.train.validator import Validator, accuracy_per_task

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised (trainer.on_nan=stop) when a step's loss or gradient norm is NaN or infinite."""


class Trainer:
    """Runs the loop for a strategy-wrapped model over an `SFTLoader`; builds its components from the run config."""

    def __init__(self, cfg: Any, ctx: DistContext, strategy: Strategy, tokenizer: Any, loader: SFTLoader,
                 eval_set: Any | None, tokenizer_dir: str | None = None):
        trainer = cfg.trainer
        self.ctx, self.strategy, self.loader = ctx, strategy, loader
        self.output_dir = cfg.output_dir
        self.on_nan = trainer.on_nan
        self.total_steps = trainer.max_steps if trainer.max_steps > 0 else max(1, math.ceil(trainer.epochs * loader.steps_per_epoch))
        self.stop_after_steps = trainer.stop_after_steps
        self.lr_at = partial(lr_at, base_lr=float(cfg.optimizer.lr), total_steps=self.total_steps, name=cfg.scheduler.name,
                             warmup=warmup_steps_for(self.total_steps, cfg.scheduler.warmup_ratio, cfg.scheduler.warmup_steps),
                             min_lr_ratio=cfg.scheduler.min_lr_ratio)
        # trainer counters (checkpointed)
        self.step = 0
        self.tokens_seen = 0
        self.supervised_tokens_seen = 0
        self.nan_skipped = 0
        self.resumed_from: str | None = None
        self.preemption = PreemptionWatch(ctx)  # SIGTERM / SIGUSR1: finish the step, save, stop

        model = strategy.unwrapped_model()
        self.fused_loss = trainer.cross_entropy == "fused"
        self.varlen = uses_varlen_kernels(cfg.model.attn_implementation)
        if self.fused_loss and not isinstance(model.get_output_embeddings(), FusedLMHead):
            raise ValueError("trainer.cross_entropy=fused but the model has no fused head: build the strategy with a "
                             "ModelFactory whose prepare is llama2_sft.model.prepare_for_training")
        self.metrics = MetricsWriter(
            cfg.output_dir, ctx, log_steps=trainer.log_steps, total_steps=self.total_steps,
            shape=ModelShape.of(model.config, strategy.num_parameters()),
            peak_flops_per_device=peak_flops(ctx.device, trainer.peak_tflops), wandb_cfg=cfg.logger.wandb,
            run_config=OmegaConf.to_container(cfg, resolve=True))
        self.validator = Validator(
            strategy, ctx, tokenizer, eval_set, self.metrics, eval_steps=trainer.eval_steps,
            batch_size=trainer.eval_batch_size, max_samples=trainer.eval_max_samples,
            generate_samples=trainer.generate_samples, accuracy_samples=trainer.accuracy_samples,
            max_new_tokens=trainer.max_new_tokens, fused_loss=self.fused_loss, varlen=self.varlen,
            eval_type=str(cfg.dataset.type))  # rows of this type unless the eval set has a `type` column (a mix)
        stateful = {}
        if uses_adapters(cfg.peft):  # a LoRA checkpoint holds only the adapters: it must resume onto the same base
            stateful["base"] = BaseReference(cfg.model.name_or_path, cfg.model.revision, model.config)
        stateful.update(trainer=self, loader=loader, metrics=self.metrics, validator=self.validator)
        self.checkpointer = Checkpointer(
            strategy, ctx, cfg.output_dir, save_steps=trainer.save_steps, keep=trainer.save_total_limit, stateful=stateful,
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True), model_config=model.config, tokenizer_dir=tokenizer_dir)

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "supervised_tokens_seen": self.supervised_tokens_seen,
                "nan_skipped": self.nan_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.supervised_tokens_seen = int(state["supervised_tokens_seen"])
        self.nan_skipped = int(state["nan_skipped"])

    def resume(self, path: str | None) -> None:
        """Continue from a complete checkpoint (model, optimizer, loader position, RNG, counters)."""
        if path is not None:
            self.checkpointer.load(path)
            self.resumed_from = path

    # --- one step -----------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One optimizer step; a non-finite one stops the run or is skipped (`trainer.on_nan`)."""
        result = train_step(self.strategy, micro_batches, self.ctx, fused_loss=self.fused_loss, varlen=self.varlen)
        if not result.applied:
            message = (f"step {self.step}: non-finite loss {result.loss} / grad norm {result.grad_norm}; "
                       f"sample ids on rank {self.ctx.rank}: {result.sample_ids[:16]}")
            if self.on_nan == "stop":
                raise NonFiniteLossError(message + " (trainer.on_nan=stop; set trainer.on_nan=skip to skip such steps)")
            log.warning("%s: skipping the update (trainer.on_nan=skip)", message)
            self.nan_skipped += 1
        return result

    # --- the loop -----------------------------------------------------------------------------------------
    def _draw_curves(self) -> None:
        """output_dir/curves.png from metrics.jsonl; a picture that cannot be drawn never fails the run."""
        from llama2_sft.plot import write_curves

        try:
            log.info("loss curves: %s", write_curves(self.output_dir))
        except Exception as error:  # noqa: BLE001 - matplotlib missing or a broken backend: say so, keep the run
            log.warning("could not draw %s/curves.png: %s", self.output_dir, error)

    def fit(self) -> dict:
        """Train to `total_steps` (or `stop_after_steps` more, or until a stop signal), validating and checkpointing
        on cadence; summary["preempted"] says whether a signal stopped it."""
        with self.preemption:  # while it runs, a stop signal only sets a flag (the final save cannot be interrupted)
            summary = self._fit()
        return {**summary, "preempted": self.preemption.stopping, "requeue": self.preemption.requeue}

    def _fit(self) -> dict:
        started = time.time()
        self.metrics.start(self.step)
        self.validator.start(self.step)
        stop_at = min(self.total_steps, self.step + self.stop_after_steps) if self.stop_after_steps > 0 else self.total_steps
        while self.step < stop_at:
            lr = self.lr_at(self.step)
            self.strategy.set_lr(lr)
            step_started = time.time()
            result = self.train_step(self.loader.next_step())
            self.step += 1
            self.tokens_seen += result.num_tokens
            self.supervised_tokens_seen += result.num_supervised_tokens
            self.metrics.log_step(result, lr, time.time() - step_started, self.state_dict(),
                                  extra=self.loader.last_sources)  # a mix's per-source counts, else None
            if self.validator.should_run(self.step, self.total_steps):
                self.validator.run(self.step)
            self.checkpointer.save(self.step)
            if self.preemption.should_stop():  # all ranks agree (one all-reduce), then all save below
                break
        finished = self.step >= self.total_steps and not self.preemption.stopping  # a rerun does the final eval
        accuracy, answers = self.validator.final(self.step) if finished else (None, [])
        checkpoint = self.checkpointer.save(self.step, last_step=True)
        self.metrics.close()
        if self.ctx.is_main:
            self._draw_curves()
        return {"steps": self.step, "seconds": time.time() - started, "eval_loss_start": self.validator.first_loss,
                "eval_loss_end": self.validator.last_loss, "accuracy": accuracy, "checkpoint": checkpoint,
                "accuracy_per_task": accuracy_per_task(answers),
                "samples": answers[:3], "resumed_from": self.resumed_from, "tokens_seen": self.tokens_seen,
                "stopped_early": not finished}
