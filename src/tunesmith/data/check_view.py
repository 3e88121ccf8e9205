"""Views of a data-check report: the terminal summary and a self-contained HTML page (no scripts, no fetches)."""

from __future__ import annotations

import html
import json
from typing import Any

MARK = {"error": "✗", "warning": "!", "ok": "✓"}


def summary_text(report: dict[str, Any]) -> str:
    """The terminal summary: counts per check, each finding with its severity, and the verdict."""
    rows, out = report["rows"], []
    out.append(f"record type: {report['kind']} · {rows['read']} rows read, {rows['used']} used, "
               f"{rows['rejected']} rejected" + (f" ({_reasons(rows['reasons'])})" if rows["reasons"] else ""))
    if "against" in report:
        a = report["against"]
        out.append(f"evaluation data: {a['read']} rows read, {a['used']} used, {a['rejected']} rejected")
    dup = report["duplicates"]
    out.append(f"duplicates (near = Jaccard ≥ {dup['threshold']}): {dup['exact_rows']} exact rows in "
               f"{dup['exact_groups']} groups, {dup['near_rows']} near rows in {dup['near_clusters']} clusters")
    if "leakage" in report:
        leak = report["leakage"]
        out.append(f"leakage: {leak['train_rows']} training rows match {leak['eval_rows']} of "
                   f"{leak['eval_total']} evaluation rows ({leak['exact_pairs']} exact pairs, "
                   f"{leak['pairs'] - leak['exact_pairs']} near)")
    length = report["length"]
    line = (f"length: {length['empty_rows']} empty, {length['too_short']} under {length['min_words']} words; "
            f"words p50 {length['words'].get('p50', 0)} / max {length['words'].get('max', 0)}")
    if "tokens" in length:
        t = length["tokens"]
        line += f"; tokens p50 {t['p50']} / p90 {t['p90']} / max {t['max']}"
        if "max_len" in length:
            line += f"; {length['too_long']} rows over max_len {length['max_len']} (truncated)"
    out.append(line)
    if "labels" in report:
        lab = report["labels"]
        top = ", ".join(f"{k} {v}" for k, v in list(lab["counts"].items())[:6])
        more = f", … ({lab['classes']} classes)" if lab["classes"] > 6 else ""
        out.append(f"labels: {top}{more}; imbalance {lab['imbalance_ratio']}:1; "
                   f"{lab['conflicts']} texts with conflicting labels")
    quality = report["quality"]
    out.append("text quality: " + ", ".join(f"{k.replace('_', ' ')} {v['rows']} rows" for k, v in quality.items()
                                            if k != "boilerplate") + f", boilerplate {len(quality['boilerplate'])} lines")
    pii = report["pii"]
    out.append("personal data: " + ", ".join(f"{k} {v['rows']} rows" for k, v in pii.items()))
    for kind, v in pii.items():
        if v["examples"]:
            shown = ", ".join(f"{e['match']} ({_short(e['file'])}:{e['line']})" for e in v["examples"][:3])
            out.append(f"  {kind}: {shown}")
    problems = report["problems"]
    if problems:
        out.append("findings:")
        out.extend(f"  {MARK[p['severity']]} {p['check']}: {p['message']}" for p in problems)
    errors = sum(1 for p in problems if p["severity"] == "error")
    warnings = len(problems) - errors
    if "gate" in report:  # the verdict of training's own gates (the reject share included)
        out.extend(gate_lines(report["gate"], warnings))
    else:
        out.append(f"verdict: {errors} finding(s) that stop training, {warnings} warning(s)" if problems
                   else "verdict: ✓ no findings")
    return "\n".join(out)


def gate_lines(gate: dict[str, Any], warnings: int = 0) -> list[str]:
    """The verdict: `tunesmith train` would pass its data gates, or stop at each gate named."""
    limits = gate["limits"]
    if not gate["failed"]:
        checked = (f"duplicates ≤ {limits['max_duplicate_fraction']:.1%}, leakage: {limits['leakage']}"
                   if limits["check_enabled"] else "data.check disabled")
        rejects = f"rejects ≤ {limits['max_reject_fraction']:.1%} per file"
        return [f"verdict: ✓ `tunesmith train` would pass its data gates ({rejects}; {checked}); {warnings} warning(s)"]
    out = [f"verdict: ✗ `tunesmith train` would stop at {len(gate['failed'])} gate(s):"]
    for failure in gate["failed"]:
        out.append(f"  ✗ {failure['gate']}: " + failure["message"].replace("\n", "\n    "))
    return out


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in reasons.items())


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;
vertical-align:top}th{background:#f5f5f5}.error{color:#b00020;font-weight:600}.warning{color:#8a5a00}
.ok{color:#1b7a1b}.bar{background:#4a78c2;height:12px;display:inline-block}code,pre{font:12px ui-monospace,monospace}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5rem;margin:0}.muted{color:#777}
"""


def render_html(report: dict[str, Any], title: str = "tunesmith data check") -> str:
    """The report as one HTML page with inline CSS: findings, tables, bar charts and examples."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"]
    parts.append(_findings(report["problems"]))
    if "gate" in report:
        parts.append("<h2>Training gate</h2><pre>" + _e("\n".join(gate_lines(report["gate"]))) + "</pre>")
    parts.append(_rows(report))
    parts.append(_duplicates(report["duplicates"]))
    if "leakage" in report:
        parts.append(_leakage(report["leakage"]))
    parts.append(_length(report["length"]))
    if "labels" in report:
        parts.append(_labels(report["labels"]))
    parts.append(_quality(report["quality"], report["pii"]))
    parts.append("<h2>Raw report</h2><details><summary>report.json</summary><pre>"
                 f"{_e(json.dumps(report, indent=1, ensure_ascii=False))}</pre></details></body></html>")
    return "".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value))


