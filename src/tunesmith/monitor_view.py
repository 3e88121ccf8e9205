"""How `tunesmith monitor` shows its report: terminal lines, and one offline HTML page (inline CSS and SVG, no
scripts, every string escaped)."""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import Any

from tunesmith.data.check_view import html_table
from tunesmith.monitor import ALPHA, LOW_CONFIDENCE, PERCENTILES, PSI_BANDS
from tunesmith.report import COLORS, CSS, Series, line_chart

LATENCY_NAMES = {"queue_s": "queue", "ttft_s": "time to first token", "e2e_s": "end to end"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _p(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


# ----------------------------------------------------------------------------------------------- terminal


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as terminal lines."""
    t = report["traffic"]
    lines = [f"request log: {report['log']}",
             f"  {t['requests']} requests, {_when(t['start'])} to {_when(t['end'])} "
             f"({(t['end'] - t['start']) / 60:.1f} min)" + (f", since {_when(report['since'])}" if report["since"]
                                                            else ""),
             "  status: " + ", ".join(f"{k} ×{n}" for k, n in t["by_status"].items())
             + f" — error rate {t['error_rate']:.1%}"
             + (" (" + ", ".join(f"{c} {v['rate']:.1%}" for c, v in t["by_code"].items()) + ")" if t["by_code"]
                else "")]
    if t["requests_per_s"] is not None:
        lines.append(f"  throughput: {t['requests_per_s']:.2f} requests/s, {t['tokens_per_s']:.1f} output tokens/s "
                     f"(whole span; {len(t['windows'])} windows of {t['window_min']:g} min in the page)")
    lines.append("  latency (s)            " + "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) + "       n")
    for key, name in LATENCY_NAMES.items():
        row = t["latency"][key]
        lines.append(f"  {name:<22} " + "".join(f"{_s(row[f'p{q}']):>8}" for q in PERCENTILES) + f"{row['n']:>8}")
    lines += drift_lines(report["drift"])
    v = report["verdict"]
    lines.append(f"verdict: {v['verdict'].upper()}")
    lines += [f"  because {r}" for r in v["reasons"]] + [f"  note: {n}" for n in v["notes"]]
    return lines


def drift_lines(d: dict[str, Any] | None) -> list[str]:
    """The drift section as terminal lines (nothing without a run)."""
    if d is None:
        return []
    lines = [f"drift against {d['run']} ({d['train_rows']} training inputs, {d['answered']} answered requests"
             + ("" if d["content_logged"] else "; no content logged") + ")"]
    length = d["length"]
    if "psi" in length:
        lines.append(f"  input length: PSI {length['psi']:.3f} ({length['band']}; bands {PSI_BANDS[0]} / "
                     f"{PSI_BANDS[1]}), χ² {length['chi2']:.1f}, p = {_p(length['p_value'])} — median "
                     f"{length['served_median']:.0f} chars served "
                     f"({length['n_served']}), {length['train_median']:.0f} in training")
    emb = d["embedding"]
    if "p_value" in emb:
        lines.append(f"  embedding ({emb['encoder']}): MMD² {emb['mmd2']:.4f}, permutation p = {_p(emb['p_value'])} "
                     f"({emb['n_served']} served vs {emb['n_train']} training texts, {emb['permutations']} "
                     f"permutations, seed {emb['seed']}); cosine distance of means {emb['mean_cosine_distance']:.4f}")
    labels = d.get("labels") or {}
    if "p_value" in labels:
        shares = ", ".join(f"{x['label']} {x['served']:.0%} vs {x['train']:.0%}" for x in labels["labels"][:6])
        lines.append(f"  predicted labels: χ² {labels['chi2']:.2f}, df {labels['df']}, p = {_p(labels['p_value'])} "
                     f"({labels['n']} predictions; served vs training: {shares})")
        lines.append(f"  low confidence (probability < {labels['threshold']}): {labels['low_confidence']:.1%}")
    lines += [f"  {name}: {part['skipped']}" for name, part in (("input length", length), ("embedding", emb),
                                                               ("labels", labels)) if "skipped" in part]
    return lines


# ----------------------------------------------------------------------------------------------- HTML

PAGE_CSS = CSS + """.verdict{font-size:1.2rem;padding:.6rem .9rem;border-radius:4px;margin:.6rem 0}
.verdict.drift{border:2px solid #b00020;background:#fdecee}.verdict.ok{border:2px solid #3a9a5b;background:#eef8f0}
.verdict.none{border:2px solid #888;background:#f4f4f4}"""


def render_html(report: dict[str, Any]) -> str:
    """The monitoring page."""
    t, v = report["traffic"], report["verdict"]
    kind = {"retrain recommended": "drift", "no drift": "ok"}.get(v["verdict"], "none")
    items = "".join(f"<li>{_e(r)}</li>" for r in v["reasons"]) + "".join(f"<li>note: {_e(n)}</li>" for n in v["notes"])
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tunesmith monitor</title>"
             f"<style>{PAGE_CSS}</style></head><body><h1>tunesmith monitor</h1>",
             f"<p>{_e(report['log'])}: {t['requests']} requests, {_e(_when(t['start']))} to {_e(_when(t['end']))}</p>",
             f"<div class='verdict {kind}' id='verdict'><b>{_e(v['verdict'])}</b><ul>{items}</ul></div>",
             "<h2 id='traffic'>Traffic and errors</h2>", _traffic_tables(t),
             "<h2 id='latency'>Latency and throughput over time</h2>", _time_charts(t),
             "<h2 id='drift'>Drift against the training data</h2>", _drift_html(report["drift"]),
             "<pre>" + _e("\n".join(summary_lines(report))) + "</pre></body></html>"]
    return "".join(parts)


def _traffic_tables(t: dict[str, Any]) -> str:
    status = html_table(["status", "requests"], [[k, n] for k, n in t["by_status"].items()])
    codes = html_table(["error code", "requests", "share of all"],
                       [[c, x["count"], f"{x['rate']:.1%}"] for c, x in t["by_code"].items()]) if t["by_code"] else ""
    models = html_table(["model", "requests"], [[k, n] for k, n in t["by_model"].items()])
    latency = html_table(["latency (s)", *(f"p{q}" for q in PERCENTILES), "n"],
                         [[name, *(_s(t["latency"][k][f"p{q}"]) for q in PERCENTILES), t["latency"][k]["n"]]
                          for k, name in LATENCY_NAMES.items()])
    rate = (f"<p>error rate {t['error_rate']:.1%}; " + (f"{t['requests_per_s']:.2f} requests/s, "
            f"{t['tokens_per_s']:.1f} output tokens/s over the whole span</p>" if t["requests_per_s"] else "</p>"))
    return rate + "<div class='charts'>" + status + codes + models + "</div>" + latency


def _time_charts(t: dict[str, Any]) -> str:
    w = t["windows"]
    x_label = f"minutes since the first request ({t['window_min']:g}-min windows)"

    def series(key: str, label: str, color: str, dashed: bool = False) -> Series:
        return Series(key, label, [(x["minute"], x[key]) for x in w if x[key] is not None], dashed, color)

    charts = [([series("e2e_p50", "end to end p50", COLORS[0]),
                series("e2e_p95", "end to end p95", COLORS[0], True),
                series("ttft_p50", "first token p50", COLORS[1]),
                series("ttft_p95", "first token p95", COLORS[1], True)], "latency (s)"),
              ([series("tokens_per_s", "output tokens/s", COLORS[2])], "output tokens/s"),
              ([series("requests_per_s", "requests/s", COLORS[3])], "requests/s"),
              ([Series("error_share", "errors", [(x["minute"], x["errors"] / x["requests"]) for x in w
                                                  if x["requests"]], color=COLORS[4])], "error share")]
    svgs = [line_chart([s for s in group if s.points], x_label, y_label)
            for group, y_label in charts if any(s.points for s in group)]
    return f"<div class='charts'>{''.join(svgs)}</div>"


def _drift_html(d: dict[str, Any] | None) -> str:
    if d is None:
        return "<p>Not checked: give <code>--run RUN</code>, the run that was served.</p>"
    out = [f"<p>Against {_e(d['run'])}: {d['train_rows']} training inputs, {d['answered']} answered requests"
           + ("" if d["content_logged"] else " (no content logged: start <code>tunesmith serve --log-content</code> "
                                             "for the embedding test)") + ".</p>",
           "<pre>" + _e("\n".join(drift_lines(d)[1:])) + "</pre>"]
    length = d["length"]
    if "bins" in length:
        out.append("<h3>Input length (characters)</h3>" + bar_chart(
            [(b["bin"], b["train"], b["served"]) for b in length["bins"]], "input length",
            f"PSI {length['psi']:.3f}: {length['band']}; χ² p = {_p(length['p_value'])}"))
    labels = d.get("labels") or {}
    if "labels" in labels:
        out.append("<h3>Predicted labels</h3>" + bar_chart(
            [(x["label"], x["train"], x["served"]) for x in labels["labels"][:30]], "predicted labels",
            f"χ² {labels['chi2']:.2f}, p = {_p(labels['p_value'])} (drift below {ALPHA}); "
            f"{labels['low_confidence']:.1%} below probability {LOW_CONFIDENCE}"))
    return "".join(out)


def bar_chart(rows: list[tuple[str, float, float]], name: str, caption: str) -> str:
    """Horizontal paired bars, training share against served share per category, as an inline SVG."""
    label_w, bar_w, row_h = 150, 360, 22
    height = 30 + row_h * len(rows)
    top = max((max(a, b) for _, a, b in rows), default=1) or 1
    out = [f"<svg width='{label_w + bar_w + 70}' height='{height}' data-chart='{_e(name)}' role='img'>"
           f"<title>{_e(name)}: training vs served shares</title>"
           f"<text x='{label_w}' y='12' fill='{COLORS[5]}'>▮ training</text>"
           f"<text x='{label_w + 80}' y='12' fill='{COLORS[1]}'>▮ served</text>"]
    for i, (label, train, served) in enumerate(rows):
        y = 22 + i * row_h
        out.append(f"<text x='{label_w - 6}' y='{y + 13}' text-anchor='end'>{_e(label[:24])}</text>")
        for j, (share, color) in enumerate(((train, COLORS[5]), (served, COLORS[1]))):
            width = bar_w * share / top
            out.append(f"<rect x='{label_w}' y='{y + j * 9}' width='{width:.1f}' height='8' fill='{color}'>"
                       f"<title>{_e(label)}: {'training' if j == 0 else 'served'} {share:.1%}</title></rect>")
        out.append(f"<text x='{label_w + bar_w * max(train, served) / top + 4:.1f}' y='{y + 13}'>"
                   f"{served:.0%} / {train:.0%}</text>")
    return "".join(out) + f"</svg><p>{_e(caption)}</p>"
