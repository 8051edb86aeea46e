"""Generation from token prompts: a batch with left padding (`generate_ids`), or one reply streamed as text
(`generate_reply`). Greedy or sampled. Prompts come from `llama2_sft.data.chat` only, so generation sees exactly
the format training used; chats go through `llama2_sft.inference.chat`."""

from __future__ import annotations

import codecs
import re
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


class ReplyDecoder:
    """Reply ids -> text as the reference decodes them, and how many leading ids already have their final text.

    With a SentencePiece model (every Llama-2 tokenizer, extended ones included) the text is SentencePiece's own
    decode, Meta's reference. It is the same whether the ids are decoded at once or piece by piece, except inside a
    run of byte-fallback pieces (`<0xE4>`, a character the vocabulary lacks): SentencePiece decodes a run one UTF-8
    character at a time and writes U+FFFD for each byte that cannot start a valid character, so only the run's last
    bytes, while they are the valid start of a character, may still change. Those are held back (`settled`).
    Ids beyond the SentencePiece model (tokens a Hugging Face tokenizer added) decode as "" when special.

    Without a SentencePiece model, the tokenizer's own decode (special tokens skipped) is used, and a trailing run of
    `<0xNN>` byte tokens is held back: Hugging Face's byte fallback replaces a whole invalid run, earlier bytes too."""

    def __init__(self, tokenizer: Any):
        from llama2_sft.data.chat import SentencePieceEncoder, text_encoder

        self.tokenizer = tokenizer
        encoder = text_encoder(tokenizer)
        self.sp = encoder.sp if isinstance(encoder, SentencePieceEncoder) else None
        self.size = self.sp.get_piece_size() if self.sp is not None else 0
        if self.sp is not None and hasattr(tokenizer, "convert_ids_to_tokens") and len(tokenizer) > self.size:
            extra = range(self.size, len(tokenizer))
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            if any(token_id not in special for token_id in extra):
                self.sp = None  # plain text tokens beyond the SentencePiece model: only the tokenizer knows them
        self.control = self.sp.bos_id() if self.sp is not None else -1
        self.byte_ids: set[int] = set()
        if self.sp is None:
            tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            self.byte_ids = {i for i, token in enumerate(tokens) if isinstance(token, str) and _BYTE_TOKEN.match(token)}

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`."""
        if self.sp is None:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return self.sp.decode([i if 0 <= i < self.size else self.control for i in ids])

    def settled(self, ids: Sequence[int]) -> int:
        """How many leading ids decode to text that no later id can change."""
        end = len(ids)
        while end > 0 and self._is_byte(ids[end - 1]):
            end -= 1
        if self.sp is None:
            return end
        run = bytes(int(self.sp.id_to_piece(i)[3:5], 16) for i in ids[end:])
        return len(ids) - pending_utf8_bytes(run)

    def _is_byte(self, token_id: int) -> bool:
        if self.sp is None:
            return token_id in self.byte_ids
        return 0 <= token_id < self.size and self.sp.is_byte(token_id)


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def pending_utf8_bytes(run: bytes) -> int:
    """How many trailing bytes of a run of byte pieces are the valid start of a character still missing its last
    bytes (0 when none). The run is read as SentencePiece decodes it: a valid character at a time, else one byte
    (written as U+FFFD) at a time."""
    offset = 0
    while offset < len(run):
        window = run[offset: offset + 4]
        try:
            text, used = codecs.utf_8_decode(window, "strict", False)
        except UnicodeDecodeError as error:
            if error.start == 0:  # no valid character starts here: U+FFFD for this byte, go on at the next
                offset += 1
                continue
            text, used = window[: error.start].decode("utf-8"), error.start
        if used == 0:  # a valid start whose last bytes have not arrived yet
            return len(run) - offset
        offset += len(text[0].encode("utf-8"))
    return 0


def reply_decoder(tokenizer: Any) -> ReplyDecoder:
    """The `ReplyDecoder` of `tokenizer` (built once per tokenizer object)."""
    cached = getattr(tokenizer, "_llama2_sft_reply_decoder", None)
    if cached is None:
        cached = ReplyDecoder(tokenizer)
        try:
            tokenizer._llama2_sft_reply_decoder = cached
        except AttributeError:
            pass
    return cached


def decode_reply(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of generated ids, as the streamed reply shows it (`ReplyDecoder`)."""
    return reply_decoder(tokenizer).decode(ids)


class TextStream:
    """Turns generated ids into text pieces as they arrive. A piece is sent once its ids have their final text
    (`ReplyDecoder.settled`), so the pieces always join to the one-shot decode of the ids (`decode_reply`): no
    character is split across pieces and no replacement character is sent that a later byte would have completed."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None], skip_ids: int = 0):
        self.decoder = reply_decoder(tokenizer)
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
        self._send(self.decoder.decode(self.ids[: self.decoder.settled(self.ids)]))

    def end(self) -> None:
        self._send(self.decoder.decode(self.ids))

    def _send(self, text: str) -> None:
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
