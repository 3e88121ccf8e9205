"""`tunesmith data check`: what is wrong with a dataset, before it costs a training run.

One pass over the records of the data files (and, with `against`, the evaluation files) gives a report dict:
rows and rejects, exact and near duplicates, train/evaluation leakage, lengths (characters, and tokens under a
model's tokenizer with how many rows its max length truncates), labels (imbalance, conflicting labels), text
quality (mojibake, markup, control characters, boilerplate) and personal data. `report.json` is that dict;
`report.html` and the terminal summary are views of it (data/check_view.py).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tunesmith.data.records import LoadResult, Record, load_records, record_text

if TYPE_CHECKING:
    from tunesmith.data import PreparedData

EXAMPLES = 10  # rows shown per finding in the report
SNIPPET = 240  # characters of a row shown in the report
LENGTH_EDGES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class CheckOptions:
    """Thresholds and the (optional) tokenizer a check uses; `tokenizer=None` reports characters only."""

    near_threshold: float = 0.8
    min_words: int = 2
    max_len: int | None = None  # the model's max sequence length in tokens (rows above it are truncated)
    tokenizer: Any = None
    model_name: str | None = None
    system_prompt: str | None = None
    max_duplicate_fraction: float = 0.05
    leakage: str = "stop"  # stop | warn: the severity of train/evaluation leakage
    stops: bool = True  # whether error findings stop training (the recipe's data.check.enabled)

    @classmethod
    def for_recipe(cls, data) -> CheckOptions:
        """The options `tunesmith train` checks its data with: the recipe's `data` section (`data.check`)."""
        c = data.check
        return cls(near_threshold=c.near_threshold, min_words=c.min_words, leakage=c.leakage,
                   max_duplicate_fraction=c.max_duplicate_fraction, system_prompt=data.system_prompt,
                   stops=c.enabled)


def load_files(paths: list[str | Path], fmt: str = "auto", columns: dict[str, str] | None = None,
               labels: list[str] | None = None) -> list[LoadResult]:
    """Read several files as one dataset: the first file's record type (or `fmt`) applies to all."""
    loads: list[LoadResult] = []
    for path in paths:
        kind = fmt if not loads else loads[0].kind
        loads.append(load_records(path, kind, columns, labels))
    return loads


def data_section(recipe, train: str | Path, fmt: str, columns: dict[str, str], labels: list[str] | None):
    """The recipe's `data` section (without a recipe, the recipe defaults for `train`), read with `fmt`, `columns`
    and `labels` (the command line's, which win over the recipe's)."""
    from tunesmith.recipe import DataSection

    base = recipe.data if recipe is not None else DataSection(train=str(train))
    return base.model_copy(update={"format": fmt, "columns": dict(columns), "labels": labels})


def load_as_training(paths: list[str | Path], against: list[str | Path], data, allowed_kinds=None) -> PreparedData:
    """Read `paths` as `tunesmith train` reads `data.train`, and `against` as it reads `data.validation`, through
    `prepare_data` itself: the same record type, columns and labels (a validation file's labels default to the
    training labels), the same rejects. Further files of either are read with the first one's type and labels.
    `loads` holds the training files first, then the `against` files."""
    from tunesmith.data import PreparedData, prepare_data

    first = prepare_data(data.model_copy(update={"train": str(paths[0]), "validation_fraction": 0.0,
                                                 "validation": str(against[0]) if against else None}),
                         seed=0, allowed_kinds=allowed_kinds)
    kind, labels = first.kind, first.labels
    train = first.loads[:1] + [load_records(p, kind, data.columns, data.labels) for p in paths[1:]]
    evaluation = first.loads[1:] + [load_records(p, kind, data.columns, labels) for p in against[1:]]
    return PreparedData(kind, records_of(train), records_of(evaluation), train + evaluation, labels,
                        "file" if against else "split")


