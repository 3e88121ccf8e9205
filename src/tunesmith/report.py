"""`tunesmith report RUN`: one self-contained HTML page (RUN/report.html) that says what a run did and bought.

Read top to bottom: the header (what was trained, how long, loss before and after), the training curves, one
section per `RUN/eval/NAME/` (metrics per system, differences with 95% intervals, wins and losses, confusion
matrices, per-class scores, lengths, best and worst examples, leakage exclusions, the forgetting check), human
review, the data check, and the recipe and manifest. A section shows only when its files exist. The page has
inline CSS and inline SVG charts only: no scripts, no fonts, nothing fetched, so it opens offline.
"""

from __future__ import annotations

import html
import importlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunesmith.artifacts import RunDir, atomic_write, open_run, read_metrics
from tunesmith.data.check import histogram
from tunesmith.data.check_view import CSS as CHECK_CSS
from tunesmith.data.check_view import MARK, html_table
from tunesmith.errors import RunError
from tunesmith.evaluation.view import PERCENT, fmt, fmt_diff
from tunesmith.train import kept_text

COLORS = ("#4a78c2", "#d9822b", "#3a9a5b", "#8e5bb5", "#c2474a", "#6b6b6b")
LOWER_IS_BETTER = {"perplexity", "nll_per_token", "loss", "nll"}
WORD_EDGES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CHART = {"width": 640, "height": 260, "left": 64, "right": 16, "top": 16, "bottom": 44}  # line charts, px
CSS = CHECK_CSS + """
nav a{margin-right:.8rem}.kv th{width:12rem}.warn{border:2px solid #b00020;background:#fdecee;padding:.5rem .8rem}
svg{display:block;margin:.5rem 0}svg text{font:11px system-ui,sans-serif;fill:#333}.axis{stroke:#888}
.grid{stroke:#eee}td.cm{text-align:right;min-width:2.5rem}td.diag{font-weight:600}.num{text-align:right}
.charts{display:flex;flex-wrap:wrap;gap:1rem}.cms{display:flex;gap:2rem;flex-wrap:wrap}
"""


def write_report(run_path: str | Path) -> Path:
    """Write RUN/report.html and return its path."""
    run = open_run(run_path)
    path = run.root / "report.html"
    atomic_write(path, render_report(run.root))
    return path


def render_report(run_path: str | Path) -> str:
    """The run's report as one HTML page; RunError when the folder is not a finished run."""
    run = open_run(run_path)
    manifest = run.read_manifest()
    recipe = run.read_recipe() if run.recipe.exists() else None
    sections = [("summary", "Summary", _header(run, manifest, recipe)),
                ("curves", "Training curves", _curves(read_metrics(run.metrics)))]
    for folder in sorted(p.parent for p in (run.root / "eval").glob("*/results.json")):
        sections.append((_anchor(folder.name, {key for key, _, _ in sections}), f"Evaluation: {folder.name}",
                         _evaluation(folder)))
    sections.append(("review", "Human review", _review(run.root)))
    sections.append(("data-check", "Data check", _data_check(run.root)))
    sections.append(("recipe", "Recipe and manifest", _recipe_manifest(run, manifest)))
    shown = [(key, title, body) for key, title, body in sections if body]
    nav = "".join(f"<a href='#{_attr(key)}'>{_text(title)}</a>" for key, title, _ in shown)
    body = "".join(f"<section id='{_attr(key)}'><h2>{_text(title)}</h2>{part}</section>" for key, title, part in shown)
    title = f"tunesmith run report: {run.root.name}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_text(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{_text(title)}</h1><nav>{nav}</nav>{body}</body></html>\n")


# ----------------------------------------------------------------------------------------------- header


