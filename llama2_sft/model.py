"""Model and tokenizer: load a Llama checkpoint or build a random one, in the training dtype, and the token-summed
cross-entropy the loop normalises."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from llama2_sft.data.chat import IGNORE_INDEX

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tokenizer_path(model_cfg: Any) -> str:
    """Where the tokenizer comes from: model.tokenizer, else the model's own path / hub id."""
    path = model_cfg.tokenizer or model_cfg.name_or_path
    if not path:
        raise ValueError("model.tokenizer is not set and model.name_or_path is null")
    return str(path)


def load_tokenizer(model_cfg: Any):
    """The Hugging Face tokenizer (encode_dialog resolves its SentencePiece model for exact chat encoding)."""
    from transformers import AutoTokenizer

    path = tokenizer_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision)
    except Exception as error:
        raise ValueError(f"model.tokenizer: cannot load a tokenizer from {path!r}: {error}") from error
    if tokenizer.pad_token_id is None:
        # Llama-2 has no pad token; padding positions are never attended to by real tokens nor supervised.
        tokenizer.pad_token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return tokenizer


def model_config(model_cfg: Any, tokenizer: Any, dtype: torch.dtype):
    """The transformers config for a checkpoint or for a random init from `model.arch`."""
    from transformers import AutoConfig, LlamaConfig

    if model_cfg.name_or_path:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    else:
        arch = dict(model_cfg.arch)
        arch.setdefault("vocab_size", len(tokenizer))
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **arch)
    config.use_cache = False  # training: packed sequences are only isolated with the KV cache off
    config._attn_implementation = model_cfg.attn_implementation
    config.dtype = dtype
    return config


def build_model(model_cfg: Any, tokenizer: Any, precision: str, device: torch.device | str = "cpu", seed: int = 0):
    """Load the checkpoint (or random-init from `arch` with `seed`) in the training dtype on `device`."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = DTYPES[precision]
    config = model_config(model_cfg, tokenizer, dtype)
    if model_cfg.name_or_path:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path, config=config, dtype=dtype, revision=model_cfg.revision,
                attn_implementation=model_cfg.attn_implementation,
            )
        except Exception as error:
            raise ValueError(f"model.name_or_path: cannot load {model_cfg.name_or_path!r}: {error}") from error
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model.to(device)


def build_meta_model(model_cfg: Any, tokenizer: Any, precision: str):
    """The same architecture with no storage (parameters on the meta device), for ranks that receive weights."""
    from transformers import AutoModelForCausalLM

    config = model_config(model_cfg, tokenizer, DTYPES[precision])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[precision],
                                                 attn_implementation=model_cfg.attn_implementation)
    model.config.use_cache = False
    return model


def reset_rotary_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute non-persistent rotary buffers (`inv_freq`), which `to_empty` leaves uninitialised."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(module.config)
            module.inv_freq = fresh.inv_freq.to(device)
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = fresh.original_inv_freq.to(device)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the unit of sharding and activation checkpointing)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers at .model.layers")
    return list(layers)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: works with FSDP2 and ZeRO-3)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def forward_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits [rows, width, vocab]. Packed rows pass reset position_ids (no attention mask, cache off), which the
    attention implementations turn into a block-diagonal causal mask."""
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch and "seq_lens" not in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    return model(**kwargs).logits


def summed_cross_entropy(logits: torch.Tensor, target_ids: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over supervised targets, in fp32, a chunk of positions at a time
    so the fp32 upcast of [tokens, vocab] logits never exists whole."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = target_ids.reshape(-1).to(flat_logits.device)
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_logits.shape[0], chunk_rows):
        total = total + F.cross_entropy(
            flat_logits[start: start + chunk_rows].float(), flat_targets[start: start + chunk_rows],
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
    return total


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
