"""Truncation to max_length: each case of the policy, on real encodings."""

from __future__ import annotations

import pytest

from llama2_sft.data import IGNORE_INDEX, encode_dialog
from llama2_sft.data.truncation import truncate

DIALOG = [
    {"role": "user", "content": "first question here"},
    {"role": "assistant", "content": "first answer that is fairly long with many words in it"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]


@pytest.fixture
def encoded(hf_tokenizer):
    return encode_dialog(hf_tokenizer, DIALOG)


def test_dialog_that_fits_is_kept_whole(encoded):
    fitted, outcome = truncate(encoded, len(encoded), "turns")
    assert outcome == "fits" and fitted.input_ids == encoded.input_ids


def test_trailing_turns_are_dropped_whole_and_the_sample_ends_with_eos(encoded, hf_tokenizer):
    first_end = encoded.turn_spans[0][1]
    fitted, outcome = truncate(encoded, len(encoded) - 1, "turns")
    assert outcome == "dropped_turns"
    assert fitted.input_ids == encoded.input_ids[:first_end]
    assert fitted.input_ids[-1] == hf_tokenizer.eos_token_id and fitted.labels[-1] == hf_tokenizer.eos_token_id


def test_overlong_first_pair_keeps_its_prompt_and_cuts_the_reply_without_eos(encoded, hf_tokenizer):
    prompt_len = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    limit = prompt_len + 3
    fitted, outcome = truncate(encoded, limit, "turns")
    assert outcome == "truncated_reply"
    assert fitted.input_ids == encoded.input_ids[:limit]
    assert fitted.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert fitted.labels[prompt_len:] == encoded.input_ids[prompt_len:limit]
    assert hf_tokenizer.eos_token_id not in fitted.input_ids


def test_sample_whose_prompt_alone_does_not_fit_is_skipped(encoded):
    prompt_len = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert truncate(encoded, prompt_len, "turns") == (None, "prompt_too_long")
    assert truncate(encoded, prompt_len - 5, "turns") == (None, "prompt_too_long")


def test_drop_policy_skips_anything_too_long(encoded):
    assert truncate(encoded, len(encoded) - 1, "drop") == (None, "too_long")
    assert truncate(encoded, len(encoded), "drop")[1] == "fits"


def test_unknown_policy_is_rejected_naming_the_key(encoded):
    with pytest.raises(ValueError, match="dataset.truncation"):
        truncate(encoded, 10, "middle")