def _header(run: RunDir, manifest: dict[str, Any], recipe: dict[str, Any] | None) -> str:
    training, losses = manifest.get("training") or {}, manifest.get("losses") or {}
    timings = manifest.get("timings") or {}
    finished = datetime.fromtimestamp(run.manifest.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    adapter = ((recipe or {}).get("method") or {}).get("adapter")
    base = manifest.get("base_model") or {}
    rows: list[tuple[str, Any]] = [
        ("run folder", str(run.root)),
        ("method", manifest.get("method")),
        ("adapter", f"{adapter} (saved {manifest['saved']}/)" if adapter and manifest.get("saved") else adapter),
        ("base model", base.get("resolved") or base.get("name")),
        ("finished", finished + (f" (run took {_duration(timings['total_seconds'])})"
                                 if "total_seconds" in timings else "")),
        ("steps", _steps(training)),
        ("kept", kept_text(training["kept"]) if training.get("kept") else None),
        ("train time", _duration(timings["train_seconds"]) if "train_seconds" in timings else None),
        ("trained tokens/s", f"{training['trained_tokens_per_second']:,.1f}"
         if training.get("trained_tokens_per_second") is not None else None),
        ("trainable params", _params(training)),
        ("train loss", _before_after(losses, "train")),
        ("validation loss", _before_after(losses, "validation")),
    ]
    return "<table class='kv'>" + "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in rows
                                          if v not in (None, "")) + "</table>"


def _steps(training: dict[str, Any]) -> str | None:
    if training.get("steps") is None:
        return None
    return f"{training['steps']:,}" + (" (stopped early)" if training.get("stopped_early") else "") + \
        (" (resumed)" if training.get("resumed") else "")


def _params(training: dict[str, Any]) -> str | None:
    trainable, total = training.get("trainable_params"), training.get("total_params")
    if trainable is None:
        return None
    return f"{trainable:,}" + (f" of {total:,} ({trainable / total:.2%})" if total else "")


def _before_after(losses: dict[str, Any], name: str) -> str | None:
    before, after = losses.get(f"{name}_before"), losses.get(f"{name}_after")
    if before is None and after is None:
        return None
    return f"{_sig(before)} → {_sig(after)}"


# ----------------------------------------------------------------------------------------------- curves


@dataclass
class Series:
    """One line of a chart: a key (the SVG's data-series), a legend label and (x, y) points."""

    key: str
    label: str
    points: list[tuple[float, float]]
    dashed: bool = False
    color: str = COLORS[0]


def _curves(metrics: list[dict[str, Any]]) -> str:
    def points(key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in metrics  # not the re-measurement of kept weights (kept_from_step)
                if _finite(r.get(key)) and _finite(r.get("step")) and "kept_from_step" not in r]

    charts = [("loss", [Series("train_loss", "training loss", points("loss")),
                        Series("eval_loss", "validation loss", points("eval_loss"), True, COLORS[1])]),
              ("learning rate", [Series("learning_rate", "learning rate", points("learning_rate"), color=COLORS[2])]),
              ("gradient norm", [Series("grad_norm", "gradient norm", points("grad_norm"), color=COLORS[3])])]
    svgs = [line_chart([s for s in series if s.points], "step", y_label)
            for y_label, series in charts if any(s.points for s in series)]
    return f"<div class='charts'>{''.join(svgs)}</div>" if svgs else ""


