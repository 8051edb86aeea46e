"""Rows -> tokenized, truncated samples, built once (batched, multi-process) and cached on disk under a fingerprint of
everything that changes the result. Same inputs load in seconds; any change builds a new cache.

Cache layout: `<cache_dir>/<fingerprint>/{train,eval}/` (Arrow, memory-mapped) and `summary.json` (row counts, skip
reasons with example ids, truncation outcomes, token totals). A cache is published by renaming a finished temporary
directory, so a half-built cache is never loaded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from llama2_sft.checkpoint import TOKENIZER_FILES
from llama2_sft.data.chat import IGNORE_INDEX, TEMPLATE_VERSION, SentencePieceEncoder, encode_dialogs, text_encoder
from llama2_sft.data.sources import load_rows, resolve_system_prompt, row_to_messages, source_identity
from llama2_sft.data.truncation import truncate

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cached columns change (2: + task)
EXAMPLE_IDS_PER_REASON = 5


@dataclass
class PreparedData:
    """Tokenized splits (`datasets.Dataset` with input_ids, labels, length, num_supervised, id) and their summary."""

    train: Any
    eval: Any | None
    summary: dict
    path: str


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_identity(tokenizer_path: str) -> dict:
    """Content hashes of the tokenizer files in a directory (or of one SentencePiece file)."""
    if os.path.isfile(tokenizer_path):
        return {os.path.basename(tokenizer_path): _file_digest(tokenizer_path)}
    if os.path.isdir(tokenizer_path):
        return {
            name: _file_digest(os.path.join(tokenizer_path, name))
            for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(tokenizer_path, name))
        }
    return {"hub": tokenizer_path}


def is_text(dataset_cfg: Any) -> bool:
    return str(getattr(dataset_cfg, "type", "chat")) == "text"


def fingerprint(dataset_cfg: Any, tokenizer_path: str) -> tuple[str, dict]:
    """Hash of everything that changes the tokenized result, and the inputs it was computed from."""
    if is_text(dataset_cfg):
        from llama2_sft.data.text import TEXT_FILE_FORMATS

        inputs = {
            "cache_format": CACHE_FORMAT,
            "type": "text",
            "source": source_identity(dataset_cfg.source, dataset_cfg.revision, TEXT_FILE_FORMATS),
            "eval_source": (source_identity(dataset_cfg.eval_source, dataset_cfg.revision, TEXT_FILE_FORMATS)
                            if dataset_cfg.eval_source else None),
            "split": dataset_cfg.split,
            "eval_fraction": dataset_cfg.eval_fraction if not dataset_cfg.eval_source else None,
            "seed": dataset_cfg.seed,
            "tokenizer": tokenizer_identity(tokenizer_path),
            "max_length": dataset_cfg.max_length,
            "text_field": dataset_cfg.text_field,
            "txt_documents": str(dataset_cfg.txt_documents),
        }
        blob = json.dumps(inputs, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20], inputs
    inputs = {
        "cache_format": CACHE_FORMAT,
        "template": TEMPLATE_VERSION,
        "source": source_identity(dataset_cfg.source, dataset_cfg.revision),
        "eval_source": source_identity(dataset_cfg.eval_source, dataset_cfg.revision) if dataset_cfg.eval_source else None,
        "split": dataset_cfg.split,
        "eval_fraction": dataset_cfg.eval_fraction if not dataset_cfg.eval_source else None,
        "seed": dataset_cfg.seed,
        "tokenizer": tokenizer_identity(tokenizer_path),
        "max_length": dataset_cfg.max_length,
        "system_prompt": resolve_system_prompt(dataset_cfg.default_system),
        "truncation": dataset_cfg.truncation,
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], inputs


def _features():
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "num_supervised": datasets.Value("int32"),
            "status": datasets.Value("string"),
            "task": datasets.Value("string"),  # the row's optional `task` label ("" without one): accuracy per task
        }
    )


def encode_rows(batch: dict, tokenizer: Any, system_prompt: str | None, max_length: int, truncation: str) -> dict:
    """Batched map function: raw rows -> one output row per input row, `status` = kept outcome or skip reason."""
    size = len(batch["conversations"])
    keys = list(batch)
    rows = [{key: batch[key][i] for key in keys} for i in range(size)]
    ids = [str(row["id"]) if row.get("id") is not None else f"#{i}" for i, row in enumerate(rows)]
    out = {"id": ids, "input_ids": [[]] * size, "labels": [[]] * size, "length": [0] * size,
           "num_supervised": [0] * size, "status": [""] * size,
           "task": [str(row.get("task") or "") for row in rows]}

    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of small lists, no cycles: the collector would only burn time (~12% of a build)
    try:
        _encode_into(out, rows, tokenizer, system_prompt, max_length, truncation)
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def _encode_into(out: dict, rows: list[dict], tokenizer: Any, system_prompt: str | None, max_length: int,
                 truncation: str) -> None:
    parsed = [row_to_messages(row, system_prompt) for row in rows]
    valid = [i for i, (messages, _) in enumerate(parsed) if messages is not None]
    for i, (_, reason) in enumerate(parsed):
        if reason is not None:
            out["status"][i] = "skip:" + reason
    encoded = encode_dialogs(tokenizer, [parsed[i][0] for i in valid])
    for i, dialog in zip(valid, encoded):
        fitted, outcome = truncate(dialog, max_length, truncation)
        if fitted is None:
            out["status"][i] = "skip:" + outcome
            continue
        supervised = len(fitted.labels) - fitted.labels.count(IGNORE_INDEX)
        if supervised == 0:  # never let a sample without targets reach the loss
            out["status"][i] = "skip:no_supervised_tokens"
            continue
        out["input_ids"][i] = fitted.input_ids
        out["labels"][i] = fitted.labels
        out["length"][i] = len(fitted.input_ids)
        out["num_supervised"][i] = supervised
        out["status"][i] = outcome


def _tokenize_split(rows: Any, tokenizer: Any, dataset_cfg: Any, work_dir: str, num_proc: int, name: str):
    parallel = num_proc > 1 and len(rows) >= 2000
    encoder = text_encoder(tokenizer)  # resolve once; pickles as its model file for worker processes
    if isinstance(encoder, SentencePieceEncoder) and parallel:
        encoder = SentencePieceEncoder(encoder.model_file, num_threads=1)  # processes, not threads, share the cores
    if is_text(dataset_cfg):  # documents -> pieces (llama2_sft.data.text)
        from llama2_sft.data.text import encode_documents

        function, with_indices = encode_documents, True
        kwargs = {"tokenizer": encoder, "max_length": dataset_cfg.max_length}
    else:
        function, with_indices = encode_rows, False
        kwargs = {"tokenizer": encoder, "system_prompt": resolve_system_prompt(dataset_cfg.default_system),
                  "max_length": dataset_cfg.max_length, "truncation": dataset_cfg.truncation}
    mapped = rows.map(
        function,
        batched=True,
        batch_size=1000,
        with_indices=with_indices,
        num_proc=num_proc if parallel else None,
        remove_columns=rows.column_names,
        features=_features(),
        fn_kwargs=kwargs,
        cache_file_name=os.path.join(work_dir, f"{name}-encoded.arrow"),
        desc=f"tokenizing {name}",
    )
    statuses = mapped.data.column("status").to_pylist()
    counts = Counter(statuses)
    examples: dict[str, list[str]] = {}
    id_column = mapped.data.column("id")
    for index, status in enumerate(statuses):
        if status.startswith("skip:"):
            bucket = examples.setdefault(status[5:], [])
            if len(bucket) < EXAMPLE_IDS_PER_REASON:
                bucket.append(id_column[index].as_py())
    kept = [i for i, status in enumerate(statuses) if not status.startswith("skip:")]
    tokenized = mapped.select(kept).remove_columns("status") if len(kept) != len(mapped) else mapped.remove_columns("status")
    lengths = tokenized.data.column("length").to_numpy() if len(tokenized) else []
    supervised = tokenized.data.column("num_supervised").to_numpy() if len(tokenized) else []
    summary = {
        "rows": len(rows),
        "kept": len(tokenized),
        "skipped": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("skip:")},
        "outcomes": {k: v for k, v in sorted(counts.items()) if not k.startswith("skip:")},
        "example_ids": examples,
        "tokens": int(sum(lengths)),
        "supervised_tokens": int(sum(supervised)),
        "max_length_seen": int(max(lengths)) if len(lengths) else 0,
    }
    return tokenized, summary


def check_skipped_fraction(summary: dict, ceiling: float, where: str) -> None:
    """Stop with a clear error when too many rows of a split could not be trained."""
    for split, part in summary["splits"].items():
        skipped = sum(part["skipped"].values())
        if part["rows"] and skipped / part["rows"] > ceiling:
            raise ValueError(
                f"{where}: {skipped:,} of {part['rows']:,} {split} rows ({skipped / part['rows']:.1%}) could not be "
                f"trained, above dataset.max_skipped_fraction={ceiling}. Reasons: {part['skipped']}; "
                f"example ids: {part['example_ids']}"
            )


def _build(dataset_cfg: Any, tokenizer: Any, final_dir: str, inputs: dict) -> None:
    work_dir = f"{final_dir}.tmp-{os.getpid()}"
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    num_proc = dataset_cfg.num_proc or os.cpu_count() or 1
    started = time.time()
    load = _document_loader(dataset_cfg) if is_text(dataset_cfg) else load_rows
    rows = load(dataset_cfg.source, dataset_cfg.split, dataset_cfg.revision)
    held_out = None
    if is_text(dataset_cfg) and not dataset_cfg.eval_source and dataset_cfg.eval_fraction and len(rows) > 1:
        # whole documents are held out (not pieces: a piece's neighbours would be in training)
        parts = rows.train_test_split(test_size=dataset_cfg.eval_fraction, seed=dataset_cfg.seed, shuffle=True)
        rows, held_out = parts["train"], parts["test"]
    train, train_summary = _tokenize_split(rows, tokenizer, dataset_cfg, work_dir, num_proc, "train")
    if len(train) == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise ValueError(f"{dataset_cfg.source}: none of {len(rows):,} rows can be trained "
                         f"(skipped: {train_summary['skipped']}, e.g. ids {train_summary['example_ids']})")
    splits = {"train": train_summary}
    eval_set = None
    if dataset_cfg.eval_source or held_out is not None:
        eval_rows = held_out if held_out is not None else load(dataset_cfg.eval_source, dataset_cfg.split,
                                                               dataset_cfg.revision)
        eval_set, splits["eval"] = _tokenize_split(eval_rows, tokenizer, dataset_cfg, work_dir, num_proc, "eval")
    elif dataset_cfg.eval_fraction and len(train) > 1 and not is_text(dataset_cfg):  # text: documents, above
        parts = train.train_test_split(test_size=dataset_cfg.eval_fraction, seed=dataset_cfg.seed, shuffle=True)
        train, eval_set = parts["train"], parts["test"]
    publish_dir = f"{work_dir}-publish"
    os.makedirs(publish_dir)
    train.save_to_disk(os.path.join(publish_dir, "train"))
    if eval_set is not None and len(eval_set):
        eval_set.save_to_disk(os.path.join(publish_dir, "eval"))
    summary = {
        "fingerprint_inputs": inputs,
        "splits": splits,
        "num_train": len(train),
        "num_eval": len(eval_set) if eval_set is not None else 0,
        "build_seconds": round(time.time() - started, 2),
    }
    with open(os.path.join(publish_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2, ensure_ascii=False)
    del train, eval_set, rows  # they map files in work_dir, which goes next
    shutil.rmtree(work_dir, ignore_errors=True)
    os.replace(publish_dir, final_dir)  # atomic publish: readers only ever see a complete cache


def _document_loader(dataset_cfg: Any):
    from llama2_sft.data.text import load_documents

    return lambda source, split, revision: load_documents(source, dataset_cfg.text_field, dataset_cfg.txt_documents,
                                                          split, revision)


def load_prepared(path: str) -> PreparedData:
    """Open a published cache directory."""
    import datasets

    with open(os.path.join(path, "summary.json")) as handle:
        summary = json.load(handle)
    train = datasets.load_from_disk(os.path.join(path, "train"))
    eval_dir = os.path.join(path, "eval")
    eval_set = datasets.load_from_disk(eval_dir) if os.path.isdir(eval_dir) else None
    return PreparedData(train, eval_set, summary, path)


def format_summary(summary: dict) -> str:
    """A few readable lines about what went into the cache."""
    lines = []
    for split, part in summary["splits"].items():
        skipped = sum(part["skipped"].values())
        lines.append(
            f"{split}: {part['rows']:,} rows -> {part['kept']:,} samples, {skipped:,} skipped {part['skipped'] or ''}"
            f" outcomes {part['outcomes']}, {part['tokens']:,} tokens ({part['supervised_tokens']:,} supervised)"
        )
        for reason, ids in part["example_ids"].items():
            lines.append(f"  {reason}: e.g. ids {ids}")
    return "\n".join(lines)


def prepare_dataset(dataset_cfg: Any, tokenizer: Any, tokenizer_path: str, rank: int = 0, poll_seconds: float = 2.0) -> PreparedData:
    """Tokenize (or load from cache) the configured dataset. Rank 0 builds; other ranks wait on the file system
    (no collective, so a multi-hour build cannot hit a NCCL timeout). With `dataset.sources`, each source is prepared
    on its own (its own cache) and the train split is their weighted mix (llama2_sft.data.mixing)."""
    if getattr(dataset_cfg, "sources", None):
        from llama2_sft.data.mixing import prepare_mixture

        return prepare_mixture(dataset_cfg, tokenizer, tokenizer_path, rank=rank, poll_seconds=poll_seconds)
    key, inputs = fingerprint(dataset_cfg, tokenizer_path)
    cache_root = os.path.abspath(os.path.expanduser(dataset_cfg.cache_dir))
    final_dir = os.path.join(cache_root, key)
    if rank == 0 and not os.path.isdir(final_dir):
        os.makedirs(cache_root, exist_ok=True)
        log.info("building token cache %s", final_dir)
        _build(dataset_cfg, tokenizer, final_dir, inputs)
    while not os.path.isdir(final_dir):
        time.sleep(poll_seconds)
    prepared = load_prepared(final_dir)
    if rank == 0:
        log.info("token cache %s\n%s", final_dir, format_summary(prepared.summary))
    check_skipped_fraction(prepared.summary, dataset_cfg.max_skipped_fraction, str(dataset_cfg.source))
    return prepared
