"""The one interface the training loop talks to. A new strategy subclasses `Strategy`; the loop does not change.

A strategy receives what it needs to place and step the model (`ModelFactory`: how to build it; `StepSettings`:
precision, batch layout, clip value), never the run config. The loop calls, per optimizer step:
`micro_step_context` / `forward_context` / `backward` for each micro-batch, then `step(loss)` once, which clips,
applies the non-finite policy's precondition (never update from a non-finite step), steps and zeroes gradients.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from llama2_sft.data.loader import BatchLayout
from llama2_sft.distributed import DistContext, quiet_single_process


@dataclass
class ModelFactory:
    """What a strategy needs to build the model its own way (full copy, meta + broadcast, ZeRO-3 partitioned)."""

    # loaded / seeded weights on a device, stored in a dtype ("fp32" master weights for torch strategies)
    build_full: Callable[[torch.device | str, str], torch.nn.Module]
    build_meta: Callable[[], torch.nn.Module] | None  # the architecture without storage (FSDP ranks > 0)
    build_optimizer: Callable[[Any], torch.optim.Optimizer]  # named parameters -> optimizer
    # training-time transforms (fused CE head, activation checkpointing, compile), applied before wrapping
    prepare: Callable[[torch.nn.Module], Any] = lambda model: model


@dataclass(frozen=True)
class StepSettings:
    """How the model computes and steps: the few run settings a strategy may read."""

    precision: str = "fp32"  # fp32 | bf16 (compute dtype; master weights stay fp32)
    layout: BatchLayout = BatchLayout(1, 1, 1)  # micro-batch x accumulation x world size
    max_grad_norm: float = 1.0  # <= 0: no clipping


@dataclass(frozen=True)
class StepOutcome:
    """What `Strategy.step` did: the gradient norm before clipping, and whether the update was applied."""

    grad_norm: float
    applied: bool


class Strategy:
    """Wraps model and optimizer; runs backward, the optimizer step, and sharded save / load."""

    def __init__(self) -> None:
        self.ctx: DistContext = DistContext()
        self.settings = StepSettings()
        self.model: torch.nn.Module | None = None  # call this for forward passes
        self.optimizer: torch.optim.Optimizer | None = None

    # --- construction -------------------------------------------------------------------------------------
    def setup(self, ctx: DistContext, factory: ModelFactory, settings: StepSettings) -> None:
        """Build, place and wrap the model and its optimizer (all ranks call this)."""
        raise NotImplementedError

    # --- one step -----------------------------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for forward passes (autocast where the strategy keeps fp32 weights but computes in bf16)."""
        return contextlib.nullcontext()

    def micro_step_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward + backward; gradient sync only on the last one."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        """Accumulate the gradient of `loss`, this micro-batch's share of the global batch's mean loss.

        Data-parallel gradients are averaged over ranks; scaling by the world size turns that mean back into the
        sum of the ranks' shares, so the result is the gradient of the global mean whatever the split."""
        (loss * self.ctx.world_size).backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, loss: float) -> StepOutcome:
        """Clip, step and zero gradients; a step whose loss or gradient norm is not finite is not applied."""
        max_norm = self.settings.max_grad_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding this rank's part of the norm
            norm = norm.full_tensor()
        grad_norm = float(norm)
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(grad_norm, applied)

    # --- state ----------------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write model + optimizer state into `directory` (all ranks call this)."""
        raise NotImplementedError

    def load(self, directory: str) -> None:
        """Restore model + optimizer state written by `save` (all ranks call this)."""
        raise NotImplementedError

    def unwrapped_model(self) -> torch.nn.Module:
        """The underlying transformers model (for generate, config and state)."""
        return self.model

    def num_parameters(self) -> int:
        """Parameters of the whole model (not of this rank's shard), for MFU."""
        return sum(p.numel() for p in self.unwrapped_model().parameters())  # DTensor.numel() is the global size

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(was_training)


class TorchStrategy(Strategy):
    """Shared by single / DDP / FSDP: a torch optimizer and torch.distributed.checkpoint (DCP) sharded state."""

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.unwrapped_model(), self.optimizer, options=self._state_options())
        return {"model": model_state, "optimizer": optim_state}

    @staticmethod
    def _state_options():
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Frozen weights (a LoRA run's base) are not trained: they come from the base model, not from checkpoints.
        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        with quiet_single_process():
            dcp.save(self._state(), checkpoint_id=os.path.join(directory, "model_optim"))

    def load(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not os.path.isdir(os.path.join(directory, "model_optim")):
            other = " (it holds a DeepSpeed checkpoint, deepspeed/: resume it with strategy=deepspeed_zero2 or " \
                    "deepspeed_zero3)" if os.path.isdir(os.path.join(directory, "deepspeed")) else ""
            raise ValueError(f"{directory}: no torch.distributed.checkpoint state (model_optim/) to resume from{other}")
        state = self._state()
        with quiet_single_process():
            dcp.load(state, checkpoint_id=os.path.join(directory, "model_optim"))
        set_state_dict(self.unwrapped_model(), self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self._state_options())

