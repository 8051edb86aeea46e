"""A step whose loss or gradient is not finite stops the run (naming the step and samples) or is skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from llama2_sft.data.loader import BatchLayout, SFTLoader
from llama2_sft.distributed import DistContext
from llama2_sft.model import build_model, prepare_for_training
from llama2_sft.strategy import ModelFactory
from llama2_sft.trainer import NonFiniteLossError, Trainer
from tests.conftest import compose
from tests.unit.test_packing_and_batches import fake_dataset


def make_trainer(hf_tokenizer, on_nan):
    cfg = compose([f"trainer.on_nan={on_nan}", "trainer.micro_batch_size=2", "model.arch.hidden_size=32",
                   "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
                   "model.arch.num_key_value_heads=2"])
    ctx = DistContext()
    factory = ModelFactory(build_full=lambda device, precision: build_model(cfg.model, hf_tokenizer, precision, device, 0),
                           build_meta=None, build_optimizer=lambda p: instantiate(cfg.optimizer, params=p, _convert_="all"),
                           precision="fp32", config=cfg,
                           prepare=lambda model: prepare_for_training(model, cfg.model, cfg.trainer))
    strategy = instantiate(cfg.strategy)
    strategy.setup(ctx, factory)
    dataset = fake_dataset(np.full(16, 20))
    loader = SFTLoader(dataset, layout=BatchLayout(2, 1, 1), rank=0, pad_id=0, seed=0, packing=False, max_length=64)
    return Trainer(cfg, ctx, strategy, hf_tokenizer, loader, None), strategy


def poison(strategy):
    with torch.no_grad():
        strategy.model.lm_head.weight[0, 0] = float("nan")


def test_non_finite_loss_stops_the_run_naming_the_step_and_sample_ids(hf_tokenizer):
    trainer, strategy = make_trainer(hf_tokenizer, "stop")
    trainer.train_step(trainer.loader.next_step())  # a finite step first
    poison(strategy)
    with pytest.raises(NonFiniteLossError, match=r"step 0: non-finite loss nan.*sample ids on rank 0: \['s\d+', 's\d+'\]"):
        trainer.train_step(trainer.loader.next_step())


def test_non_finite_step_is_skipped_and_counted_without_touching_the_weights(hf_tokenizer):
    trainer, strategy = make_trainer(hf_tokenizer, "skip")
    poison(strategy)
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    result = trainer.train_step(trainer.loader.next_step())
    assert result["skipped"] and trainer.nan_skipped == 1
    after = strategy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    assert all(p.grad is None for p in strategy.model.parameters())  # gradients of the bad step are dropped
