"""A weighted mix of sources (dataset.sources, llama2_sft.data.mixing): proportions, stopping rules, caches, the
loader's guarantees on a mix, per-source counts, and the errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from llama2_sft.config import DatasetConfig, MixSource, validate
from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.data.loader import BatchLayout, SFTLoader
from llama2_sft.data.mixing import MixedSamples, mix_draws, mix_entries, mix_indices
from llama2_sft.data.tokenize import prepare_dataset
from llama2_sft.train.metrics import wandb_scalars
from tests.conftest import compose, make_row
from tests.unit.test_packing_and_batches import fake_dataset


def test_mix_proportions_are_within_binomial_tolerance_of_the_weights():
    weights = [5.0, 3.0, 2.0]
    for seed in range(3):
        draws = mix_draws([40_000, 40_000, 40_000], weights, seed, "first_exhausted")
        shares = np.bincount(draws, minlength=3) / len(draws)
        for share, weight in zip(shares, weights):
            p = weight / sum(weights)
            assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / len(draws)), (seed, shares)


def test_first_exhausted_ends_with_a_sources_last_sample_and_never_repeats_one():
    sizes = [300, 2000, 50]
    source_of, index = mix_indices(sizes, [1, 1, 1], seed=3, stop="first_exhausted")
    counts = np.bincount(source_of, minlength=3)
    exhausted = int(source_of[-1])
    assert counts[exhausted] == sizes[exhausted] and (counts <= np.asarray(sizes)).all()
    for i in range(3):
        taken = index[source_of == i]
        assert len(set(taken.tolist())) == len(taken) and taken.max(initial=0) < sizes[i]


def test_all_exhausted_uses_every_sample_and_repeats_the_small_sources():
    sizes = [300, 2000, 50]
    source_of, index = mix_indices(sizes, [1, 1, 1], seed=3, stop="all_exhausted")
    counts = np.bincount(source_of, minlength=3)
    assert counts[1] == 2000 and source_of[-1] == 1  # the mix ends with the big source's last sample
    for i, size in enumerate(sizes):
        taken = index[source_of == i]
        assert set(taken.tolist()) == set(range(size))
        passes = -(-len(taken) // size)  # every full pass takes each sample once
        assert np.bincount(taken, minlength=size).max() == passes
    assert counts[2] > 5 * sizes[2]


def test_a_mix_that_would_never_end_fails_naming_the_weights():
    with pytest.raises(ValueError, match=r"all_exhausted with weights \[1000000000.0, 1.0\].*raise the small weights"):
        mix_draws([10, 10_000], [1e9, 1.0], 0, "all_exhausted")


def test_the_mix_is_a_function_of_the_seed():
    a = mix_indices([500, 700], [1, 2], 11, "first_exhausted")
    b = mix_indices([500, 700], [1, 2], 11, "first_exhausted")
    c = mix_indices([500, 700], [1, 2], 12, "first_exhausted")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0][: min(len(a[0]), len(c[0]))], c[0][: min(len(a[0]), len(c[0]))])


def mixed(sizes=(120, 60), weights=(3, 1), seed=0, stop="all_exhausted") -> MixedSamples:
    parts = [fake_dataset(np.random.default_rng(s).integers(8, 60, size=n).tolist(), seed=s)
             for s, n in enumerate(sizes)]
    source_of, index = mix_indices(list(sizes), list(weights), seed, stop)
    return MixedSamples(parts, [f"s{i}" for i in range(len(sizes))], source_of, index)


def test_mixed_samples_read_the_drawn_rows_of_each_source():
    mix = mixed()
    picks = [5, 0, len(mix) - 1, 17, 5]
    rows = mix[picks]
    for position, pick in enumerate(picks):
        part = mix.parts[mix.source_of[pick]][int(mix.index_in_source[pick])]
        assert rows["input_ids"][position] == part["input_ids"] and rows["id"][position] == part["id"]
        assert mix.lengths[pick] == part["length"] == len(part["input_ids"])


def global_batches(dataset, world_size, micro, accum, steps=6, packing=True, **state):
    """Per step: the samples of the whole global batch, gathered from every rank's loader (no torchrun needed)."""
    layout = BatchLayout(micro, accum, world_size)
    loaders = [SFTLoader(dataset, layout=layout, rank=r, pad_id=0, seed=5, packing=packing, max_length=128)
               for r in range(world_size)]
    if state:
        for loader in loaders:
            loader.load_state_dict({**loaders[0].state_dict(), **state})
    out = []
    for _ in range(steps):
        per_rank = [loader.next_step() for loader in loaders]
        samples = sorted(i for rank in per_rank for mb in rank for i in mb["sample_ids"])
        supervised = sum(int((mb["target_ids"] != IGNORE_INDEX).sum()) for rank in per_rank for mb in rank)
        counts = [loader.last_sources for loader in loaders]
        assert all(c == counts[0] for c in counts)  # every rank logs the same numbers without a collective
        assert sum(counts[0]["source_supervised_tokens"].values()) == supervised
        assert sum(counts[0]["source_samples"].values()) == len(samples)
        out.append((samples, counts[0]))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_a_mix_gives_the_same_global_batches_for_any_world_size_and_accumulation(packing):
    mix = mixed()
    reference = global_batches(mix, 1, 4, 1, packing=packing)
    assert global_batches(mix, 2, 2, 1, packing=packing) == reference
    assert global_batches(mix, 1, 1, 4, packing=packing) == reference
    assert global_batches(mix, 2, 1, 2, packing=packing) == reference
    assert {name for _, counts in reference for name, n in counts["source_samples"].items() if n} == {"s0", "s1"}


