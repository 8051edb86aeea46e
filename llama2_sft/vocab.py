"""Extend a Llama-2 SentencePiece vocabulary with Chinese pieces (the Chinese-LLaMA-Alpaca recipe) as one command.

    python -m llama2_sft.vocab base=/models/Llama-2-7b-hf corpus=[zh/*.txt,zh/wiki.jsonl] vocab_size=20000 out=tok_zh
    python -m llama2_sft.vocab base=data/tokenizer corpus=[data/train.jsonl] vocab_size=600 out=/tmp/tok_zh
    python -m llama2_sft.vocab base=DIR corpus=[...] out=DIR english=[en.txt] heldout_fraction=0.01 num_threads=16

1. The corpus (files, globs or folders): `.txt` lines, `.jsonl` / `.json` / `.parquet` rows with a `text` string or
   chat rows `{conversations: [{from, value}], instruction}`. A `heldout_fraction` of its lines is set aside.
2. A Chinese SentencePiece unigram model (`vocab_size` pieces, NFKC, character_coverage 0.9995) is trained in
   memory on the rest, cutting text the way the base model sees it (its dummy prefix, whitespace and digit rules).
3. Every piece of it that holds a Chinese character and that the base lacks is appended to the base's ModelProto
   (type NORMAL): ids and pieces 0..N-1 stay as they were. A new piece can only form from its own characters, so text
   without a Chinese character tokenizes exactly as before (checked on English text, see the report).
   Scores: the base is a BPE model, which merges the adjacent pair whose concatenation scores highest. New pieces
   score above every base piece, so they win (Chinese-LLaMA gave them all 0, above Llama's negative scores); here
   they are also distinct, in the Chinese model's order (most probable first: base max + M, ..., base max + 1).
   With equal scores SentencePiece breaks ties by position, which Hugging Face's BPE (one rank per merge) cannot
   reproduce; distinct scores make the tokenizer.json written here give SentencePiece's ids.
4. A new piece that BPE can never produce (the merges inside it always end elsewhere) is dropped and reported.
5. The vocabulary is padded to a multiple of `pad_to_multiple_of` with placeholder pieces that encoding never emits.
6. `out/` gets a complete tokenizer directory: tokenizer.model, tokenizer.json (the merges in SentencePiece's order:
   transformers 5 would otherwise convert tokenizer.model ordering merges by id and merge the new pieces last),
   tokenizer_config.json, special_tokens_map.json; and report.json: tokens per character before and after on the
   held-out lines and on English text, the pieces added, whether English ids are unchanged, and whether the Hugging
   Face tokenizer gives SentencePiece's ids.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import hydra
from omegaconf import DictConfig

from llama2_sft.checkpoint import TOKENIZER_FILES
from llama2_sft.config import CONF_DIR, register_app_configs

SPM_FILE = "tokenizer.model"
DEFAULT_ENGLISH = os.path.join(os.path.dirname(CONF_DIR), "data", "eval.jsonl")  # its rows without Chinese
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2
# Chinese characters: CJK symbols and punctuation, ideographs (extension A, unified, compatibility, extensions B+),
# full-width forms. A piece qualifies when it holds one: then only text holding one can form it.
CHINESE = re.compile("[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]")
HF_CHECK_TEXTS = 2000  # texts of each kind on which the Hugging Face tokenizer is compared with SentencePiece


def has_chinese(text: str) -> bool:
    """Whether `text` holds a Chinese character (CHINESE)."""
    return CHINESE.search(text) is not None


# ----------------------------------------------------------------------------------------------- corpus
def corpus_files(patterns: Any, key: str = "corpus") -> list[str]:
    """`corpus=` entries (files, globs, folders) -> the files in order; an entry that names no file fails."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = [str(pattern) for pattern in (patterns or [])]
    if not patterns:
        raise ValueError(f"{key}: no file named ({key}=[FILE_OR_GLOB,...])")
    files: list[str] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if any(ch in path for ch in "*?["):
            matched = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        elif os.path.isdir(path):
            matched = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                             if name.endswith(TEXT_SUFFIXES))
        elif os.path.isfile(path):
            matched = [path]
        else:
            raise ValueError(f"{key}: {pattern} does not exist")
        if not matched:
            raise ValueError(f"{key}: {pattern} matches no file")
        files += matched
    return files


