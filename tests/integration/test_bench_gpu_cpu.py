"""experiments/bench_gpu.py on CPU at the tiny shape: it drives train.py for each variant, reads metrics.jsonl, and
writes the table; flash-attention is skipped with a reason; the fast paths start from the same loss as the baseline.
No timing assertions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_gpu_cpu_plumbing_writes_the_table(tmp_path):
    prefix = tmp_path / "bench_gpu"
    cmd = [sys.executable, "experiments/bench_gpu.py", "--device", "cpu", "--variants",
           "baseline,combined sdpa,flash-attn varlen,LoRA,QLoRA", "--warmup", "1", "--steps", "1", "--samples", "300",
           "--out", str(prefix)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="0"))  # its compile variant compiles
    results = json.loads(prefix.with_suffix(".json").read_text())["results"]["tiny"]
    assert "CUDA" in results["flash-attn varlen"]["note"]  # no GPU here: skipped with a reason
    for name in ("baseline", "combined sdpa"):
        entry = results[name]
        assert math.isfinite(entry["tokens_per_s"]) and entry["tokens_per_s"] > 0
        assert entry["mfu"] is None and entry["peak_memory_gb"] is None  # n/a on CPU
    # same init, same first batch: fused CE + selective checkpointing + compile compute the baseline's loss
    assert results["combined sdpa"]["loss_first"] == pytest.approx(results["baseline"]["loss_first"], rel=1e-4)
    for name in ("LoRA", "QLoRA"):  # the one-GPU recipes' methods train here too
        assert math.isfinite(results[name]["loss_first"]) and results[name]["tokens_per_s"] > 0
    # LoRA starts at its base: the baseline's first loss (fused CE); QLoRA at the NF4 round trip of a saved base
    assert results["LoRA"]["loss_first"] == pytest.approx(results["combined sdpa"]["loss_first"], rel=1e-4)
    assert "| tiny | baseline | none |" in prefix.with_suffix(".md").read_text()
    assert prefix.with_suffix(".png").stat().st_size > 0
