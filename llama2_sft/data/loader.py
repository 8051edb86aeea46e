"""Deterministic, resumable, rank-aware batches.

The sequence of *global* batches depends only on the data, the seed and the global batch size (in units: samples when
padding, packed rows when packing). Each global batch is then cut into `world_size x grad_accum_steps` micro-batches:
micro-batch k = units[k * micro : (k + 1) * micro], with rank r's m-th micro-batch being k = m * world_size + r.
So the samples that make up step s are the same whether they run on 1 rank with accumulation 8 or on 8 ranks, and
with a token-normalised loss, so is the gradient. State is (epoch, step in epoch): resuming yields the exact next batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from llama2_sft.data.collate import collate_packed, collate_padded
from llama2_sft.data.packing import UnitPlan, pack, single_sample_units

LENGTH_GROUP_BATCHES = 64  # length-grouped sampling sorts within windows of this many global batches


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is split: micro_batch_size units per micro-batch, grad_accum_steps micro-batches per rank."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_units(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def micro_slice(self, rank: int, micro_step: int) -> slice:
        k = micro_step * self.world_size + rank
        return slice(k * self.micro_batch_size, (k + 1) * self.micro_batch_size)


def epoch_order(plan: UnitPlan, seed: int, epoch: int, global_batch_units: int, group_by_length: bool) -> np.ndarray:
    """Unit order for one epoch: a seeded permutation; with length grouping, windows of it sorted by length so a
    global batch holds similar lengths (less padding) while batch order stays random."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(plan))
    if group_by_length:
        window = global_batch_units * LENGTH_GROUP_BATCHES
        chunks = []
        for start in range(0, len(order), window):
            chunk = order[start: start + window]
            chunk = chunk[np.argsort(-plan.unit_lengths[chunk], kind="stable")]
            batches = [chunk[i: i + global_batch_units] for i in range(0, len(chunk), global_batch_units)]
            full = [b for b in batches if len(b) == global_batch_units]
            rest = [b for b in batches if len(b) != global_batch_units]
            rng.shuffle(full)  # in place over the list of batches, not within batches
            chunks.extend(full + rest)
        order = np.concatenate(chunks) if chunks else order
    return order


