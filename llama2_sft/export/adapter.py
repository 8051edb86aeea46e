"""Export a LoRA / QLoRA run's adapters as a stock PEFT adapter directory: adapter_config.json (peft's `LoraConfig`,
naming the base), adapter_model.safetensors (keys as `PeftModel.save_pretrained` writes them) and the tokenizer
files with the llama-2 chat template, so that `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
DIR)` works without this package. Named `adapter.py`, not `peft.py`, so that it never shadows the `peft` package.

Training injects adapters in place (the model stays a `LlamaForCausalLM`): its keys are
`model.layers.0.self_attn.q_proj.lora_A.default.weight`, and `peft.modules_to_save` trains the module itself
(`lm_head.weight`). A stock `PeftModel` nests the same model under `base_model.model.` and saves without the adapter
name: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `base_model.model.lm_head.weight`.

A run that grew its base to an extended tokenizer (llama2_sft.grow) trains embed_tokens and lm_head whole, with more
rows than the base has; stock peft does not resize a base, so the directory gets a README.md (and the log a warning)
saying to call `base.resize_token_embeddings(len(tokenizer))` first.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from llama2_sft.grow import piece_count
from llama2_sft.inference.load import AdapterState, check_base, locate_grown_base

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped transformers model
_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")  # the in-place adapter's name in its keys


def peft_key(key: str) -> str:
    """The key `PeftModel.save_pretrained` writes for one trainable weight of the in-place injected model."""
    return PEFT_PREFIX + _ADAPTER_NAME.sub(r".\1", key)


def adapter_config(adapters: AdapterState):
    """peft's `LoraConfig` of the run, naming the base it adapts, ready for inference (no dropout effect)."""
    from llama2_sft.adapters import lora_config

    config = lora_config(adapters.settings)
    config.base_model_name_or_path = adapters.base
    config.revision = adapters.revision
    config.modules_to_save = list(adapters.settings.modules_to_save) or None
    config.inference_mode = True
    return config


def _check_base_if_present(adapters: AdapterState) -> int | None:
    """The adapters are written without loading the base; where it is on this machine its architecture is checked
    (grown to the run's vocabulary if training grew it), and a base that stock transformers cannot load (a run of this
    repo) gets a hint. Returns the base's own vocabulary size, None when the base is not here."""
    try:
        _, kind, config, growth = locate_grown_base(adapters)
    except ValueError:
        log.info("base %s is not on this machine: its architecture is not checked", adapters.base)
        return None
    check_base(adapters, config)
    if kind != "hf":
        log.warning("base %s is a run of this repo (%s), which stock transformers cannot load: export it with "
                    "python -m llama2_sft.export ckpt=%s format=hf out=BASE_DIR and export the adapters again with "
                    "base=BASE_DIR", adapters.base, kind, adapters.base)
    return piece_count(growth[0]) if growth is not None else int(config.vocab_size)


def _resize_note(adapters: AdapterState, base_vocab: int | None) -> str | None:
    """How to load adapters whose embed_tokens / lm_head (peft.modules_to_save) have more rows than the base: training
    grew the base to an extended tokenizer, and stock peft does not resize a base. None when nothing is to be done."""
    embed = adapters.trainable.get("model.embed_tokens.weight")
    rows = int(embed.shape[0]) if embed is not None else None
    if rows is None or (base_vocab is not None and rows <= base_vocab):
        return None
    grown = (f"from {base_vocab:,} to {rows:,} pieces" if base_vocab is not None
             else f"to {rows:,} pieces if it has fewer rows")
    return (f"# Loading these adapters\n\nTraining grew the base's vocabulary {grown} (the tokenizer here); "
            "`embed_tokens` and `lm_head` are trained whole (`modules_to_save`). Stock peft does not resize the base, "
            "so resize it first; its new rows are then replaced by the trained ones:\n\n```python\n"
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)\n"
            f"base = AutoModelForCausalLM.from_pretrained({adapters.base!r})\n"
            "base.resize_token_embeddings(len(tokenizer), mean_resizing=False)\n"
            "model = PeftModel.from_pretrained(base, ADAPTER_DIR)\n```\n")


def export_peft(adapters: AdapterState, out_dir: str) -> str:
    """Write `adapters` as a PEFT adapter directory at `out_dir` (under a temporary name, renamed when complete)."""
    from safetensors.torch import save_file

    from llama2_sft.export.hf import write_tokenizer

    note = _resize_note(adapters, _check_base_if_present(adapters))
    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_tokenizer(adapters.source, tmp)
    adapter_config(adapters).save_pretrained(tmp)
    weights = {peft_key(key): tensor.detach().to("cpu", torch.float32).contiguous()
               for key, tensor in adapters.trainable.items()}
    save_file(weights, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if note is not None:
        log.warning("%s", note.split("\n\n")[1])
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(note)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
