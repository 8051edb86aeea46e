"""Export any checkpoint as one GGUF file for llama.cpp (architecture "llama"): every Llama hyper-parameter, the
SentencePiece tokenizer (llama.cpp's "llama" vocabulary: pieces, scores, token types, BOS/EOS/UNK), the llama-2 chat
template, and the weights as f16, q8_0 or q4_0.

Written with the `gguf` package (`pip install gguf`, the `export` extra). Tensors are streamed: the header and the
tensor table are written from shapes alone, then each tensor is converted (renamed, Q/K permuted, quantized) and
written one at a time, so at most one converted tensor is in memory beside the model. The file is written under a
temporary name next to `out_path` and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from llama2_sft.inference.load import LoadedModel

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_0")

# Hugging Face Llama parameter names -> llama.cpp's GGUF tensor names ({bid}: the layer index).
_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(.+)\.(weight|bias)$")


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face Llama state-dict key (None for keys llama.cpp does not use)."""
    if "rotary_emb" in hf_name:
        return None  # recomputed by llama.cpp from rope_freq_base
    match = _BLOCK_RE.match(hf_name)
    if match:
        bid, module, kind = match.groups()
        if module in _BLOCK_NAMES:
            return f"blk.{int(bid)}.{_BLOCK_NAMES[module]}.{kind}"
        raise ValueError(f"{hf_name}: no GGUF name for this Llama tensor")
    match = _GLOBAL_RE.match(hf_name)
    if match and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"{hf_name}: no GGUF name for this Llama tensor")


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half Q/K rows -> the interleaved pairs llama.cpp's rotary embedding expects (the
    permutation llama.cpp's convert_hf_to_gguf.py applies for LlamaModel; works on weights and on biases)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class _Plan:
    """One tensor to write: its GGUF name, logical shape, storage type, and how to produce its data."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        count = int(np.prod(self.shape))
        return count // block_size * type_size


def _storage_type(name: str, shape: tuple[int, ...], quant: str):
    """f16/q8_0/q4_0 for 2-D weight matrices (quantized only when rows are whole blocks, else F16); F32 for
    everything 1-D (norms, biases), as llama.cpp's converter does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2 or not name.endswith(".weight"):
        return GGMLQuantizationType.F32
    if quant == "f16":
        return GGMLQuantizationType.F16
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[quant]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size != 0:
        log.warning("%s: row length %d is not a multiple of %s's block size %d: stored as F16",
                    name, shape[-1], qtype.name, block_size)
        return GGMLQuantizationType.F16
    return qtype


def _encode(array: np.ndarray, qtype) -> np.ndarray:
    from gguf.quants import quantize

    return quantize(array, qtype)  # F32/F16: a cast; Q8_0/Q4_0: uint8 blocks, shape (*rows, bytes per row)


def _tensor_plans(model, quant: str) -> Iterator[_Plan]:
    config = model.config
    n_head, n_kv_head = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if tied and hf_name.startswith("lm_head."):
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = gguf_tensor_name(hf_name)
        if name is None:
            continue
        shape = tuple(int(d) for d in tensor.shape)
        qtype = _storage_type(name, shape, quant)
        heads = n_head if ".attn_q." in name else n_kv_head if ".attn_k." in name else None

        def produce(tensor=tensor, heads=heads, qtype=qtype) -> np.ndarray:
            data = tensor.detach().to("cpu", torch.float32)
            if heads is not None:
                data = permute_for_rope(data, heads)
            return _encode(np.ascontiguousarray(data.numpy()), qtype)

        yield _Plan(name, shape, qtype, produce)


# --------------------------------------------------------------------------------------------------- tokenizer
def _sentencepiece_file(loaded: LoadedModel) -> str:
    from llama2_sft.data.chat import sentencepiece_model_file

    candidate = os.path.join(loaded.source, "tokenizer.model")
    if os.path.isfile(candidate):
        return candidate
    found = sentencepiece_model_file(loaded.tokenizer)
    if found is None:
        raise ValueError(f"{loaded.source}: GGUF export needs the SentencePiece tokenizer.model (none found)")
    return found


