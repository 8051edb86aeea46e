"""experiments/bench_lora.py --quick: it trains full / LoRA / QLoRA through train.py, reads their checkpoints and
memory, and writes the table. Checks what the figures must satisfy whatever the machine (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_lora_quick_writes_consistent_figures(tmp_path):
    pytest.importorskip("bitsandbytes")
    prefix = tmp_path / "bench_lora"
    subprocess.run([sys.executable, "experiments/bench_lora.py", "--quick", "--out", str(prefix)], cwd=REPO, check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = json.loads(prefix.with_suffix(".json").read_text())
    storage = out["storage_tiny"]
    # LoRA and QLoRA train the same adapters; a checkpoint holds them and their AdamW moments, far less than full
    assert storage["lora"]["trainable_params"] == storage["qlora"]["trainable_params"]
    assert storage["lora"]["trainable_params"]["optimizer_bytes"] == 8 * storage["lora"]["trainable_params"]["params"]
    assert storage["lora"]["checkpoint_bytes"] < storage["full"]["checkpoint_bytes"] / 4
    assert out["storage_7b"]["lora"]["trainable_params"] < out["storage_7b"]["full"]["trainable_params"] / 100
    for case in out["memory"]:  # the memory model is within a third of what was measured
        assert 0.67 < case["ratio"] < 1.5, case
    assert all(entry["step_seconds"] > 0 for entry in out["step_time"].values())
    assert prefix.with_suffix(".png").stat().st_size > 0
