"""SIGKILL a real training run and rerun the same command: the loss trajectory equals the uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.integration.test_training_parity import losses, run_train

pytestmark = pytest.mark.slow


def last_logged_step(output_dir) -> int:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as handle:
        steps = [json.loads(line).get("step", 0) for line in handle if '"loss"' in line]
    return max(steps, default=0)


def final_losses(output_dir) -> dict[int, float]:
    """The last logged loss per step (a killed run's steps after its checkpoint are re-run and re-logged)."""
    result = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if "loss" in record:
                result[record["step"]] = record["loss"]
    return result


def test_sigkilled_runs_resume_to_the_uninterrupted_loss_trajectory(tmp_path, tiny_checkpoint):
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        (tmp_path / "rows.jsonl").write_text("".join(next(handle) for _ in range(200)), encoding="utf-8")
    common = ["trainer.micro_batch_size=4", "trainer.max_steps=30", "trainer.save_steps=4", "trainer.save_total_limit=2",
              "dataset.packing=true"]
    straight, _ = run_train(tmp_path, tiny_checkpoint, "straight", common)
    expected = losses(straight)

    # Kill the same run three times at different points, rerunning the same command each time.
    output_dir = tmp_path / "killed"
    _, command_done = None, None
    kills = 0
    for kill_after in (3, 9, 17):
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
        args = [sys.executable, "train.py", f"output_dir={output_dir}", f"model.name_or_path={tiny_checkpoint}",
                "model.tokenizer=null", "model.arch=null", f"dataset.source={tmp_path / 'rows.jsonl'}",
                "dataset.eval_source=null", "dataset.eval_fraction=0", "dataset.max_length=256",
                f"dataset.cache_dir={tmp_path / 'cache'}", "trainer.eval_steps=0", "trainer.accuracy_samples=0",
                "trainer.generate_samples=0", "trainer.log_steps=1", "scheduler.warmup_ratio=0", "optimizer.lr=1e-3",
                *common]
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while last_logged_step(output_dir) < kill_after and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    resumed, done = run_train(tmp_path, tiny_checkpoint, "killed", common)
    assert kills >= 2, "the run finished before it could be killed: make it longer"
    assert final_losses(resumed) == expected
    assert not [d for d in os.listdir(output_dir / "checkpoints") if d.startswith(".tmp-")]  # cleaned up by later saves
