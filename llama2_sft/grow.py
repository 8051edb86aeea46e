"""Growing a checkpoint to an extended vocabulary (issue 13 §2), and the check that a tokenizer belongs to its model.

`python -m llama2_sft.vocab` appends pieces to a base SentencePiece model (ids 0..N-1 unchanged). Training with
`model.tokenizer=<that dir>` on a checkpoint whose embeddings have fewer rows grows the model at load: new rows of
`embed_tokens` and `lm_head`, each the mean of the base rows of the pieces the BASE tokenizer splits the new piece's
text into (byte pieces included); old rows are untouched and `config.vocab_size` follows. Under DeepSpeed ZeRO-3 the
model is built partitioned, and only the embedding and the head are gathered to grow them (`_grow_partitioned`).

`vocab_plan` decides, before any weights load (config.preflight), whether `model.tokenizer` fits the checkpoint:
- the checkpoint has a tokenizer.model of its own (a Hugging Face dir, or a run's checkpoint dir): the first pieces of
  `model.tokenizer` must be its pieces at the same ids, else the run stops naming both tokenizers and the first id
  that differs (a tokenizer with fewer pieces differs at its length);
- it has none: any tokenizer not larger than the embeddings is taken as it is; a larger one cannot be grown (there is
  no base tokenizer to split the new pieces with) and fails.
A `model.tokenizer` without a tokenizer.model (a Hugging Face tokenizer.json only) is compared by its tokens; it cannot
grow a model (growing needs both SentencePiece models).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

SPM_FILE = "tokenizer.model"
# sentencepiece_model.proto: ModelProto.SentencePiece.Type
NORMAL, USER_DEFINED, UNUSED = 1, 4, 5
log = logging.getLogger(__name__)


def _proto(model_file: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    return proto


def piece_count(model_file: str) -> int:
    """The number of pieces of a SentencePiece model file."""
    return len(_proto(model_file).pieces)


def base_splits(base_sp_model_file: str, new_sp_model_file: str) -> dict[int, list[int] | None]:
    """For each id the new model adds beyond the base's pieces: the base ids its text splits into, or None for a
    piece without text (UNUSED padding, control pieces). The text is the piece with "▁" as a space, encoded by the
    base without a dummy prefix or whitespace cleanup, so the split covers exactly the piece's characters (a
    character the base lacks comes out as its UTF-8 byte pieces with byte fallback, or as <unk> without)."""
    import sentencepiece as spm

    base, new = _proto(base_sp_model_file), _proto(new_sp_model_file)
    first = first_difference(pieces_of(base), pieces_of(new))
    if first is not None and first < len(base.pieces):
        raise ValueError(f"{new_sp_model_file} is no extension of {base_sp_model_file}: the pieces differ at id {first}")
    base.normalizer_spec.add_dummy_prefix = False
    base.normalizer_spec.remove_extra_whitespaces = False
    processor = spm.SentencePieceProcessor(model_proto=base.SerializeToString())
    splits: dict[int, list[int] | None] = {}
    for index in range(len(base.pieces), len(new.pieces)):
        piece = new.pieces[index]
        ids = processor.encode(piece.piece.replace("\u2581", " ")) if piece.type in (NORMAL, USER_DEFINED) else []
        splits[index] = list(ids) or None
    return splits


def pieces_of(proto: Any) -> list[str]:
    return [piece.piece for piece in proto.pieces]


def first_difference(own: list[str], other: list[str]) -> int | None:
    """The first id at which `other` does not hold `own`'s piece (its length when it ends first), or None."""
    for index, piece in enumerate(own):
        if index >= len(other) or other[index] != piece:
            return index
    return None


