"""Rewrite golden_chat.json from the Meta-reference transcription in tests/unit/test_chat.py (not from our encoder),
using the committed data/tokenizer. Run only when the tokenizer or the dialogs change on purpose."""

import json
import os
import sys

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tests.unit.test_chat import DIALOGS, meta_reference  # noqa: E402

sp = spm.SentencePieceProcessor(model_file=os.path.join(HERE, "..", "..", "data", "tokenizer", "tokenizer.model"))
golden = {}
for name, messages in sorted(DIALOGS.items()):
    ids, labels = meta_reference(sp, messages)
    golden[name] = {"messages": messages, "input_ids": ids, "labels": labels}
with open(os.path.join(HERE, "golden_chat.json"), "w", encoding="utf-8") as handle:
    json.dump(golden, handle, ensure_ascii=False, indent=1)
print(f"wrote {len(golden)} golden dialogs")
