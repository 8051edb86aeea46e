"""Collators: lists of samples -> tensors. Pure functions.

Both produce `target_ids`: the label of the *next* token at each position, shifted within each sample, so the loss is
`cross_entropy(logits, target_ids)` with no shift at the call site and no target that crosses a sample boundary
(the last position of every sample gets IGNORE_INDEX).
"""

from __future__ import annotations

from typing import Sequence

import torch

from llama2_sft.data.chat import IGNORE_INDEX


def shift_labels(labels: Sequence[int]) -> list[int]:
    """Next-token targets for one sample: labels[1:] + [IGNORE_INDEX]."""
    return [*labels[1:], IGNORE_INDEX]


def collate_padded(samples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest (causal attention: real tokens never see the padding)."""
    width = max(len(s["input_ids"]) for s in samples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(samples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    target_ids = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.as_tensor(sample["input_ids"])
        target_ids[row, :length] = torch.as_tensor(shift_labels(sample["labels"]))
        attention_mask[row, :length] = 1
    position_ids = torch.arange(width).unsqueeze(0).expand(rows, width).contiguous()
    return {"input_ids": input_ids, "target_ids": target_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def collate_packed(units: Sequence[Sequence[dict]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Several whole samples per row. Positions restart at 0 for each sample; `seq_lens[row]` lists the segment
    lengths (padding is its own trailing segment) so the model can keep samples from attending to each other."""
    width = max(sum(len(s["input_ids"]) for s in unit) for unit in units)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(units)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    target_ids = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    seq_lens: list[list[int]] = []
    for row, unit in enumerate(units):
        cursor, lens = 0, []
        for sample in unit:
            length = len(sample["input_ids"])
            input_ids[row, cursor: cursor + length] = torch.as_tensor(sample["input_ids"])
            target_ids[row, cursor: cursor + length] = torch.as_tensor(shift_labels(sample["labels"]))
            position_ids[row, cursor: cursor + length] = torch.arange(length)
            lens.append(length)
            cursor += length
        if cursor < width:  # padding: a separate segment with its own positions, attended by nothing real
            position_ids[row, cursor:] = torch.arange(width - cursor)
            lens.append(width - cursor)
        seq_lens.append(lens)
    max_segments = max(len(lens) for lens in seq_lens)
    seq_lens_tensor = torch.zeros((rows, max_segments), dtype=torch.long)
    for row, lens in enumerate(seq_lens):
        seq_lens_tensor[row, : len(lens)] = torch.as_tensor(lens)
    # The same segments for varlen attention kernels (flash-attention): boundaries over the flattened batch
    segments = [length for lens in seq_lens for length in lens]
    cu_seq_lens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(torch.as_tensor(segments), 0)
    return {"input_ids": input_ids, "target_ids": target_ids, "position_ids": position_ids, "seq_lens": seq_lens_tensor,
            "cu_seq_lens": cu_seq_lens, "max_seq_len": max(segments)}


def block_causal_mask(seq_lens: torch.Tensor, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float additive mask [rows, 1, width, width]: 0 where a token may attend (same segment, not in the future),
    the dtype's minimum elsewhere. (A boolean 4D mask is misread under eager attention; a float one is not.)"""
    rows = seq_lens.shape[0]
    segment = torch.zeros((rows, width), dtype=torch.long)
    for row in range(rows):
        lens = [int(x) for x in seq_lens[row] if int(x) > 0]
        segment[row] = torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens))
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros((rows, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return mask
