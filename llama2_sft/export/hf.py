"""Export any checkpoint as a Hugging Face model directory: safetensors (bf16 by default), config.json,
generation_config.json, the SentencePiece tokenizer files and a llama-2 chat template, so that stock
`AutoModelForCausalLM.from_pretrained(DIR)` and `tokenizer.apply_chat_template(...)` work without this package."""

from __future__ import annotations

import json
import os
import shutil

import torch

from llama2_sft.checkpoint import TOKENIZER_FILES
from llama2_sft.inference.load import LoadedModel

# Renders the strings encode_dialog encodes: BOS + "[INST] {user} [/INST]" (+ " {answer} " + EOS) per turn,
# the system prompt folded into the first user message. (Stock tokenizers parse "<s>"/"</s>" typed *inside*
# messages as control tokens; encode_dialog does not: for user text that may contain them, use encode_dialog.)
_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '@@[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Tokenizers differ on whether text right after a special token gets SentencePiece's dummy-prefix space: Meta's
# legacy tokenizer.json does, a tokenizer converted from tokenizer.model by transformers 5 does not. The exporter
# keeps whichever variant reproduces encode_dialog's ids with the exported tokenizer (checked, not assumed).
TEMPLATE_VARIANTS = (_TEMPLATE.replace("@@", ""), _TEMPLATE.replace("@@", " "))
LLAMA2_CHAT_TEMPLATE = TEMPLATE_VARIANTS[0]

PROBE_DIALOGS = (
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 3 加 4 等于几？ "},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "and  5\n  more?"}],
    [{"role": "user", "content": "code:\n    x = 1"}, {"role": "assistant", "content": "ok 😀"},
     {"role": "user", "content": "thanks"}],
)


def _rendered_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def choose_chat_template(tokenizer_dir: str) -> str:
    """The template variant whose rendering the stock tokenizer in `tokenizer_dir` encodes as encode_dialog does."""
    from transformers import AutoTokenizer

    from llama2_sft.data.chat import encode_dialog

    for template in TEMPLATE_VARIANTS:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.chat_template = template
        if all(_rendered_ids(tokenizer, d) == encode_dialog(tokenizer, d).input_ids for d in PROBE_DIALOGS):
            return template
    raise ValueError(f"{tokenizer_dir}: no llama-2 chat template variant reproduces encode_dialog with this tokenizer")


def write_tokenizer(source_dir: str, out_dir: str) -> None:
    """Copy the checkpoint's SentencePiece tokenizer files into `out_dir` (save_pretrained would drop
    tokenizer.model) with the llama-2 chat template that stock transformers renders as encode_dialog encodes."""
    for name in TOKENIZER_FILES:
        source = os.path.join(source_dir, name)
        if os.path.isfile(source):
            shutil.copy2(source, os.path.join(out_dir, name))
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    tokenizer_config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            tokenizer_config = json.load(handle)
    tokenizer_config.pop("chat_template", None)  # choose_chat_template tries each variant on the bare tokenizer
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2, ensure_ascii=False)
    template = choose_chat_template(out_dir)
    tokenizer_config["chat_template"] = template
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as handle:
        handle.write(template)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_hf(loaded: LoadedModel, out_dir: str, dtype: str = "bf16", max_shard_size: str = "5GB") -> str:
    """Write `loaded` to `out_dir` (written under a temporary name and renamed when complete)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = loaded.model.to(DTYPES[dtype])
    model.config.use_cache = True
    model.config.dtype = DTYPES[dtype]
    model.generation_config.bos_token_id = loaded.tokenizer.bos_token_id
    model.generation_config.eos_token_id = loaded.tokenizer.eos_token_id
    model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    write_tokenizer(loaded.source, tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
