"""`tunesmith data clean`: apply the chosen fixes, drop what must go, and account for every row.

The order is fixed so that cleaning a cleaned file changes nothing: text fixes first (to a fixed point), then
unreadable rows, conflicting labels, duplicates (keeping the first of each cluster), rows that leak into the
evaluation data, personal data, and the length range. Kept rows keep every column of the input; each removed
row goes to the rejects file with its reason (and, for a duplicate, the row it duplicates).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.readers import read_rows, source_schema, write_rows
from tunesmith.data.records import FIELDS, LoadResult, Record, RowRejected, convert, detect_kind, record_text


@dataclass(frozen=True)
class CleanOptions:
    """Which fixes to apply; the fields mirror the recipe's `data.clean` section."""

    fix_unicode: bool = True
    strip_markup: bool = False
    normalize_whitespace: bool = True
    remove_control_chars: bool = True
    duplicates: str = "near"  # keep | exact | near
    leaked: str = "drop"  # keep | drop
    pii: str = "keep"  # keep | redact | drop
    min_words: int = 0
    max_tokens: int | None = None
    conflicts: str = "drop"  # keep | drop | majority
    near_threshold: float = 0.8


@dataclass
class CleanResult:
    """Rows kept (as read, with fixed text), rows removed (with reasons), and what was changed."""

    path: str
    kind: str
    read: int = 0
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    fixed: Counter = field(default_factory=Counter)  # fix -> rows it changed

    def summary(self) -> dict[str, Any]:
        """Counts for printing and for the summary file."""
        return {"file": self.path, "kind": self.kind, "read": self.read, "kept": len(self.kept),
                "removed": len(self.rejects),
                "removed_by_reason": dict(Counter(r["reason"].split(":")[0] for r in self.rejects).most_common()),
                "rows_fixed": dict(self.fixed.most_common())}


def text_fixes(options: CleanOptions) -> list[tuple[str, Callable[[str], str]]]:
    """The text fixers the options ask for, in the order they are applied."""
    from tunesmith.data import quality

    chosen = [("fix_unicode", quality.fix_unicode), ("remove_control_chars", quality.remove_control_chars),
              ("strip_markup", quality.strip_markup), ("normalize_whitespace", quality.normalize_whitespace)]
    fixes = [(name, fn) for name, fn in chosen if getattr(options, name)]
    if options.pii == "redact":
        fixes.append(("redact_pii", lambda text: quality.redact_pii(text)[0]))
    return fixes


def fix_text(text: str, fixes: list[tuple[str, Callable[[str], str]]]) -> tuple[str, set[str]]:
    """Apply the fixes until nothing changes (at most 4 rounds); return the text and the fixes that changed it."""
    changed: set[str] = set()
    for _ in range(4):
        before = text
        for name, fn in fixes:
            after = fn(text)
            if after != text:
                changed.add(name)
                text = after
        if text == before:
            break
    return text, changed


