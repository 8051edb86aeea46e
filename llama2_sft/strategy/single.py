"""One process, one device. Weights stay fp32; bf16 precision computes under autocast (as the HF Trainer does)."""

from __future__ import annotations

import contextlib

import torch

from llama2_sft.distributed import DistContext
from llama2_sft.strategy.base import ModelFactory, StepSettings, TorchStrategy


class SingleDeviceStrategy(TorchStrategy):
    """No parallelism. With several ranks it refuses: use ddp, fsdp or deepspeed."""

    def setup(self, ctx: DistContext, factory: ModelFactory, settings: StepSettings) -> None:
        if ctx.world_size > 1:
            raise ValueError(f"strategy=single cannot run on {ctx.world_size} ranks: choose strategy=ddp, fsdp or deepspeed_zero*")
        self.ctx, self.settings = ctx, settings
        self.model = self._build(factory)
        self.optimizer = factory.build_optimizer(self.model.named_parameters())

    def _build(self, factory: ModelFactory) -> torch.nn.Module:
        model = factory.build_full(self.ctx.device, "fp32")  # fp32 weights; bf16 compute under autocast
        factory.prepare(model)
        model.train()
        return model

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.settings.precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
