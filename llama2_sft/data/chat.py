"""The llama-2-chat format: messages -> token ids + labels, exactly as Meta's reference encodes them.

Meta's `Llama.chat_completion` (llama/generation.py) folds the system prompt into the first user message,
then encodes every (user, assistant) pair on its own as
``BOS + sp.encode(f"[INST] {user.strip()} [/INST] {assistant.strip()} ") + EOS``
and a final, unanswered user message as ``BOS + sp.encode(f"[INST] {user.strip()} [/INST]")``.
Training, inference, export and serving all build their prompts here, so what we train on is what we serve.

Tokenization is SentencePiece itself (see `text_encoder`): Hugging Face's fast Llama tokenizer can differ from it on
runs of spaces, and it would turn a user's literal ``</s>`` into a control token. SentencePiece never does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, Sequence

IGNORE_INDEX = -100
# Bump when anything below changes the ids produced for the same messages (it keys the token cache).
TEMPLATE_VERSION = "llama2-chat/meta-reference/1"

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Meta's default Llama-2 system prompt, exact (note the two spaces after "safe.").
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

ROLES = ("system", "user", "assistant")


class TextEncoder(Protocol):
    """Plain-text encoder with SentencePiece semantics: no special tokens are ever parsed out of text."""

    bos_id: int
    eos_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class SentencePieceEncoder:
    """`TextEncoder` over a SentencePiece model file (the reference Llama-2 tokenizer)."""

    def __init__(self, model_file: str, num_threads: int = -1):
        import sentencepiece as spm

        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.num_threads = num_threads  # SentencePiece's threads per batch call (-1: all cores; 1 in worker processes)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_file}: SentencePiece model has no BOS/EOS ids (bos={self.bos_id}, eos={self.eos_id})")
        self.splits_at_spaces = _splits_at_spaces(self.sp)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def __reduce__(self):  # picklable for multi-process tokenization: reload from the file
        return (SentencePieceEncoder, (self.model_file, self.num_threads))


def _splits_at_spaces(sp) -> bool:
    """True when no piece can span a space and a leading space is the dummy prefix: then the ids of
    "{prompt} {answer} " are exactly ids("{prompt}") + ids("{answer} "), and each prompt need be encoded once.
    (Llama-2's model: split_by_whitespace, add_dummy_prefix, identity normalization, spaces kept as they are.)"""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    return (trainer.split_by_whitespace and not trainer.treat_whitespace_as_suffix and normalizer.add_dummy_prefix
            and not normalizer.remove_extra_whitespaces and normalizer.name == "identity")


class HFTextEncoder:
    """Fallback for tokenizers without a SentencePiece model: control strings in text stay text."""

    splits_at_spaces = False  # unknown pre-tokenization: always encode the whole pair string

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no bos/eos token")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


@lru_cache(maxsize=8)
def _sentencepiece_encoder(model_file: str) -> SentencePieceEncoder:
    return SentencePieceEncoder(model_file)


def sentencepiece_model_file(tokenizer: Any) -> str | None:
    """The tokenizer.model a Hugging Face tokenizer was loaded from, if there is one."""
    candidates = [getattr(tokenizer, "vocab_file", None), (getattr(tokenizer, "init_kwargs", None) or {}).get("vocab_file")]
    name = getattr(tokenizer, "name_or_path", None)
    if name:
        candidates.append(os.path.join(str(name), "tokenizer.model"))
    for path in candidates:
        if isinstance(path, str) and path and os.path.isfile(path):
            return path
    if name and not os.path.isdir(str(name)):
        try:  # a hub id: the file sits in the local hub cache if the tokenizer was downloaded with it
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(name), "tokenizer.model")
            if isinstance(cached, str) and os.path.isfile(cached):
                return cached
        except Exception:  # noqa: BLE001 - no cache, no hub library: fall back to the HF tokenizer
            return None
    return None


