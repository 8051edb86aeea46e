"""Config schemas: every key of the training config and its default, in one place (the yaml files under conf/ hold
only deltas from these). Registered in Hydra's ConfigStore and named in conf/train.yaml's defaults, so a misspelled
key, a mistyped value or a value outside an enumeration fails at compose time naming the key. `strategy` and
`optimizer` are `_target_` blocks (any signature): their yaml holds their values, and they are checked by binding
their keys to the target's signature (`validate`), at start and in a unit test."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Choice(str, Enum):
    """An enumerated setting. Members are strings equal to their value (and to their name, which is what
    `OmegaConf.to_yaml` writes), so code compares them with plain strings and json writes them as plain strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"  # compute dtype; master weights stay fp32


class Truncation(Choice):
    turns = "turns"  # drop trailing turns, else cut the first reply
    drop = "drop"  # skip samples longer than max_length


class Schedule(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OnNan(Choice):
    stop = "stop"  # end the run with an error naming the step
    skip = "skip"  # drop the update and go on


class BatchChange(Choice):
    refuse = "refuse"  # a resume that changes micro x accum x world (the global batch) fails, naming both
    allow = "allow"  # continue at the same sample position with the new global batch


class CrossEntropy(Choice):
    fused = "fused"  # LM head + CE in chunks: [tokens, vocab] logits never exist whole
    logits = "logits"  # the model returns logits, then CE


class CheckpointPolicy(Choice):
    full = "full"  # recompute whole decoder layers
    selective = "selective"  # keep matmul and attention outputs, recompute the cheap ops


class CompileScope(Choice):
    layers = "layers"  # each decoder layer on its own (works under FSDP2 / ZeRO-3 sharding hooks)
    decoder = "decoder"  # the whole decoder stack as one graph, training forward only (single / DDP): fuses more


class AttnImplementation(Choice):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class WandbMode(Choice):
    auto = "auto"  # online when logged in, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


class DataType(Choice):
    chat = "chat"  # ShareGPT rows -> llama-2-chat samples, the loss on the answers
    text = "text"  # plain documents -> BOS text EOS, the loss on every token (continued pretraining)


class TxtDocuments(Choice):
    """How a .txt file of a text source is cut into documents."""

    blank_lines = "blank_lines"  # one document per block of lines separated by blank lines (a file without one: one)
    file = "file"  # the whole file is one document


class MixStop(Choice):
    first_exhausted = "first_exhausted"  # the mix ends when a source has given its last sample (no sample twice)
    all_exhausted = "all_exhausted"  # it ends when every source has given all its samples (small ones repeat)


@dataclass
class MixSource:
    """One entry of dataset.sources."""

    source: Any = MISSING  # anything dataset.source takes
    weight: float = 1.0  # share of the mix's samples: weight / sum of weights
    name: Optional[str] = None  # in metrics (source_samples / source_supervised_tokens); null = the file's stem
    type: Optional[DataType] = None  # null = dataset.type


@dataclass
class DatasetConfig:
    source: Any = "???"  # hub id, file, glob, directory, saved dataset dir, or a list; each dataset file sets it
    eval_source: Any = None  # held-out rows from a separate source; else eval_fraction of `source`
    eval_fraction: float = 0.0
    split: str = "train"
    revision: Optional[str] = None  # hub revision (pin it for a reproducible cache key)
    default_system: Optional[str] = "meta"  # for rows with an empty instruction: 'meta' (Meta's default), 'none', or text
    max_length: int = 4096
    truncation: Truncation = Truncation.turns
    max_skipped_fraction: float = 0.01  # stop if more rows than this could not be trained
    packing: bool = False
    group_by_length: bool = False
    pad_to_multiple_of: int = 1
    num_proc: Optional[int] = None  # tokenization processes; null = all cores
    cache_dir: str = ".cache/tokenized"
    seed: int = 1234  # eval split, packing order and the mix's draws
    type: DataType = DataType.chat  # chat rows, or plain text for continued pretraining (dataset=text)
    text_field: str = "text"  # text: the field of .jsonl / .json / .parquet rows that holds a document
    txt_documents: TxtDocuments = TxtDocuments.blank_lines  # text: how .txt files are cut into documents
    sources: List[MixSource] = field(default_factory=list)  # a weighted mix, used instead of `source` when not empty
    mix_stop: MixStop = MixStop.first_exhausted  # when the mix of `sources` ends


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # a Llama checkpoint (path or hub id); null = random init from `arch`
    tokenizer: Optional[str] = None  # tokenizer dir / hub id; null = name_or_path
    revision: Optional[str] = None
    attn_implementation: AttnImplementation = AttnImplementation.sdpa  # flash_attention_2 when installed (CUDA)
    gradient_checkpointing: bool = False
    checkpoint_policy: CheckpointPolicy = CheckpointPolicy.full
    checkpoint_every_n_layers: int = 1  # checkpoint every n-th decoder layer (1 = all)
    compile: bool = False  # torch.compile the training forward (scope: compile_scope)
    compile_scope: CompileScope = CompileScope.layers
    compile_backend: str = "inductor"
    compile_fallback: bool = False  # true: where compile cannot run (no C++ compiler for inductor on CPU; scope=decoder
    # under FSDP2 / ZeRO-3 or peft) train eagerly with a warning instead of failing
    arch: Optional[dict] = None  # LlamaConfig fields for a random init (tiny presets); vocab from the tokenizer


@dataclass
class TrainerConfig:
    max_steps: int = -1  # -1 = epochs x steps per epoch
    epochs: float = 1.0
    micro_batch_size: int = 4  # per device (samples when padding, packed rows when packing)
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int = 5
    eval_steps: int = 0  # 0 = only at start and end
    eval_batch_size: int = 8
    eval_max_samples: int = 0  # 0 = the whole eval split
    log_steps: int = 1
    generate_samples: int = 4  # greedy answers logged at each eval (W&B table) and for the final accuracy
    accuracy_samples: int = 64  # held-out prompts scored by exact match at the end; 0 = skip
    max_new_tokens: int = 32
    on_nan: OnNan = OnNan.stop  # a step whose loss or gradient norm is NaN or infinite
    cross_entropy: CrossEntropy = CrossEntropy.fused
    ce_chunk_size: int = 2048  # positions per chunk of the fused cross-entropy
    peak_tflops: Optional[float] = None  # one device's peak dense TFLOP/s for MFU; null = known GPUs (H100/H200 989)
    stop_after_steps: int = 0  # end this process after N more steps with a checkpoint (time-limited jobs); 0 = off
    eval_tasks: list = field(default_factory=list)  # lm-eval tasks run on the final checkpoint (llama2_sft.evaluate)


@dataclass
class SchedulerConfig:
    name: Schedule = Schedule.cosine
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # used instead of warmup_ratio when > 0
    min_lr_ratio: float = 0.0


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "llama2_sft"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list = field(default_factory=list)
    mode: WandbMode = WandbMode.auto


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


class PeftMethod(Choice):
    none = "none"  # full fine-tune: every weight trains
    lora = "lora"  # frozen base (in the compute dtype) + trainable low-rank adapters (peft)
    qlora = "qlora"  # LoRA over a base quantized to 4-bit NF4 (bitsandbytes)


# Every linear layer of a Llama decoder layer.
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PeftConfig:
    method: PeftMethod = PeftMethod.none
    r: int = 8  # adapter rank
    alpha: float = 16.0  # the adapter's output is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (0: the step is deterministic)
    target_modules: list = field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))  # module names that get adapters
    modules_to_save: list = field(default_factory=list)  # modules trained fully, e.g. [embed_tokens, lm_head]
    quant_type: str = "nf4"  # qlora: bitsandbytes 4-bit type (nf4 | fp4)
    double_quant: bool = True  # qlora: quantize the quantization constants too


