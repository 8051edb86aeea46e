#!/usr/bin/env python
"""Rebuild Meta's Llama-2 tokenizer (a SentencePiece ``tokenizer.model`` + Hugging Face files) for tests.

No model hub is reachable from our test machines, but the npm registry is, and the npm package
``llama-tokenizer-js`` (MIT, pinned below by version and tarball hash) embeds the Llama-1/Llama-2 tokenizer:

* the 32,000 pieces in id order (``<unk>``, ``<s>``, ``</s>``, the byte pieces ``<0x00>``..``<0xFF>`` at ids 3..258,
  then the BPE pieces);
* the 61,249 BPE merges, in rank order, of the ``tokenizer.json`` Meta shipped with the Hugging Face checkpoints;
* a small test suite whose expected ids were produced by the real tokenizer.

The vocabulary is never committed here (licence): this script builds it at test time into a cache directory
(``~/.cache/llama2_sft_test_assets/llama2`` or ``$LLAMA2_SFT_TEST_ASSETS/llama2``) and reuses it afterwards.

How the SentencePiece scores are recovered. A SentencePiece BPE model merges, at every step, the adjacent pair whose
concatenation is the vocabulary piece with the highest score (ties: leftmost pair first), so the scores' order is all
that matters for encoding. Hugging Face's 2023 converter (``SentencePieceExtractor``) built the shipped merge list by
listing every split ``(left, right)`` of every piece, left and right in vocabulary-id order, and stable-sorting by the
merged piece's score, descending. The merge list therefore spells out the score order, and `infer_scores` checks (and
refuses to build unless) the package's list is exactly what that converter produces from the scores we assign:

* every multi-character piece except the whitespace runs gets ``score = -(id - 259)`` (what SentencePiece's BPE
  trainer writes: minus the piece's rank), the single characters at the end of the vocabulary likewise;
* the 15 whitespace-only pieces (``"▁" * n`` for n = 2..16) get one shared score below all others (Meta's file has
  ``-1e9`` there: runs of spaces are merged last, left to right);
* ``<unk>``, ``<s>``, ``</s>`` and the byte pieces get 0, with types UNKNOWN, CONTROL, CONTROL, BYTE.

Trainer and normalizer specs copy the fields of Meta's file that matter for encoding (BPE, byte fallback, identity
normalization, ``add_dummy_prefix=True``, ``remove_extra_whitespaces=False``, split_digits, unk/bos/eos ids 0/1/2).

Usage: ``python tests/assets/make_llama2_tokenizer.py [OUT_DIR]`` prints the directory (or exits 1 if npm or the
network is unavailable). In Python: ``build(out_dir=None) -> Path | None``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NPM_PACKAGE = "llama-tokenizer-js"
NPM_VERSION = "1.2.2"
# `npm view llama-tokenizer-js@1.2.2 dist.integrity`: a republished or tampered tarball is rejected.
NPM_INTEGRITY = "sha512-Wmth393dc3odWU3IzARJ3r2oIfWgw9GdJ5Gm+hGhfECNO18UHLRqEFSf511jn4E9KcQGzuuKw4Wl08pHAemLAw=="
JS_FILE = "package/llama-tokenizer.js"
# Bump when the files written below change, so that stale caches are rebuilt.
BUILDER_VERSION = 1

VOCAB_SIZE = 32000
NUM_MERGES = 61249
FIRST_BPE_ID = 259  # 3 special pieces + 256 byte pieces
WHITESPACE_SCORE = -1e9
SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol

# Texts the package's JS encoder (Hugging Face BPE semantics on Meta's merges, dummy prefix always added) encodes at
# build time, so that the tests can compare it with SentencePiece on the rebuilt model (they agree on all of them).
VARIED_TEXTS = [
    "Hello world",
    " Hello",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "[INST] What is 2+2? [/INST] It is 4. ",
    "<<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi there",
    "我想在apple工作1314151天～",
    "你好，世界！今天天气怎么样？",
    "日本語のテキストと한국어 텍스트",
    "Emoji: \U0001f999\U0001f680\U0001f600\U0001f44d\U0001f3fd and \U0001f9d1\u200d\U0001f4bb and \u2764\ufe0f",
    "def f(x):\n    if x:\n        return x  # two spaces\n\treturn None\n",
    "Numbers 1234567890 3.14159 -42 1e10 2023-07-18",
    "a  b   c    d     e      f       g        h",
    " " * 17 + "x",
    " " * 33 + "deep indent",
    "trailing spaces   ",
    "\n\n\n  \n \t\t \n",
    "Literal tokens: <s> </s> <unk> [INST] <<SYS>> stay text",
    "Ünïcödé àccents, naïve café, Ελληνικά, русский текст, עברית, العربية",
    "Zero-width\u200bjoiner\u200dand\ufeffBOM and control \x07 chars",
    "ied 4 ½ months",
    "```python\nprint('hi')\n```",
    "URL https://example.com/path?q=1&r=2#frag",
    "Mixed\r\nline\rendings",
]


def default_cache_dir() -> Path:
    root = os.environ.get("LLAMA2_SFT_TEST_ASSETS")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "llama2_sft_test_assets")
    return Path(root) / "llama2"


# --------------------------------------------------------------------------------------------------------------------
# Fetching and parsing the npm package


def fetch_package_source(work_dir: Path, timeout: float = 90.0) -> str | None:
    """`npm pack` the pinned package into work_dir and return llama-tokenizer.js; None if npm or the network fails."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false",
               # fail fast when offline instead of retrying for minutes; a cached tarball is used without the network
               npm_config_fetch_retries="1", npm_config_fetch_timeout="30000", npm_config_prefer_offline="true")
    try:
        proc = subprocess.run(
            [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--silent", "--pack-destination", str(work_dir)],
            cwd=work_dir, env=env, capture_output=True, text=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    tarballs = sorted(work_dir.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        return None
    data = tarballs[0].read_bytes()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if integrity != NPM_INTEGRITY:
        raise RuntimeError(f"{tarballs[0].name}: integrity {integrity} != pinned {NPM_INTEGRITY}")
    with tarfile.open(tarballs[0], "r:gz") as tar:
        member = tar.extractfile(JS_FILE)
        if member is None:
            raise RuntimeError(f"{tarballs[0].name} has no {JS_FILE}")
        return member.read().decode("utf-8")


def parse_vocab_and_merges(js_source: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The pieces (index = id) and the merges (rank order, as (left id, right id)) embedded in llama-tokenizer.js."""
    vocab_b64 = re.search(r'const llama_vocab_base64 = "([A-Za-z0-9+/=]*)"', js_source)
    merges_b64 = re.search(r'const llama_merges_binary = "([A-Za-z0-9+/=]*)"', js_source)
    if not vocab_b64 or not merges_b64:
        raise RuntimeError("llama-tokenizer.js: vocabulary or merge data not found")
    pieces = base64.b64decode(vocab_b64.group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)  # data-conversion.py: struct.pack('H') on little-endian
    merges = list(zip(ids[0::2], ids[1::2]))
    if len(pieces) != VOCAB_SIZE or len(set(pieces)) != VOCAB_SIZE or len(merges) != NUM_MERGES:
        raise RuntimeError(f"unexpected data: {len(pieces)} pieces ({len(set(pieces))} distinct), {len(merges)} merges")
    return pieces, merges


_JS_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "b": "\b", "f": "\f", "v": "\v"}


def _js_unescape(body: str) -> str:
    def repl(m: re.Match) -> str:
        esc = m.group(1)
        if esc[0] == "u":
            return chr(int(esc[1:], 16))
        return _JS_ESCAPES.get(esc, esc)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", repl, body, flags=re.S)


def parse_reference_cases(js_source: str) -> list[dict]:
    """The package's own test cases: ``testCase(text, [1, ...ids])`` (ids from the real tokenizer, BOS first)."""
    pattern = re.compile(r"""testCase\(\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*,\s*\[([\d,\s]*)\]\s*\)""", re.S)
    cases = []
    for m in pattern.finditer(js_source):
        text = _js_unescape(m.group(1)[1:-1])
        ids = [int(x) for x in m.group(2).replace(",", " ").split()]
        if not ids or ids[0] != 1:
            raise RuntimeError(f"reference case {text!r:.40} does not start with BOS")
        cases.append({"text": text, "ids": ids[1:]})
    if not cases:
        raise RuntimeError("llama-tokenizer.js: no testCase(...) found")
    return cases


# --------------------------------------------------------------------------------------------------------------------
# Scores and the SentencePiece model


def is_whitespace_run(piece: str) -> bool:
    return len(piece) >= 2 and set(piece) == {SPACE}


def infer_scores(pieces: list[str]) -> list[float]:
    scores = [0.0] * FIRST_BPE_ID
    for i in range(FIRST_BPE_ID, len(pieces)):
        scores.append(WHITESPACE_SCORE if is_whitespace_run(pieces[i]) else -float(i - FIRST_BPE_ID))
    return scores


def converter_merges(pieces: list[str], scores: list[float]) -> list[tuple[int, int]]:
    """The merges Hugging Face's 2023 `SentencePieceExtractor.extract(vocab_scores)` derives from a model.

    It looped ``for piece_l in vocab: for piece_r in vocab:`` (id order), kept the pair when ``vocab_scores.get(l + r)``
    was truthy, then stable-sorted by that score, descending: i.e. the order (-score, left id, right id).
    """
    index = {p: i for i, p in enumerate(pieces)}
    found = []
    for merged_id, merged in enumerate(pieces):
        score = scores[merged_id]
        if not score:
            continue
        for k in range(1, len(merged)):
            left, right = index.get(merged[:k]), index.get(merged[k:])
            if left is not None and right is not None:
                found.append((-score, left, right))
    found.sort()
    return [(left, right) for _, left, right in found]


def check_scores_against_merges(pieces: list[str], merges: list[tuple[int, int]], scores: list[float]) -> None:
    regenerated = converter_merges(pieces, scores)
    if regenerated != merges:
        differing = (k for k, (a, b) in enumerate(zip(regenerated, merges)) if a != b)
        first = next(differing, min(len(regenerated), len(merges)))
        raise RuntimeError(
            f"inferred scores do not reproduce the package's merge list (first difference at rank {first} of "
            f"{len(merges)}; regenerated {len(regenerated)} merges)"
        )


def model_proto_bytes(pieces: list[str], scores: list[float]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    for i, (piece, score) in enumerate(zip(pieces, scores)):
        p = m.pieces.add()
        p.piece, p.score = piece, score
        if i == 0:
            p.type = pb.ModelProto.SentencePiece.UNKNOWN
        elif i in (1, 2):
            p.type = pb.ModelProto.SentencePiece.CONTROL
        elif i < FIRST_BPE_ID:
            if piece != f"<0x{i - 3:02X}>":
                raise RuntimeError(f"id {i}: expected byte piece <0x{i - 3:02X}>, got {piece!r}")
            p.type = pb.ModelProto.SentencePiece.BYTE
        # NORMAL pieces keep the default type, unset, as in Meta's file.
    if pieces[:3] != ["<unk>", "<s>", "</s>"]:
        raise RuntimeError(f"unexpected special pieces {pieces[:3]}")

    t = m.trainer_spec  # Meta's values (those that matter for encoding, and the descriptive ones)
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.character_coverage = 0.99995
    t.max_sentencepiece_length = 16
    t.max_sentence_length = 4192
    t.split_by_unicode_script = True
    t.split_by_number = True
    t.split_by_whitespace = True
    t.treat_whitespace_as_suffix = False
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.byte_fallback = True
    t.vocabulary_output_piece_score = True
    t.hard_vocab_limit = True
    t.use_all_vocab = False
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    t.unk_surface = " \u2047 "
    n = m.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m.SerializeToString()


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face files (as in meta-llama/Llama-2-7b-chat-hf)

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]"
    "['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message "
    "in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
    "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set "
    "content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + "
    "eos_token }}{% endif %}{% endfor %}"
)


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_special("<s>")},
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_special("</s>")},
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **_special("<unk>")},
    }


