"""Canonical records: every input row becomes one record or one reject with its file, line and reason."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.readers import RawRow, read_rows, to_json
from tunesmith.errors import DataError

# The fields each record type holds, after column mapping.
FIELDS = {
    "text": ("text",),
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
}
OPTIONAL = {"input"}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass(frozen=True)
class Record:
    """One usable row in canonical form: `kind` is a key of FIELDS and `data` holds exactly those fields."""

    kind: str
    data: dict[str, Any]
    source: str
    line: int
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # the row as read, every column

    def marker(self) -> str | None:
        """'augmented', 'upsampled' or 'synthetic' when the row says it was made by tunesmith, else None."""
        raw = self.raw or {}
        review = raw.get("_review")
        if isinstance(review, dict) and review.get("origin") == "synth":
            return "synthetic"
        return next((k for k in ("augmented", "upsampled", "synthetic") if raw.get(k)), None)


@dataclass
class LoadResult:
    """What reading one file gave: records, rejects (dicts for rejects.jsonl) and the detected kind."""

    path: str
    kind: str
    records: list[Record] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return len(self.records) + len(self.rejects)

    def reasons(self) -> Counter:
        """How many rows were rejected for each reason (the reason text up to its first colon)."""
        return Counter(r["reason"].split(":")[0] for r in self.rejects)


class RowRejected(Exception):
    """A row that can't become a record; the message is the reason written to the rejects file."""


_Reject = RowRejected


def load_records(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                 labels: list[str] | None = None) -> LoadResult:
    """Read a data file into canonical records; every unusable row becomes a reject with its reason."""
    path = Path(path)
    columns = columns or {}
    rows = list(read_rows(path))
    kind = fmt if fmt != "auto" else detect_kind(rows, columns, path)
    result = LoadResult(str(path), kind)
    allowed = set(labels) if labels is not None else None
    for row in rows:
        if row.error is not None:
            result.rejects.append(_reject(path, row.line, row.error, row.text))
            continue
        if "_review" in row.value:  # a review file from `tunesmith data synth`: only accepted rows train
            review = row.value["_review"]
            status = review.get("status", "missing") if isinstance(review, dict) else "missing"
            if status != "accepted":
                result.rejects.append(_reject(path, row.line, f"not accepted in review: {status}", row.value))
                continue
        try:
            data = convert(row.value, kind, columns)
            if allowed is not None and kind == "classification" and data["label"] not in allowed:
                raise _Reject(f"label not in the label set: {data['label']!r} (allowed: {', '.join(sorted(allowed))})")
        except _Reject as exc:
            result.rejects.append(_reject(path, row.line, str(exc), row.value))
            continue
        result.records.append(Record(kind, data, str(path), row.line, row.value))
    return result


def _reject(path: Path, line: int, reason: str, row: Any) -> dict[str, Any]:
    return {"file": str(path), "line": line, "reason": reason, "row": _jsonable(row)}


