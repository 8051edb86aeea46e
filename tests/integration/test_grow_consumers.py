"""Issue 13 §3: every consumer stays exact on an extended vocabulary and a grown model.

The extended tokenizer is the bundled 1,024-piece one with Chinese pieces merged in by `python -m llama2_sft.vocab`'s
code (1,280 with the UNUSED padding, as tests/integration/test_grow_vocab.py builds it). The grown run is a train.py
run of two steps from the tiny 1,024-row Llama of tests/conftest.py with `model.tokenizer=` the extended tokenizer and
LoRA (embed_tokens and lm_head trained whole, in modules_to_save). The references are computed here independently:
Meta's chat_completion transcribed on raw SentencePiece (tests/unit/test_chat.py), SentencePiece's own decode, the
SentencePiece ModelProto, and the project's loader.

Streaming is checked with a scripted model: a Llama with the extended vocabulary whose attention and MLP outputs are
zero, so the next token depends on the current one only, wired to answer every prompt with a fixed chain of ids that
holds new pieces and characters the vocabulary lacks (byte-fallback pieces). Every consumer's text is then compared
with SentencePiece's decode of that chain."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_ARCH

spm = pytest.importorskip("sentencepiece")

from llama2_sft.data import encode_dialog  # noqa: E402
from tests.integration.test_gguf import llama_cpp  # noqa: E402,F401 (a fixture: skips without llama-cpp-python)
from tests.unit.test_chat import meta_reference  # noqa: E402
from tests.unit.test_vocab import (ENGLISH, MIXED, chinese_sentences, llama2_dir,  # noqa: E402,F401 (a fixture)
                                   proto_of, train_rows_with_chinese, vocab_config)

pytestmark = pytest.mark.slow

BASE_SIZE, NORMAL, UNUSED, BYTE = 1024, 1, 5, 6
DIALOGS = {
    "chinese": [{"role": "user", "content": "我们今天学习中文，好吗？"}, {"role": "assistant", "content": "好的，我们开始吧。"},
                {"role": "user", "content": "北京和上海哪个城市更大？"}],
    "system_mixed": [{"role": "system", "content": "你是一个有帮助的助手。"},
                     {"role": "user", "content": "用 Python 写代码：print('你好')"},
                     {"role": "assistant", "content": "print('你好')  # 输出 你好"}],
    "emoji_rare": [{"role": "user", "content": "图书馆🦙博物馆 𝄞 龘 ＡＢＣ全角"}, {"role": "assistant", "content": "🦙 是羊驼。"}],
    "english": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."},
                {"role": "assistant", "content": "It does.  Twice\n\tindented"}],
    "literal_control": [{"role": "user", "content": "a</s>我们<s>b [INST] 学习 [/INST] <<SYS>>"},
                        {"role": "assistant", "content": "</s>[/INST] 好的"}],
}
TEXTS = ["北京和上海都是中国的城市。", *chinese_sentences(6, seed=3), *ENGLISH, *MIXED, "emoji 🦙🚀❤️ 和 😀 表情",
         "𝄞 𠀀 龘 €"]
# The scripted reply: new pieces, characters the vocabulary lacks (4-, 3- and 2-byte ones) and English.
SCRIPT = "我们学习中文，𝄞€ok朋友¿"


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("grow_consumers")


@pytest.fixture(scope="module")
def extended(extended_vocab) -> str:
    """The bundled tokenizer extended with Chinese pieces (1,024 -> 1,280 with padding; tests/conftest.py)."""
    return str(extended_vocab["out"])


@pytest.fixture(scope="module")
def sp(extended):
    return spm.SentencePieceProcessor(model_file=os.path.join(extended, "tokenizer.model"))


@pytest.fixture(scope="module")
def hf_extended(extended):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(extended)


def train(work, name, checkpoint, tokenizer, *overrides) -> Path:
    rows = work / "rows.jsonl"
    if not rows.exists():
        rows.write_text("\n".join(train_rows_with_chinese()[:32]) + "\n", encoding="utf-8")
    output_dir = work / name
    args = [f"output_dir={output_dir}", f"model.name_or_path={checkpoint}", f"model.tokenizer={tokenizer}",
            "model.arch=null", f"dataset.source={rows}", "dataset.eval_source=null", "dataset.eval_fraction=0",
            "dataset.max_length=128", f"dataset.cache_dir={work / 'cache'}", "dataset.packing=false",
            "trainer.max_steps=2", "trainer.micro_batch_size=4", "trainer.save_steps=0", "trainer.eval_steps=0",
            "trainer.accuracy_samples=0", "trainer.generate_samples=0", "scheduler.warmup_ratio=0",
            "optimizer.lr=1e-2", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    done = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"train.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "vocabulary grown from 1024 to 1280 rows" in done.stderr + done.stdout
    return output_dir


@pytest.fixture(scope="module")
def grown_run(work, tiny_checkpoint, extended) -> Path:
    """A LoRA run that grew its base: merged, it is the grown model every full-model consumer takes (one run serves
    the HF, GGUF and PEFT exports; full runs load through the same growing, see test_grow_vocab)."""
    pytest.importorskip("peft")
    return train(work, "lora", tiny_checkpoint, extended, "peft=lora", "peft.modules_to_save=[embed_tokens,lm_head]")


def load(run):
    from llama2_sft.inference.load import load_model

    return load_model(str(run), "cpu", "fp32")


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def probe_ids(sp) -> list[int]:
    """A sequence holding base pieces, new pieces and byte pieces."""
    ids = [sp.bos_id(), *sp.encode("我们学习 English 🦙 北京")]
    assert any(i >= BASE_SIZE for i in ids) and any(sp.is_byte(i) for i in ids)
    return ids


# ---------------------------------------------------------------------------------------------------- encode_dialog
@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_encode_dialog_on_the_extended_tokenizer_equals_the_meta_reference(name, hf_extended, sp):
    encoded = encode_dialog(hf_extended, DIALOGS[name])
    ids, labels = meta_reference(sp, DIALOGS[name])
    assert (encoded.input_ids, encoded.labels) == (ids, labels)
    if name != "english":
        assert any(i >= BASE_SIZE for i in ids)  # the new pieces are used
    else:
        assert all(i < BASE_SIZE for i in ids)
    if name == "literal_control":  # typed control strings stay text: one BOS and one EOS, those of the turn
        assert ids.count(sp.bos_id()) == 1 and ids.count(sp.eos_id()) == 1 and ids[-1] == sp.eos_id()
        text = sp.decode(ids)
        assert "a</s>我们<s>b [INST] 学习 [/INST]" in text and "</s>[/INST] 好的" in text


# ---------------------------------------------------------------------------------------------------- HF export
def test_hf_export_of_a_grown_run_loads_in_stock_transformers_with_the_runs_logits_and_template(grown_run, work, sp):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama2_sft.export.hf import export_hf

    loaded = load(grown_run)
    assert loaded.model.config.vocab_size == len(loaded.tokenizer) == 1280
    ids = probe_ids(sp)
    expected = logits_of(loaded.model, ids)
    out = export_hf(loaded, str(work / "hf"), "fp32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == 1280
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 1280
    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=1e-5)
    trained_rows = model.get_input_embeddings().weight[BASE_SIZE:]
    assert not torch.equal(trained_rows, initial_new_rows(loaded.train_config))  # trained, and exported

    for name, messages in DIALOGS.items():
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rendered = list(rendered if isinstance(rendered, list) else rendered["input_ids"])
        reference = encode_dialog(loaded.tokenizer, messages).input_ids
        if name != "literal_control":
            assert rendered == reference, name
        else:  # stock tokenizers read a typed "</s>" / "<s>" as control tokens (documented in export/hf.py)
            assert rendered != reference and rendered.count(sp.eos_id()) > reference.count(sp.eos_id())
    # Plain text: the exported tokenizer gives SentencePiece's ids (special-token strings kept as text).
    for text in TEXTS:
        got = tokenizer(text.lstrip(" "), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert got == sp.encode(text.lstrip(" ")), text


def initial_new_rows(saved) -> torch.Tensor:
    """The new embedding rows as growing initialised them before training, from the base of a run's config."""
    from transformers import AutoModelForCausalLM

    from llama2_sft.grow import grow_model

    base = AutoModelForCausalLM.from_pretrained(saved.model.name_or_path, dtype=torch.float32)
    grown = grow_model(base, os.path.join(saved.model.name_or_path, "tokenizer.model"),
                       os.path.join(saved.model.tokenizer, "tokenizer.model"))
    return grown.get_input_embeddings().weight[BASE_SIZE:].detach()


