"""Review files: generated rows wait here until a person accepts, edits or rejects each one.

One JSON object per line: the row's canonical fields at the top level (so the file reads like ordinary data), plus
a `_review` object:

    {"instruction": "...", "input": "", "output": "...",
     "_review": {"status": "pending", "reviewed": false, "kind": "instruction", "checks": [],
                 "origin": "synth", "teacher": "http://127.0.0.1:8000/v1 (my-model)",
                 "source": {"mode": "documents", "document": "notes.txt", "chunk": 2}, "note": ""}}

`status` is pending (passed every check), rejected (failed one; `checks` says why) or accepted. `reviewed` turns
true once a person (or `accept_passing`) decided. Only accepted rows reach training: the data loader rejects every
other row of a review file with the reason `not accepted in review: <status>`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from tunesmith.data import records
from tunesmith.data.readers import parse_json, read_text, to_json
from tunesmith.data.records import FIELDS
from tunesmith.errors import DataError

REVIEW_KEY = "_review"
MARKERS = ("augmented",)  # provenance marks a row may carry besides its fields; never edited
STATUSES = ("pending", "accepted", "rejected")
KEYS_HELP = "[a]ccept  [r]eject  [e]dit  [s]kip  [q]uit"


def review_row(kind: str, fields: dict[str, Any], *, status: str, checks: list[dict[str, str]], origin: str,
               teacher: str, source: dict[str, Any], raw: str | None = None) -> dict[str, Any]:
    """One review-file row: `fields` at the top level plus the `_review` object (the raw reply when it's kept)."""
    review = {"status": status, "reviewed": False, "kind": kind, "checks": checks, "origin": origin,
              "teacher": teacher, "source": source, "note": ""}
    if raw is not None:
        review["raw"] = raw
    return {**{k: v for k, v in fields.items() if k != REVIEW_KEY}, REVIEW_KEY: review}


def row_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The row's data fields (everything but `_review`)."""
    return {k: v for k, v in row.items() if k != REVIEW_KEY}


def convert_row(kind: str, value: dict[str, Any], columns: dict[str, str] | None = None,
                labels: list[str] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(canonical fields, None) when `value` is a usable row of `kind`, else (None, the loader's reject reason)."""
    try:
        data = records.convert(value, kind, columns or {})
    except records.RowRejected as exc:  # the loader's reject reasons, word for word
        return None, str(exc)
    if labels and kind == "classification" and data["label"] not in labels:
        return None, f"label not in the label set: {data['label']!r} (allowed: {', '.join(labels)})"
    return data, None


def format_problem(kind: str, fields: dict[str, Any], labels: list[str] | None = None) -> str | None:
    """Why `fields` is not a usable row of `kind`, or None when it is."""
    return convert_row(kind, fields, labels=labels)[1]


def read_review(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a review file; DataError naming the line when one isn't a review row."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such review file", "write one with `tunesmith data synth --out FILE`")
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        row, error = parse_json(line)
        if error is not None:
            raise DataError(f"{path}:{number}: {error}", "fix the line by hand or regenerate the review file")
        review = row.get(REVIEW_KEY) if isinstance(row, dict) else None
        if not isinstance(review, dict) or review.get("status") not in STATUSES or "kind" not in review:
            raise DataError(f"{path}:{number}: not a review row (needs a `{REVIEW_KEY}` object with a status "
                            f"of {', '.join(STATUSES)} and a kind)",
                            "review files are written by `tunesmith data synth`; ordinary data needs no review")
        rows.append(row)
    return rows


def write_review(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines atomically (a temporary file renamed over the old one)."""
    return write_jsonl_atomic(path, rows)


def write_jsonl_atomic(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines so that a crash leaves either the old file or the new one, never half of one."""
    from tunesmith.artifacts import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(to_json(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def review_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows in all, reviewed, and per status (accepted and rejected counted among the reviewed ones)."""
    reviewed = [r for r in rows if r[REVIEW_KEY].get("reviewed")]
    return {"total": len(rows), "reviewed": len(reviewed),
            "accepted": sum(r[REVIEW_KEY]["status"] == "accepted" for r in reviewed),
            "rejected": sum(r[REVIEW_KEY]["status"] == "rejected" for r in reviewed),
            "waiting": len(rows) - len(reviewed)}


def progress_line(rows: list[dict[str, Any]]) -> str:
    """'12/40 reviewed · 9 accepted · 3 rejected'."""
    c = review_counts(rows)
    return f"{c['reviewed']}/{c['total']} reviewed · {c['accepted']} accepted · {c['rejected']} rejected"


def accept_passing(path: str | Path) -> int:
    """Accept every unreviewed pending row that has no failing check; returns how many were accepted."""
    rows = read_review(path)
    accepted = 0
    for row in rows:
        review = row[REVIEW_KEY]
        if review["status"] == "pending" and not review["checks"] and not review.get("reviewed"):
            review.update(status="accepted", reviewed=True, note=review.get("note") or "accepted: passed every check")
            accepted += 1
    write_review(path, rows)
    return accepted


def review_file(path: str | Path, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
                editor: str | Callable[[Path], None] | None = None) -> dict[str, int]:
    """Walk a person through every row not yet reviewed: accept, reject, edit, skip or quit; saves after each.

    `editor` is a command (e.g. the value of $EDITOR) or a function given the path of a temporary JSON file holding
    the row's fields; without one, edits are typed inline as `field=value` lines. Returns review_counts at the end.
    """
    path = Path(path)
    rows = read_review(path)
    queue = [i for i, row in enumerate(rows) if not row[REVIEW_KEY].get("reviewed")]
    write(f"{path}: {len(queue)} of {len(rows)} rows to review · {KEYS_HELP}")
    for i in queue:
        if not _review_one(path, rows, i, read, write, editor):
            break
    counts = review_counts(rows)
    write(f"saved {path} · {progress_line(rows)}" + (f" · {counts['waiting']} still to review (run again to go on)"
                                                     if counts["waiting"] else ""))
    return counts


def _review_one(path: Path, rows: list[dict[str, Any]], i: int, read, write, editor) -> bool:
    """Ask about row i until a decision, skip or quit; False means quit."""
    row = rows[i]
    review = row[REVIEW_KEY]
    write(show_row(row, i + 1, len(rows)))
    while True:
        try:
            answer = read(f"{KEYS_HELP} > ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            write("")
            return False
        if answer == "q":
            return False
        if answer == "s":
            return True
        if answer == "a":
            problem = format_problem(review["kind"], row_fields(row))
            if problem:
                write(f"can't accept: not a usable {review['kind']} row ({problem}); edit it or reject it")
                continue
            review.update(status="accepted", reviewed=True)
        elif answer == "r":
            review.update(status="rejected", reviewed=True)
            review["note"] = review.get("note") or "rejected in review"
        elif answer == "e":
            if _edit(row, read, write, editor):
                write_review(path, rows)
                write(show_row(row, i + 1, len(rows)))
            continue
        else:
            write(f"unknown answer {answer!r}; type one of a, r, e, s, q")
            continue
        write_review(path, rows)
        write(progress_line(rows))
        return True


def show_row(row: dict[str, Any], number: int, total: int) -> str:
    """The row as the reviewer sees it: where it came from, its fields, and its failing checks."""
    review = row[REVIEW_KEY]
    source = describe_source(review.get("source") or {})
    lines = [f"── row {number}/{total} · {review['status']} · {review.get('origin', '?')}"
             + (f" · {source}" if source else "") + (" · edited" if review.get("edited") else "")]
    fields = row_fields(row)
    if not fields and review.get("raw") is not None:
        lines.append(f"  (no JSON in the reply) raw: {review['raw']!r}")
    for name, value in fields.items():
        if name == "messages" and isinstance(value, list):
            lines.append("  messages:")
            lines += [f"    {m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else f"    {m!r}"
                      for m in value]
        else:
            lines.append(f"  {name}: {value}")
    for check in review.get("checks", []):
        lines.append(f"  ✗ {check['check']}: {check['detail']}")
    return "\n".join(lines)


def describe_source(source: dict[str, Any]) -> str:
    """Where a row came from, in a few words: 'notes.txt chunk 2', 'seeds a.jsonl:1, a.jsonl:4 · label pos'."""
    if source.get("mode") == "documents":
        return f"{source.get('document')} chunk {source.get('chunk')}"
    if source.get("mode") == "seeds":
        text = "seeds " + ", ".join(map(str, source.get("seeds", [])))
        return text + (f" · label {source['label']}" if "label" in source else "")
    return ", ".join(f"{k} {v}" for k, v in source.items() if not isinstance(v, (list, dict)))


def _edit(row: dict[str, Any], read, write, editor) -> bool:
    """Edit the row's fields in `editor` or inline; re-run the format check. True when the row changed."""
    review = row[REVIEW_KEY]
    kind = review["kind"]
    marks = {k: row[k] for k in MARKERS if k in row}  # not for editing; kept as they are
    before = {k: v for k, v in row_fields(row).items() if k not in marks}
    if editor is None:
        after = _edit_inline(before, kind, read, write)
    else:
        after = _edit_in_editor(before, editor, write)
    if after is None or after == before:
        write("(row unchanged)")
        return False
    data, problem = convert_row(kind, after)
    after = data if data is not None else after  # a usable row keeps only its canonical fields
    row.clear()
    row.update({**after, **marks, REVIEW_KEY: review})
    review["edited"] = True
    review["checks"] = [c for c in review["checks"] if c["check"] != "format"]
    if problem:
        review["checks"].append({"check": "format", "detail": problem})
        write(f"still not a usable {kind} row: {problem}")
    return True


def _edit_in_editor(fields: dict[str, Any], editor, write) -> dict[str, Any] | None:
    fd, tmp = tempfile.mkstemp(prefix="tunesmith-review-", suffix=".json")
    path = Path(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(fields, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
        if callable(editor):
            editor(path)
        else:
            done = subprocess.run([*shlex.split(editor), str(path)])
            if done.returncode != 0:
                write(f"editor {editor!r} exited with {done.returncode}; row unchanged")
                return None
        try:
            edited, error = parse_json(read_text(path))
        except DataError as exc:  # saved in another encoding
            edited, error = None, exc.message
        if error is not None:
            write(f"the edited file can't be read: {error}; row unchanged")
            return None
        if not isinstance(edited, dict):
            write("the edited file must hold one JSON object; row unchanged")
            return None
        return edited
    finally:
        path.unlink(missing_ok=True)


def _edit_inline(fields: dict[str, Any], kind: str, read, write) -> dict[str, Any] | None:
    names = FIELDS[kind]
    write(f"type field=value lines ({', '.join(names)}; `messages` as JSON), an empty line to finish")
    edited = dict(fields)
    while True:
        try:
            line = read("edit> ")
        except (EOFError, KeyboardInterrupt):
            return None
        if not line.strip():
            return edited
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or name not in names:
            write(f"expected field=value with a field of {', '.join(names)}; got {line!r}")
            continue
        if name == "messages":
            value, error = parse_json(value)
            if error is not None:
                write(f"messages must be JSON ({error}); not changed")
                continue
        edited[name] = value


def accepted_rows(path: str | Path) -> list[dict[str, Any]]:
    """The accepted rows as ordinary data: fields plus `"synthetic": true` (an `augmented` mark is kept)."""
    return [{**row_fields(row), "synthetic": True} for row in read_review(path)
            if row[REVIEW_KEY]["status"] == "accepted"]


def export_accepted(path: str | Path, out: str | Path) -> int:
    """Write the accepted rows of a review file to `out` as ordinary JSONL; returns how many."""
    rows = accepted_rows(path)
    write_jsonl_atomic(out, rows)
    return len(rows)
