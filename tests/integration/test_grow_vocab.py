"""Issue 13 §2: a checkpoint grows to an extended vocabulary at load (llama2_sft.grow), and a tokenizer that does not
belong to its checkpoint stops the run naming both.

The extended tokenizer is built by `python -m llama2_sft.vocab`'s code from the bundled 1,024-piece tokenizer on
Chinese text (the Chinese chat rows of data/train.jsonl plus generated sentences, as tests/unit/test_vocab.py does);
the base is the tiny random Llama of tests/conftest.py. The splits the new rows are averaged over are recomputed here
with SentencePiece directly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, compose
from tests.integration.test_training_parity import assert_same_losses, free_port, losses

spm = pytest.importorskip("sentencepiece")
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

from llama2_sft.grow import grow_model, vocab_plan  # noqa: E402
from tests.unit.test_vocab import proto_of, train_rows_with_chinese  # noqa: E402

BYTE, UNUSED = 6, 5


def write_proto(proto, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return str(folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("grow")


@pytest.fixture(scope="module")
def extended(extended_vocab) -> str:
    """The bundled tokenizer extended with Chinese pieces (1,024 -> 1,280 with padding; tests/conftest.py)."""
    return str(extended_vocab["out"])


@pytest.fixture(scope="module")
def rows(work) -> str:
    path = work / "rows.jsonl"
    path.write_text("\n".join(train_rows_with_chinese()[:64]) + "\n", encoding="utf-8")
    return str(path)


def load(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


def base_split(base_proto, piece: str) -> list[int]:
    """The base's ids for a piece's own text ("▁" as a space; no dummy prefix, whitespace kept)."""
    probe = sentencepiece_model_pb2.ModelProto()
    probe.CopyFrom(base_proto)
    probe.normalizer_spec.add_dummy_prefix = False
    probe.normalizer_spec.remove_extra_whitespaces = False
    processor = spm.SentencePieceProcessor(model_proto=probe.SerializeToString())
    ids = processor.encode(piece.replace("\u2581", " "))
    assert processor.decode(ids) == piece.replace("\u2581", " ")
    return ids


# ---------------------------------------------------------------------------------------------------- grow_model
def test_old_rows_stay_bit_identical_and_new_rows_are_the_mean_of_their_base_split(tiny_checkpoint, sp_model_file,
                                                                                   extended):
    base, grown = load(tiny_checkpoint), grow_model(load(tiny_checkpoint), sp_model_file,
                                                    os.path.join(extended, "tokenizer.model"))
    base_proto, new_proto = proto_of(sp_model_file), proto_of(os.path.join(extended, "tokenizer.model"))
    old, size = len(base_proto.pieces), len(new_proto.pieces)
    assert size > old and size % 64 == 0
    assert grown.config.vocab_size == size
    pairs = [(base.model.embed_tokens.weight, grown.model.embed_tokens.weight),
             (base.lm_head.weight, grown.lm_head.weight)]
    byte_splits = unused = 0
    for before, after in pairs:
        assert after.shape == (size, before.shape[1])
        assert torch.equal(after[:old], before)
        for index in range(old, size):
            piece = new_proto.pieces[index]
            if piece.type == UNUSED:  # padding: the mean of every base row (see grow.grown_rows)
                expected = before.mean(0)
                unused += 1
            else:
                ids = base_split(base_proto, piece.piece)
                byte_splits += any(base_proto.pieces[i].type == BYTE for i in ids)
                expected = before[ids].mean(0)
            torch.testing.assert_close(after[index], expected, rtol=1e-6, atol=1e-7)
    assert byte_splits > 0 and unused > 0  # both kinds of initialisation were checked


def test_the_grown_model_gives_the_base_models_logits_on_old_vocabulary_inputs(tiny_checkpoint, sp_model_file,
                                                                               extended):
    base, grown = load(tiny_checkpoint), grow_model(load(tiny_checkpoint), sp_model_file,
                                                    os.path.join(extended, "tokenizer.model"))
    ids = torch.randint(3, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = base(input_ids=ids).logits, grown(input_ids=ids).logits
    assert after.shape[-1] == grown.config.vocab_size > before.shape[-1]
    torch.testing.assert_close(after[..., :before.shape[-1]], before, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- at load
def grow_cfg(checkpoint, tokenizer, *overrides):
    return compose([f"model.name_or_path={checkpoint}", f"model.tokenizer={tokenizer}", "model.arch=null", *overrides])


def test_build_model_grows_and_the_meta_model_other_fsdp_ranks_build_has_the_grown_shape(tiny_checkpoint, extended):
    from transformers import AutoTokenizer

    from llama2_sft.model import build_meta_model, build_model

    cfg = grow_cfg(tiny_checkpoint, extended)
    tokenizer = AutoTokenizer.from_pretrained(extended)
    full = build_model(cfg.model, tokenizer, "fp32")
    meta = build_meta_model(cfg.model, tokenizer, "fp32")
    shapes = {name: tuple(p.shape) for name, p in full.state_dict().items()}
    assert shapes == {name: tuple(p.shape) for name, p in meta.state_dict().items()}
    assert shapes["model.embed_tokens.weight"][0] == shapes["lm_head.weight"][0] == len(tokenizer) == 1280
    assert full.config.vocab_size == meta.config.vocab_size == 1280

    pytest.importorskip("peft")
    lora_cfg = grow_cfg(tiny_checkpoint, extended, "peft=lora", "peft.modules_to_save=[embed_tokens,lm_head]")
    lora = build_model(lora_cfg.model, tokenizer, "fp32", "cpu", 0, lora_cfg.peft, "fp32")
    trainable = {name: tuple(p.shape) for name, p in lora.named_parameters() if p.requires_grad and "lora_" not in name}
    assert trainable == {"model.embed_tokens.weight": (1280, 64), "lm_head.weight": (1280, 64)}


def test_growing_with_lora_needs_both_modules_to_save(tiny_checkpoint, extended):
    from llama2_sft.config import preflight

    pytest.importorskip("peft")
    for saved in ("[]", "[lm_head]"):
        with pytest.raises(ValueError, match=r"peft\.modules_to_save.*") as error:
            preflight(grow_cfg(tiny_checkpoint, extended, "peft=lora", f"peft.modules_to_save={saved}"), "cpu")
        assert "embed_tokens" in str(error.value) and "1280 pieces" in str(error.value)
    preflight(grow_cfg(tiny_checkpoint, extended, "peft=lora", "peft.modules_to_save=[embed_tokens,lm_head]"), "cpu")
    for strategy in ("deepspeed_zero2", "deepspeed_zero3", "fsdp"):  # every strategy grows
        preflight(grow_cfg(tiny_checkpoint, extended, f"strategy={strategy}"), "cpu")


# ---------------------------------------------------------------------------------------------------- the check
@pytest.fixture(scope="module")
def grown_checkpoint(work, tiny_checkpoint, sp_model_file, extended) -> str:
    """The tiny Llama grown to the extended vocabulary and saved with it: a checkpoint whose own tokenizer is 1,280."""
    out = work / "grown_ckpt"
    grow_model(load(tiny_checkpoint), sp_model_file, os.path.join(extended, "tokenizer.model")).save_pretrained(out)
    for name in os.listdir(extended):
        if name != "report.json":
            shutil.copy2(os.path.join(extended, name), out / name)
    return str(out)


def test_a_tokenizer_with_other_pieces_stops_naming_both_tokenizers_and_the_first_differing_id(work, tiny_checkpoint,
                                                                                              extended):
    proto = proto_of(os.path.join(extended, "tokenizer.model"))
    proto.pieces[500].piece = "\u2581not_the_base_piece"
    other = write_proto(proto, work / "other_pieces")
    with pytest.raises(ValueError) as error:
        vocab_plan(grow_cfg(tiny_checkpoint, other).model)
    message = str(error.value)
    assert f"model.tokenizer={other}" in message and os.path.join(tiny_checkpoint, "tokenizer.model") in message
    assert "differ first at id 500" in message


def test_a_tokenizer_smaller_than_the_checkpoints_own_stops_and_so_does_train_py(grown_checkpoint, tokenizer_dir):
    with pytest.raises(ValueError) as error:
        vocab_plan(grow_cfg(grown_checkpoint, tokenizer_dir).model)
    message = str(error.value)
    assert "1024 pieces, fewer than the checkpoint's 1280 (first missing id 1024" in message
    assert tokenizer_dir in message and os.path.join(grown_checkpoint, "tokenizer.model") in message
    # As a new user would: the default model.tokenizer (data/tokenizer) with a checkpoint of another vocabulary.
    done = subprocess.run([sys.executable, "train.py", f"model.name_or_path={grown_checkpoint}", "trainer.max_steps=1",
                           f"output_dir={Path(grown_checkpoint).parent / 'never'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode != 0
    assert "does not belong to model.name_or_path" in done.stderr and "first missing id 1024" in done.stderr
    assert not (Path(grown_checkpoint).parent / "never" / "metrics.jsonl").exists()


def test_same_pieces_pass_and_a_checkpoint_without_a_tokenizer_cannot_grow(work, tiny_checkpoint, grown_checkpoint,
                                                                          tokenizer_dir, extended):
    assert not vocab_plan(grow_cfg(tiny_checkpoint, tokenizer_dir).model).grows  # a copy of its own tokenizer
    assert vocab_plan(grow_cfg(tiny_checkpoint, extended).model).grows
    assert not vocab_plan(grow_cfg(grown_checkpoint, extended).model).grows
    bare = work / "no_tokenizer"
    bare.mkdir()
    for name in os.listdir(tiny_checkpoint):
        if not name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(os.path.join(tiny_checkpoint, name), bare / name)
    with pytest.raises(ValueError, match="has no tokenizer.model of its own to split the new pieces with"):
        vocab_plan(grow_cfg(bare, extended).model)
    assert not vocab_plan(grow_cfg(bare, tokenizer_dir).model).grows  # no tokenizer of its own: taken as it is


def test_the_data_cache_key_changes_with_the_extended_tokenizer(tokenizer_dir, extended, rows):
    from llama2_sft.data.tokenize import fingerprint

    dataset = compose([f"dataset.source={rows}"]).dataset
    assert fingerprint(dataset, tokenizer_dir)[0] != fingerprint(dataset, extended)[0]


# ---------------------------------------------------------------------------------------------------- train.py
def run_train(work, name, checkpoint, tokenizer, rows, *overrides, nproc=1):
    output_dir = work / name
    args = [f"output_dir={output_dir}", f"model.name_or_path={checkpoint}", f"model.tokenizer={tokenizer}",
            "model.arch=null", f"dataset.source={rows}", "dataset.eval_source=null", "dataset.eval_fraction=0",
            "dataset.max_length=256", f"dataset.cache_dir={work / 'cache'}", "dataset.packing=false",
            "trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.save_steps=0", "trainer.eval_steps=0",
            "trainer.accuracy_samples=0", "trainer.generate_samples=0", "trainer.log_steps=1",
            "scheduler.warmup_ratio=0", "optimizer.lr=1e-3", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    done = subprocess.run([*launcher, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"train.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return output_dir, done


@pytest.mark.slow
def test_train_py_grows_the_checkpoint_single_fsdp_and_zero3_give_the_same_losses(work, tiny_checkpoint, extended,
                                                                                   rows):
    """FSDP2: rank 0 grows the full model, the other rank builds the grown shape on meta; ZeRO-3: both ranks build
    the model partitioned and grow only the gathered embedding and head (llama2_sft.grow._grow_partitioned)."""
    from llama2_sft.data.tokenize import fingerprint
    from llama2_sft.inference.load import load_model

    single, done = run_train(work, "single", tiny_checkpoint, extended, rows)
    assert "vocabulary grown from 1024 to 1280 rows" in done.stderr + done.stdout
    key = fingerprint(compose([f"dataset.source={rows}", "dataset.eval_source=null", "dataset.eval_fraction=0",
                               "dataset.max_length=256"]).dataset, extended)[0]
    assert os.listdir(work / "cache") == [key]  # tokenized with the extended tokenizer
    loaded = load_model(str(single), device="cpu", dtype="fp32")
    assert loaded.model.config.vocab_size == len(loaded.tokenizer) == 1280
    fsdp, _ = run_train(work, "fsdp", tiny_checkpoint, extended, rows, "strategy=fsdp", "trainer.micro_batch_size=2",
                        nproc=2)
    reference = losses(single)
    assert len(reference) == 3 and len(set(reference.values())) == 3
    assert_same_losses(reference, losses(fsdp))
    pytest.importorskip("deepspeed")
    zero3, done = run_train(work, "zero3", tiny_checkpoint, extended, rows, "strategy=deepspeed_zero3",
                            "trainer.micro_batch_size=2", nproc=2)
    assert "vocabulary grown from 1024 to 1280 rows" in done.stderr + done.stdout
    assert_same_losses(reference, losses(zero3))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_lora_run_grows_its_base_and_loads_merged_with_the_grown_vocabulary(work, tiny_checkpoint, extended, rows,
                                                                              method):
    """LoRA and QLoRA (NF4 base; embed_tokens and lm_head stay unquantized and are trained fully)."""
    from llama2_sft.inference.load import load_model

    pytest.importorskip("peft")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    run, _ = run_train(work, method, tiny_checkpoint, extended, rows, "trainer.max_steps=2", f"peft={method}",
                       "peft.modules_to_save=[embed_tokens,lm_head]")
    loaded = load_model(str(run), device="cpu", dtype="fp32")  # rebuilds the base, grows it, merges the adapters
    assert loaded.kind == f"dcp+{method}" and loaded.model.config.vocab_size == len(loaded.tokenizer) == 1280
    trained = loaded.adapters.trainable
    assert torch.equal(loaded.model.model.embed_tokens.weight, trained["model.embed_tokens.weight"])
    assert torch.equal(loaded.model.lm_head.weight, trained["lm_head.weight"])


def test_a_tokenizer_without_tokenizer_model_is_compared_by_its_tokens_and_cannot_grow(work, tiny_checkpoint,
                                                                                      tokenizer_dir, extended):
    from transformers import AutoTokenizer

    def hf_only(source, name):  # the Hugging Face files AutoTokenizer writes, without tokenizer.model
        folder = work / name
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
        (folder / "tokenizer.model").unlink(missing_ok=True)
        assert (folder / "tokenizer.json").is_file()
        return str(folder)

    assert vocab_plan(grow_cfg(tiny_checkpoint, hf_only(tokenizer_dir, "hf_base")).model).size == 1024
    with pytest.raises(ValueError, match=r"1280 pieces, more than the 1024 embeddings.*which has no tokenizer.model"):
        vocab_plan(grow_cfg(tiny_checkpoint, hf_only(extended, "hf_extended")).model)
