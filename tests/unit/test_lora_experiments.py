"""The one-GPU LoRA / QLoRA recipes: the reference's 32 samples per optimizer step, and the peak memory their headers
state is what experiments/memory_model.py computes for them (so a changed recipe or model cannot leave a stale figure)."""

from __future__ import annotations

import os
import re
import sys

import pytest

from llama2_sft.config import CONF_DIR
from tests.conftest import REPO, compose

sys.path.insert(0, os.path.join(REPO, "experiments"))
from memory_model import LLAMA2_7B, estimate, settings_of  # noqa: E402


@pytest.mark.parametrize("name, method", [("sft_7b_lora", "lora"), ("sft_7b_qlora", "qlora")])
def test_one_gpu_recipes_take_the_reference_steps_and_state_the_memory_model_peak(name, method):
    reference, cfg = compose(["+experiment=sft_7b"]), compose([f"+experiment={name}"])
    assert cfg.peft.method == method and cfg.precision == "bf16" and cfg.strategy._target_.endswith("SingleDeviceStrategy")
    samples = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps
    assert samples == reference.trainer.micro_batch_size * reference.trainer.grad_accum_steps * 8 == 32
    with open(os.path.join(CONF_DIR, "experiment", f"{name}.yaml"), encoding="utf-8") as handle:
        header = handle.read()
    stated = [float(value) for value in re.findall(r"([\d.]+) GiB (?:when|at)", header)]
    computed = [round(estimate(LLAMA2_7B, settings_of(cfg, seq_len=seq, supervised_fraction=0.5)).peak_gib, 1)
                for seq in (4096, 1024)]
    assert stated == computed, f"{name}.yaml states {stated} GiB, the memory model gives {computed}"
