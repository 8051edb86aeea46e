"""LoRA / QLoRA training (peft): the adapters start as a no-op, only they (and `modules_to_save`) move, the math does
not depend on the strategy or on how the work is split, a resumed or SIGKILLed run continues exactly, and QLoRA is
LoRA on the NF4 round trip of the base.

In-process tests build the model with `build_model` and step it through a strategy; the rest run `train.py` for real
(torchrun with 2 gloo ranks where it says so) on the tiny Llama checkpoint and compare metrics.jsonl (fp32, CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from llama2_sft.data.loader import BatchLayout, SFTLoader
from llama2_sft.distributed import DistContext
from llama2_sft.model import build_model, prepare_for_training
from llama2_sft.strategy import ModelFactory, StepSettings
from llama2_sft.train.loop import Trainer
from tests.conftest import REPO, compose
from tests.integration.test_crash_safety import final_losses, last_logged_step
from tests.integration.test_training_parity import assert_same_losses, losses, run_train
from tests.unit.test_nonfinite import one_process_group  # noqa: F401 - a fixture
from tests.unit.test_packing_and_batches import fake_dataset

pytest.importorskip("peft")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_cfg(checkpoint, *overrides):
    return compose([f"model.name_or_path={checkpoint}", "model.tokenizer=null", "model.arch=null", "peft=lora",
                    *overrides])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(vocab_size, n=24, seed=0):
    return torch.randint(3, vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize("modules_to_save", [[], ["lm_head", "embed_tokens"]])
def test_a_lora_model_starts_with_the_base_models_logits_exactly(tiny_checkpoint, hf_tokenizer, modules_to_save):
    cfg = lora_cfg(tiny_checkpoint, f"peft.modules_to_save=[{','.join(modules_to_save)}]")
    base = build_model(cfg.model, hf_tokenizer, "fp32")
    lora = build_model(cfg.model, hf_tokenizer, "fp32", "cpu", 0, cfg.peft, "fp32")
    adapters = {name: p for name, p in lora.named_parameters() if "lora_" in name}
    assert len(adapters) == 2 * len(LINEAR) * base.config.num_hidden_layers
    # A is random, B is zero: the adapter is a no-op that has gradients (a test that cannot fail would have both 0).
    assert all(p.abs().sum() > 0 for name, p in adapters.items() if "lora_A" in name)
    assert all(torch.count_nonzero(p) == 0 for name, p in adapters.items() if "lora_B" in name)
    ids = sample_ids(base.config.vocab_size)
    assert torch.equal(logits(base, ids), logits(lora, ids))
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    saved = {name for name in trainable if "lora_" not in name}
    assert saved == {f"{module}.weight" for module in ("lm_head", "model.embed_tokens") if module.rsplit(".")[-1] in modules_to_save}


def test_qlora_starts_at_the_base_with_every_targeted_weight_replaced_by_its_nf4_round_trip(tiny_checkpoint, hf_tokenizer):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    cfg = compose([f"model.name_or_path={tiny_checkpoint}", "model.tokenizer=null", "model.arch=null", "peft=qlora"])
    qlora = build_model(cfg.model, hf_tokenizer, "fp32", "cpu", 0, cfg.peft, "fp32")
    assert type(qlora.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    base = build_model(cfg.model, hf_tokenizer, "fp32")
    ids = sample_ids(base.config.vocab_size)
    exact = logits(base, ids)
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in LINEAR:
                packed, state = bnbf.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(packed, state)
    round_trip = logits(base, ids)
    assert not torch.allclose(exact, round_trip, rtol=1e-3, atol=1e-4)  # NF4 does change the model...
    torch.testing.assert_close(logits(qlora, ids), round_trip, rtol=1e-5, atol=1e-6)  # ...into exactly this one


def test_qlora_gradients_stay_right_after_an_eval_forward(tiny_checkpoint, hf_tokenizer):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel with no backward on the first eval forward; the
    Validator runs one between training steps. The gradients after it must be the gradients before it."""
    pytest.importorskip("bitsandbytes")
    cfg = compose([f"model.name_or_path={tiny_checkpoint}", "model.tokenizer=null", "model.arch=null", "peft=qlora"])
    model = build_model(cfg.model, hf_tokenizer, "fp32", "cpu", 0, cfg.peft, "fp32")
    ids = sample_ids(model.config.vocab_size)

    def gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    logits(model, ids)
    after = gradients()
    assert all(g.abs().sum() > 0 for name, g in before.items() if "layers.0." in name and "lora_B" in name)  # (A: B is 0)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-8, msg=name)


