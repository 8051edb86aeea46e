"""FSDP2: `fully_shard` each decoder layer, then the root. Rank 0 alone loads the weights; the others build the
model on the meta device and receive their shards by broadcast, so no rank but one ever holds a full copy."""

from __future__ import annotations

import contextlib

import torch

from llama2_sft.distributed import DistContext, ensure_process_group
from llama2_sft.model import decoder_layers, reset_rotary_buffers
from llama2_sft.strategy.base import ModelFactory, StepSettings, TorchStrategy


class FSDPStrategy(TorchStrategy):
    """Full-shard data parallel. Sharded params are fp32 (the optimizer's master copy); with precision=bf16 they
    are all-gathered in bf16 for compute and gradients are reduced in fp32."""

    def __init__(self, reshard_after_forward: bool = True, cpu_offload: bool = False) -> None:
        super().__init__()
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload

    def setup(self, ctx: DistContext, factory: ModelFactory, settings: StepSettings) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        ensure_process_group(ctx)  # one process (python train.py, or torchrun with one): a group of one
        self.ctx, self.settings = ctx, settings
        if ctx.rank == 0:
            model = factory.build_full("cpu", "fp32")  # fp32 master weights, sharded below
            full_state = model.state_dict()
        else:
            model = factory.build_meta()
            full_state = {}
        factory.prepare(model)

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if settings.precision == "bf16" else MixedPrecisionPolicy()
        kwargs = {"mesh": init_device_mesh(ctx.device.type, (ctx.world_size,)), "mp_policy": policy,
                  "reshard_after_forward": self.reshard_after_forward}
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")  # pinning needs CUDA
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)

        target = "cpu" if self.cpu_offload else ctx.device
        if ctx.rank == 0:
            model.to(target)
        else:
            model.to_empty(device=target)
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        reset_rotary_buffers(model, ctx.device)
        del full_state
        model.train()
        self.model = model
        self.optimizer = factory.build_optimizer(model.named_parameters())

    def micro_step_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()
