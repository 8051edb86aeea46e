"""Plain-text corpora for continued pretraining: documents -> `BOS ids EOS` -> row-sized pieces, the loss on every
token.

Where documents come from (`dataset.type=text`):
  * `.txt` files: one document per block of lines separated by blank lines (`dataset.txt_documents=blank_lines`,
    the default; a file without a blank line is one document), or one per file (`txt_documents=file`);
  * `.jsonl` / `.json` / `.parquet` files, saved datasets and hub ids: one document per row, its `dataset.text_field`.
A file that is not UTF-8 stops the build naming the file and the byte offset; a corpus without a document stops it
too. Rows whose text is missing, not a string, or blank are skipped and counted (`dataset.max_skipped_fraction`).

A document of n tokens (BOS and EOS included) longer than `max_length` is cut into pieces of at most `max_length`
tokens that overlap by one token: piece k holds tokens [k(L-1), k(L-1)+L). Within a piece each token predicts the next
(the collator shifts), so across the pieces every token after BOS is a target exactly once: nothing is dropped, and
a piece never has fewer than two tokens. Each piece is a sample: packing puts whole samples into rows, restarting
positions per sample and keeping them from attending to each other (llama2_sft.data.packing / collate).
"""

from __future__ import annotations

import codecs
import gc
import io
import os
from typing import Any, Iterable, Iterator

from llama2_sft.data.chat import IGNORE_INDEX

TEXT_FILE_FORMATS = (".txt", ".jsonl", ".json", ".parquet")
TEXT_SKIP_REASONS = (
    "bad_text",  # the text field is missing or not a string
    "empty_document",  # blank after stripping whitespace
)


def check_utf8(path: str, block_size: int = 1 << 20) -> None:
    """Stop naming the file and the byte offset of its first byte that is not UTF-8 (read in blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(block_size)
            final = not block
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character held over from the last block
            try:
                decoder.decode(block, final)
            except UnicodeDecodeError as error:
                offset = consumed - pending + error.start
                raise ValueError(f"{path}: not UTF-8 at byte offset {offset} ({error.reason}: "
                                 f"{error.object[error.start:error.start + 4]!r})") from None
            if final:
                return
            consumed += len(block)


def iter_txt_documents(lines: Iterable[str], rule: str) -> Iterator[str]:
    """The documents of one .txt file, read line by line (bounded memory for any file size): the whole file (rule
    `file`) or its blocks of lines separated by blank lines (only spaces or tabs)."""
    block: list[str] = []
    for line in lines:
        if rule != "file" and not line.strip(" \t\r\n"):
            if block:
                yield from _document("".join(block))
                block = []
            continue
        block.append(line)
    if block:
        yield from _document("".join(block))


def _document(text: str) -> Iterator[str]:
    text = text.strip("\r\n")
    if text.strip():
        yield text


def txt_documents(text: str, rule: str) -> list[str]:
    """The documents of one .txt file's text (see `iter_txt_documents`)."""
    return list(iter_txt_documents(io.StringIO(text, newline=None), rule))


def _txt_rows(paths: list[str], rule: str, identity: dict) -> Iterator[dict]:
    """Rows {id, text} of .txt files (`identity`, the files' sizes and mtimes, keys the datasets cache)."""
    del identity
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for k, document in enumerate(iter_txt_documents(handle, rule)):
                yield {"id": f"{os.path.basename(path)}#{k}", "text": document}


def _expand(source: str) -> list[str] | None:
    from llama2_sft.data.sources import _expand_local

    return _expand_local(source, TEXT_FILE_FORMATS)


