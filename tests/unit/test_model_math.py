"""Model-side facts the loop relies on, each checked by computing the same thing two ways."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.data.collate import block_causal_mask, collate_packed, collate_padded
from llama2_sft.loss import summed_cross_entropy


def tiny_model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for length in (7, 5, 9):
        ids = torch.randint(3, 120, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_with_reset_positions_and_no_cache_equal_separate_samples(attn):
    model = tiny_model(attn)
    parts = samples()
    packed = collate_packed([parts], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        cursor = 0
        for sample in parts:
            alone = model(input_ids=torch.tensor([sample["input_ids"]]), use_cache=False).logits[0]
            n = len(sample["input_ids"])
            torch.testing.assert_close(logits[cursor: cursor + n], alone, rtol=1e-5, atol=1e-5)
            cursor += n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_leak_across_samples_when_the_kv_cache_is_on(attn):
    model = tiny_model(attn)
    parts = samples()
    packed = collate_packed([parts], pad_id=0)
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits[0]
        second_alone = model(input_ids=torch.tensor([parts[1]["input_ids"]]), use_cache=False).logits[0]
    n0, n1 = len(parts[0]["input_ids"]), len(parts[1]["input_ids"])
    assert not torch.allclose(leaky[n0: n0 + n1], second_alone, atol=1e-4)


def test_float_block_mask_equals_reset_positions_under_eager():
    model = tiny_model("eager")
    packed = collate_packed([samples()], pad_id=0)
    mask = block_causal_mask(packed["seq_lens"], packed["input_ids"].shape[1])
    with torch.no_grad():
        by_positions = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        by_mask = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(by_positions, by_mask, rtol=1e-5, atol=1e-5)


def test_boolean_4d_mask_is_misread_under_eager_attention():
    """A bool mask (True = attend) is added to the scores as 0/1 under eager attention instead of masking: wrong."""
    model = tiny_model("eager")
    packed = collate_packed([samples()], pad_id=0)
    float_mask = block_causal_mask(packed["seq_lens"], packed["input_ids"].shape[1])
    bool_mask = float_mask == 0
    with torch.no_grad():
        right = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=float_mask, use_cache=False).logits
        try:
            wrong = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=bool_mask, use_cache=False).logits
        except Exception:  # noqa: BLE001 - refusing a bool mask is also acceptable behaviour
            return
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_padded_and_packed_batches_give_the_same_summed_loss():
    model = tiny_model("sdpa")
    parts = samples()
    padded, packed = collate_padded(parts, pad_id=0), collate_packed([parts[:2], parts[2:]], pad_id=0)
    with torch.no_grad():
        a = summed_cross_entropy(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits, padded["target_ids"])
        b = summed_cross_entropy(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits, packed["target_ids"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_summed_cross_entropy_equals_one_shot_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 120, generator=g)
    targets = torch.randint(0, 120, (3, 50), generator=g)
    targets[0, :10] = IGNORE_INDEX
    one_shot = F.cross_entropy(logits.reshape(-1, 120), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(summed_cross_entropy(logits, targets, chunk_rows=7), one_shot)


def test_token_normalised_accumulation_gives_the_full_batch_gradient():
    """sum over micro-batches of (summed CE / global supervised count) == mean CE over the whole batch."""
    parts = samples()
    model_a, model_b = tiny_model("sdpa").train(), tiny_model("sdpa").train()
    full = collate_padded(parts, pad_id=0)
    loss = F.cross_entropy(model_a(input_ids=full["input_ids"], use_cache=False).logits.reshape(-1, 120),
                           full["target_ids"].reshape(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    total = int((full["target_ids"] != IGNORE_INDEX).sum())
    for sample in parts:  # uneven micro-batches: a per-micro-batch mean would weight them wrongly
        micro = collate_padded([sample], pad_id=0)
        (summed_cross_entropy(model_b(input_ids=micro["input_ids"], use_cache=False).logits, micro["target_ids"]) / total).backward()
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What a varlen kernel (flash_attn_varlen_func) computes, in plain torch: the batch flattened into one token
    stream, causal attention within each [cu[i], cu[i+1]) segment only. Fails if the boundaries are not passed."""
    cu = kwargs["cu_seq_lens_q"]
    assert torch.equal(cu, kwargs["cu_seq_lens_k"]) and kwargs["max_length_q"] == int((cu[1:] - cu[:-1]).max())
    rows, heads, width, dim = query.shape
    groups = heads // key.shape[1]
    flat = [t.transpose(1, 2).reshape(rows * width, t.shape[1], dim) for t in (query, key, value)]
    q, k, v = flat[0], flat[1].repeat_interleave(groups, 1), flat[2].repeat_interleave(groups, 1)
    out = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=True, scale=scaling).transpose(0, 1)
    return out.reshape(rows, width, heads, dim), None


def test_varlen_kernels_get_segment_boundaries_over_the_whole_packed_batch():
    """transformers infers packed segments from position_ids only for a batch of ONE row (checked here), so with
    several packed rows a varlen kernel would let samples attend to each other; `model_inputs(varlen=True)` passes the
    boundaries the collator computed, and the result equals each sample run alone under sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    from llama2_sft.loss import model_inputs

    AttentionInterface.register("varlen_reference", varlen_reference_attention)
    AttentionMaskInterface.register("varlen_reference", flash_attention_mask)
    model = tiny_model("varlen_reference")
    reference = tiny_model("sdpa")  # the same weights, each sample on its own
    parts = samples()
    units = [parts[:2], parts[2:] + parts[:1]]  # 2 rows: [7, 5] and [9, 7]: the first row is padded by 4
    packed = collate_packed(units, pad_id=0)
    assert packed["cu_seq_lens"].tolist() == [0, 7, 12, 16, 25, 32] and packed["max_seq_len"] == 9
    assert not _is_packed_sequence(packed["position_ids"], batch_size=2)
    assert _is_packed_sequence(packed["position_ids"][:1], batch_size=1)
    with torch.no_grad():
        logits = model(**model_inputs(packed, varlen=True)).logits
        for row, unit in enumerate(units):
            cursor = 0
            for sample in unit:
                alone = reference(input_ids=torch.tensor([sample["input_ids"]]), use_cache=False).logits[0]
                n = len(sample["input_ids"])
                torch.testing.assert_close(logits[row, cursor: cursor + n], alone, rtol=1e-5, atol=1e-5)
                cursor += n
        # without the boundaries the kernel cannot separate the samples: the reference refuses, a real one leaks
        with pytest.raises(KeyError):
            model(**model_inputs(packed, varlen=False))
