"""LoRA and QLoRA through the `peft` library.

Adapters are injected into the transformers Llama in place (`peft.inject_adapter_in_model`): the model stays a
`LlamaForCausalLM`, so every strategy, the fused LM head and the checkpointing policies see the same module tree as in
full fine-tuning. The base is frozen and kept in the compute dtype (4-bit NF4 for QLoRA); the adapters, and the
modules named in `peft.modules_to_save`, train in the precision the strategy asks for (fp32 master weights). A LoRA
run's checkpoints hold only the trainable weights, plus a `BaseReference` that a resume checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch

# Architecture fields that identify a base model (runtime switches such as use_cache or the attention kernel do not).
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")


def _quiet_bitsandbytes() -> None:
    """bitsandbytes (imported by peft) warns at import on CPUs with AVX512-BF16 that an optional inference kernel
    package is missing; QLoRA training never uses that kernel (keep_4bit_weights_differentiable), so say nothing."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


_quiet_bitsandbytes()


def uses_adapters(peft_cfg: Any) -> bool:
    return peft_cfg is not None and peft_cfg.method != "none"


def lora_config(peft_cfg: Any):
    """The peft `LoraConfig` of `peft.*` (no bias training; modules_to_save are unfrozen by `apply_adapters`)."""
    from peft import LoraConfig

    return LoraConfig(r=int(peft_cfg.r), lora_alpha=float(peft_cfg.alpha), lora_dropout=float(peft_cfg.dropout),
                      target_modules=list(peft_cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def quantization_config(peft_cfg: Any, compute_dtype: torch.dtype):
    """bitsandbytes 4-bit settings for QLoRA (None for LoRA and full fine-tuning)."""
    if peft_cfg is None or peft_cfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=str(peft_cfg.quant_type),
                              bnb_4bit_use_double_quant=bool(peft_cfg.double_quant), bnb_4bit_compute_dtype=compute_dtype)


def _module_leaf_names(model: torch.nn.Module, kind: type) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kind) and name})


def apply_adapters(model: torch.nn.Module, peft_cfg: Any, trainable_dtype: torch.dtype) -> torch.nn.Module:
    """Inject LoRA adapters into `model` (in place), freeze everything else but `modules_to_save`, and keep the
    trainable weights in `trainable_dtype`. Returns the model."""
    from peft import inject_adapter_in_model

    linear_names = _module_leaf_names(model, torch.nn.Linear)
    missing = [name for name in peft_cfg.target_modules if name not in linear_names]
    if missing:
        raise ValueError(f"peft.target_modules={list(peft_cfg.target_modules)}: {missing} name no linear layer of "
                         f"this model; it has {linear_names}")
    all_names = _module_leaf_names(model, torch.nn.Module)
    unknown = [name for name in peft_cfg.modules_to_save if name not in all_names]
    if unknown:
        raise ValueError(f"peft.modules_to_save={list(peft_cfg.modules_to_save)}: {unknown} name no module of this "
                         f"model; it has {all_names}")
    inject_adapter_in_model(lora_config(peft_cfg), model)  # freezes every weight that is not an adapter's
    for name, module in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in peft_cfg.modules_to_save:
            module.requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(trainable_dtype)
    return model


def keep_4bit_weights_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its CPU inference kernel. On CPUs with AVX512-BF16,
    the first forward in eval mode without grad (the Validator's) converts every `Linear4bit` weight, for good, to a
    layout whose matmul has no backward: training would go on with silently wrong gradients (measured: the
    embedding's gradient norm off by 500x after one eval). QLoRA keeps the layout its backward works with."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


class BaseReference:
    """Which base model a LoRA run adapts: path or hub id, revision, and a hash of its architecture. Saved with every
    checkpoint (as a stateful part of the Checkpointer); a resume onto a different base fails naming both."""

    def __init__(self, name_or_path: str | None, revision: str | None, config: Any):
        arch = {key: getattr(config, key, None) for key in ARCH_FIELDS}
        self.state = {"name_or_path": name_or_path, "revision": revision,
                      "config_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, saved: dict) -> None:
        if saved != self.state:
            raise ValueError(f"this run adapts base {self.state}, but the checkpoint was trained on base {saved}: "
                             "resume with the checkpoint's model.name_or_path / model.revision, or start a new "
                             "output_dir")