def text_encoder(tokenizer: Any) -> TextEncoder:
    """Resolve any tokenizer (path, SentencePieceProcessor, HF tokenizer, TextEncoder) to a `TextEncoder`."""
    if isinstance(tokenizer, (SentencePieceEncoder, HFTextEncoder)):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise ValueError(f"no SentencePiece model at {path}")
        return _sentencepiece_encoder(os.path.abspath(path))
    cached = getattr(tokenizer, "_llama2_sft_text_encoder", None)
    if cached is not None:
        return cached
    model_file = sentencepiece_model_file(tokenizer)
    if model_file is not None:
        encoder: TextEncoder = _sentencepiece_encoder(os.path.abspath(model_file))
    elif hasattr(tokenizer, "serialized_model_proto") or type(tokenizer).__name__ == "SentencePieceProcessor":
        raise ValueError("pass a SentencePiece model *file* (or a tokenizer directory), not a processor object")
    else:
        encoder = HFTextEncoder(tokenizer)
    try:
        tokenizer._llama2_sft_text_encoder = encoder
    except AttributeError:
        pass
    return encoder


@dataclass
class EncodedDialog:
    """Token ids of one dialog and their labels (IGNORE_INDEX where the model is not supervised)."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    # (start, end) token spans of each (user, assistant) pair, and of a trailing prompt if any.
    turn_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_supervised_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


class MessageError(ValueError):
    """A conversation that breaks the message rules; `reason` is a stable code (counted when data rows are skipped)."""

    def __init__(self, reason: str, detail: str, index: int | None = None):
        self.reason, self.detail, self.index = reason, detail, index
        super().__init__(detail if index is None else f"messages[{index}]: {detail}")

    def shifted(self, by: int) -> MessageError:
        """The same error with its position moved by `by` (to name the caller's position, not an extended list's)."""
        return MessageError(self.reason, self.detail, None if self.index is None else self.index + by)


def validate_messages(messages: Sequence[dict]) -> None:
    """Raise MessageError naming the position unless `messages` is [system?] user (assistant user)* assistant?.

    The one set of ordering rules: training rows (`sources.row_to_messages`) and every inference request use it.
    """
    if not messages:
        raise MessageError("empty_messages", "messages is empty")
    offset = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise MessageError("bad_message", f"must be a dict with 'role' and 'content', got {message!r:.80}", i)
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise MessageError("unknown_role", f"unknown role {role!r} (expected one of {ROLES})", i)
        if not isinstance(content, str):
            raise MessageError("bad_content", f"content must be a string, got {type(content).__name__}", i)
        if role == "system":
            if i != 0:
                raise MessageError("misplaced_system", "a system message may only come first", i)
            offset = 1
            continue
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if role != expected:
            # The user always opens; after that a wrong role can only repeat the one before it.
            reason = "first_turn_not_human" if i == offset else "consecutive_same_role"
            raise MessageError(reason, f"expected role {expected!r}, got {role!r} (user and assistant alternate, user first)", i)
    if offset == len(messages):
        raise MessageError("system_only", "messages holds only a system message")


def with_system_prompt(messages: Sequence[dict], system_prompt: str | None) -> list[dict]:
    """`messages` led by `system_prompt`, unless they bring their own system message or the prompt is empty.

    The one place a default system prompt is applied: to training rows without an instruction and to every chat
    request, so a model is asked in the form it was trained on.
    """
    has_own = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    if not system_prompt or not system_prompt.strip() or has_own:
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _fold_system(messages: Sequence[dict]) -> list[dict]:
    if messages[0]["role"] != "system":
        return list(messages)
    first_user = messages[1]
    folded = B_SYS + messages[0]["content"] + E_SYS + first_user["content"]
    return [{"role": "user", "content": folded}, *messages[2:]]


def dialog_strings(messages: Sequence[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """The strings Meta's reference encodes: per pair (prompt, prompt + answer), and a trailing prompt or None."""
    validate_messages(messages)
    dialog = _fold_system(messages)
    pairs = []
    for user, assistant in zip(dialog[0::2], dialog[1::2]):
        prompt = f"{B_INST} {user['content'].strip()} {E_INST}"
        pairs.append((prompt, f"{prompt} {assistant['content'].strip()} "))
    tail = None
    if len(dialog) % 2 == 1:
        tail = f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}"
    return pairs, tail


