"""Process-group setup from torchrun (or SLURM) variables, and the few collectives the loop needs."""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _slurm_to_torchrun_env() -> None:
    """Under `srun` / hydra-submitit (one task per GPU, no torchrun), derive torchrun's variables from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", "29500")


def rank_from_env() -> int:
    """This process's global rank as the launcher set it (before any process group exists)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def init_distributed(timeout_minutes: int = 60) -> DistContext:
    """Initialise torch.distributed when launched with several processes (NCCL on CUDA, gloo on CPU)."""
    _slurm_to_torchrun_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def ensure_process_group(ctx: DistContext) -> None:
    """Create a one-process group when none exists (`python train.py strategy=fsdp`, or torchrun with one process),
    for the strategies whose sharding code needs collectives even on one rank (FSDP2, DeepSpeed ZeRO)."""
    if not dist.is_available() or dist.is_initialized():
        return
    if ctx.world_size != 1:
        raise RuntimeError(f"no process group on a {ctx.world_size}-rank run")
    # DeepSpeed reads the launcher's variables even when handed an existing group; torchrun has set them already.
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    # An in-memory store: one process needs no rendezvous, and no port can be taken by another run.
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=ctx.device if ctx.device.type == "cuda" else None)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of the ranks' `value`s, on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def destroy_distributed() -> None:
    """Tear down the process group (skipping this makes ~1 in 8 DeepSpeed runs crash at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches groups cloned from the world group; once the world is gone they are stale, and a later
    process group in the same process (a notebook, the tests) would hand them to DeepSpeed's next engine."""
    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(None)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every save and load without a process group that it assumes one process: that is the intent of
    strategy=single, so the warning (which nobody can act on) is dropped; every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield
