"""The terminal table `tunesmith eval` prints: metrics per system, differences with 95% intervals, forgetting."""

from __future__ import annotations

from typing import Any

SHOWN = {
    "classification": ("accuracy", "macro_f1"),
    "generation": ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match"),
    "lm": ("perplexity", "nll_per_token"),
    "preference": ("pairwise_accuracy", "mean_margin"),
}
PERCENT = {"accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "exact_match", "pairwise_accuracy"}  # 0..1 values shown as %


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


def _interval(metric: str, ci: list[float] | None) -> str:
    return "—" if not ci else f"[{fmt(metric, ci[0])}, {fmt(metric, ci[1])}]"


def results_text(results: dict[str, Any]) -> str:
    """Metrics per system, then tuned minus each other system with its paired-bootstrap 95% interval."""
    task, systems = results["task"], results["systems"]
    names = [m for m in SHOWN[task] if any(m in results["metrics"][s] for s in systems)]
    width = max(len(s) for s in systems) + 2
    has_ci = any(f"{m}_ci" in results["metrics"][s] for m in names for s in systems)
    col, first = max(width, 16 if has_ci else 10), max(14, *(len(m) + 2 for m in names))
    lines = [f"{results['rows']} rows of {results['data']} · {results['excluded_leaked']} excluded as leaked",
             f"{'metric':<{first}}" + "".join(f"{s:>{col}}" for s in systems)]
    for m in names:
        lines.append(f"{m:<{first}}" + "".join(f"{fmt(m, results['metrics'][s].get(m)):>{col}}" for s in systems))
        if any(f"{m}_ci" in results["metrics"][s] for s in systems):
            lines.append(f"{'  95% interval':<{first}}" + "".join(
                f"{_interval(m, results['metrics'][s].get(f'{m}_ci')):>{col}}" for s in systems))
    diffs = results.get("differences") or []
    if diffs:
        lines.append("tuned minus … (paired bootstrap, 95% interval):")
        starred = False
        for d in diffs:
            if d["metric"] not in names:
                continue
            sure = "" if d["ci_low"] <= 0 <= d["ci_high"] else "  *"
            starred = starred or bool(sure)
            lines.append(f"  {d['metric']:<12} vs {d['versus']:<10} {fmt_diff(d['metric'], d['diff']):>10}  "
                         f"[{fmt_diff(d['metric'], d['ci_low'])}, {fmt_diff(d['metric'], d['ci_high'])}]{sure}")
        lines.append("  * the interval excludes 0" if starred else "  (every interval includes 0)")
    for other, wl in (results.get("wins_losses") or {}).items():
        lines.append(f"per example vs {other} ({results['primary_metric']}): {wl.get('wins', 0)} wins, "
                     f"{wl.get('losses', 0)} losses, {wl.get('ties', 0)} ties")
    lines.extend(alignment_lines(results.get("alignment")))
    f = results.get("forgetting")
    if f:
        lines.append(f"general-ability set: QA accuracy base {fmt('accuracy', f['base']['qa_accuracy'])} → tuned "
                     f"{fmt('accuracy', f['tuned']['qa_accuracy'])}; perplexity base {f['base']['perplexity']:.2f} → "
                     f"tuned {f['tuned']['perplexity']:.2f} ({100 * f['perplexity_rise']:+.1f}%)"
                     + ("  ⚠ forgetting above the threshold" if f["warning"] else ""))
    return "\n".join(lines)


def alignment_lines(a: dict[str, Any] | None) -> list[str]:
    """The reward model's view: mean reward per system, tuned's win rates, KL to the base, answer length."""
    if not a:
        return []
    lines = [f"reward model {a['reward_model']}:"]
    for name, s in a["systems"].items():
        length = f"  answers {s['answer_tokens_mean']:.1f} tokens" if "answer_tokens_mean" in s else ""
        lines.append(f"  mean reward {name:<10} {s['mean_reward']:+.3f}  [{s['reward_ci'][0]:+.3f}, "
                     f"{s['reward_ci'][1]:+.3f}]{length}")
    for other, w in a["win_rate"].items():
        lines.append(f"  tuned wins vs {other:<10} {100 * w['win_rate']:.1f}%  [{100 * w['ci_low']:.1f}%, "
                     f"{100 * w['ci_high']:.1f}%]  ({w['wins']} wins, {w['losses']} losses, {w['ties']} ties)")
    kl = a.get("kl_to_base")
    if kl:
        lines.append(f"  KL to base on the tuned answers: {kl['kl_per_answer']:.3f} nats per answer, "
                     f"{kl['kl_per_token']:.4f} per token")
    return lines
