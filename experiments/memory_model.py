"""Peak training memory per device, from the model's shape and the run's settings, counted the way this package trains.

    from memory_model import LLAMA2_7B, Run, estimate
    estimate(LLAMA2_7B, Run(method="lora", micro_batch_size=4, seq_len=4096)).peak_gib

What is counted (bytes; T = micro_batch_size x seq_len positions, N = the supervised ones, V x H the LM head):

* weights as each strategy stores them: `strategy=single` keeps fp32 weights and computes in bf16 under autocast; a
  LoRA / QLoRA base is frozen in the compute dtype (QLoRA: decoder linear weights in 4-bit NF4, 0.5 byte per weight
  plus one absmax per 64-weight block, itself 8-bit with double quantisation; embeddings, head and norms stay in the
  compute dtype), adapters in fp32; FSDP shards fp32 weights over `world_size` and all-gathers bf16 copies of the
  root (embeddings, head) and of two decoder layers (the current one and the prefetched next);
* gradients of the trainable weights in their dtype, AdamW's two fp32 moments per trainable weight (sharded by FSDP);
* autocast's bf16 copies of fp32 weights, cached for the whole forward (`strategy=single precision=bf16`);
* activations with full activation checkpointing: each decoder layer's input (L x T x H), plus one layer recomputed
  in the backward with everything its ops save for their gradients (counted op by op from the transformers Llama
  layer: RMSNorm fp32 upcasts, the inputs each linear or adapter keeps, rotated q / k, v, the sdpa output, SiLU and
  the gated product; no S x S matrix: flash / memory-efficient attention), plus the backward's transient gradients;
* the fused cross-entropy (`trainer.cross_entropy=fused`): the supervised hidden states, their precomputed gradient,
  a `ce_chunk_size` x V fp32 logits chunk, and the head's fp32 gradient when the head trains;
* a fixed overhead on a GPU (CUDA context, cuBLAS and NCCL workspaces: not in `torch.cuda.max_memory_allocated`);
* FSDP with gradient accumulation: the micro-batches that do not sync keep every weight's unsharded gradient in the
  reduce dtype (fp32) until the last one reduce-scatters them;
* FSDP CPU offload (`strategy.cpu_offload=true`): the fp32 weight shards, their gradients and AdamW's moments live in
  host memory (`Estimate.host`; the optimizer steps on the CPU); the device keeps the gathered compute-dtype copies,
  the fp32 shards of the two layers being copied in for their all-gather, the activations and the gradients on
  their way out.

The peak is the largest of four moments of a steady-state step (optimizer state present): the end of the forward (all
checkpoints, the loss's buffers), the first and the last recomputed layer of the backward (gradients grow as the
checkpoints are consumed: full fine-tuning peaks at the last layer, LoRA at the first) and the end of the backward
(every gradient present). Not counted:
allocator fragmentation and caching, the data loader, the CUDA graphs / compile caches, DeepSpeed.
`experiments/bench_lora.py` checks the estimate against measured peaks on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit block size)
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level fp32 constant
GPU_OVERHEAD_BYTES = 1 * GIB  # CUDA context + library workspaces, outside torch's allocator


@dataclass(frozen=True)
class Shape:
    """A Llama's dimensions (the fields of its transformers config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False

    @classmethod
    def of(cls, config: Any) -> "Shape":
        """From a transformers config or a dict with its keys (`model.arch`)."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = get("num_attention_heads")
        return cls(get("vocab_size"), get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), heads,
                   get("num_key_value_heads") or heads, bool(get("tie_word_embeddings", False)))

    @property
    def kv_width(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_width
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden_size  # + two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def root_params(self) -> int:
        """Weights outside the decoder layers: embeddings, final norm, LM head."""
        return self.embed_params + self.hidden_size + self.head_params

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.root_params

    def lora_params(self, r: int, targets: tuple[str, ...] = LINEAR_MODULES) -> int:
        """Adapter weights: r x (in + out) per targeted linear layer (A: r x in, B: out x r)."""
        return self.num_layers * sum(r * (a + b) for name, (a, b) in self.linear_shapes().items() if name in targets)


LLAMA2_7B = Shape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                  num_kv_heads=32)


@dataclass(frozen=True)
class Run:
    """The settings a step's memory depends on (names follow the training config)."""

    method: str = "none"  # peft.method: none | lora | qlora
    precision: str = "bf16"  # fp32 | bf16
    strategy: str = "single"  # single | fsdp (ddp: as single, plus its gradient buckets, not modelled)
    world_size: int = 1  # FSDP shards over this many devices
    offload: bool = False  # FSDP CPU offload: weight shards, gradients and optimizer state in host memory
    micro_batch_size: int = 4
    seq_len: int = 4096  # positions per row (the longest sample of a padded micro-batch, or the packed row length)
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = True
    supervised_fraction: float = 1.0  # share of positions with a target (the fused head only sees those)
    ce_chunk_size: int = 2048
    lora_r: int = 8
    lora_targets: tuple[str, ...] = LINEAR_MODULES
    double_quant: bool = True
    device: str = "cuda"  # cuda: + GPU_OVERHEAD_BYTES; cpu: nothing fixed (the CPU check subtracts a baseline)

    def __post_init__(self) -> None:
        if self.method not in ("none", "lora", "qlora"):
            raise ValueError(f"method={self.method!r}: expected none, lora or qlora")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: expected fp32 or bf16")
        if self.strategy not in ("single", "fsdp"):
            raise ValueError(f"strategy={self.strategy!r}: expected single or fsdp")
        if self.offload and self.strategy != "fsdp":
            raise ValueError("offload models FSDP's CPU offload: strategy='fsdp'")
        if self.method == "qlora" and self.strategy == "fsdp":
            raise ValueError("qlora runs on strategy=single or ddp only (as llama2_sft.config.validate_peft)")


