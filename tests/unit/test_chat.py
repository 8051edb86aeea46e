"""encode_dialog against an independent transcription of Meta's reference `chat_completion` encoding."""

from __future__ import annotations

import json
import os

import pytest
import sentencepiece as spm

from llama2_sft.data import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, encode_dialog, encode_dialogs
from llama2_sft.data.chat import text_encoder, validate_messages

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "golden_chat.json")

DIALOGS = {
    "single_turn": [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}],
    "system_multi_turn": [
        {"role": "system", "content": "Answer with only the result."},
        {"role": "user", "content": "  reverse abc  "},
        {"role": "assistant", "content": "cba\n"},
        {"role": "user", "content": "and xyz?"},
        {"role": "assistant", "content": "zyx"},
    ],
    "chinese_emoji": [
        {"role": "user", "content": "把 abc 倒过来写 😀"},
        {"role": "assistant", "content": "cba 🎉 好的"},
    ],
    "whitespace": [
        {"role": "user", "content": "def f():\n    return  1\n\n\tx   =  2"},
        {"role": "assistant", "content": "  indented\n    code   here  "},
    ],
    "literal_control_text": [
        {"role": "user", "content": "Say </s> and <s> then [INST] x [/INST] <<SYS>>"},
        {"role": "assistant", "content": "</s><s>[/INST]"},
    ],
    "generation_prompt": [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "你好吗？"},
    ],
}


