"""Packing, collation and the resumable rank-aware loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.data.collate import block_causal_mask, collate_packed, collate_padded
from llama2_sft.data.loader import BatchLayout, SFTLoader
from llama2_sft.data.packing import pack, token_efficiency


def fake_sample(length, start, offset=10):
    ids = list(range(start, start + length))
    labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
    return {"input_ids": ids, "labels": labels}


def fake_dataset(lengths, seed=0):
    import datasets

    rng = np.random.default_rng(seed)
    rows = []
    for i, length in enumerate(lengths):
        ids = rng.integers(3, 100, size=length).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
        rows.append({"id": f"s{i}", "input_ids": ids, "labels": labels, "length": length,
                     "num_supervised": length - length // 2})
    return datasets.Dataset.from_list(rows)


def test_packing_keeps_every_sample_once_and_rows_within_max_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=2000)
    plan = pack(lengths, 512, seed=1, window=500)
    assert sorted(plan.items.tolist()) == list(range(2000))
    assert plan.unit_lengths.max() <= 512
    for u in range(len(plan)):
        assert plan.unit_lengths[u] == lengths[plan.unit(u)].sum()
    assert token_efficiency(plan.unit_lengths, 4, pad_to=512) > 0.95


def test_packing_is_deterministic_per_seed():
    lengths = np.random.default_rng(0).integers(5, 300, size=500)
    a, b, c = pack(lengths, 512, 7), pack(lengths, 512, 7), pack(lengths, 512, 8)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.items, c.items)


def test_packing_rejects_a_sample_longer_than_max_length():
    with pytest.raises(ValueError, match="longer than max_length=16"):
        pack(np.array([4, 17]), 16, 0)


def test_positions_reset_at_boundaries_and_labels_never_cross_them():
    a, b = fake_sample(5, 100), fake_sample(4, 200)
    batch = collate_packed([[a, b]], pad_id=0)
    assert batch["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch["seq_lens"][0].tolist()[:2] == [5, 4]
    targets = batch["target_ids"][0].tolist()
    # the last position of each sample predicts nothing (not the next sample's first token)
    assert targets[4] == IGNORE_INDEX and targets[8] == IGNORE_INDEX
    assert targets[:4] == a["labels"][1:] and targets[5:8] == b["labels"][1:]


def test_packed_padding_is_its_own_segment_and_unsupervised():
    batch = collate_packed([[fake_sample(5, 100)], [fake_sample(3, 200), fake_sample(4, 300)]], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert batch["seq_lens"][0].tolist() == [5, 2] and batch["seq_lens"][1].tolist() == [3, 4]
    assert (batch["target_ids"][0, 4:] == IGNORE_INDEX).all()


def test_padded_and_packed_collation_supervise_the_same_targets():
    samples = [fake_sample(5, 100), fake_sample(7, 200), fake_sample(3, 300)]
    padded = collate_padded(samples, pad_id=0)
    packed = collate_packed([samples], pad_id=0)
    padded_targets = sorted(t for t in padded["target_ids"].flatten().tolist() if t != IGNORE_INDEX)
    packed_targets = sorted(t for t in packed["target_ids"].flatten().tolist() if t != IGNORE_INDEX)
    assert padded_targets == packed_targets


def test_block_causal_mask_allows_only_same_sample_past():
    mask = block_causal_mask(torch.tensor([[2, 3]]), 5)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def loader(dataset, world_size, rank, micro, accum, packing=False, seed=3, group=False):
    return SFTLoader(dataset, layout=BatchLayout(micro, accum, world_size), rank=rank, pad_id=0, seed=seed,
                     packing=packing, max_length=128, group_by_length=group)


def step_ids(loaders):
    """The sample ids one optimizer step consumes over all ranks and micro-batches."""
    return sorted(i for ld in loaders for mb in ld.next_step() for i in mb["sample_ids"])


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("group", [False, True])
def test_global_batches_do_not_depend_on_world_size_or_micro_batching(packing, group):
    dataset = fake_dataset(np.random.default_rng(1).integers(4, 60, size=300))
    splits = [(1, 8, 1), (1, 1, 8), (2, 2, 2), (4, 1, 2), (8, 1, 1)]  # (world, micro, accum), 8 units per step
    sequences = []
    for world, micro, accum in splits:
        loaders = [loader(dataset, world, r, micro, accum, packing, group=group) for r in range(world)]
        sequences.append([step_ids(loaders) for _ in range(5)])
    assert all(seq == sequences[0] for seq in sequences)


@pytest.mark.parametrize("world_size", [1, 2])
def test_yield_same_data_after_resume_on_each_rank(world_size):
    dataset = fake_dataset(np.random.default_rng(2).integers(4, 60, size=100))
    straight = [loader(dataset, world_size, r, 2, 2) for r in range(world_size)]
    expected = [[ld.next_step() for _ in range(12)] for ld in straight]  # crosses an epoch boundary (100 // 8 = 12)

    first = [loader(dataset, world_size, r, 2, 2) for r in range(world_size)]
    for ld in first:
        for _ in range(5):
            ld.next_step()
    states = [ld.state_dict() for ld in first]
    resumed = [loader(dataset, world_size, r, 2, 2) for r in range(world_size)]
    for ld, state in zip(resumed, states):
        ld.load_state_dict(state)
    for rank, ld in enumerate(resumed):
        for step in range(5, 12):
            got = ld.next_step()
            for g, e in zip(got, expected[rank][step]):
                assert g["sample_ids"] == e["sample_ids"]
                assert torch.equal(g["input_ids"], e["input_ids"])


def test_epochs_reshuffle_and_cover_every_sample():
    dataset = fake_dataset([10] * 16)
    ld = loader(dataset, 1, 0, 4, 1)
    epoch0 = [i for _ in range(4) for i in ld.next_step()[0]["sample_ids"]]
    epoch1 = [i for _ in range(4) for i in ld.next_step()[0]["sample_ids"]]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"s{i}" for i in range(16))
    assert epoch0 != epoch1


def test_resume_refuses_a_different_data_layout():
    dataset = fake_dataset([10] * 16)
    state = loader(dataset, 1, 0, 4, 1).state_dict()
    with pytest.raises(ValueError, match="global_batch_units"):
        loader(dataset, 1, 0, 2, 1).load_state_dict(state)


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(3).integers(4, 120, size=800)
    dataset = fake_dataset(lengths)

    def padded_fraction(group):
        ld = loader(dataset, 1, 0, 8, 1, group=group)
        real = total = 0
        for _ in range(ld.steps_per_epoch):
            batch = ld.next_step()[0]
            real += batch["num_real_tokens"]
            total += batch["input_ids"].numel()
        return real / total

    assert padded_fraction(True) > padded_fraction(False) + 0.2
