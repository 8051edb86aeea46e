"""One process, one device. Weights stay fp32; bf16 precision computes under autocast (as the HF Trainer does)."""

from __future__ import annotations

import contextlib

import torch

from llama2_sft.distributed import DistContext
from llama2_sft.strategy.base import ModelFactory, TorchStrategy


class SingleDeviceStrategy(TorchStrategy):
    """No parallelism. With several ranks it refuses: use ddp, fsdp or deepspeed."""

    name = "single"

    def setup(self, ctx: DistContext, factory: ModelFactory) -> None:
        if ctx.world_size > 1:
            raise ValueError(f"strategy=single cannot run on {ctx.world_size} ranks: choose strategy=ddp, fsdp or deepspeed_zero*")
        self.ctx = ctx
        self.precision = factory.precision
        self.model = factory.build_full(ctx.device, "fp32")  # fp32 weights; bf16 compute under autocast
        factory.prepare(self.model)
        self.model.train()
        self.optimizer = factory.build_optimizer(self.model.named_parameters())

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
