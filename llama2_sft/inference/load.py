"""Load any saved model for inference: one ready transformers model + tokenizer + the training config. Every consumer
(infer, export, serve) loads through here, so they all see exactly the weights training wrote.

Accepted `ckpt`: a training run directory (its latest complete checkpoint), one checkpoint directory (DCP shards
from single/DDP/FSDP, or DeepSpeed ZeRO shards, consolidated on the fly), or a Hugging Face model directory / hub id.
Consolidation streams into a model whose parameters are allocated once: never two full copies in memory.

A LoRA / QLoRA run's checkpoints hold only the trainable weights (adapters and `peft.modules_to_save`). Loading one
rebuilds the base it names (trainer_state.json "base", or the `base=` override), checks the base's architecture hash,
injects the adapters with the run's peft settings, loads the trained weights and merges them into the base in fp32:
consumers get a plain `LlamaForCausalLM`, and `LoadedModel.adapters` keeps the unmerged weights for format=peft.
A QLoRA run is merged into the NF4 round trip of the base (what its adapters were trained against).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from llama2_sft.checkpoint import COMPLETE, is_complete, latest_checkpoint
from llama2_sft.distributed import quiet_single_process

log = logging.getLogger(__name__)


# bitsandbytes' 4-bit block size as transformers' BitsAndBytesConfig uses it (QLoRA training loads through it).
NF4_BLOCKSIZE = 64
# The quantization state of a frozen 4-bit weight, which a QLoRA run's DCP checkpoint carries beside the adapters.
_QUANT_STATE = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$")


@dataclass
class AdapterState:
    """A LoRA / QLoRA checkpoint's own weights, unmerged, and what they adapt: format=peft writes them as they are,
    and `load_model` merges them into the base."""

    settings: Any  # the run's `peft` config section (method, r, alpha, dropout, target_modules, modules_to_save, ...)
    reference: dict  # trainer_state.json "base": the base it was trained on (name_or_path, revision, config_sha256)
    base: str  # the base used: the `base=` override, else reference["name_or_path"]
    revision: str | None  # the saved revision (None when `base=` names another model)
    trainable: dict[str, torch.Tensor]  # fp32; keys as in the injected model: `...q_proj.lora_A.default.weight`
    precision: str  # the run's compute precision (a QLoRA base was quantized from it)
    source: str  # the checkpoint directory


@dataclass
class LoadedModel:
    """A consolidated model in eval mode, its tokenizer, and what it was trained with (None for plain HF dirs)."""

    model: Any
    tokenizer: Any
    train_config: Any | None
    source: str  # the directory the weights came from
    kind: str  # dcp | deepspeed | hf, and +lora / +qlora for an adapter run merged into its base
    adapters: AdapterState | None = None  # a LoRA / QLoRA run's unmerged weights and base reference


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
    with quiet_single_process():
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


def load_model(ckpt: str, device: str = "auto", dtype: str = "auto", base: str | None = None) -> LoadedModel:
    """Consolidate and load any checkpoint kind for inference (`base` overrides the base a LoRA run names)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kind = resolve_checkpoint(ckpt)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    train_config = _train_config(path)
    method = adapter_method(train_config)
    adapters = None
    if method != "none":
        adapters = read_adapters(path, kind, train_config, base)
        model = merged_adapter_model(adapters).to(torch_dtype)
        kind = f"{kind}+{method}"
    elif base is not None:
        raise ValueError(f"base={base}: only a LoRA / QLoRA run has a base to override; ckpt={ckpt} is a full model "
                         f"({kind})")
    elif kind == "dcp":
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
    return LoadedModel(model, tokenizer, train_config, path, kind, adapters)


def _train_config(path: str):
    config_file = os.path.join(path, "config.yaml")
    return OmegaConf.load(config_file) if os.path.isfile(config_file) else None


def adapter_method(train_config: Any) -> str:
    """none | lora | qlora: how the checkpoint was trained (plain model dirs and older runs: none)."""
    if train_config is None:
        return "none"
    return str(OmegaConf.select(train_config, "peft.method", default="none"))