class SFTLoader:
    """Yields, per optimizer step, this rank's `grad_accum_steps` collated micro-batches."""

    def __init__(
        self,
        dataset: Any,
        *,
        layout: BatchLayout,
        rank: int,
        pad_id: int,
        seed: int,
        packing: bool,
        max_length: int,
        group_by_length: bool = False,
        pad_to_multiple_of: int = 1,
        allow_batch_change: bool = False,
    ):
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside world size {layout.world_size}")
        self.dataset = dataset
        self.layout = layout
        self.rank = rank
        self.pad_id = pad_id
        self.seed = seed
        self.packing = packing
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.allow_batch_change = allow_batch_change  # resume_batch_change=allow
        lengths = sample_lengths(dataset)
        self.plan = pack(lengths, max_length, seed) if packing else single_sample_units(lengths)
        self.epoch = 0
        self.step_in_epoch = 0
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.plan)} {'packed rows' if packing else 'samples'} cannot fill one global batch of "
                f"{layout.global_batch_units} (micro_batch_size x grad_accum_steps x world size)"
            )
        self._order_epoch = -1
        self._order: np.ndarray | None = None
        # a mix (llama2_sft.data.mixing.MixedSamples): per-source counts of the last global batch, for the metrics
        self.last_sources: dict | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (a last partial batch is dropped: it could not be split over the ranks)."""
        return len(self.plan) // self.layout.global_batch_units

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(self.plan, self.seed, self.epoch, self.layout.global_batch_units, self.group_by_length)
            self._order_epoch = self.epoch
        return self._order

    def global_batch_units(self, epoch: int, step: int) -> np.ndarray:
        """Unit ids of global batch `step` of `epoch` (independent of world size and micro-batching)."""
        saved = self.epoch
        self.epoch = epoch
        try:
            order = self._epoch_order()
        finally:
            self.epoch = saved
        size = self.layout.global_batch_units
        return order[step * size: (step + 1) * size]

    def _collate(self, unit_ids: np.ndarray) -> dict:
        units = [self.plan.unit(int(u)) for u in unit_ids]
        flat = [int(i) for unit in units for i in unit]
        columns = self.dataset[flat]
        samples = [
            {"input_ids": ids, "labels": labels, "id": sample_id}
            for ids, labels, sample_id in zip(columns["input_ids"], columns["labels"], columns["id"])
        ]
        if self.packing:
            grouped, cursor = [], 0
            for unit in units:
                grouped.append(samples[cursor: cursor + len(unit)])
                cursor += len(unit)
            batch = collate_packed(grouped, self.pad_id, self.pad_to_multiple_of)
        else:
            batch = collate_padded(samples, self.pad_id, self.pad_to_multiple_of)
        batch["sample_ids"] = [s["id"] for s in samples]
        batch["num_real_tokens"] = sum(len(s["input_ids"]) for s in samples)
        return batch

    def next_step(self) -> list[dict]:
        """This rank's micro-batches for the next optimizer step; advances the position."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        units = self.global_batch_units(self.epoch, self.step_in_epoch)
        micro = [self._collate(units[self.layout.micro_slice(self.rank, m)]) for m in range(self.layout.grad_accum_steps)]
        if hasattr(self.dataset, "counts"):  # over the whole global batch: the same on every rank, no collective
            self.last_sources = self.dataset.counts(np.concatenate([self.plan.unit(int(u)) for u in units]))
        self.step_in_epoch += 1
        return micro

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        layout = self.layout
        state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                 "global_batch_units": layout.global_batch_units, "num_units": len(self.plan),
                 "layout": [layout.micro_batch_size, layout.grad_accum_steps, layout.world_size]}
        if hasattr(self.dataset, "digest"):  # a mix (data.mixing): which samples it drew
            state["mix"] = self.dataset.digest
        return state

    def load_state_dict(self, state: dict) -> None:
        mix = ("mix",) if "mix" in state or hasattr(self.dataset, "digest") else ()
        for key in ("seed", "num_units", *mix):
            current = self.state_dict().get(key)
            if state.get(key) != current:
                raise ValueError(f"cannot resume the data loader: checkpoint has {key}={state.get(key)}, this run {current}")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        saved_units, units = int(state["global_batch_units"]), self.layout.global_batch_units
        if saved_units == units:  # the world size and micro x accum may differ: batches are global
            return
        saved = "x".join(map(str, state.get("layout", []))) or "?"
        now = f"{self.layout.micro_batch_size}x{self.layout.grad_accum_steps}x{self.layout.world_size}"
        if not self.allow_batch_change:
            raise ValueError(
                f"resuming would change the global batch (global_batch_units) from {saved_units} (micro_batch_size x "
                f"grad_accum_steps x world size = {saved}) to {units} ({now}): keep micro x accum x world at "
                f"{saved_units}, or set resume_batch_change=allow to continue at the same sample position")
        # The same position in the epoch's order, rounded up to a whole batch: no unit is trained twice per epoch.
        # (With dataset.group_by_length the order itself depends on the global batch, so it is a new order.)
        self.step_in_epoch = -(-self.step_in_epoch * saved_units // units)


def sample_lengths(dataset: Any) -> np.ndarray:
    """Tokens per sample: a mix's own array, else the cached `length` column (read without decoding rows)."""
    if hasattr(dataset, "lengths"):
        return np.asarray(dataset.lengths, dtype=np.int64)
    return np.asarray(dataset.data.column("length").to_numpy(), dtype=np.int64) if len(dataset) else np.zeros(0, np.int64)


def eval_batches(dataset: Any, batch_size: int, rank: int, world_size: int, pad_id: int) -> Iterator[dict]:
    """Padded eval batches, this rank's share (rank-strided; the loss is summed over ranks, so the split is free)."""
    indices = list(range(rank, len(dataset), world_size))
    for start in range(0, len(indices), batch_size):
        columns = dataset[indices[start: start + batch_size]]
        samples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
        yield collate_padded(samples, pad_id)