def special_tokens_map() -> dict:
    return {"bos_token": _special("<s>"), "eos_token": _special("</s>"), "unk_token": _special("<unk>")}


def tokenizer_json(pieces: list[str], merges: list[tuple[int, int]]) -> dict:
    """Meta's ``tokenizer.json`` layout: the legacy Llama normalizer (prepend ▁, spaces -> ▁) and the shipped merges."""
    added = [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i in range(3)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
            "vocab": {p: i for i, p in enumerate(pieces)},
            "merges": [f"{pieces[a]} {pieces[b]}" for a, b in merges],
        },
    }


# --------------------------------------------------------------------------------------------------------------------
# Reference encodings from the JS encoder (optional: needs node, which comes with npm)


def js_encodings(js_source: str, texts: list[str], work_dir: Path, timeout: float = 60.0) -> list[list[int]] | None:
    node = shutil.which("node")
    if node is None:
        return None
    module = work_dir / "llama-tokenizer.mjs"
    module.write_text(js_source, encoding="utf-8")
    (work_dir / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    script = work_dir / "encode.mjs"
    script.write_text(
        "import fs from 'fs';\n"
        "import tok from './llama-tokenizer.mjs';\n"
        "const texts = JSON.parse(fs.readFileSync(new URL('./texts.json', import.meta.url), 'utf8'));\n"
        "process.stdout.write(JSON.stringify(texts.map(t => t.length ? tok.encode(t, false, true) : [])));\n",
        encoding="utf-8",
    )
    try:
        proc = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------------------------------------------------


FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "reference.json")