# ------------------------------------------------------------------------------------------- LoRA / QLoRA runs
def load_adapters(ckpt: str, base: str | None = None) -> AdapterState:
    """A LoRA / QLoRA run's unmerged weights without loading its base (what format=peft needs)."""
    path, kind = resolve_checkpoint(ckpt)
    train_config = _train_config(path)
    if adapter_method(train_config) == "none":
        raise ValueError(f"ckpt={ckpt}: not a LoRA / QLoRA run ({path} is a full model, kind {kind}): adapters "
                         "exist only for runs trained with peft=lora or peft=qlora; export a full model with format=hf")
    return read_adapters(path, kind, train_config, base)


def read_adapters(path: str, kind: str, train_config: Any, base: str | None = None) -> AdapterState:
    """The trainable weights of the adapter checkpoint `path` (kind dcp | deepspeed) and the base it names."""
    state_file = os.path.join(path, "trainer_state.json")
    with open(state_file, encoding="utf-8") as handle:
        reference = json.load(handle).get("base")
    if not reference:
        raise ValueError(f"{state_file}: no 'base' entry, so the base model this LoRA run adapts is unknown: pass "
                         "base=PATH (the model.name_or_path it was trained from)")
    saved_name = reference["name_or_path"]
    revision = reference.get("revision") if base in (None, saved_name) else None
    trainable = _trainable_dcp(path) if kind == "dcp" else _trainable_deepspeed(path)
    return AdapterState(settings=train_config.peft, reference=reference, base=str(base or saved_name),
                        revision=revision, trainable=trainable, precision=str(train_config.precision), source=path)


def _trainable_dcp(path: str) -> dict[str, torch.Tensor]:
    """The model tensors of the DCP checkpoint (saved with ignore_frozen_params: the trainable ones, and for QLoRA
    the frozen weights' 4-bit quantization state, which is left out: the base is quantized again from its source)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = os.path.join(path, "model_optim")
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    model = {key[len("model."):]: torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in metadata.items()
             if key.startswith("model.") and isinstance(entry, TensorStorageMetadata) and not _QUANT_STATE.search(key)}
    if not model:
        raise ValueError(f"{directory}: no model weights in this checkpoint")
    state = {"model": model}
    with quiet_single_process():
        dcp.load(state, checkpoint_id=directory, no_dist=True)  # reads only the keys asked for
    return {key: tensor.float() for key, tensor in state["model"].items()}


def _trainable_deepspeed(path: str) -> dict[str, torch.Tensor]:
    """The fp32 trainable weights of the ZeRO shards (saved with exclude_frozen_parameters: nothing else is there)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(path, tag="deepspeed")
    return {key: tensor.float().contiguous() for key, tensor in state.items()}


def merged_adapter_model(adapters: AdapterState):
    """The base with the run's adapters merged in (fp32, CPU): a plain LlamaForCausalLM with standard keys."""
    from llama2_sft.adapters import apply_adapters

    model = _base_model(adapters)
    if adapters.settings.method == "qlora":
        _nf4_round_trip(model, adapters.settings, _compute_dtype(adapters.precision))
    apply_adapters(model, adapters.settings, torch.float32)
    _load_trainable(model, adapters)
    _merge_lora_layers(model)
    return model


def _compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def _base_model(adapters: AdapterState):
    """The base a LoRA run names, in fp32 on the CPU, after checking that it is the architecture the run adapted."""
    from transformers import AutoModelForCausalLM

    from llama2_sft.grow import grow_model

    base_path, base_kind, config, growth = locate_grown_base(adapters)
    check_base(adapters, config)
    if base_kind in ("dcp", "deepspeed"):  # a run of this repo (itself possibly a LoRA run, merged recursively)
        model = load_model(base_path, device="cpu", dtype="fp32").model
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(base_path, revision=adapters.revision, dtype=torch.float32)
        except Exception as error:
            raise ValueError(f"{adapters.source}: cannot load the base model {adapters.base!r}: {error}; pass "
                             "base=PATH to load it from elsewhere") from error
    return grow_model(model, growth[0], growth[1]) if growth is not None else model