def test_peft_export_of_a_lora_run_that_grew_its_base_works_in_stock_peft_after_resizing_the_base(grown_run, work,
                                                                                                   tiny_checkpoint, sp):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama2_sft.export.adapter import export_peft
    from llama2_sft.inference.load import load_adapters

    out = export_peft(load_adapters(str(grown_run)), str(work / "peft"))  # the base is here: its architecture checked
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["base_model_name_or_path"] == tiny_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 1280
    with pytest.raises(RuntimeError, match="size mismatch"):  # the 1,024-row base as it is cannot take the adapters
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32), out)
    # The README.md the export writes says what to do; its code, run as it is, gives the run's model.
    readme = Path(out, "README.md").read_text(encoding="utf-8")
    assert "from 1,024 to 1,280 pieces" in readme and "resize_token_embeddings" in readme
    namespace = {"ADAPTER_DIR": out}
    exec(readme.split("```python\n")[1].split("```")[0], namespace)
    model = namespace["model"].eval()
    ids = probe_ids(sp)
    torch.testing.assert_close(logits_of(model, ids), logits_of(load(grown_run).model, ids), rtol=0, atol=1e-5)
    rendered = tokenizer.apply_chat_template(DIALOGS["chinese"], add_generation_prompt=True, tokenize=True)
    rendered = list(rendered if isinstance(rendered, list) else rendered["input_ids"])
    assert rendered == encode_dialog(tokenizer, DIALOGS["chinese"]).input_ids


