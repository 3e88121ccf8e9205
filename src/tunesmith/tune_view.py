"""What `tunesmith tune` shows: the study as plain data (tune.json), the terminal table of trials, and
runs/NAME-tune/report.html — optimization history, Optuna's parameter importances and the metric against each
parameter as inline SVG (report.py's scales, ticks and table), no scripts, opens offline."""

from __future__ import annotations

import datetime
import html
import math
from pathlib import Path
from typing import Any

from tunesmith.artifacts import atomic_write
from tunesmith.data.check_view import html_table
from tunesmith.report import CHART, COLORS, CSS, Scale, Series, _domain, line_chart, nice_ticks, tick_labels

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def study_summary(study, plan, search_seconds: float) -> dict[str, Any]:
    """The study as plain data: every trial (values, metric, state, time, run folder), the best, importances."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):  # given up at once: two workers asked for the last trial together
            continue
        trials.append({"number": t.number, "state": STATES.get(t.state.name, t.state.name.lower()),
                       "params": dict(t.params), "value": t.value,
                       "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
                       "seconds": t.user_attrs.get("seconds"), "cpu_seconds": t.user_attrs.get("cpu_seconds"),
                       "steps": t.user_attrs.get("steps"),
                       "pruned_at": t.user_attrs.get("pruned_at"), "error": t.user_attrs.get("error"),
                       "run": t.user_attrs.get("run"), "killed": t.user_attrs.get("killed", False)})
    complete = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    pick = min if plan.direction == "min" else max
    best = pick(complete, key=lambda t: t["value"]) if complete else None
    return {"recipe": str(Path(plan.options.recipe).resolve()), "space": plan.space.to_json(),
            "metric": plan.options.metric, "direction": plan.direction, "sampler": plan.options.sampler,
            "pruner": plan.options.pruner if plan.prunable is None else "none", "no_pruning": plan.prunable,
            "seed": plan.options.seed, "storage": plan.storage, "folder": str(plan.folder),
            "date": datetime.date.today().isoformat(), "search_seconds": round(search_seconds, 1),
            "trials": trials, "best": best, "importances": importances(study)}


def importances(study) -> dict[str, float] | None:
    """Optuna's parameter importances (fANOVA) over the complete trials; None when there are too few to tell."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return None
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_table(summary: dict[str, Any]) -> str:
    """The trials as an aligned terminal table: number, each value, metric, state, steps, seconds; best marked."""
    keys = [p["key"] for p in summary["space"]]
    best = (summary["best"] or {}).get("number")
    headers = ["trial", *[k.split(".", 1)[1] for k in keys], summary["metric"], "state", "steps", "seconds"]
    rows = []
    for t in summary["trials"]:
        state = t["state"] + (f" at step {t['pruned_at']}" if t["state"] == "pruned" else "") + (
            " (killed)" if t["killed"] else "")
        rows.append([f"{t['number']}{' *' if t['number'] == best else ''}",
                     *[_cell(t["params"].get(k)) for k in keys], _cell(t["value"]), state, _cell(t["steps"]),
                     _cell(t["seconds"])])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {s: sum(t["state"] == s for t in summary["trials"]) for s in ("complete", "pruned", "failed")}
    lines.append(f"{len(summary['trials'])} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}) in "
                 f"{summary['search_seconds']:.0f} s; * best ({summary['direction']} {summary['metric']})")
    if summary["importances"]:
        lines.append("importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the page


def write_report(folder: Path, summary: dict[str, Any]) -> Path:
    """Write FOLDER/report.html; return its path."""
    path = Path(folder) / "report.html"
    atomic_write(path, render(summary))
    return path


def render(summary: dict[str, Any]) -> str:
    t = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tune: {t(summary['folder'])}</title>"
             f"<style>{CSS}</style></head><body><h1>Hyper-parameter search</h1>",
             f"<p>{t(summary['recipe'])} · {len(summary['trials'])} trials · sampler {t(summary['sampler'])} "
             f"(seed {summary['seed']}) · pruner {t(summary['pruner'])} · {t(summary['direction'])} "
             f"{t(summary['metric'])} on a split carved from data.train · {summary['search_seconds']:.0f} s · "
             f"{t(summary['date'])}</p>"]
    if summary.get("no_pruning"):
        parts.append(f"<p>No pruning: {t(summary['no_pruning'])}.</p>")
    parts.append(_final(summary.get("final")))
    parts.append("<h2>Optimization history</h2><p>Filled dots: complete trials; hollow: pruned trials at their last "
                 "evaluation; the line: the best complete trial so far.</p>" + history_chart(summary))
    parts.append("<h2>Parameter importances</h2>" + importance_chart(summary.get("importances")))
    parts.append("<h2>Metric against each parameter</h2><div class='charts'>"
                 + "".join(param_chart(summary, p) for p in summary["space"]) + "</div>")
    keys = [p["key"] for p in summary["space"]]
    rows = [[tr["number"], *[_cell(tr["params"].get(k)) for k in keys], _cell(tr["value"]), tr["state"],
             _cell(tr["steps"]), _cell(tr["seconds"]), tr["run"] or ""] for tr in summary["trials"]]
    parts.append("<h2>Trials</h2>" + html_table(["trial", *keys, summary["metric"], "state", "steps", "seconds",
                                                 "run folder"], rows))
    return "".join(parts) + "</body></html>"