def _vocabulary(loaded: LoadedModel, n_vocab: int):
    """(tokens, scores, types, normalizer spec) in llama.cpp's "llama" (SentencePiece) vocabulary format, padded to
    the model's embedding rows."""
    from gguf import TokenType
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(_sentencepiece_file(loaded), "rb") as handle:
        proto.ParseFromString(handle.read())
    if proto.trainer_spec.model_type not in (sentencepiece_model_pb2.TrainerSpec.BPE,
                                             sentencepiece_model_pb2.TrainerSpec.UNIGRAM):
        raise ValueError("GGUF export: only SentencePiece BPE/unigram tokenizers (Llama's) are supported")
    piece_types = {
        sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL: TokenType.NORMAL,
        sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN: TokenType.UNKNOWN,
        sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL: TokenType.CONTROL,
        sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED: TokenType.USER_DEFINED,
        sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED: TokenType.UNUSED,
        sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE: TokenType.BYTE,
    }
    tokens = [piece.piece for piece in proto.pieces]
    scores = [float(piece.score) for piece in proto.pieces]
    types = [int(piece_types[piece.type]) for piece in proto.pieces]
    # Tokens the Hugging Face tokenizer added on top of the SentencePiece model (a pad token, say).
    added = getattr(loaded.tokenizer, "added_tokens_decoder", None) or {}
    for token_id in sorted(i for i in added if i >= len(tokens)):
        if token_id != len(tokens):
            raise ValueError(f"tokenizer: added token id {token_id} leaves a gap after id {len(tokens) - 1}")
        token = added[token_id]
        tokens.append(str(token.content if hasattr(token, "content") else token))
        scores.append(-1000.0)
        types.append(int(TokenType.CONTROL if getattr(token, "special", False) else TokenType.USER_DEFINED))
    if len(tokens) > n_vocab:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model's embedding only {n_vocab} rows")
    for index in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return tokens, scores, types, proto


def _gguf_chat_template() -> str:
    """The llama-2 chat template for llama.cpp. llama.cpp's SentencePiece tokenizer puts the dummy-prefix space in
    front of text that follows a special token (as Meta's tokenizer does), so the variant without a literal space
    after BOS is the one whose rendering llama.cpp tokenizes exactly as encode_dialog does."""
    from llama2_sft.export.hf import TEMPLATE_VARIANTS

    return TEMPLATE_VARIANTS[0]


# ---------------------------------------------------------------------------------------------- hyper-params
def _rope_settings(config) -> tuple[float, str, float | None]:
    """(freq base, scaling type, scaling factor) from a transformers 4 or 5 Llama config."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor"))
    return float(theta if theta is not None else 10000.0), rope_type, factor


def _add_hyper_parameters(writer, model, quant: str, n_vocab: int) -> None:
    import gguf

    config = model.config
    if getattr(config, "model_type", "llama") != "llama":
        raise ValueError(f"GGUF export supports Llama models, not model_type={config.model_type!r}")
    n_head = config.num_attention_heads
    n_kv_head = config.num_key_value_heads or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv_head))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    theta, rope_type, factor = _rope_settings(config)
    writer.add_rope_freq_base(theta)
    if rope_type == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type != "default":
        raise ValueError(f"GGUF export: rope scaling {rope_type!r} is not supported (default and linear are)")
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, loaded: LoadedModel, n_vocab: int) -> None:
    tokens, scores, types, proto = _vocabulary(loaded, n_vocab)
    tokenizer = loaded.tokenizer
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    spec = proto.trainer_spec
    bos = spec.bos_id if spec.bos_id >= 0 else tokenizer.bos_token_id
    eos = spec.eos_id if spec.eos_id >= 0 else tokenizer.eos_token_id
    unk = spec.unk_id if spec.unk_id >= 0 else tokenizer.unk_token_id
    for ident, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id), (unk, writer.add_unk_token_id)):
        if ident is not None:
            add(int(ident))
    pad = tokenizer.pad_token_id  # load_model fills a missing pad with unk: only a real pad token is written
    if pad is not None and pad != unk and pad < n_vocab:
        writer.add_pad_token_id(int(pad))
    writer.add_add_bos_token(True)  # encode_dialog: BOS opens every turn
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    writer.add_remove_extra_whitespaces(bool(proto.normalizer_spec.remove_extra_whitespaces))
    writer.add_chat_template(_gguf_chat_template())


# --------------------------------------------------------------------------------------------------- export
def export_gguf(loaded: LoadedModel, out_path: str, quant: str = "f16") -> str:
    """Write `loaded` as one GGUF file at `out_path` (quant: f16, q8_0 or q4_0); returns the path."""
    try:
        import gguf
    except ImportError as error:
        raise ImportError("GGUF export needs the gguf package: pip install 'llama2_sft[export]'") from error

    quant = str(quant).lower()
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}: expected one of {', '.join(QUANTS)}")
    out_path = os.path.abspath(os.path.expanduser(str(out_path)))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    model = loaded.model
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    plans = list(_tensor_plans(model, quant))
    tmp = f"{out_path}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_name(os.path.basename(os.path.normpath(loaded.source)) or "llama")
        _add_hyper_parameters(writer, model, quant, n_vocab)
        _add_tokenizer(writer, loaded, n_vocab)
        for plan in plans:  # the tensor table, from shapes alone
            byte_shape = gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype)
            writer.add_tensor_info(plan.name, byte_shape, np.dtype(np.uint8), plan.nbytes, raw_dtype=plan.qtype)
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for plan in plans:  # one converted tensor in memory at a time
                data = plan.produce()
                if data.nbytes != plan.nbytes:
                    raise AssertionError(f"{plan.name}: produced {data.nbytes} bytes, planned {plan.nbytes}")
                writer.write_tensor_data(data)
                del data
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log.info("wrote %s (%s, %d tensors, %.1f MiB)", out_path, quant, len(plans), os.path.getsize(out_path) / 2**20)
    return out_path