def check_like_training(paths: list[str | Path], against: list[str | Path], data, options: CheckOptions,
                        allowed_kinds=None, progress: Callable[[str], None] | None = None) -> tuple[dict, PreparedData]:
    """`tunesmith data check`: read the files as training would (`load_as_training`), run every check, and add
    `report["gate"]`, the verdict of training's own gates (`gate_failures`). Returns the report and what was read."""
    prepared = load_as_training(paths, against, data, allowed_kinds)
    n = len(paths)
    report = check_data(prepared.loads[:n], prepared.loads[n:] or None, options, progress)
    failed = gate_failures(prepared, data, report)
    report["gate"] = {"stops_training": bool(failed), "failed": failed, "limits": {
        "max_reject_fraction": data.max_reject_fraction, "check_enabled": data.check.enabled,
        "max_duplicate_fraction": options.max_duplicate_fraction, "leakage": options.leakage}}
    return report, prepared


def records_of(loads: list[LoadResult]) -> list[Record]:
    """All usable records of some loaded files, in file then line order."""
    return [r for load in loads for r in load.records]


def content(record: Record) -> str:
    """The human-written text of a record (every text field; message contents without role names; no label)."""
    if record.kind == "chat":
        return "\n".join(m["content"] for m in record.data["messages"])
    return "\n".join(v for k, v in record.data.items() if k != "label" and isinstance(v, str) and v)


def ref(record: Record, text: str | None = None) -> dict[str, Any]:
    """How a report points at a row: file, line and a snippet (personal data in it replaced by placeholders)."""
    from tunesmith.data.quality import redact_pii

    text = redact_pii(content(record) if text is None else text)[0]
    return {"file": record.source, "line": record.line,
            "text": text if len(text) <= SNIPPET else text[:SNIPPET] + "…"}