def html_table(headers: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _findings(problems: list[dict[str, str]]) -> str:
    if not problems:
        return "<h2>Findings</h2><p class='ok'>✓ No findings.</p>"
    rows = [[f"<span class='{p['severity']}'>{MARK[p['severity']]} {p['severity']}</span>", _e(p["check"]),
             _e(p["message"])] for p in problems]
    return "<h2>Findings</h2><p>Errors stop <code>tunesmith train</code> (unless the recipe allows them).</p>" + \
        html_table(["severity", "check", "finding"], rows, raw=True)


def _rows(report: dict[str, Any]) -> str:
    out = ["<h2>Rows</h2>"]
    for name in ("rows", "against"):
        if name not in report:
            continue
        section = report[name]
        out.append(html_table(["file", "read", "used", "rejected"],
                          [[f, c["read"], c["used"], c["rejected"]] for f, c in section["files"].items()]))
        if section["reject_examples"]:
            out.append(html_table(["file", "line", "reason"],
                              [[r["file"], r["line"], r["reason"]] for r in section["reject_examples"]]))
    return "".join(out)


def _duplicates(dup: dict[str, Any]) -> str:
    out = [f"<h2>Duplicates</h2><p>{dup['exact_rows']} exact duplicate rows in {dup['exact_groups']} groups; "
           f"{dup['near_rows']} near-duplicate rows in {dup['near_clusters']} clusters (Jaccard of 5-character "
           f"shingles ≥ {dup['threshold']}); {dup['duplicate_fraction']:.1%} of rows duplicate an earlier one.</p>"]
    for c in dup["clusters"]:
        kind = "exact" if c["exact"] else "near"
        out.append(f"<p class='muted'>{kind} cluster of {c['size']} rows</p>")
        out.append(html_table(["file:line", "similarity", "text"],
                          [[f"{r['file']}:{r['line']}", r.get("similarity", "first"), r["text"]] for r in c["rows"]]))
    return "".join(out)


def _leakage(leak: dict[str, Any]) -> str:
    return (f"<h2>Train/evaluation leakage</h2><p>{leak['pairs']} pairs ({leak['exact_pairs']} exact): "
            f"{leak['train_rows']} training rows, {leak['eval_rows']} of {leak['eval_total']} evaluation rows.</p>"
            + html_table(["train", "evaluation", "similarity"],
                     [[f"{m['train']['file']}:{m['train']['line']} — {m['train']['text']}",
                       f"{m['eval']['file']}:{m['eval']['line']} — {m['eval']['text']}", m["similarity"]]
                      for m in leak["examples"]]))


def _bars(items: list[tuple[str, int]]) -> str:
    top = max((n for _, n in items), default=1) or 1
    return html_table(["", "rows", ""], [[_e(k), n, f"<span class='bar' style='width:{int(300 * n / top)}px'></span>"]
                                     for k, n in items], raw=True)


def _length(length: dict[str, Any]) -> str:
    out = [f"<h2>Lengths</h2><p>{length['empty_rows']} empty rows; {length['too_short']} rows under "
           f"{length['min_words']} words.</p>"]
    dists = [["words", *[length["words"].get(k, "") for k in ("min", "p50", "p90", "p99", "max")]]]
    if "tokens" in length:
        dists.append(["tokens", *[length["tokens"].get(k, "") for k in ("min", "p50", "p90", "p99", "max")]])
    out.append(html_table(["", "min", "p50", "p90", "p99", "max"], dists))
    if "token_histogram" in length:
        out.append("<p>Tokens per row (chat template included):</p>")
        out.append(_bars([(b["bucket"], b["rows"]) for b in length["token_histogram"]]))
    if "max_len" in length:
        out.append(f"<p>{length['too_long']} rows are longer than max_len {length['max_len']} and would be "
                   "truncated.</p>")
        if length["long_examples"]:
            out.append(html_table(["file:line", "tokens", "text"], [[f"{r['file']}:{r['line']}", r["tokens"], r["text"]]
                                                                 for r in length["long_examples"]]))
    return "".join(out)


def _labels(labels: dict[str, Any]) -> str:
    out = [f"<h2>Labels</h2><p>{labels['classes']} classes; imbalance {labels['imbalance_ratio']}:1 "
           f"(largest/smallest); {labels['conflicts']} texts with conflicting labels.</p>",
           _bars(list(labels["counts"].items()))]
    if labels["conflict_examples"]:
        out.append(html_table(["text", "labels (file:line)"],
                          [[c["text"], "; ".join(f"{k}: {', '.join(v)}" for k, v in c["labels"].items())]
                           for c in labels["conflict_examples"]]))
    return "".join(out)


def _quality(quality: dict[str, Any], pii: dict[str, Any]) -> str:
    out = ["<h2>Text quality</h2>"]
    for title, section in (("quality", quality), ("personal data", pii)):
        rows = [[k, v["rows"], v["count"], "<br>".join(f"{_e(x['file'])}:{x['line']} <code>{_e(x['match'])}</code>"
                                                         for x in v["examples"][:5])]
                for k, v in section.items() if k != "boilerplate"]
        if title == "personal data":
            out.append("<h2>Personal data</h2><p>Examples are masked.</p>")
        out.append(html_table(["kind", "rows", "found", "examples"], rows, raw=True))
    if quality["boilerplate"]:
        out.append("<p>Lines repeated across rows (boilerplate):</p>")
        out.append(html_table(["line", "rows"], [[b["line"], b["rows"]] for b in quality["boilerplate"]]))
    return "".join(out)
