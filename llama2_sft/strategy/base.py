"""The one interface the training loop talks to. A new strategy subclasses `Strategy`; the loop does not change."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from llama2_sft.distributed import DistContext


@dataclass
class ModelFactory:
    """What a strategy needs to build the model its own way (full copy, meta + broadcast, ZeRO-3 partitioned)."""

    # loaded / seeded weights on a device, stored in a dtype ("fp32" master weights for torch strategies)
    build_full: Callable[[torch.device | str, str], torch.nn.Module]
    build_meta: Callable[[], torch.nn.Module]  # the architecture without storage
    build_optimizer: Callable[[Any], torch.optim.Optimizer]  # named parameters -> optimizer
    precision: str  # fp32 | bf16
    # training-time transforms (fused CE head, activation checkpointing, compile), applied before wrapping
    prepare: Callable[[torch.nn.Module], Any] = lambda model: model
    config: Any = None  # the resolved run config (DeepSpeed derives its JSON from it)


class Strategy:
    """Wraps model and optimizer; runs backward, clipping, stepping, and sharded save / load."""

    name = "base"
    # Gradients of data-parallel strategies are averaged over ranks; the loop multiplies the (globally
    # token-normalised) loss by world size to turn that mean back into the sum it wants.
    averages_gradients_over_ranks = True

    def __init__(self) -> None:
        self.ctx: DistContext | None = None
        self.model: torch.nn.Module | None = None  # call this for forward passes
        self.optimizer: torch.optim.Optimizer | None = None

    # --- construction -------------------------------------------------------------------------------------
    def setup(self, ctx: DistContext, factory: ModelFactory) -> None:
        raise NotImplementedError

    # --- one step -----------------------------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for forward passes (autocast where the strategy keeps fp32 weights but computes in bf16)."""
        return contextlib.nullcontext()

    def micro_step_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward + backward; gradient sync only on the last one."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        """Accumulate this micro-batch's gradients (`is_last`: the step's final micro-batch)."""
        loss.backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip (if max_norm > 0) and return the global gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- state ----------------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write model + optimizer state into `directory` (all ranks call this)."""
        raise NotImplementedError

    def load(self, directory: str) -> None:
        """Restore model + optimizer state written by `save` (all ranks call this)."""
        raise NotImplementedError

    def unwrapped_model(self) -> torch.nn.Module:
        """The underlying transformers model (for generate and config)."""
        return self.model

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

        model_state, optim_state = get_state_dict(self.unwrapped_for_state(), self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def unwrapped_for_state(self) -> torch.nn.Module:
        return self.model

    def save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=os.path.join(directory, "model_optim"))

    def load(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=os.path.join(directory, "model_optim"))
        set_state_dict(self.unwrapped_for_state(), self.optimizer,
                       model_state_dict=state["model"], optim_state_dict=state["optimizer"])