# ---------------------------------------------------------------------------------------------------- scripted model
@pytest.fixture(scope="module")
def scripted(work, extended, sp):
    """(LoadedModel, reply ids): a Llama with the extended vocabulary that answers every chat prompt with SCRIPT
    then EOS. Attention and MLP write zeros, so the logits are lm_head(norm(embedding of the current token)); each
    token of the chain gets its own axis of the hidden space, and the next token's lm_head row points along it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llama2_sft.data.chat import generation_prompt
    from llama2_sft.inference.load import load_model

    tokenizer = AutoTokenizer.from_pretrained(extended)
    last_prompt_id = generation_prompt(tokenizer, [{"role": "user", "content": "hi"}], None)[-1]
    reply = sp.encode(SCRIPT)
    chain = [last_prompt_id, *reply, sp.eos_id()]
    assert len(set(chain[:-1])) == len(chain) - 1 <= TINY_ARCH["hidden_size"]  # one successor per token
    assert any(i >= BASE_SIZE for i in reply) and sum(sp.is_byte(i) for i in reply) >= 9
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, **TINY_ARCH))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for axis, (current, following) in enumerate(zip(chain, chain[1:])):
            embed[current] = 0.0
            embed[current, axis] = 1.0
            head[following, axis] = 10.0
    out = work / "scripted"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer.json"):
        (out / name).write_bytes((Path(extended) / name).read_bytes())
    return load_model(str(out), "cpu", "fp32"), reply


def test_streamed_pieces_join_to_sentencepieces_decode_of_random_reply_ids(hf_extended, sp):
    """TextStream on replies mixing new pieces, byte-fallback characters split across pieces and invalid byte runs:
    the pieces join to SentencePiece's decode of the ids, and no piece holds a U+FFFD that the decode lacks."""
    from llama2_sft.inference.generate import TextStream, decode_reply

    rng = random.Random(0)
    byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    texts = TEXTS + ["你好😀𠀀é龘€" * 2]
    cases = 0
    for trial in range(600):
        if trial % 3 == 0:  # anything, bytes often: invalid runs and valid starts left unfinished
            ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(sp.get_piece_size())
                   for _ in range(rng.randint(1, 16))]
        elif trial % 3 == 1:  # real text from a random point
            text = rng.choice(texts)
            ids = sp.encode(text[rng.randrange(len(text)):])
        else:  # the bytes of real characters as byte pieces, some shuffled or cut, then a piece
            data = list(rng.choice(["你好😀𠀀é", "€¿𝄞", "龘羊驼"]).encode("utf-8"))
            if rng.random() < 0.3:
                rng.shuffle(data)
            data = data[: rng.randint(1, len(data))]
            ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in data] + [rng.randrange(3, sp.get_piece_size())]
        pieces: list[str] = []
        stream = TextStream(hf_extended, pieces.append)
        for token in ids:
            stream.put(torch.tensor([token]))
        stream.end()
        whole = sp.decode(ids)
        assert "".join(pieces) == whole == decode_reply(hf_extended, ids), ids
        if "\ufffd" not in whole:
            assert not any("\ufffd" in piece for piece in pieces), ids
        cases += any(sp.is_byte(i) for i in ids) and "\ufffd" not in whole and len(pieces) > 1
    assert cases > 50  # whole characters from byte pieces were streamed in several pieces