def load_documents(source: Any, text_field: str = "text", txt_rule: str = "blank_lines", split: str = "train",
                   revision: str | None = None):
    """A `datasets.Dataset` with columns `id` (string or null) and `text` (the documents, not yet checked)."""
    import datasets

    from llama2_sft.data.sources import _is_saved_dataset, _load_files, load_hub, load_saved

    items = [source] if isinstance(source, str) else [str(s) for s in source]
    if not items:
        raise ValueError("dataset source is empty")
    parts = []
    for item in items:
        item = os.path.expanduser(str(item))
        if _is_saved_dataset(item):
            parts.append(_text_columns(load_saved(item, split), text_field, item))
            continue
        files = _expand(item)
        if files is None:
            parts.append(_text_columns(load_hub(item, split, revision), text_field, item))
            continue
        if not files:
            raise ValueError(f"dataset source {item!r}: directory holds no {list(TEXT_FILE_FORMATS)} files")
        txt = [f for f in files if f.endswith(".txt")]
        rows = [f for f in files if not f.endswith(".txt")]
        for path in files:
            if not path.endswith(".parquet"):
                check_utf8(path)  # parquet strings are UTF-8 by construction
        if txt:  # streamed into Arrow (datasets' cache), never held whole in memory
            from llama2_sft.data.sources import source_identity

            identity = source_identity(txt, None, TEXT_FILE_FORMATS)
            if next(_txt_rows(txt, str(txt_rule), identity), None) is not None:  # Arrow needs one row
                parts.append(datasets.Dataset.from_generator(
                    _txt_rows, features=TEXT_FEATURES(),
                    gen_kwargs={"paths": txt, "rule": str(txt_rule), "identity": identity}))
        if rows:
            parts.append(_text_columns(_load_files(rows), text_field, ", ".join(rows[:3])))
    documents = (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)) if parts else []
    if len(documents) == 0:
        raise ValueError(f"text corpus {source}: no document (empty files, or only blank lines)")
    return documents


def TEXT_FEATURES():  # noqa: N802 - a constant that imports datasets lazily
    import datasets

    return datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})


def _text_columns(rows: Any, text_field: str, where: str):
    """Rows -> columns `id` (string or null) and `text` (string or null), without reading them into Python."""
    import datasets

    if text_field not in rows.column_names:
        raise ValueError(f"{where}: rows have no {text_field!r} field (dataset.text_field; "
                         f"columns: {rows.column_names})")
    kind = rows.features[text_field]
    if not (isinstance(kind, datasets.Value) and kind.dtype in ("string", "large_string")):
        raise ValueError(f"{where}: field {text_field!r} (dataset.text_field) holds {kind}, not text")
    rows = rows.select_columns([c for c in (text_field, "id") if c in rows.column_names])
    if text_field != "text":
        rows = rows.rename_column(text_field, "text")
    if "id" not in rows.column_names:
        rows = rows.add_column("id", [None] * len(rows))
    return rows.cast(TEXT_FEATURES())


def document_pieces(ids: list[int], max_length: int) -> list[list[int]]:
    """One document's ids cut into pieces of at most `max_length` tokens overlapping by one (see the module doc)."""
    if len(ids) <= max_length:
        return [ids]
    stride = max_length - 1
    return [ids[start: start + max_length] for start in range(0, len(ids) - 1, stride)]


def encode_documents(batch: dict, indices: list[int], tokenizer: Any, max_length: int) -> dict:
    """Batched map function: documents -> one output row per piece (or one `skip:` row per unusable document)."""
    if max_length < 2:
        raise ValueError(f"dataset.max_length={max_length}: a text piece needs at least 2 tokens")
    out: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "length": [], "num_supervised": [], "status": [],
                            "task": []}
    texts = batch["text"]
    names = [doc_id if doc_id else f"#{index}" for doc_id, index in zip(batch["id"], indices)]
    keep = [i for i, text in enumerate(texts) if isinstance(text, str) and text.strip()]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many small lists and no cycles, as in tokenize.encode_rows
    try:
        encoded = dict(zip(keep, tokenizer.encode_batch([texts[i] for i in keep]))) if keep else {}
        for i, text in enumerate(texts):
            if i not in encoded:
                reason = "bad_text" if not isinstance(text, str) else "empty_document"
                _append(out, names[i], [], [], "skip:" + reason)
                continue
            ids = [tokenizer.bos_id, *encoded[i], tokenizer.eos_id]
            pieces = document_pieces(ids, max_length)
            for k, piece in enumerate(pieces):
                # labels[0] never becomes a target (the collator shifts by one); the mask makes num_supervised and
                # chat.answer_split agree with chat samples, whose first token is never supervised either
                _append(out, names[i] if len(pieces) == 1 else f"{names[i]}/{k}", piece, [IGNORE_INDEX, *piece[1:]],
                        "kept" if len(pieces) == 1 else "split")
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def _append(out: dict, sample_id: str, ids: list[int], labels: list[int], status: str) -> None:
    out["id"].append(sample_id)
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["length"].append(len(ids))
    out["num_supervised"].append(max(len(ids) - 1, 0))
    out["status"].append(status)
    out["task"].append("")