def line_chart(series: list[Series], x_label: str, y_label: str) -> str:
    """An SVG line chart with axes, ticks and labels; each series is a <polyline data-series=KEY> plus dots.

    The scales map the data's exact range onto the plot area given by CHART (left..width-right, height-bottom..top).
    """
    c = CHART
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_scale = Scale(*_domain(xs), c["left"], c["width"] - c["right"])
    y_scale = Scale(*_domain(ys), c["height"] - c["bottom"], c["top"])
    out = [f"<svg width='{c['width']}' height='{c['height']}' "
           f"data-chart='{_attr(y_label)}' data-x-domain='{x_scale.lo!r} {x_scale.hi!r}' "
           f"data-y-domain='{y_scale.lo!r} {y_scale.hi!r}' role='img'>"
           f"<title>{_text(y_label)} by {_text(x_label)}</title>"]
    bottom, top, left, right = y_scale.a, y_scale.b, x_scale.a, x_scale.b
    for t, text in tick_labels(nice_ticks(y_scale.lo, y_scale.hi)):
        y = y_scale(t)
        out.append(f"<line class='grid' x1='{left}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}'/>"
                   f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{text}</text>")
    for t, text in tick_labels(nice_ticks(x_scale.lo, x_scale.hi)):
        x = x_scale(t)
        out.append(f"<line class='axis' x1='{x:.1f}' x2='{x:.1f}' y1='{bottom}' y2='{bottom + 5}'/>"
                   f"<text x='{x:.1f}' y='{bottom + 17}' text-anchor='middle'>{text}</text>")
    out.append(f"<line class='axis' x1='{left}' x2='{right}' y1='{bottom}' y2='{bottom}'/>"
               f"<line class='axis' x1='{left}' x2='{left}' y1='{top}' y2='{bottom}'/>"
               f"<text x='{(left + right) / 2:.1f}' y='{c['height'] - 6}' text-anchor='middle'>{_text(x_label)}</text>"
               f"<text transform='translate(12 {(top + bottom) / 2:.1f}) rotate(-90)' text-anchor='middle'>"
               f"{_text(y_label)}</text>")
    for i, s in enumerate(series):
        coords = " ".join(f"{x_scale(x):.1f},{y_scale(y):.1f}" for x, y in s.points)
        dash = " stroke-dasharray='5 3'" if s.dashed else ""
        out.append(f"<polyline data-series='{_attr(s.key)}' fill='none' stroke='{s.color}' stroke-width='1.6'{dash} "
                   f"points='{coords}'/>")
        if len(s.points) <= 80:
            out.extend(f"<circle cx='{x_scale(x):.1f}' cy='{y_scale(y):.1f}' r='2.5' fill='{s.color}'>"
                       f"<title>{_text(s.label)} at {_text(x_label)} {_tick(x)}: {_sig(y)}</title></circle>"
                       for x, y in s.points)
        if len(series) > 1:
            out.append(f"<text x='{right - 4}' y='{top + 12 + 14 * i}' text-anchor='end' fill='{s.color}'>"
                       f"{'- - ' if s.dashed else '— '}{_text(s.label)}</text>")
    return "".join(out) + "</svg>"


@dataclass(frozen=True)
class Scale:
    """A linear map of the data range lo..hi onto pixels a..b."""

    lo: float
    hi: float
    a: float
    b: float

    def __call__(self, value: float) -> float:
        return self.a + (value - self.lo) / (self.hi - self.lo) * (self.b - self.a)


def _domain(values: list[float]) -> tuple[float, float]:
    """min..max of the values, widened around a single value so the scale is defined."""
    lo, hi = min(values), max(values)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) inside lo..hi, about `count` of them."""
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def tick_labels(ticks: list[float]) -> list[tuple[float, str]]:
    """Each tick with its label, all with the decimals the step needs (scientific when very small or large)."""
    if len(ticks) < 2:
        return [(t, _tick(t)) for t in ticks]
    step = ticks[1] - ticks[0]
    if step < 1e-3 or max(abs(t) for t in ticks) >= 1e5:
        return [(t, "0" if t == 0 else f"{t:.1e}") for t in ticks]
    power = math.floor(math.log10(step) + 1e-9)
    decimals = max(0, -power + (1 if round(step / 10 ** power, 6) == 2.5 else 0))
    return [(t, f"{t:.{decimals}f}") for t in ticks]


# ----------------------------------------------------------------------------------------------- evaluation


def _evaluation(folder: Path) -> str:
    results = _read_json(folder / "results.json")
    examples = _read_jsonl(folder / "examples.jsonl")
    systems = list(results.get("systems") or results.get("metrics", {}))
    metrics = results.get("metrics") or {}
    out = [f"<p>{_text(results.get('rows', '?'))} rows of {_text(results.get('data', '?'))} · task "
           f"{_text(results.get('task', '?'))} · primary metric {_text(results.get('primary_metric', '?'))}"
           + (f" · {_text(results['regressions'])} rows where tuned scores below base"
              if "regressions" in results else "")
           + "</p>", _metric_table(systems, metrics)]
    if results.get("differences"):
        out.append("<h3>Differences (paired bootstrap, 95% interval)</h3>" + _difference_charts(results["differences"]))
    if results.get("wins_losses"):
        out.append("<h3>Per-example wins and losses of tuned</h3>" + _wins_losses(results))
    confusions = [(s, metrics[s]["confusion"]) for s in ("tuned", "base") if (metrics.get(s) or {}).get("confusion")]
    if confusions:
        out.append("<h3>Confusion matrices</h3><p class='muted'>rows: gold label · columns: predicted</p>"
                   "<div class='cms'>" + "".join(_confusion(s, c) for s, c in confusions) + "</div>")
    per_class = [s for s in systems if (metrics.get(s) or {}).get("per_class")]
    if per_class:
        out.append("<h3>Per-class precision, recall and F1</h3>" + _per_class(per_class, metrics))
    if any("references" in e for e in examples):
        out.append("<h3>Answer lengths (words)</h3>" + _length_chart(systems, examples))
    out.append(_best_worst(results, systems, examples))
    out.append(_leakage(results))
    if results.get("alignment"):
        out.append("<h3>Reward model</h3>" + _alignment(results["alignment"]))
    if results.get("forgetting"):
        out.append("<h3>Forgetting check (general-ability set)</h3>" + _forgetting(results["forgetting"]))
    return "".join(out)


def _alignment(a: dict[str, Any]) -> str:
    """Mean reward per system, the tuned system's win rates, and its KL to the base model."""
    rows = [[name, f"{s['mean_reward']:+.3f}", f"[{s['reward_ci'][0]:+.3f}, {s['reward_ci'][1]:+.3f}]",
             f"{s['answer_tokens_mean']:.1f}" if "answer_tokens_mean" in s else "—",
             _win_cell(a["win_rate"].get(name))] for name, s in a["systems"].items()]
    kl = a.get("kl_to_base")
    note = (f"<p>KL to the base model on the tuned answers: {kl['kl_per_answer']:.3f} nats per answer "
            f"({kl['kl_per_token']:.4f} per token).</p>" if kl else "")
    return (f"<p class='muted'>scored by {_text(a['reward_model'])}; a reward that rises with the answer length alone "
            "is the reward model being gamed</p>"
            + html_table(["system", "mean reward", "95% interval", "answer tokens", "tuned wins against it"], rows)
            + note)


