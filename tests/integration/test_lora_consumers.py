"""Consumers of LoRA / QLoRA runs written by train.py itself: `load_model` merges a run's adapters into its base (the
NF4 round trip of it for QLoRA) and gives what training measured, format=peft writes a directory stock peft loads,
format=hf a merged model stock transformers loads, infer.py answers from a run directly, and a missing or different
base fails naming it. Runs are tiny (CPU, fp32, 2 steps at lr 1e-2 so the adapters move)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY_ARCH
from tests.integration.test_training_parity import run_train

pytestmark = pytest.mark.slow
pytest.importorskip("peft")

REL = 1e-5
COMMON = ["trainer.max_steps=2", "trainer.save_steps=2", "dataset.eval_fraction=0.25", "optimizer.lr=1e-2",
          "peft.r=4", "peft.alpha=8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_consumers")
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        (root / "rows.jsonl").write_text("".join(next(handle) for _ in range(64)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def lora_run(workdir, tiny_checkpoint):
    """Single-process LoRA on every linear layer, the LM head trained fully (peft.modules_to_save)."""
    run, _ = run_train(workdir, tiny_checkpoint, "lora", [*COMMON, "peft=lora", "peft.modules_to_save=[lm_head]",
                                                           "trainer.micro_batch_size=4"])
    return run


@pytest.fixture(scope="module")
def zero3_run(workdir, tiny_checkpoint):
    """LoRA on the attention projections under DeepSpeed ZeRO-3, 2 ranks (checkpoints without frozen weights)."""
    run, _ = run_train(workdir, tiny_checkpoint, "zero3", [*COMMON, "peft=lora", "peft.target_modules=[q_proj,v_proj]",
                                                            "strategy=deepspeed_zero3", "trainer.micro_batch_size=2"],
                       nproc=2)
    return run


@pytest.fixture(scope="module")
def qlora_run(workdir, tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    run, _ = run_train(workdir, tiny_checkpoint, "qlora", [*COMMON, "peft=qlora", "trainer.micro_batch_size=4"])
    return run


def _load(run, base=None):
    from llama2_sft.inference.load import load_model

    return load_model(str(run), "cpu", "fp32", base=base)


def _ids(vocab_size):
    return torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _final_eval_loss(run) -> float:
    with open(run / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if "eval_loss" in line][-1]["eval_loss"]


def _eval_loss(loaded) -> float:
    """Token-normalised loss of the loaded model on its run's held-out split, computed here, not by the trainer."""
    from llama2_sft.data.chat import IGNORE_INDEX
    from llama2_sft.data.loader import eval_batches
    from llama2_sft.data.tokenize import prepare_dataset
    from llama2_sft.loss import summed_cross_entropy
    from llama2_sft.model import load_tokenizer, tokenizer_path

    cfg = loaded.train_config
    tokenizer = load_tokenizer(cfg.model)
    eval_set = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model)).eval
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(eval_set, 4, 0, 1, tokenizer.pad_token_id):
            logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(summed_cross_entropy(logits, batch["target_ids"]))
            count += int((batch["target_ids"] != IGNORE_INDEX).sum())
    return total / count


def _unmerged(base_model, loaded):
    """The run's training-time model: the base with the adapters injected (not merged) and the saved weights."""
    from llama2_sft.adapters import apply_adapters

    apply_adapters(base_model, loaded.adapters.settings, torch.float32)
    missing, unexpected = base_model.load_state_dict(loaded.adapters.trainable, strict=False)
    assert not unexpected and not [key for key in missing if "lora_" in key]
    return base_model.eval()


def _stock(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------- load_model
@pytest.mark.parametrize("run_name, kind", [("lora_run", "dcp+lora"), ("zero3_run", "deepspeed+lora"),
                                            ("qlora_run", "dcp+qlora")])
def test_a_lora_run_loads_merged_into_a_plain_llama_with_the_eval_loss_training_logged(request, run_name, kind):
    run = request.getfixturevalue(run_name)
    loaded = _load(run)
    assert loaded.kind == kind and type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not [key for key in loaded.model.state_dict() if "lora_" in key or "base_layer" in key]
    assert _eval_loss(loaded) == pytest.approx(_final_eval_loss(run), rel=REL)


@pytest.mark.parametrize("run_name", ["lora_run", "zero3_run"])
def test_merged_logits_are_the_unmerged_adapters_logits_and_differ_from_the_base(request, run_name, tiny_checkpoint):
    loaded = _load(request.getfixturevalue(run_name))
    ids = _ids(loaded.model.config.vocab_size)
    merged = _logits(loaded.model, ids)
    unmerged = _logits(_unmerged(_stock(tiny_checkpoint), loaded), ids)
    torch.testing.assert_close(merged, unmerged, rtol=REL, atol=1e-6)
    assert not torch.allclose(merged, _logits(_stock(tiny_checkpoint), ids), rtol=1e-3, atol=1e-4)


def test_the_adapters_are_the_weights_the_dcp_checkpoint_holds(lora_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    loaded = _load(lora_run)
    dcp_to_torch_save(os.path.join(loaded.source, "model_optim"), tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=False)["model"]
    assert sorted(loaded.adapters.trainable) == sorted(saved) and "lm_head.weight" in saved
    for key, tensor in saved.items():
        assert torch.equal(loaded.adapters.trainable[key], tensor), key


def test_qlora_merges_into_the_nf4_round_trip_its_adapters_were_trained_on(qlora_run, tiny_checkpoint, tmp_path):
    """The reference dequantizes the 4-bit weights of the training-time model (build_model, as train.py builds it)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from llama2_sft.export.hf import export_hf
    from llama2_sft.model import build_model, load_tokenizer

    loaded = _load(qlora_run)
    cfg = loaded.train_config
    quantized = build_model(cfg.model, load_tokenizer(cfg.model), "fp32", "cpu", cfg.seed, cfg.peft, cfg.precision)
    reference = _stock(tiny_checkpoint)
    targets = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = module.weight
                targets[name.replace(".base_layer", "")].weight.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state))
    reference = _unmerged(reference, loaded)
    ids = _ids(loaded.model.config.vocab_size)
    expected = _logits(reference, ids)
    torch.testing.assert_close(_logits(loaded.model, ids), expected, rtol=REL, atol=1e-6)
    export_hf(loaded, str(tmp_path / "hf"), "fp32")
    torch.testing.assert_close(_logits(_stock(tmp_path / "hf"), ids), expected, rtol=REL, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- export
def test_peft_export_loads_in_stock_peft_with_the_runs_logits(lora_run, tiny_checkpoint, tmp_path):
    """Through the CLI; modules_to_save=[lm_head] travels as stock peft writes it."""
    from peft import PeftModel
    from safetensors import safe_open

    out = tmp_path / "adapter"
    done = subprocess.run([sys.executable, "-m", "llama2_sft.export", f"ckpt={lora_run}", "format=peft", f"out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["modules_to_save"], config["r"]) == (tiny_checkpoint, ["lm_head"], 4)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "base_model.model.lm_head.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    stock = PeftModel.from_pretrained(_stock(tiny_checkpoint), str(out)).eval()
    loaded = _load(lora_run)
    ids = _ids(loaded.model.config.vocab_size)
    torch.testing.assert_close(_logits(stock, ids), _logits(loaded.model, ids), rtol=REL, atol=1e-6)
    assert "tokenizer.model" in os.listdir(out) and "chat_template.jinja" in os.listdir(out)


def test_peft_export_writes_the_keys_stock_peft_saves(zero3_run, tiny_checkpoint, tmp_path):
    from peft import PeftModel, get_peft_model
    from safetensors import safe_open

    from llama2_sft.export.adapter import adapter_config, export_peft
    from llama2_sft.inference.load import load_adapters

    adapters = load_adapters(str(zero3_run))
    out = export_peft(adapters, str(tmp_path / "adapter"))
    stock_dir = tmp_path / "stock"
    get_peft_model(_stock(tiny_checkpoint), adapter_config(adapters)).save_pretrained(str(stock_dir))
    keys = {}
    for directory in (out, stock_dir):
        with safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as handle:
            keys[directory] = set(handle.keys())
    assert keys[out] == keys[stock_dir] and len(keys[out]) == 2 * 2 * 2  # 2 layers x q/v x A/B
    stock = PeftModel.from_pretrained(_stock(tiny_checkpoint), out).eval()
    loaded = _load(zero3_run)
    ids = _ids(loaded.model.config.vocab_size)
    torch.testing.assert_close(_logits(stock, ids), _logits(loaded.model, ids), rtol=REL, atol=1e-6)


def test_hf_export_of_a_lora_run_is_the_merged_model_in_stock_transformers(lora_run, tmp_path):
    from llama2_sft.export.hf import export_hf

    loaded = _load(lora_run)
    ids = _ids(loaded.model.config.vocab_size)
    expected = _logits(loaded.model, ids)
    out = export_hf(loaded, str(tmp_path / "hf"), "fp32")
    assert "adapter_config.json" not in os.listdir(out)
    torch.testing.assert_close(_logits(_stock(out), ids), expected, rtol=REL, atol=1e-6)


def test_peft_export_of_a_full_model_fails_naming_it(tiny_checkpoint):
    from llama2_sft.inference.load import load_adapters

    with pytest.raises(ValueError, match="not a LoRA / QLoRA run.*format=hf"):
        load_adapters(tiny_checkpoint)


# --------------------------------------------------------------------------------------------------------- infer
def test_infer_answers_from_a_lora_run_without_exporting(lora_run):
    from llama2_sft.data import encode_dialog

    done = subprocess.run([sys.executable, "infer.py", f"ckpt={lora_run}", 'prompt="3 加 4 等于几？"', "temperature=0",
                           "max_new_tokens=8", "system=none", "device=cpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = _load(lora_run)
    ids = encode_dialog(loaded.tokenizer, [{"role": "user", "content": "3 加 4 等于几？"}]).input_ids
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                    eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    new = new[: new.index(loaded.tokenizer.eos_token_id)] if loaded.tokenizer.eos_token_id in new else new
    assert done.stdout.strip().endswith(loaded.tokenizer.decode(new, skip_special_tokens=True).strip())


# ----------------------------------------------------------------------------------------------------- bad input
def test_a_missing_base_fails_naming_it_and_the_base_override(lora_run, tiny_checkpoint, tmp_path):
    loaded = _load(lora_run)
    moved = tmp_path / "checkpoint"
    shutil.copytree(loaded.source, moved)
    state = json.loads((moved / "trainer_state.json").read_text())
    state["base"]["name_or_path"] = str(tmp_path / "gone")
    (moved / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError) as error:
        _load(moved)
    assert str(tmp_path / "gone") in str(error.value) and "base=" in str(error.value)
    ids = _ids(loaded.model.config.vocab_size)
    torch.testing.assert_close(_logits(_load(moved, base=tiny_checkpoint).model, ids), _logits(loaded.model, ids),
                               rtol=0, atol=0)


def test_a_base_of_another_architecture_fails_naming_both(lora_run, tiny_checkpoint, hf_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "deeper"
    arch = dict(TINY_ARCH, num_hidden_layers=3)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(hf_tokenizer), bos_token_id=1, eos_token_id=2, **arch)).save_pretrained(other)
    with pytest.raises(ValueError) as error:
        _load(lora_run, base=str(other))
    assert tiny_checkpoint in str(error.value) and str(other) in str(error.value)


def test_a_base_override_on_a_full_model_fails_naming_it(tiny_checkpoint):
    with pytest.raises(ValueError, match="base=/elsewhere: only a LoRA / QLoRA run"):
        _load(tiny_checkpoint, base="/elsewhere")
