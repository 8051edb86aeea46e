"""Build a tiny SentencePiece tokenizer shaped like the public Llama-2 checkpoints.

The tokenizer is trained on the embedded ShareGPT-style data (``data/*.jsonl``) with the
trainer / normalizer settings of Llama-2's ``tokenizer.model`` as far as they apply to a
small corpus: BPE, byte fallback (so any text, emoji included, round-trips), identity
normalization, a dummy ``▁`` prefix, whitespace kept as is, digits split, and the special
ids ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece.

The output directory gets ``tokenizer.model``, ``tokenizer_config.json`` and
``special_tokens_map.json`` so that ``transformers.AutoTokenizer.from_pretrained(out_dir)``
loads it as a Llama tokenizer.

CLI::

    python -m llama2_sft.data.spm --data data/train.jsonl data/eval.jsonl \\
        --out data/tokenizer --vocab-size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterable, Iterator

# Literals of the Llama-2 chat template; fed to the trainer so they tokenize compactly.
CHAT_TEMPLATE_LITERALS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# 1024 = 3 specials + 256 byte pieces + every character of the embedded data (~200, Chinese
# included) + ~560 BPE merges. Larger sizes only add rarely used whole-phrase pieces (and the
# embedded data supports at most ~2000 pieces: BPE runs out of pairs to merge).
DEFAULT_VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 4096  # Llama-2 context length; training code truncates far below this.
SEED = 0


def _read_rows(jsonl_paths: Iterable[str]) -> Iterator[dict]:
    for path in jsonl_paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def iter_training_text(jsonl_paths: Iterable[str]) -> Iterator[str]:
    """Every ``value`` and non-empty ``instruction`` string, one sentence per line of text.

    Each row also contributes the chat-template literals it would use when formatted
    (``[INST]``/``[/INST]`` per human turn, ``<<SYS>>``/``<</SYS>>`` when it has a system
    prompt), so they are frequent enough for BPE to merge them into few pieces.
    Newlines split sentences: like Llama-2, ``\\n`` is left to byte fallback.
    """
    for row in _read_rows(jsonl_paths):
        texts: list[str] = []
        instruction = row.get("instruction") or ""
        if instruction:
            texts += [instruction, CHAT_TEMPLATE_LITERALS[2], CHAT_TEMPLATE_LITERALS[3]]
        for turn in row.get("conversations", []):
            texts.append(turn["value"])
            if turn.get("from") == "human":
                texts += [CHAT_TEMPLATE_LITERALS[0], CHAT_TEMPLATE_LITERALS[1]]
        for text in texts:
            for line in text.split("\n"):
                if line:
                    yield line


def trainer_kwargs(vocab_size: int) -> dict:
    """SentencePiece trainer settings (Llama-2's, minus corpus-size / thread ones)."""
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,  # every character of the (small) corpus gets a piece
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        max_sentence_length=4192,
        vocabulary_output_piece_score=True,
        hard_vocab_limit=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        unk_surface=" \u2047 ",
        # determinism: one thread, no sampling / shuffling of the input sentences
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        self_test_sample_size=0,
        minloglevel=2,
    )


def _tokenizer_config(vocab_size: int) -> dict:
    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {"0": added(UNK), "1": added(BOS), "2": added(EOS)},
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
        "vocab_size": vocab_size,
    }


def _special_tokens_map() -> dict:
    def tok(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": tok(BOS), "eos_token": tok(EOS), "unk_token": tok(UNK)}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")


def train_tokenizer(jsonl_paths: list[str], out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """Train the SentencePiece model on the rows of ``jsonl_paths`` and write it to ``out_dir``.

    Returns ``out_dir``. The result is deterministic for the same inputs and vocab size.
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "tokenizer.model")
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(SEED)
    # Write to a temp file inside out_dir, then move into place (never a half-written model).
    fd, tmp_path = tempfile.mkstemp(prefix=".tokenizer.", suffix=".model.tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as model_writer:
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter_training_text(jsonl_paths),
                    model_writer=model_writer,
                    **trainer_kwargs(vocab_size),
                )
            except RuntimeError as e:
                if "Vocabulary size too high" in str(e):
                    raise ValueError(f"vocab_size={vocab_size} is too large for this data: {e}") from e
                raise
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600
        os.replace(tmp_path, model_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

    sp = spm.SentencePieceProcessor(model_file=model_path)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config(sp.get_piece_size()))
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), _special_tokens_map())
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a tiny Llama-2 style SentencePiece tokenizer.")
    parser.add_argument("--data", nargs="+", required=True, help="ShareGPT jsonl files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    out = train_tokenizer(args.data, args.out, args.vocab_size)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    print(f"wrote {out} (vocab size {sp.get_piece_size()})")


if __name__ == "__main__":
    main()