def test_a_stopped_mix_resumes_with_the_same_batches():
    mix = mixed()
    whole = global_batches(mix, 2, 2, 1, steps=12)
    layout = BatchLayout(2, 1, 2)
    first = SFTLoader(mix, layout=layout, rank=0, pad_id=0, seed=5, packing=True, max_length=128)
    for _ in range(7):
        first.next_step()
    resumed = global_batches(mix, 2, 2, 1, steps=5, **first.state_dict())
    assert resumed == whole[7:]


def test_per_source_counts_reach_wandb_as_one_series_per_source():
    record = {"step": 3, "loss": 1.5, "source_samples": {"chat": 6, "text": 2}, "note": "x"}
    assert wandb_scalars(record) == {"step": 3, "loss": 1.5, "source_samples/chat": 6, "source_samples/text": 2}


def sources_cfg(tmp_path, sources, **values) -> OmegaConf:
    cfg = OmegaConf.structured(DatasetConfig(source=None, cache_dir=str(tmp_path / "cache"), num_proc=1,
                                             max_length=64, default_system="none", **values))
    return OmegaConf.merge(cfg, {"sources": sources})


def chat_rows(count, tag):
    return [make_row(f"{tag}{i}", [("human", f"{tag} question {i}?"), ("gpt", f"answer {i}")]) for i in range(count)]


def test_each_source_is_cached_on_its_own_and_a_new_weight_does_not_retokenize(tmp_path, write_jsonl, hf_tokenizer,
                                                                               tokenizer_dir):
    a, b = write_jsonl(chat_rows(40, "a"), "a.jsonl"), write_jsonl(chat_rows(10, "b"), "b.jsonl")
    text = tmp_path / "zh.txt"
    text.write_text("第一篇。\n\n第二篇。\n\n第三篇。\n", encoding="utf-8")
    entries = [{"source": a, "weight": 3}, {"source": b, "weight": 1, "name": "small"},
               {"source": str(text), "weight": 1, "type": "text"}]
    first = prepare_dataset(sources_cfg(tmp_path, entries), hf_tokenizer, tokenizer_dir)
    caches = sorted(os.listdir(tmp_path / "cache"))
    assert len(caches) == 3 and first.train.names == ["a", "small", "zh"]
    assert {name: m["samples"] for name, m in first.summary["mix"].items()} == {"a": 40, "small": 10, "zh": 3}
    entries[0]["weight"] = 1
    second = prepare_dataset(sources_cfg(tmp_path, entries, mix_stop="all_exhausted"), hf_tokenizer, tokenizer_dir)
    assert sorted(os.listdir(tmp_path / "cache")) == caches  # re-mixed, not re-tokenized
    assert second.summary["mix"]["a"]["drawn"] == 40 and len(second.train) != len(first.train)
    text_rows = second.train[np.flatnonzero(second.train.source_of == 2).tolist()]
    assert all(labels[1:] == ids[1:] for ids, labels in zip(text_rows["input_ids"], text_rows["labels"]))


def test_a_mix_holds_out_each_sources_eval_split_chat_first(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    a = write_jsonl(chat_rows(40, "a"), "a.jsonl")
    text = tmp_path / "zh.txt"
    text.write_text("\n\n".join(f"第{i}篇。" for i in range(20)) + "\n", encoding="utf-8")
    entries = [{"source": str(text), "weight": 1, "type": "text"}, {"source": a, "weight": 1}]
    data = prepare_dataset(sources_cfg(tmp_path, entries, eval_fraction=0.25), hf_tokenizer, tokenizer_dir)
    assert data.summary["num_eval"] == len(data.eval) == 10 + 5  # a quarter of each source
    assert all(i.startswith("a") for i in data.eval["id"][:10]) and all("#" in i for i in data.eval["id"][10:])


@pytest.mark.parametrize("override, message", [
    ("dataset.sources=[{source: a.jsonl, weight: 0}]", r"dataset.sources\[0\].weight=0.0 must be a positive number"),
    ("dataset.sources=[{source: a.jsonl}, {source: b.jsonl, weight: -1}]", r"dataset.sources\[1\].weight=-1.0"),
    ("dataset.sources=[{source: x/a.jsonl}, {source: y/a.jsonl}]",
     r"dataset.sources\[1\].name='a' is used twice \(also dataset.sources\[0\]\)"),
    ("dataset.sources=[{source: a.jsonl, name: m}, {source: b.jsonl, name: m}]", r"name='m' is used twice"),
    ("dataset.sources=[{weight: 2, name: m}]", r"dataset.sources\[0\].source is not set"),
    ("dataset.sources=[{source: [], name: m}]", r"dataset.sources\[0\].source is not set"),
])
def test_bad_mix_entries_fail_at_start_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose([override]))


def test_a_misspelled_mix_key_fails_at_compose_time():
    with pytest.raises(Exception, match="wieght"):
        compose(["dataset.sources=[{source: a.jsonl, wieght: 2}]"])


def test_a_source_without_trainable_rows_fails_naming_its_entry(tmp_path, write_jsonl, hf_tokenizer, tokenizer_dir):
    good = write_jsonl(chat_rows(5, "a"), "a.jsonl")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    entries = [{"source": good}, {"source": str(empty), "type": "text", "name": "corpus"}]
    with pytest.raises(ValueError, match=r"dataset.sources\[1\] \(corpus\): text corpus .*empty.txt: no document"):
        prepare_dataset(sources_cfg(tmp_path, entries), hf_tokenizer, tokenizer_dir)


def test_the_bundled_mix_config_composes_and_names_its_sources():
    cfg = compose(["dataset=mix"])
    validate(cfg)
    assert [(e.name, e.weight, e.type) for e in mix_entries(cfg.dataset)] == [("chat", 3.0, "chat"),
                                                                             ("text_zh", 1.0, "text")]
    assert MixSource().weight == 1.0