def hf_pieces(path: str, revision: str | None) -> list[str]:
    """The tokens of a Hugging Face tokenizer without a tokenizer.model, by id."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as error:  # noqa: BLE001 - the message names the key and the cause
        raise ValueError(f"model.tokenizer: cannot load a tokenizer from {path!r}: {error}") from error
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def grown_rows(weight: torch.Tensor, splits: dict[int, list[int] | None], size: int, keep: int) -> torch.Tensor:
    """`weight` (rows = ids) grown to `size` rows: rows < keep as they are (bit-identical); each id in `splits`
    the mean of the base rows of its split, computed in fp32. An id without text (None) gets the mean of all `keep`
    base rows, in the embedding and in the head alike: as an input it is an average token, and as an output its logit
    is the mean of the base logits, which (Jensen) is at most logsumexp - log(keep): each such piece starts with at
    most 1/keep of the probability mass, however the logits are spread (a zero row has no such bound: logit 0 can
    beat most of a vocabulary). Encoding never emits these pieces, so training only pushes them further down."""
    grown = torch.empty((size, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        grown[:keep] = weight[:keep]
        base = weight[:keep].float()
        overall = base.mean(0)
        for index in range(keep, size):
            ids = splits.get(index)
            grown[index] = (base[ids].mean(0) if ids else overall).to(weight.dtype)
    return grown


def grow_model(model: torch.nn.Module, base_sp_model_file: str, new_sp_model_file: str) -> torch.nn.Module:
    """Grow `model` (a transformers causal LM whose embeddings have a row per base piece, or more) in place to the
    pieces of `new_sp_model_file`, which extends `base_sp_model_file`. Rows of the base's pieces stay bit-identical;
    rows of ids from the base's size on (new pieces, and any placeholder rows the checkpoint had beyond its
    tokenizer) are initialised from `base_splits`. Returns the model."""
    size = len(_proto(new_sp_model_file).pieces)
    keep = len(_proto(base_sp_model_file).pieces)
    embed = model.get_input_embeddings()
    if hasattr(embed.weight, "ds_id"):  # built under DeepSpeed ZeRO-3 (zero.Init): partitioned over the ranks
        return _grow_partitioned(model, base_sp_model_file, new_sp_model_file, size, keep)
    rows = embed.weight.shape[0]
    if size <= rows:
        return model
    if keep > rows:
        raise ValueError(f"{base_sp_model_file} has {keep} pieces but the model's embeddings only {rows} rows")
    splits = base_splits(base_sp_model_file, new_sp_model_file)
    requires_grad = embed.weight.requires_grad
    new_embed = torch.nn.Embedding(size, embed.weight.shape[1], padding_idx=embed.padding_idx,
                                   device="meta", dtype=embed.weight.dtype)
    new_embed.weight = torch.nn.Parameter(grown_rows(embed.weight, splits, size, keep), requires_grad=requires_grad)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    model.set_input_embeddings(new_embed)
    if head is not None:
        if tied:
            head.weight = new_embed.weight
        else:
            new_head = torch.nn.Linear(head.in_features, size, bias=False, device="meta", dtype=head.weight.dtype)
            new_head.weight = torch.nn.Parameter(grown_rows(head.weight, splits, size, keep),
                                                 requires_grad=head.weight.requires_grad)
            if head.bias is not None:
                raise ValueError("grow_model: an LM head with a bias is not supported")
            model.set_output_embeddings(new_head)
    _set_vocab_size(model, size)
    return model


def _set_vocab_size(model: torch.nn.Module, size: int) -> None:
    config = model.config
    getattr(config, "text_config", config).vocab_size = size
    config.vocab_size = size
    if hasattr(model, "vocab_size"):
        model.vocab_size = size


def _grow_partitioned(model: torch.nn.Module, base_sp_model_file: str, new_sp_model_file: str, size: int,
                      keep: int) -> torch.nn.Module:
    """`grow_model` for a model whose parameters DeepSpeed ZeRO-3 has partitioned (transformers built it under
    zero.Init): only the embedding and the LM head are gathered, never the decoder layers. The grown matrices are
    created partitioned (zero.Init with the run's DeepSpeed config), filled on rank 0 with the same `grown_rows` as
    the unpartitioned path and broadcast to the other ranks when the gather ends (modifier_rank=0)."""
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import deepspeed_config

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        raise ValueError("grow_model: tied input and output embeddings cannot be grown under DeepSpeed ZeRO-3")
    if head is not None and head.bias is not None:
        raise ValueError("grow_model: an LM head with a bias is not supported")
    rows, hidden = embed.weight.ds_shape
    if size <= rows:
        return model
    if keep > rows:
        raise ValueError(f"{base_sp_model_file} has {keep} pieces but the model's embeddings only {rows} rows")
    splits = base_splits(base_sp_model_file, new_sp_model_file)
    old = [embed.weight] + ([head.weight] if head is not None else [])
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        new_embed = torch.nn.Embedding(size, hidden, padding_idx=embed.padding_idx, dtype=embed.weight.dtype)
        new_head = None if head is None else torch.nn.Linear(hidden, size, bias=False, dtype=head.weight.dtype)
    new = [new_embed.weight] + ([new_head.weight] if new_head is not None else [])
    for before, after in zip(old, new):
        after.requires_grad_(before.requires_grad)
    with deepspeed.zero.GatheredParameters(old + new, modifier_rank=0):
        if not dist.is_initialized() or dist.get_rank() == 0:
            with torch.no_grad():
                for before, after in zip(old, new):
                    after.data.copy_(grown_rows(before.data, splits, size, keep))
    model.set_input_embeddings(new_embed)
    if new_head is not None:
        model.set_output_embeddings(new_head)
    _set_vocab_size(model, size)
    return model


# ---------------------------------------------------------------------------------------------------- the check
@dataclass
class VocabPlan:
    """What `model.tokenizer` means for the checkpoint `model.name_or_path`."""

    tokenizer: str  # model.tokenizer's SentencePiece file (or its dir / hub id when it has none)
    own: str | None  # the checkpoint's own tokenizer.model, None when it has none
    embeddings: int  # the checkpoint's vocab_size (embedding rows)
    size: int | None  # model.tokenizer's pieces (None: no SentencePiece model to count)

    @property
    def grows(self) -> bool:
        return self.size is not None and self.size > self.embeddings


def local_sp_file(path: str | None, revision: str | None = None) -> str | None:
    """The tokenizer.model of a directory, or of a hub id already in the local cache; None when there is none."""
    if not path:
        return None
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        candidate = os.path.join(path, SPM_FILE)
        return candidate if os.path.isfile(candidate) else None
    if os.path.isfile(path):
        return path if path.endswith(".model") else None
    try:  # a hub id: the checkpoint itself is fetched from the hub too
        from transformers.utils import cached_file

        return cached_file(path, SPM_FILE, revision=revision, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - no tokenizer.model to compare with
        return None


def vocab_plan(model_cfg: Any) -> VocabPlan | None:
    """Whether `model.tokenizer` belongs to `model.name_or_path` (see the module docstring); None for a random init
    or when the checkpoint's own tokenizer is used. Fails naming both tokenizers and the first differing id."""
    from transformers import AutoConfig

    from llama2_sft.model import base_source

    path, _ = base_source(model_cfg)
    if not path or not model_cfg.tokenizer:
        return None
    embeddings = int(getattr(AutoConfig.from_pretrained(path, revision=model_cfg.revision), "vocab_size"))
    own = local_sp_file(path, model_cfg.revision)
    new = local_sp_file(model_cfg.tokenizer, model_cfg.revision)
    pieces = pieces_of(_proto(new)) if new is not None else hf_pieces(str(model_cfg.tokenizer), model_cfg.revision)
    plan = VocabPlan(new or str(model_cfg.tokenizer), own, embeddings, len(pieces))
    if plan.grows and (own is None or new is None):
        lacks = (f"model.name_or_path={model_cfg.name_or_path}, which has no {SPM_FILE} of its own to split the new "
                 "pieces with" if own is None else f"model.tokenizer={model_cfg.tokenizer}, which has no {SPM_FILE}")
        raise ValueError(f"model.tokenizer={model_cfg.tokenizer} has {plan.size} pieces, more than the {embeddings} "
                         f"embeddings of model.name_or_path={model_cfg.name_or_path}: growing needs both SentencePiece "
                         f"models, and {lacks}")
    if own is None or (new is not None and os.path.realpath(own) == os.path.realpath(new)):
        return plan
    own_pieces = pieces_of(_proto(own))
    first = first_difference(own_pieces, pieces)
    if first is not None:
        if first >= len(pieces):
            detail = (f"it has {len(pieces)} pieces, fewer than the checkpoint's {len(own_pieces)} "
                      f"(first missing id {first}: {own_pieces[first]!r})")
        else:
            detail = (f"they differ first at id {first}: {pieces[first]!r} in model.tokenizer, "
                      f"{own_pieces[first]!r} in the checkpoint's")
        raise ValueError(f"model.tokenizer={model_cfg.tokenizer} ({plan.tokenizer}) does not belong to "
                         f"model.name_or_path={model_cfg.name_or_path}, whose own tokenizer is {own}: {detail}. Only "
                         "an extension of the checkpoint's tokenizer (its pieces at the same ids, new pieces after "
                         "them: python -m llama2_sft.vocab) can be used with it; set model.tokenizer=null to use its "
                         "own")
    return plan


def grow_if_planned(model: torch.nn.Module, plan: VocabPlan | None) -> torch.nn.Module:
    """`grow_model` when the plan says the tokenizer is larger than the embeddings."""
    if plan is not None and plan.grows:
        base = plan.own
        if base is None:  # vocab_plan refuses this before any weights load
            raise ValueError(f"model.tokenizer={plan.tokenizer}: cannot grow a checkpoint without its own {SPM_FILE}")
        grow_model(model, base, plan.tokenizer)
        log.info("vocabulary grown from %d to %d rows (%s extends %s): new rows are the mean of their pieces' base "
                 "splits", plan.embeddings, plan.size, plan.tokenizer, base)
    return model