def fix_row(value: dict[str, Any], kind: str, columns: dict[str, str], fixes) -> tuple[dict[str, Any], set[str]]:
    """A copy of a raw row with every text field of its record type fixed (labels are never touched)."""
    value, changed = dict(value), set()

    def fix(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        new, names = fix_text(text, fixes)
        changed.update(names)
        return new

    if kind == "chat":
        column = columns.get("messages") or ("messages" if "messages" in value else "conversations")
        turns = value.get(column)
        if isinstance(turns, list):
            value[column] = [{**t, **{k: fix(t[k]) for k in ("content", "value") if k in t}}
                             if isinstance(t, dict) else t for t in turns]
    else:
        for name in FIELDS[kind]:
            column = columns.get(name, name)
            if name != "label" and column in value:
                value[column] = fix(value[column])
    return value, changed


def clean_file(path: str | Path, options: CleanOptions, fmt: str = "auto", columns: dict[str, str] | None = None,
               labels: list[str] | None = None, against: list[LoadResult] | None = None, tokenizer=None,
               system_prompt: str | None = None) -> CleanResult:
    """Clean one data file as `options` say; nothing is written (see `write_clean`)."""
    columns = columns or {}
    path = Path(path)
    rows = list(read_rows(path))
    kind = fmt if fmt != "auto" else detect_kind(rows, columns, path)
    result = CleanResult(str(path), kind, read=len(rows))
    fixes = text_fixes(options)
    allowed = set(labels) if labels else None
    live: list[tuple[dict[str, Any], Record]] = []  # (fixed raw row, its record)
    for row in rows:
        if row.error is not None:
            result.rejects.append(_reject(path, row.line, row.error, row.text))
            continue
        value, changed = fix_row(row.value, kind, columns, fixes)
        result.fixed.update(changed)
        try:
            data = convert(value, kind, columns)
            if allowed is not None and kind == "classification" and data["label"] not in allowed:
                raise RowRejected(f"label not in the label set: {data['label']!r}")
        except RowRejected as exc:
            result.rejects.append(_reject(path, row.line, str(exc), value))
            continue
        live.append((value, Record(kind, data, str(path), row.line)))
    for step in (_drop_conflicts, _drop_duplicates, _drop_leaked, _drop_pii, _drop_by_length):
        live = step(live, options, result, against=against, tokenizer=tokenizer, system_prompt=system_prompt)
    result.kept = [value for value, _ in live]
    result.rejects.sort(key=lambda r: r["line"])
    return result


def _reject(path, line: int, reason: str, row: Any, **extra) -> dict[str, Any]:
    return {"file": str(path), "line": line, "reason": reason, **extra, "row": row}


def _drop_conflicts(live, options, result, **_):
    if result.kind != "classification" or options.conflicts == "keep":
        return live
    from tunesmith.data.dedup import normalize

    by_text: dict[str, list[int]] = defaultdict(list)
    for i, (_, rec) in enumerate(live):
        by_text[normalize(rec.data["text"])].append(i)
    drop: dict[int, str] = {}
    for members in by_text.values():
        counts = Counter(live[i][1].data["label"] for i in members)
        if len(counts) < 2:
            continue
        seen = ", ".join(f"{k} ×{v}" for k, v in counts.most_common())
        ranked = counts.most_common()
        winner = ranked[0][0] if options.conflicts == "majority" and ranked[0][1] > ranked[1][1] else None
        for i in members:
            if live[i][1].data["label"] != winner:
                why = "minority label" if winner else "no majority" if options.conflicts == "majority" else "dropped"
                drop[i] = f"conflicting labels: {why} ({seen})"
    return _remove(live, drop, result)


def _drop_duplicates(live, options, result, **_):
    if options.duplicates == "keep" or not live:
        return live
    from tunesmith.data.dedup import find_duplicates

    records = [rec for _, rec in live]
    found = find_duplicates([record_text(r.kind, r.data) for r in records], threshold=options.near_threshold)
    exact_of = {m: g[0] for g in found.exact_groups for m in g[1:]}
    targets = exact_of if options.duplicates == "exact" else found.duplicate_of()
    drop, extra = {}, {}
    for member, first in targets.items():
        sim = found.similarity.get((first, member))
        what = "exact duplicate" if member in exact_of and exact_of[member] == first else \
            f"near duplicate (similarity {sim:.2f})" if sim is not None else "near duplicate (same cluster)"
        drop[member] = f"duplicate: {what} of line {records[first].line}"
        extra[member] = {"duplicate_of": {"file": records[first].source, "line": records[first].line}}
    return _remove(live, drop, result, extra)


def _drop_leaked(live, options, result, against=None, **_):
    if options.leaked == "keep" or not against or not live:
        return live
    from tunesmith.data.dedup import cross_matches

    evaluation = [r for load in against for r in load.records]
    matches = cross_matches([record_text(rec.kind, rec.data, "prompt") for _, rec in live],
                            [record_text(r.kind, r.data, "prompt") for r in evaluation],
                            threshold=options.near_threshold)
    drop, extra = {}, {}
    for m in matches:
        if m.a in drop:
            continue
        hit = evaluation[m.b]
        how = "exactly" if m.exact else f"nearly (similarity {m.similarity:.2f})"
        drop[m.a] = f"leakage: appears {how} in the evaluation data at {hit.source}:{hit.line}"
        extra[m.a] = {"leaks_into": {"file": hit.source, "line": hit.line}}
    return _remove(live, drop, result, extra)


def _drop_pii(live, options, result, **_):
    if options.pii != "drop":
        return live
    from tunesmith.data.check import content
    from tunesmith.data.quality import find_pii

    drop = {}
    for i, (_, rec) in enumerate(live):
        kinds = sorted({f.kind for f in find_pii(content(rec))})
        if kinds:
            drop[i] = f"personal data: {', '.join(kinds)}"
    return _remove(live, drop, result)


def _drop_by_length(live, options, result, tokenizer=None, system_prompt=None, **_):
    from tunesmith.data.check import content, token_lengths

    drop = {}
    if options.min_words:
        for i, (_, rec) in enumerate(live):
            words = len(content(rec).split())
            if words < options.min_words:
                drop[i] = f"too short: {words} words, fewer than {options.min_words}"
    if options.max_tokens and tokenizer is not None:
        lengths = token_lengths([rec for _, rec in live], tokenizer, system_prompt)
        for i, n in enumerate(lengths):
            if n > options.max_tokens and i not in drop:
                drop[i] = f"too long: {n} tokens, more than {options.max_tokens}"
    return _remove(live, drop, result)


def _remove(live, drop: dict[int, str], result: CleanResult, extra: dict[int, dict] | None = None):
    extra = extra or {}
    for i, reason in drop.items():
        value, rec = live[i]
        result.rejects.append(_reject(rec.source, rec.line, reason, value, **extra.get(i, {})))
    return [item for i, item in enumerate(live) if i not in drop]


def write_clean(result: CleanResult, out: str | Path) -> dict[str, Path]:
    """Write the cleaned rows to `out`, the removed rows to OUT.rejects.jsonl and the counts to OUT.summary.json,
    each through a temporary renamed into place. A Parquet input's column types carry over to a Parquet output."""
    from tunesmith.artifacts import atomic_write

    out = Path(out)
    if out.resolve() == Path(result.path).resolve():
        from tunesmith.errors import DataError

        raise DataError(f"{out}: the output would overwrite the input", "give --out another file name")
    stem = out.with_suffix("")
    paths = {"cleaned": write_rows(result.kept, out, schema=source_schema(result.path)),
             "rejects": write_rows(result.rejects, stem.with_name(stem.name + ".rejects.jsonl")),
             "summary": stem.with_name(stem.name + ".summary.json")}
    atomic_write(paths["summary"], json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n")
    return paths