def _jsonable(value: Any) -> Any:
    """The row as JSON can hold it: dates as ISO text, decimals as exact text, bytes as base64 (see json_value)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError, RecursionError):
        return json.loads(to_json(value))


def detect_kind(rows: list[RawRow], columns: dict[str, str], path: Path) -> str:
    """Guess the record type from the keys of the first readable rows."""
    for row in rows[:1]:  # a review file says what it holds
        review = (row.value or {}).get("_review")
        if isinstance(review, dict) and review.get("kind") in FIELDS:
            return review["kind"]
    keys: set[str] = set()
    for row in rows[:50]:
        if row.value is not None:
            keys |= set(row.value)
    mapped = {canon for canon, col in columns.items() if col in keys} | keys
    if "messages" in mapped or "conversations" in mapped:
        return "chat"
    if {"prompt", "chosen", "rejected"} <= mapped:
        return "preference"
    if {"instruction", "output"} <= mapped:
        return "instruction"
    if {"text", "label"} <= mapped:
        return "classification"
    if "text" in mapped:
        return "text"
    raise DataError(
        f"{path}: can't tell the record type from its columns {sorted(keys) or '(no readable rows)'}",
        "set `data.format` (text, instruction, chat, classification, preference) and map your columns with "
        "`data.columns`, e.g. {instruction: question, output: answer}")


def convert(value: dict[str, Any], kind: str, columns: dict[str, str]) -> dict[str, Any]:
    """Convert one raw row to the canonical fields of `kind`; raise _Reject with the reason if it can't be."""
    if kind == "chat":
        return {"messages": _messages(value, columns)}
    out = {}
    for name in FIELDS[kind]:
        column = columns.get(name, name)
        if column not in value or value[column] is None:
            if name in OPTIONAL:
                out[name] = ""
                continue
            raise _Reject(f"missing field: {column!r}" + (f" (mapped from {name!r})" if column != name else ""))
        item = value[column]
        if name == "label" and isinstance(item, (int, bool)) and not isinstance(item, bool):
            item = str(item)  # integer class ids are labels too
        if not isinstance(item, str):
            raise _Reject(f"wrong type: field {column!r} must be text, got {type(item).__name__}")
        if not item.strip() and name not in OPTIONAL:
            raise _Reject(f"empty field: {column!r}")
        out[name] = item
    return out


def _messages(value: dict[str, Any], columns: dict[str, str]) -> list[dict[str, str]]:
    column = columns.get("messages")
    if column is None:
        column = "messages" if "messages" in value else "conversations" if "conversations" in value else None
    if column is None or value.get(column) is None:
        raise _Reject("missing field: 'messages' (or ShareGPT 'conversations')")
    turns = value[column]
    if not isinstance(turns, list):
        raise _Reject(f"wrong type: field {column!r} must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise _Reject(f"empty field: {column!r}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Reject(f"wrong type: {column}[{i}] must be an object, got {type(turn).__name__}")
        if "from" in turn and "role" not in turn:  # ShareGPT
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            raw_role, content = turn["from"], turn.get("value")
            allowed = ", ".join(SHAREGPT_ROLES)
        else:
            raw_role, content = turn.get("role"), turn.get("content")
            role = raw_role if raw_role in ROLES else None
            allowed = ", ".join(ROLES)
        if raw_role is None:
            raise _Reject(f"missing field: {column}[{i}] has no 'role' (or ShareGPT 'from')")
        if role is None:
            raise _Reject(f"unknown role: {column}[{i}] has role {raw_role!r}; allowed: {allowed}")
        if content is None:
            raise _Reject(f"missing field: {column}[{i}] has no content")
        if not isinstance(content, str):
            raise _Reject(f"wrong type: {column}[{i}] content must be text, got {type(content).__name__}")
        if not content.strip():
            raise _Reject(f"empty field: {column}[{i}] content is empty")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _Reject(f"missing field: {column} has no assistant message to learn from")
    return messages


def record_text(kind: str, data: dict[str, Any], part: str = "all") -> str:
    """One string for comparing records: the whole row (`all`), or only what the model is asked (`prompt`).

    `prompt` is what leakage is about: an evaluation question that also appears in training, whatever the answer.
    Classification labels are never part of the text (same text, other label = a conflict, not a different row).
    """
    if kind == "chat":
        turns = data["messages"] if part == "all" else [m for m in data["messages"] if m["role"] != "assistant"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in turns)
    if kind == "instruction":
        fields = ("instruction", "input", "output") if part == "all" else ("instruction", "input")
        return "\n".join(data[f] for f in fields if data.get(f))
    if kind == "preference":
        fields = ("prompt", "chosen", "rejected") if part == "all" else ("prompt",)
        return "\n".join(data[f] for f in fields)
    return data["text"]  # text, classification


def write_rejects(rejects: list[dict[str, Any]], path: Path) -> None:
    """Write rejects as JSON lines (file, line, reason, row), through a temporary renamed into place."""
    from tunesmith.artifacts import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for item in rejects:
            fh.write(to_json(item) + "\n")
