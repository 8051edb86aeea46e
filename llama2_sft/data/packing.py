"""Packing: whole samples into rows of at most max_length tokens, decided once from the sample lengths alone.

A plan is a flat layout of "units" (a unit = the samples that share one row): `items[offsets[u]:offsets[u + 1]]` are
the sample indices of unit u. Padded batching is the same layout with one sample per unit, so the loader has one
code path for both modes. Samples are never split: a packed row is a concatenation of whole samples, and the
collator restarts positions and shifts labels per sample, so no target ever crosses a sample boundary.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np


@dataclass
class UnitPlan:
    """Samples grouped into units: `items[offsets[u]:offsets[u+1]]` are unit u's sample indices."""

    items: np.ndarray  # int64 [num_samples_used]
    offsets: np.ndarray  # int64 [num_units + 1]
    unit_lengths: np.ndarray  # int64 [num_units], tokens per unit

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def unit(self, index: int) -> np.ndarray:
        return self.items[self.offsets[index]: self.offsets[index + 1]]


def single_sample_units(lengths: np.ndarray) -> UnitPlan:
    """One sample per unit (padded batching)."""
    count = len(lengths)
    return UnitPlan(np.arange(count, dtype=np.int64), np.arange(count + 1, dtype=np.int64), np.asarray(lengths, dtype=np.int64))


def _best_fit(order: np.ndarray, lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Best-fit decreasing over `order`: each sample goes to the open row with the least room that still fits it."""
    open_rooms: list[int] = []  # sorted distinct rooms of open rows
    rows_with_room: dict[int, list[int]] = {}
    rows: list[list[int]] = []
    for index in order[np.argsort(-lengths[order], kind="stable")]:
        length = int(lengths[index])
        slot = bisect_left(open_rooms, length)
        if slot < len(open_rooms):
            room = open_rooms[slot]
            row = rows_with_room[room].pop()
            if not rows_with_room[room]:
                del rows_with_room[room]
                open_rooms.pop(slot)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(int(index))
        left = room - length
        if left > 0:
            if left not in rows_with_room:
                rows_with_room[left] = []
                insort(open_rooms, left)
            rows_with_room[left].append(row)
    return rows


def pack(lengths: np.ndarray, max_length: int, seed: int, window: int = 20_000) -> UnitPlan:
    """Pack samples into rows of <= max_length tokens.

    Samples are shuffled with `seed`, then packed best-fit-decreasing within windows of `window` samples: close to
    optimal density (the window holds enough short samples to fill the gaps) in O(n log n) time and bounded memory,
    and each row mixes samples from across the data set rather than only similar lengths from one file region.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > max_length:
        raise ValueError(f"a sample of {int(lengths.max())} tokens is longer than max_length={max_length}")
    order = np.random.default_rng(seed).permutation(len(lengths))
    items: list[int] = []
    offsets = [0]
    for start in range(0, len(order), window):
        for row in _best_fit(order[start: start + window], lengths, max_length):
            items.extend(row)
            offsets.append(len(items))
    items_array = np.asarray(items, dtype=np.int64)
    offsets_array = np.asarray(offsets, dtype=np.int64)
    unit_lengths = np.add.reduceat(lengths[items_array], offsets_array[:-1]) if len(items) else np.zeros(0, np.int64)
    return UnitPlan(items_array, offsets_array, unit_lengths.astype(np.int64))


def token_efficiency(unit_lengths: np.ndarray, batch_units: int, pad_to: int | None = None) -> float:
    """Real tokens / all tokens when consecutive groups of `batch_units` units are padded to their longest (or to
    `pad_to`)."""
    unit_lengths = np.asarray(unit_lengths, dtype=np.int64)
    real = int(unit_lengths.sum())
    total = 0
    for start in range(0, len(unit_lengths), batch_units):
        group = unit_lengths[start: start + batch_units]
        total += len(group) * (pad_to if pad_to else int(group.max()))
    return real / total if total else 1.0