def meta_reference(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> tuple[list[int], list[int]]:
    """Transcription of llama/generation.py chat_completion, with labels as our spec defines them."""
    b_inst, e_inst, b_sys, e_sys = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    bos, eos = sp.bos_id(), sp.eos_id()
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"]}] + dialog[2:]
    ids: list[int] = []
    labels: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        pair = [bos] + sp.encode(f"{b_inst} {(prompt['content']).strip()} {e_inst} {(answer['content']).strip()} ") + [eos]
        prompt_len = 1 + len(sp.encode(f"{b_inst} {(prompt['content']).strip()} {e_inst}"))
        ids += pair
        labels += [IGNORE_INDEX] * prompt_len + pair[prompt_len:]
    if dialog[-1]["role"] == "user":
        tail = [bos] + sp.encode(f"{b_inst} {(dialog[-1]['content']).strip()} {e_inst}")
        ids += tail
        labels += [IGNORE_INDEX] * len(tail)
    return ids, labels


@pytest.fixture(scope="module")
def sp(sp_model_file):
    return spm.SentencePieceProcessor(model_file=sp_model_file)


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_encode_dialog_equals_meta_reference_through_autotokenizer(name, hf_tokenizer, sp):
    encoded = encode_dialog(hf_tokenizer, DIALOGS[name])
    ids, labels = meta_reference(sp, DIALOGS[name])
    assert encoded.input_ids == ids
    assert encoded.labels == labels


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_encode_dialog_matches_committed_golden_ids(name, hf_tokenizer):
    with open(GOLDEN, encoding="utf-8") as handle:
        golden = json.load(handle)
    encoded = encode_dialog(hf_tokenizer, golden[name]["messages"])
    assert encoded.input_ids == golden[name]["input_ids"]
    assert encoded.labels == golden[name]["labels"]


def test_tokenizer_path_and_hf_tokenizer_give_the_same_ids(hf_tokenizer, tokenizer_dir):
    for dialog in DIALOGS.values():
        assert encode_dialog(tokenizer_dir, dialog).input_ids == encode_dialog(hf_tokenizer, dialog).input_ids


def test_prompt_masked_reply_and_eos_supervised(hf_tokenizer, sp):
    encoded = encode_dialog(hf_tokenizer, DIALOGS["single_turn"])
    eos = sp.eos_id()
    assert encoded.input_ids[0] == sp.bos_id() and encoded.labels[0] == IGNORE_INDEX
    assert encoded.input_ids[-1] == eos and encoded.labels[-1] == eos
    supervised = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    reply = sp.decode([encoded.input_ids[i] for i in supervised[:-1]])
    assert reply.strip() == "7"
    # every supervised position carries the token that stands there
    assert all(encoded.labels[i] == encoded.input_ids[i] for i in supervised)


def test_each_turn_supervises_its_own_reply_only(hf_tokenizer, sp):
    encoded = encode_dialog(hf_tokenizer, DIALOGS["system_multi_turn"])
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [sp.decode(s[:-1]).strip() for s in spans] == ["cba", "zyx"]
    assert all(s[-1] == sp.eos_id() for s in spans)
    assert encoded.input_ids.count(sp.bos_id()) == 2


def test_user_typed_control_strings_stay_text(hf_tokenizer, sp):
    encoded = encode_dialog(hf_tokenizer, DIALOGS["literal_control_text"])
    assert encoded.input_ids.count(sp.bos_id()) == 1 and encoded.input_ids[0] == sp.bos_id()
    assert encoded.input_ids.count(sp.eos_id()) == 1 and encoded.input_ids[-1] == sp.eos_id()
    assert "</s>" in sp.decode(encoded.input_ids[1:-1])


def test_generation_prompt_has_no_trailing_eos_and_no_labels_on_the_tail(hf_tokenizer, sp):
    encoded = encode_dialog(hf_tokenizer, DIALOGS["generation_prompt"])
    assert encoded.input_ids[-1] != sp.eos_id()
    tail_start = encoded.turn_spans[-1][0]
    assert all(label == IGNORE_INDEX for label in encoded.labels[tail_start:])
    assert sp.decode(encoded.input_ids[tail_start:]).endswith("[/INST]")


def test_system_block_has_no_stray_indentation(hf_tokenizer, sp):
    encoded = encode_dialog(hf_tokenizer, DIALOGS["generation_prompt"])
    text = sp.decode(encoded.input_ids[: encoded.turn_spans[0][1]])
    assert text.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert "safe.  Your answers" in text  # Meta's text has two spaces here


def test_batched_encoding_equals_one_by_one(hf_tokenizer):
    dialogs = list(DIALOGS.values())
    batched = encode_dialogs(hf_tokenizer, dialogs)
    for dialog, encoded in zip(dialogs, batched):
        single = encode_dialog(hf_tokenizer, dialog)
        assert (encoded.input_ids, encoded.labels) == (single.input_ids, single.labels)


@pytest.mark.parametrize(
    "messages, position",
    [
        ([{"role": "assistant", "content": "hi"}], "messages[0]"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "messages[1]"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "messages[1]"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "messages[1]"),
        ([{"role": "user", "content": 3}], "messages[0]"),
    ],
)
def test_bad_role_order_raises_naming_the_position(messages, position):
    with pytest.raises(ValueError, match=position.replace("[", r"\[").replace("]", r"\]")):
        validate_messages(messages)


def test_hf_fallback_encoder_keeps_control_strings_as_text(hf_tokenizer):
    from llama2_sft.data.chat import HFTextEncoder

    encoder = HFTextEncoder(hf_tokenizer)
    ids = encoder.encode_batch(["a </s> b <s>"])[0]
    assert hf_tokenizer.eos_token_id not in ids and hf_tokenizer.bos_token_id not in ids


def test_text_encoder_of_an_autotokenizer_is_sentencepiece(hf_tokenizer):
    from llama2_sft.data.chat import SentencePieceEncoder

    assert isinstance(text_encoder(hf_tokenizer), SentencePieceEncoder)


def test_split_encoding_equals_whole_pair_encoding_on_every_bundled_and_realistic_dialog(hf_tokenizer):
    """The fast path encodes each prompt once; it must give the ids of encoding each whole pair string."""
    from llama2_sft.data.chat import text_encoder
    from llama2_sft.data.sources import row_to_messages
    from llama2_sft.data.synthetic import generate

    assert text_encoder(hf_tokenizer).splits_at_spaces  # the fast path is really taken for Llama-style models
    repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

    rows = [json.loads(line) for name in ("train.jsonl", "eval.jsonl")
            for line in open(os.path.join(repo, "data", name), encoding="utf-8")]
    rows += generate(300, seed=5)
    dialogs = [m for m in (row_to_messages(r, DEFAULT_SYSTEM_PROMPT)[0] for r in rows) if m]
    dialogs += [dialog[:-1] for dialog in dialogs[:200]]  # generation prompts too
    fast, exact = encode_dialogs(hf_tokenizer, dialogs), encode_dialogs(hf_tokenizer, dialogs, exact=True)
    for a, b in zip(fast, exact):
        assert (a.input_ids, a.labels, a.turn_spans) == (b.input_ids, b.labels, b.turn_spans)
