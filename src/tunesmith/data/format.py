"""Formatting: records -> token ids and labels with the model's own chat template.

The loss covers the assistant turns only (each closed by an end-of-turn/EOS token) unless `train_on="all"`.
The BOS token appears once: either the template writes it or we add it, never both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

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
    COLUMNS: ClassVar[tuple[str, ...]] = ("input_ids", "labels")  # what a trainer's dataset holds of the row

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def to_messages(record: Record, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages for a chat, instruction or classification record (a preference record: with its chosen
    reply)."""
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
    elif record.kind == "preference":  # the preferred conversation: what a policy should answer
        messages = preference_pair(record).conversation("chosen")
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


TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|User|System):[ \t]?")
TRANSCRIPT_ROLES = {"Human": "user", "User": "user", "Assistant": "assistant", "System": "system"}


def transcript_messages(text: str) -> list[dict[str, str]]:
    """A prompt as chat messages: "\\n\\nHuman: …\\n\\nAssistant: …" transcripts (HH-RLHF style) become turns; any
    other text is one user message. A trailing empty "Assistant:" (the turn to be answered) is dropped."""
    marks = list(TRANSCRIPT_TURN.finditer(text))
    if not marks or text[:marks[0].start()].strip():
        return [{"role": "user", "content": text.strip()}]
    messages = []
    for mark, nxt in zip(marks, marks[1:] + [None]):
        content = text[mark.end():nxt.start() if nxt else len(text)].strip()
        messages.append({"role": TRANSCRIPT_ROLES[mark.group(1)], "content": content})
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if any(not m["content"] for m in messages):
        return [{"role": "user", "content": text.strip()}]  # not a clean transcript: keep it whole
    return messages


@dataclass(frozen=True)
class PreferencePair:
    """A preference record in chat form: the prompt's messages and the two competing assistant replies."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str

    def conversation(self, which: str) -> list[dict[str, str]]:
        """The prompt followed by the `chosen` or `rejected` reply as the assistant's turn."""
        return self.prompt + [{"role": "assistant", "content": getattr(self, which)}]


def preference_pair(record: Record, system_prompt: str | None = None) -> PreferencePair:
    """The chat form of a preference record (prompt, chosen, rejected); replies lose their surrounding spaces."""
    if record.kind != "preference":
        raise DataError(f"{record.source}: line {record.line}: expected a preference row (prompt, chosen, rejected), "
                        f"got a {record.kind} row")
    prompt = transcript_messages(record.data["prompt"])
    if system_prompt and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return PreferencePair(prompt, record.data["chosen"].strip(), record.data["rejected"].strip())


def encode(record: Record, tokenizer, max_len: int, train_on: str = "responses",
           system_prompt: str | None = None) -> Encoded:
    """Tokenize one record for causal-LM training, truncating to `max_len` tokens (keeping the start; a preference
    record, trained on its chosen reply, keeps the end)."""
    if record.kind == "text":
        ids, labels = encode_text(tokenizer, record.data["text"])
    else:
        ids, labels = encode_chat(tokenizer, to_messages(record, system_prompt), train_on)
    full = len(ids)
    if record.kind == "preference":  # SFT on the chosen reply: the earlier turns are context, and a long
        ids, labels = last_answer_only(ids, labels)  # conversation loses its start, not the reply
        return Encoded(ids[-max_len:], labels[-max_len:], full > max_len, full)
    return Encoded(ids[:max_len], labels[:max_len], full > max_len, full)


def last_answer_only(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Keep the labels of the last assistant turn only (earlier turns, e.g. few-shot examples, are context)."""
    end = max((i for i, x in enumerate(labels) if x != IGNORE), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return ids, [x if start <= i <= end else IGNORE for i, x in enumerate(labels)]


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


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
