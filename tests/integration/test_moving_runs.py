"""A run moves: FSDP2 and ZeRO-3 run in one process, a run stopped, signalled or SIGKILLed on N ranks continues on M,
and the per-step losses equal the uninterrupted one-process run's.

Every run is `train.py` for real on the tiny Llama (fp32, CPU, gloo): plain `python train.py` for one process (no
torchrun), torchrun for two. One global batch of 4 packed rows throughout (4 x 1 x 1 or 2 x 1 x 2), 10 steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO
from tests.integration.test_crash_safety import final_losses, last_logged_step
from tests.integration.test_training_parity import assert_same_losses, free_port, losses, run_train

STEPS = 30  # the uninterrupted run; a run that is signalled or killed is given LONG steps, so that however late the
LONG = 300  # signal lands it stops inside the reference's steps (a constant learning rate makes max_steps irrelevant)


EVAL_ROWS = 17  # odd: two ranks get 9 and 8 held-out rows, so they must still run the same number of eval batches


def args(workdir, strategy: str, nproc: int, *extra: str, steps: int = STEPS) -> list[str]:
    return [f"strategy={strategy}", f"trainer.micro_batch_size={4 // nproc}", f"trainer.max_steps={steps}",
            "scheduler.name=constant", "dataset.packing=true", "trainer.save_total_limit=2",
            f"dataset.eval_source={workdir / 'eval.jsonl'}", "trainer.eval_steps=10", "trainer.eval_batch_size=2", *extra]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moving")
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        (root / "rows.jsonl").write_text("".join(next(handle) for _ in range(64)), encoding="utf-8")
        (root / "eval.jsonl").write_text("".join(next(handle) for _ in range(EVAL_ROWS)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reference(workdir, tiny_checkpoint) -> dict[int, float]:
    """The uninterrupted run: strategy=single, one process."""
    output_dir, _ = run_train(workdir, tiny_checkpoint, "reference", args(workdir, "single", 1))
    expected = losses(output_dir)
    assert len(expected) == STEPS and len(set(expected.values())) == STEPS  # it learns: every step differs
    return expected


@pytest.fixture(scope="module")
def reference_eval(workdir, reference) -> dict[int, float]:
    """The uninterrupted run's eval losses by step."""
    expected = eval_losses(workdir / "reference")
    assert sorted(expected) == [0, 10, 20, STEPS]
    return expected


def eval_losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return {r["step"]: r["eval_loss"] for r in map(json.loads, handle) if r.get("eval_loss") is not None}


def assert_same_eval_losses(output_dir, reference_eval) -> None:
    """The evals a moved run made (on 1 or 2 ranks, over the same 17 held-out rows) give the reference's eval loss.
    Before every rank ran the same number of eval batches, FSDP2 / ZeRO-3 on 2 ranks hung in the first eval here."""
    got = eval_losses(output_dir)
    assert got and set(got) <= set(reference_eval), (got, reference_eval)
    assert_same_losses({step: reference_eval[step] for step in got}, got)


def checkpoint_state(output_dir) -> dict:
    """trainer_state.json of the checkpoint `latest` names."""
    with open(os.path.join(output_dir, "checkpoints", "latest")) as handle:
        name = handle.read().strip()
    with open(os.path.join(output_dir, "checkpoints", name, "trainer_state.json")) as handle:
        return json.load(handle)


