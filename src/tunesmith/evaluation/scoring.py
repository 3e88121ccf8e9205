"""What a model says about rows: log-probabilities of given answers (label scoring, perplexity) and batched answers.

Everything is batched: rows are sorted by length so a batch wastes little on padding, and results come back in the
caller's order. Label scoring formats `prompt + label` exactly as training does (chat template, end-of-turn token
included), so a label scores the way the model was taught to produce it — no free generation, no parsing.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from tunesmith.data.format import (IGNORE, encode_chat, encode_text, last_answer_only,  # noqa: F401 - re-exported
                                   pad_token_id)


def sequence_logprobs(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16,
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
    """For each (input_ids, labels) pair: the summed log-probability of its labelled tokens, and their count."""
    import torch

    from tunesmith.methods.head_loss import head_logprobs, head_set_aside, plain_head

    head = plain_head(model)

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq, lab = sequences[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, :len(lab)] = torch.tensor(lab)
            mask[row, :len(seq)] = 1
        shifted = labels[:, 1:]
        keep = (shifted != IGNORE).any(dim=0).nonzero().flatten()
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "logits_to_keep": keep.to(device),
                  "use_cache": False}
        targets = shifted[:, keep].to(device)
        with torch.inference_mode():
            if head is not None:  # the vocabulary only at labelled tokens, a chunk at a time (methods/head_loss.py)
                with head_set_aside(head):
                    hidden = model(**inputs).logits
                labelled = targets != IGNORE
                logp = torch.zeros(targets.shape, dtype=torch.float32, device=device)
                logp[labelled] = head_logprobs(hidden[labelled], head.weight, targets[labelled])
                scored_rows = [(s, int(n)) for s, n in zip(logp.sum(-1).tolist(), labelled.sum(-1).tolist())]
            else:
                scored_rows = _summed(model(**inputs).logits.float(), targets)
        for i, scored in zip(idx, scored_rows):
            out[i] = scored
        if progress:
            progress(len(idx))
    return out


SHARED_PREFIX_MIN_LABELS = 8  # from this many labels on, each prompt is run once and its cache shared by the labels


def score_labels(loaded, prompts: list[list[dict[str, str]]], labels: list[str], batch_size: int = 16,
                 progress: Callable[[int], None] | None = None,
                 shared_prefix: bool | None = None) -> list[dict[str, float]]:
    """Log-probability of each allowed label as the assistant's answer to each prompt (label + end of turn).

    With few labels every (prompt, label) sequence is scored on its own, many to a batch. With many labels (or
    `shared_prefix=True`) the prompt is run once and its key/value cache is reused for all the label continuations:
    77 labels cost one prompt pass plus 77 short continuations instead of 77 prompt passes. Both give the same scores.
    """
    tok = loaded.tokenizer
    sequences = [last_answer_only(*encode_chat(tok, prompt + [{"role": "assistant", "content": label}]))
                 for prompt in prompts for label in labels]
    if shared_prefix is None:
        shared_prefix = len(labels) >= SHARED_PREFIX_MIN_LABELS
    if shared_prefix and not _prompt_learning(loaded.model):
        scored = []
        for p in range(len(prompts)):
            scored += _shared_prefix_logprobs(loaded.model, sequences[p * len(labels):(p + 1) * len(labels)],
                                              pad_token_id(tok), batch_size)
            if progress:
                progress(len(labels))
    else:
        scored = sequence_logprobs(loaded.model, sequences, pad_token_id(tok), batch_size, progress)
    out = []
    for p in range(len(prompts)):
        row = scored[p * len(labels):(p + 1) * len(labels)]
        out.append({label: s for label, (s, _) in zip(labels, row)})
    return out


def _shared_prefix_logprobs(model, sequences: list[tuple[list[int], list[int]]], pad_id: int,
                            batch_size: int) -> list[tuple[float, int]]:
    """`sequence_logprobs` for sequences that share a prefix: the prefix runs once, its cache serves every suffix.

    The prefix stops before the first scored token's predecessor, so every scored token is predicted by a position
    of the suffix pass; position ids continue from the prefix (the cache position does that).
    """
    import torch

    ids0 = sequences[0][0]
    common = len(ids0)
    for ids, _ in sequences[1:]:
        common = min(common, next((i for i, (a, b) in enumerate(zip(ids0, ids)) if a != b), len(ids)))
    first_scored = min(next((i for i, x in enumerate(lab) if x != IGNORE), len(lab)) for _, lab in sequences)
    cut = min(common, first_scored - 1)
    if cut < 1:
        return sequence_logprobs(model, sequences, pad_id, batch_size)
    device = next(model.parameters()).device
    with torch.inference_mode():
        prefix = model(input_ids=torch.tensor([ids0[:cut]], device=device), use_cache=True, logits_to_keep=1)
    # label continuations in order of length, so that a chunk pads little (77 intents: 820 tokens, not 1,203)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        chunk = [sequences[i] for i in idx]
        width = max(len(ids) for ids, _ in chunk) - cut
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), cut + width), dtype=torch.long)
        for row, (seq, lab) in enumerate(chunk):
            ids[row, :len(seq) - cut] = torch.tensor(seq[cut:])
            labels[row, :len(lab) - cut] = torch.tensor(lab[cut:])
            mask[row, :len(seq)] = 1
        cache = copy.deepcopy(prefix.past_key_values)
        cache.batch_repeat_interleave(len(chunk))
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                           use_cache=True).logits.float()
        for i, scored in zip(idx, _summed(logits[:, :-1], labels[:, 1:].to(device))):
            out[i] = scored
    return out


def _summed(logits, targets) -> list[tuple[float, int]]:
    """Per row: the summed log-probability of its target tokens (IGNORE skipped) under `logits`, and their count."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != IGNORE)
    return [(s, int(n)) for s, n in zip(picked.sum(-1).tolist(), (targets != IGNORE).sum(-1).tolist())]


def _prompt_learning(model) -> bool:
    """Prefix and prompt tuning bring their own virtual tokens: a cache passed in from outside would clash."""
    configs = getattr(model, "peft_config", None) or {}
    return any(c.is_prompt_learning for c in configs.values())


def text_nll(loaded, texts: list[str], max_len: int = 1024, batch_size: int = 8) -> list[tuple[float, int]]:
    """Negative log-likelihood (summed) and token count of each text, for perplexity."""
    tok = loaded.tokenizer
    sequences = []
    for text in texts:
        ids, labels = encode_text(tok, text)
        sequences.append((ids[:max_len], labels[:max_len]))
    return [(-s, n) for s, n in sequence_logprobs(loaded.model, sequences, pad_token_id(tok), batch_size)]


def generate_sorted(loaded, conversations: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers, batched by prompt length (left padding, KV cache); returned in the given order."""
    from tunesmith.generate import generate

    tok = loaded.tokenizer
    lengths = [len(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)) for c in conversations]
    order = sorted(range(len(conversations)), key=lambda i: lengths[i])
    answers: list[Any] = [None] * len(conversations)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, answer in zip(idx, generate(loaded, [conversations[i] for i in idx], max_new_tokens=max_new_tokens,
                                           batch_size=len(idx))):
            answers[i] = answer
        if progress:
            progress(len(idx))
    return answers