def _final(final: dict[str, Any] | None) -> str:
    t = html.escape
    if not final:
        return ""
    if "difference" not in final:
        return f"<h2>What the search bought</h2><p>{t(final.get('skipped') or final.get('note') or '')}</p>"
    b, r, d = final["best"], final["recipe"], final["difference"]
    rows = [["winner (best.yaml)", f"{b['value']:.4f}", f"[{b['ci_low']:.4f}, {b['ci_high']:.4f}]"],
            ["recipe as written", f"{r['value']:.4f}", f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"],
            ["difference (paired)", f"{d['diff']:+.4f}", f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"]]
    return (f"<h2>What the search bought</h2><p>Scored once on {final['rows']} rows of {t(str(final['data']))}, "
            f"which the search never saw; {len(final['seeds'])} seed(s) each ({final['metric']}, 95% bootstrap "
            f"intervals).</p>" + html_table(["", final["metric"], "95% interval"], rows))


def history_chart(summary: dict[str, Any]) -> str:
    """Each finished trial's value by trial number, and the best so far."""
    done = [t for t in summary["trials"] if t["value"] is not None and t["state"] in ("complete", "pruned")]
    if not done:
        return "<p>No finished trial yet.</p>"
    pick = min if summary["direction"] == "min" else max
    best, running = [], None
    for t in done:
        if t["state"] == "complete":
            running = t["value"] if running is None else pick(running, t["value"])
        if running is not None:
            best.append((t["number"], running))
    series = [Series("best", "best so far", best, color=COLORS[2])] if best else []
    scatter = [(t["number"], t["value"], t["state"]) for t in done]
    return scatter_chart(scatter, "trial", summary["metric"], lines=series)


def importance_chart(values: dict[str, float] | None) -> str:
    """Horizontal bars of Optuna's importances."""
    if not values:
        return "<p>Too few complete trials to estimate importances (3 or more are needed).</p>"
    width, row = 640, 24
    label_w = 220
    out = [f"<svg width='{width}' height='{row * len(values) + 8}' data-chart='importance' role='img'>"
           "<title>parameter importance</title>"]
    for i, (key, value) in enumerate(values.items()):
        y = 4 + i * row
        bar = max(1.0, (width - label_w - 60) * value)
        out.append(f"<text x='{label_w - 6}' y='{y + 15}' text-anchor='end'>{html.escape(key)}</text>"
                   f"<rect data-param='{html.escape(key)}' x='{label_w}' y='{y + 3}' width='{bar:.1f}' height='16' "
                   f"fill='{COLORS[0]}'/><text x='{label_w + bar + 4:.1f}' y='{y + 15}'>{value:.2f}</text>")
    return "".join(out) + "</svg>"


def param_chart(summary: dict[str, Any], param: dict[str, Any]) -> str:
    """The metric against one parameter: log axis for log ranges, positions for choices."""
    key = param["key"]
    done = [t for t in summary["trials"] if t["value"] is not None and key in t["params"]
            and t["state"] in ("complete", "pruned")]
    if not done:
        return ""
    if param["kind"] == "choice":
        names = [str(v) for v in param["values"]]
        points = [(names.index(str(t["params"][key])), t["value"], t["state"]) for t in done]
        return scatter_chart(points, key, summary["metric"], categories=names)
    log = param["kind"].startswith("log")
    points = [(math.log10(t["params"][key]) if log else t["params"][key], t["value"], t["state"]) for t in done]
    return scatter_chart(points, f"log10 {key}" if log else key, summary["metric"])


def scatter_chart(points: list[tuple[float, float, str]], x_label: str, y_label: str,
                  categories: list[str] | None = None, lines: list[Series] = ()) -> str:
    """Dots (complete filled, pruned hollow) with axes and ticks; `lines` drawn through them (report.line_chart's
    polyline look)."""
    c = CHART
    xs = [p[0] for p in points] + [x for s in lines for x, _ in s.points]
    ys = [p[1] for p in points] + [y for s in lines for _, y in s.points]
    x_lo, x_hi = (-0.5, len(categories) - 0.5) if categories else _domain(xs)
    xs_ = Scale(x_lo, x_hi, c["left"], c["width"] - c["right"])
    ys_ = Scale(*_domain(ys), c["height"] - c["bottom"], c["top"])
    bottom, top, left, right = ys_.a, ys_.b, xs_.a, xs_.b
    out = [f"<svg width='{c['width']}' height='{c['height']}' data-chart='{html.escape(x_label)}' role='img'>"
           f"<title>{html.escape(y_label)} by {html.escape(x_label)}</title>"]
    for tick, text in tick_labels(nice_ticks(ys_.lo, ys_.hi)):
        y = ys_(tick)
        out.append(f"<line class='grid' x1='{left}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}'/>"
                   f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{text}</text>")
    xticks = list(enumerate(categories)) if categories else tick_labels(nice_ticks(xs_.lo, xs_.hi))
    for tick, text in xticks:
        x = xs_(tick)
        out.append(f"<line class='axis' x1='{x:.1f}' x2='{x:.1f}' y1='{bottom}' y2='{bottom + 5}'/>"
                   f"<text x='{x:.1f}' y='{bottom + 17}' text-anchor='middle'>{html.escape(str(text))}</text>")
    out.append(f"<line class='axis' x1='{left}' x2='{right}' y1='{bottom}' y2='{bottom}'/>"
               f"<line class='axis' x1='{left}' x2='{left}' y1='{top}' y2='{bottom}'/>"
               f"<text x='{(left + right) / 2:.1f}' y='{c['height'] - 6}' text-anchor='middle'>"
               f"{html.escape(x_label)}</text><text transform='translate(12 {(top + bottom) / 2:.1f}) rotate(-90)' "
               f"text-anchor='middle'>{html.escape(y_label)}</text>")
    for s in lines:
        coords = " ".join(f"{xs_(x):.1f},{ys_(y):.1f}" for x, y in s.points)
        out.append(f"<polyline data-series='{s.key}' fill='none' stroke='{s.color}' stroke-width='1.6' "
                   f"points='{coords}'/>")
    for x, y, state in points:
        fill = COLORS[0] if state == "complete" else "none"
        out.append(f"<circle data-state='{state}' cx='{xs_(x):.1f}' cy='{ys_(y):.1f}' r='3.5' fill='{fill}' "
                   f"stroke='{COLORS[0]}'><title>{html.escape(str(x))}: {y:.4g} ({state})</title></circle>")
    return "".join(out) + "</svg>"


__all__ = ["study_summary", "trial_table", "write_report", "render", "line_chart"]
