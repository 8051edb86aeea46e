"""Each fast path computes the same thing as the plain path: fused LM head + cross-entropy vs logits then
`F.cross_entropy`; activation checkpointing (full, selective, every n-th layer) vs none; torch.compile of the
decoder layers vs eager; fused vs foreach AdamW. Losses *and* gradients are compared."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llama2_sft.data.chat import IGNORE_INDEX
from llama2_sft.loss import FusedLMHead, _LinearCrossEntropy, batch_loss_sum, install_fused_head, linear_cross_entropy, summed_cross_entropy
from llama2_sft.model import compile_decoder_for_training, compile_decoder_layers, enable_activation_checkpointing
from llama2_sft.optim import build_adamw


def reference_ce(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def ce_problem(rows=3, width=11, hidden=16, vocab=50, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, width, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (rows, width), generator=gen)
    t[0, :4] = IGNORE_INDEX          # a prompt
    t[-1, :] = IGNORE_INDEX          # a row with nothing supervised (a whole chunk of ignored targets below)
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 4, 7, 33, 4096])
def test_fused_linear_cross_entropy_equals_logits_then_cross_entropy(chunk):
    h, w, t = ce_problem()
    expected = reference_ce(h, w, t)
    expected.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, chunk_size=chunk)
    (got * 0.37).backward()  # the incoming gradient scales both gradients
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, grads[0] * 0.37, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, grads[1] * 0.37, rtol=1e-5, atol=1e-7)


def test_fused_cross_entropy_in_bf16_matches_the_bf16_plain_path():
    """bf16 weights and activations (FSDP's param dtype): both paths matmul in bf16 and reduce in fp32."""
    h, w, t = ce_problem(rows=4, width=64, hidden=64, vocab=300, dtype=torch.bfloat16)
    logits = h @ w.t()
    expected = summed_cross_entropy(logits, t)
    expected.backward()
    grads = h.grad.float(), w.grad.float()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, chunk_size=50)
    got.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(h.grad.float(), grads[0], rtol=0.02, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), grads[1], rtol=0.02, atol=2e-2)


def test_fused_cross_entropy_under_autocast_computes_in_the_autocast_dtype():
    h, w, t = ce_problem(rows=3, width=32, hidden=32, vocab=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = summed_cross_entropy(F.linear(h, w), t)
        got = linear_cross_entropy(h, w, t, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)
    got.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32  # gradients in the parameters' dtype


def test_fused_cross_entropy_without_grad_builds_no_graph_and_gives_the_same_loss(monkeypatch):
    h, w, t = ce_problem()
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk_size=5)
    assert got.grad_fn is None
    seen = []
    forward = _LinearCrossEntropy.forward
    monkeypatch.setattr(_LinearCrossEntropy, "forward",
                        staticmethod(lambda ctx, *args: seen.append(ctx.needs_input_grad[:2]) or forward(ctx, *args)))
    with torch.no_grad():
        linear_cross_entropy(h, w, t, chunk_size=5)
    assert seen == [(False, False)]  # no gradient is precomputed in evaluation
    torch.testing.assert_close(got, reference_ce(h, w, t).detach(), rtol=1e-6, atol=1e-6)


def test_fused_cross_entropy_rejects_an_out_of_vocabulary_target():
    h, w, t = ce_problem()
    t[1, 3] = 50
    with pytest.raises(RuntimeError):
        linear_cross_entropy(h, w, t)


# --- on a tiny Llama ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(hf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_ARCH

    torch.manual_seed(0)
    arch = dict(TINY_ARCH, num_hidden_layers=3)
    config = LlamaConfig(vocab_size=len(hf_tokenizer), bos_token_id=1, eos_token_id=2, use_cache=False, **arch)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float().train()


