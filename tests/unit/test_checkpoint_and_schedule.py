"""Checkpoint discovery/rotation and the learning-rate schedule."""

from __future__ import annotations

import math
import os

import pytest
import torch

from llama2_sft.checkpoint import (COMPLETE, latest_checkpoint, resolve_resume, rng_state, rotate, set_rng_state)
from llama2_sft.optim import build_adamw, lr_at, param_groups, warmup_steps_for


def make_ckpt(root, step, complete=True):
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text("{}")
    return path


def test_latest_checkpoint_ignores_incomplete_and_temporary_directories(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 4)
    make_ckpt(tmp_path, 6, complete=False)
    (tmp_path / "checkpoints" / ".tmp-step_00000008").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000006\n")  # pointer to an incomplete one
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000004")


def test_latest_pointer_wins_when_it_names_a_complete_checkpoint(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 4)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000002")


def test_rotation_keeps_the_newest_complete_checkpoints_and_never_the_incomplete_count(tmp_path):
    for step in (1, 2, 3):
        make_ckpt(tmp_path, step)
    make_ckpt(tmp_path, 4, complete=False)
    rotate(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002", "step_00000003", "step_00000004"]
    rotate(str(tmp_path), keep=1)
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000003")


def test_resolve_resume_modes(tmp_path):
    assert resolve_resume("auto", str(tmp_path)) is None
    path = make_ckpt(tmp_path, 5)
    assert resolve_resume("auto", str(tmp_path)) == str(path)
    assert resolve_resume(False, str(tmp_path)) is None
    assert resolve_resume(str(path), "elsewhere") == str(path)
    assert resolve_resume(str(tmp_path), "elsewhere") == str(path)  # a run directory
    with pytest.raises(ValueError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), "x")
    bad = make_ckpt(tmp_path / "other", 1, complete=False)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(bad), "x")


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    total, warmup = 100, warmup_steps_for(100, 0.03, 0)
    assert warmup == 3
    lrs = [lr_at(s, base_lr=1.0, total_steps=total, warmup=warmup, name="cosine") for s in range(total + 1)]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1 / 3) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    mid = 3 + (100 - 3) / 2
    assert lr_at(int(mid), base_lr=1.0, total_steps=total, warmup=3) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 3) / 97)))
    assert lr_at(100, base_lr=1.0, total_steps=100, warmup=3, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    assert lr_at(50, base_lr=2.0, total_steps=100, warmup=0, name="linear") == pytest.approx(1.0)
    assert lr_at(50, base_lr=2.0, total_steps=100, warmup=10, name="constant") == 2.0


def test_norms_and_biases_are_excluded_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model.named_parameters(), 0.1, ("bias", "norm"))
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight)} and groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    optimizer = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    assert len(optimizer.param_groups) == 2 and optimizer.defaults["fused"] is True  # auto: CPU has a fused kernel
    assert build_adamw(model.named_parameters(), fused=False).defaults["foreach"] is True


def test_weight_decay_groups_read_the_full_shape_of_a_zero3_partitioned_parameter():
    """Under ZeRO-3 a weight's local tensor is an empty 1-D placeholder; its full shape is `ds_shape`."""
    weight, norm = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0))
    weight.ds_shape, norm.ds_shape = torch.Size([4, 4]), torch.Size([4])
    groups = param_groups([("proj.weight", weight), ("scale", norm)], 0.1, ("bias", "norm"))
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(weight)], [id(norm)]]


def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    from llama2_sft.distributed import DistContext
    from llama2_sft.train.checkpointer import Checkpointer

    previous = make_ckpt(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")

    class DiskFull:
        def save(self, directory):
            with open(os.path.join(directory, "shard"), "w") as handle:
                handle.write("partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(RuntimeError, match=r"No space left on device.*still .*step_00000002"):
        Checkpointer(DiskFull(), DistContext(), str(tmp_path), keep=1).save(4, last_step=True)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000002"]
    assert latest_checkpoint(str(tmp_path)) == str(previous)
