"""Tokenization cache: same inputs hit the cache, any change misses; skips are counted; ceilings stop the run."""

from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from llama2_sft.config import DatasetConfig
from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.data.tokenize import prepare_dataset
from tests.conftest import make_row


def rows(count=20):
    out = [make_row(f"r{i}", [("human", f"question {i}"), ("gpt", f"answer {i}")]) for i in range(count)]
    out.append(make_row("bad-first", [("gpt", "hi"), ("human", "x")]))
    out.append(make_row("bad-empty", [("human", "q"), ("gpt", "")]))
    return out


def dataset_cfg(source, cache_dir, **overrides):
    cfg = OmegaConf.structured(DatasetConfig(source=source, cache_dir=str(cache_dir), max_length=64,
                                             default_system="none", max_skipped_fraction=0.5, num_proc=1))
    return OmegaConf.merge(cfg, overrides)


def test_same_inputs_load_the_cache_and_a_change_builds_a_new_one(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    source = write_jsonl(rows())
    first = prepare_dataset(dataset_cfg(source, tmp_path / "cache"), hf_tokenizer, tokenizer_dir)
    again = prepare_dataset(dataset_cfg(source, tmp_path / "cache"), hf_tokenizer, tokenizer_dir)
    assert again.path == first.path
    assert again.summary["build_seconds"] == first.summary["build_seconds"]  # read back, not rebuilt
    for change in ({"max_length": 32}, {"default_system": "Be brief."}, {"truncation": "drop"}):
        assert prepare_dataset(dataset_cfg(source, tmp_path / "cache", **change), hf_tokenizer, tokenizer_dir).path != first.path
    write_jsonl(rows(21))  # the source file changes
    assert prepare_dataset(dataset_cfg(source, tmp_path / "cache"), hf_tokenizer, tokenizer_dir).path != first.path


def test_skipped_rows_are_counted_per_reason_with_example_ids(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    prepared = prepare_dataset(dataset_cfg(write_jsonl(rows()), tmp_path / "c"), hf_tokenizer, tokenizer_dir)
    train = prepared.summary["splits"]["train"]
    assert train["rows"] == 22 and train["kept"] == 20
    assert train["skipped"] == {"first_turn_not_human": 1, "bad_value": 1}
    assert train["example_ids"] == {"first_turn_not_human": ["bad-first"], "bad_value": ["bad-empty"]}
    with open(os.path.join(prepared.path, "summary.json")) as handle:
        assert json.load(handle)["splits"]["train"]["skipped"] == train["skipped"]


def test_cached_samples_equal_direct_encoding(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    from llama2_sft.data import encode_dialog

    prepared = prepare_dataset(dataset_cfg(write_jsonl(rows(3)), tmp_path / "c"), hf_tokenizer, tokenizer_dir)
    sample = prepared.train[0]
    direct = encode_dialog(hf_tokenizer, [{"role": "user", "content": "question 0"}, {"role": "assistant", "content": "answer 0"}])
    assert sample["input_ids"] == direct.input_ids and sample["labels"] == direct.labels
    assert sample["length"] == len(direct.input_ids)
    assert sample["num_supervised"] == sum(label != IGNORE_INDEX for label in direct.labels)


def test_too_many_skipped_rows_stop_with_a_clear_error(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    cfg = dataset_cfg(write_jsonl(rows(2)), tmp_path / "c", max_skipped_fraction=0.1)
    with pytest.raises(ValueError, match=r"max_skipped_fraction=0.1.*first_turn_not_human.*bad-first"):
        prepare_dataset(cfg, hf_tokenizer, tokenizer_dir)


def test_overlong_rows_are_truncated_or_skipped_and_counted(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    long_prompt = make_row("long-prompt", [("human", "word " * 200), ("gpt", "ok")])
    long_reply = make_row("long-reply", [("human", "q"), ("gpt", "word " * 200)])
    two_turns = make_row("two", [("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "word " * 200)])
    cfg = dataset_cfg(write_jsonl([long_prompt, long_reply, two_turns]), tmp_path / "c", max_skipped_fraction=0.5)
    summary = prepare_dataset(cfg, hf_tokenizer, tokenizer_dir).summary["splits"]["train"]
    assert summary["skipped"] == {"prompt_too_long": 1}
    assert summary["outcomes"] == {"dropped_turns": 1, "truncated_reply": 1}
    assert summary["max_length_seen"] <= 64


def test_a_source_with_no_trainable_row_fails_naming_it(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    cfg = dataset_cfg(write_jsonl(rows(0)), tmp_path / "c", max_skipped_fraction=1.0)
    with pytest.raises(ValueError, match=r"rows.jsonl: none of 2 rows can be trained"):
        prepare_dataset(cfg, hf_tokenizer, tokenizer_dir)


def test_eval_fraction_splits_deterministically(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    cfg = dataset_cfg(write_jsonl(rows(40)), tmp_path / "c", eval_fraction=0.25)
    prepared = prepare_dataset(cfg, hf_tokenizer, tokenizer_dir)
    assert len(prepared.eval) == 10 and len(prepared.train) == 30
    assert not set(prepared.eval["id"]) & set(prepared.train["id"])


def test_an_unpublished_cache_directory_is_never_read(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    from llama2_sft.data.tokenize import fingerprint

    cfg = dataset_cfg(write_jsonl(rows(3)), tmp_path / "c")
    key, _ = fingerprint(cfg, tokenizer_dir)
    os.makedirs(tmp_path / "c" / f"{key}.tmp-999")  # a build that crashed half-way
    prepared = prepare_dataset(cfg, hf_tokenizer, tokenizer_dir)
    assert prepared.path.endswith(key) and len(prepared.train) == 3


def test_a_rows_task_label_travels_with_its_sample_and_rows_without_one_get_none(tmp_path, write_jsonl, hf_tokenizer,
                                                                                  tokenizer_dir):
    labelled = [dict(row, task=f"task{i % 3}") if i % 2 else row for i, row in enumerate(rows())]
    prepared = prepare_dataset(dataset_cfg(write_jsonl(labelled), tmp_path / "c", eval_fraction=0.25), hf_tokenizer,
                               tokenizer_dir)
    expected = {row["id"]: row.get("task", "") for row in labelled}
    for split in (prepared.train, prepared.eval):
        assert len(split) and split["task"] == [expected[row_id] for row_id in split["id"]]


def test_accuracy_per_task_adds_up_to_the_overall_accuracy():
    from llama2_sft.train.validator import accuracy_per_task

    answers = [{"task": "ab"[i % 2] if i % 5 else "", "reference": str(i % 3), "generated": str(i % 4)}
               for i in range(40)]
    per_task = accuracy_per_task(answers)
    labelled = [a for a in answers if a["task"]]
    assert sum(entry["count"] for entry in per_task.values()) == len(labelled)
    overall = sum(a["generated"] == a["reference"] for a in labelled) / len(labelled)
    assert sum(entry["correct"] for entry in per_task.values()) / len(labelled) == overall
    assert list(per_task) == ["a", "b"]
    assert all(entry["accuracy"] == entry["correct"] / entry["count"] for entry in per_task.values())
