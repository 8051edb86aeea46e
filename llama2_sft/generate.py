"""Text generation from token prompts (greedy or sampled), batched with left padding. Prompts come from
`llama2_sft.data.chat` only, so generation sees exactly the format training used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class SamplingConfig:
    """Generation settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def generate_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int, eos_id: int,
                 sampling: SamplingConfig, device: torch.device, synced_ranks: bool = False) -> list[list[int]]:
    """New token ids for each prompt (stopping at EOS, which is not returned)."""
    if not prompts:
        return []
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.as_tensor(list(prompt))
        attention_mask[row, width - len(prompt):] = 1
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
                  repetition_penalty=sampling.repetition_penalty)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if synced_ranks:
        kwargs["synced_gpus"] = True  # FSDP / ZeRO-3: every rank keeps running forwards until all are done
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    results = []
    for row in output[:, width:].tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results
