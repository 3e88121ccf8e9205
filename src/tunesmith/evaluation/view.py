"""The terminal table `tunesmith eval` prints: metrics per system, differences with 95% intervals, forgetting."""

from __future__ import annotations

from typing import Any

SHOWN = {
    "classification": ("accuracy", "macro_f1"),
    "generation": ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match"),
    "lm": ("perplexity", "nll_per_token"),
}
PERCENT = {"accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "exact_match"}  # 0..1 values shown as %


def fmt(metric: str, value: Any) -> str:
    """A metric value as the table shows it: percentages for 0..1 scores, 2 decimals for BLEU/chrF/perplexity."""
    if value is None:
        return "—"
    if metric in PERCENT:
        return f"{100 * value:.1f}%"
    return f"{value:.2f}"


def fmt_diff(metric: str, value: float) -> str:
    """A difference: percentage points for 0..1 scores."""
    return f"{100 * value:+.1f} pt" if metric in PERCENT else f"{value:+.2f}"


def results_text(results: dict[str, Any]) -> str:
    """Metrics per system, then tuned minus each other system with its paired-bootstrap 95% interval."""
    task, systems = results["task"], results["systems"]
    names = [m for m in SHOWN[task] if any(m in results["metrics"][s] for s in systems)]
    width = max(len(s) for s in systems) + 2
    lines = [f"{results['rows']} rows of {results['data']} · {results['excluded_leaked']} excluded as leaked",
             f"{'metric':<14}" + "".join(f"{s:>{max(width, 10)}}" for s in systems)]
    for m in names:
        lines.append(f"{m:<14}" + "".join(f"{fmt(m, results['metrics'][s].get(m)):>{max(width, 10)}}"
                                          for s in systems))
    diffs = results.get("differences") or []
    if diffs:
        lines.append("tuned minus … (paired bootstrap, 95% interval):")
        for d in diffs:
            if d["metric"] not in names:
                continue
            sure = "" if d["ci_low"] <= 0 <= d["ci_high"] else "  *"
            lines.append(f"  {d['metric']:<12} vs {d['versus']:<10} {fmt_diff(d['metric'], d['diff']):>10}  "
                         f"[{fmt_diff(d['metric'], d['ci_low'])}, {fmt_diff(d['metric'], d['ci_high'])}]{sure}")
        lines.append("  * the interval excludes 0")
    for other, wl in (results.get("wins_losses") or {}).items():
        lines.append(f"per example vs {other} ({results['primary_metric']}): {wl.get('wins', 0)} wins, "
                     f"{wl.get('losses', 0)} losses, {wl.get('ties', 0)} ties")
    f = results.get("forgetting")
    if f:
        lines.append(f"general-ability set: QA accuracy base {fmt('accuracy', f['base']['qa_accuracy'])} → tuned "
                     f"{fmt('accuracy', f['tuned']['qa_accuracy'])}; perplexity base {f['base']['perplexity']:.2f} → "
                     f"tuned {f['tuned']['perplexity']:.2f} ({100 * f['perplexity_rise']:+.1f}%)"
                     + ("  ⚠ forgetting above the threshold" if f["warning"] else ""))
    return "\n".join(lines)
