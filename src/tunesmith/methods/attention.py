"""Attention for training on a CPU: torch's SDPA, except where plain matmuls are faster or a packed batch needs no
mask at all. Registered with transformers' AttentionInterface as `tunesmith`; every other case is SDPA unchanged.

Measured on a 2-core AVX512-BF16 EPYC (bench/step_profile.py, BENCHMARKS.md "Training speed"): SDPA's CPU flash
kernel takes ~660 ms of a ~4 s LoRA SFT step of SmolLM2 in bf16, most of it in its backward; the same attention as
two bf16 matmuls and an fp32 softmax (what transformers' `eager` does) takes ~300 ms. In fp32 SDPA is as fast or
faster, so it stays.

A padding-free batch (one row of sequences laid end to end, positions restarting at 0 for each) is attended one
sequence at a time with a causal kernel and no mask, instead of through one dense block-diagonal mask over the whole
row (what SDPA is given otherwise): the work is the sum of the squared lengths, not the square of their sum.
"""

from __future__ import annotations

import functools

NAME = "tunesmith"
MATH_MAX_LENGTH = 1024  # longer sequences keep SDPA: the score matrix grows with the square of the length


@functools.cache
def register() -> str:
    """Make `tunesmith` an attention implementation transformers knows (its masks are SDPA's); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_for_training(model) -> None:
    """Switch a transformers model (or a peft model around one) that runs SDPA to this attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) == "sdpa" and base._can_set_attn_implementation():
        base.set_attn_implementation(register())


def _segments(position_ids) -> list[tuple[int, int]] | None:
    """(start, end) of each sequence in a packed row, from positions that restart at 0; None when not packed."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    ends = starts[1:] + [position_ids.shape[1]]
    return list(zip(starts, ends))


def _low_precision(query) -> bool:
    import torch

    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return dtype in (torch.bfloat16, torch.float16)


def _math(query, key, value, mask, scaling: float):
    """softmax(q k^T * scaling + mask) v with the softmax in fp32, causal when `mask` is None (q and k of one length);
    `mask` a boolean [batch, 1, q, k] (True: attend). Keys and values are repeated over grouped query heads."""
    import torch

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if mask is None:
        length = query.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype if not torch.is_autocast_enabled(query.device.type)
                                             else torch.get_autocast_dtype(query.device.type))
    return torch.matmul(probs, value)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention signature: query [b, heads, q, d], key/value [b, kv heads, k, d] → ([b, q, heads, d],
    None). SDPA (transformers' own `sdpa_attention_forward`) unless on a CPU without dropout, where a packed row is
    split into its sequences and low-precision sequences up to MATH_MAX_LENGTH use `_math`."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    simple = (query.device.type == "cpu" and (dropout == 0.0 or not module.training)
              and query.shape[-2] == key.shape[-2] and kwargs.get("softcap") is None
              and kwargs.get("sliding_window") is None)
    if not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    math = _low_precision(query)
    segments = _segments(kwargs.get("position_ids"))
    if segments is None:
        if math and query.shape[-2] <= MATH_MAX_LENGTH and (attention_mask is None
                                                            or attention_mask.dtype == torch.bool):
            return _math(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    parts = []
    for start, end in segments:  # each sequence of the packed row on its own, causal, no mask
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if math and end - start <= MATH_MAX_LENGTH:
            parts.append(_math(q, k, v, None, scaling).transpose(1, 2))
        else:
            parts.append(sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                                is_causal=True)[0])
    return torch.cat(parts, dim=1).contiguous(), None