def _win_cell(w: dict[str, Any] | None) -> str:
    if not w:
        return "—"
    return (f"{w['win_rate']:.1%} [{w['ci_low']:.1%}, {w['ci_high']:.1%}] "
            f"({w['wins']} wins, {w['losses']} losses, {w['ties']} ties)")


def _metric_table(systems: list[str], metrics: dict[str, dict[str, Any]]) -> str:
    names: list[str] = []
    for s in systems:
        names += [k for k, v in (metrics.get(s) or {}).items() if _finite(v) and k not in names]
    rows = [[name] + [_metric(name, (metrics.get(s) or {}).get(name)) for s in systems] for name in names]
    return html_table(["metric", *systems], rows) if rows else ""


def _difference_charts(differences: list[dict[str, Any]]) -> str:
    """Per metric, one SVG: for each comparison a bar from 0 to the difference and the 95% interval as a whisker."""
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for d in differences:
        by_metric.setdefault(d.get("metric", "?"), []).append(d)
    return "".join(_difference_chart(metric, items) for metric, items in by_metric.items())


def _difference_chart(metric: str, items: list[dict[str, Any]]) -> str:
    width, label_w, text_w, row_h = 760, 190, 250, 28
    x0, x1 = label_w, width - text_w
    reach = max((abs(d[k]) for d in items for k in ("diff", "ci_low", "ci_high") if _finite(d.get(k))),
                default=0) * 1.1 or 1
    scale = Scale(-reach, reach, x0, x1)
    zero = scale(0)
    height = row_h * len(items) + 22
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    out = [f"<svg width='{width}' height='{height}' data-metric='{_attr(metric)}'>"
           f"<title>{_text(metric)} differences ({better})</title>",
           f"<line class='axis' x1='{zero:.1f}' x2='{zero:.1f}' y1='0' y2='{height - 18}'/>",
           f"<text x='{x0}' y='{height - 4}'>{_text(fmt_diff(metric, -reach))}</text><text x='{zero:.1f}' "
           f"y='{height - 4}' text-anchor='middle'>0</text><text x='{x1}' y='{height - 4}' text-anchor='end'>"
           f"{_text(fmt_diff(metric, reach))}</text>"]
    for i, d in enumerate(items):
        y = row_h * i + row_h / 2
        diff, low, high = d.get("diff"), d.get("ci_low"), d.get("ci_high")
        name = f"{d.get('system', 'tuned')} − {d.get('versus', '?')}"
        out.append(f"<g data-diff='{_attr(d.get('system', 'tuned'))}-vs-{_attr(d.get('versus', '?'))}'>"
                   f"<text x='{x0 - 8}' y='{y + 4:.1f}' text-anchor='end'>{_text(name)} · {_text(metric)}</text>")
        if _finite(diff) and _finite(low) and _finite(high):
            color = _verdict_color(metric, low, high)
            left, right = sorted((zero, scale(diff)))
            out.append(f"<rect x='{left:.1f}' y='{y - 7:.1f}' width='{right - left:.1f}' height='14' "
                       f"fill='{color}' opacity='.35'/><line class='ci' stroke='{color}' stroke-width='2' "
                       f"x1='{scale(low):.1f}' x2='{scale(high):.1f}' y1='{y:.1f}' y2='{y:.1f}'/>"
                       + "".join(f"<line stroke='{color}' stroke-width='2' x1='{scale(v):.1f}' x2='{scale(v):.1f}' "
                                 f"y1='{y - 6:.1f}' y2='{y + 6:.1f}'/>" for v in (low, high))
                       + f"<circle cx='{scale(diff):.1f}' cy='{y:.1f}' r='4' fill='{color}'/>")
        out.append(f"<text x='{x1 + 8}' y='{y + 4:.1f}'>{_text(_difference_text(metric, d))}</text></g>")
    return "".join(out) + "</svg>"


