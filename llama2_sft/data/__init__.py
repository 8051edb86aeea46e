"""Data pipeline: rows -> messages -> ids/labels -> cached samples -> packed/padded batches."""

from llama2_sft.data.chat import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    EncodedDialog,
    encode_dialog,
    encode_dialogs,
    generation_prompt,
)

__all__ = ["DEFAULT_SYSTEM_PROMPT", "IGNORE_INDEX", "EncodedDialog", "encode_dialog", "encode_dialogs", "generation_prompt"]