def packed_batch(vocab, seed=1):
    """Two packed rows (positions restart per sample) with prompts and replies."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 40), generator=gen)
    positions = torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, :5] = IGNORE_INDEX
    targets[:, 15:20] = IGNORE_INDEX
    targets[:, 14] = IGNORE_INDEX
    targets[:, -1] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": positions, "target_ids": targets, "seq_lens": [[15, 25], [15, 25]]}


def loss_and_grads(model, batch, fused):
    model.zero_grad(set_to_none=True)
    loss = batch_loss_sum(model, batch, fused)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, rtol=1e-5, atol=2e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_installing_the_fused_head_keeps_weights_keys_and_logits(tiny_model):
    batch = packed_batch(tiny_model.config.vocab_size)
    model = copy.deepcopy(tiny_model)
    keys = list(model.state_dict())
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    install_fused_head(model, chunk_size=16)
    assert isinstance(model.lm_head, FusedLMHead) and list(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=batch["input_ids"], use_cache=False).logits, logits, rtol=0, atol=0)


def test_fused_head_gives_the_plain_loss_and_every_parameter_gradient(tiny_model):
    batch = packed_batch(tiny_model.config.vocab_size)
    plain = loss_and_grads(tiny_model, batch, fused=False)
    model = install_fused_head(copy.deepcopy(tiny_model), chunk_size=13)
    assert_same(plain, loss_and_grads(model, batch, fused=True))


@pytest.mark.parametrize("policy, every", [("full", 1), ("selective", 1), ("full", 2)])
def test_activation_checkpointing_policies_give_the_same_loss_and_gradients(tiny_model, policy, every):
    batch = packed_batch(tiny_model.config.vocab_size)
    plain = loss_and_grads(tiny_model, batch, fused=False)
    model = copy.deepcopy(tiny_model)
    enable_activation_checkpointing(model, policy, every)
    layers = list(model.model.layers)
    assert [layer.gradient_checkpointing for layer in layers] == [i % every == 0 for i in range(len(layers))]
    assert_same(plain, loss_and_grads(model, batch, fused=False))


def test_selective_checkpointing_saves_matmul_outputs_and_recomputes_the_rest(tiny_model):
    """Two ways of counting: under `selective`, backward re-runs the cheap ops but no matmul; under `full` it re-runs
    every matmul of the checkpointed layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.count += 1
            return func(*args, **(kwargs or {}))

    batch = packed_batch(tiny_model.config.vocab_size)
    counts = {}
    for policy in ("none", "full", "selective"):
        model = copy.deepcopy(tiny_model)
        if policy != "none":
            enable_activation_checkpointing(model, policy)
        loss = batch_loss_sum(model, batch, fused=False)
        with CountMatmuls() as mode:
            loss.backward()
        counts[policy] = mode.count
    # q, k, v, o, gate, up are recomputed; down_proj is not (non-reentrant checkpointing stops the recompute once
    # every tensor backward needs is back, and down_proj's output is not one of them)
    assert counts["full"] - counts["none"] == 6 * len(tiny_model.model.layers)
    assert counts["selective"] == counts["none"]


def test_unknown_checkpoint_policy_names_the_key(tiny_model):
    with pytest.raises(ValueError, match="model.checkpoint_policy"):
        enable_activation_checkpointing(copy.deepcopy(tiny_model), "some")


def test_compiled_decoder_layers_give_the_same_loss_and_gradients(tiny_model, compile_enabled):
    """torch.compile (inductor, CPU C++ codegen) of each decoder layer, with the fused head and checkpointing on."""
    import torch._dynamo

    batch = packed_batch(tiny_model.config.vocab_size)
    plain = loss_and_grads(tiny_model, batch, fused=False)
    model = install_fused_head(copy.deepcopy(tiny_model), chunk_size=32)
    enable_activation_checkpointing(model, "full")
    compile_decoder_layers(model, "inductor")
    torch._dynamo.reset()
    try:
        first = loss_and_grads(model, batch, fused=True)
        second = loss_and_grads(model, batch, fused=True)  # the cached graphs
    finally:
        torch._dynamo.reset()
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert_same(plain, first, rtol=1e-4, atol=1e-6)
    assert_same(first, second, rtol=0, atol=0)


def test_compiled_decoder_gives_the_same_loss_and_gradients_and_leaves_inference_eager(tiny_model, compile_enabled):
    """compile_scope=decoder: the whole decoder stack as one inductor graph for the training forward (packed rows,
    fused head) == eager; evaluation (no_grad) and generation never enter the compiled graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    batch = packed_batch(tiny_model.config.vocab_size)
    plain = loss_and_grads(tiny_model, batch, fused=False)
    model = install_fused_head(copy.deepcopy(tiny_model), chunk_size=32)
    compile_decoder_for_training(model, "inductor")
    torch._dynamo.reset()
    counters.clear()
    try:
        first = loss_and_grads(model, batch, fused=True)
        frames = counters["stats"]["unique_graphs"]
        assert frames >= 1  # the training forward was compiled
        second = loss_and_grads(model, batch, fused=True)  # the cached graph
        with torch.no_grad():
            eval_loss = batch_loss_sum(model, batch, True)
        model.eval()
        prompt = batch["input_ids"][:1, :7]
        with torch.no_grad():
            generated = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
            expected = tiny_model.eval().generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        assert counters["stats"]["unique_graphs"] == frames  # nothing new compiled for eval or generation
    finally:
        torch._dynamo.reset()
        tiny_model.train()
    assert_same(plain, first, rtol=1e-4, atol=1e-6)
    assert_same(first, second, rtol=0, atol=0)
    torch.testing.assert_close(eval_loss, first[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(generated, expected)


def test_fused_and_foreach_adamw_take_the_same_steps(tiny_model):
    def run(fused):
        model = copy.deepcopy(tiny_model)
        optimizer = build_adamw(model.named_parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
        assert optimizer.defaults["fused" if fused else "foreach"]
        batch = packed_batch(model.config.vocab_size)
        for _ in range(3):
            optimizer.zero_grad()
            batch_loss_sum(model, batch, fused=False).backward()
            optimizer.step()
        return model.state_dict()

    fused, foreach = run(True), run(False)
    for name in fused:
        torch.testing.assert_close(fused[name], foreach[name], rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_of_a_batch_with_nothing_supervised_is_zero_with_zero_gradients():
    h, w, t = ce_problem()
    t[:] = IGNORE_INDEX
    loss = linear_cross_entropy(h, w, t, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()
