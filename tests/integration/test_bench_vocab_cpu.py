"""experiments/bench_vocab.py --quick: it extends the vocabulary with llama2_sft.vocab, counts tokens and truncation
with both tokenizers, trains base and extended through train.py, and writes the table. Checks what the figures must
satisfy whatever the machine (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_vocab_quick_writes_consistent_figures(tmp_path):
    pytest.importorskip("sentencepiece")
    prefix = tmp_path / "bench_vocab"
    subprocess.run([sys.executable, "experiments/bench_vocab.py", "--quick", "--out", str(prefix)], cwd=REPO,
                   check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = json.loads(prefix.with_suffix(".json").read_text())
    tokens, vocab = out["tokens"], out["vocab"]
    assert vocab["added_pieces"] > 0 and vocab["vocab_size"] == vocab["base_pieces"] + vocab["added_pieces"] + vocab[
        "padding_pieces"]
    # Chinese text takes fewer tokens, fewer of them byte pieces; English ids are unchanged by construction
    assert tokens["extended"]["zh_tokens_per_char"] < tokens["base"]["zh_tokens_per_char"]
    assert tokens["extended"]["byte_share"] < tokens["base"]["byte_share"]
    assert vocab["english"]["ids_changed"] == 0
    assert tokens["extended"]["tokens_per_en_word"] == pytest.approx(tokens["base"]["tokens_per_en_word"], rel=0.02)
    # the truncation counts add up: a row is over the limit after iff it was before and was not rescued (or is new)
    lengths = out["truncation"]["lengths"]
    for part in out["truncation"]["by_language"].values():
        assert part["over_extended"] == part["over_base"] - part["rescued"] + part["newly_over"]
    assert sum(n > 4096 for n in lengths["extended"]) == out["truncation"]["by_language"]["all"]["over_extended"]
    assert all(e <= b for e, b in zip(lengths["extended"], lengths["base"]))  # on these rows: never longer
    # both runs trained on the same base; only the extended one grew it, and its supervised tokens carry more text
    train = out["training"]
    assert [run["grown"] for run in train["base"]["runs"]] == [False]
    assert [run["grown"] for run in train["extended"]["runs"]] == [True]
    for measure in ("characters_per_supervised_token", "supervised_characters_per_token"):
        assert train["extended"][measure] > train["base"][measure]
    for name in ("base", "extended"):
        assert all(loss == loss for run in train[name]["runs"] for loss in run["losses"])
        data = train[name]  # supervised characters per token: over every prepared sample, prompts included
        assert data["supervised_characters_per_token"] == pytest.approx(
            data["characters_per_supervised_token"] * data["supervised_tokens"] / data["tokens"])
        for per in ("s", "cpu_s"):  # wall and CPU rates: tokens per second times supervised characters per token
            assert data[f"supervised_characters_per_{per}"] == pytest.approx(
                data[f"tokens_per_{per}"] * data["supervised_characters_per_token"])
        assert all(run["cpu_seconds"] > 0 for run in train[name]["runs"])
    assert prefix.with_suffix(".png").stat().st_size > 0
