"""Augmentation: label-preserving variants of existing rows, each marked with where it came from and how.

Only the input side changes (classification and text `text`, instruction `instruction`/`input`, chat user turns,
preference `prompt`); labels, outputs and assistant turns never do. `noise` makes light, seeded typos; `paraphrase`
asks a teacher (see `tunesmith.data.synth`) to reword. A variant identical to its original, or to an earlier
variant of the same row, is skipped.
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any

from tunesmith.data.records import FIELDS, Record
from tunesmith.errors import DataError

HOWS = ("noise", "paraphrase")
INPUT_FIELDS = {"text": ("text",), "classification": ("text",), "instruction": ("instruction", "input"),
                "preference": ("prompt",), "chat": ("messages",)}
NOISE_RATE = 0.05  # share of words that get one typo (at least one word per variant)
NOISE_OPS = ("swap", "drop", "double", "drop_word")


def augment(records: list[Record], how: str, copies: int = 1, teacher=None, seed: int = 0,
            protect: tuple[str, ...] | list[str] = (), rate: float = NOISE_RATE, max_new_tokens: int = 256,
            temperature: float = 0.7) -> list[dict[str, Any]]:
    """`copies` variants of each record: canonical fields plus `"augmented": {"from": "<file>:<line>", "how": ...}`.

    `protect` names fields that stay as they are (e.g. `input`); `teacher` is needed for `paraphrase`.
    """
    if how not in HOWS:
        raise DataError(f"unknown augmentation {how!r}", f"choose one of {', '.join(HOWS)}")
    if how == "paraphrase" and teacher is None:
        raise DataError("paraphrasing needs a teacher model", "pass --teacher MODEL or --teacher-url URL")
    if copies < 1:
        raise DataError(f"asked for {copies} copies", "ask for at least one copy per row")
    known = {f for fields in FIELDS.values() for f in fields}
    unknown = sorted(set(protect) - known)
    if unknown:
        raise DataError(f"can't protect unknown field {', '.join(map(repr, unknown))}",
                        f"protect canonical fields: {', '.join(sorted(known))}")
    if how == "noise":
        return _collect(records, copies, protect, lambda texts, rng: [add_noise(t, rng, rate) for t in texts],
                        {"how": "noise"}, seed)
    return _paraphrased(records, copies, protect, teacher, seed, max_new_tokens, temperature)


def input_slots(record: Record, protect=()) -> list[tuple]:
    """Where the input-side text of a record sits: (field,) or ("messages", turn) for chat user turns."""
    fields = [f for f in INPUT_FIELDS[record.kind] if f not in protect]
    if record.kind == "chat":
        return [("messages", i) for i, m in enumerate(record.data["messages"])
                if "messages" in fields and m["role"] == "user"]
    return [(f,) for f in fields if record.data.get(f, "").strip()]


def _get(data: dict[str, Any], slot: tuple) -> str:
    return data["messages"][slot[1]]["content"] if slot[0] == "messages" else data[slot[0]]


def _put(data: dict[str, Any], slot: tuple, text: str) -> None:
    if slot[0] == "messages":
        data["messages"][slot[1]]["content"] = text
    else:
        data[slot[0]] = text


def _variant(record: Record, slots: list[tuple], texts: list[str], mark: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(record.data)
    for slot, text in zip(slots, texts):
        _put(data, slot, text)
    return {**data, "augmented": {"from": f"{record.source}:{record.line}", **mark}}


def _collect(records, copies, protect, make, mark, seed) -> list[dict[str, Any]]:
    out = []
    for record in records:
        slots = input_slots(record, protect)
        if not slots:
            continue
        originals = [_get(record.data, s) for s in slots]
        seen = {tuple(originals)}
        for n in range(copies):
            rng = random.Random(f"{seed}:{Path(record.source).name}:{record.line}:{n}")  # not the folder
            texts = make(originals, rng)
            if tuple(texts) in seen:
                continue
            seen.add(tuple(texts))
            out.append(_variant(record, slots, texts, mark))
    return out


def add_noise(text: str, rng: random.Random, rate: float = NOISE_RATE) -> str:
    """Light typos: swap two adjacent letters, drop or double a letter, or drop a word, in ~`rate` of the words.

    Words with digits are left alone (numbers carry meaning); at least one word changes when any can.
    """
    parts = re.split(r"(\s+)", text)
    words = [i for i, p in enumerate(parts) if len(p) >= 3 and p.isalpha()]
    if not words:
        return text
    chosen = [i for i in words if rng.random() < rate] or [rng.choice(words)]
    n_words = sum(1 for p in parts if p.strip())
    for i in chosen:
        op = rng.choice(NOISE_OPS if n_words > 3 else NOISE_OPS[:3])
        word = parts[i]
        j = rng.randrange(len(word) - 1)
        if op == "swap":
            parts[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
        elif op == "drop":
            parts[i] = word[:j] + word[j + 1:]
        elif op == "double":
            parts[i] = word[:j + 1] + word[j] + word[j + 1:]
        else:  # drop the word and the space after it (before it, for the last word)
            parts[i] = ""
            parts[i + 1 if i + 1 < len(parts) else max(i - 1, 0)] = ""
            n_words -= 1
    return "".join(parts)


def paraphrase_prompt(text: str) -> str:
    """Ask for a rewording of `text` that keeps its meaning, and only that."""
    return ("Paraphrase the text below. Keep its meaning, tone, facts, names and numbers exactly; change the wording "
            "and sentence structure. Reply with the paraphrase only, no quotes or explanation.\n\n"
            f"Text:\n{text}")


def clean_paraphrase(reply: str) -> str:
    """The paraphrase without code fences, surrounding quotes or a 'Paraphrase:' lead-in."""
    text = reply.strip()
    text = re.sub(r"^```\w*\n?|\n?```$", "", text).strip()
    text = re.sub(r"^(here is (a|the) )?paraphrase[d]?( text| version)?\s*:\s*", "", text, flags=re.I).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _paraphrased(records, copies, protect, teacher, seed, max_new_tokens, temperature) -> list[dict[str, Any]]:
    asks = [(r, n, input_slots(r, protect)) for n in range(copies) for r in records]
    asks = [(r, n, slots) for r, n, slots in asks if slots]
    conversations = [[{"role": "user", "content": paraphrase_prompt(_get(r.data, s))}]
                     for r, _, slots in asks for s in slots]
    replies = iter(teacher.complete(conversations, max_new_tokens, temperature, seed) if conversations else [])
    answers = {(id(r), n): [clean_paraphrase(next(replies)) for _ in slots] for r, n, slots in asks}
    mark = {"how": "paraphrase", "teacher": teacher.name}
    out = []
    for record in records:
        slots = input_slots(record, protect)
        if not slots:
            continue
        seen = {tuple(_get(record.data, s) for s in slots)}
        for n in range(copies):
            texts = answers[(id(record), n)]
            if tuple(texts) in seen or not all(t.strip() for t in texts):
                continue
            seen.add(tuple(texts))
            out.append(_variant(record, slots, texts, mark))
    return out
