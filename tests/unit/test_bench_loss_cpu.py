"""CPU check of experiments/bench_loss.py at a toy size: both methods run in their own processes, the written
table compares them, and the fused loss and gradients agree with the plain path. No timing assertions."""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import bench_loss  # noqa: E402


def test_bench_loss_runs_both_methods_and_they_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_loss, "HIDDEN", 64)
    monkeypatch.setattr(bench_loss, "VOCAB", 500)
    monkeypatch.setenv("BENCH_LOSS_SHAPE", "64,500")  # the worker processes read the toy shape from here
    out = tmp_path / "bench_loss"
    assert bench_loss.main(["--tokens", "96", "--chunk", "40", "--reps", "1", "--shares", "0.3", "--threads", "1",
                            "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    for share in ("0.3",):
        r = result["results"][share]
        assert set(r["median_seconds"]) == {"logits", "fused"}
        assert max(r["agreement"].values()) < 1e-5
    assert "| 30% | fused |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
