"""Preemption: SIGTERM / SIGUSR1 / SIGUSR2 end the run at the next optimizer-step boundary with a checkpoint.

Clusters preempt with SIGTERM (SLURM: SIGKILL follows after a grace period) and warn before a time limit with a
signal the job asks for (`sbatch --signal=USR1@90`; submitit, behind `hydra/launcher=slurm`, uses SIGUSR2). While
the loop runs, these signals only set a flag; after each optimizer step the ranks all-reduce it (only some ranks may
have been signalled), and all of them stop together: the loop writes a complete checkpoint of that step (atomic,
as every checkpoint) and the process exits with `PREEMPTED_EXIT_CODE`. A second signal during the save is logged
and otherwise ignored, so it cannot interrupt the write (and `latest` only ever names complete checkpoints).

After a warning signal (SIGUSR1 / SIGUSR2) inside a SLURM job, rank 0 requeues the job (`scontrol requeue`) once
the checkpoint is complete; the requeued job reruns the same command, which resumes from it. SIGTERM is not
requeued here: it is what `scancel` sends, and SLURM requeues a preempted job itself when its PreemptMode says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType

from llama2_sft.distributed import DistContext, all_reduce_max

log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". Distinct from 0 (finished) and 1
# (an error), so a job script can tell "rerun me" apart: `python train.py ...; [ $? = 75 ] && resubmit`.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # asked for by the job before its time limit: requeue after


class PreemptionWatch:
    """While entered, turns the stop signals into a flag that `should_stop` agrees on across ranks."""

    def __init__(self, ctx: DistContext, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.ctx = ctx
        self.signals = signals
        self.received: list[signal.Signals] = []  # in order of arrival (this rank)
        self.stopping = False  # set once the ranks agreed to stop
        self.requeue = False  # and whether any rank got a warning signal (the job should be requeued)
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers in the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
                # Restart system calls the signal interrupts (Python's default makes them fail with EINTR): a
                # library blocked in one (a collective's socket wait) carries on; the handler runs right after.
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received:
            log.warning("rank %d: %s while already stopping: ignored, the checkpoint is being finished", self.ctx.rank, name)
        else:
            log.warning("rank %d: %s: stopping after the current optimizer step with a checkpoint", self.ctx.rank, name)
        self.received.append(signal.Signals(signum))

    def should_stop(self) -> bool:
        """Whether any rank has been signalled (a collective: every rank calls it once per optimizer step)."""
        if not self.stopping:
            # 0: no signal, 1: SIGTERM, 2: a warning signal (SIGUSR1 / SIGUSR2), the most telling one over ranks
            local = 2 if any(sig in WARNING_SIGNALS for sig in self.received) else int(bool(self.received))
            agreed = all_reduce_max(local, self.ctx.device)
            self.stopping, self.requeue = agreed > 0, agreed == 2
        return self.stopping

    @property
    def signal_name(self) -> str | None:
        """The first signal this rank received (None on a rank that only followed the others)."""
        return self.received[0].name if self.received else None


def requeue_slurm_job(environ: dict | None = None) -> bool:
    """`scontrol requeue $SLURM_JOB_ID` inside a SLURM job (array jobs: the array task); True when SLURM accepted it."""
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, env=environ)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("could not requeue SLURM job %s: %s; resubmit the same command to resume", job_id, error)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s; resubmit the same command to resume", job_id,
                    done.returncode, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s: it resumes from the checkpoint when it starts again", job_id)
    return True
