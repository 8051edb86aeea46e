"""A step whose loss or gradient is not finite stops the run (naming the step and samples) or is skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from llama2_sft.data.loader import BatchLayout, SFTLoader
from llama2_sft.distributed import DistContext, destroy_distributed
from llama2_sft.model import build_model, prepare_for_training
from llama2_sft.strategy import ModelFactory, StepSettings
from llama2_sft.train.loop import NonFiniteLossError, Trainer
from tests.conftest import compose
from tests.unit.test_packing_and_batches import fake_dataset


def make_trainer(hf_tokenizer, on_nan, strategy="single", grad_accum_steps=1):
    cfg = compose([f"trainer.on_nan={on_nan}", "trainer.micro_batch_size=2", f"trainer.grad_accum_steps={grad_accum_steps}",
                   f"strategy={strategy}", "model.arch.hidden_size=32",
                   "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
                   "model.arch.num_key_value_heads=2"])
    ctx = DistContext()
    factory = ModelFactory(build_full=lambda device, precision: build_model(cfg.model, hf_tokenizer, precision, device, 0),
                           build_meta=None, build_optimizer=lambda p: instantiate(cfg.optimizer, params=p, _convert_="all"),
                           prepare=lambda model: prepare_for_training(model, cfg.model, cfg.trainer))
    layout = BatchLayout(2, grad_accum_steps, 1)
    strategy = instantiate(cfg.strategy)
    strategy.setup(ctx, factory, StepSettings("fp32", layout, cfg.trainer.max_grad_norm))
    dataset = fake_dataset(np.full(16, 20))
    loader = SFTLoader(dataset, layout=layout, rank=0, pad_id=0, seed=0, packing=False, max_length=64)
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
    assert not result.applied and trainer.nan_skipped == 1
    after = strategy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    assert all(p.grad is None for p in strategy.model.parameters())  # gradients of the bad step are dropped


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of one rank, as torchrun --nproc_per_node=1 gives (DeepSpeed needs one)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    destroy_distributed()


@pytest.mark.parametrize("strategy", ["single", "deepspeed_zero2"])
def test_a_skipped_step_leaves_the_run_as_if_its_batch_had_never_come(hf_tokenizer, one_process_group, strategy):
    """Skip a NaN step, then take a good one; against a run that only takes the good one. Two micro-batches per
    step, so DeepSpeed's own accumulation boundary must stay aligned across the skip."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    skipped, _ = make_trainer(hf_tokenizer, "skip", strategy, grad_accum_steps=2)
    model = skipped.strategy.unwrapped_model()
    hook = model.model.norm.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    assert not skipped.train_step(skipped.loader.next_step()).applied
    hook.remove()
    assert skipped.train_step(skipped.loader.next_step()).applied and skipped.nan_skipped == 1

    straight, _ = make_trainer(hf_tokenizer, "skip", strategy, grad_accum_steps=2)
    straight.loader.next_step()  # the same second batch
    before = {k: v.clone() for k, v in straight.strategy.unwrapped_model().state_dict().items()}
    assert straight.train_step(straight.loader.next_step()).applied
    after = straight.strategy.unwrapped_model().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the good step did move the weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, after[key]), key
