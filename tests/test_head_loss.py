"""The chunked head-and-loss (methods/head_loss.py) against the plain full-logits cross-entropy."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 10:] = -100  # a shorter reply
    labels[2, 6:8] = -100  # a hole
    return ids, labels


def _plain(model, ids, labels, weights=None):
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                reduction="none").view_as(targets)
    if weights is not None:
        per_token = per_token * weights.unsqueeze(1)
    return per_token.sum() / (targets != -100).sum(), logits


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [2**25, 1000 * 7])  # one chunk; several chunks of 7 rows (vocabulary ~49k → 7)
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_head_loss_equals_the_plain_loss_and_its_gradients(tiny_model_dir, monkeypatch, chunk, weighted):
    """Every parameter's gradient — the tied embedding/head included — and the loss, to 1e-5 in fp32."""
    from transformers import AutoModelForCausalLM

    from tunesmith.methods import head_loss
    from tunesmith.methods.common import trained_token_loss

    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", chunk if chunk > 2**20 else 7 * vocab)
    ids, labels = _batch()
    weights = torch.tensor([1.0, 2.5, 0.5]) if weighted else None

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    assert head_loss.plain_head(model) is model.lm_head
    inputs = {"input_ids": ids, "labels": labels, **({"weights": weights} if weighted else {})}
    loss, logits, count, correct = trained_token_loss(model, inputs)
    loss.backward()
    chunked = _grads(model)

    model.zero_grad()
    expected, full = _plain(model, ids, labels, weights)
    expected.backward()
    plain = _grads(model)

    targets = labels[:, 1:]
    assert logits is None and int(count) == int((targets != -100).sum()) == 21
    assert int(correct) == int(((full.argmax(-1) == targets) & (targets != -100)).sum())
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert set(chunked) == set(plain) and len(plain) > 10
    for name, grad in plain.items():
        assert torch.allclose(chunked[name], grad, atol=1e-5, rtol=1e-4), name


def test_chunked_head_loss_under_bf16_autocast_matches_the_autocast_head(tiny_model_dir):
    """Under bf16 autocast both paths run the head in bf16 and the softmax in fp32: the same loss and gradients to bf16
    rounding."""
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.common import trained_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    ids, labels = _batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, *_ = trained_token_loss(model, {"input_ids": ids, "labels": labels})
        expected, _ = _plain(model, ids, labels)
    loss.backward()
    chunked = _grads(model)
    model.zero_grad()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    for name, grad in _grads(model).items():  # bf16 rounds to 2^-8 of a value: 1% of each tensor's largest entry
        assert (chunked[name] - grad).abs().max() <= 1e-2 * grad.abs().max(), name


def test_no_labelled_token_gives_a_zero_loss_that_still_backpropagates(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.common import trained_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    ids = torch.randint(0, 1000, (2, 8))
    loss, _, count, correct = trained_token_loss(model, {"input_ids": ids, "labels": torch.full_like(ids, -100)})
    loss.backward()
    assert loss.item() == 0.0 and int(count) == 0 and int(correct) == 0


def test_a_head_that_is_not_a_plain_linear_layer_takes_the_models_own_projection(tiny_model_dir):
    """A LoRA-wrapped lm_head (peft) is not plain: the loss falls back to the model's head and still matches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.common import trained_token_loss
    from tunesmith.methods.head_loss import plain_head

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert plain_head(model) is None
    ids, labels = _batch(2)
    with torch.no_grad():
        loss, logits, _, _ = trained_token_loss(model, {"input_ids": ids, "labels": labels})
        expected, _ = _plain(model, ids, labels)
    assert logits is not None and loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_sequence_logprobs_through_the_chunked_head_equal_the_full_logits(tiny_model_dir, monkeypatch):
    """Evaluation's scoring (perplexity, label scores) gives the same per-row sums on the chunked path, several
    chunks included, as on the model's own full logits."""
    from transformers import AutoModelForCausalLM

    from tunesmith.evaluation import scoring
    from tunesmith.methods import head_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sequences = []
    for n, cut in ((9, 4), (6, 2), (12, 7)):
        ids = torch.randint(0, 1000, (n,)).tolist()
        sequences.append((ids, [-100] * cut + ids[cut:]))
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)
    chunked = scoring.sequence_logprobs(model, sequences, pad_id=0, batch_size=2)
    monkeypatch.setattr(head_loss, "plain_head", lambda m: None)
    plain = scoring.sequence_logprobs(model, sequences, pad_id=0, batch_size=2)
    assert [n for _, n in chunked] == [n for _, n in plain] == [5, 4, 5]
    for (a, _), (b, _) in zip(chunked, plain):
        assert a == pytest.approx(b, abs=1e-4) and a < 0
