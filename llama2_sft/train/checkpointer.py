"""When to save, and what: the Checkpointer writes and restores complete checkpoints (format: llama2_sft.checkpoint).

It saves on cadence (`save_steps`), at the last step of a process (the end of training or an early stop), and never
the same step twice. The state of every stateful part of the loop (trainer counters, loader position, W&B run id,
eval losses: anything with `state_dict()` / `load_state_dict()`) is gathered by name into `trainer_state.json`;
model and optimizer go through the strategy; each rank's RNG into `rng_rank{r}.pt`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import torch

from llama2_sft.checkpoint import (COMPLETE, LATEST, TOKENIZER_FILES, checkpoints_dir, is_complete, latest_checkpoint,
                                   rng_state, rotate, set_rng_state, write_atomic)
from llama2_sft.distributed import DistContext, barrier
from llama2_sft.strategy.base import Strategy

log = logging.getLogger(__name__)


class Checkpointer:
    """Atomic, rotated checkpoints of a run in `output_dir/checkpoints/`."""

    def __init__(self, strategy: Strategy, ctx: DistContext, output_dir: str, *, stateful: dict[str, Any] | None = None,
                 save_steps: int = 0, keep: int = 0, config_yaml: str = "", model_config: Any = None,
                 tokenizer_dir: str | None = None):
        self.strategy, self.ctx, self.output_dir = strategy, ctx, output_dir
        self.stateful = stateful or {}
        self.save_steps = save_steps
        self.keep = keep
        self.config_yaml = config_yaml
        self.model_config = model_config
        self.tokenizer_dir = tokenizer_dir
        self.last_saved: tuple[int, str] | None = None  # (step, path) written by this process

    def save(self, step: int, last_step: bool = False) -> str | None:
        """Save if `step` is on cadence or `last_step` (this process stops after it); returns the path saved (or
        already saved) for `step`, else None."""
        if self.last_saved is not None and self.last_saved[0] == step:
            return self.last_saved[1]
        if not (last_step or (self.save_steps and step % self.save_steps == 0)):
            return None
        path = self._write(step)
        self.last_saved = (step, path)
        if self.ctx.is_main:
            log.info("saved checkpoint %s", path)
        return path

    def _write(self, step: int) -> str:
        """Write checkpoint `step` atomically on all ranks; returns its final path."""
        root = checkpoints_dir(self.output_dir)
        name = f"step_{step:08d}"
        tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        try:
            self.strategy.save(tmp)
            torch.save(rng_state(), os.path.join(tmp, f"rng_rank{self.ctx.rank}.pt"))
        except OSError as error:  # disk full, quota, I/O error: keep what we had, say so, stop
            shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(self.output_dir)
            raise RuntimeError(f"writing checkpoint {final} failed on rank {self.ctx.rank}: {error}. Nothing was "
                               f"replaced: the latest complete checkpoint is still {previous}") from error
        barrier()
        if self.ctx.is_main:
            state = {"step": step, "world_size": self.ctx.world_size,
                     **{key: part.state_dict() for key, part in self.stateful.items()}}
            with open(os.path.join(tmp, "trainer_state.json"), "w") as handle:
                json.dump(state, handle, indent=2)
            with open(os.path.join(tmp, "config.yaml"), "w") as handle:
                handle.write(self.config_yaml)
            if self.model_config is not None:
                self.model_config.save_pretrained(tmp)
            if self.tokenizer_dir and os.path.isdir(self.tokenizer_dir):
                for file in TOKENIZER_FILES:
                    if os.path.isfile(os.path.join(self.tokenizer_dir, file)):
                        shutil.copy2(os.path.join(self.tokenizer_dir, file), os.path.join(tmp, file))
            write_atomic(os.path.join(tmp, COMPLETE), json.dumps({"step": step}) + "\n")
            if os.path.exists(final):  # re-saving a step (e.g. after a resume): the old copy goes only now
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(os.path.join(root, LATEST), name + "\n")
            rotate(self.output_dir, self.keep)
        barrier()
        return final

    def load(self, path: str) -> int:
        """Restore model, optimizer, every stateful part and this rank's RNG from a complete checkpoint; returns
        its step."""
        if not is_complete(path):
            raise ValueError(f"{path}: incomplete checkpoint (no {COMPLETE} marker); refusing to load it")
        with open(os.path.join(path, "trainer_state.json")) as handle:
            state = json.load(handle)
        # The stateful parts first: they check what the weights belong to (a LoRA run's base) before any are read.
        for key, part in self.stateful.items():
            if key not in state:
                raise ValueError(f"{path}/trainer_state.json has no {key!r} state: written by an incompatible version")
            part.load_state_dict(state[key])
        self.strategy.load(path)
        rng_file = os.path.join(path, f"rng_rank{self.ctx.rank}.pt")
        if state.get("world_size") == self.ctx.world_size and os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=True))
        elif self.ctx.is_main:
            log.warning("resuming on %d ranks from a %s-rank checkpoint: RNG streams are re-seeded, data order is kept",
                        self.ctx.world_size, state.get("world_size"))
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", path, int(state["step"]))
        return int(state["step"])