def _difference_text(metric: str, d: dict[str, Any]) -> str:
    if not all(_finite(d.get(k)) for k in ("diff", "ci_low", "ci_high")):
        return "no interval"
    p = d.get("p_value")
    p_text = "" if p is None else (", p < 0.001" if p < 0.001 else f", p = {p:.3f}")
    return (f"{fmt_diff(metric, d['diff'])} [{fmt_diff(metric, d['ci_low'])}, {fmt_diff(metric, d['ci_high'])}]"
            f"{p_text}" + (f", n = {d['n']}" if d.get("n") is not None else ""))


def _verdict_color(metric: str, low: float, high: float) -> str:
    """Green when the interval is wholly on the better side of 0, red when wholly on the worse side, else grey."""
    sign = -1 if metric in LOWER_IS_BETTER else 1
    if sign * low > 0 and sign * high > 0:
        return COLORS[2]
    if sign * low < 0 and sign * high < 0:
        return COLORS[4]
    return COLORS[5]


def _wins_losses(results: dict[str, Any]) -> str:
    rows = []
    for other, wl in results["wins_losses"].items():
        wins, ties, losses = (int(wl.get(k) or 0) for k in ("wins", "ties", "losses"))
        total = wins + ties + losses
        bar = ""
        if total:
            widths = [240 * n / total for n in (wins, ties, losses)]
            starts = [0, widths[0], widths[0] + widths[1]]
            bar = ("<svg width='240' height='14'>" + "".join(
                f"<rect x='{x:.1f}' y='0' width='{w:.1f}' height='14' fill='{c}'/>"
                for x, w, c in zip(starts, widths, (COLORS[2], "#ccc", COLORS[4])) if w) + "</svg>")
        rows.append([_text(other), wins, ties, losses, bar])
    return (f"<p class='muted'>on {_text(results.get('primary_metric', 'the primary metric'))}, example by example</p>"
            + html_table(["tuned vs", "wins", "ties", "losses", ""], rows, raw=True))