def encode_dialogs(tokenizer: Any, dialogs: Sequence[Sequence[dict]], exact: bool = False) -> list[EncodedDialog]:
    """`encode_dialog` for many dialogs with one batched tokenizer call (the fast path for data preparation).
    `exact=True` encodes each whole pair string as Meta's code does (the reference the fast path is tested against)."""
    encoder = text_encoder(tokenizer)
    fast = getattr(encoder, "splits_at_spaces", False) and not exact
    layouts, texts = [], []
    for messages in dialogs:
        pairs, tail = dialog_strings(messages)
        # fast: encode the prompt and "{answer} " (its leading space is the dummy prefix); exact: the whole pair
        split = fast and all(full[len(prompt) + 1:].strip() for prompt, full in pairs)
        layouts.append((len(pairs), tail is not None, split))
        for prompt, full in pairs:
            texts.extend((prompt, full[len(prompt) + 1:] if split else full))
        if tail is not None:
            texts.append(tail)
    token_lists = encoder.encode_batch(texts) if texts else []
    bos, eos = encoder.bos_id, encoder.eos_id
    results, cursor = [], 0
    for num_pairs, has_tail, split in layouts:
        out = EncodedDialog()
        for _ in range(num_pairs):
            prompt_ids, second = token_lists[cursor], token_lists[cursor + 1]
            cursor += 2
            if split:
                answer_ids = second
            else:
                # Labels: the tokens after the prompt's own encoding, plus EOS. Checked, not assumed, that the
                # prompt's ids are a prefix of the pair's ids.
                if second[: len(prompt_ids)] != prompt_ids:
                    raise ValueError("tokenizer broke the prompt/answer boundary: prompt ids are not a prefix of the pair's ids")
                answer_ids = second[len(prompt_ids):]
            start = len(out.input_ids)
            out.input_ids += [bos, *prompt_ids, *answer_ids, eos]
            out.labels += [IGNORE_INDEX] * (1 + len(prompt_ids)) + answer_ids + [eos]
            out.turn_spans.append((start, len(out.input_ids)))
        if has_tail:
            tail_ids = token_lists[cursor]
            cursor += 1
            start = len(out.input_ids)
            out.input_ids += [bos, *tail_ids]
            out.labels += [IGNORE_INDEX] * (1 + len(tail_ids))
            out.turn_spans.append((start, len(out.input_ids)))
        results.append(out)
    return results


def encode_dialog(tokenizer: Any, messages: Sequence[dict]) -> EncodedDialog:
    """Encode OpenAI-style messages as llama-2-chat ids and labels, token for token as Meta's reference does.

    Ending with an assistant message gives a training example (labels on each reply and its EOS); ending with a user
    message gives a generation prompt (no trailing EOS, the last part unsupervised).
    """
    return encode_dialogs(tokenizer, [messages])[0]


def generation_prompt(tokenizer: Any, messages: Sequence[dict], system_prompt: str | None = None) -> list[int]:
    """Ids to feed a model so it writes the next assistant reply (messages must end with a user message).

    `system_prompt` leads unless the messages bring their own (`with_system_prompt`); errors name the caller's
    positions."""
    if not messages:
        raise MessageError("empty_messages", "messages is empty")
    full = with_system_prompt(messages, system_prompt)
    try:
        ids = encode_dialog(tokenizer, full).input_ids  # validates the order, once
    except MessageError as error:
        raise error.shifted(len(messages) - len(full)) from None
    if messages[-1]["role"] != "user":
        raise MessageError("not_user_last", "a generation prompt must end with a user message")
    return ids


def answer_split(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split a tokenized dialog into (prompt for the last reply, that reply's ids without EOS)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(labels[start: end - 1])
