"""The embedded SFT data (data/make_embedded.py -> data/*.jsonl) and its tiny Llama-2 style tokenizer (data/tokenizer/)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
MAKE_EMBEDDED = DATA / "make_embedded.py"
TOKENIZER_DIR = DATA / "tokenizer"
CJK = re.compile(r"[\u4e00-\u9fff]")


def _make_embedded(out_dir: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(MAKE_EMBEDDED), "--out-dir", str(out_dir), *args], check=True, capture_output=True)


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    return _read(DATA / "train.jsonl")


@pytest.fixture(scope="module")
def eval_rows() -> list[dict]:
    return _read(DATA / "eval.jsonl")


def _humans(row: dict) -> list[str]:
    return [t["value"] for t in row["conversations"] if t["from"] == "human"]


def _pairs(row: dict) -> list[tuple[str, str]]:
    c = row["conversations"]
    return [(c[i]["value"], c[i + 1]["value"]) for i in range(0, len(c), 2)]


# --------------------------------------------------------------------------------------------- generator


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a, b, other_seed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _make_embedded(a, "--num-train", "300", "--num-eval", "40")
    _make_embedded(b, "--num-train", "300", "--num-eval", "40")
    _make_embedded(other_seed, "--num-train", "300", "--num-eval", "40", "--seed", "99")
    for name in ("train.jsonl", "eval.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() != (other_seed / name).read_bytes(), f"--seed is ignored for {name}"
    assert len(_read(a / "train.jsonl")) == 300
    assert len(_read(a / "eval.jsonl")) == 40


def test_committed_data_is_what_the_generator_writes_by_default(tmp_path: Path) -> None:
    _make_embedded(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"data/{name} is stale: rerun data/make_embedded.py"


def test_committed_data_has_default_sizes_and_fits_the_size_budget(train_rows, eval_rows) -> None:
    assert len(train_rows) == 6000
    assert len(eval_rows) == 300
    total = (DATA / "train.jsonl").stat().st_size + (DATA / "eval.jsonl").stat().st_size
    assert total < 2.5 * 1024 * 1024


def test_rows_follow_sharegpt_schema_and_alternate_roles(train_rows, eval_rows) -> None:
    ids = [row["id"] for row in train_rows + eval_rows]
    assert len(set(ids)) == len(ids)
    for row in train_rows + eval_rows:
        assert set(row) == {"id", "conversations", "instruction", "task"}, row  # task: its last turn's, for reports
        assert row["task"] in {"reverse", "upper", "repeat", "next_num", "prev_num", "next_letter", "prev_letter",
                               "kth_item", "sort_digits", "add", "compare", "max_of_two"}, row["id"]
        assert isinstance(row["id"], str) and row["id"]
        assert isinstance(row["instruction"], str)
        assert row["instruction"] == row["instruction"].strip()
        conv = row["conversations"]
        assert 2 <= len(conv) <= 10 and len(conv) % 2 == 0, row["id"]
        for i, turn in enumerate(conv):
            assert set(turn) == {"from", "value"}, row["id"]
            assert turn["from"] == ("human" if i % 2 == 0 else "gpt"), row["id"]
            assert isinstance(turn["value"], str) and turn["value"], row["id"]
            assert turn["value"] == turn["value"].strip(), row["id"]
            assert "\n" not in turn["value"]


def test_answers_are_short(train_rows, eval_rows) -> None:
    answers = [t["value"] for row in train_rows + eval_rows for t in row["conversations"] if t["from"] == "gpt"]
    assert max(len(a) for a in answers) <= 24
    assert sum(len(a) for a in answers) / len(answers) < 6


def test_eval_prompts_do_not_appear_in_train(train_rows, eval_rows) -> None:
    train_humans = {h for row in train_rows for h in _humans(row)}
    first_turns = {row["conversations"][0]["value"] for row in train_rows + eval_rows}
    for row in eval_rows:
        assert row["conversations"][0]["value"] not in train_humans, row["id"]
    shared = {h for row in eval_rows for h in _humans(row)} & train_humans
    # only generic, context-dependent follow-ups ("And the one after that?") may be shared
    assert shared, "expected shared generic follow-up questions"
    assert not shared & first_turns, sorted(shared & first_turns)[:5]
    train_keys = {json.dumps([r["instruction"], r["conversations"]], ensure_ascii=False) for r in train_rows}
    assert not any(json.dumps([r["instruction"], r["conversations"]], ensure_ascii=False) in train_keys for r in eval_rows)


def test_both_languages_and_multi_turn_rows_are_present(train_rows, eval_rows) -> None:
    for rows in (train_rows, eval_rows):
        n = len(rows)
        zh = sum(bool(CJK.search(row["conversations"][0]["value"])) for row in rows)
        assert 0.35 < zh / n < 0.65
        turns = [len(row["conversations"]) // 2 for row in rows]
        assert 0.2 < sum(t > 1 for t in turns) / n < 0.4
        assert max(turns) == 5
        with_system = [row["instruction"] for row in rows if row["instruction"]]
        assert 0.3 < len(with_system) / n < 0.7
        assert any(CJK.search(s) for s in with_system) and any(not CJK.search(s) for s in with_system)


def _expected_answer(prompt: str, instruction: str) -> str | None:
    """Independent re-implementation of a subset of the task rules (None: no rule here for this prompt)."""
    caps = instruction in ("Reply YES or NO in capitals.", "用“对”或“错”回答。")
    rules = [
        (r"What is (\d) \+ (\d)\?", lambda a, b: str(int(a) + int(b))),
        (r"(\d) 加 (\d) 等于几？", lambda a, b: str(int(a) + int(b))),
        (r"Reverse the letters: ([a-z](?: [a-z])+)", lambda s: " ".join(s.split()[::-1])),
        (r"把 ([a-z](?: [a-z])+) 倒过来写", lambda s: " ".join(s.split()[::-1])),
        (r"What number comes after (\d+)\?", lambda n: str(int(n) + 1)),
        (r"(\d+) 前面的数是几？", lambda n: str(int(n) - 1)),
        (r"Which letter comes after ([a-y])\?", lambda c: chr(ord(c) + 1)),
        (r"字母 ([b-z]) 的前一个字母是什么？", lambda c: chr(ord(c) - 1)),
        (r"Write (\w+) in uppercase\.", lambda w: w.upper()),
        (r"Repeat the word (\w+) (\d) times\.", lambda w, n: " ".join([w] * int(n))),
        (r"What is the (\d)(?:st|nd|rd|th) item in the list: (.+)\?", lambda k, s: s.split(", ")[int(k) - 1]),
        (r"Sort these digits from smallest to largest: (\d) (\d) (\d)", lambda *d: " ".join(sorted(d))),
        (r"Which is larger, (\d+) or (\d+)\?", lambda a, b: str(max(int(a), int(b)))),
        (r"Is (\d+) greater than (\d+)\?",
         lambda a, b: ("YES" if caps else "yes") if int(a) > int(b) else ("NO" if caps else "no")),
        (r"(\d+) 比 (\d+) 小吗？", lambda a, b: ("对" if caps else "是") if int(a) < int(b) else ("错" if caps else "否")),
    ]
    for pattern, rule in rules:
        m = re.fullmatch(pattern, prompt)
        if m:
            return rule(*m.groups())
    return None


def test_answers_follow_the_task_rules(train_rows, eval_rows) -> None:
    checked = 0
    for row in train_rows + eval_rows:
        previous = None
        for prompt, answer in _pairs(row):
            expected = _expected_answer(prompt, row["instruction"])
            if expected is None and prompt in ("And the one after that?", "再下一个呢？") and previous is not None:
                expected = str(int(previous) + 1) if previous.isdigit() else chr(ord(previous) + 1)
            if expected is not None:
                assert answer == expected, (row["id"], prompt, answer, expected)
                checked += 1
            previous = answer
    assert checked > 1500


# --------------------------------------------------------------------------------------------- tokenizer


def test_built_tokenizer_loads_with_autotokenizer_with_llama_special_ids(tmp_path: Path) -> None:
    from llama2_sft.data.spm import train_tokenizer

    out = train_tokenizer([str(DATA / "eval.jsonl")], str(tmp_path / "tok"), vocab_size=512)
    assert sorted(p.name for p in Path(out).iterdir()) == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((Path(out) / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert "Llama" in type(tok).__name__
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert len(tok) == 512
    ids = tok("3 加 4 等于几？")["input_ids"]
    assert ids[0] == 1 and 2 not in ids

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(out) / "tokenizer.model"))
    assert ids[1:] == sp.encode("3 加 4 等于几？")


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    from llama2_sft.data.spm import train_tokenizer

    a = train_tokenizer([str(DATA / "eval.jsonl")], str(tmp_path / "a"), vocab_size=512)
    b = train_tokenizer([str(DATA / "eval.jsonl")], str(tmp_path / "b"), vocab_size=512)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name


def test_committed_tokenizer_is_rebuilt_byte_identically_by_the_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "llama2_sft.data.spm", "--data", str(DATA / "train.jsonl"), str(DATA / "eval.jsonl"),
           "--out", str(tmp_path / "tok"), "--vocab-size", "1024"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))


def test_committed_tokenizer_uses_llama2_settings(sp) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((TOKENIZER_DIR / "tokenizer.model").read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == pb.TrainerSpec.BPE
    assert t.byte_fallback and t.split_digits and t.allow_whitespace_only_pieces
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces) == ("identity", True, False)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.piece_to_id("<0x0A>") == 13  # bytes right after the specials, as in Llama-2
    assert sp.get_piece_size() == json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())["vocab_size"]
    assert sp.encode("12345", out_type=str) == ["▁", "1", "2", "3", "4", "5"]


def test_committed_tokenizer_has_a_piece_for_every_character_in_the_data(sp, train_rows, eval_rows) -> None:
    chars = {c for row in train_rows + eval_rows for t in row["conversations"] for c in t["value"]}
    chars |= {c for row in train_rows + eval_rows for c in row["instruction"]}
    chars.discard(" ")
    missing = sorted(c for c in chars if sp.piece_to_id(c) == sp.unk_id())
    assert not missing, missing
    assert sum(bool(CJK.match(c)) for c in chars) > 50


def test_committed_tokenizer_encodes_chat_template_literals_compactly(sp) -> None:
    for literal in ("[INST]", "[/INST]", "<<SYS>>"):
        assert len(sp.encode(literal)) <= 3, (literal, sp.encode(literal, out_type=str))


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！今天天气怎么样？",
        "把 a b c 倒过来写",
        "emoji 😀 and 👍🏽 and 🇨🇳",
        "a  b   c",
        "  two leading spaces",
        "line1\n  indented\n\tTabbed\n",
        "def f(x):\n    return x  # four-space indent",
        "mixed 中文 and English 123 ½ ü é",
        "</s> <s> [INST] <<SYS>>",
    ],
)
def test_committed_tokenizer_round_trips_chinese_and_emoji_text(sp, text: str) -> None:
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text


def test_committed_tokenizer_falls_back_to_bytes_for_unseen_characters(sp) -> None:
    pieces = sp.encode("😀", out_type=str)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
