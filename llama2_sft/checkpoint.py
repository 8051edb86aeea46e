"""The checkpoint format: where checkpoints live, which are complete, which to resume from, rotation, RNG state.
Written by `llama2_sft.train.checkpointer`; read by it and by the inference loader.

Layout: `<output_dir>/checkpoints/step_00001200/` holding the strategy's sharded model + optimizer state
(`model_optim/` for DCP, `deepspeed/` for ZeRO), `trainer_state.json` (step, world size, and the state of each
stateful part of the loop: trainer counters, loader position, W&B run id, eval losses), `rng_rank{r}.pt`, the
resolved `config.yaml`, the model's `config.json`, the tokenizer files, and a `COMPLETE` marker. A checkpoint is
written under `.tmp-step_...`, marked complete, renamed, and only then is the `latest` pointer replaced; rotation
deletes old checkpoints only after the new one is complete. A directory without the marker (a crash mid-write) is
never loaded.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint: the `latest` pointer if it names a complete one, else a scan."""
    pointer = os.path.join(checkpoints_dir(output_dir), LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as handle:
            name = handle.read().strip()
        path = os.path.join(checkpoints_dir(output_dir), name)
        if name and is_complete(path):
            return path
    complete = complete_checkpoints(output_dir)
    return complete[-1][1] if complete else None


def resolve_resume(resume: Any, output_dir: str) -> str | None:
    """`resume` config -> checkpoint path or None: auto (latest complete in output_dir), false, or a path."""
    if resume in (False, None, "false", "False", "none", "null"):
        return None
    if resume in ("auto", True, "true"):
        return latest_checkpoint(output_dir)
    path = str(resume)
    if os.path.isdir(path) and not is_complete(path):
        inner = latest_checkpoint(path)  # a run directory
        if inner:
            return inner
        raise ValueError(f"resume={path}: not a complete checkpoint (no {COMPLETE} marker) and no checkpoint inside it")
    if not os.path.isdir(path):
        raise ValueError(f"resume={path}: no such checkpoint directory")
    return path


def rng_state() -> dict:
    """Every RNG the run touches, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rotate(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the newest; `keep` < 1 keeps all)."""
    if keep < 1:
        return
    complete = complete_checkpoints(output_dir)
    for _, path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
