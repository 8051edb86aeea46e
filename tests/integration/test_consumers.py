"""Consumers of checkpoints written by train.py itself: consolidation of every checkpoint kind, infer.py, and the
Hugging Face export (stock transformers reproduces the training model's logits and encode_dialog's prompts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.integration.test_training_parity import run_train

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 加 4 等于几？"},
            {"role": "assistant", "content": "7"}, {"role": "user", "content": "and  5 + 5?"}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint):
    workdir = tmp_path_factory.mktemp("consumers")
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        (workdir / "rows.jsonl").write_text("".join(next(handle) for _ in range(64)), encoding="utf-8")
    common = ["trainer.max_steps=2", "trainer.save_steps=2", "dataset.eval_fraction=0.25"]
    single, _ = run_train(workdir, tiny_checkpoint, "single", [*common, "trainer.micro_batch_size=4"])
    fsdp, _ = run_train(workdir, tiny_checkpoint, "fsdp", [*common, "strategy=fsdp", "trainer.micro_batch_size=2"], nproc=2)
    zero3, _ = run_train(workdir, tiny_checkpoint, "zero3", [*common, "strategy=deepspeed_zero3", "trainer.micro_batch_size=2"], nproc=2)
    return {"dcp": single, "fsdp": fsdp, "deepspeed": zero3, "hf": tiny_checkpoint, "workdir": workdir}


def _eval_loss(model, run_dir) -> float:
    """Token-normalised loss of `model` on the run's held-out split, computed here independently of the trainer."""
    from omegaconf import OmegaConf

    from llama2_sft.data.chat import IGNORE_INDEX
    from llama2_sft.data.loader import eval_batches
    from llama2_sft.data.tokenize import prepare_dataset
    from llama2_sft.loss import summed_cross_entropy
    from llama2_sft.model import load_tokenizer, tokenizer_path

    cfg = OmegaConf.load(os.path.join(run_dir, "checkpoints", "step_00000002", "config.yaml"))
    tokenizer = load_tokenizer(cfg.model)
    eval_set = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model)).eval
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(eval_set, 4, 0, 1, tokenizer.pad_token_id):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            total += float(summed_cross_entropy(logits, batch["target_ids"]))
            count += int((batch["target_ids"] != IGNORE_INDEX).sum())
    return total / count


def test_every_checkpoint_kind_consolidates_to_the_weights_training_ended_with(checkpoints):
    from llama2_sft.inference.load import load_model

    for kind in ("dcp", "fsdp", "deepspeed"):
        loaded = load_model(str(checkpoints[kind]), "cpu", "fp32")
        assert loaded.kind == ("deepspeed" if kind == "deepspeed" else "dcp")
        with open(checkpoints[kind] / "metrics.jsonl") as handle:
            final = [json.loads(line) for line in handle if "eval_loss" in line][-1]["eval_loss"]
        assert _eval_loss(loaded.model, checkpoints[kind]) == pytest.approx(final, rel=1e-5), kind
    base = load_model(str(checkpoints["hf"]), "cpu", "fp32").model.state_dict()
    trained = load_model(str(checkpoints["dcp"]), "cpu", "fp32").model.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in trained)  # training changed the weights


@pytest.mark.parametrize("kind", ["dcp", "deepspeed"])
def test_hf_export_gives_the_training_models_logits_through_stock_transformers(checkpoints, kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama2_sft.inference.load import load_model
    from llama2_sft.data import encode_dialog

    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "llama2_sft.export", f"ckpt={checkpoints[kind]}", "format=hf",
                           f"out={out}", "dtype=fp32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_model(str(checkpoints[kind]), "cpu", "fp32").model
    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([encode_dialog(tokenizer, MESSAGES).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    rendered = rendered if isinstance(rendered, list) else rendered["input_ids"]
    assert list(rendered) == encode_dialog(tokenizer, MESSAGES).input_ids


def test_hf_export_defaults_to_bf16_safetensors(checkpoints, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "hf-bf16"
    subprocess.run([sys.executable, "-m", "llama2_sft.export", f"ckpt={checkpoints['workdir'] / 'single'}",
                    f"out={out}"], cwd=REPO, check=True, capture_output=True, timeout=300)
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert files and "tokenizer.model" in os.listdir(out) and "generation_config.json" in os.listdir(out)
    with safe_open(str(out / files[0]), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert not [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pth"))]


def _greedy_reference(ckpt, messages, max_new_tokens):
    from llama2_sft.inference.load import load_model
    from llama2_sft.data import encode_dialog

    loaded = load_model(str(ckpt), "cpu", "fp32")
    ids = encode_dialog(loaded.tokenizer, messages).input_ids
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    if loaded.tokenizer.eos_token_id in new:
        new = new[: new.index(loaded.tokenizer.eos_token_id)]
    return loaded.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_infer_prompt_prints_the_greedy_answer_of_the_run(checkpoints):
    run_dir = checkpoints["workdir"] / "single"
    done = subprocess.run([sys.executable, "infer.py", f"ckpt={run_dir}", 'prompt="3 加 4 等于几？"', "temperature=0",
                           "max_new_tokens=12", "system=none"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _greedy_reference(run_dir, [{"role": "user", "content": "3 加 4 等于几？"}], 12)
    assert done.stdout.strip().endswith(expected)


def test_infer_batch_mode_answers_every_line(checkpoints, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"messages": [{"role": "user", "content": "Reverse abc"}]}, {"prompt": "把 cat 改成大写。"},
        {"messages": MESSAGES}]) + "\n", encoding="utf-8")
    answers = tmp_path / "a.jsonl"
    done = subprocess.run([sys.executable, "infer.py", f"ckpt={checkpoints['deepspeed']}", f"input={questions}",
                           f"output={answers}", "temperature=0", "max_new_tokens=8", "batch_size=2", "system=none"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all(isinstance(r["response"], str) for r in rows)
    # batched (left-padded) generation answers as one-at-a-time generation does
    assert rows[2]["response"] == _greedy_reference(checkpoints["deepspeed"], MESSAGES, 8)


def test_infer_interactive_chat_keeps_history_and_resets(checkpoints):
    done = subprocess.run([sys.executable, "infer.py", f"ckpt={checkpoints['fsdp']}", "temperature=0", "max_new_tokens=4"],
                          input="hello\n/reset\n/system Be brief.\nhi\n/exit\n", cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("assistant> ") == 2 and "(history cleared)" in done.stdout and "system prompt set" in done.stdout
