"""Shared fixtures: the repo's own tokenizer (built from the bundled data by repo code), a tiny random Llama saved
like a Hugging Face checkpoint, sample rows and a composed config. Everything is local: no network."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "data", "tokenizer")
CONF_DIR = os.path.join(REPO, "conf")

if REPO not in sys.path:
    sys.path.insert(0, REPO)

# The tiny preset compiles its decoder (conf/model/tiny.yaml), and inductor takes 10-30 s on 2 cores for every new
# shape; the tests train dozens of small runs and test math, not speed, so torch.compile is a no-op in them and in
# the train.py processes they start. The tests of compile itself switch it back on (`compile_enabled`, and
# TORCH_COMPILE_DISABLE=0 in the environment of the runs that compare compiled with eager).
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def sp_model_file(tokenizer_dir) -> str:
    return os.path.join(tokenizer_dir, "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, hf_tokenizer, tokenizer_dir) -> str:
    """A random-init tiny Llama saved with save_pretrained, plus the tokenizer files: a stand-in for Llama-2-7B."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tokenizer), bos_token_id=1, eos_token_id=2, **TINY_ARCH)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), out / name)
    return str(out)


@pytest.fixture(scope="session")
def chinese_corpus(tmp_path_factory) -> list[str]:
    """Chinese text for a vocabulary extension: generated sentences (.txt) and the Chinese chat rows of
    data/train.jsonl (.jsonl)."""
    from tests.unit.test_vocab import chinese_sentences, train_rows_with_chinese

    folder = tmp_path_factory.mktemp("chinese_corpus")
    (folder / "zh.txt").write_text("\n".join(chinese_sentences(2500, seed=0)) + "\n", encoding="utf-8")
    (folder / "chat.jsonl").write_text("\n".join(train_rows_with_chinese()) + "\n", encoding="utf-8")
    return [str(folder / "zh.txt"), str(folder / "chat.jsonl")]


@pytest.fixture(scope="session")
def extended_vocab(tmp_path_factory, tokenizer_dir, chinese_corpus) -> dict:
    """The bundled tokenizer extended with Chinese pieces by llama2_sft.vocab (1,024 -> 1,280 with the padding):
    {"out": its directory, "report": build_vocabulary's report, "model": its tokenizer.model}. Read it, never write."""
    from llama2_sft.vocab import build_vocabulary
    from tests.unit.test_vocab import vocab_config

    out = tmp_path_factory.mktemp("extended_vocab")
    report = build_vocabulary(vocab_config(base=tokenizer_dir, corpus=chinese_corpus, out=str(out)))
    return {"out": out, "report": report, "model": out / "tokenizer.model"}


def make_row(row_id, turns, instruction=""):
    """A ShareGPT row from (from, value) pairs."""
    return {"id": row_id, "conversations": [{"from": f, "value": v} for f, v in turns], "instruction": instruction}


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="rows.jsonl"):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
        return str(path)

    return write


def compose(overrides=()):
    """Compose conf/train.yaml with overrides through Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llama2_sft.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def compile_enabled(monkeypatch):
    """torch.compile really compiles in this test (the suite turns it off, see the top of this file)."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")
