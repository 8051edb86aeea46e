"""experiments/bench_loss.py at a toy head shape: both methods run in their own processes, the written table compares
them, and the fused loss and gradients agree with the plain path. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_loss_runs_both_methods_and_they_agree(tmp_path):
    out = tmp_path / "bench_loss"
    cmd = [sys.executable, "experiments/bench_loss.py", "--hidden", "64", "--vocab", "500", "--tokens", "96",
           "--chunk", "40", "--reps", "1", "--shares", "0.3", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    result = json.loads(out.with_suffix(".json").read_text())
    figures = result["results"]["0.3"]
    assert set(figures["median"]) == {"logits", "fused"}
    assert max(figures["agreement"].values()) < 1e-5
    assert "| 30% | fused |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