def test_target_modules_naming_no_module_fails_naming_the_key_and_the_modules_that_exist(tiny_checkpoint, hf_tokenizer):
    cfg = lora_cfg(tiny_checkpoint, "peft.target_modules=[q_proj,qkv_proj]")
    with pytest.raises(ValueError, match=r"peft.target_modules=.*\['qkv_proj'\].*'down_proj'.*'q_proj'"):
        build_model(cfg.model, hf_tokenizer, "fp32", "cpu", 0, cfg.peft, "fp32")
    cfg = lora_cfg(tiny_checkpoint, "peft.modules_to_save=[lm_heads]")
    with pytest.raises(ValueError, match=r"peft.modules_to_save=.*\['lm_heads'\].*'lm_head'"):
        build_model(cfg.model, hf_tokenizer, "fp32", "cpu", 0, cfg.peft, "fp32")


# ----------------------------------------------------------------------------------------------------------------------
# What a step touches


@pytest.mark.parametrize("strategy", ["single", "deepspeed_zero2"])
def test_training_moves_only_the_adapters_and_modules_to_save_and_only_they_have_optimizer_state(
        tiny_checkpoint, hf_tokenizer, one_process_group, strategy):  # noqa: F811 - the fixture
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    cfg = lora_cfg(tiny_checkpoint, f"strategy={strategy}", "peft.modules_to_save=[lm_head]", "optimizer.lr=1e-2",
                   "trainer.micro_batch_size=2", "model.gradient_checkpointing=true")
    factory = ModelFactory(
        build_full=lambda device, precision: build_model(cfg.model, hf_tokenizer, precision, device, 0, cfg.peft, "fp32"),
        build_meta=None, build_optimizer=lambda p: instantiate(cfg.optimizer, params=p, _convert_="all"),
        prepare=lambda model: prepare_for_training(model, cfg.model, cfg.trainer))
    layout = BatchLayout(2, 1, 1)
    engine = instantiate(cfg.strategy)
    engine.setup(DistContext(), factory, StepSettings("fp32", layout, cfg.trainer.max_grad_norm))
    loader = SFTLoader(fake_dataset(np.full(16, 20)), layout=layout, rank=0, pad_id=0, seed=0, packing=False, max_length=64)
    trainer = Trainer(cfg, DistContext(), engine, hf_tokenizer, loader, None)
    model = engine.unwrapped_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        assert trainer.train_step(trainer.loader.next_step()).applied
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every adapter and lm_head moved; nothing else did, bit for bit
    assert any("lora_B" in k for k in changed) and "lm_head.weight" in changed and len(changed) > 20
    if strategy == "single":
        with_state = {id(p) for p, s in engine.optimizer.state.items() if s}
        assert with_state == {id(p) for p in model.parameters() if p.requires_grad}
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    else:  # DeepSpeed's optimizer holds one flat fp32 partition of the trainable weights: its size says which
        flat = sum(g.numel() for g in engine.engine.optimizer.single_partition_of_fp32_groups)
        assert flat == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# train.py: strategies, accumulation, resume, SIGKILL, QLoRA