def test_infer_api_and_demo_stream_the_scripted_reply_as_sentencepiece_decodes_it(scripted, sp, tmp_path, capsys):
    from fastapi.testclient import TestClient
    from omegaconf import OmegaConf

    import infer
    from llama2_sft.inference.chat import ChatGenerator
    from llama2_sft.inference.generate import SamplingConfig
    from llama2_sft.serve.api import ServeSettings, create_app
    from llama2_sft.serve.demo import stream_reply

    loaded, reply = scripted
    expected = sp.decode(reply).strip()
    assert expected == SCRIPT
    messages = [{"role": "user", "content": "你好"}]
    sampling = SamplingConfig(max_new_tokens=len(reply) + 4)
    generator = ChatGenerator(loaded)

    with generator.stream(generator.prepare(messages, None), sampling) as stream:
        pieces = list(stream)
    assert "".join(pieces).strip() == stream.result["text"] == expected
    assert stream.result["completion_tokens"] == len(reply) and stream.result["finish_reason"] == "stop"
    assert len(pieces) > 5 and not any("\ufffd" in piece for piece in pieces)

    # infer.py: one answer streamed to stdout, and batch mode.
    capsys.readouterr()
    assert infer._answer(generator, messages, None, sampling, seed=0) == expected
    assert capsys.readouterr().out.strip() == expected
    (tmp_path / "q.jsonl").write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = OmegaConf.create({"input": str(tmp_path / "q.jsonl"), "output": str(tmp_path / "a.jsonl"), "batch_size": 2})
    infer._batch(cfg, generator, sampling, None)
    assert json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8"))["response"] == expected

    # The API: whole and streamed (SSE), the legacy endpoint.
    client = TestClient(create_app(loaded, ServeSettings(system_prompt=None)))
    body = {"messages": messages, "temperature": 0, "max_tokens": len(reply) + 4}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["choices"][0]["message"]["content"] == expected
    with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1]]
    assert "".join(deltas).strip() == expected and not any("\ufffd" in delta for delta in deltas)
    legacy = client.post("/", json={"prompt": "你好", "max_length": len(reply) + 4, "temperature": 0}).json()
    assert legacy["response"] == expected

    # The demo: each value is the reply so far, the last one the whole reply.
    values = list(stream_reply(generator, [{"role": "user", "content": "你好"}], None, sampling))
    assert values[-1] == expected and all(expected.startswith(value) for value in values)
    assert not any("\ufffd" in value for value in values)



