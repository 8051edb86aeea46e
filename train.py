"""Fine-tune a Llama-2 chat model.

    python train.py                                            # embedded default: tiny Llama, bundled data, CPU
    torchrun --nproc_per_node=8 train.py +experiment=sft_7b    # the reference recipe (FSDP2, bf16, 8 GPUs)
    python train.py trainer.max_steps=50 dataset.packing=false # any key can be overridden

Rerunning the same command with the same output_dir resumes from its latest complete checkpoint. SIGTERM / SIGUSR1
stop a run after the current step with a checkpoint, exit status 75 (llama2_sft.train.preemption).
"""

from __future__ import annotations

import logging
import os
import random
import sys

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from llama2_sft.config import preflight, register_configs, validate
from llama2_sft.distributed import destroy_distributed, init_distributed, rank_from_env
from llama2_sft.train.preemption import PREEMPTED_EXIT_CODE, requeue_slurm_job

log = logging.getLogger("train")
register_configs()
if rank_from_env() != 0:
    # Each torchrun rank composes its own config; only rank 0 writes Hydra's output (.hydra/, train.log).
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from llama2_sft.checkpoint import resolve_resume
    from llama2_sft.data.loader import BatchLayout, SFTLoader
    from llama2_sft.data.tokenize import prepare_dataset
    from llama2_sft.model import build_meta_model, build_model, load_tokenizer, prepare_for_training, tokenizer_path
    from llama2_sft.strategy import ModelFactory, StepSettings
    from llama2_sft.train.loop import Trainer

    validate(cfg)  # bad keys and impossible values fail here, before any heavy work
    ctx = init_distributed()
    try:
        preflight(cfg, ctx.device)  # needs the model's config / the device; still before data and weights
        # Seed every RNG identically on all ranks: the model init and data order must not depend on the rank.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Data: tokenized once and cached (rank 0 builds, the others wait on the file system).
        tokenizer = load_tokenizer(cfg.model)
        data = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model), rank=ctx.rank)
        layout = BatchLayout(cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps, ctx.world_size)
        loader = SFTLoader(data.train, layout=layout, rank=ctx.rank, pad_id=tokenizer.pad_token_id, seed=cfg.seed,
                           packing=cfg.dataset.packing, max_length=cfg.dataset.max_length,
                           group_by_length=cfg.dataset.group_by_length,
                           pad_to_multiple_of=cfg.dataset.pad_to_multiple_of,
                           allow_batch_change=cfg.resume_batch_change == "allow")

        # Model + optimizer, placed by the strategy (single / ddp / fsdp / deepspeed).
        factory = ModelFactory(
            build_full=lambda device, precision: build_model(cfg.model, tokenizer, precision, device, cfg.seed,
                                                             cfg.peft, cfg.precision),
            build_meta=lambda: build_meta_model(cfg.model, tokenizer, "fp32", cfg.peft, cfg.precision),
            build_optimizer=lambda named_params: instantiate(cfg.optimizer, params=named_params, _convert_="all"),
            prepare=lambda model: prepare_for_training(model, cfg.model, cfg.trainer),
        )
        strategy = instantiate(cfg.strategy)
        strategy.setup(ctx, factory, StepSettings(cfg.precision, layout, cfg.trainer.max_grad_norm))

        trainer = Trainer(cfg, ctx, strategy, tokenizer, loader, data.eval, tokenizer_dir=_local_dir(tokenizer_path(cfg.model)))
        trainer.resume(resolve_resume(cfg.resume, cfg.output_dir))
        if ctx.is_main:
            log.info("%s train samples, %s eval; %d steps of %d x %d x %d units; %s",
                     f"{len(data.train):,}", f"{len(data.eval) if data.eval is not None else 0:,}", trainer.total_steps,
                     layout.micro_batch_size, layout.grad_accum_steps, layout.world_size, type(strategy).__name__)
        summary = trainer.fit()

        if ctx.is_main:
            _report(summary)
            if summary["requeue"]:  # before the barrier below: under torchrun the first rank to exit ends the rest
                requeue_slurm_job()
    finally:
        destroy_distributed()
    if summary["preempted"]:  # a complete checkpoint of the last step exists: rerunning the command resumes it
        raise SystemExit(PREEMPTED_EXIT_CODE)
    if ctx.is_main and list(cfg.trainer.eval_tasks) and not summary["stopped_early"]:
        _benchmarks(cfg, summary["checkpoint"])  # after the process group is gone: no rank waits on this
    return summary


def _benchmarks(cfg: DictConfig, checkpoint: str) -> None:
    """trainer.eval_tasks on the final checkpoint, as `python -m llama2_sft.evaluate ckpt=CHECKPOINT tasks=...` with
    its defaults; results in output_dir/eval."""
    from omegaconf import OmegaConf

    from llama2_sft.config import EvaluateConfig
    from llama2_sft.evaluate import evaluate_and_report

    evaluate_and_report(OmegaConf.structured(EvaluateConfig(ckpt=checkpoint, tasks=list(cfg.trainer.eval_tasks),
                                                            out=os.path.join(cfg.output_dir, "eval"))))


def _local_dir(path: str) -> str | None:
    return path if os.path.isdir(path) else None


def _report(summary: dict) -> None:
    accuracy = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.1%}"
    start, end = summary["eval_loss_start"], summary["eval_loss_end"]
    print(f"\ndone: {summary['steps']} steps in {summary['seconds']:.0f} s")
    if start is not None and end is not None:
        print(f"eval loss {start:.4f} -> {end:.4f}")
    print(f"held-out task accuracy (greedy, exact match): {accuracy}")
    for task, entry in (summary.get("accuracy_per_task") or {}).items():
        print(f"  {task:<12} {entry['accuracy']:6.1%}  ({entry['correct']}/{entry['count']})")
    for sample in summary["samples"]:
        print(f"  reference {sample['reference']!r}  generated {sample['generated']!r}")
    print(f"checkpoint: {summary['checkpoint']}")
    if summary["preempted"]:
        print(f"stopped by a signal at step {summary['steps']}: rerun the same command to resume "
              f"(exit status {PREEMPTED_EXIT_CODE})")


if __name__ == "__main__":
    main()
