"""Eval on a mix (dataset.sources): the loss per source, accuracy on chat rows only, and a mixed run's resume.

The per-source losses are checked two ways: their token-weighted mean is the overall eval loss, and each one is the
eval loss of a validator whose eval set is only that source's held-out split (prepared alone, batched differently).
The last test runs `train.py` for real (one process, fp32 CPU) on a mix of chat rows and plain text.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from llama2_sft.config import DatasetConfig
from llama2_sft.data.chat import IGNORE_INDEX, answer_split
from llama2_sft.data.tokenize import prepare_dataset
from llama2_sft.distributed import DistContext
from llama2_sft.strategy.single import SingleDeviceStrategy
from llama2_sft.train.metrics import MetricsWriter, wandb_scalars
from llama2_sft.train.validator import Validator, eval_groups, lockstep_batches
from tests.conftest import REPO
from tests.integration.test_training_parity import run_train

EVAL_FRACTION = 0.25


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 bundled chat rows and 20 bundled text documents."""
    root = tmp_path_factory.mktemp("mix_eval")
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        (root / "chat.jsonl").write_text("".join(next(handle) for _ in range(40)), encoding="utf-8")
    with open(os.path.join(REPO, "data", "text_zh.txt"), encoding="utf-8") as handle:
        documents = [d for d in handle.read().split("\n\n") if d.strip()][:20]
    (root / "zh.txt").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return root


def dataset_cfg(root, **values):
    cfg = OmegaConf.structured(DatasetConfig(source=None, cache_dir=str(root / "cache"), num_proc=1, max_length=64,
                                             default_system="none", eval_fraction=EVAL_FRACTION))
    return OmegaConf.merge(cfg, values)


def mix_sources(root):
    return [{"source": str(root / "chat.jsonl"), "weight": 3, "name": "chat"},
            {"source": str(root / "zh.txt"), "weight": 1, "name": "zh", "type": "text"}]