def test_a_stop_string_spanning_streamed_pieces_is_never_sent(scripted):
    """The API's stream holds back text that may start a stop string: streamed and whole replies agree."""
    from fastapi.testclient import TestClient

    from llama2_sft.serve.api import ServeSettings, create_app

    loaded, reply = scripted
    client = TestClient(create_app(loaded, ServeSettings(system_prompt=None)))
    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": len(reply) + 4}
    for stop, expected in (("文，𝄞", "我们学习中"), (["ok朋", "€o"], "我们学习中文，𝄞"), ("¿x", SCRIPT)):
        whole = client.post("/v1/chat/completions", json=dict(body, stop=stop)).json()
        assert whole["choices"][0]["message"]["content"] == expected
        with client.stream("POST", "/v1/chat/completions", json=dict(body, stop=stop, stream=True)) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        events = [json.loads(line[6:])["choices"][0] for line in lines[:-1]]
        assert "".join(event["delta"].get("content", "") for event in events).strip() == expected, stop
        assert events[-1]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------------- GGUF export
@pytest.fixture(scope="module")
def gguf_files(grown_run, scripted, work) -> dict[str, str]:
    from llama2_sft.export.gguf import export_gguf

    return {"grown": export_gguf(load(grown_run), str(work / "grown-f16.gguf"), "f16"),
            "scripted": export_gguf(scripted[0], str(work / "scripted-f16.gguf"), "f16")}


def test_gguf_of_a_grown_model_holds_the_merged_vocabulary_with_its_scores_and_types(gguf_files, extended):
    import gguf

    proto = proto_of(os.path.join(extended, "tokenizer.model"))
    reader = gguf.GGUFReader(gguf_files["grown"])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("llama.vocab_size") == len(proto.pieces) == 1280
    tokens, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    assert tokens == [piece.piece for piece in proto.pieces]
    assert scores == pytest.approx([piece.score for piece in proto.pieces])
    kinds = gguf.TokenType
    assert types == [int({NORMAL: kinds.NORMAL, UNUSED: kinds.UNUSED, BYTE: kinds.BYTE, 2: kinds.UNKNOWN,
                          3: kinds.CONTROL}[piece.type]) for piece in proto.pieces]
    new = range(BASE_SIZE, len(tokens))
    top_base = max(scores[i] for i in range(BASE_SIZE) if types[i] == kinds.NORMAL)
    assert {types[i] for i in new} == {kinds.NORMAL, kinds.UNUSED}  # new pieces and the padding
    assert min(scores[i] for i in new if types[i] == kinds.NORMAL) > top_base  # the new merges win, as in SentencePiece
    assert all(tokens[i].startswith("<unused") for i in new if types[i] == kinds.UNUSED)
    rows = {tensor.name: tensor.shape.tolist() for tensor in reader.tensors}
    assert rows["token_embd.weight"][1] == rows["output.weight"][1] == 1280


def test_llama_cpp_tokenizes_the_merged_vocabulary_as_sentencepiece_and_chats_as_encode_dialog(gguf_files, extended,
                                                                                               sp, hf_extended,
                                                                                               llama_cpp):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from llama2_sft.data.chat import generation_prompt
    from tests.integration.test_gguf import _open

    proto = proto_of(os.path.join(extended, "tokenizer.model"))
    new_texts = [piece.piece.replace("\u2581", " ") for piece in proto.pieces[BASE_SIZE:] if piece.type == NORMAL]
    with _open(llama_cpp, gguf_files["grown"]) as llama:
        assert llama.n_vocab() == 1280
        for text in TEXTS + new_texts:  # Chinese, English, mixed, emoji; every new piece's own text
            ids = sp.encode(text)
            assert llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text
            decoded = sp.decode(ids)  # llama.cpp may keep the dummy-prefix space SentencePiece drops
            assert llama.detokenize(ids).decode("utf-8") in (decoded, " " + decoded), text
        assert sum(any(i >= BASE_SIZE for i in sp.encode(text)) for text in TEXTS) >= 10
        # The embedded chat template, rendered as llama-cpp-python's chat handler does, gives encode_dialog's ids.
        formatter = Jinja2ChatFormatter(template=llama.metadata["tokenizer.chat_template"], eos_token="</s>",
                                        bos_token="<s>")
        for name, messages in DIALOGS.items():
            messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            rendered = formatter(messages=messages)
            ids = llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
            # Except where a user typed "</s>": llama.cpp, as transformers, reads it as the control token.
            assert (ids == generation_prompt(hf_extended, messages, None)) == (name != "literal_control"), name


