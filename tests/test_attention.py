"""methods/attention.py: the same attention as SDPA, faster where a CPU allows, and packed rows without a mask."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _model(tiny_model_dir, implementation: str):
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.attention import register

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    if implementation != "sdpa":
        model.set_attn_implementation(register())
    return model


def _loss_and_grads(model, **inputs):
    out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.detach(), grads


def test_load_base_for_trains_with_it_and_plain_fp32_is_sdpa_itself(tiny_model_dir):
    """fp32, padded batch with a mask: the very same numbers as SDPA (it is SDPA)."""
    from tunesmith.methods.adapters import load_base_for
    from tunesmith.model import ModelSource

    model = load_base_for("lora", None, ModelSource(tiny_model_dir))
    assert model.config._attn_implementation == "tunesmith"
    reference = _model(tiny_model_dir, "sdpa")
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       reference(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("padded", [False, True])
def test_bf16_math_path_is_as_close_to_fp32_as_sdpa_in_bf16(tiny_model_dir, padded):
    """Under bf16 autocast our attention (bf16 matmuls, fp32 softmax) is at least as close to the fp32 answer —
    logits and every gradient — as SDPA's bf16 kernel is (within 1.5x its error, or 1e-3 of the norm)."""
    ids = torch.randint(0, 1000, (2, 10))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, 7:] = 0
    keep = mask.bool()
    exact_out, exact_grads = _loss_and_grads(_model(tiny_model_dir, "sdpa").train(), input_ids=ids,
                                             attention_mask=mask)
    errors = {}
    for implementation in ("sdpa", "tunesmith"):
        model = _model(tiny_model_dir, implementation).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask)
        errors[implementation] = {"logits": _relative(out[keep], exact_out[keep])}
        errors[implementation].update({n: _relative(grads[n], g) for n, g in exact_grads.items()})
    assert len(errors["sdpa"]) > 10
    for what, sdpa_error in errors["sdpa"].items():
        assert errors["tunesmith"][what] <= max(1.5 * sdpa_error, 1e-3), (what, errors["tunesmith"][what], sdpa_error)


def _relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def test_a_packed_row_is_attended_one_sequence_at_a_time(tiny_model_dir):
    """Three sequences laid end to end (positions restarting at 0) give each sequence's own logits and gradients,
    in fp32 to 1e-5 — as if each were run alone."""
    lengths = [5, 8, 3]
    seqs = [torch.randint(0, 1000, (1, n)) for n in lengths]
    packed = torch.cat(seqs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    model = _model(tiny_model_dir, "tunesmith").train()
    out, grads = _loss_and_grads(model, input_ids=packed, position_ids=positions, use_cache=False)
    alone = torch.cat([model(input_ids=s).logits for s in seqs], dim=1)
    assert torch.allclose(out, alone.detach(), atol=1e-5)
    reference = _model(tiny_model_dir, "sdpa").train()  # SDPA with transformers' block-diagonal mask (no cache)
    ref_out, ref_grads = _loss_and_grads(reference, input_ids=packed, position_ids=positions, use_cache=False)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_generation_with_a_cache_is_unchanged(tiny_model_dir):
    """q and k of different lengths (decoding with a KV cache) go to SDPA as before: the same greedy tokens."""
    ids = torch.randint(0, 1000, (1, 6))
    outs = [_model(tiny_model_dir, impl).eval().generate(ids, max_new_tokens=5, do_sample=False)
            for impl in ("sdpa", "tunesmith")]
    assert torch.equal(outs[0], outs[1])
