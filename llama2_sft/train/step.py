"""One optimizer step over the global batch:

    N <- supervised tokens in the whole global batch (all micro-batches, all ranks: one small all-reduce)
    for each micro-batch: strategy.backward( sum of token cross-entropies / N )
    strategy.step(loss)          # clip, skip if not finite, step, zero grad

Dividing by the *global* supervised-token count makes the gradient the mean over every supervised token of the
global batch, whatever the split into ranks and micro-batches (the strategy undoes its own averaging over ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.distributed import DistContext, all_reduce_sum
from llama2_sft.loss import batch_loss_sum
from llama2_sft.strategy.base import Strategy


@dataclass
class StepResult:
    """What one optimizer step computed and did (counts are over the global batch)."""

    loss: float  # mean cross-entropy per supervised token
    grad_norm: float
    applied: bool  # False: not finite, the update was not applied
    num_tokens: int  # real (non-padding) tokens
    num_supervised_tokens: int
    row_length: int  # mean padded width of this rank's micro-batches (the T of the MFU formula)
    sample_ids: list = field(default_factory=list)  # this rank's samples (for error messages)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_step(strategy: Strategy, micro_batches: list[dict], ctx: DistContext, *, fused_loss: bool,
               varlen: bool = False) -> StepResult:
    """Forward/backward every micro-batch with the globally token-normalised loss, then `strategy.step`."""
    device = ctx.device
    local_supervised = sum(int((mb["target_ids"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    local_tokens = sum(int(mb["num_real_tokens"]) for mb in micro_batches)
    global_supervised, global_tokens = all_reduce_sum([local_supervised, local_tokens], device)
    if global_supervised == 0:
        raise RuntimeError("the global batch has no supervised tokens")
    local_loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for index, batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        batch = to_device(batch, device)
        with strategy.micro_step_context(is_last):
            with strategy.forward_context():
                loss_sum = batch_loss_sum(strategy.model, batch, fused_loss, varlen)
            strategy.backward(loss_sum / global_supervised, is_last)
        local_loss_sum = local_loss_sum + loss_sum.detach()  # stays on the device: one sync per step, below
        del loss_sum
    (global_loss_sum,) = all_reduce_sum([float(local_loss_sum)], device)
    loss = global_loss_sum / global_supervised
    outcome = strategy.step(loss)
    row_length = round(sum(mb["input_ids"].shape[1] for mb in micro_batches) / len(micro_batches))
    return StepResult(loss=loss, grad_norm=outcome.grad_norm, applied=outcome.applied, num_tokens=int(global_tokens),
                      num_supervised_tokens=int(global_supervised), row_length=row_length,
                      sample_ids=[i for mb in micro_batches for i in mb.get("sample_ids", [])])
