"""DeepSpeed ZeRO-2 / ZeRO-3 (optionally offloaded). The DeepSpeed JSON is generated from the Hydra config, so there
is no hand-kept JSON to drift; the torch optimizer built by `optimizer._target_` is handed to the engine."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from typing import Any

import torch

from llama2_sft.distributed import DistContext, ensure_process_group
from llama2_sft.strategy.base import ModelFactory, StepOutcome, StepSettings, Strategy


def deepspeed_config(*, stage: int, precision: str, micro_batch_size: int, grad_accum_steps: int, world_size: int,
                     max_grad_norm: float, offload_optimizer: bool, offload_param: bool, overlap_comm: bool,
                     contiguous_gradients: bool) -> dict:
    """The DeepSpeed JSON for this run."""
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": contiguous_gradients,
        "reduce_bucket_size": 5e8,
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": 5e8,
            "stage3_param_persistence_threshold": 1e6,
            "stage3_gather_16bit_weights_on_model_save": False,  # we save sharded; export consolidates
        })
        if offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": max_grad_norm if max_grad_norm > 0 else 0.0,
        # check_grad_overflow: skip an update whose gradient norm is not finite (DeepSpeed does so by default
        # only for fp16 and fp32), so every strategy shares one non-finite policy
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStrategy(Strategy):
    """ZeRO via the DeepSpeed engine under torchrun (works on CPU with gloo; `accelerate launch` does not)."""

    def __init__(self, stage: int = 3, offload_optimizer: bool = False, offload_param: bool = False,
                 overlap_comm: bool = True, contiguous_gradients: bool = True) -> None:
        super().__init__()
        if stage not in (2, 3):
            raise ValueError(f"strategy.stage={stage}: expected 2 or 3")
        if offload_param and stage != 3:
            raise ValueError("strategy.offload_param=true needs strategy.stage=3")
        self.stage = stage
        self.offload_optimizer = offload_optimizer
        self.offload_param = offload_param
        self.overlap_comm = overlap_comm
        self.contiguous_gradients = contiguous_gradients

    def setup(self, ctx: DistContext, factory: ModelFactory, settings: StepSettings) -> None:
        try:
            import deepspeed
        except ImportError as error:
            raise ValueError("strategy=deepspeed_* needs DeepSpeed: pip install 'llama2_sft[deepspeed]'") from error
        self.ctx, self.settings = ctx, settings
        layout = settings.layout
        self.ds_config = deepspeed_config(
            stage=self.stage, precision=settings.precision, micro_batch_size=layout.micro_batch_size,
            grad_accum_steps=layout.grad_accum_steps, world_size=layout.world_size,
            max_grad_norm=settings.max_grad_norm, offload_optimizer=self.offload_optimizer,
            offload_param=self.offload_param, overlap_comm=self.overlap_comm and ctx.device.type == "cuda",
            contiguous_gradients=self.contiguous_gradients,
        )
        if ctx.device.type == "cpu":  # DeepSpeed picks its accelerator itself; make the CPU choice explicit
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (~2.5 min on 2 cores, first run only)
            # that only speeds up CPU all-reduce; plain gloo collectives are exact and need no build.
            # (importlib: `import deepspeed.comm.torch` would resolve to the torch library re-exported there)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        ensure_process_group(ctx)  # one process (python train.py, or torchrun with one): a group of one
        # deepspeed.comm adopts the process group before reading the world size
        deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
        hf_ds_config = None
        if self.stage == 3:
            # While this object lives, transformers builds the model partitioned (zero.Init) and loads the
            # checkpoint shard by shard: no rank ever holds a full copy.
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = factory.build_full(ctx.device, settings.precision)  # DeepSpeed keeps its own fp32 master copy
        factory.prepare(model)
        optimizer = factory.build_optimizer(model.named_parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                          dist_init_required=False)
        self._hf_ds_config = hf_ds_config  # must stay alive as long as the partitioned model
        self.engine = engine
        self.model = engine
        self.optimizer = ds_optimizer

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        # The loop already normalised the loss over the whole global batch; stop DeepSpeed dividing it again, and
        # undo its averaging over ranks as the base class does.
        self.engine.backward(loss * self.ctx.world_size, scale_wrt_gas=False)
        if not is_last:
            self.engine.step()  # DeepSpeed counts micro-steps in step(); off the boundary it only accumulates

    def step(self, loss: float) -> StepOutcome:
        """DeepSpeed clips, checks the gradient norm and steps inside `engine.step()` (which also zeroes the
        gradients). Its overflow check (on for every precision, see `deepspeed_config`) skips an update whose
        gradient norm is not finite; a non-finite loss gives non-finite gradients, so it is skipped the same way."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        return StepOutcome(grad_norm, bool(self.engine.was_step_applied()) and math.isfinite(loss))

    def save(self, directory: str) -> None:
        # frozen weights (a LoRA run's base) come from the base model, not from checkpoints
        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: str) -> None:
        """Restore a ZeRO checkpoint; one written on another number of ranks goes through DeepSpeed's universal
        checkpoint (converted once, next to the original, by `universal_checkpoint`)."""
        tag = "deepspeed"
        if not os.path.isdir(os.path.join(directory, tag)):
            other = " (it holds torch.distributed.checkpoint state, model_optim/: resume it with strategy=single, ddp " \
                    "or fsdp)" if os.path.isdir(os.path.join(directory, "model_optim")) else ""
            raise ValueError(f"{directory}: no DeepSpeed checkpoint (deepspeed/) to resume from{other}")
        saved_world, saved_stage = zero_world_size(os.path.join(directory, tag)), zero_stage(os.path.join(directory, tag))
        if saved_stage != self.stage:  # DeepSpeed's universal checkpoint keeps the stage's file layout
            raise ValueError(f"{directory}: written with ZeRO-{saved_stage}, this run is ZeRO-{self.stage}: resume it "
                             f"with strategy=deepspeed_zero{saved_stage} (on any number of ranks)")
        universal = saved_world != self.ctx.world_size
        if universal:
            tag = universal_checkpoint(directory, saved_world, self.ctx)
        self.engine._config.load_universal_checkpoint = universal  # read by load_checkpoint only
        # DeepSpeed's universal loader copies the first group's hyperparameters into every group (weight decay
        # then reaches the no-decay group): they come from this run's config anyway, so they are put back.
        groups = self.engine.optimizer.optimizer.param_groups
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        try:
            path, _ = self.engine.load_checkpoint(directory, tag=tag, load_lr_scheduler_states=False,
                                                  load_module_strict=not self._has_frozen_parameters())
        finally:
            self.engine._config.load_universal_checkpoint = False
        if universal:
            for group, saved in zip(groups, hyperparameters):
                group.update(saved)
            # ... and gives every group's state one shared `step` tensor, which a fused / foreach AdamW increments
            # in place once per group: each group gets its own copy.
            for state in self.engine.optimizer.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        if path is None:
            raise ValueError(f"{directory}: no DeepSpeed checkpoint (tag 'deepspeed') to resume from")

    def unwrapped_model(self) -> torch.nn.Module:
        return self.engine.module

    def _has_frozen_parameters(self) -> bool:
        return any(not p.requires_grad for p in self.engine.module.parameters())

    def num_parameters(self) -> int:
        # ZeRO-3 partitions parameters in place: each keeps its full size in `ds_numel`
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())


