"""DistributedDataParallel: a full replica per rank, gradients all-reduced (averaged) in backward."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from llama2_sft.distributed import DistContext
from llama2_sft.strategy.base import ModelFactory, StepSettings
from llama2_sft.strategy.single import SingleDeviceStrategy


class DDPStrategy(SingleDeviceStrategy):
    """Every rank loads the model (DDP needs a full replica anyway) and broadcasts rank 0's weights at wrap time."""

    def setup(self, ctx: DistContext, factory: ModelFactory, settings: StepSettings) -> None:
        self.ctx, self.settings = ctx, settings
        self._inner = self._build(factory)
        self.model = self._inner
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = DistributedDataParallel(self._inner, device_ids=device_ids)
        self.optimizer = factory.build_optimizer(self._inner.named_parameters())

    def micro_step_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        if is_last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def unwrapped_model(self) -> torch.nn.Module:
        return self._inner
