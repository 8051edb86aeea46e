"""Stop signals become an agreed stop after the current step; a warning signal in a SLURM job requeues it."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from llama2_sft.distributed import DistContext, all_reduce_max
from llama2_sft.strategy.deepspeed import zero_world_size
from llama2_sft.train.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch, requeue_slurm_job


def test_a_signal_only_sets_the_flag_and_the_handlers_are_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch(DistContext()) as watch:
        assert not watch.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
        assert watch.should_stop() and watch.signal_name == "SIGTERM"
        assert not watch.requeue  # SIGTERM is what scancel sends: no requeue
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_during_the_save_is_recorded_and_ignored():
    with PreemptionWatch(DistContext()) as watch:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the process without the watch
        assert watch.received == [signal.SIGUSR1, signal.SIGTERM]
        assert watch.should_stop() and watch.requeue  # the warning signal came first: requeue


def test_the_preempted_exit_status_is_neither_success_nor_an_error():
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2) and PREEMPTED_EXIT_CODE < 128  # 128+N: killed by signal N


def test_the_agreed_value_without_a_process_group_is_this_ranks_own():
    assert all_reduce_max(2, DistContext().device) == 2


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments (exit status from FAKE_SCONTROL_RC)."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit ${{FAKE_SCONTROL_RC:-0}}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_requeue_runs_scontrol_requeue_with_the_job_id(fake_scontrol):
    assert requeue_slurm_job({**os.environ, "SLURM_JOB_ID": "4242"})
    assert fake_scontrol.read_text() == "requeue 4242\n"


def test_an_array_task_is_requeued_by_its_array_id(fake_scontrol):
    environ = {**os.environ, "SLURM_JOB_ID": "5000", "SLURM_ARRAY_JOB_ID": "4990", "SLURM_ARRAY_TASK_ID": "3"}
    assert requeue_slurm_job(environ)
    assert fake_scontrol.read_text() == "requeue 4990_3\n"


def test_outside_slurm_nothing_is_requeued(fake_scontrol):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    assert not requeue_slurm_job(environ)
    assert not fake_scontrol.exists()


def test_a_refused_requeue_is_reported_not_raised(fake_scontrol, caplog):
    assert not requeue_slurm_job({**os.environ, "SLURM_JOB_ID": "4242", "FAKE_SCONTROL_RC": "1"})
    assert "scontrol requeue 4242 failed" in caplog.text


def test_the_ranks_of_a_zero_checkpoint_are_counted_from_its_optimizer_files(tmp_path):
    for rank in range(3):
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"")
    assert zero_world_size(str(tmp_path)) == 3
    assert zero_world_size(str(tmp_path / "missing")) is None