def start_train(workdir, tiny_checkpoint, name, overrides, nproc=1, env=None) -> subprocess.Popen:
    """train.py in the background, as run_train would run it."""
    out = workdir / name
    common = [f"output_dir={out}", f"model.name_or_path={tiny_checkpoint}", "model.tokenizer=null", "model.arch=null",
              f"dataset.source={workdir / 'rows.jsonl'}", "dataset.eval_source=null", "dataset.eval_fraction=0",
              "dataset.max_length=256", f"dataset.cache_dir={workdir / 'cache'}", "trainer.save_steps=0",
              "trainer.eval_steps=0", "trainer.accuracy_samples=0", "trainer.generate_samples=0", "trainer.log_steps=1",
              "scheduler.warmup_ratio=0", "optimizer.lr=1e-3", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    environ = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", **(env or {}))
    return subprocess.Popen([*launcher, "train.py", *common], cwd=REPO, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(process: subprocess.Popen, output_dir, step: int) -> None:
    deadline = time.time() + 300
    while last_logged_step(output_dir) < step and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (read from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:
            continue
        if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {torchrun_pid}")


def assert_stopped_by_signal(output_dir, output: str) -> int:
    """The run logged step k < STEPS, and the checkpoint `latest` names is complete and of step k; returns k."""
    stopped_at = last_logged_step(output_dir)
    assert 0 < stopped_at < STEPS, f"the signal came after the run ended: make it longer\n{output[-3000:]}"
    assert checkpoint_state(output_dir)["step"] == stopped_at
    assert not [d for d in os.listdir(output_dir / "checkpoints") if d.startswith(".tmp-")]
    return stopped_at


@pytest.mark.slow
def test_one_process_fsdp2_signalled_continues_on_two_ranks_with_the_uninterrupted_losses(workdir, tiny_checkpoint,
                                                                                           reference, reference_eval):
    """Plain `python train.py strategy=fsdp strategy.cpu_offload=true` (a one-process group, state on the host);
    SIGUSR1 then SIGTERM during the step: the step ends, a checkpoint of it is written, scontrol requeue is called (a
    fake one, in a fake SLURM job), exit 75; then torchrun with 2 ranks, no offload, continues (DCP reshards)."""
    fake_bin = workdir / "bin"
    fake_bin.mkdir(exist_ok=True)
    calls = workdir / "scontrol_calls.txt"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    output_dir = workdir / "fsdp-1-2"
    process = start_train(workdir, tiny_checkpoint, "fsdp-1-2", args(workdir, "fsdp", 1, "strategy.cpu_offload=true", steps=LONG),
                          env={"SLURM_JOB_ID": "4242", "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
    wait_for_step(process, output_dir, 1)  # early: the signal must land before step STEPS
    process.send_signal(signal.SIGUSR1)
    process.send_signal(signal.SIGTERM)  # a second signal: ignored, the save is not interrupted
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output[-3000:]
    assert_stopped_by_signal(output_dir, output)
    assert calls.read_text() == "requeue 4242\n"
    assert checkpoint_state(output_dir)["world_size"] == 1

    run_train(workdir, tiny_checkpoint, "fsdp-1-2", args(workdir, "fsdp", 2), nproc=2)
    assert checkpoint_state(output_dir)["world_size"] == 2 and checkpoint_state(output_dir)["step"] == STEPS
    assert_same_losses(reference, final_losses(output_dir))
    assert_same_eval_losses(output_dir, reference_eval)


@pytest.mark.slow
def test_fsdp2_sigkilled_on_two_ranks_continues_in_one_process_with_the_uninterrupted_losses(workdir, tiny_checkpoint,
                                                                                            reference):
    """SIGKILL to torchrun and both workers after step 2 (a checkpoint every step): one process continues from the
    last complete checkpoint, re-running any lost step."""
    output_dir = workdir / "fsdp-2-1"
    process = start_train(workdir, tiny_checkpoint, "fsdp-2-1", args(workdir, "fsdp", 2, "trainer.save_steps=1", steps=LONG), nproc=2)
    wait_for_step(process, output_dir, 2)
    workers = [worker_pid(process.pid, rank) for rank in (0, 1)]  # they outlive a SIGKILLed torchrun
    for pid in (*workers, process.pid):
        os.kill(pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    killed_at = checkpoint_state(output_dir)
    assert killed_at["world_size"] == 2 and 1 <= killed_at["step"] < STEPS, \
        f"the run ended before the kill: make it longer\n{output[-3000:]}"
    run_train(workdir, tiny_checkpoint, "fsdp-2-1", args(workdir, "fsdp", 1))
    assert_same_losses(reference, final_losses(output_dir))


@pytest.mark.slow
def test_one_process_zero3_stopped_continues_on_two_ranks_with_the_uninterrupted_losses(workdir, tiny_checkpoint,
                                                                                       reference, reference_eval):
    """One-process ZeRO-3 (plain python, no torchrun) gives single's losses; 2 ranks continue through DeepSpeed's
    universal checkpoint (converted automatically: the saved run had 1 rank)."""
    output_dir, _ = run_train(workdir, tiny_checkpoint, "zero3-1-2", args(workdir, "deepspeed_zero3", 1, "trainer.stop_after_steps=3"))
    assert_same_losses({s: reference[s] for s in (1, 2, 3)}, losses(output_dir))
    run_train(workdir, tiny_checkpoint, "zero3-1-2", args(workdir, "deepspeed_zero3", 2), nproc=2)
    converted = output_dir / "checkpoints" / "step_00000003"
    assert os.path.isdir(converted / "deepspeed_universal") and not os.path.exists(converted / "latest_universal")
    assert_same_losses(reference, final_losses(output_dir))
    assert_same_eval_losses(output_dir, reference_eval)


@pytest.mark.slow
def test_zero3_signalled_on_one_of_two_ranks_stops_both_and_continues_in_one_process(workdir, tiny_checkpoint, reference):
    """SIGTERM reaches rank 1 only: both ranks agree to stop after the step (the flag is all-reduced), the checkpoint
    of that step is complete, the workers exit 75; one process continues from it."""
    output_dir = workdir / "zero3-2-1"
    process = start_train(workdir, tiny_checkpoint, "zero3-2-1", args(workdir, "deepspeed_zero3", 2, steps=LONG), nproc=2)
    wait_for_step(process, output_dir, 1)  # early: the signal must land before step STEPS
    os.kill(worker_pid(process.pid, rank=1), signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "exitcode: 75" in output, output[-3000:]  # torchrun reports its workers'
    assert_stopped_by_signal(output_dir, output)
    run_train(workdir, tiny_checkpoint, "zero3-2-1", args(workdir, "deepspeed_zero3", 1))
    assert_same_losses(reference, final_losses(output_dir))


# --- the global batch on resume (the loader's state from a real checkpoint) --------------------------------------

class _Samples:
    """64 samples of 10 tokens: all the loader reads before it collates."""

    lengths = np.full(64, 10)

    def __len__(self) -> int:
        return len(self.lengths)


def loader_for(micro: int, accum: int, world: int, allow: bool = False):
    from llama2_sft.data.loader import BatchLayout, SFTLoader

    return SFTLoader(_Samples(), layout=BatchLayout(micro, accum, world), rank=0, pad_id=0, seed=42, packing=False,
                     max_length=256, allow_batch_change=allow)


def test_a_resume_that_changes_the_global_batch_fails_naming_both():
    saved = loader_for(4, 1, 2)  # 8 samples per step
    saved.step_in_epoch = 3
    with pytest.raises(ValueError, match=r"from 8 \(.* = 4x1x2\) to 4 \(2x1x2\).*resume_batch_change=allow"):
        loader_for(2, 1, 2).load_state_dict(saved.state_dict())


def test_the_same_global_batch_on_another_world_size_and_split_resumes_at_the_same_step():
    saved = loader_for(4, 1, 2)
    saved.step_in_epoch = 3
    moved = loader_for(2, 4, 1)  # 8 samples per step: 1 rank accumulating 4 micro-batches of 2
    moved.load_state_dict(saved.state_dict())
    assert moved.step_in_epoch == 3
    assert list(moved.global_batch_units(0, 3)) == list(saved.global_batch_units(0, 3))


def test_an_allowed_batch_change_continues_at_the_same_sample_position():
    saved = loader_for(4, 1, 2)  # 3 steps of 8: 24 samples done
    saved.step_in_epoch = 3
    smaller = loader_for(2, 1, 2, allow=True)  # 4 per step: 24 / 4 = step 6
    smaller.load_state_dict(saved.state_dict())
    assert smaller.step_in_epoch == 6
    larger = loader_for(4, 1, 4, allow=True)  # 16 per step: 24 / 16 rounds up to step 2 (no sample twice)
    larger.load_state_dict(saved.state_dict())
    assert larger.step_in_epoch == 2
    order = saved.global_batch_units  # without length grouping the epoch order is the same for every batch size
    assert list(np.concatenate([order(0, s) for s in range(3)])) == list(
        np.concatenate([smaller.global_batch_units(0, s) for s in range(6)]))


def test_the_one_gpu_offload_recipe_keeps_the_reference_batch_and_states_the_memory_model_figures():
    """sft_7b_1gpu_offload: FSDP2 CPU offload in one process, 32 samples per step; its header's GPU and host figures
    are what experiments/memory_model.py computes for it (a changed recipe cannot leave a stale figure)."""
    import re

    from llama2_sft.config import CONF_DIR
    from tests.conftest import compose

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from memory_model import LLAMA2_7B, estimate, settings_of

    cfg = compose(["+experiment=sft_7b_1gpu_offload"])
    assert cfg.strategy._target_.endswith("FSDPStrategy") and cfg.strategy.cpu_offload and cfg.peft.method == "none"
    assert cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps == 32
    with open(os.path.join(CONF_DIR, "experiment", "sft_7b_1gpu_offload.yaml"), encoding="utf-8") as handle:
        header = handle.read()
    estimates = [estimate(LLAMA2_7B, settings_of(cfg, seq_len=seq, supervised_fraction=0.5)) for seq in (4096, 1024)]
    stated_gpu = [float(v) for v in re.findall(r"([\d.]+) GiB (?:when|at)", header)]
    assert stated_gpu == [round(e.peak_gib, 1) for e in estimates]
    host = estimates[0].host
    stated_host = re.search(r"Host memory: ([\d.]+) GiB .*weights \(([\d.]+)\), gradients \(([\d.]+)\) and AdamW moments "
                            r"\(([\d.]+)\)", header.replace("\n# ", " "))
    assert [float(v) for v in stated_host.groups()] == [
        round(v / 2**30, 1) for v in (sum(host.values()), host["weights"], host["gradients"], host["optimizer"])]
    without = estimate(LLAMA2_7B, settings_of(compose(["+experiment=sft_7b_1gpu_offload", "strategy.cpu_offload=false"]),
                                              seq_len=4096, supervised_fraction=0.5))
    assert f"one GPU would need {without.peak_gib:.1f} GiB" in header.replace("\n# ", " ")
    # offloading moves exactly the weights, gradients and optimizer state the device would hold to the host
    assert without.host_gib == 0
    assert sum(without.components[k] for k in ("weights", "gradients", "optimizer")) == pytest.approx(sum(host.values()))


def test_a_checkpoint_of_the_other_strategy_family_fails_saying_which_strategies_resume_it(tmp_path):
    from llama2_sft.strategy.deepspeed import DeepSpeedStrategy
    from llama2_sft.strategy.single import SingleDeviceStrategy

    zero2 = tmp_path / "zero2"
    (zero2 / "deepspeed").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):  # ZeRO-2's layout
        (zero2 / "deepspeed" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="deepspeed/: resume it with strategy=deepspeed_zero2 or deepspeed_zero3"):
        SingleDeviceStrategy().load(str(zero2))
    with pytest.raises(ValueError, match="written with ZeRO-2, this run is ZeRO-3: .*strategy=deepspeed_zero2"):
        DeepSpeedStrategy(stage=3).load(str(zero2))
    (tmp_path / "dcp" / "model_optim").mkdir(parents=True)
    with pytest.raises(ValueError, match="model_optim/: resume it with strategy=single, ddp or fsdp"):
        DeepSpeedStrategy(stage=3).load(str(tmp_path / "dcp"))


def test_a_zero_checkpoint_that_cannot_be_converted_fails_saying_how_to_go_on(tmp_path):
    from llama2_sft.distributed import DistContext
    from llama2_sft.strategy.deepspeed import universal_checkpoint

    (tmp_path / "deepspeed").mkdir()
    for rank in range(2):  # two ranks' files, unreadable
        (tmp_path / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
        (tmp_path / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"written on 2 ranks and cannot be converted to resume on 1 .*Resume it on 2 "
                                         r"ranks, or convert it yourself: python -m deepspeed.checkpoint.ds_to_universal"):
        universal_checkpoint(str(tmp_path), 2, DistContext())
    assert sorted(os.listdir(tmp_path)) == ["deepspeed"]  # no half-converted folder left
