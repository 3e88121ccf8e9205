"""Formatting: records -> token ids and labels with the model's own chat template.

The loss covers the assistant turns only (each closed by an end-of-turn/EOS token) unless `train_on="all"`.
The BOS token appears once: either the template writes it or we add it, never both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.records import Record
from tunesmith.errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One formatted row: token ids, labels (IGNORE where no loss), and whether max length cut it."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    full_length: int
    weight: float = 1.0  # the row's loss weight (class weights for classification; 1 otherwise)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def to_messages(record: Record, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages for a chat, instruction or classification record."""
    if record.kind == "chat":
        messages = list(record.data["messages"])
    elif record.kind == "instruction":
        prompt = record.data["instruction"]
        if record.data.get("input"):
            prompt = f"{prompt}\n\n{record.data['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.data["output"]}]
    elif record.kind == "classification":
        messages = [{"role": "user", "content": record.data["text"]},
                    {"role": "assistant", "content": record.data["label"]}]
    else:
        raise DataError(f"{record.source}: line {record.line}: {record.kind} records have no chat form")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_messages(record: Record, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The messages up to (not including) the last assistant turn: what a model is asked at generation time."""
    messages = to_messages(record, system_prompt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def encode(record: Record, tokenizer, max_len: int, train_on: str = "responses",
           system_prompt: str | None = None) -> Encoded:
    """Tokenize one record for causal-LM training, truncating to `max_len` tokens (keeping the start)."""
    if record.kind == "text":
        ids, labels = encode_text(tokenizer, record.data["text"])
    else:
        ids, labels = encode_chat(tokenizer, to_messages(record, system_prompt), train_on)
    full = len(ids)
    return Encoded(ids[:max_len], labels[:max_len], full > max_len, full)


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Plain text for continued pretraining: BOS (if the model uses one), the text, EOS; loss on all of it."""
    ids = _with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def encode_chat(tokenizer, messages: list[dict[str, str]], train_on: str = "responses") -> tuple[list[int], list[int]]:
    """Render `messages` with the chat template; label the assistant turns (or everything)."""
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    trained = [any(start < e and end > s for s, e in spans) for start, end in offsets]  # any overlap
    ids, trained = _close_turns(tokenizer, ids, trained)
    bos = _needs_bos(tokenizer, ids)
    if bos is not None:
        ids, trained = [bos] + ids, [False] + trained
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
    return ids, labels


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template",
                        "use a chat/instruct model, or train plain text (data.format: text)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn's content and its end-of-turn marker within `text`.

    Found by rendering the conversation up to each assistant turn with and without it; the template must render
    a conversation's prefix as a prefix of its text (true for the common templates).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not text.startswith(before) or not text.startswith(through) or not through.startswith(before):
            raise DataError("the chat template does not render a conversation's start as a prefix of it, so the "
                            "assistant turns can't be located", "train with method.train_on: all")
        end = len(through.rstrip())  # trailing newlines after the end-of-turn token carry no signal
        spans.append((len(before), end))
    return spans


def _close_turns(tokenizer, ids: list[int], trained: list[bool]) -> tuple[list[int], list[bool]]:
    """Make sure every trained span ends with an end-of-turn/EOS token, inserting EOS where a template has none."""
    stops = end_of_turn_ids(tokenizer)
    out_ids, out_trained = [], []
    for i, (tok, keep) in enumerate(zip(ids, trained)):
        out_ids.append(tok)
        out_trained.append(keep)
        span_ends = keep and (i + 1 == len(ids) or not trained[i + 1])
        if span_ends and tok not in stops and tokenizer.eos_token_id is not None:
            out_ids.append(tokenizer.eos_token_id)
            out_trained.append(True)
    return out_ids, out_trained


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn: EOS and the template's turn-end tokens that exist in the vocabulary."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


def _needs_bos(tokenizer, ids: list[int]) -> int | None:
    """The BOS id to prepend, if the tokenizer adds one by itself and the text doesn't start with it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    adds = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return bos if adds and (not ids or ids[0] != bos) else None


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = _needs_bos(tokenizer, ids)
    return [bos] + ids if bos is not None else list(ids)


def preview_marked(tokenizer, enc: Encoded) -> str:
    """The formatted text with trained tokens wrapped in ⟦ ⟧, for `tunesmith data preview`."""
    out: list[str] = []
    inside = False
    for tok, lab in zip(enc.input_ids, enc.labels):
        trained = lab != IGNORE
        if trained and not inside:
            out.append("⟦")
        if not trained and inside:
            out.append("⟧")
        inside = trained
        out.append(tokenizer.decode([tok]))
    if inside:
        out.append("⟧")
    return "".join(out)


def stats(encoded: list[Encoded]) -> dict[str, Any]:
    """Token counts over encoded rows: total, trained, lengths, truncated rows."""
    lengths = sorted(e.full_length for e in encoded) or [0]
    return {
        "rows": len(encoded), "tokens": sum(len(e.input_ids) for e in encoded),
        "trained_tokens": sum(e.trained_tokens for e in encoded),
        "truncated_rows": sum(e.truncated for e in encoded),
        "length_min": lengths[0], "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1],
    }