def test_f16_greedy_tokens_of_grown_models_equal_transformers(gguf_files, grown_run, scripted, sp, llama_cpp):
    import numpy as np

    from llama2_sft.data.chat import generation_prompt
    from tests.integration.test_gguf import _llama_cpp_greedy, _open, _transformers_greedy

    # The scripted model: its reply is new pieces and byte pieces, each decided by a margin of ~80 logits.
    loaded, reply = scripted
    prompt = generation_prompt(loaded.tokenizer, [{"role": "user", "content": "你好"}], None)
    want, _, _ = _transformers_greedy(loaded.model, prompt, len(reply) + 1)
    assert want == [*reply, sp.eos_id()]
    with _open(llama_cpp, gguf_files["scripted"]) as llama:
        got, _ = _llama_cpp_greedy(llama, prompt, len(reply) + 1)
    assert got == want
    # The trained grown model: the same function up to f16 rounding, and the same greedy tokens while no step is
    # decided by less than twice that rounding.
    loaded = load(grown_run)
    prompt = generation_prompt(loaded.tokenizer, DIALOGS["chinese"], None)
    want, margins, want_logits = _transformers_greedy(loaded.model, prompt, 8)
    with _open(llama_cpp, gguf_files["grown"]) as llama:
        got, got_logits = _llama_cpp_greedy(llama, prompt, 8)
    error = float(np.abs(got_logits - want_logits).max())
    assert error < 0.01 * float(want_logits.std())
    decided = next((step for step, margin in enumerate(margins) if margin <= 2 * error), len(margins))
    print(f"grown f16: max |logit diff| {error:.2e}, greedy steps decided by more than 2x that: {decided}/8")
    assert got[:decided] == want[:decided]


# ---------------------------------------------------------------------------------------------------- real Llama-2
@pytest.fixture(scope="module")
def real_merged(llama2_dir, work, chinese_corpus) -> Path:
    """The real 32k Llama-2 vocabulary (rebuilt by tests/assets/make_llama2_tokenizer.py) with the same Chinese pieces
    merged in, and a tiny random Llama of that vocabulary saved with it (the tokenizer is what is tested)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llama2_sft.vocab import build_vocabulary

    out = work / "llama2_zh"
    build_vocabulary(vocab_config(base=str(llama2_dir), corpus=chinese_corpus, out=str(out)))
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, **TINY_ARCH)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_on_the_merged_real_llama2_vocabulary_encode_dialog_is_the_meta_reference(real_merged):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(real_merged / "tokenizer.model"))
    assert sp.get_piece_size() > 32000 and sp.encode("Hello world") == [15043, 3186]
    tokenizer = AutoTokenizer.from_pretrained(real_merged)
    for name, messages in DIALOGS.items():
        encoded = encode_dialog(tokenizer, messages)
        assert (encoded.input_ids, encoded.labels) == meta_reference(sp, messages), name
        assert any(i >= 32000 for i in encoded.input_ids) == (name != "english"), name


def test_llama_cpp_tokenizes_the_merged_real_llama2_vocabulary_as_sentencepiece(real_merged, work, llama_cpp):
    from llama2_sft.export.gguf import export_gguf
    from llama2_sft.inference.load import load_model
    from tests.integration.test_gguf import _open

    sp = spm.SentencePieceProcessor(model_file=str(real_merged / "tokenizer.model"))
    proto = proto_of(real_merged / "tokenizer.model")
    new_texts = [piece.piece.replace("\u2581", " ") for piece in proto.pieces[32000:] if piece.type == NORMAL]
    path = export_gguf(load_model(str(real_merged), "cpu", "fp32"), str(work / "llama2_zh.gguf"), "f16")
    with _open(llama_cpp, path) as llama:
        assert llama.n_vocab() == sp.get_piece_size()
        for text in TEXTS + chinese_sentences(50, seed=5) + new_texts:
            assert llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) == sp.encode(text), text