@pytest.fixture(scope="module")
def mix(corpus, hf_tokenizer, tokenizer_dir):
    return prepare_dataset(dataset_cfg(corpus, sources=mix_sources(corpus)), hf_tokenizer, tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    """The tokenizer as the trainer loads it (a pad id)."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    loaded.pad_token_id = loaded.unk_token_id
    return loaded


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()


def validator(model, tokenizer, eval_set, output_dir, *, batch_size=4, max_samples=0, eval_type="chat",
              accuracy_samples=0):
    strategy = SingleDeviceStrategy()
    strategy.model = model
    os.makedirs(output_dir, exist_ok=True)
    metrics = MetricsWriter(str(output_dir), DistContext(), progress=False)
    return Validator(strategy, DistContext(), tokenizer, eval_set, metrics, eval_steps=0, batch_size=batch_size,
                     max_samples=max_samples, generate_samples=0, accuracy_samples=accuracy_samples,
                     max_new_tokens=4, fused_loss=False, varlen=False, eval_type=eval_type)


def records(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_eval_loss_per_source_is_each_sources_own_eval_loss_and_their_token_weighted_mean_is_the_eval_loss(
        mix, corpus, model, tokenizer, hf_tokenizer, tokenizer_dir, tmp_path):
    assert sorted(set(mix.eval["source"])) == ["chat", "zh"]
    overall, per_source = validator(model, tokenizer, mix.eval, tmp_path).evaluate_sources()
    assert sorted(per_source) == ["eval_loss/chat", "eval_loss/zh"]
    assert abs(per_source["eval_loss/chat"] - per_source["eval_loss/zh"]) > 0.01  # the weighting below is not moot

    # 1. weighted by each source's supervised tokens (counted from the rows, not by the validator) -> the overall loss
    tokens = {name: 0 for name in ("chat", "zh")}
    for name, labels in zip(mix.eval["source"], mix.eval["labels"]):
        tokens[name] += sum(label != IGNORE_INDEX for label in labels[1:])  # the collator's shift: labels[0] never
    weighted = sum(per_source[f"eval_loss/{n}"] * t for n, t in tokens.items()) / sum(tokens.values())
    assert weighted == pytest.approx(overall, rel=1e-6)

    # 2. each source prepared alone (its own eval split), scored in other batches -> that source's loss
    for entry in mix_sources(corpus):
        alone = prepare_dataset(dataset_cfg(corpus, source=entry["source"], type=entry.get("type", "chat")),
                                hf_tokenizer, tokenizer_dir)
        assert "source" not in alone.eval.column_names
        loss = validator(model, tokenizer, alone.eval, tmp_path / entry["name"], batch_size=3).evaluate()
        assert loss == pytest.approx(per_source[f"eval_loss/{entry['name']}"], rel=1e-5), entry["name"]

    # in metrics.jsonl next to eval_loss, and to W&B under the same keys
    check = validator(model, tokenizer, mix.eval, tmp_path / "logged")
    check.start(0)
    (record,) = records(tmp_path / "logged")
    assert record["eval_loss"] == pytest.approx(overall, rel=1e-6)
    assert record["eval_loss/zh"] == pytest.approx(per_source["eval_loss/zh"], rel=1e-6)
    assert {"eval_loss", "eval_loss/chat", "eval_loss/zh"} <= set(wandb_scalars(record))


def test_a_capped_eval_set_keeps_each_sources_share_and_a_plain_one_its_first_rows(mix):
    chat, text = mix.eval["source"].count("chat"), mix.eval["source"].count("zh")
    assert (chat, text) == (10, 8)  # EVAL_FRACTION of 40 rows; of 20 documents (5), some cut into pieces
    groups = dict(eval_groups(mix.eval, 6))
    assert (len(groups["chat"]), len(groups["zh"])) == (4, 2)
    assert all(mix.eval["source"][i] == name for name, rows in groups.items() for i in rows)
    assert eval_groups(mix.eval.remove_columns(["source", "type"]), 6) == [(None, [0, 1, 2, 3, 4, 5])]


@pytest.mark.parametrize("rows, world_size, batch_size", [(5, 2, 2), (5, 3, 1), (7, 4, 3), (2, 4, 2)])
def test_every_rank_runs_the_same_number_of_eval_batches_and_each_row_counts_once(mix, rows, world_size, batch_size):
    indices = list(range(3, 3 + rows))
    per_rank = [list(lockstep_batches(mix.eval, indices, batch_size, r, world_size, 0)) for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # sharded models run their forwards in lock step
    counted = sum(int((b["target_ids"] != IGNORE_INDEX).sum()) for batches in per_rank for b in batches)
    assert counted == sum(mix.eval["num_supervised"][i] for i in indices)


def test_accuracy_scores_the_chat_rows_of_a_mix_only(mix, model, tokenizer, tmp_path):
    answers = validator(model, tokenizer, mix.eval, tmp_path).sample_answers(100)
    chat = [i for i, name in enumerate(mix.eval["source"]) if name == "chat"]
    expected = [tokenizer.decode(answer_split(mix.eval[i]["input_ids"], mix.eval[i]["labels"])[1]).strip()
                for i in chat]
    assert [a["reference"] for a in answers] == expected


def test_a_text_eval_set_skips_accuracy_with_one_log_line(corpus, model, tokenizer, hf_tokenizer, tokenizer_dir, tmp_path,
                                                         caplog):
    text = prepare_dataset(dataset_cfg(corpus, source=str(corpus / "zh.txt"), type="text"), hf_tokenizer, tokenizer_dir)
    check = validator(model, tokenizer, text.eval, tmp_path, eval_type="text", accuracy_samples=8)
    with caplog.at_level(logging.INFO, logger="llama2_sft.train.validator"):
        accuracy, answers = check.final(3)
    assert accuracy is None and answers == []
    lines = [r.getMessage() for r in caplog.records if "accuracy skipped" in r.getMessage()]
    assert len(lines) == 1 and "no chat rows" in lines[0]
    (record,) = records(tmp_path)
    assert "eval_accuracy" not in record and record["eval_loss"] > 0
    # the same rows read as chat (the old behaviour) would be scored: the skip is the type's doing
    assert validator(model, tokenizer, text.eval, tmp_path / "chat").sample_answers(2)


def step_records(output_dir) -> dict[int, dict]:
    return {r["step"]: r for r in records(output_dir) if "loss" in r}


def test_a_mixed_run_resumed_from_a_checkpoint_repeats_the_uninterrupted_losses_and_source_counts(corpus,
                                                                                                   tiny_checkpoint):
    """A fresh process resumes the uninterrupted run's step-2 checkpoint into another output_dir (a stop writes the same
    checkpoint; tests/integration/test_training_parity.py covers stop_after_steps itself): the mix is rebuilt from the
    config, and the loader continues with the exact next global batch."""
    sources = ("[{source: %s, weight: 3, name: chat}, {source: %s, weight: 1, name: zh, type: text}]"
               % (corpus / "chat.jsonl", corpus / "zh.txt"))
    common = [f"dataset.sources={sources}", "dataset.source=null", f"dataset.eval_fraction={EVAL_FRACTION}",
              "dataset.max_length=64", "dataset.packing=true", "dataset.mix_stop=all_exhausted",
              "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2", "trainer.max_steps=5", "trainer.save_steps=2",
              "trainer.save_total_limit=3", "trainer.eval_max_samples=0"]
    straight, _ = run_train(corpus, tiny_checkpoint, "straight", common, rows="chat.jsonl")
    checkpoint = straight / "checkpoints" / "step_00000002"
    assert checkpoint.is_dir()
    resumed, done = run_train(corpus, tiny_checkpoint, "resumed", [*common, f"resume={checkpoint}"], rows="chat.jsonl")
    assert "resumed from" in done.stderr + done.stdout

    expected, got = step_records(straight), step_records(resumed)
    assert sorted(expected) == [1, 2, 3, 4, 5] and sorted(got) == [3, 4, 5]
    for step, record in got.items():
        assert record["loss"] == expected[step]["loss"], step  # exactly: the same batches, RNG and optimizer state
        assert record["source_samples"] == expected[step]["source_samples"], step
        assert record["source_supervised_tokens"] == expected[step]["source_supervised_tokens"], step
    for record in expected.values():
        assert sum(record["source_supervised_tokens"].values()) == record["num_supervised_tokens"]
    assert any(r["source_samples"]["zh"] for r in got.values())  # both sources are trained after the resume

    # the eval records (at the start and the end) carry a loss per source; the final ones agree
    evals = [r for r in records(straight) if "eval_loss" in r]
    assert len(evals) == 2 and all({"eval_loss/chat", "eval_loss/zh"} <= set(r) for r in evals)
    (final,) = [r for r in records(resumed) if "eval_loss" in r]
    assert final["eval_loss/zh"] == evals[-1]["eval_loss/zh"]