def row_texts(row: Any, where: str) -> list[str]:
    """A row's texts: its `text`, or a chat row's instruction and turn values."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    if isinstance(row.get("text"), str):
        return [row["text"]]
    conversations = row.get("conversations")
    if isinstance(conversations, list):
        texts = [row["instruction"]] if isinstance(row.get("instruction"), str) and row["instruction"] else []
        return texts + [turn["value"] for turn in conversations
                        if isinstance(turn, dict) and isinstance(turn.get("value"), str)]
    raise ValueError(f"{where}: a row needs a 'text' string or 'conversations' (chat rows); it has {sorted(row)}")


def file_texts(path: str) -> Iterator[str]:
    """The texts of one corpus file: lines of a text file, `row_texts` of each row of a jsonl / json / parquet file."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches():
                for row in batch.to_pylist():
                    yield from row_texts(row, path)
            return
        with open(path, encoding="utf-8") as handle:
            if suffix == ".json":
                try:
                    rows = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from error
                if not isinstance(rows, list):
                    raise ValueError(f"{path}: expected a JSON list of rows")
                for index, row in enumerate(rows):
                    yield from row_texts(row, f"{path}[{index}]")
            elif suffix == ".jsonl":
                for lineno, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as error:
                            raise ValueError(f"{path}:{lineno}: invalid JSON: {error.msg}") from error
                        yield from row_texts(row, f"{path}:{lineno}")
            else:
                yield from handle
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error


def corpus_lines(files: Iterable[str]) -> Iterator[str]:
    """Every non-blank line of every text, stripped (SentencePiece trains on sentences; newlines stay byte pieces)."""
    for path in files:
        for text in file_texts(path):
            for line in text.split("\n"):
                line = line.strip()
                if line:
                    yield line


def split_heldout(lines: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines): each line held out with probability `fraction`, reproducibly."""
    rng = random.Random(seed)
    train, heldout = [], []
    for line in lines:
        (heldout if rng.random() < fraction else train).append(line)
    return train, heldout


# ----------------------------------------------------------------------------------------------- models
def _model_proto():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto()


def load_base(base: str) -> tuple[str, Any]:
    """(directory, ModelProto) of `base=`: a tokenizer or model dir holding a SentencePiece BPE tokenizer.model."""
    import sentencepiece as spm

    directory = os.path.expanduser(str(base))
    if not os.path.isdir(directory):
        raise ValueError(f"base={base}: not a directory (expected a tokenizer or model directory holding {SPM_FILE})")
    model_file = os.path.join(directory, SPM_FILE)
    if not os.path.isfile(model_file):
        held = ", ".join(sorted(os.listdir(directory))[:8]) or "nothing"
        raise ValueError(f"base={base}: no SentencePiece model ({SPM_FILE}) in this directory (it holds {held})")
    with open(model_file, "rb") as handle:
        data = handle.read()
    proto = _model_proto()
    try:
        proto.ParseFromString(data)
        spm.SentencePieceProcessor(model_proto=data)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError or SentencePiece's RuntimeError
        raise ValueError(f"base={base}: {model_file} is not a SentencePiece model ({error})") from error
    if proto.trainer_spec.model_type != BPE_MODEL:
        raise ValueError(f"base={base}: {model_file} is not a BPE model (Llama's is); new pieces are merged by score "
                         f"into a BPE vocabulary only")
    return directory, proto


def trainer_kwargs(cfg: Any, base: Any) -> dict:
    """SentencePiece settings of the Chinese model: a unigram model that cuts text as the base model sees it."""
    return dict(
        model_type="unigram",
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        normalization_rule_name=str(cfg.normalization),
        add_dummy_prefix=base.normalizer_spec.add_dummy_prefix,  # pieces may start with the "▁" the base adds
        remove_extra_whitespaces=base.normalizer_spec.remove_extra_whitespaces,
        split_digits=base.trainer_spec.split_digits,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        byte_fallback=False,
        max_sentencepiece_length=16,
        max_sentence_length=1 << 14,  # bytes: ~5,000 Chinese characters; longer lines are skipped by the trainer
        input_sentence_size=cfg.input_sentence_size,  # 0 = every line; else a random sample of that many
        shuffle_input_sentence=True,
        num_threads=cfg.num_threads,  # the result depends on it: keep it to reproduce a vocabulary
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=True,
        minloglevel=2,
    )


def train_chinese_model(lines: list[str], cfg: Any, base: Any) -> Any:
    """The Chinese SentencePiece unigram model trained on `lines`, in memory; a vocab_size it cannot reach fails."""
    import sentencepiece as spm

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(cfg.seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, **trainer_kwargs(cfg, base))
    except RuntimeError as error:
        message = str(error).split("] ", 1)[-1]
        if "Vocabulary size" in message:
            raise ValueError(f"vocab_size={cfg.vocab_size}: the SentencePiece trainer cannot reach it on this corpus "
                             f"({len(lines):,} lines): {message}") from error
        raise ValueError(f"SentencePiece trainer failed: {message}") from error
    proto = _model_proto()
    proto.ParseFromString(writer.getvalue())
    return proto


@dataclass
class Selection:
    """The Chinese model's pieces, sorted out: `pieces` are appended; the others are counted."""

    pieces: list[str] = field(default_factory=list)
    trained: int = 0  # NORMAL pieces of the Chinese model
    already_in_base: int = 0
    without_chinese: int = 0  # would change text without Chinese characters (English ids)
    missing_characters: int = 0  # hold a character that is no piece: Hugging Face's BPE could never form them