def _confusion(system: str, confusion: dict[str, Any]) -> str:
    labels, matrix = confusion.get("labels") or [], confusion.get("matrix") or []
    columns = confusion.get("columns") or labels
    top = max((n for row in matrix for n in row), default=0) or 1
    head = "".join(f"<th>{_text(c)}</th>" for c in columns)
    body = []
    for gold, row in zip(labels, matrix):
        cells = []
        for pred, n in zip(columns, row):
            shade = n / top
            ink = "#fff" if shade > 0.6 else "#222"
            diag = " diag" if pred == gold else ""
            cells.append(f"<td class='cm{diag}' style='background:rgba(74,120,194,{shade:.2f});color:{ink}' "
                         f"title='gold {_attr(gold)}, predicted {_attr(pred)}'>{_text(n)}</td>")
        body.append(f"<tr><th>{_text(gold)}</th>{''.join(cells)}</tr>")
    return (f"<div><p><b>{_text(system)}</b></p><table data-confusion='{_attr(system)}'><tr><th>gold \\ predicted</th>"
            f"{head}</tr>{''.join(body)}</table></div>")


def _per_class(systems: list[str], metrics: dict[str, dict[str, Any]]) -> str:
    labels = list(metrics[systems[0]]["per_class"])
    head = "<tr><th rowspan='2'>label</th><th rowspan='2'>support</th>" + "".join(
        f"<th colspan='3'>{_text(s)}</th>" for s in systems) + "</tr><tr>" + "<th>precision</th><th>recall</th>" \
        "<th>F1</th>" * len(systems) + "</tr>"
    rows = []
    for label in labels:
        first = metrics[systems[0]]["per_class"][label]
        cells = "".join(f"<td class='num'>{_text(_metric(k, (metrics[s]['per_class'].get(label) or {}).get(k)))}</td>"
                        for s in systems for k in ("precision", "recall", "f1"))
        rows.append(f"<tr><th>{_text(label)}</th><td class='num'>{_text(first.get('support', ''))}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _length_chart(systems: list[str], examples: list[dict[str, Any]]) -> str:
    """Grouped bars: how many answers fall in each word-count bucket, per system and for the references."""
    lengths = {"reference": [len(_first_reference(e).split()) for e in examples]}
    for s in systems:
        outputs = [(e.get(s) or {}).get("output") for e in examples]
        if all(isinstance(o, str) for o in outputs):
            lengths[s] = [len(o.split()) for o in outputs]
    hists = {name: histogram(v, WORD_EDGES) for name, v in lengths.items()}
    buckets = max(hists.values(), key=len)
    counts = {name: [h[i]["rows"] if i < len(h) else 0 for i in range(len(buckets))] for name, h in hists.items()}
    width, height, left, bottom = 640, 200, 40, 170
    group = (width - left - 10) / len(buckets)
    bar = group * 0.8 / len(counts)
    top = max(max(c) for c in counts.values()) or 1
    out = [f"<svg width='{width}' height='{height + 14 * len(counts)}' "
           f"data-chart='lengths'><title>answer lengths in words</title>"
           f"<line class='axis' x1='{left}' x2='{width - 10}' y1='{bottom}' y2='{bottom}'/>"
           f"<text x='{left - 6}' y='24' text-anchor='end'>{top}</text>"]
    for i, b in enumerate(buckets):
        out.append(f"<text x='{left + group * (i + 0.5):.1f}' y='{bottom + 14}' text-anchor='middle'>"
                   f"{_text(b['bucket'])}</text>")
        for j, (name, c) in enumerate(counts.items()):
            h = 150 * c[i] / top
            out.append(f"<rect data-lengths='{_attr(name)}' x='{left + group * (i + 0.1) + bar * j:.1f}' "
                       f"y='{bottom - h:.1f}' width='{bar:.1f}' height='{h:.1f}' fill='{COLORS[j % len(COLORS)]}'>"
                       f"<title>{_text(name)}: {c[i]} answers of {_text(b['bucket'])} words</title></rect>")
    for j, name in enumerate(counts):
        out.append(f"<text x='{left}' y='{height + 14 * j + 6}' fill='{COLORS[j % len(COLORS)]}'>"
                   f"■ {_text(name)}</text>")
    return "".join(out) + "</svg>"


def _best_worst(results: dict[str, Any], systems: list[str], examples: list[dict[str, Any]]) -> str:
    """The tuned system's best and worst rows by the primary metric; ties go to the larger gap over the others."""
    primary = results.get("primary_metric")
    scored = [e for e in examples if _finite((e.get("tuned") or {}).get(primary))]
    if not scored:
        return ""
    sign = -1 if primary in LOWER_IS_BETTER else 1
    others = [s for s in systems if s != "tuned"]

    def key(e: dict[str, Any]) -> tuple[float, float]:
        own = e["tuned"][primary]
        rest = [(e.get(s) or {}).get(primary) for s in others]
        rest = [r for r in rest if _finite(r)]
        return sign * own, (sign * (own - sum(rest) / len(rest)) if rest else 0.0)

    n_best = min(5, (len(scored) + 1) // 2)
    best = sorted(scored, key=key, reverse=True)[:n_best]
    worst = [e for e in sorted(scored, key=key) if not any(e is b for b in best)][:min(5, len(scored) - n_best)]
    return "".join(f"<h3>{title} examples (tuned, by {_text(primary)})</h3>"
                   + _example_table(rows, systems, primary) for title, rows in (("Best", best), ("Worst", worst))
                   if rows)


def _example_table(rows: list[dict[str, Any]], systems: list[str], primary: str) -> str:
    body = []
    for e in rows:
        answers = "".join(f"<td data-system='{_attr(s)}'><pre>{_text((e.get(s) or {}).get('output', ''))}</pre>"
                          f"<span class='muted'>{_text(_metric(primary, (e.get(s) or {}).get(primary)))}</span></td>"
                          for s in systems)
        body.append(f"<tr class='example'><td><pre>{_text(e.get('input', ''))}</pre></td>"
                    f"<td><pre>{_text(_first_reference(e))}</pre></td>{answers}</tr>")
    head = "".join(f"<th>{_text(h)}</th>" for h in ("input", "reference", *systems))
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _leakage(results: dict[str, Any]) -> str:
    count = results.get("excluded_leaked")
    if count is None:
        return ""
    if not count:
        return "<h3>Leakage exclusions</h3><p class='ok'>✓ No evaluation row matches a training row.</p>"
    listed = results.get("excluded") or []
    rows = [[f"{x.get('file', '?')}:{x.get('line', '?')}", f"{x.get('train_file', '?')}:{x.get('train_line', '?')}",
             x.get("similarity", ""), "exact" if x.get("exact") else "near"] for x in listed]
    more = f" (the first {len(listed)} listed)" if len(listed) < count else ""
    return (f"<h3>Leakage exclusions</h3><p class='warning'>{_text(count)} evaluation rows match training rows "
            f"and were left out of every score{more}.</p>"
            + (html_table(["evaluation row", "training row", "similarity", "match"], rows) if rows else ""))


def _forgetting(f: dict[str, Any]) -> str:
    tuned, base = f.get("tuned") or {}, f.get("base") or {}
    names = [k for k in ("qa_accuracy", "perplexity", "nll_per_token") if k in tuned or k in base]
    table = html_table(["", "base", "tuned"], [[k, _metric(k, base.get(k)), _metric(k, tuned.get(k))] for k in names])
    threshold = f.get("threshold")
    parts = []
    if _finite(f.get("qa_accuracy_drop")):
        parts.append(f"QA accuracy drop {fmt_diff('accuracy', f['qa_accuracy_drop'])}")
    if _finite(f.get("perplexity_rise")):
        parts.append(f"perplexity rise {f['perplexity_rise']:+.1%}")
    line = "; ".join(parts) + (f" (warning above {threshold:.0%} relative)" if _finite(threshold) else "")
    if f.get("warning"):
        verdict = ("<p class='warn error'>⚠ Forgetting warning: the tuned model lost more general ability than the "
                   "threshold allows. Check it on tasks beyond this one before you ship it.</p>")
    else:
        verdict = "<p class='ok'>✓ No forgetting above the threshold.</p>"
    return verdict + f"<p>{_text(line)}</p>" + table


# ----------------------------------------------------------------------------------------------- review, data check


def _review(root: Path) -> str:
    databases = sorted((root / "review").glob("*.sqlite"))
    if not databases:
        return ""
    try:
        review_app = importlib.import_module("tunesmith.review_app")
    except ImportError:
        return ""
    section = getattr(review_app, "report_section", None)  # win rate of A with its 95% interval, per reviewer
    return "".join(section(db) for db in databases) if section else ""


def _data_check(root: Path) -> str:
    path = root / "data_check.json"
    if not path.exists():
        return ""
    problems = _read_json(path).get("problems") or []
    items = "".join(f"<li class='{_attr(p.get('severity', ''))}'>{MARK.get(p.get('severity'), '·')} "
                    f"{_text(p.get('check', ''))}: {_text(p.get('message', ''))}</li>" for p in problems)
    found = f"<ul>{items}</ul>" if items else "<p class='ok'>✓ No findings.</p>"
    link = " <a href='data_check.html'>the full data check</a>" if (root / "data_check.html").exists() else ""
    return f"<p>The check run before training found {len(problems)} finding(s).{link}</p>{found}"


def _recipe_manifest(run: RunDir, manifest: dict[str, Any]) -> str:
    recipe = f"<h3>recipe.yaml</h3><pre>{_text(run.recipe.read_text())}</pre>" if run.recipe.exists() else ""
    return (recipe + "<details><summary>manifest.json</summary><pre>"
            f"{_text(json.dumps(manifest, indent=2, ensure_ascii=False))}</pre></details>")


# ----------------------------------------------------------------------------------------------- small helpers


def _text(value: Any) -> str:
    """`value` as HTML text between tags: & < > escaped (and quotes, harmlessly)."""
    return html.escape(str(value), quote=True)


def _attr(value: Any) -> str:
    """`value` inside a quoted attribute (`x='…'` or `x="…"`): & < > ' " escaped, and no raw newline or tab."""
    return html.escape(str(value), quote=True).replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")


def _anchor(name: str, taken: set[str]) -> str:
    """A section id for an eval folder: `eval-NAME` with anything but letters, digits, `_ . -` as `-`, made unique."""
    base = "eval-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unnamed")
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}-{n}"
    return key


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: not valid JSON ({err})", "re-run the command that wrote it") from err


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: not valid JSON lines ({err})", "re-run `tunesmith eval`") from err


def _first_reference(example: dict[str, Any]) -> str:
    refs = example.get("references")
    if isinstance(refs, list) and refs:
        return str(refs[0])
    return str(refs if refs is not None else example.get("label", ""))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sig(value: Any) -> str:
    """A float with 4 significant digits (losses); '—' for None."""
    if value is None:
        return "—"
    if not _finite(value) or value == 0:
        return str(value)
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:#.4g}".rstrip(".")
    return f"{value:.3e}"


def _metric(name: str, value: Any) -> str:
    """A metric value: percentages for 0..1 scores, counts as integers, otherwise 4 significant digits."""
    if value is None:
        return "—"
    if name in PERCENT | {"qa_accuracy", "precision", "recall", "f1"} and _finite(value) and 0 <= value <= 1:
        return fmt("accuracy", value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _sig(value)


def _tick(value: float) -> str:
    return f"{value:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"
