"""Load any saved model for inference: one ready transformers model + tokenizer + the training config. Every consumer
(infer, export, serve) loads through here, so they all see exactly the weights training wrote.

Accepted `ckpt`: a training run directory (its latest complete checkpoint), one checkpoint directory (DCP shards
from single/DDP/FSDP, or DeepSpeed ZeRO shards, consolidated on the fly), or a Hugging Face model directory / hub id.
Consolidation streams into a model whose parameters are allocated once: never two full copies in memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from llama2_sft.checkpoint import COMPLETE, is_complete, latest_checkpoint

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A consolidated model in eval mode, its tokenizer, and what it was trained with (None for plain HF dirs)."""

    model: Any
    tokenizer: Any
    train_config: Any | None
    source: str  # the directory the weights came from
    kind: str  # dcp | deepspeed | hf


def resolve_checkpoint(ckpt: str) -> tuple[str, str]:
    """(directory, kind) for a run dir, a checkpoint dir or an HF dir; a clear error for anything else."""
    path = os.path.expanduser(str(ckpt))
    if os.path.isdir(path) and not is_complete(path) and os.path.isdir(os.path.join(path, "checkpoints")):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"ckpt={ckpt}: run directory has no complete checkpoint under checkpoints/")
        path = latest
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "model_optim")):
            if not is_complete(path):
                raise ValueError(f"ckpt={ckpt}: incomplete checkpoint (no {COMPLETE} marker)")
            return path, "dcp"
        if os.path.isdir(os.path.join(path, "deepspeed")):
            if not is_complete(path):
                raise ValueError(f"ckpt={ckpt}: incomplete checkpoint (no {COMPLETE} marker)")
            return path, "deepspeed"
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, "hf"
        raise ValueError(f"ckpt={ckpt}: not a run directory, a checkpoint, or a Hugging Face model directory")
    if path.startswith((".", "/", "~")):
        raise ValueError(f"ckpt={ckpt}: no such directory")
    return path, "hf"  # a hub id


def _empty_model(path: str, dtype: torch.dtype):
    """The checkpoint's architecture with fp32 storage allocated once (uninitialised; filled by the loader)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llama2_sft.model import reset_rotary_buffers

    config = AutoConfig.from_pretrained(path)
    config.use_cache = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    reset_rotary_buffers(model, torch.device("cpu"))
    return model


def _load_dcp(path: str, dtype: torch.dtype):
    import torch.distributed.checkpoint as dcp

    model = _empty_model(path, dtype)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(path, "model_optim"), no_dist=True)  # reads into model's tensors
    model.load_state_dict(state["model"])
    return model.to(dtype)


def _load_deepspeed(path: str, dtype: torch.dtype):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model = _empty_model(path, dtype)
    # lazy_mode: tensors are merged from the ZeRO shards one at a time as they are copied in.
    lazy = get_fp32_state_dict_from_zero_checkpoint(path, tag="deepspeed", lazy_mode=True)
    own = model.state_dict()
    missing = [key for key in own if key not in lazy]
    if missing:
        raise ValueError(f"{path}: DeepSpeed checkpoint lacks {missing[:5]}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(lazy[key].contiguous())
    return model.to(dtype)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on CUDA with bf16 support, else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: expected auto, bf16, fp16 or fp32")
    return table[dtype]


def resolve_device(device: str) -> torch.device:
    """auto -> cuda, else mps, else cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def load_model(ckpt: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Consolidate and load any checkpoint kind for inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kind = resolve_checkpoint(ckpt)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if kind == "dcp":
        model = _load_dcp(path, torch_dtype)
    elif kind == "deepspeed":
        model = _load_deepspeed(path, torch_dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except Exception as error:
            raise ValueError(f"ckpt={ckpt}: cannot load a model: {error}") from error
    model.config.use_cache = True
    model = model.to(torch_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    config_file = os.path.join(path, "config.yaml")
    train_config = OmegaConf.load(config_file) if os.path.isfile(config_file) else None
    return LoadedModel(model, tokenizer, train_config, path, kind)


def training_system_prompt(loaded: LoadedModel) -> str | None:
    """The system prompt training used for rows without one (Meta's default for plain HF models)."""
    from llama2_sft.data.sources import resolve_system_prompt

    if loaded.train_config is None:
        return resolve_system_prompt("meta")
    return resolve_system_prompt(OmegaConf.select(loaded.train_config, "dataset.default_system", default="meta"))


def system_prompt_setting(loaded: LoadedModel, setting: str | None) -> str | None:
    """An app's `system` setting -> text: 'default' = what training used; 'meta', 'none'/null or text as in training."""
    from llama2_sft.data.sources import resolve_system_prompt

    return training_system_prompt(loaded) if setting == "default" else resolve_system_prompt(setting)
