"""Source rows -> messages: where rows come from (hub id, parquet/jsonl/json files, globs, saved dataset dirs) and
how a ShareGPT row `{id, conversations: [{from, value}], instruction}` becomes llama-2-chat messages, with every row
that cannot be trained skipped for a named reason (never repaired with invented data)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

from llama2_sft.data.chat import DEFAULT_SYSTEM_PROMPT, MessageError, validate_messages, with_system_prompt

# from -> role. ShareGPT uses human/gpt; OpenAI-style user/assistant/system are accepted as well.
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Every reason a row is skipped. Each is counted and reported; none is silently repaired. The ordering reasons are
# `chat.validate_messages`'s own codes: training rows and inference requests follow one set of rules.
SKIP_REASONS = (
    "missing_conversations",  # no `conversations` key, or not a list
    "empty_conversations",  # an empty list
    "bad_turn",  # a turn that is not a {from, value} mapping
    "unknown_role",  # `from` not in ROLE_OF
    "bad_value",  # `value` not a string, or empty / whitespace only
    "first_turn_not_human",  # the dialog (after an optional leading system turn) starts with the assistant
    "consecutive_same_role",  # two user or two assistant turns in a row
    "misplaced_system",  # a system turn anywhere but first
    "bad_instruction",  # `instruction` present but not a string
    "no_assistant_turn",  # nothing to supervise
)

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve_system_prompt(default_system: str | None) -> str | None:
    """Config value -> system text for rows without an instruction: 'meta' (Meta's default), 'none'/null, or text."""
    if default_system is None or default_system == "none" or default_system == "":
        return None
    if default_system == "meta":
        return DEFAULT_SYSTEM_PROMPT
    return default_system


def row_to_messages(row: dict, default_system: str | None) -> tuple[list[dict] | None, str | None]:
    """One ShareGPT row -> (messages, None), or (None, skip reason). A trailing unanswered user turn is dropped."""
    conversations = row.get("conversations")
    if not isinstance(conversations, list):
        return None, "missing_conversations"
    if not conversations:
        return None, "empty_conversations"
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        return None, "bad_instruction"

    messages: list[dict] = []
    for turn in conversations:  # the row's shape first; the order of the turns is the chat layer's rule
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return None, "bad_turn"
        role = ROLE_OF.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            return None, "unknown_role"
        value = turn["value"]
        if not isinstance(value, str) or not value.strip():
            return None, "bad_value"
        messages.append({"role": role, "content": value})
    try:
        validate_messages(messages)
    except MessageError as error:
        # a lone system turn is a row with nothing to supervise
        return None, "no_assistant_turn" if error.reason == "system_only" else error.reason

    if messages[-1]["role"] == "user":
        messages.pop()  # a question without an answer teaches nothing
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no_assistant_turn"
    system = instruction if instruction and instruction.strip() else default_system
    return with_system_prompt(messages, system), None


def _expand_local(source: str, formats: Sequence[str] = tuple(FILE_FORMATS)) -> list[str] | None:
    """Local files named by `source` (file, glob, or directory of data files with a suffix in `formats`), or None if
    it is not local."""
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source, recursive=True))
        if not files:
            raise ValueError(f"dataset source {source!r}: the glob matches no file")
        return files
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
            if os.path.splitext(name)[1] in formats
        )
        return files
    if source.startswith((".", "/", "~")) or source.endswith(tuple(formats)):
        raise ValueError(f"dataset source {source!r}: no such file or directory")
    return None


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_info.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or os.path.isfile(os.path.join(path, "state.json"))
    )


def source_identity(source: str | Sequence[str], revision: str | None = None,
                    formats: Sequence[str] = tuple(FILE_FORMATS)) -> dict:
    """What identifies a source's content without reading it: local paths + sizes + mtimes, or hub id + revision."""
    sources = [source] if isinstance(source, str) else list(source)
    parts = []
    for item in sources:
        item = os.path.expanduser(str(item))
        if _is_saved_dataset(item):
            files = sorted(glob.glob(os.path.join(item, "**", "*"), recursive=True))
        else:
            files = _expand_local(item, formats)
        if files is None:
            parts.append({"hub": item, "revision": revision})
            continue
        for path in files:
            if os.path.isfile(path):
                stat = os.stat(path)
                parts.append({"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"sources": parts}


def _first_bad_json_line(path: str) -> str | None:
    with open(path, "rb") as handle:
        if path.endswith(".json"):
            head = handle.read(1).strip()
            handle.seek(0)
            if head == b"[":
                try:
                    json.load(handle)
                except json.JSONDecodeError as error:
                    return f"{path}:{error.lineno}: invalid JSON: {error.msg}"
                return None
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                return f"{path}:{lineno}: invalid JSON: {error}"
            if not isinstance(value, dict):
                return f"{path}:{lineno}: expected a JSON object per line, got {type(value).__name__}"
    return None


def _load_files(files: list[str]):
    import datasets

    formats = {FILE_FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in formats:
        bad = next(f for f in files if os.path.splitext(f)[1] not in FILE_FORMATS)
        raise ValueError(f"{bad}: unsupported data file type (expected one of {sorted(FILE_FORMATS)})")
    if len(formats) > 1:
        raise ValueError(f"dataset files mix formats {sorted(formats)}: {files[:4]}")
    kind = formats.pop()
    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as error:  # name the exact file and line rather than the library's generic builder error
        if kind == "json":
            for path in files:
                problem = _first_bad_json_line(path)
                if problem:
                    raise ValueError(problem) from error
        if kind == "parquet":
            import pyarrow.parquet as pq

            for path in files:
                try:
                    pq.ParquetFile(path).read_row_group(0)
                except Exception as parquet_error:  # noqa: BLE001 - report which file is broken
                    raise ValueError(f"{path}: unreadable parquet file: {parquet_error}") from error
        raise ValueError(f"could not load dataset files {files[:4]}: {error}") from error


def load_saved(item: str, split: str):
    """The `split` of a dataset saved with `save_to_disk` (a Dataset, or a DatasetDict holding that split)."""
    import datasets

    loaded = datasets.load_from_disk(item)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{item}: saved dataset has no split {split!r} (has {list(loaded)})")
        loaded = loaded[split]
    return loaded


def load_hub(item: str, split: str, revision: str | None):
    """The `split` of hub dataset `item` (at `revision`); a failure names the id and the split."""
    import datasets

    try:
        return datasets.load_dataset(item, split=split, revision=revision)
    except Exception as error:
        raise ValueError(f"could not load dataset {item!r} (split {split!r}) from the hub: {error}") from error


def load_rows(source: str | Sequence[str], split: str = "train", revision: str | None = None):
    """Load raw rows as a `datasets.Dataset` (Arrow, memory-mapped: bounded memory for 10M rows)."""
    import datasets

    sources = [source] if isinstance(source, str) else [str(s) for s in source]
    if not sources:
        raise ValueError("dataset source is empty")
    parts = []
    for item in sources:
        item = os.path.expanduser(item)
        if _is_saved_dataset(item):
            parts.append(load_saved(item, split))
            continue
        files = _expand_local(item)
        if files is None:
            parts.append(load_hub(item, split, revision))
            continue
        if not files:
            raise ValueError(f"dataset source {item!r}: directory holds no {sorted(FILE_FORMATS)} files")
        parts.append(_load_files(files))
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if "conversations" not in dataset.column_names:
        raise ValueError(f"dataset {sources}: rows have no 'conversations' column (columns: {dataset.column_names})")
    return dataset


def describe(rows: Any) -> str:
    """Short human description of a rows Dataset for logs."""
    return f"{len(rows):,} rows, columns {rows.column_names}"