@dataclass
class TrainConfig:
    output_dir: str = "outputs/${experiment_name}"  # rerunning with the same output_dir resumes (resume=auto)
    seed: int = 42
    precision: Precision = Precision.fp32
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (no effect on CPU)
    resume: Any = "auto"  # auto (latest complete checkpoint in output_dir) | false | path to a checkpoint
    resume_batch_change: BatchChange = BatchChange.refuse  # may a resume change the global batch?
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    strategy: Any = None  # {_target_: llama2_sft.strategy...., ...}
    optimizer: Any = None  # {_target_: llama2_sft.optim.build_adamw, ...}
    experiment_name: str = "default"


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="peft", name="peft_schema", node=PeftConfig)


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"_target_ {path!r} cannot be imported: {error}") from error


def bind_target(node: DictConfig | dict, key: str, skip: tuple[str, ...] = ()) -> None:
    """Check that a `_target_` block's keys fit the target's signature, naming the bad key."""
    block = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if "_target_" not in block:
        raise ValueError(f"{key}: missing _target_")
    target = _import(block["_target_"])
    kwargs = {k: v for k, v in block.items() if not k.startswith("_")}
    signature = inspect.signature(target)
    for name in kwargs:
        if name not in signature.parameters and not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            raise ValueError(f"{key}.{name}: not a parameter of {block['_target_']} (accepts {list(signature.parameters)})")
    try:
        signature.bind_partial(**kwargs)
    except TypeError as error:
        raise ValueError(f"{key}: {error}") from error
    missing = [
        p.name for p in signature.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs and p.name not in skip
    ]
    if missing:
        raise ValueError(f"{key}: missing required keys {missing} for {block['_target_']}")


