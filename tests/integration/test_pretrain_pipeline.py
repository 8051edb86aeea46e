"""Issue 14 end to end on CPU, through the real commands: extend the vocabulary (python -m llama2_sft.vocab) ->
continued pretraining on the bundled text corpus (+experiment=pt_7b_zh shrunk to the tiny Llama: LoRA on every
linear layer, embed_tokens and lm_head trained fully, the checkpoint grown at load) -> SFT starting from that run ->
infer. The SFT stage trains on the bundled mix (dataset=mix), so each step record's per-source counts are checked
through train.py too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
           PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
SHORT = ["trainer.save_steps=0", "trainer.eval_steps=0", "trainer.accuracy_samples=0", "trainer.generate_samples=0",
         "trainer.log_steps=1", "scheduler.warmup_ratio=0", "logger=none", "dataset.num_proc=1"]


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def records(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_extend_then_pretrain_on_text_then_sft_then_infer(tmp_path, tiny_checkpoint):
    from llama2_sft.inference.load import load_model

    pytest.importorskip("peft")
    tok_zh = tmp_path / "tok_zh"
    run("-m", "llama2_sft.vocab", "base=data/tokenizer", "corpus=[data/text_zh.txt]", "vocab_size=300",
        "num_threads=1", f"out={tok_zh}")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok_zh)))
    assert vocab > 1024 and vocab % 64 == 0

    pretrain = tmp_path / "pt"
    done = run("train.py", "+experiment=pt_7b_zh", f"output_dir={pretrain}", f"model.name_or_path={tiny_checkpoint}",
               f"model.tokenizer={tok_zh}", "precision=fp32", "model.gradient_checkpointing=false",
               "dataset.max_length=128", "dataset.eval_fraction=0.05", f"dataset.cache_dir={tmp_path / 'cache'}",
               "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.grad_accum_steps=1",
               "optimizer.lr=3e-3", *SHORT)
    assert f"vocabulary grown from 1024 to {vocab} rows" in done.stdout + done.stderr
    steps = [r for r in records(pretrain) if "loss" in r]
    evals = [r["eval_loss"] for r in records(pretrain) if "eval_loss" in r]
    assert len(steps) == 6 and evals[-1] < evals[0]
    # plain text: each row's every token but the first of each piece is a target
    assert all(0 < r["num_supervised_tokens"] < r["num_tokens"] for r in steps)
    pretrained = load_model(str(pretrain), device="cpu", dtype="fp32")  # the grown base + merged adapters
    assert pretrained.kind == "dcp+lora" and pretrained.model.config.vocab_size == vocab
    assert torch.equal(pretrained.model.lm_head.weight, pretrained.adapters.trainable["lm_head.weight"])

    # SFT from the pretraining run, on the bundled mix (chat rows 3 : 1 text, to keep the pretraining's gains)
    sft = tmp_path / "sft"
    done = run("train.py", f"output_dir={sft}", f"model.name_or_path={pretrain}", "model.tokenizer=null",
               "model.arch=null", "dataset=mix", f"dataset.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=3",
               "trainer.micro_batch_size=4", "optimizer.lr=1e-3", *SHORT)
    assert "vocabulary grown" not in done.stdout + done.stderr  # it starts from the grown, pretrained weights
    tuned = load_model(str(sft), device="cpu", dtype="fp32")
    assert tuned.model.config.vocab_size == vocab
    assert (tok_zh / "tokenizer.model").read_bytes() == (Path(tuned.source) / "tokenizer.model").read_bytes()
    steps = [r for r in records(sft) if "loss" in r]
    for record in steps:  # per-source counts in every step record, adding up to the step's own counts
        assert set(record["source_samples"]) == {"chat", "text_zh"}
        assert sum(record["source_supervised_tokens"].values()) == record["num_supervised_tokens"]

    answer = run("infer.py", f"ckpt={sft}", "prompt=3 加 4 等于几？", "max_new_tokens=8", "temperature=0")
    assert answer.stdout.endswith("\n")  # the (untrained) answer streamed; a failure to load would have exited
