"""encode_dialog on the real 32k Llama-2 vocabulary, against an independent transcription of Meta's reference.

The vocabulary is not in the repository: tests/assets/make_llama2_tokenizer.py rebuilds Meta's ``tokenizer.model``
(and the Hugging Face files of meta-llama/Llama-2-7b-chat-hf) from the npm package llama-tokenizer-js at test time,
into ``~/.cache/llama2_sft_test_assets/llama2`` (``$LLAMA2_SFT_TEST_ASSETS`` overrides the root), and reuses it.
That needs ``npm`` on PATH and the npm registry once (about 5 s); without them the module is skipped, unless
``LLAMA2_SFT_REQUIRE_REAL_VOCAB=1``, which turns the skip into a failure (for CI).

The first tests check that the rebuilt model *is* Llama-2's tokenizer (ids published with the package's and
llama.cpp's test suites, which came from the real one); the chat tests then compare `encode_dialog` with a
transcription of llama/generation.py `chat_completion` done here with raw SentencePiece; the last ones pin down
where Hugging Face's own tokenizer differs from SentencePiece on this vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import pytest

MAKER_PATH = Path(__file__).resolve().parents[1] / "assets" / "make_llama2_tokenizer.py"
_spec = importlib.util.spec_from_file_location("make_llama2_tokenizer", MAKER_PATH)
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)

REQUIRE = os.environ.get("LLAMA2_SFT_REQUIRE_REAL_VOCAB", "") not in ("", "0")
if shutil.which("npm") is None and not maker.is_built(maker.default_cache_dir()) and not REQUIRE:
    pytest.skip("real Llama-2 vocabulary unavailable: no npm on PATH to fetch llama-tokenizer-js (and no cached build)",
                allow_module_level=True)

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from llama2_sft.data import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, encode_dialog, encode_dialogs  # noqa: E402
from llama2_sft.data.chat import HFTextEncoder, SentencePieceEncoder, text_encoder  # noqa: E402

BOS, EOS = 1, 2
INST_IDS = [518, 25580, 29962]  # "[INST]"
END_INST_IDS = [518, 29914, 25580, 29962]  # " [/INST]" (the "▁[" piece, "/", "INST", "]")


@pytest.fixture(scope="session")
def llama2_dir() -> Path:
    path = maker.build()
    if path is None:
        message = "real Llama-2 vocabulary unavailable: `npm pack llama-tokenizer-js` failed (npm registry unreachable?)"
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def sp(llama2_dir):
    return spm.SentencePieceProcessor(model_file=str(llama2_dir / "tokenizer.model"))


@pytest.fixture(scope="session")
def hf_tokenizer(llama2_dir):
    return transformers.AutoTokenizer.from_pretrained(str(llama2_dir))


@pytest.fixture(scope="session")
def hf_tokenizer_from_model_file(llama2_dir, tmp_path_factory):
    """What transformers builds when a directory has tokenizer.model but no tokenizer.json (it converts the model)."""
    directory = tmp_path_factory.mktemp("llama2-no-tokenizer-json")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama2_dir / name, directory / name)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="session")
def reference(llama2_dir) -> dict:
    return json.loads((llama2_dir / "reference.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# The rebuilt tokenizer is Llama-2's

# llama.cpp's tokenizer test data for meta-llama/Llama-2-7b-hf (models/ggml-vocab-llama-spm.gguf.inp / .out, produced
# with the real tokenizer; no BOS). Only ids, no vocabulary.
LLAMA_CPP_CASES = [
    ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378]),
    ("Führer", [383, 4000, 261]),
    ("", []),
    (" ", [259]),
    ("  ", [1678]),
    ("   ", [268]),
    ("\t", [29871, 12]),
    ("\n", [29871, 13]),
    ("\n\n", [29871, 13, 13]),
    ("\n\n\n", [29871, 13, 13, 13]),
    ("\t\n", [29871, 12, 13]),
    ("Hello world", [15043, 3186]),
    (" Hello world", [29871, 15043, 3186]),
    ("Hello World", [15043, 2787]),
    (" Hello World", [29871, 15043, 2787]),
    (" Hello World!", [29871, 15043, 2787, 29991]),
    ("Hello, world!", [15043, 29892, 3186, 29991]),
    (" Hello, world!", [29871, 15043, 29892, 3186, 29991]),
    (" this is 🦙.cpp", [29871, 445, 338, 29871, 243, 162, 169, 156, 29889, 8223]),
    ("w048 7tuijk dsdfhu", [281, 29900, 29946, 29947, 29871, 29955, 9161, 13535, 18031, 2176, 6905]),
    ("нещо на Български", [1538, 4851, 665, 1386, 29713, 1305]),
    ("កាន់តែពិសេសអាចខលចេញ",
     [29871, 31849, 31324, 31934, 228, 162, 142, 228, 161, 146, 228, 162, 133, 228, 161, 153, 228, 161, 186, 31708,
      228, 162, 132, 31708, 228, 161, 165, 31324, 228, 161, 136, 228, 161, 132, 228, 161, 158, 228, 161, 136, 228,
      162, 132, 228, 161, 140]),
    ("🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)",
     [29871, 243, 162, 157, 131, 313, 8945, 29897, 29871, 243, 162, 155, 185, 30722, 243, 162, 143, 174, 30598, 313,
      20787, 953, 3848, 275, 16125, 630, 29897, 29871, 31681, 313, 6194, 953, 29877, 2397, 393, 756, 967, 1914, 5993,
      29897]),
    ("Hello", [15043]),
    (" Hello", [29871, 15043]),
    ("  Hello", [259, 15043]),
    ("   Hello", [1678, 15043]),
    ("    Hello", [268, 15043]),
    ("    Hello\n    Hello", [268, 15043, 13, 1678, 15043]),
    (" (", [29871, 313]),
    ("\n =", [29871, 13, 353]),
    ("' era", [525, 3152]),
    ("Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
     [15043, 29892, 343, 29915, 497, 29991, 1128, 526, 366, 29871, 243, 162, 155, 132, 1577, 30672, 31522, 30505,
      11548, 31041, 30732, 29896, 29941, 29896, 29946, 29896, 29945, 29896, 30408, 30739]),
    *[("3" * n, [29871] + [29941] * n) for n in range(1, 10)],
]


def test_rebuilt_model_has_llama2_layout_and_specs(sp, llama2_dir):
    from sentencepiece import sentencepiece_model_pb2 as pb

    assert sp.vocab_size() == 32000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.is_unknown(0) and sp.is_control(1) and sp.is_control(2)
    assert all(sp.is_byte(i) and sp.id_to_piece(i) == f"<0x{i - 3:02X}>" for i in range(3, 259))
    assert not any(sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) for i in range(259, 32000))
    assert sp.id_to_piece(29871) == "\u2581" and sp.id_to_piece(15043) == "\u2581Hello"

    proto = pb.ModelProto()
    proto.ParseFromString((llama2_dir / "tokenizer.model").read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == pb.TrainerSpec.BPE and t.vocab_size == 32000
    assert t.byte_fallback and t.split_digits and t.allow_whitespace_only_pieces and not t.treat_whitespace_as_suffix
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces and n.escape_whitespaces
    # Scores: merge priority decreasing with id, runs of spaces ("▁" * 2..16) last of all.
    spaces = [i for i in range(259, 32000) if maker.is_whitespace_run(sp.id_to_piece(i))]
    assert sorted(len(sp.id_to_piece(i)) for i in spaces) == list(range(2, 17))
    assert {sp.get_score(i) for i in spaces} == {-1e9}
    space_ids = set(spaces)
    others = [sp.get_score(i) for i in range(259, 32000) if i not in space_ids]
    assert all(a > b for a, b in zip(others, others[1:]))


def test_rebuilt_scores_regenerate_the_shipped_merge_list_exactly(llama2_dir):
    tokenizer_json = json.loads((llama2_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    pieces = sorted(tokenizer_json["vocab"], key=tokenizer_json["vocab"].get)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((llama2_dir / "tokenizer.model").read_bytes())
    assert [p.piece for p in proto.pieces] == pieces
    regenerated = maker.converter_merges(pieces, [p.score for p in proto.pieces])
    assert [f"{pieces[a]} {pieces[b]}" for a, b in regenerated] == tokenizer_json["merges"]
    assert len(regenerated) == 61249


def test_rebuilt_model_reproduces_the_real_tokenizer_ids_of_the_packages_test_suite(sp, reference):
    cases = reference["package_cases"]
    assert len(cases) == 12
    for case in cases:
        assert sp.encode(case["text"]) == case["ids"], case["text"]
        assert sp.decode(case["ids"]) == case["text"]


def test_rebuilt_model_reproduces_llama_cpp_reference_ids_for_llama2(sp):
    for text, ids in LLAMA_CPP_CASES:
        assert sp.encode(text) == ids, text


def test_rebuilt_model_agrees_with_the_packages_bpe_encoder_on_varied_text(sp, reference):
    if reference["js_encoder"] is None:
        pytest.skip("node was unavailable when the asset was built")
    cases = reference["js_encoder"]
    assert [c["text"] for c in cases] == maker.VARIED_TEXTS
    mismatches = [c["text"] for c in cases if sp.encode(c["text"]) != c["ids"]]
    assert mismatches == []


def test_rebuilt_model_gives_publicly_known_llama2_ids(sp):
    assert sp.encode("Hello world") == [15043, 3186]
    assert sp.encode(" Hello") == [29871, 15043]
    assert sp.encode("[INST]") == INST_IDS
    assert sp.encode("[INST] hi [/INST]") == INST_IDS + [7251] + END_INST_IDS
    assert sp.encode("</s>") == [1533, 29879, 29958]  # text, never the EOS id


# ---------------------------------------------------------------------------------------------------------------------
# encode_dialog against Meta's chat_completion, transcribed with raw SentencePiece


def meta_reference(sp, messages: list[dict]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """llama/generation.py `chat_completion` (bos=1, eos=2 added around `sp.encode`), with our labels and spans."""
    b_inst, e_inst, b_sys, e_sys = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    dialog = [dict(m) for m in messages]
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"]}]
        dialog += [dict(m) for m in messages[2:]]
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        body = sp.encode(f"{b_inst} {(prompt['content']).strip()} {e_inst} {(answer['content']).strip()} ")
        head = sp.encode(f"{b_inst} {(prompt['content']).strip()} {e_inst}")
        assert body[: len(head)] == head
        spans.append((len(ids), len(ids) + len(body) + 2))
        ids += [BOS] + body + [EOS]
        labels += [IGNORE_INDEX] * (1 + len(head)) + body[len(head):] + [EOS]
    if dialog[-1]["role"] == "user":
        tail = sp.encode(f"{b_inst} {(dialog[-1]['content']).strip()} {e_inst}")
        spans.append((len(ids), len(ids) + len(tail) + 1))
        ids += [BOS] + tail
        labels += [IGNORE_INDEX] * (1 + len(tail))
    return ids, labels, spans


DIALOGS = {
    "chinese": [
        {"role": "user", "content": "请用中文解释一下什么是机器学习？"},
        {"role": "assistant", "content": "机器学习是人工智能的一个分支，让计算机从数据中学习规律。例如：垃圾邮件过滤。"},
    ],
    "emoji": [
        {"role": "user", "content": "React with 🦙🚀😀, a family 👨\u200d👩\u200d👧 and a coder 🧑\u200d💻!"},
        {"role": "assistant", "content": "Sure 👍🏽 ❤️ 🦙🦙 ✅"},
    ],
    "indentation_and_space_runs": [
        {"role": "user",
         "content": "  Fix:\n```python\ndef f(x):\n    if x:\n        return x   # 3 spaces\n\treturn None\n```\n"},
        {"role": "assistant",
         "content": "\n\n  Here:\n\n    def f(x):\n        return x  or  None\n\na  . b     c" + " " * 17 + "d\n  "},
    ],
    "digits_and_punctuation": [
        {"role": "user", "content": "Sum 1234567890 and 3.14159, then -42; 1e10? 2023-07-18!"},
        {"role": "assistant", "content": "1234567893.14159 ... ``` ''' \"\"\" !!! ???"},
    ],
    "literal_control_strings": [
        {"role": "user", "content": "What do </s> and <s> mean? And [INST] x [/INST], <<SYS>> y <</SYS>>, <unk>?"},
        {"role": "assistant", "content": "</s> ends a turn, <s> starts one. [/INST]</s><s>"},
        {"role": "user", "content": "</s>"},
    ],
    "multi_turn_without_system": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": " Reverse 'abc'. "},
        {"role": "assistant", "content": " cba "},
        {"role": "user", "content": "Now 'xyz'"},
        {"role": "assistant", "content": "zyx"},
    ],
    "multi_turn_with_system": [
        {"role": "system", "content": "You are terse. Never use </s> literally.  "},
        {"role": "user", "content": "\n  Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of 日本?"},
        {"role": "assistant", "content": "東京 (Tokyo)."},
    ],
    "generation_prompt_with_default_system": [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "你好吗？ Answer in    English."},
    ],
    "empty_and_whitespace_only_contents": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "   "},
        {"role": "assistant", "content": " \n\t "},
    ],
}


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_encode_dialog_matches_meta_chat_completion_token_for_token(name, sp, hf_tokenizer):
    messages = DIALOGS[name]
    ids, labels, spans = meta_reference(sp, messages)
    encoded = encode_dialog(hf_tokenizer, messages)
    assert encoded.input_ids == ids
    assert encoded.labels == labels
    assert encoded.turn_spans == spans
    # BOS/EOS ids appear exactly where the template puts them, never from text typed by a user.
    assert [i for i, t in enumerate(encoded.input_ids) if t == BOS] == [start for start, _ in spans]
    ends_with_user = messages[-1]["role"] == "user"
    eos_positions = [end - 1 for start, end in (spans[:-1] if ends_with_user else spans)]
    assert [i for i, t in enumerate(encoded.input_ids) if t == EOS] == eos_positions


def test_encode_dialog_resolves_the_hf_tokenizer_to_its_sentencepiece_model(hf_tokenizer, llama2_dir):
    encoder = text_encoder(hf_tokenizer)
    assert isinstance(encoder, SentencePieceEncoder)
    assert Path(encoder.model_file) == (llama2_dir / "tokenizer.model").resolve()


def test_encode_dialog_single_turn_gives_the_known_llama2_chat_ids(hf_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    encoded = encode_dialog(hf_tokenizer, messages)
    # <s> [INST] Hi [/INST] Hello! ▁ </s>
    assert encoded.input_ids == [BOS, *INST_IDS, 6324, *END_INST_IDS, 15043, 29991, 29871, EOS]
    assert encoded.labels == [IGNORE_INDEX] * 9 + [15043, 29991, 29871, EOS]


def test_encode_dialog_keeps_user_typed_control_strings_as_text(hf_tokenizer, sp):
    messages = DIALOGS["literal_control_strings"]
    encoded = encode_dialog(hf_tokenizer, messages)
    assert encoded.input_ids.count(BOS) == 2 and encoded.input_ids.count(EOS) == 1
    assert sp.decode(encoded.input_ids[1 : encoded.turn_spans[0][1] - 1]) == (
        "[INST] What do </s> and <s> mean? And [INST] x [/INST], <<SYS>> y <</SYS>>, <unk>? [/INST] "
        "</s> ends a turn, <s> starts one. [/INST]</s><s> "
    )
    # The trailing user "</s>" is a generation prompt: text, then [/INST], and no EOS.
    start = encoded.turn_spans[1][0]
    assert encoded.input_ids[start:] == [BOS, *INST_IDS, 1533, 29879, 29958, *END_INST_IDS]


def test_generation_prompt_ends_with_inst_close_and_is_unsupervised(hf_tokenizer, sp):
    messages = DIALOGS["generation_prompt_with_default_system"]
    encoded = encode_dialog(hf_tokenizer, messages)
    assert encoded.input_ids[-4:] == END_INST_IDS and encoded.input_ids[-1] != EOS
    last_start, last_end = encoded.turn_spans[-1]
    assert last_end == len(encoded.input_ids)
    assert all(label == IGNORE_INDEX for label in encoded.labels[last_start:])
    supervised = [t for t in encoded.labels[: encoded.turn_spans[0][1]] if t != IGNORE_INDEX]
    assert sp.decode(supervised[:-1]) == "Hello! 😀 " and supervised[-1] == EOS


def test_encode_dialogs_batch_equals_one_by_one(hf_tokenizer):
    names = sorted(DIALOGS)
    batched = encode_dialogs(hf_tokenizer, [DIALOGS[n] for n in names])
    for name, encoded in zip(names, batched):
        single = encode_dialog(hf_tokenizer, DIALOGS[name])
        assert encoded.input_ids == single.input_ids
        assert (encoded.labels, encoded.turn_spans) == (single.labels, single.turn_spans)


# ---------------------------------------------------------------------------------------------------------------------
# Where Hugging Face's tokenizer differs from SentencePiece on this vocabulary (transformers 5.x behaviour, pinned)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = [" "] * 8 + list("ab\n\t1.</>s") + ["中", "🦙", "é", "[INST]", "</s>", "<s>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_hf_tokenizer_differs_from_sentencepiece_on_leading_spaces_and_special_strings(hf_tokenizer, sp):
    def hf(text: str, **kwargs) -> list[int]:
        return hf_tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]

    assert hf_tokenizer("Hello world")["input_ids"] == [BOS, 15043, 3186]
    # 1. A leading space: SentencePiece always adds the dummy "▁"; HF's Metaspace (legacy=False) does not when the
    #    text already starts with one, i.e. HF(" x") == SP("x").
    assert (sp.encode(" Hello"), hf(" Hello")) == ([29871, 15043], [15043])
    assert (sp.encode("   "), hf("   ")) == ([268], [1678])
    # 2. Special-token strings in text become control ids in HF unless split_special_tokens=True.
    assert (sp.encode("a</s>b"), hf("a</s>b")) == ([263, 829, 29879, 29958, 29890], [263, 2, 29890])
    assert hf("a</s>b", split_special_tokens=True) == sp.encode("a</s>b")
    assert hf("x <s> y") == [921, 29871, BOS, 343]
    # Nothing else: on random text (space runs, tabs, newlines, CJK, emoji, markup) HF == SP up to the leading space.
    texts = _random_texts(1500)
    hf_ids = hf_tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, got in zip(texts, hf_ids):
        expected = sp.encode(text[1:] if text.startswith(" ") and text != " " else text)
        assert got == (expected if text != " " else [29871]), text


def test_hf_tokenizer_converted_from_tokenizer_model_misorders_space_merges(hf_tokenizer_from_model_file, sp):
    # Without tokenizer.json, transformers 5 converts tokenizer.model ordering merges by piece id, ignoring scores, so
    # runs of spaces ("▁▁", id 259, score -1e9) merge before "▁." (id 869): Meta's merges say the opposite.
    tok = hf_tokenizer_from_model_file
    assert sp.encode("a  .") == [263, 29871, 869]
    assert tok("a  .", add_special_tokens=False)["input_ids"] == [263, 259, 29889]


def test_hf_text_encoder_fallback_matches_sentencepiece_on_chat_dialogs_only_with_metas_tokenizer_json(
    hf_tokenizer, hf_tokenizer_from_model_file, sp
):
    # Chat strings start with "[INST]", so the leading-space difference never applies; special strings are split.
    for messages in DIALOGS.values():
        assert encode_dialog(HFTextEncoder(hf_tokenizer), messages).input_ids == meta_reference(sp, messages)[0]
    # The converted tokenizer (no tokenizer.json) breaks exactness on "  ." inside a message.
    messages = DIALOGS["indentation_and_space_runs"]
    converted = HFTextEncoder(hf_tokenizer_from_model_file)
    assert encode_dialog(converted, messages).input_ids != meta_reference(sp, messages)[0]


def test_split_encoding_equals_whole_pair_encoding_on_realistic_rows_with_the_real_vocab(hf_tokenizer):
    from llama2_sft.data import DEFAULT_SYSTEM_PROMPT, encode_dialogs
    from llama2_sft.data.sources import row_to_messages
    from llama2_sft.data.synthetic import generate

    dialogs = [m for m in (row_to_messages(r, DEFAULT_SYSTEM_PROMPT)[0] for r in generate(400, seed=11)) if m]
    fast, exact = encode_dialogs(hf_tokenizer, dialogs), encode_dialogs(hf_tokenizer, dialogs, exact=True)
    assert [(d.input_ids, d.labels) for d in fast] == [(d.input_ids, d.labels) for d in exact]
