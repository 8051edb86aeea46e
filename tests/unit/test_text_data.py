"""Plain-text corpora (dataset.type=text, llama2_sft.data.text): documents, pieces, packing, the loss on every token,
and the errors a corpus can raise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from llama2_sft.config import DatasetConfig
from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.data.collate import collate_packed
from llama2_sft.data.loader import BatchLayout, SFTLoader
from llama2_sft.data.text import check_utf8, document_pieces, load_documents, txt_documents
from llama2_sft.data.tokenize import prepare_dataset
from tests.conftest import TINY_ARCH

DOCS = ["第一篇文章。猫在家里。", "The second document is English.", "第三篇：" + "数字 12 后面是 13。" * 40]


def text_cfg(tmp_path, source, **values) -> OmegaConf:
    values.setdefault("max_length", 64)
    values.setdefault("max_skipped_fraction", 0.0)
    return OmegaConf.structured(DatasetConfig(source=source, type="text", cache_dir=str(tmp_path / "cache"),
                                              num_proc=1, **values))


def write_txt(tmp_path, text: str, name="corpus.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_txt_file_is_cut_at_blank_lines_or_kept_whole():
    text = "a b\nc\n\n\n  \nd e\n\t\nf\n"
    assert txt_documents(text, "blank_lines") == ["a b\nc", "d e", "f"]
    assert txt_documents(text, "file") == ["a b\nc\n\n\n  \nd e\n\t\nf"]
    assert txt_documents("\n\n \n", "blank_lines") == [] and txt_documents(" \n", "file") == []


def test_documents_come_from_txt_jsonl_and_parquet_alike(tmp_path):
    import datasets

    txt = write_txt(tmp_path, "\n\n".join(DOCS) + "\n")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"r{i}", "content": d}, ensure_ascii=False) + "\n"
                             for i, d in enumerate(DOCS)), encoding="utf-8")
    parquet = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(parquet)
    assert load_documents(txt)["text"] == DOCS
    assert load_documents(txt, txt_rule="file")["text"] == ["\n\n".join(DOCS)]
    from_jsonl = load_documents(str(jsonl), text_field="content")
    assert from_jsonl["text"] == DOCS and from_jsonl["id"] == ["r0", "r1", "r2"]
    assert load_documents(parquet)["text"] == DOCS
    with pytest.raises(ValueError, match=r"no 'text' field \(dataset.text_field"):
        load_documents(str(jsonl))


def test_a_long_document_is_split_into_overlapping_pieces_and_every_token_is_a_target_once():
    ids = list(range(1, 300))
    for max_length in (2, 7, 64, 298, 299, 300):
        pieces = document_pieces(ids, max_length)
        assert all(2 <= len(p) <= max_length for p in pieces) or len(pieces) == 1
        targets = [token for piece in pieces for token in piece[1:]]  # what the collator's shift makes targets
        assert targets == ids[1:], max_length
        assert [p[0] for p in pieces[1:]] == [p[-1] for p in pieces[:-1]]  # each piece starts where the last ended


def test_each_document_becomes_bos_text_eos_and_the_cache_uses_every_token(tmp_path, hf_tokenizer, tokenizer_dir):
    txt = write_txt(tmp_path, "\n\n".join(DOCS) + "\n")
    data = prepare_dataset(text_cfg(tmp_path, txt), hf_tokenizer, tokenizer_dir)
    encoded = [hf_tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    full = [[hf_tokenizer.bos_token_id, *ids, hf_tokenizer.eos_token_id] for ids in encoded]
    assert len(full[2]) > 64  # the long one is split
    by_doc: dict[str, list] = {}
    for row in data.train:
        doc = row["id"].split("/")[0]
        by_doc.setdefault(doc, []).append(row)
        assert row["labels"] == [IGNORE_INDEX, *row["input_ids"][1:]]  # the loss on every token
        assert row["num_supervised"] == row["length"] - 1 == len(row["input_ids"]) - 1
    assert sorted(by_doc) == ["corpus.txt#0", "corpus.txt#1", "corpus.txt#2"]
    for k, ids in enumerate(full):
        pieces = sorted(by_doc[f"corpus.txt#{k}"], key=lambda r: int(r["id"].split("/")[1]) if "/" in r["id"] else 0)
        assert [p["input_ids"] for p in pieces] == document_pieces(ids, 64)
    summary = data.summary["splits"]["train"]
    assert summary["rows"] == 3 and summary["outcomes"] == {"kept": 2, "split": len(by_doc["corpus.txt#2"])}
    assert summary["supervised_tokens"] == sum(len(ids) - 1 for ids in full)  # nothing dropped


def test_a_packed_text_row_supervises_every_token_but_padding(tmp_path, hf_tokenizer, tokenizer_dir):
    txt = write_txt(tmp_path, "\n\n".join(DOCS * 4) + "\n")
    data = prepare_dataset(text_cfg(tmp_path, txt), hf_tokenizer, tokenizer_dir)
    loader = SFTLoader(data.train, layout=BatchLayout(4, 1, 1), rank=0, pad_id=0, seed=0, packing=True, max_length=64)
    batch = loader.next_step()[0]
    units = loader.global_batch_units(0, 0)
    for row, unit in enumerate(units):
        targets, ids = batch["target_ids"][row].tolist(), batch["input_ids"][row].tolist()
        cursor = 0
        for length in batch["seq_lens"][row].tolist()[: len(loader.plan.unit(int(unit)))]:
            # a piece: each token predicts the next; its last predicts nothing (not the next document's BOS)
            assert targets[cursor: cursor + length] == [*ids[cursor + 1: cursor + length], IGNORE_INDEX]
            cursor += length
        assert cursor == loader.plan.unit_lengths[unit]
        assert set(targets[cursor:]) <= {IGNORE_INDEX} and set(ids[cursor:]) <= {0}  # padding only
    assert len(units) == 4 and int(loader.plan.unit_lengths[units].sum()) == batch["num_real_tokens"]


def test_logits_of_a_packed_row_equal_each_document_run_alone(tmp_path, hf_tokenizer, tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2_sft.loss import forward_logits

    txt = write_txt(tmp_path, "\n\n".join(DOCS) + "\n")
    data = prepare_dataset(text_cfg(tmp_path, txt, max_length=128), hf_tokenizer, tokenizer_dir)
    pieces = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.train]
    assert len(pieces) > len(DOCS)  # the long document is split: its pieces run alone too
    pieces = pieces[:4]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tokenizer), bos_token_id=1, eos_token_id=2, **TINY_ARCH)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        packed = forward_logits(model, collate_packed([pieces], pad_id=0), False)[0]
        cursor = 0
        for piece in pieces:
            alone = model(input_ids=torch.tensor([piece["input_ids"]])).logits[0]
            length = len(piece["input_ids"])
            torch.testing.assert_close(packed[cursor: cursor + length], alone, rtol=1e-4, atol=1e-4)
            cursor += length


def test_a_file_that_is_not_utf8_fails_naming_the_file_and_byte_offset(tmp_path, hf_tokenizer, tokenizer_dir):
    good = "第一篇。\n\n".encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(good + b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=rf"bad.txt: not UTF-8 at byte offset {len(good) + 3}"):
        check_utf8(str(path))
    with pytest.raises(ValueError, match=rf"bad.txt: not UTF-8 at byte offset {len(good) + 3}"):
        check_utf8(str(path), block_size=len(good) + 1)  # a character cut by a block boundary is not an error
    (tmp_path / "split.txt").write_bytes("中文".encode() * 5)
    check_utf8(str(tmp_path / "split.txt"), block_size=4)  # 3-byte characters across 4-byte blocks
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: not UTF-8 at byte offset 25"):
        prepare_dataset(text_cfg(tmp_path, str(jsonl)), hf_tokenizer, tokenizer_dir)


def test_an_empty_corpus_fails_naming_it(tmp_path, hf_tokenizer, tokenizer_dir):
    empty = write_txt(tmp_path, "\n\n  \n", "empty.txt")
    with pytest.raises(ValueError, match=r"text corpus .*empty.txt: no document"):
        prepare_dataset(text_cfg(tmp_path, empty), hf_tokenizer, tokenizer_dir)
    blank_rows = tmp_path / "blank.jsonl"
    blank_rows.write_text('{"text": "  "}\n{"text": null}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank.jsonl: none of 2 rows .*'bad_text': 1, 'empty_document': 1"):
        prepare_dataset(text_cfg(tmp_path, str(blank_rows), max_skipped_fraction=1.0), hf_tokenizer, tokenizer_dir)


def test_blank_rows_are_skipped_and_counted_never_silently(tmp_path, hf_tokenizer, tokenizer_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", " ", "two", "three"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"1 of 4 train rows \(25.0%\) could not be trained.*empty_document"):
        prepare_dataset(text_cfg(tmp_path, str(rows)), hf_tokenizer, tokenizer_dir)
    data = prepare_dataset(text_cfg(tmp_path, str(rows), max_skipped_fraction=0.5), hf_tokenizer, tokenizer_dir)
    assert len(data.train) == 3 and data.summary["splits"]["train"]["example_ids"] == {"empty_document": ["#1"]}


def test_the_txt_rule_is_part_of_the_cache_key_and_eval_holds_out_whole_documents(tmp_path, hf_tokenizer,
                                                                                  tokenizer_dir):
    txt = write_txt(tmp_path, "\n\n".join(f"文章 {k}。" + "内容。" * (k % 7) * 9 for k in range(50)) + "\n")
    blocks = prepare_dataset(text_cfg(tmp_path, txt, eval_fraction=0.2), hf_tokenizer, tokenizer_dir)
    whole = prepare_dataset(text_cfg(tmp_path, txt, eval_fraction=0.2, txt_documents="file"), hf_tokenizer,
                            tokenizer_dir)
    assert blocks.path != whole.path and len(whole.train) > 1
    assert whole.eval is None  # one document (cut into pieces): nothing to hold out
    train_docs = {r.split("/")[0] for r in blocks.train["id"]}
    eval_docs = {r.split("/")[0] for r in blocks.eval["id"]}
    assert len(eval_docs) == 10 and not train_docs & eval_docs and len(train_docs | eval_docs) == 50
    assert np.all(np.asarray(blocks.train["length"]) <= 64)


def test_an_edited_txt_file_is_read_again_not_taken_from_a_stale_arrow_cache(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")
    assert load_documents(str(path))["text"] == ["one", "two"]
    path.write_text("uno\n\ndos\n\ntres\n", encoding="utf-8")
    assert load_documents(str(path))["text"] == ["uno", "dos", "tres"]
