"""The language-model head and its cross-entropy, only where a label is, in chunks: no `[batch, length, vocabulary]`
logits tensor ever exists.

A step of a small model spends a large share of its time and most of its activation memory on the vocabulary
projection (49,152 wide for SmolLM2): logits for every position, a log-softmax over them, and the gradient of both.
Only the positions that carry a label need them, and their gradient can be formed chunk by chunk during the forward
pass (softmax minus one-hot) and multiplied straight back through the head — as Liger's fused linear cross-entropy
and Apple's cut cross-entropy do — so a chunk of logits lives only while it is used. The loss and the gradients are
the plain ones to fp32 rounding (tests/test_head_loss.py).

`chunked_head_loss` is the entry point; `plain_head(model)` says whether a model's head can take this path (a plain
bias-free `nn.Linear` on a model family whose logits are the head's output unchanged), and `head_set_aside` makes
the head return its input for one forward, so that the call still goes through every wrapper (peft, DDP) and the
model's "logits" are the final hidden states at the kept positions.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MiB in fp32): rows per chunk = this // vocabulary
# Model families whose causal-LM logits are exactly lm_head(final hidden state): no soft-capping, no logit scale.
PLAIN_HEAD_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})


@dataclass
class HeadLoss:
    """The summed (weighted) cross-entropy of the labelled tokens, their number, and how many the head's top-1 got."""

    total: Any  # 0-d tensor, differentiable
    count: Any  # 0-d long tensor
    correct: Any  # 0-d long tensor


@functools.cache
def _head_loss_function():
    import torch

    class _ChunkedHeadLoss(torch.autograd.Function):
        """sum_i w_i * CE(h_i W^T, t_i); the gradients are formed in forward, one chunk of logits at a time."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, token_weights, compute_dtype):
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            n, vocab = hidden.shape[0], weight.shape[0]
            rows = max(1, CHUNK_ELEMENTS // vocab)
            w = weight.detach().to(compute_dtype)  # cast once (under autocast every chunk would cast it again)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, n, rows):
                    h = hidden[start:start + rows].detach().to(compute_dtype)
                    t = targets[start:start + rows]
                    logits = (h @ w.T).float()
                    picked = logits.gather(1, t.unsqueeze(1)).squeeze(1)
                    top, best = logits.max(dim=-1)
                    correct += (best == t).sum()
                    probs = logits.sub_(top.unsqueeze(1)).exp_()  # one exp pass, in the logits' own storage
                    sums = probs.sum(dim=-1)
                    per_token = top + sums.log() - picked  # log-sum-exp minus the target's logit
                    tw = None if token_weights is None else token_weights[start:start + rows].float()
                    total += (per_token if tw is None else per_token * tw).sum()
                    if not (need_h or need_w):
                        continue
                    scale = sums.reciprocal_() if tw is None else tw / sums
                    grad = probs.mul_(scale.unsqueeze(1))  # softmax (times the token's weight) ...
                    minus = torch.full_like(picked, -1.0) if tw is None else -tw
                    grad.scatter_add_(1, t.unsqueeze(1), minus.unsqueeze(1))  # ... minus its one-hot target
                    grad = grad.to(compute_dtype)
                    if need_h:
                        grad_h[start:start + rows] = (grad @ w).to(hidden.dtype)
                    if need_w:
                        grad_w += (grad.T @ h).float()
            ctx.grad_h, ctx.grad_w, ctx.weight_dtype = grad_h, grad_w, weight.dtype
            ctx.mark_non_differentiable(correct)
            return total, correct

        @staticmethod
        def backward(ctx, grad_total, _grad_correct):
            grad_h = None if ctx.grad_h is None else ctx.grad_h * grad_total.to(ctx.grad_h.dtype)
            grad_w = None if ctx.grad_w is None else (ctx.grad_w * grad_total).to(ctx.weight_dtype)
            ctx.grad_h = ctx.grad_w = None
            return grad_h, grad_w, None, None, None

    return _ChunkedHeadLoss


def chunked_head_loss(hidden, weight, targets, token_weights=None) -> HeadLoss:
    """Cross-entropy of `weight`'s projection of `hidden` [n, hidden] against `targets` [n] (every one a real label),
    each token counted `token_weights` [n] times (class weights) when given, summed. Under autocast the matmuls run in
    its dtype and the softmax in fp32, as an autocast `lm_head` followed by `.float()` and `F.cross_entropy` would."""
    import torch

    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    count = torch.as_tensor(targets.numel(), device=hidden.device)
    if targets.numel() == 0:  # no label in the batch: a zero that still reaches the graph
        zero = hidden.sum() * 0.0
        return HeadLoss(zero, count, torch.zeros((), dtype=torch.long, device=hidden.device))
    total, correct = _head_loss_function().apply(hidden, weight, targets, token_weights, dtype)
    return HeadLoss(total, count, correct)


def head_logprobs(hidden, weight, targets):
    """log p(target) [n] of each row of `hidden` [n, hidden] under `weight`'s projection, a chunk of logits at a time
    (scoring: no gradient). The matmul runs in the tensors' dtype, the log-softmax in fp32."""
    import torch

    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.no_grad():
        for start in range(0, targets.shape[0], rows):
            logits = (hidden[start:start + rows] @ weight.T).float()
            t = targets[start:start + rows].unsqueeze(1)
            out[start:start + rows] = (logits.gather(1, t) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(1)
    return out


def _unwrapped(model):
    """The transformers model inside DDP / DeepSpeed / peft wrappers."""
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def plain_head(model):
    """The model's output head when logits are exactly `head(final hidden state)` and its weight is whole on this
    process (not sharded by ZeRO-3 or FSDP); None otherwise (the caller projects with the model's own head)."""
    from torch import nn

    base = _unwrapped(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:  # a LoRA-wrapped or modules_to_save head: not plain
        return None
    weight = head.weight
    if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor" or weight.dim() != 2:
        return None
    return head


@contextlib.contextmanager
def head_set_aside(head):
    """Within the block, `head` returns its input: the model's "logits" are its final hidden states."""
    head.forward = lambda x: x
    try:
        yield
    finally:
        del head.forward