def check_data(train: list[LoadResult], against: list[LoadResult] | None = None,
               options: CheckOptions | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every check on the records of `train` (and leakage against `against`); return the report dict."""
    options = options or CheckOptions()
    say = progress or (lambda _msg: None)
    records = records_of(train)
    kind = train[0].kind if train else "unknown"
    report: dict[str, Any] = {"kind": kind, "rows": rows_section(train), "options": {
        "near_threshold": options.near_threshold, "min_words": options.min_words, "max_len": options.max_len,
        "model": options.model_name, "max_duplicate_fraction": options.max_duplicate_fraction}}
    if against:
        report["against"] = rows_section(against)
    say("duplicates")
    report["duplicates"] = duplicates_section(records, options.near_threshold)
    if against:
        say("leakage")
        report["leakage"] = leakage_section(records, records_of(against), options.near_threshold)
    say("lengths")
    report["length"] = length_section(records, train, options)
    if kind == "classification":
        report["labels"] = labels_section(records)
    say("text quality and personal data")
    report["quality"], report["pii"] = quality_sections(records)
    report["problems"] = problems(report, options)
    return report


# ----------------------------------------------------------------------------------------------- sections


def rows_section(loads: list[LoadResult]) -> dict[str, Any]:
    """Rows read, used and rejected per file, with the reasons and the first rejects."""
    reasons: Counter = Counter()
    for load in loads:
        reasons.update(load.reasons())
    rejects = [r for load in loads for r in load.rejects]
    return {
        "files": {load.path: {"read": load.rows_read, "used": len(load.records), "rejected": len(load.rejects)}
                  for load in loads},
        "read": sum(load.rows_read for load in loads), "used": sum(len(load.records) for load in loads),
        "rejected": len(rejects), "reasons": dict(reasons.most_common()),
        "reject_examples": [{k: r[k] for k in ("file", "line", "reason")} for r in rejects[:EXAMPLES]],
    }


def duplicates_section(records: list[Record], threshold: float) -> dict[str, Any]:
    """Exact duplicate groups and near-duplicate clusters over whole rows (labels aside)."""
    from tunesmith.data.dedup import find_duplicates

    made = sum(1 for r in records if r.marker() in ("augmented", "upsampled"))
    records = [r for r in records if r.marker() not in ("augmented", "upsampled")]  # copies on purpose
    texts = [record_text(r.kind, r.data) for r in records]
    found = find_duplicates(texts, threshold=threshold)
    near = found.near_clusters()
    dup_of = found.duplicate_of()
    exact_extra = sum(len(g) - 1 for g in found.exact_groups)
    clusters = sorted(found.clusters, key=lambda c: (-len(c), c[0]))
    return {
        "threshold": threshold, "marked_copies_skipped": made,
        "exact_groups": len(found.exact_groups), "exact_rows": exact_extra,
        "near_clusters": len(near), "near_rows": len(dup_of) - exact_extra,
        "duplicate_rows": len(dup_of), "duplicate_fraction": round(len(dup_of) / max(len(records), 1), 4),
        "clusters": [{"size": len(c), "exact": c not in near,
                      "rows": [ref(records[i]) | ({"similarity": round(_best_similarity(found, i), 3)}
                                                  if i != c[0] else {}) for i in c[:EXAMPLES]]}
                     for c in clusters[:EXAMPLES * 2]],
    }


def _best_similarity(found, member: int) -> float:
    sims = [s for (a, b), s in found.similarity.items() if b == member]
    return max(sims) if sims else 1.0


def leakage_section(records: list[Record], evaluation: list[Record], threshold: float) -> dict[str, Any]:
    """Training rows whose prompt also appears, exactly or nearly, in the evaluation data."""
    from tunesmith.data.dedup import cross_matches

    matches = cross_matches([record_text(r.kind, r.data, "prompt") for r in records],
                            [record_text(r.kind, r.data, "prompt") for r in evaluation], threshold=threshold)
    return {
        "threshold": threshold, "pairs": len(matches),
        "exact_pairs": sum(1 for m in matches if m.exact),
        "train_rows": len({m.a for m in matches}), "eval_rows": len({m.b for m in matches}),
        "eval_total": len(evaluation),
        "examples": [{"train": ref(records[m.a]), "eval": ref(evaluation[m.b]),
                      "similarity": round(m.similarity, 3), "exact": m.exact} for m in matches[:EXAMPLES * 2]],
    }


def length_section(records: list[Record], loads: list[LoadResult], options: CheckOptions) -> dict[str, Any]:
    """Empty and too-short rows; character and token length distributions; rows the max length truncates."""
    empty = [r for load in loads for r in load.rejects if r["reason"].startswith("empty field")]
    words = [len(content(r).split()) for r in records]
    short = [i for i, n in enumerate(words) if n < options.min_words]
    chars = [len(content(r)) for r in records]
    out: dict[str, Any] = {
        "empty_rows": len(empty), "empty_examples": [{k: r[k] for k in ("file", "line", "reason")}
                                                     for r in empty[:EXAMPLES]],
        "too_short": len(short), "min_words": options.min_words,
        "short_examples": [ref(records[i]) for i in short[:EXAMPLES]],
        "chars": distribution(chars), "words": distribution(words),
    }
    if options.tokenizer is not None and records:
        tokens = token_lengths(records, options.tokenizer, options.system_prompt)
        out["tokens"] = distribution(tokens)
        out["token_histogram"] = histogram(tokens)
        if options.max_len:
            long = [i for i, n in enumerate(tokens) if n > options.max_len]
            out["max_len"] = options.max_len
            out["too_long"] = len(long)
            out["long_examples"] = [ref(records[i]) | {"tokens": tokens[i]} for i in
                                    sorted(long, key=lambda i: -tokens[i])[:EXAMPLES]]
    return out


def token_lengths(records: list[Record], tokenizer, system_prompt: str | None = None) -> list[int]:
    """Tokens per row as training formats it (chat template included); preference rows: prompt + longer answer."""
    from tunesmith.data.format import encode

    out = []
    for r in records:
        if r.kind == "preference":
            pair = max(r.data["chosen"], r.data["rejected"], key=len)
            out.append(len(tokenizer(r.data["prompt"] + pair, add_special_tokens=True)["input_ids"]))
        else:
            out.append(encode(r, tokenizer, 1 << 30, "responses", system_prompt).full_length)
    return out


def labels_section(records: list[Record]) -> dict[str, Any]:
    """Label counts, imbalance ratio (largest / smallest class) and texts given conflicting labels."""
    from tunesmith.data.dedup import normalize

    counts = Counter(r.data["label"] for r in records)
    by_text: dict[str, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_text[normalize(r.data["text"])][r.data["label"]].append(r)
    conflicts = [labels for labels in by_text.values() if len(labels) > 1]
    return {
        "counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "classes": len(counts),
        "imbalance_ratio": round(max(counts.values()) / min(counts.values()), 3) if counts else None,
        "conflicts": len(conflicts),
        "conflict_rows": sum(len(rs) for labels in conflicts for rs in labels.values()),
        "conflict_examples": [{"text": ref(next(iter(labels.values()))[0])["text"],
                               "labels": {label: [f"{r.source}:{r.line}" for r in rs] for label, rs in labels.items()}}
                              for labels in conflicts[:EXAMPLES]],
    }


def quality_sections(records: list[Record]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rows with broken unicode, markup, control characters, boilerplate; rows with each kind of personal data."""
    from tunesmith.data.quality import PII_KINDS, QUALITY_KINDS, boilerplate, find_pii, mask, redact_pii, text_issues

    texts = [content(r) for r in records]
    quality = {k: {"rows": 0, "count": 0, "examples": []} for k in QUALITY_KINDS}
    pii = {k: {"rows": 0, "count": 0, "examples": []} for k in PII_KINDS}
    for record, text in zip(records, texts):
        for section, findings, show in ((quality, text_issues(text), _around),
                                        (pii, find_pii(text), lambda _t, f: mask(f))):
            per_kind = Counter(f.kind for f in findings)
            for k, n in per_kind.items():
                entry = section[k]
                entry["rows"] += 1
                entry["count"] += n
                if len(entry["examples"]) < EXAMPLES:
                    first = next(f for f in findings if f.kind == k)
                    entry["examples"].append({"file": record.source, "line": record.line,
                                              "match": show(text, first)})
    quality["boilerplate"] = [{"line": redact_pii(line)[0], "rows": n}
                              for line, n in boilerplate(texts)[:EXAMPLES * 2]]
    return quality, pii


def _around(text: str, finding) -> str:
    from tunesmith.data.quality import redact_pii

    start, end = max(finding.start - 40, 0), min(finding.end + 40, len(text))
    return ("…" if start else "") + redact_pii(text[start:end])[0] + ("…" if end < len(text) else "")


# ----------------------------------------------------------------------------------------------- verdict


def problems(report: dict[str, Any], options: CheckOptions) -> list[dict[str, str]]:
    """One line per finding, with a severity: `error` findings stop `tunesmith train` (the gate)."""
    out = []

    def add(severity: str, check: str, message: str) -> None:
        out.append({"severity": severity, "check": check, "message": message})

    rows = report["rows"]
    if rows["rejected"]:
        add("warning", "rejects", f"{rows['rejected']} of {rows['read']} rows rejected")
    dup = report["duplicates"]
    if dup["duplicate_rows"]:
        share = dup["duplicate_fraction"]
        severity = "error" if options.stops and share > options.max_duplicate_fraction else "warning"
        add(severity, "duplicates", f"{dup['duplicate_rows']} duplicate rows ({share:.1%}; limit "
            f"{options.max_duplicate_fraction:.1%}): {dup['exact_rows']} exact in {dup['exact_groups']} groups, "
            f"{dup['near_rows']} near in {dup['near_clusters']} clusters")
    leak = report.get("leakage")
    if leak and leak["pairs"]:
        add("error" if options.stops and options.leakage == "stop" else "warning", "leakage",
            f"{leak['train_rows']} training rows also appear in the evaluation data ({leak['exact_pairs']} exact, "
            f"{leak['pairs'] - leak['exact_pairs']} near; {leak['eval_rows']} of {leak['eval_total']} evaluation "
            "rows affected)")
    length = report["length"]
    for key, label in (("empty_rows", "empty rows"), ("too_short", f"rows under {options.min_words} words"),
                       ("too_long", f"rows longer than max_len {options.max_len} tokens (truncated)")):
        if length.get(key):
            add("warning", "length", f"{length[key]} {label}")
    labels = report.get("labels")
    if labels:
        if labels["imbalance_ratio"] and labels["imbalance_ratio"] >= 3:
            add("warning", "labels", f"label imbalance {labels['imbalance_ratio']:.1f}:1 (largest/smallest class)")
        if labels["conflicts"]:
            add("warning", "labels", f"{labels['conflicts']} texts carry conflicting labels "
                f"({labels['conflict_rows']} rows)")
    for kind, entry in report["quality"].items():
        if kind != "boilerplate" and entry["rows"]:
            add("warning", "quality", f"{entry['rows']} rows with {kind.replace('_', ' ')}")
    if report["quality"]["boilerplate"]:
        add("warning", "quality", f"{len(report['quality']['boilerplate'])} boilerplate lines repeated across rows")
    for kind, entry in report["pii"].items():
        if entry["rows"]:
            add("warning", "personal data", f"{entry['rows']} rows with {kind} ({entry['count']} found)")
    return out


def blocking(report: dict[str, Any]) -> list[str]:
    """The messages of the findings that stop training."""
    return [p["message"] for p in report["problems"] if p["severity"] == "error"]


# ----------------------------------------------------------------------------------------------- numbers


def distribution(values: list[int]) -> dict[str, Any]:
    """min, mean, percentiles and max of some lengths."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]

    return {"n": len(values), "min": ordered[0], "mean": round(statistics.fmean(values), 1), "p50": pct(0.5),
            "p90": pct(0.9), "p99": pct(0.99), "max": ordered[-1]}


def histogram(values: list[int], edges: tuple[int, ...] = LENGTH_EDGES) -> list[dict[str, Any]]:
    """Counts of values per bucket `(previous edge, edge]`, with a last bucket for anything larger."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[next((i for i, e in enumerate(edges) if v <= e), len(edges))] += 1
    labels = [f"≤{e}" for e in edges] + [f">{edges[-1]}"]
    while len(counts) > 1 and counts[-1] == 0:  # trim empty buckets at the top
        counts.pop()
        labels.pop()
    return [{"bucket": b, "rows": n} for b, n in zip(labels, counts)]


def gate(train: list[LoadResult], against: list[LoadResult] | None, options: CheckOptions,
         report_dir: Path | None = None) -> dict[str, Any]:
    """The check `tunesmith train` runs first: write the report, raise DataError on findings that stop training."""
    report = check_data(train, against, options)
    if report_dir is not None:
        write_report(report, report_dir, "data_check")
    stop_on_findings(report, report_dir / "data_check.html" if report_dir else None)
    return report


def stop_on_findings(report: dict[str, Any], page: Path | None = None) -> None:
    """Raise DataError listing the findings of a check report that stop training (see `blocking`)."""
    from tunesmith.errors import DataError

    stops = blocking(report)
    if stops:
        where = f"; the full report is {page}" if page else ""
        raise DataError("the data check found problems that stop training:\n" + "\n".join(f"  - {m}" for m in stops)
                        + where,
                        "remove them with `tunesmith data clean` (it drops duplicates and leaked rows), or allow them "
                        "in the recipe: data.check.leakage=warn, data.check.max_duplicate_fraction=<share>, "
                        "or data.check.enabled=false")


def gate_failures(prepared: PreparedData, data, report: dict[str, Any]) -> list[dict[str, str]]:
    """The data gates of `tunesmith train` that `prepared` fails, each {gate, message, hint}, through the functions
    training calls: `check_reject_share` (each file's share of rejected rows against `data.max_reject_fraction`, and
    no usable training rows) and, when `data.check.enabled`, `stop_on_findings` on the check `report`."""
    from tunesmith.data import check_reject_share
    from tunesmith.errors import DataError

    gates = [("data.max_reject_fraction", lambda: check_reject_share(prepared, data.max_reject_fraction))]
    if data.check.enabled:
        gates.append(("data.check", lambda: stop_on_findings(report)))
    failed = []
    for name, run in gates:
        try:
            run()
        except DataError as exc:
            failed.append({"gate": name, "message": exc.message, "hint": exc.hint or ""})
    return failed


def write_report(report: dict[str, Any], folder: Path, stem: str = "report") -> dict[str, Path]:
    """Write STEM.json and a self-contained STEM.html into `folder`, each through a temporary renamed into place."""
    import json

    from tunesmith.artifacts import atomic_write
    from tunesmith.data.check_view import render_html

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "html": folder / f"{stem}.html"}
    atomic_write(paths["json"], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write(paths["html"], render_html(report))
    return paths