UNIVERSAL_TAG = "deepspeed_universal"


def zero_world_size(folder: str) -> int | None:
    """The number of data-parallel ranks a ZeRO checkpoint folder was written by (one optimizer file each)."""
    if not os.path.isdir(folder):
        return None
    ranks = {name for name in os.listdir(folder) if name.endswith("_optim_states.pt") and "zero_pp_rank_" in name}
    return len(ranks) or None


def zero_stage(folder: str) -> int:
    """The ZeRO stage a checkpoint folder was written with: ZeRO-3 keeps one model-states file per rank."""
    return 3 if any(name.startswith("zero_pp_rank_") and name.endswith("_model_states.pt") for name in os.listdir(folder)) \
        else 2


def universal_checkpoint(directory: str, saved_world: int, ctx: DistContext) -> str:
    """Convert `directory/deepspeed` (ZeRO-2/3 on `saved_world` ranks) into DeepSpeed's universal checkpoint in
    `directory/deepspeed_universal` (rank 0, atomically; reused when there) and return its tag."""
    from llama2_sft.distributed import all_reduce_max

    final = os.path.join(directory, UNIVERSAL_TAG)
    error = None
    if ctx.is_main and not os.path.isdir(final):
        import argparse
        import logging
        import shutil

        from deepspeed.checkpoint import ds_to_universal

        logging.getLogger(__name__).info("%s: written on %d ranks, resuming on %d: converting to DeepSpeed's universal "
                                         "checkpoint in %s", directory, saved_world, ctx.world_size, final)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=os.path.join(directory, "deepspeed"), output_folder=tmp,
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # ZeRO-2 saves carry no universal_checkpoint_info
        try:
            ds_to_universal.main(args)
            os.replace(tmp, final)
            with contextlib.suppress(FileNotFoundError):  # the converter's pointer, naming the temporary folder
                os.remove(os.path.join(directory, "latest_universal"))
        except Exception as failure:  # noqa: BLE001 - any converter failure: say how to go on, on every rank
            shutil.rmtree(tmp, ignore_errors=True)
            error = ValueError(
                f"{directory}: this DeepSpeed checkpoint was written on {saved_world} ranks and cannot be converted to "
                f"resume on {ctx.world_size} ({type(failure).__name__}: {failure}). Resume it on {saved_world} ranks, "
                f"or convert it yourself: python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state "
                f"--input_folder {directory}/deepspeed --output_folder {final}")
            error.__cause__ = failure
    # a collective (the other ranks wait here for the conversion), which also tells them whether it failed
    if all_reduce_max(int(error is not None), ctx.device):
        raise error or ValueError(f"{directory}: rank 0 could not convert the DeepSpeed checkpoint (see its log)")
    return UNIVERSAL_TAG
