"""python -m llama2_sft.vocab: a Chinese SentencePiece model merged into the bundled 1,024-piece tokenizer (and, when
tests/assets/make_llama2_tokenizer.py can rebuild it, into the real 32k Llama-2 vocabulary). Checked with SentencePiece
and transformers directly: base ids unchanged, new pieces reachable, padding never emitted, English ids unchanged,
fewer tokens per Chinese character, and the Hugging Face tokenizer giving SentencePiece's ids."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

spm = pytest.importorskip("sentencepiece")
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

from llama2_sft.config import VocabConfig  # noqa: E402
from llama2_sft.vocab import (NORMAL, UNUSED, build_vocabulary, has_chinese, load_base, merge_pieces,  # noqa: E402
                              unreachable_ids)

WORDS = ("我们 你们 他们 今天 明天 昨天 天气 学习 工作 中国 北京 上海 城市 朋友 老师 学生 学校 电脑 手机 问题 答案 时间 "
         "地方 东西 事情 生活 世界 国家 人民 经济 发展 社会 文化 历史 科学 技术 研究 方法 语言 文字 音乐 电影 喜欢 认为 "
         "知道 觉得 需要 希望 开始 结束 继续 帮助 告诉 回答 准备 参加 讨论 解决 提高 增加 减少 改变 非常 特别 已经 可能 "
         "应该 一起 一定 所以 因为 但是 如果 虽然 而且 或者 还是 然后 现在 以后 以前 漂亮 重要 简单 容易 困难 高兴 快乐 "
         "安静 干净 健康 美丽 有名 新鲜 方便 有趣 认真 努力 苹果 米饭 面条 咖啡 牛奶 水果 蔬菜 医院 银行 商店 公司 火车 "
         "飞机 汽车 公园 图书馆 博物馆 大学 医生").split()
ENGLISH = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "[INST] What is 2+2? [/INST] It is 4. ",
    "<<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi there", "def f(x):\n    if x:\n        return x  # two spaces\n",
    "Numbers 1234567890 3.14159 -42 1e10", "a  b   c    d", "Emoji \U0001f999\U0001f680 and \u2764\ufe0f", "café naïve",
    "Literal tokens: <s> </s> <unk> <unused0> <unused1> stay text", "URL https://example.com/path?q=1&r=2#frag",
]
MIXED = ["我想在apple工作1314151天～", "今天天气 good，明天 rain。", "中国 北京\n上海  城市", "图书馆🦙博物馆", "用 Python 写代码：print('你好')",
         "a</s>我们<s>b", "１２３４５ＡＢＣ全角", "一定一起\t一定一起"]


def chinese_sentences(count: int, seed: int) -> list[str]:
    """Sentences of clauses of 2-6 common words."""
    rng = random.Random(seed)
    return ["，".join("".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(1, 4)))
            + rng.choice("。！？") for _ in range(count)]


def train_rows_with_chinese() -> list[str]:
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [json.dumps(row, ensure_ascii=False) for row in rows
            if any(has_chinese(turn["value"]) for turn in row["conversations"])]


def english_texts() -> list[str]:
    """ENGLISH and the turns of data/eval.jsonl without a Chinese character."""
    with open(os.path.join(REPO, "data", "eval.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return ENGLISH + [turn["value"] for row in rows for turn in row["conversations"] if not has_chinese(turn["value"])]


def vocab_config(**values) -> VocabConfig:
    values.setdefault("vocab_size", 700)
    values.setdefault("num_threads", 1)  # deterministic and light on a shared machine
    return VocabConfig(**values)


def processor(path) -> "spm.SentencePieceProcessor":
    return spm.SentencePieceProcessor(model_file=str(path))


def proto_of(path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


@pytest.fixture
def corpus(chinese_corpus) -> list[str]:
    """A generated text file plus a jsonl of the Chinese chat rows of data/train.jsonl (tests/conftest.py)."""
    return chinese_corpus


@pytest.fixture
def merged(extended_vocab) -> dict:
    """The bundled tokenizer extended on `corpus` (tests/conftest.py, built once per session)."""
    return extended_vocab


# ---------------------------------------------------------------------------------------------------- the vocabulary
def test_base_ids_and_pieces_are_unchanged(merged, sp_model_file):
    base, new = proto_of(sp_model_file), proto_of(merged["model"])
    assert len(new.pieces) > len(base.pieces)
    assert [(p.piece, p.score, p.type) for p in new.pieces[:len(base.pieces)]] == [
        (p.piece, p.score, p.type) for p in base.pieces]
    assert (new.trainer_spec.model_type, new.normalizer_spec) == (base.trainer_spec.model_type, base.normalizer_spec)
    report = merged["report"]
    assert report["base_pieces"] == len(base.pieces) and report["vocab_size"] == len(new.pieces)


def test_new_pieces_hold_chinese_score_above_every_base_piece_and_are_new(merged, sp_model_file):
    base, new = proto_of(sp_model_file), proto_of(merged["model"])
    added = [p for p in new.pieces[len(base.pieces):] if p.type == NORMAL]
    assert len(added) == merged["report"]["added_pieces"] > 100
    assert all(has_chinese(p.piece) for p in added)
    assert not {p.piece for p in added} & {p.piece for p in base.pieces}
    top = max(p.score for p in base.pieces if p.type == NORMAL)
    scores = [p.score for p in added]
    assert min(scores) > top and scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_every_new_piece_is_reachable_and_dropped_ones_are_reported(merged, sp_model_file):
    new = proto_of(merged["model"])
    sp = processor(merged["model"])
    no_prefix = sentencepiece_model_pb2.ModelProto()
    no_prefix.CopyFrom(new)
    no_prefix.normalizer_spec.add_dummy_prefix = False
    sp_no_prefix = spm.SentencePieceProcessor(model_proto=no_prefix.SerializeToString())
    base_size = len(proto_of(sp_model_file).pieces)
    for index in range(base_size, len(new.pieces)):
        piece = new.pieces[index].piece
        if new.pieces[index].type != NORMAL:
            continue
        if piece.startswith("\u2581"):  # "▁X": the dummy prefix of text "X" at the start of a line
            assert sp.encode(piece[1:].replace("\u2581", " ")) == [index], piece
        else:  # "X" inside a text, where no dummy prefix precedes it
            assert sp_no_prefix.encode(piece.replace("\u2581", " ")) == [index], piece
    report = merged["report"]
    assert report["unreachable"] == [] and report["dropped_unreachable"] > 0
    assert all(has_chinese(piece) for piece in report["examples_dropped"])


def test_a_piece_without_a_split_into_two_pieces_is_unreachable_until_one_exists(sp_model_file):
    _, base = load_base(os.path.dirname(sp_model_file))
    first = len(base.pieces)
    characters = [ch for ch in "鼹鼠窝" if ch not in {p.piece for p in base.pieces}]
    lonely = merge_pieces(base, characters + ["鼹鼠窝"])  # neither "鼹鼠" nor "鼠窝" is a piece
    assert unreachable_ids(lonely, first) == [first + len(characters)]
    assert unreachable_ids(merge_pieces(base, characters + ["鼹鼠", "鼹鼠窝"]), first) == []


def test_vocabulary_is_padded_to_a_multiple_of_64_with_pieces_encoding_never_emits(merged, sp_model_file):
    from transformers import AutoTokenizer

    new = proto_of(merged["model"])
    assert len(new.pieces) % 64 == 0
    placeholders = [i for i, p in enumerate(new.pieces) if p.type == UNUSED]
    assert len(placeholders) == merged["report"]["padding_pieces"] < 64
    assert placeholders == list(range(len(new.pieces) - len(placeholders), len(new.pieces)))
    sp = processor(merged["model"])
    hf = AutoTokenizer.from_pretrained(merged["out"])
    texts = [new.pieces[i].piece for i in placeholders] + ["x" + "".join(new.pieces[i].piece for i in placeholders)]
    for text in texts + ENGLISH + MIXED:
        assert not set(sp.encode(text)) & set(placeholders), text
        assert not set(hf(text, add_special_tokens=False)["input_ids"]) & set(placeholders), text


def test_english_ids_are_unchanged(merged, sp_model_file):
    base, new = processor(sp_model_file), processor(merged["model"])
    english = english_texts()
    assert len(english) > 500
    assert new.encode(english) == base.encode(english)
    report = merged["report"]["english"]
    assert report["texts"] > 500 and report["ids_unchanged"] and report["ids_changed"] == 0
    assert report["tokens_per_char_after"] == report["tokens_per_char_before"]


def test_chinese_tokens_per_character_go_down(merged, sp_model_file):
    heldout = merged["report"]["heldout"]
    assert heldout["texts"] > 50 and heldout["tokens_per_char_after"] < 0.8 * heldout["tokens_per_char_before"]
    fresh = chinese_sentences(200, seed=1)  # not in the corpus
    base, new = processor(sp_model_file), processor(merged["model"])
    characters = sum(map(len, fresh))
    before, after = sum(map(len, base.encode(fresh))) / characters, sum(map(len, new.encode(fresh))) / characters
    assert after < 0.8 * before, (before, after)


def test_hugging_face_tokenizer_gives_sentencepiece_ids(merged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged["out"])
    sp = processor(merged["model"])
    assert len(tokenizer) == sp.get_piece_size()
    texts = chinese_sentences(300, seed=2) + ENGLISH + MIXED
    got = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, ids in zip(texts, got):
        assert ids == sp.encode(text), text
    assert tokenizer("你好，世界")["input_ids"] == [1] + sp.encode("你好，世界")
    for text in texts[:20] + MIXED:
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert merged["report"]["hf_matches_sentencepiece"]["differ"] == 0


def test_without_its_tokenizer_json_transformers_would_merge_the_new_pieces_last(merged, tmp_path):
    from transformers import AutoTokenizer

    # transformers 5 converts a bare tokenizer.model ordering merges by piece id, ignoring scores: the new pieces'
    # merges would come after every base merge. The app's tokenizer.json ranks them as SentencePiece's scores do.
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(merged["out"] / name, tmp_path / name)
    converted = AutoTokenizer.from_pretrained(tmp_path)
    sp = processor(merged["model"])
    texts = chinese_sentences(100, seed=3)
    got = converted(texts, add_special_tokens=False)["input_ids"]
    assert any(ids != sp.encode(text) for text, ids in zip(texts, got))  # 2 of these 100 on the bundled base


# ---------------------------------------------------------------------------------------------------- the app
def test_command_line_writes_the_same_tokenizer_directory(merged, tokenizer_dir, corpus, tmp_path):
    out = tmp_path / "tok"
    result = subprocess.run(
        [sys.executable, "-m", "llama2_sft.vocab", f"base={tokenizer_dir}", f"corpus=[{corpus[0]},{corpus[1]}]",
         "vocab_size=700", f"out={out}", "num_threads=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Chinese pieces" in result.stdout and "tokens per character" in result.stdout
    assert sorted(os.listdir(out)) == ["report.json", "special_tokens_map.json", "tokenizer.json",
                                        "tokenizer.model", "tokenizer_config.json"]
    assert (out / "tokenizer.model").read_bytes() == merged["model"].read_bytes()  # reproducible
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["added_pieces"] == merged["report"]["added_pieces"]
    assert json.loads((out / "tokenizer_config.json").read_text())["vocab_size"] == report["vocab_size"]


def test_base_without_a_sentencepiece_model_fails_naming_it(tmp_path, corpus):
    base = tmp_path / "hf_only"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"base=.*hf_only: no SentencePiece model \(tokenizer.model\)"):
        build_vocabulary(vocab_config(base=str(base), corpus=corpus, out=str(tmp_path / "out")))
    result = subprocess.run([sys.executable, "-m", "llama2_sft.vocab", f"base={base}", f"corpus=[{corpus[0]}]",
                             f"out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no SentencePiece model" in result.stderr and str(base) in result.stderr
    assert not (tmp_path / "out").exists()


def test_base_whose_hf_tokenizer_adds_tokens_beyond_its_model_fails_naming_them(tmp_path, tokenizer_dir, corpus):
    base = tmp_path / "padded_base"
    shutil.copytree(tokenizer_dir, base)
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["1024"] = {**config["added_tokens_decoder"]["0"], "content": "<pad>"}
    config["pad_token"] = "<pad>"
    (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=r"adds tokens beyond tokenizer.model's 1,024 pieces \(\[\(1024, '<pad>'"):
        build_vocabulary(vocab_config(base=str(base), corpus=corpus, out=str(tmp_path / "out")))


def test_empty_corpus_fails_naming_it(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus=.*empty.txt.*empty: no text"):
        build_vocabulary(vocab_config(base=tokenizer_dir, corpus=[str(empty)], out=str(tmp_path / "out")))
    with pytest.raises(ValueError, match=r"corpus: .*nothing\*.txt matches no file"):
        build_vocabulary(vocab_config(base=tokenizer_dir, corpus=[str(tmp_path / "nothing*.txt")],
                                      out=str(tmp_path / "out")))
    english = tmp_path / "en.txt"
    english.write_text("only English here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no line holds a Chinese character"):
        build_vocabulary(vocab_config(base=tokenizer_dir, corpus=[str(english)], out=str(tmp_path / "out")))


def test_vocab_size_the_trainer_cannot_reach_fails_naming_it(tmp_path, tokenizer_dir, corpus):
    for size in (1_000_000, 20):  # more pieces than the corpus has; fewer than its characters
        with pytest.raises(ValueError, match=rf"vocab_size={size}: the SentencePiece trainer cannot reach it"):
            build_vocabulary(vocab_config(base=tokenizer_dir, corpus=corpus[:1], vocab_size=size,
                                          out=str(tmp_path / "out")))


def test_schema_defaults_and_a_misspelled_key_fails():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from llama2_sft.config import CONF_DIR, Normalization, register_app_configs

    register_app_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="vocab", overrides=["base=b", "corpus=[a.txt,'d/*.jsonl']", "out=o"])
        assert (cfg.vocab_size, cfg.character_coverage, cfg.normalization, cfg.pad_to_multiple_of) == (
            20000, 0.9995, Normalization.nfkc, 64)
        assert list(cfg.corpus) == ["a.txt", "d/*.jsonl"]
        with pytest.raises(ConfigCompositionException, match="vocab_sise"):
            compose(config_name="vocab", overrides=["base=b", "corpus=a", "out=o", "vocab_sise=5"])


# ---------------------------------------------------------------------------------------------------- real Llama-2
_MAKER = Path(__file__).resolve().parents[1] / "assets" / "make_llama2_tokenizer.py"


@pytest.fixture(scope="module")
def llama2_dir() -> Path:
    spec = importlib.util.spec_from_file_location("make_llama2_tokenizer", _MAKER)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    if shutil.which("npm") is None and not maker.is_built(maker.default_cache_dir()):
        pytest.skip("real Llama-2 vocabulary unavailable: no npm on PATH (and no cached build)")
    path = maker.build()
    if path is None:
        pytest.skip("real Llama-2 vocabulary unavailable: `npm pack llama-tokenizer-js` failed")
    return path


def test_merge_into_the_real_llama2_vocabulary_keeps_its_ids_and_english(llama2_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "llama2_zh"
    report = build_vocabulary(vocab_config(base=str(llama2_dir), corpus=corpus, out=str(out)))
    base, new = proto_of(llama2_dir / "tokenizer.model"), proto_of(out / "tokenizer.model")
    assert len(base.pieces) == 32000 and len(new.pieces) % 64 == 0 and report["added_pieces"] > 100
    assert [(p.piece, p.score, p.type) for p in new.pieces[:32000]] == [(p.piece, p.score, p.type) for p in base.pieces]
    sp_base, sp_new = processor(llama2_dir / "tokenizer.model"), processor(out / "tokenizer.model")
    english = english_texts()
    assert sp_new.encode(english) == sp_base.encode(english)
    assert sp_base.encode("Hello world") == sp_new.encode("Hello world") == [15043, 3186]
    assert report["english"]["ids_unchanged"] and report["unreachable"] == []
    fresh = chinese_sentences(200, seed=1)
    assert sum(map(len, sp_new.encode(fresh))) < 0.8 * sum(map(len, sp_base.encode(fresh)))
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = fresh + ENGLISH + MIXED
    got = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert got == sp_new.encode(texts)