def _cannot_compile(cfg: DictConfig, problem: str) -> None:
    """Compiling as configured cannot run: fail naming the key, or (model.compile_fallback=true, the tiny preset's
    compile-where-possible) say so and train eagerly: the same math, slower."""
    if not cfg.model.compile_fallback:
        raise ValueError(problem)
    log.warning("%s; training eagerly (model.compile_fallback=true)", problem)
    cfg.model.compile = False


def validate(cfg: DictConfig) -> None:
    """Fail before any heavy work, naming the key: positive sizes, ranges, `_target_` signatures (the schema has
    already checked names, types and enumerations at compose time)."""
    for key in ("trainer.micro_batch_size", "trainer.grad_accum_steps", "dataset.max_length", "trainer.eval_batch_size",
                "trainer.ce_chunk_size", "model.checkpoint_every_n_layers"):
        if OmegaConf.select(cfg, key) < 1:
            raise ValueError(f"{key}={OmegaConf.select(cfg, key)} must be >= 1")
    if cfg.model.compile and cfg.model.compile_scope == "decoder":
        target = str(cfg.strategy._target_)
        unsupported = None
        if "FSDP" in target or "DeepSpeed" in target:
            unsupported = (f"with strategy._target_={target}: one graph over the whole decoder is for single-device "
                           "and DDP runs; sharded layers compile with model.compile_scope=layers")
        elif cfg.peft.method != "none":
            unsupported = f"with peft={cfg.peft.method}: adapter runs compile with model.compile_scope=layers"
        if unsupported:
            _cannot_compile(cfg, f"model.compile_scope=decoder {unsupported}")
    if cfg.dataset.sources:
        from llama2_sft.data.mixing import mix_entries

        mix_entries(cfg.dataset)  # weights, names, sources: each bad one named
    elif OmegaConf.is_missing(cfg.dataset, "source"):
        raise ValueError("dataset.source is not set: dataset.source=/path/to/rows.jsonl (a file, glob, directory, "
                         "saved dataset dir or hub id)")
    if cfg.trainer.max_steps < 1 and cfg.trainer.epochs <= 0:
        raise ValueError("trainer.max_steps or trainer.epochs must be positive")
    if not 0 <= cfg.dataset.eval_fraction < 1:
        raise ValueError(f"dataset.eval_fraction={cfg.dataset.eval_fraction} must be in [0, 1)")
    if cfg.model.name_or_path is None and not cfg.model.arch:
        raise ValueError("model.name_or_path is null and model.arch is empty: nothing to build a model from")
    if cfg.model.name_or_path is None and cfg.model.tokenizer is None:
        raise ValueError("model.tokenizer must be set for a random-init model (model.name_or_path is null)")
    bind_target(cfg.strategy, "strategy")
    bind_target(cfg.optimizer, "optimizer", skip=("params",))
    validate_peft(cfg)
    if "deepspeed" in str(cfg.strategy._target_).lower() and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"strategy._target_={cfg.strategy._target_} needs DeepSpeed, which is not installed: "
                         "pip install 'llama2_sft[deepspeed]' or choose strategy=fsdp")
    if list(cfg.trainer.eval_tasks) and importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"trainer.eval_tasks={list(cfg.trainer.eval_tasks)} needs lm-evaluation-harness, which is not "
                         "installed: pip install 'llama2_sft[eval]'")


