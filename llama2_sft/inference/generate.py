"""Generation from token prompts: a batch with left padding (`generate_ids`), or one reply streamed as text
(`generate_reply`). Greedy or sampled. Prompts come from `llama2_sft.data.chat` only, so generation sees exactly
the format training used; chats go through `llama2_sft.inference.chat`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


# Below this, logits / temperature overflows to inf and sampling turns into NaN probabilities: decode greedily.
MIN_TEMPERATURE = 1e-4


@dataclass
class SamplingConfig:
    """Generation settings; temperature 0 (or below MIN_TEMPERATURE) means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def _generate_kwargs(sampling: SamplingConfig, pad_id: int, eos_id: int) -> dict[str, Any]:
    """`model.generate` keyword arguments for `sampling`."""
    kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                                  use_cache=True, repetition_penalty=sampling.repetition_penalty)
    if sampling.temperature >= MIN_TEMPERATURE:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


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
    kwargs = _generate_kwargs(sampling, pad_id, eos_id)
    if synced_ranks:
        kwargs["synced_gpus"] = True  # FSDP / ZeRO-3: every rank keeps running forwards until all are done
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    results = []
    for row in output[:, width:].tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results


class TextStream:
    """Turns generated ids into text pieces as they arrive (holding back incomplete UTF-8 byte sequences)."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None], skip_ids: int = 0):
        self.tokenizer = tokenizer
        self.emit = emit
        self.ids: list[int] = []
        self.sent = 0
        self.skip = skip_ids  # the prompt arrives first through `put`; it is not echoed

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:
            take = min(self.skip, len(ids))
            self.skip -= take
            ids = ids[take:]
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


def generate_reply(model: torch.nn.Module, tokenizer: Any, prompt: Sequence[int], sampling: SamplingConfig,
                   device: torch.device, on_text: Callable[[str], None] | None = None, seed: int | None = None) -> dict:
    """The reply to one prompt: {text, prompt_tokens, completion_tokens, finish_reason}, optionally streamed as text.

    `on_text` receives each piece as soon as it decodes to whole characters; an exception it raises aborts the
    generation (that is how a stream is cancelled)."""
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = _generate_kwargs(sampling, tokenizer.pad_token_id, tokenizer.eos_token_id)
    # The reply is the text as streamed (pieces are emitted once whole UTF-8 characters exist), so a streamed and a
    # non-streamed answer to the same request are the same string, even for invalid byte sequences.
    pieces: list[str] = []

    def collect(piece: str) -> None:
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)

    kwargs["streamer"] = TextStream(tokenizer, collect, skip_ids=len(prompt))
    input_ids = torch.tensor([list(prompt)], device=device)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    new_ids = output[0, len(prompt):].tolist()
    finished = tokenizer.eos_token_id in new_ids
    if finished:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
    text = "".join(pieces).strip()
    return {"text": text, "prompt_tokens": len(prompt), "completion_tokens": len(new_ids),
            "finish_reason": "stop" if finished else "length"}
