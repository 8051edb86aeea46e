"""Model and tokenizer: load a Llama checkpoint or build a random one in the training dtype, and the training-time
transforms (fused cross-entropy head, activation checkpointing, torch.compile) that `trainer`/`model` switch on."""

from __future__ import annotations

import logging
from typing import Any

import torch

from llama2_sft.loss import install_fused_head

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def base_source(model_cfg: Any) -> tuple[str | None, str]:
    """(path, kind) of `model.name_or_path`: a Hugging Face dir or hub id (kind `hf`), or a run / checkpoint dir of
    this repo (kind `dcp` / `deepspeed`, a run dir resolved to its latest complete checkpoint), so that a run can
    start from another run's weights (SFT after continued pretraining, LoRA on a base trained here)."""
    if not model_cfg.name_or_path:
        return None, "none"
    from llama2_sft.inference.load import resolve_checkpoint

    try:
        return resolve_checkpoint(str(model_cfg.name_or_path))
    except ValueError as error:
        raise ValueError(f"model.name_or_path: {error}") from error


def tokenizer_path(model_cfg: Any) -> str:
    """Where the tokenizer comes from: model.tokenizer, else the model's own path / hub id (a run's checkpoint dir
    holds the tokenizer it trained with)."""
    path = model_cfg.tokenizer or base_source(model_cfg)[0]
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

    path, _ = base_source(model_cfg)
    if path:
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision)
    else:
        arch = dict(model_cfg.arch)
        arch.setdefault("vocab_size", len(tokenizer))
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **arch)
    config.use_cache = False  # training: packed sequences are only isolated with the KV cache off
    config._attn_implementation = str(model_cfg.attn_implementation)
    config.dtype = dtype
    return config


