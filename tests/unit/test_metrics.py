"""MFU bookkeeping: the PaLM formula against hand arithmetic for Llama-2-7B, and the shared MFU function."""

from __future__ import annotations

import pytest
import torch

from llama2_sft.train.metrics import flops_per_token, model_flops_utilization, peak_flops

LLAMA2_7B_PARAMS = 6_738_415_616  # meta-llama/Llama-2-7b-hf, embeddings and LM head included


def test_llama2_7b_flops_per_token_at_4096():
    expected = 6 * LLAMA2_7B_PARAMS + 12 * 32 * 32 * 128 * 4096  # 40.43 GFLOP of matmuls + 6.44 GFLOP of attention
    assert flops_per_token(LLAMA2_7B_PARAMS, 32, 32, 128, 4096) == expected
    assert expected == pytest.approx(46.87e9, rel=1e-3)


def test_mfu_is_achieved_over_peak_flops():
    # 8 GPUs at 3,000 tokens/s each on the 7B shape: 3000 * 46.87e9 / 989e12 = 14.2% per GPU
    fpt = flops_per_token(LLAMA2_7B_PARAMS, 32, 32, 128, 4096)
    assert model_flops_utilization(8 * 3000.0, fpt, 989e12, 8) == pytest.approx(3000 * fpt / 989e12)
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12