def select_pieces(base: Any, chinese: Any) -> Selection:
    """The pieces of `chinese` to append to `base`, most probable first."""
    selection = Selection()
    base_pieces = {piece.piece for piece in base.pieces}
    candidates = sorted((p for p in chinese.pieces if p.type == NORMAL), key=lambda p: -p.score)  # stable
    selection.trained = len(candidates)
    kept = []
    for candidate in candidates:
        if candidate.piece in base_pieces:
            selection.already_in_base += 1
        elif not has_chinese(candidate.piece):
            selection.without_chinese += 1
        else:
            kept.append(candidate.piece)
    characters = base_pieces | {piece for piece in kept if len(piece) == 1}
    for piece in kept:
        if all(ch in characters for ch in piece):
            selection.pieces.append(piece)
        else:
            selection.missing_characters += 1
    return selection


def merge_pieces(base: Any, pieces: list[str], scores: list[float] | None = None) -> Any:
    """A copy of `base` with `pieces` appended (NORMAL), scored above every base piece in the order given."""
    merged = _model_proto()
    merged.CopyFrom(base)
    if scores is None:
        top = max((piece.score for piece in base.pieces if piece.type == NORMAL), default=0.0)
        # integers: distinct in float32 (up to 2**24), so SentencePiece never has to break a tie between new pieces
        scores = [float(round(top) + len(pieces) - k) for k in range(len(pieces))]
    for piece, score in zip(pieces, scores):
        new = merged.pieces.add()
        new.piece, new.score, new.type = piece, score, NORMAL
    return merged


def unreachable_ids(proto: Any, first_id: int) -> list[int]:
    """Ids >= first_id (NORMAL) that SentencePiece never emits: encoding the piece's own text (its "▁" as a space,
    no dummy prefix) does not give [its id]. BPE merges inside a piece's span in the same order whatever surrounds it,
    and a merge across the span's edge leaves no way to form the piece, so one test in isolation decides it."""
    import sentencepiece as spm

    probe = _model_proto()
    probe.CopyFrom(proto)
    probe.normalizer_spec.add_dummy_prefix = False
    probe.normalizer_spec.remove_extra_whitespaces = False
    processor = spm.SentencePieceProcessor(model_proto=probe.SerializeToString())
    ids = [i for i in range(first_id, len(proto.pieces)) if proto.pieces[i].type == NORMAL]
    encoded = processor.encode([proto.pieces[i].piece.replace("\u2581", " ") for i in ids]) if ids else []
    return [i for i, got in zip(ids, encoded) if got != [i]]


def pad_vocabulary(proto: Any, multiple: int) -> int:
    """Append placeholder pieces until the size is a multiple of `multiple`; returns how many.

    Placeholders are type UNUSED, and named so that no split of a name is two vocabulary pieces. USER_DEFINED would
    be wrong: SentencePiece matches those verbatim in text. CONTROL is never matched by SentencePiece, but transformers
    makes CONTROL pieces special tokens that its tokenizer does match in text. An UNUSED piece is never emitted by
    SentencePiece's BPE (a merge that forms one is split back into its parts) and the name rule means it cannot even
    form; transformers keeps it as a plain vocabulary entry with no merge that produces it, so neither tokenizer
    can emit it, and llama.cpp's GGUF token type UNUSED says the same."""
    if multiple <= 1:
        return 0
    count = -len(proto.pieces) % multiple
    existing = {piece.piece for piece in proto.pieces}
    index = 0
    for _ in range(count):
        while True:
            name = f"<unused{index}>"
            index += 1
            if name not in existing and not any(name[:i] in existing and name[i:] in existing
                                                for i in range(1, len(name))):
                break
        new = proto.pieces.add()
        new.piece, new.score, new.type = name, 0.0, UNUSED
        existing.add(name)
    return count