@dataclass
class Estimate:
    """Bytes per component, the three moments of a step, and the peak."""

    shape: Shape
    run: Run
    trainable_params: int
    components: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)  # bytes in host memory per device's process (offload)

    @property
    def host_gib(self) -> float:
        """Host memory this device's process holds in a steady step (offloaded state; not the loading peak)."""
        return sum(self.host.values()) / GIB

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def gib(self) -> dict[str, float]:
        """Every component and phase in GiB."""
        return {key: value / GIB for key, value in {**self.components, **self.phases}.items()}


def nf4_bytes(params: int, double_quant: bool = True) -> float:
    """Storage of `params` weights in bitsandbytes NF4: 4 bits each, an absmax per 64-weight block (fp32; or 8-bit
    plus one fp32 constant per 256 blocks with double quantisation)."""
    blocks = math.ceil(params / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) if double_quant else 4 * blocks
    return params / 2 + constants


def _dtypes(run: Run) -> tuple[int, int, bool, int]:
    """(residual-stream bytes, compute bytes, autocast on, adapter bytes as the adapters compute)."""
    compute = 2 if run.precision == "bf16" else 4
    autocast = run.strategy == "single" and run.precision == "bf16"
    if run.strategy == "fsdp":
        residual = compute  # weights all-gathered in the compute dtype: the embedding output is bf16
    elif run.method == "none":
        residual = 4  # fp32 weights (bf16 only inside autocast's matmuls)
    else:
        residual = compute  # a LoRA / QLoRA base is stored in the compute dtype
    adapter = compute if run.strategy == "fsdp" else 4
    return residual, compute, autocast, adapter


