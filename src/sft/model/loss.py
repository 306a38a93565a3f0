"""The training loss on labelled positions only, with the LM head's gradient computed in the forward pass.

TRL 1.16's fused LM head is built for GPUs. Where Triton does not run (CPUs) its torch fallback scores every
position (prompt and padding included), in fp32 even under bf16 autocast, computes the entropy and top-1 accuracy for
its logs, and recomputes every logits tile in backward: about 6 x positions x vocab x hidden FLOPs, most of them on
tokens that carry no label. For the usual LoRA run, where the LM head is frozen, the loss needs only

    logits = h W^T on the labelled positions, in the compute dtype;
    loss   = sum(logsumexp(logits) - logits[label]) / tokens;
    dL/dh  = (softmax(logits) - onehot(label)) W / tokens,

so `labelled_cross_entropy` computes the loss and dL/dh together, chunk by chunk of positions (one chunk's logits
alive at a time), keeps dL/dh for backward and never recomputes: 4 x labelled x vocab x hidden FLOPs, in bf16 where
the step runs in bf16 (logits of bf16 matmuls, as transformers' own LM head gives under autocast; softmax and sums
in fp32). Top-1 accuracy comes from the same max that stabilises the softmax.

Used in training whenever the LM head is a frozen plain tensor and nothing else changes the loss (`usable`);
otherwise, and for evaluation, TRL's own path runs unchanged.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import ModelOutput

# Positions per chunk: at most this many logits (x ~12 bytes of working memory each) are alive at once.
CHUNK_ELEMENTS = 1 << 24


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _LabelledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
        weight = weight.to(dtype)
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        step = chunk_tokens(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h, y = hidden[start : start + step].to(dtype), labels[start : start + step]
            logits = (h @ weight.T).float()
            top, best = logits.max(dim=-1)
            target = logits.gather(1, y[:, None]).squeeze(1)
            logits.sub_(top[:, None]).exp_()
            sums = logits.sum(dim=-1)
            total += (top + sums.log() - target).sum()
            correct += (best == y).sum()
            logits.div_(sums[:, None])  # softmax
            logits[torch.arange(len(y), device=y.device), y] -= 1.0
            grad[start : start + step] = (logits.to(dtype) @ weight).to(grad.dtype)
            del logits  # before the next chunk's: one chunk of logits alive at a time
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_correct: Any):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def labelled_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy, number of top-1 hits) over rows of `hidden` [n, d] with targets `labels` [n], for a
    frozen head `weight` [vocab, d]; differentiable in `hidden` only. Computed in the autocast dtype when autocast
    is on, else in the weight's dtype."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        return _LabelledCrossEntropy.apply(hidden, weight, labels, dtype)


@dataclass
class LabelledLoss(ModelOutput):
    loss: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


def usable(model: torch.nn.Module) -> str | None:
    """Why the labelled head cannot be used for this (unwrapped) model, or None when it can."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or type(head) is not torch.nn.Linear:
        return "the model's LM head is not a plain linear layer"
    weight = head.weight
    if head.bias is not None:
        return "the LM head has a bias"
    if weight.requires_grad:
        return "the LM head is trained"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or hasattr(weight, "ds_id"):
        return "the LM head is sharded (a DTensor or a DeepSpeed ZeRO-3 parameter)"
    text = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    if getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None) not in (None, 1, 1.0):
        return "the model scales or soft-caps its logits"
    return None


def install(model: torch.nn.Module) -> None:
    """Give the (unwrapped) causal LM's forward a `labelled_loss=True` mode; every other call goes to the forward it
    had (TRL's fused head after SFTTrainer's init)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = inner.forward

    @functools.wraps(type(inner).forward)  # the signature stays the model's: `generate` checks its kwargs against it
    def forward(self, *args, labelled_loss: bool = False, labels=None, num_items_in_batch=None, **kwargs):
        if not labelled_loss:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        weight = self.get_output_embeddings().weight
        total, correct = labelled_cross_entropy(hidden[mask], weight, labels[mask])
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        return LabelledLoss(loss=loss, correct=correct, label_mask=mask)

    inner.forward = types.MethodType(forward, inner)