def validate_peft(cfg: DictConfig) -> None:
    """LoRA / QLoRA settings and the combinations they cannot run in, named before any weights load."""
    peft = cfg.peft
    if peft.method == "none":
        return
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"peft.method={peft.method} needs the peft library: pip install peft")
    if peft.r < 1:
        raise ValueError(f"peft.r={peft.r} must be >= 1")
    if not 0 <= peft.dropout < 1:
        raise ValueError(f"peft.dropout={peft.dropout} must be in [0, 1)")
    if not peft.target_modules:
        raise ValueError("peft.target_modules is empty: name the linear layers that get adapters, e.g. [q_proj, v_proj]")
    if peft.method == "qlora":
        target = str(cfg.strategy._target_)
        if "FSDP" in target or "DeepSpeed" in target:
            raise ValueError(f"peft=qlora with strategy._target_={target}: 4-bit NF4 weights are not sharded or "
                             "partitioned here; use strategy=single or ddp (a QLoRA 7B fits one GPU), or peft=lora")
        if cfg.model.name_or_path is None:
            raise ValueError("peft=qlora quantizes a trained base: set model.name_or_path (a random init has nothing "
                             "worth quantizing)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("peft=qlora needs bitsandbytes: pip install 'llama2_sft[qlora]'")


def preflight(cfg: DictConfig, device: Any) -> None:
    """Checks that need the model's config or the device, still before any heavy work (naming the keys)."""
    import torch

    if cfg.precision == "bf16" and getattr(device, "type", "cpu") == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support: use precision=fp32")
    device_type = getattr(device, "type", "cpu")
    if cfg.model.attn_implementation == "flash_attention_2":
        if device_type != "cuda":
            raise ValueError(f"model.attn_implementation=flash_attention_2 needs a CUDA device (this run is on {device_type}): "
                             "use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation=flash_attention_2 but flash_attn is not installed: "
                             "pip install flash-attn --no-build-isolation, or use sdpa")
    if cfg.model.compile and cfg.model.compile_backend == "inductor" and device_type == "cpu":
        import shutil

        if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            _cannot_compile(cfg, "model.compile=true with the inductor backend on CPU needs a C++ compiler, and there is "
                                 "no C++ compiler on PATH: install g++ or clang++, set model.compile_backend=aot_eager, "
                                 "or model.compile=false")
    if cfg.model.name_or_path:
        from transformers import AutoConfig

        from llama2_sft.model import base_source

        path, kind = base_source(cfg.model)
        if kind != "hf" and _is_within(cfg.output_dir, str(cfg.model.name_or_path)):
            raise ValueError(f"output_dir={cfg.output_dir} is the run model.name_or_path={cfg.model.name_or_path} "
                             "starts from: its checkpoints would be taken for this run's; set another output_dir "
                             "(e.g. output_dir=outputs/embedded_lora)")
        try:
            positions = AutoConfig.from_pretrained(path, revision=cfg.model.revision).max_position_embeddings
        except Exception as error:  # noqa: BLE001 - the message names the key and the cause
            raise ValueError(f"model.name_or_path={cfg.model.name_or_path!r}: cannot read its config: {error}") from error
        check_growth(cfg)
    else:
        positions = cfg.model.arch.get("max_position_embeddings", 2048)
    if cfg.dataset.max_length > positions:
        raise ValueError(f"dataset.max_length={cfg.dataset.max_length} exceeds the model's max_position_embeddings={positions}")


def check_growth(cfg: DictConfig) -> None:
    """model.tokenizer against the checkpoint's own tokenizer (llama2_sft.grow.vocab_plan), and what a growing
    vocabulary needs (LoRA: the new rows trained fully), named before any weights load. Every strategy grows (FSDP2:
    rank 0 grows the full model; ZeRO-3: the partitioned embedding and head only, llama2_sft.grow)."""
    from llama2_sft.grow import vocab_plan

    plan = vocab_plan(cfg.model)
    if plan is None or not plan.grows:
        return
    grows = (f"model.tokenizer={cfg.model.tokenizer} has {plan.size} pieces, more than the {plan.embeddings} "
             f"embeddings of model.name_or_path={cfg.model.name_or_path}: the model grows")
    if cfg.peft.method != "none":
        missing = [name for name in ("embed_tokens", "lm_head") if name not in list(cfg.peft.modules_to_save)]
        if missing:
            raise ValueError(f"{grows}, and its new rows must be trained fully: add {missing} to "
                             f"peft.modules_to_save (e.g. peft.modules_to_save=[embed_tokens,lm_head])")


def _is_within(output_dir: str, base: str) -> bool:
    """Whether `output_dir` is the base run's directory or holds it (a resume there would find the base's checkpoints)."""
    out, base = os.path.realpath(output_dir), os.path.realpath(base)
    return base == out or base.startswith(out + os.sep)


# ----------------------------------------------------------------------------------------------------------------------
# The consumer apps: `infer.py`, `python -m llama2_sft.serve`, `python -m llama2_sft.serve.demo`,
# `python -m llama2_sft.export`. Each is a Hydra app whose yaml (conf/<app>.yaml) names its schema below, so a
# misspelled key or a value outside an Enum fails at compose time naming it. The defaults live here, once.

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


class Device(Choice):
    """Where a loaded model runs; auto = CUDA, else MPS, else CPU (pick a GPU with CUDA_VISIBLE_DEVICES)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Dtype(Choice):
    """The dtype a model is loaded in for inference; auto = bf16 on a CUDA device that has it, else fp32."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class ExportFormat(Choice):
    hf = "hf"  # a Hugging Face directory (safetensors + tokenizer + chat template)
    gguf = "gguf"  # one GGUF file for llama.cpp
    peft = "peft"  # a LoRA / QLoRA run's adapters as a stock PEFT adapter dir (adapter_config.json + safetensors)


class ExportDtype(Choice):
    """The dtype of the exported safetensors (format=hf)."""

    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class GgufQuant(Choice):
    """The storage of the GGUF tensors (format=gguf)."""

    f16 = "f16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"


@dataclass
class InferConfig:
    """python infer.py ckpt=PATH [prompt="..."] [input=in.jsonl output=out.jsonl]"""

    ckpt: str = MISSING  # a training run dir (its latest complete checkpoint), one checkpoint, or an HF dir / hub id
    prompt: Optional[str] = None  # answer once (streamed); null and no input = interactive chat
    input: Optional[str] = None  # batch mode: jsonl, one {"messages": [...]} (or {"prompt": "..."}) per line
    output: Optional[str] = None  # batch mode answers: each input line + {"response": ...}
    system: Optional[str] = "default"  # default = the system prompt training used; meta; none; or your text
    batch_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int = 0
    base: Optional[str] = None  # a LoRA / QLoRA run's base model; null = the one it was trained from (trainer_state.json)
    device: Device = Device.auto
    dtype: Dtype = Dtype.auto


@dataclass
class ServeConfig:
    """python -m llama2_sft.serve ckpt=PATH [port=8000] [host=127.0.0.1] [api_key=KEY]"""

    ckpt: str = MISSING
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines
    port: int = 8000
    api_key: Optional[str] = "${oc.env:LLAMA2_SFT_API_KEY,null}"  # required on every route but /health when set
    max_queue: int = 8  # requests admitted (waiting or running); one more gets 429
    max_new_tokens_limit: int = 2048  # the most new tokens one request may ask for
    system: Optional[str] = "default"  # for requests without a system message: default (training's), meta, none, text
    base: Optional[str] = None  # a LoRA / QLoRA run's base model; null = the one it was trained from (trainer_state.json)
    device: Device = Device.auto
    dtype: Dtype = Dtype.auto


@dataclass
class DemoConfig:
    """python -m llama2_sft.serve.demo ckpt=PATH [port=7860] [host=127.0.0.1] [share=false]"""

    ckpt: str = MISSING
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False  # a public gradio.live link
    system: Optional[str] = "default"  # the system prompt box's first value: default (training's), meta, none, text
    base: Optional[str] = None  # a LoRA / QLoRA run's base model; null = the one it was trained from (trainer_state.json)
    device: Device = Device.auto
    dtype: Dtype = Dtype.auto


@dataclass
class ExportConfig:
    """python -m llama2_sft.export ckpt=PATH format=hf|gguf|peft out=PATH [dtype=bf16] [quant=f16] [base=PATH]"""

    ckpt: str = MISSING
    out: str = MISSING  # a directory (hf, peft) or a file (gguf)
    format: ExportFormat = ExportFormat.hf  # hf / gguf of a LoRA run: merged into its base; peft: its adapters alone
    dtype: ExportDtype = ExportDtype.bf16  # format=hf (format=peft keeps the adapters' fp32)
    quant: GgufQuant = GgufQuant.f16  # format=gguf
    base: Optional[str] = None  # a LoRA / QLoRA run's base model; null = the one it was trained from (trainer_state.json)
    device: Device = Device.cpu  # where the checkpoint is consolidated


@dataclass
class EvaluateConfig:
    """python -m llama2_sft.evaluate ckpt=PATH tasks=ceval-valid,cmmlu,mmlu [num_fewshot=5] [limit=100] [out=DIR]"""

    ckpt: str = MISSING  # as infer.py: a run, a checkpoint of any strategy, a LoRA run, or an HF dir / hub id
    tasks: Any = "embedded_heldout,embedded_choice"  # lm-eval task or group names: a comma-separated string or a list
    num_fewshot: Optional[int] = None  # null = each task's own default
    limit: Optional[float] = None  # documents per task (< 1: a fraction); null = all
    batch_size: int = 8
    chat_template: bool = True  # true: prompts built by encode_dialog (llama-2-chat); false: plain text, as lm-eval's hf
    system: Optional[str] = "default"  # chat_template=true: default (training's), meta, none, or text
    include_path: Optional[str] = None  # a folder of your own task YAMLs (the bundled data/eval_tasks always is)
    out: Optional[str] = None  # results folder; null = <ckpt>/eval (a run or checkpoint) or ./eval_results
    seed: int = 1234
    base: Optional[str] = None  # a LoRA / QLoRA run's base model; null = the one it was trained from (trainer_state.json)
    device: Device = Device.auto
    dtype: Dtype = Dtype.auto


class Normalization(Choice):
    """SentencePiece's normalization rule for training the Chinese model (the merged model keeps the base's)."""

    nfkc = "nfkc"
    nmt_nfkc = "nmt_nfkc"
    nfkc_cf = "nfkc_cf"
    nmt_nfkc_cf = "nmt_nfkc_cf"
    identity = "identity"


@dataclass
class VocabConfig:
    """python -m llama2_sft.vocab base=DIR corpus=[FILE_OR_GLOB,...] vocab_size=N out=DIR"""

    base: str = MISSING  # a tokenizer or model dir holding the SentencePiece tokenizer.model to extend (Llama-2's)
    corpus: Any = MISSING  # files, globs or folders: .txt lines; .jsonl/.json/.parquet rows with `text` or chat rows
    out: str = MISSING  # the extended tokenizer dir (tokenizer.model + Hugging Face files) and report.json
    vocab_size: int = 20000  # pieces of the Chinese SentencePiece model (Chinese-LLaMA's 20,000)
    character_coverage: float = 0.9995  # of the corpus's characters; the rarest rest stay byte pieces
    normalization: Normalization = Normalization.nfkc
    heldout_fraction: float = 0.05  # of the corpus lines, kept out of training for the tokens-per-character report
    pad_to_multiple_of: int = 64  # pad the vocabulary with pieces encoding never emits; 0 or 1 = no padding
    english: Any = None  # English text files for the report (rows without Chinese); null = data/eval.jsonl
    drop_unreachable: bool = True  # drop new pieces that BPE can never emit (else keep and report them)
    input_sentence_size: int = 0  # corpus lines the trainer samples; 0 = all
    num_threads: int = 8  # trainer threads; the trained pieces depend on it
    seed: int = 0


APP_SCHEMAS = {"infer": InferConfig, "serve": ServeConfig, "demo": DemoConfig, "export": ExportConfig,
               "evaluate": EvaluateConfig, "vocab": VocabConfig}


def register_app_configs() -> None:
    """Put the apps' schemas into Hydra's ConfigStore as `<app>_schema` (idempotent)."""
    store = ConfigStore.instance()
    for app, schema in APP_SCHEMAS.items():
        store.store(name=f"{app}_schema", node=schema)


FREE_TEXT_KEYS = {"infer": ("prompt", "system"), "serve": ("system",), "demo": ("system",), "evaluate": ("system", "tasks")}


def free_text_argv(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """`argv` with each `KEY=TEXT` of a free-text key rewritten so that TEXT reaches the app exactly as typed.

    Hydra's override grammar rejects unquoted non-ASCII text (`prompt=你好`), splits on spaces and commas, reads
    `[...]` as lists and `${...}` as interpolations. A value wholly inside one pair of quotes that Hydra parses
    (`'prompt="3 加 4 等于几？"'`, the documented older form) is left to Hydra; any other value becomes a single-quoted
    Hydra string whose quotes, backslashes and `${` are escaped, which Hydra and OmegaConf turn back into TEXT."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = [argv[0]] if argv else []
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and not _hydra_quoted(parser, arg, value):
            arg = f"{key}={hydra_quote(value)}"
        out.append(arg)
    return out


def _hydra_quoted(parser: Any, arg: str, value: str) -> bool:
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return False
    try:
        parser.parse_override(arg)
    except Exception:  # noqa: BLE001 - Hydra's grammar errors: then the value is text, not a Hydra string
        return False
    return True


def hydra_quote(text: str) -> str:
    """A single-quoted Hydra override value that Hydra and OmegaConf read back as exactly `text`."""
    import re

    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)  # backslashes before a quote, the quote
    escaped = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", escaped)  # ... before an interpolation
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)  # ... before the closing quote
    return f"'{escaped}'"