LORA = ["peft=lora", "peft.modules_to_save=[lm_head]", "optimizer.lr=1e-2", "dataset.packing=true",
        "model.gradient_checkpointing=true", "trainer.max_steps=6", "trainer.save_steps=3", "trainer.save_total_limit=1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        (root / "rows.jsonl").write_text("".join(next(handle) for _ in range(64)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def straight(workdir, tiny_checkpoint):
    """The uninterrupted LoRA run: one process, global batch 4 packed rows."""
    return run_train(workdir, tiny_checkpoint, "straight", [*LORA, "trainer.micro_batch_size=4"])[0]


@pytest.mark.slow
def test_lora_checkpoints_hold_only_the_trainable_weights_and_their_optimizer_state(straight, tiny_checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(straight, "checkpoints", "step_00000006")
    keys = FileSystemReader(os.path.join(path, "model_optim")).read_metadata().state_dict_metadata
    model_keys = {k.split(".", 1)[1] for k in keys if k.startswith("model.")}
    assert model_keys and all("lora_" in k or k == "lm_head.weight" for k in model_keys)
    assert {k for k in keys if k.startswith("optimizer.state.")} and all(
        "lora_" in k or "lm_head" in k for k in keys if k.startswith("optimizer.state."))
    with open(os.path.join(path, "trainer_state.json")) as handle:
        base = json.load(handle)["base"]
    assert base["name_or_path"] == tiny_checkpoint and len(base["config_sha256"]) == 64
    assert (straight / "curves.png").stat().st_size > 10_000  # every run ends with its loss curves drawn


@pytest.mark.slow
def test_lora_losses_equal_for_accumulation_and_for_fsdp2_and_zero3_on_two_ranks_each_stopped_and_resumed(
        workdir, tiny_checkpoint, straight):
    reference = losses(straight)
    assert len(set(reference.values())) == 6  # the adapters are learning: each step differs
    split, _ = run_train(workdir, tiny_checkpoint, "accum", [*LORA, "trainer.micro_batch_size=1",
                                                             "trainer.grad_accum_steps=4", "trainer.save_steps=0"])
    assert_same_losses(reference, losses(split))
    for strategy in ("fsdp", "deepspeed_zero3"):
        args = [*LORA, f"strategy={strategy}", "trainer.micro_batch_size=2"]
        run_train(workdir, tiny_checkpoint, strategy, [*args, "trainer.stop_after_steps=3"], nproc=2)
        resumed, done = run_train(workdir, tiny_checkpoint, strategy, args, nproc=2)
        assert "resumed from" in done.stderr + done.stdout
        assert_same_losses(reference, losses(resumed))


@pytest.mark.slow
def test_a_stopped_lora_run_resumes_exactly_and_a_sigkilled_one_too(workdir, tiny_checkpoint, straight):
    args = [*LORA, "trainer.micro_batch_size=4", "trainer.save_steps=2"]
    run_train(workdir, tiny_checkpoint, "stopped", [*args, "trainer.stop_after_steps=2"])
    resumed, done = run_train(workdir, tiny_checkpoint, "stopped", args)
    assert "resumed from" in done.stderr + done.stdout and losses(resumed) == losses(straight)

    killed = workdir / "killed"
    command = [sys.executable, "train.py", f"output_dir={killed}", f"model.name_or_path={tiny_checkpoint}",
               "model.tokenizer=null", "model.arch=null", f"dataset.source={workdir / 'rows.jsonl'}",
               "dataset.eval_source=null", "dataset.eval_fraction=0", "dataset.max_length=256",
               f"dataset.cache_dir={workdir / 'cache'}", "trainer.eval_steps=0", "trainer.accuracy_samples=0",
               "trainer.generate_samples=0", "trainer.log_steps=1", "scheduler.warmup_ratio=0", *args,
               "trainer.max_steps=6"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while last_logged_step(killed) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    was_killed = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    rerun, _ = run_train(workdir, tiny_checkpoint, "killed", args)
    assert final_losses(rerun) == losses(straight)
    if not was_killed:
        pytest.skip("the run finished before it could be killed (the resume half was still checked)")


@pytest.mark.slow
def test_resuming_onto_a_different_base_fails_naming_both(workdir, tiny_checkpoint, straight):
    from transformers import AutoConfig, LlamaForCausalLM

    other = workdir / "other_base"
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config.intermediate_size *= 2
    LlamaForCausalLM(config).save_pretrained(other)
    for name in os.listdir(tiny_checkpoint):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy2(os.path.join(tiny_checkpoint, name), other / name)
    shutil.copytree(straight, workdir / "moved", dirs_exist_ok=True)
    _, done = run_train(workdir, other, "moved", [*LORA, "trainer.micro_batch_size=4", "trainer.max_steps=8"], check=False)
    assert done.returncode != 0
    message = done.stderr
    assert "this run adapts base" in message and str(other) in message and tiny_checkpoint in message


@pytest.mark.slow
def test_qlora_gives_the_losses_of_lora_on_the_nf4_round_tripped_base(workdir, tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in LINEAR:
                packed, state = bnbf.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(packed, state)
    round_tripped = workdir / "nf4_round_trip"
    base.save_pretrained(round_tripped)
    for name in os.listdir(tiny_checkpoint):
        if not name.endswith((".safetensors", "config.json")) or name == "tokenizer_config.json":
            shutil.copy2(os.path.join(tiny_checkpoint, name), round_tripped / name)
    args = [*LORA, "trainer.micro_batch_size=4", "trainer.save_steps=0", "trainer.max_steps=4"]
    lora, _ = run_train(workdir, str(round_tripped), "lora-on-nf4", args)
    qlora, _ = run_train(workdir, tiny_checkpoint, "qlora", [*args, "peft=qlora"])
    assert len(set(losses(lora).values())) == 4
    assert_same_losses(losses(lora), losses(qlora), rel=1e-4)