def layer_saved_bytes_per_token(shape: Shape, run: Run) -> float:
    """What one decoder layer's ops keep for their backward, per position (its input not included)."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_width
    residual, compute, autocast, adapter = _dtypes(run)
    full = run.method == "none"

    def linear_inputs(modules: tuple[str, ...], width: int, dtype: int) -> float:
        """The inputs a group of linear layers reading the same tensor keep."""
        if full:  # trained weights keep their input; autocast casts it once per layer when it is not bf16 yet
            return len(modules) * width * compute if autocast and dtype != compute else width * dtype
        targeted = [m for m in modules if m in run.lora_targets]  # a frozen base keeps nothing (bnb 4-bit neither)
        if not targeted:
            return 0
        if run.method == "lora" and adapter != dtype:  # peft casts to the adapters' fp32, autocast back: a copy each
            return len(targeted) * width * (compute if autocast else adapter)
        return width * dtype  # one shared tensor

    norm_input = 4 * h if residual != 4 or not run.gradient_checkpointing else 0  # fp32 upcast (else: the checkpoint)
    norm_output = residual * h if full else 0  # x / rms, kept when the norm's weight trains
    saved = norm_input + norm_output + linear_inputs(("q_proj", "k_proj", "v_proj"), h, residual)
    saved += (2 * h + 2 * kv) * compute  # rotated q, rotated k, v, attention output (sdpa: no S x S matrix)
    saved += linear_inputs(("o_proj",), h, compute)
    saved += 4 * h + norm_output  # post-attention norm: its fp32 input, x / rms
    saved += linear_inputs(("gate_proj", "up_proj"), h, residual)
    saved += 3 * i * compute  # gate (SiLU's input), SiLU output, up (the product's inputs)
    saved += linear_inputs(("down_proj",), i, compute)
    return saved


def estimate(shape: Shape, run: Run) -> Estimate:
    """Peak memory of one device for a steady-state training step of `shape` under `run`."""
    residual, compute, autocast, adapter = _dtypes(run)
    tokens = run.micro_batch_size * run.seq_len
    supervised = math.ceil(tokens * run.supervised_fraction)
    chunk = min(run.ce_chunk_size, supervised)
    vh, h, i = shape.vocab_size * shape.hidden_size, shape.hidden_size, shape.intermediate_size
    fsdp = run.strategy == "fsdp"
    shards = run.world_size if fsdp else 1
    full = run.method == "none"
    adapters = 0 if full else shape.lora_params(run.lora_r, run.lora_targets)
    trainable = shape.num_params if full else adapters
    layer_trainable = shape.layer_params if full else adapters / shape.num_layers
    head_trains = full and shape.head_params > 0
    accumulating = run.grad_accum_steps > 1

    # --- weights, gradients, optimizer --------------------------------------------------------------------------
    linear = shape.num_layers * shape.layer_linear_params
    if full:
        weights = 4 * shape.num_params / shards  # fp32 master weights are the model's weights
    elif run.method == "qlora":
        weights = nf4_bytes(linear, run.double_quant) + compute * (shape.num_params - linear) + 4 * adapters
    else:  # a frozen base in the compute dtype, fp32 adapters
        weights = (compute * shape.num_params + 4 * adapters) / shards
    c = {"weights": weights}
    if fsdp:  # copies in the compute dtype: the root stays gathered (the backward starts with it), + 2 layers
        c["gathered weights"] = compute * (shape.root_params + 2 * (shape.layer_params + adapters / shape.num_layers))
    c["gradients"] = 4 * trainable / shards
    c["optimizer"] = 8 * trainable / shards  # AdamW exp_avg + exp_avg_sq, fp32
    host = {}
    if run.offload:  # FSDP's CPUOffloadPolicy: all three live on the host, the device keeps none of them
        host = {"weights": c.pop("weights"), "gradients": c["gradients"], "optimizer": c.pop("optimizer")}
        c["weights"], c["optimizer"] = 0, 0
        c["gradients"] = 0
        c["offload staging"] = 2 * 4 * (shape.layer_params if full else adapters / shape.num_layers) / shards
    if autocast:  # bf16 copies of the fp32 weights that matmuls read, cached until the forward ends
        c["autocast copies"] = 2 * (linear if full else adapters)

    # --- activations ---------------------------------------------------------------------------------------------
    per_layer = layer_saved_bytes_per_token(shape, run) * tokens
    transient = (residual * h + 3 * i * compute) * tokens  # gradients of the layer's output and of the MLP's tensors
    if autocast:  # the recomputed layer casts its weights again
        transient += 2 * (shape.layer_linear_params if full else adapters / shape.num_layers)
    if run.method == "qlora":  # each 4-bit matmul dequantizes its weight to the compute dtype, one at a time
        transient += compute * max(a * b for a, b in shape.linear_shapes().values())
    if fsdp:  # a layer's unsharded gradient (compute dtype) and its fp32 copy for the reduce-scatter
        transient += layer_trainable * (compute + (4 if compute != 4 else 0))
    checkpoint = tokens * h * residual  # one layer's input
    if run.gradient_checkpointing:
        c["checkpoints"] = shape.num_layers * checkpoint
        c["layer recompute"] = per_layer + transient
        first, last = c["checkpoints"] + c["layer recompute"], checkpoint + c["layer recompute"]
    else:  # every layer keeps what its ops save, and its input
        c["checkpoints"] = 0
        c["layer recompute"] = shape.num_layers * (per_layer + checkpoint) + transient
        first, last = c["layer recompute"], per_layer + checkpoint + transient

    # --- LM head + fused cross-entropy (supervised positions only) -------------------------------------------------
    final_norm = 4 * h * tokens + (residual * h * tokens if full else 0)
    head_weight_cast = vh * compute if (full and not fsdp and compute != 4) else 0
    c["head + loss"] = (final_norm + head_weight_cast
                        + supervised * h * (residual + (compute if residual != compute else 0))  # selected (+ cast)
                        + supervised * h * compute  # the hidden states' gradient, computed in the forward, kept
                        + chunk * shape.vocab_size * (4 + (compute if compute != 4 else 0))  # fp32 logits (+ cast)
                        + (vh * compute if head_trains and compute != 4 else 0))  # the head gradient's bf16 product

    # --- gradients present at each moment ----------------------------------------------------------------------------
    head_grad = 4 * vh if head_trains else 0  # fp32, made in the forward by the fused loss
    embed_grad = 4 * shape.embed_params if full else 0
    layer_grads = 4 * layer_trainable / shards
    if fsdp and accumulating:  # no-sync micro-batches: every weight's unsharded fp32 gradient, until the last one
        unsharded = 4 * trainable  # reduce-scatters them (into the sharded gradients, or out to the host)
        grads = {"forward end": unsharded, "backward, first layer": unsharded, "backward, last layer": unsharded,
                 "backward end": unsharded + c["gradients"]}
    elif fsdp:  # sharded gradients appear layer by layer; the root's stay unsharded until the backward ends
        root_unsharded = compute * (vh if head_trains else 0)
        grads = {"forward end": head_grad, "backward, first layer": root_unsharded + layer_grads,
                 "backward, last layer": root_unsharded + shape.num_layers * layer_grads,
                 "backward end": c["gradients"] + ((compute + 4) * shape.root_params if full else 0)}
    elif accumulating:  # earlier micro-batches' gradients are all there; a new embedding gradient is added at the end
        grads = {"forward end": c["gradients"], "backward, first layer": c["gradients"],
                 "backward, last layer": c["gradients"], "backward end": c["gradients"] + embed_grad}
    else:
        grads = {"forward end": head_grad, "backward, first layer": head_grad + layer_grads,
                 "backward, last layer": c["gradients"] - embed_grad, "backward end": c["gradients"]}

    # --- the moments ---------------------------------------------------------------------------------------------------
    c["overhead"] = GPU_OVERHEAD_BYTES if run.device == "cuda" else 0
    static = c["weights"] + c.get("gathered weights", 0) + c.get("offload staging", 0) + c["optimizer"] + c["overhead"]
    activations = {"forward end": c.get("autocast copies", 0) + c["checkpoints"] + c["head + loss"],
                   "backward, first layer": first, "backward, last layer": last, "backward end": 0}
    phases = {moment: static + grads[moment] + activations[moment] for moment in grads}
    return Estimate(shape, run, trainable, c, phases, host)


def settings_of(cfg: Any, world_size: int = 1, device: str = "cuda", seq_len: int | None = None,
                supervised_fraction: float = 1.0) -> Run:
    """The `Run` of a composed training config (strategy by its `_target_`); seq_len defaults to max_length."""
    target = str(cfg.strategy._target_)
    strategy = "fsdp" if "FSDP" in target else "single"
    offload = strategy == "fsdp" and bool(cfg.strategy.get("cpu_offload", False))
    return Run(method=str(cfg.peft.method), precision=str(cfg.precision), strategy=strategy, world_size=world_size,
               offload=offload,
               micro_batch_size=int(cfg.trainer.micro_batch_size), seq_len=seq_len or int(cfg.dataset.max_length),
               grad_accum_steps=int(cfg.trainer.grad_accum_steps),
               gradient_checkpointing=bool(cfg.model.gradient_checkpointing), supervised_fraction=supervised_fraction,
               ce_chunk_size=int(cfg.trainer.ce_chunk_size), lora_r=int(cfg.peft.r),
               lora_targets=tuple(cfg.peft.target_modules), double_quant=bool(cfg.peft.double_quant), device=device)