def _vocabulary_growth(adapters: AdapterState, base_path: str, config: Any) -> tuple[str, str, int] | None:
    """(base tokenizer.model, the run's tokenizer.model, its size) when the run's tokenizer has more pieces than the
    base's embeddings, i.e. when training grew the base (only possible from a base with a tokenizer.model)."""
    from llama2_sft.grow import local_sp_file, piece_count

    own = os.path.join(adapters.source, "tokenizer.model")
    base_sp = local_sp_file(base_path, adapters.revision)
    if not os.path.isfile(own) or base_sp is None:
        return None
    size = piece_count(own)
    return (base_sp, own, size) if size > int(config.vocab_size) else None


def locate_grown_base(adapters: AdapterState) -> tuple[str, str, Any, tuple[str, str, int] | None]:
    """`locate_base`, with the config grown to the run's vocabulary when training grew the base (llama2_sft.grow):
    the architecture the adapters were trained on. The last item is `_vocabulary_growth`'s (None: no growth)."""
    base_path, base_kind, config = locate_base(adapters)
    growth = _vocabulary_growth(adapters, base_path, config)
    if growth is not None:
        config.vocab_size = growth[2]
    return base_path, base_kind, config, growth


def locate_base(adapters: AdapterState) -> tuple[str, str, Any]:
    """(path, kind, transformers config) of the base a LoRA run adapts; a missing base fails naming it and `base=`."""
    from transformers import AutoConfig

    try:
        base_path, base_kind = resolve_checkpoint(adapters.base)
        return base_path, base_kind, AutoConfig.from_pretrained(base_path, revision=adapters.revision)
    except (ValueError, OSError) as error:
        raise ValueError(f"{adapters.source}: cannot load the base model {adapters.base!r} this LoRA run adapts "
                         f"({error}); pass base=PATH (a Hugging Face dir or hub id of that model, or the run it was "
                         "trained from) to load it from elsewhere") from error


def check_base(adapters: AdapterState, config: Any) -> None:
    """A base with another architecture than the one trained on fails, naming both (runtime fields do not count)."""
    from llama2_sft.adapters import BaseReference

    found = BaseReference(adapters.base, adapters.revision, config).state["config_sha256"]
    saved = adapters.reference.get("config_sha256")
    if saved and found != saved:
        raise ValueError(f"{adapters.source}: trained on base {adapters.reference['name_or_path']!r} (architecture "
                         f"sha256 {saved[:12]}), but base {adapters.base!r} has another architecture (sha256 "
                         f"{found[:12]}): pass base= the model this run was trained from")


def _nf4_round_trip(model: torch.nn.Module, settings: Any, dtype: torch.dtype) -> None:
    """Replace every weight a QLoRA run held in 4 bits by its NF4 round trip, in place: the base its adapters were
    trained against. Quantized as transformers' bitsandbytes load does: every linear layer but the LM head, from the
    compute dtype, blocks of 64, double quantization as configured."""
    import bitsandbytes.functional as bnb

    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                packed, state = bnb.quantize_4bit(module.weight.to(dtype).contiguous(), blocksize=NF4_BLOCKSIZE,
                                                  compress_statistics=bool(settings.double_quant),
                                                  quant_type=str(settings.quant_type))
                module.weight.copy_(bnb.dequantize_4bit(packed, state).float())


def _load_trainable(model: torch.nn.Module, adapters: AdapterState) -> None:
    """Copy the saved trainable weights into the injected model; they must be exactly its trainable parameters."""
    params = dict(model.named_parameters())
    expected = {name for name, param in params.items() if param.requires_grad}
    missing, unexpected = sorted(expected - adapters.trainable.keys()), sorted(adapters.trainable.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{adapters.source}: the saved trainable weights do not fit the run's peft settings: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in adapters.trainable.items():
            params[name].copy_(tensor)


def _merge_lora_layers(model: torch.nn.Module) -> None:
    """Fold each LoRA layer into its base linear (W + B @ A * alpha / r, peft's merge) and put the plain linear back
    in its place, so the state-dict keys are the stock Llama ones."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    vars(model).pop("peft_config", None)  # left by peft's injection; the merged model has no adapters
    model.requires_grad_(True)  # as any loaded model: apply_adapters froze the base


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
