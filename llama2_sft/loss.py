"""The training loss: summed token cross-entropy over supervised targets (the loop divides by the global count).

Two implementations, chosen by `trainer.cross_entropy`; `tests/unit/test_fast_paths.py` proves they give the same loss
and the same gradients:

* `logits`: the model returns [rows, width, vocab] logits; the loss upcasts them to fp32 a chunk of positions at a time
  (`summed_cross_entropy`). At 4 x 4096 x 32000 the bf16 logits alone are 1 GB, and so is their
  gradient.
* `fused` (default): only the supervised positions go through the LM head, and the head and the cross-entropy run
  together a chunk of positions at a time (`linear_cross_entropy`), so [tokens, vocab] logits never exist whole, in
  any dtype. The gradients of the hidden states and of the head weight are computed in the same pass (no
  recomputation; the plain path's FLOPs for the supervised positions, none for the prompt positions) and scaled by
  the incoming gradient in backward.

`install_fused_head` swaps the model's LM head for a `FusedLMHead` holding the *same* weight (state-dict keys,
checkpoints and generation are unchanged) and lets `model(..., target_ids=...)` return the loss sum. The loss is then
computed inside the model's own forward call, where FSDP2 and ZeRO-3 have the head's weight gathered.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from llama2_sft.data.chat import IGNORE_INDEX


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would compute in here (the autocast dtype inside autocast)."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) over targets != IGNORE_INDEX, computed chunk by chunk; the gradients
    are produced in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype: torch.dtype):  # noqa: D102
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
            for start in range(0, h.shape[0], chunk_size):
                h_chunk, t_chunk = h[start: start + chunk_size], targets[start: start + chunk_size]
                logits = (h_chunk @ w.t()).float()
                valid = t_chunk != IGNORE_INDEX
                safe = torch.where(valid, t_chunk, torch.zeros_like(t_chunk))
                picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
                # log-sum-exp and softmax in the logits' own memory (no [chunk, vocab] temporaries)
                row_max = logits.amax(dim=1, keepdim=True)
                exp_sum = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
                lse = (row_max + exp_sum.log()).squeeze(1)
                total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                if want_h or want_w:
                    # d CE / d logits = softmax - onehot(target); zero for ignored positions
                    grad_logits = logits.div_(exp_sum)
                    grad_logits[torch.arange(grad_logits.shape[0], device=grad_logits.device), safe] -= 1.0
                    grad_logits.mul_(valid.unsqueeze(1))
                    grad_logits = grad_logits.to(compute_dtype)
                    if want_h:
                        torch.mm(grad_logits, w, out=grad_h[start: start + chunk_size])
                    if want_w:  # accumulate in fp32 without a [vocab, hidden] temporary where the dtypes allow
                        if compute_dtype == torch.float32:
                            grad_w.addmm_(grad_logits.t(), h_chunk)
                        else:
                            grad_w.add_(grad_logits.t() @ h_chunk)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors  # used once (one backward per micro-batch): scaled in place
        out_h = grad_h.mul_(grad_output).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        out_w = grad_w.mul_(grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return out_h, out_w, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor,
                         chunk_size: int = 2048) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `target_ids` (IGNORE_INDEX skipped), in fp32, without
    materialising more than `chunk_size` rows of logits. hidden [..., H], weight [V, H], target_ids [...]."""
    if chunk_size < 1:
        raise ValueError(f"trainer.ce_chunk_size={chunk_size}: expected >= 1")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1).to(flat_hidden.device)
    # Only supervised positions reach the LM head (prompts are most tokens in SFT: 81% on the embedded data);
    # the others contribute nothing to the loss and get a zero gradient through the gather's backward.
    supervised = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if not torch.is_grad_enabled():  # eval: no gradients to precompute (autograd would still flag the weight)
        flat_hidden, weight = flat_hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(flat_hidden.index_select(0, supervised), weight, flat_targets.index_select(0, supervised),
                                     chunk_size, _compute_dtype(flat_hidden))


class FusedLMHead(torch.nn.Linear):
    """An LM head that is an ordinary `nn.Linear` when called with hidden states alone, and returns the summed
    cross-entropy when also given `target_ids` (see `linear_cross_entropy`)."""

    chunk_size: int = 2048

    def forward(self, hidden: torch.Tensor, target_ids: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        if target_ids is None:
            return super().forward(hidden)
        if self.bias is not None:
            raise ValueError("the fused cross-entropy supports LM heads without bias (Llama): use trainer.cross_entropy=logits")
        return linear_cross_entropy(hidden, self.weight, target_ids, self.chunk_size)


def install_fused_head(model: torch.nn.Module, chunk_size: int = 2048) -> torch.nn.Module:
    """Give `model` a `FusedLMHead` sharing its head weight, and make `model(..., target_ids=t)` return the summed
    cross-entropy (any other call is the model's usual forward). Returns the model."""
    head = model.get_output_embeddings()
    if not isinstance(head, FusedLMHead):
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise ValueError(f"trainer.cross_entropy=fused needs a bias-free nn.Linear LM head, got {type(head).__name__}")
        fused = FusedLMHead(head.in_features, head.out_features, bias=False, device="meta")
        fused.weight = head.weight  # the same Parameter: keys, tying and sharding are unchanged
        model.set_output_embeddings(fused)
        head = fused
    head.chunk_size = int(chunk_size)
    model_forward = type(model).forward

    def forward(self, *args, target_ids: torch.Tensor | None = None, **kwargs):
        if target_ids is None:
            return model_forward(self, *args, **kwargs)
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        return self.get_output_embeddings()(hidden, target_ids)

    model.forward = types.MethodType(forward, model)
    return model


def model_inputs(batch: dict, varlen: bool = False) -> dict:
    """Forward kwargs for a collated batch. Packed rows pass reset position_ids and no attention mask (cache off),
    which sdpa and eager turn into a block-diagonal causal mask. Varlen kernels (flash-attention, `varlen=True`) get
    the segment boundaries over the flattened batch: transformers infers them from position_ids only for a batch of
    one row, and would otherwise let the samples of a packed row attend to each other."""
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch and "seq_lens" not in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if varlen and "cu_seq_lens" in batch:
        cu, longest = batch["cu_seq_lens"], int(batch["max_seq_len"])
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kwargs


def uses_varlen_kernels(attn_implementation: str) -> bool:
    """Attention implementations that take packed-segment boundaries (cu_seq_lens) instead of a mask."""
    return attn_implementation not in ("sdpa", "eager")


def forward_logits(model: torch.nn.Module, batch: dict, varlen: bool = False) -> torch.Tensor:
    """Logits [rows, width, vocab] of a collated batch."""
    return model(**model_inputs(batch, varlen)).logits


def batch_loss_sum(model: torch.nn.Module, batch: dict, fused: bool, varlen: bool = False) -> torch.Tensor:
    """The summed supervised-token cross-entropy of one collated batch (fp32 scalar)."""
    if fused:
        return model(**model_inputs(batch, varlen), target_ids=batch["target_ids"])
    logits = forward_logits(model, batch, varlen)
    return summed_cross_entropy(logits, batch["target_ids"])


def summed_cross_entropy(logits: torch.Tensor, target_ids: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over supervised targets, in fp32, a chunk of positions at a time
    so the fp32 upcast of [tokens, vocab] logits never exists whole."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = target_ids.reshape(-1).to(flat_logits.device)
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_logits.shape[0], chunk_rows):
        total = total + F.cross_entropy(
            flat_logits[start: start + chunk_rows].float(), flat_targets[start: start + chunk_rows],
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
    return total