def build_model(model_cfg: Any, tokenizer: Any, precision: str, device: torch.device | str = "cpu", seed: int = 0,
                peft_cfg: Any = None, compute_precision: str | None = None):
    """Load the checkpoint (or random-init from `arch` with `seed`) on `device`, its trained weights in `precision`.

    With adapters (`peft_cfg`, llama2_sft.adapters) the frozen base is kept in `compute_precision` (4-bit NF4 for
    QLoRA) and only the adapters and `modules_to_save` are in `precision`."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from llama2_sft.adapters import apply_adapters, keep_4bit_weights_differentiable, quantization_config, uses_adapters
    from llama2_sft.grow import grow_if_planned, vocab_plan

    adapters = uses_adapters(peft_cfg)
    dtype = DTYPES[compute_precision or precision] if adapters else DTYPES[precision]
    config = model_config(model_cfg, tokenizer, dtype)
    quantization = quantization_config(peft_cfg, dtype)
    path, kind = base_source(model_cfg)
    if kind in ("dcp", "deepspeed"):
        model = _load_trained_run(path, model_cfg, config, dtype, quantization)
    elif path:
        kwargs = {"quantization_config": quantization, "device_map": {"": str(device)}} if quantization else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, revision=model_cfg.revision,
                attn_implementation=str(model_cfg.attn_implementation), **kwargs,
            )
        except Exception as error:
            raise ValueError(f"model.name_or_path: cannot load {model_cfg.name_or_path!r}: {error}") from error
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(dtype)
    grow_if_planned(model, vocab_plan(model_cfg))  # an extended model.tokenizer: new rows (llama2_sft.grow)
    model.config.use_cache = False
    if quantization is None:
        model = model.to(device)
    else:
        keep_4bit_weights_differentiable(model)
    if adapters:
        with torch.random.fork_rng(devices=[]):  # adapter init: the same on every rank and for every strategy
            torch.manual_seed(seed + 1)
            apply_adapters(model, peft_cfg, DTYPES[precision])
    return model


def _load_trained_run(path: str, model_cfg: Any, config: Any, dtype: torch.dtype, quantization: Any):
    """A checkpoint of this repo as the base: consolidated in fp32 as every consumer loads it, then in `dtype`."""
    from llama2_sft.inference.load import load_model

    if quantization is not None:
        raise ValueError(f"peft=qlora quantizes a Hugging Face checkpoint; model.name_or_path={model_cfg.name_or_path} "
                         "is a run of this repo: export it first (python -m llama2_sft.export ckpt=RUN format=hf "
                         "out=DIR dtype=bf16) and pass model.name_or_path=DIR")
    model = load_model(path, device="cpu", dtype="fp32").model.to(dtype)
    model.set_attn_implementation(str(model_cfg.attn_implementation))
    model.config.dtype = dtype
    return model


def build_meta_model(model_cfg: Any, tokenizer: Any, precision: str, peft_cfg: Any = None,
                     compute_precision: str | None = None):
    """The same architecture (adapters included) with no storage, for ranks that receive their weights."""
    from transformers import AutoModelForCausalLM

    from llama2_sft.adapters import apply_adapters, uses_adapters
    from llama2_sft.grow import vocab_plan

    adapters = uses_adapters(peft_cfg)
    dtype = DTYPES[compute_precision or precision] if adapters else DTYPES[precision]
    config = model_config(model_cfg, tokenizer, dtype)
    plan = vocab_plan(model_cfg)
    if plan is not None and plan.grows:  # the shape rank 0's grown model has (build_model)
        config.vocab_size = plan.size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=str(model_cfg.attn_implementation))
        if adapters:
            apply_adapters(model, peft_cfg, DTYPES[precision])
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


def enable_activation_checkpointing(model: torch.nn.Module, policy: str = "full", every_n_layers: int = 1) -> None:
    """Recompute decoder-layer activations in backward (non-reentrant: works with FSDP2, ZeRO-3 and compile).

    policy `full` recomputes whole layers; `selective` keeps the outputs of the matmuls and of attention and
    recomputes only the cheap ops between them (norms, rotary, SiLU, residual adds): most of the memory saving
    at a fraction of the recompute. `every_n_layers` checkpoints every n-th layer only."""
    kwargs: dict = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = selective_checkpoint_context
    elif policy != "full":
        raise ValueError(f"model.checkpoint_policy={policy!r}: expected full or selective")
    if every_n_layers < 1:
        raise ValueError(f"model.checkpoint_every_n_layers={every_n_layers}: expected >= 1")
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5.x API
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # earlier 5.x releases
    for index, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = index % every_n_layers == 0


def _saved_ops() -> set:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward")
    return {getattr(aten, name).default for name in names if hasattr(aten, name)}


def selective_checkpoint_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(_ctx, op, *_args, **_kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor") -> None:
    """`torch.compile` each decoder layer in place (parameter names and checkpoints unchanged). All layers share
    one compiled graph: parameters are graph inputs."""
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    for layer in decoder_layers(model):
        layer.compile(backend=backend)


def compile_decoder_for_training(model: torch.nn.Module, backend: str = "inductor") -> None:
    """`torch.compile` the whole decoder stack (embeddings, every layer, the final norm) as one graph, so the
    elementwise work between the matmuls (norms, rotary, SiLU, residual adds) fuses across layers too. Only the
    training forward (module in train mode, gradients on) takes the compiled graph; evaluation and generation, whose
    shapes change with every prompt and KV-cache length, stay eager. Single device and DDP: FSDP2 / ZeRO-3 wrap the
    layers in sharding hooks, compile them with compile_scope=layers."""
    decoder = model.get_decoder()
    eager = decoder.forward
    compiled = torch.compile(eager, backend=backend)

    def forward(*args, **kwargs):
        if decoder.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    decoder.forward = forward


def prepare_for_training(model: torch.nn.Module, model_cfg: Any, trainer_cfg: Any) -> torch.nn.Module:
    """The training-time transforms, in the order that composes (before any strategy wraps the model):
    fused LM head + cross-entropy, activation checkpointing, torch.compile of the decoder layers."""
    if trainer_cfg.cross_entropy == "fused":
        install_fused_head(model, trainer_cfg.ce_chunk_size)
    if model_cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, model_cfg.checkpoint_policy, model_cfg.checkpoint_every_n_layers)
    if model_cfg.compile and model_cfg.compile_scope == "decoder":
        compile_decoder_for_training(model, model_cfg.compile_backend)
    elif model_cfg.compile:
        compile_decoder_layers(model, model_cfg.compile_backend)
    return model