# ----------------------------------------------------------------------------------------------- Hugging Face files
def base_hf_files(directory: str, size: int) -> tuple[dict, dict]:
    """(tokenizer_config, special_tokens_map) of the base, or those data/spm.py writes when it has none."""
    from llama2_sft.data.spm import _special_tokens_map, _tokenizer_config

    def read(name: str, default: dict) -> dict:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return default
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    config = read("tokenizer_config.json", _tokenizer_config(size))
    return config, read("special_tokens_map.json", _special_tokens_map())


def base_hf_tokenizer(directory: str, base: Any) -> dict:
    """The base's Hugging Face tokenizer as tokenizers JSON: as AutoTokenizer loads the base (its tokenizer.json,
    else converted from tokenizer.model, as data/tokenizer is); its vocabulary must be the SentencePiece pieces."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="llama2_sft_vocab_") as stage:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(directory, name)):
                shutil.copy2(os.path.join(directory, name), os.path.join(stage, name))
        config, special = base_hf_files(directory, len(base.pieces))
        config.setdefault("tokenizer_class", "LlamaTokenizer")
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            with open(os.path.join(stage, name), "w", encoding="utf-8") as handle:
                json.dump(content, handle, ensure_ascii=False)
        tokenizer = AutoTokenizer.from_pretrained(stage)
        data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"base={directory}: its Hugging Face tokenizer is not BPE ({model.get('type')})")
    vocab = model["vocab"]
    beyond = sorted((token["id"], token["content"]) for token in data.get("added_tokens", [])
                    if token["id"] >= len(base.pieces))
    if beyond:  # e.g. a "<pad>" added at id 32000 by a fine-tuning recipe: the first new piece would take its id
        raise ValueError(f"base={directory}: its Hugging Face tokenizer adds tokens beyond {SPM_FILE}'s "
                         f"{len(base.pieces):,} pieces ({beyond[:4]}); new pieces would take their ids")
    for index, piece in enumerate(base.pieces):
        if vocab.get(piece.piece) != index:
            raise ValueError(f"base={directory}: its Hugging Face tokenizer disagrees with {SPM_FILE} at id {index} "
                             f"({piece.piece!r} has id {vocab.get(piece.piece)} there)")
    return data


def merged_hf_tokenizer(base_json: dict, proto: Any, base_size: int) -> dict:
    """tokenizers JSON for the merged model: the base's, with the new pieces in the vocabulary and merges that rank as
    SentencePiece's scores do: the new pieces' merges first (highest scores, in score order), then the base's merges
    in their order, plus merges into base pieces that a new piece makes possible, placed by score."""
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    normal = {piece.piece for piece in proto.pieces if piece.type == NORMAL}

    def splits(piece: str) -> list[tuple[str, str]]:
        return [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in normal and piece[i:] in normal]

    new_ids = [i for i in range(base_size, len(proto.pieces)) if proto.pieces[i].type == NORMAL]
    new_ids.sort(key=lambda i: -proto.pieces[i].score)
    merges = [pair for i in new_ids for pair in splits(proto.pieces[i].piece)]

    extras = []  # (score, pair) of base pieces formed from a new piece
    for index in range(base_size):
        piece = proto.pieces[index]
        if piece.type == NORMAL and has_chinese(piece.piece):
            extras += [(piece.score, pair) for pair in splits(piece.piece)
                       if vocab[pair[0]] >= base_size or vocab[pair[1]] >= base_size]
    extras.sort(key=lambda extra: -extra[0])
    next_extra = 0
    for merge in base_json["model"]["merges"]:
        pair = tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
        score = proto.pieces[vocab[pair[0] + pair[1]]].score if pair[0] + pair[1] in vocab else float("-inf")
        while next_extra < len(extras) and extras[next_extra][0] > score:
            merges.append(extras[next_extra][1])
            next_extra += 1
        merges.append(pair)
    merges += [pair for _, pair in extras[next_extra:]]

    data = json.loads(json.dumps(base_json))
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [list(pair) for pair in merges]
    return data


def write_tokenizer_dir(out: str, base_dir: str, proto: Any, tokenizer_json: dict) -> list[str]:
    """tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    os.makedirs(out, exist_ok=True)
    config, special = base_hf_files(base_dir, len(proto.pieces))
    config.setdefault("tokenizer_class", "LlamaTokenizer")
    if "vocab_size" in config:
        config["vocab_size"] = len(proto.pieces)
    def json_bytes(content: dict, indent: int | None = 2) -> bytes:
        return (json.dumps(content, ensure_ascii=False, indent=indent, sort_keys=indent is not None) + "\n").encode()

    contents = {SPM_FILE: proto.SerializeToString(), "tokenizer.json": json_bytes(tokenizer_json, indent=None),
                "tokenizer_config.json": json_bytes(config), "special_tokens_map.json": json_bytes(special)}
    for name, content in contents.items():  # each file whole or not at all
        path = os.path.join(out, name)
        with open(path + ".tmp", "wb") as handle:
            handle.write(content)
        os.replace(path + ".tmp", path)
    return list(contents)


