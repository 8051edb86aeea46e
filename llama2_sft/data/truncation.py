"""Fitting an encoded dialog into max_length without ever cutting a sample at a place the model should not learn.

Policy `turns` (default):
  1. the whole dialog fits                        -> kept as is                              (outcome `fits`)
  2. it does not, but the first k >= 1 pairs do   -> the trailing pairs are dropped whole, so the sample still ends
                                                      right after an assistant EOS          (outcome `dropped_turns`)
  3. the first pair alone is too long, but its
     prompt (BOS + "[INST] ... [/INST]") fits     -> the reply is cut at max_length, without an EOS, so the model is
                                                      never taught to stop mid-sentence     (outcome `truncated_reply`)
  4. the first prompt alone does not fit          -> the sample is skipped                   (skip `prompt_too_long`)
Policy `drop`: anything longer than max_length is skipped                                      (skip `too_long`).
"""

from __future__ import annotations

from llama2_sft.data.chat import IGNORE_INDEX, EncodedDialog

POLICIES = ("turns", "drop")
OUTCOMES = ("fits", "dropped_turns", "truncated_reply")
SKIPS = ("prompt_too_long", "too_long")


def truncate(encoded: EncodedDialog, max_length: int, policy: str = "turns") -> tuple[EncodedDialog | None, str]:
    """Return (dialog that fits, outcome) or (None, skip reason)."""
    if policy not in POLICIES:
        raise ValueError(f"dataset.truncation={policy!r}: expected one of {POLICIES}")
    if len(encoded) <= max_length:
        return encoded, "fits"
    if policy == "drop":
        return None, "too_long"

    kept_end = 0
    kept_spans = []
    for start, end in encoded.turn_spans:
        if end > max_length:
            break
        kept_end = end
        kept_spans.append((start, end))
    if kept_spans:
        return (
            EncodedDialog(encoded.input_ids[:kept_end], encoded.labels[:kept_end], kept_spans),
            "dropped_turns",
        )

    # First pair too long: keep its whole prompt, cut the reply. The prompt ends at the first supervised label.
    first_end = encoded.turn_spans[0][1]
    labels = encoded.labels[:first_end]
    prompt_length = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), first_end)
    if prompt_length >= max_length:
        return None, "prompt_too_long"
    ids = encoded.input_ids[:max_length]
    cut = EncodedDialog(ids, labels[:max_length], [(0, max_length)])
    return cut, "truncated_reply"