def _build_info() -> dict:
    texts_digest = hashlib.sha256(json.dumps(VARIED_TEXTS).encode("utf-8")).hexdigest()
    return {"builder_version": BUILDER_VERSION, "npm_package": NPM_PACKAGE, "npm_version": NPM_VERSION,
            "npm_integrity": NPM_INTEGRITY, "varied_texts_sha256": texts_digest}


def is_built(out_dir: Path) -> bool:
    try:
        info = json.loads((out_dir / "build_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info == _build_info() and all((out_dir / name).is_file() for name in FILES)


def write_directory(js_source: str, out_dir: Path, work_dir: Path) -> None:
    pieces, merges = parse_vocab_and_merges(js_source)
    scores = infer_scores(pieces)
    check_scores_against_merges(pieces, merges, scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model_proto_bytes(pieces, scores))

    def dump(name: str, obj: dict, **kwargs) -> None:
        (out_dir / name).write_text(json.dumps(obj, ensure_ascii=False, **kwargs) + "\n", encoding="utf-8")

    dump("tokenizer.json", tokenizer_json(pieces, merges))
    dump("tokenizer_config.json", tokenizer_config(), indent=2)
    dump("special_tokens_map.json", special_tokens_map(), indent=2)
    reference = {
        "source": f"{NPM_PACKAGE}@{NPM_VERSION}",
        # Expected ids from the real tokenizer (the package's test suite), without the leading BOS.
        "package_cases": parse_reference_cases(js_source),
        # The package's own encoder (Hugging Face BPE semantics, Meta's merges) on VARIED_TEXTS; null without node.
        "js_encoder": None,
    }
    encoded = js_encodings(js_source, VARIED_TEXTS, work_dir)
    if encoded is not None:
        reference["js_encoder"] = [{"text": t, "ids": ids} for t, ids in zip(VARIED_TEXTS, encoded)]
    dump("reference.json", reference, indent=1)
    dump("build_info.json", _build_info(), indent=2)  # last: marks the directory complete


def build(out_dir: str | os.PathLike | None = None, *, timeout: float = 90.0, force: bool = False) -> Path | None:
    """Build (or reuse) the Llama-2 tokenizer directory; None if npm or the registry is unavailable.

    Raises RuntimeError if the package was fetched but its data does not check out (wrong hash, unexpected layout,
    merges that the inferred scores do not reproduce): that is a real failure, not a missing prerequisite.
    """
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    if not force and is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama2-tok-", dir=out.parent) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        js_source = fetch_package_source(work, timeout=timeout)
        if js_source is None:
            return None
        staged = Path(tmp) / "out"
        write_directory(js_source, staged, work)
        if out.exists():
            if not force and is_built(out):  # built concurrently by another process
                return out
            shutil.rmtree(out)
        try:
            os.replace(staged, out)
        except OSError:
            if not is_built(out):
                raise
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help=f"default: {default_cache_dir()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    args = parser.parse_args(argv)
    path = build(args.out_dir, force=args.force)
    if path is None:
        print("could not build: npm is missing or the npm registry is unreachable", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