# ----------------------------------------------------------------------------------------------- report
def compare_encodings(base_sp: Any, merged_sp: Any, texts: list[str]) -> dict:
    """Tokens per character before and after on `texts`, and the texts whose ids changed."""
    before, after = base_sp.encode(texts), merged_sp.encode(texts)
    characters = sum(len(text) for text in texts)
    tokens_before, tokens_after = sum(map(len, before)), sum(map(len, after))
    changed = [text for text, old, new in zip(texts, before, after) if old != new]
    return {"texts": len(texts), "characters": characters, "tokens_before": tokens_before, "tokens_after": tokens_after,
            "tokens_per_char_before": round(tokens_before / characters, 4) if characters else None,
            "tokens_per_char_after": round(tokens_after / characters, 4) if characters else None,
            "ids_changed": len(changed), "ids_unchanged": not changed, "examples_changed": changed[:5]}


def compare_hf(out: str, merged_sp: Any, texts: list[str]) -> dict:
    """Whether AutoTokenizer.from_pretrained(out) gives SentencePiece's ids. Compared on texts without leading spaces
    (transformers 5 adds no dummy "▁" before one: HF(" x") == SP("x"), pinned in test_chat_real_vocab) and with
    special-token strings kept as text (split_special_tokens), as the repo encodes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [text.lstrip(" ") for text in texts if text.strip()]
    got = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    differ = [text for text, ids, expected in zip(texts, got, merged_sp.encode(texts)) if list(ids) != expected]
    return {"texts": len(texts), "differ": len(differ), "examples": differ[:5]}


def english_texts(sources: Any) -> list[str]:
    """Texts without a Chinese character from `english=` files, or the bundled data/eval.jsonl."""
    if sources is None:
        if not os.path.isfile(DEFAULT_ENGLISH):
            return []
        files = [DEFAULT_ENGLISH]
    else:
        files = corpus_files(sources, key="english")
    return [text for path in files for text in file_texts(path) if text.strip() and not has_chinese(text)]


# ----------------------------------------------------------------------------------------------- the app
def build_vocabulary(cfg: Any) -> dict:
    """Train, merge, pad, write the tokenizer directory and out/report.json (see the module docstring); the report."""
    import sentencepiece as spm

    base_dir, base = load_base(cfg.base)
    base_json = base_hf_tokenizer(base_dir, base)  # before training: a base it refuses fails at once
    out = os.path.abspath(os.path.expanduser(str(cfg.out)))
    if os.path.abspath(base_dir) == out:
        raise ValueError(f"out={cfg.out}: the base directory itself; write the extended tokenizer elsewhere")
    if cfg.vocab_size < 1:
        raise ValueError(f"vocab_size={cfg.vocab_size}: the SentencePiece trainer cannot reach it (must be positive)")
    if not 0 <= cfg.heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={cfg.heldout_fraction}: expected a fraction in [0, 1)")
    files = corpus_files(cfg.corpus)
    lines = list(corpus_lines(files))
    corpus = list(cfg.corpus) if not isinstance(cfg.corpus, str) else [cfg.corpus]
    if not lines:
        raise ValueError(f"corpus={corpus}: empty: no text in its {len(files)} file(s)")
    if not any(has_chinese(line) for line in lines):
        raise ValueError(f"corpus={corpus}: no line holds a Chinese character ({len(lines):,} lines); nothing to "
                         f"train a Chinese vocabulary on")
    english = english_texts(cfg.english)  # read before training: a wrong path fails at once
    train, heldout = split_heldout(lines, cfg.heldout_fraction, cfg.seed)
    if not train:
        raise ValueError(f"corpus={corpus}: every line was held out (heldout_fraction={cfg.heldout_fraction})")

    chinese = train_chinese_model(train, cfg, base)
    selection = select_pieces(base, chinese)
    base_size = len(base.pieces)
    merged = merge_pieces(base, selection.pieces)
    unreachable = [merged.pieces[i].piece for i in unreachable_ids(merged, base_size)]
    if unreachable and cfg.drop_unreachable:  # dropping one changes no other piece's merges (see unreachable_ids)
        dropped = set(unreachable)
        kept = [(p.piece, p.score) for p in merged.pieces[base_size:] if p.piece not in dropped]
        merged = merge_pieces(base, [piece for piece, _ in kept], [score for _, score in kept])
    still_unreachable = [merged.pieces[i].piece for i in unreachable_ids(merged, base_size)]
    added = len(merged.pieces) - base_size
    padding = pad_vocabulary(merged, cfg.pad_to_multiple_of)
    assert [(p.piece, p.score, p.type) for p in merged.pieces[:base_size]] == [
        (p.piece, p.score, p.type) for p in base.pieces]

    tokenizer_json = merged_hf_tokenizer(base_json, merged, base_size)
    written = write_tokenizer_dir(out, base_dir, merged, tokenizer_json)

    base_sp = spm.SentencePieceProcessor(model_proto=base.SerializeToString())
    merged_sp = spm.SentencePieceProcessor(model_proto=merged.SerializeToString())
    report = {
        "base": base_dir, "out": out, "corpus_files": files, "corpus_lines": len(lines),
        "base_pieces": base_size, "vocab_size": len(merged.pieces), "added_pieces": added, "padding_pieces": padding,
        "chinese_model": {"vocab_size": cfg.vocab_size,
                          **{key: value for key, value in asdict(selection).items() if key != "pieces"}},
        "dropped_unreachable": len(unreachable) if cfg.drop_unreachable else 0,
        "unreachable": still_unreachable, "examples_dropped": unreachable[:10] if cfg.drop_unreachable else [],
        "heldout": compare_encodings(base_sp, merged_sp, heldout),
        "english": compare_encodings(base_sp, merged_sp, english),
        "hf_matches_sentencepiece": compare_hf(out, merged_sp, heldout[:HF_CHECK_TEXTS] + english[:HF_CHECK_TEXTS]),
        "files": written,
    }
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, ensure_ascii=False, indent=1)
    return report


def format_report(report: dict) -> str:
    """The report as a few lines of text."""
    trained = report["chinese_model"]
    lines = [f"base {report['base_pieces']:,} pieces + {report['added_pieces']:,} Chinese pieces + "
             f"{report['padding_pieces']} unused = {report['vocab_size']:,} (trained {trained['trained']:,}: "
             f"{trained['already_in_base']:,} already in the base, {trained['without_chinese']:,} without a Chinese "
             f"character, {trained['missing_characters']:,} with a character not in the vocabulary, "
             f"{report['dropped_unreachable']:,} unreachable dropped)"]
    for name, title in (("heldout", "held-out corpus lines"), ("english", "English texts")):
        part = report[name]
        if part["texts"]:
            lines.append(f"{title} ({part['texts']:,}, {part['characters']:,} characters): tokens per character "
                         f"{part['tokens_per_char_before']} -> {part['tokens_per_char_after']}; ids unchanged in "
                         f"{part['texts'] - part['ids_changed']:,} of {part['texts']:,}")
        else:
            lines.append(f"{title}: none")
    hf = report["hf_matches_sentencepiece"]
    lines.append(f"Hugging Face tokenizer gives SentencePiece's ids on {hf['texts'] - hf['differ']:,} of "
                 f"{hf['texts']:,} texts" + (f"; differs on e.g. {hf['examples'][:2]}" if hf["differ"] else ""))
    if report["unreachable"]:
        lines.append(f"unreachable new pieces kept: {len(report['unreachable'])}, e.g. {report['unreachable'][:5]}")
    lines.append(f"wrote {report['out']}: {', '.join(report['files'])}, report.json")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="vocab", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        report = build_vocabulary(cfg)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(format_report(report))


if __name__ == "__main__":
    register_app_configs()
    main()
