"""DistributedDataParallel: a full replica per rank, gradients all-reduced (averaged) in backward."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from llama2_sft.distributed import DistContext
from llama2_sft.strategy.base import ModelFactory
from llama2_sft.strategy.single import SingleDeviceStrategy


class DDPStrategy(SingleDeviceStrategy):
    """Every rank loads the model (DDP needs a full replica anyway) and broadcasts rank 0's weights at wrap time."""

    name = "ddp"

    def setup(self, ctx: DistContext, factory: ModelFactory) -> None:
        self.ctx = ctx
        self.precision = factory.precision
        model = factory.build_full(ctx.device, "fp32")
        factory.prepare(model)
        model.train()
        self._inner = model
        if ctx.world_size > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model
        self.optimizer = factory.build_optimizer(model.named_parameters())

    def micro_step_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        if is_last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def unwrapped_model(self) -> torch.nn.Module:
        return self._inner

    def unwrapped_for_state(self) -> torch.nn.Module:
        return self._inner
