"""`tunesmith compare`'s numbers and tables: bootstrap intervals of each arm's metric and of its difference to
zero-shot, the aligned text table and the Markdown one (compare.py runs the arms and gathers their rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from tunesmith.evaluation.bootstrap import paired_bootstrap_means
from tunesmith.evaluation.view import PERCENT

PRIMARY_KEY = {"classification": "accuracy", "generation": "rougeL"}  # the per-example value behind each mean

# ----------------------------------------------------------------------------------------------- intervals


def score(rows: list[dict], task: str, n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """A system's primary metric on its per-example rows with a 95% percentile-bootstrap interval over the rows.

    Accuracy and ROUGE-L are means of per-example values: evaluation/bootstrap.py's paired bootstrap against an
    all-zero system resamples exactly that mean. Perplexity pools tokens, so each resample recomputes
    exp(total nll / total tokens).
    """
    if task == "lm":
        nll, tokens = _columns(rows, "nll"), _columns(rows, "tokens")
        low, high = bootstrap_interval([nll, tokens], _perplexity, n_resamples, seed)
        return {"value": float(_perplexity(nll, tokens)), "ci_low": low, "ci_high": high, "n": len(rows)}
    values = _columns(rows, PRIMARY_KEY[task])
    found = paired_bootstrap_means(values, np.zeros_like(values), n_resamples, seed)
    return {"value": found["a"], "ci_low": found["ci_low"], "ci_high": found["ci_high"], "n": len(rows)}


def paired_difference(rows: list[dict], reference: list[dict], task: str, n_resamples: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """metric(rows) - metric(reference) on the same examples, with its paired 95% bootstrap interval."""
    if task == "lm":
        a, b = [_columns(rows, "nll"), _columns(rows, "tokens")], [_columns(reference, "nll"),
                                                                   _columns(reference, "tokens")]
        low, high = bootstrap_interval(a + b, lambda n1, t1, n2, t2: _perplexity(n1, t1) - _perplexity(n2, t2),
                                       n_resamples, seed)
        return {"diff": float(_perplexity(*a) - _perplexity(*b)), "ci_low": low, "ci_high": high}
    key = PRIMARY_KEY[task]
    found = paired_bootstrap_means(_columns(rows, key), _columns(reference, key), n_resamples, seed)
    return {"diff": found["diff"], "ci_low": found["ci_low"], "ci_high": found["ci_high"]}


def bootstrap_interval(columns: list, stat: Callable, n_resamples: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of `stat` over bootstrap resamples of the rows, every column resampled with the same row
    indices (drawn as evaluation/bootstrap.py draws them). `stat` maps (resamples, rows) arrays to one value per
    resample."""
    columns = [np.asarray(c, dtype=float) for c in columns]
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    per_chunk = max(1, 4_000_000 // n)  # bounded memory for many rows
    values = []
    for start in range(0, n_resamples, per_chunk):
        idx = rng.integers(0, n, size=(min(per_chunk, n_resamples - start), n))
        values.append(stat(*(c[idx] for c in columns)))
    low, high = np.quantile(np.concatenate(values), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _perplexity(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return np.exp(nll.sum(-1) / tokens.sum(-1))


def _columns(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=float)


# ----------------------------------------------------------------------------------------------- the tables


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _value(metric: str, x: float, sign: bool = False) -> str:
    """A metric value (or difference, with `sign`) in the table's unit: % points for 0..1 metrics."""
    return f"{100 * x:{'+' if sign else ''}.1f}" if metric in PERCENT else f"{x:{'+' if sign else ''}.2f}"


def _cells(row: dict, metric: str | None, gpu: bool, zero_shot: bool = True) -> list[str]:
    """A row's table cells (after its name); the difference to zero-shot only when the table has that column."""

    def percent(p: float) -> str:
        return "0%" if p == 0 else f"{p:.2g}%" if p < 1 else f"{p:.1f}%"

    def seconds(s: float | None) -> str:
        return "—" if s is None else f"{s:.2f} s" if s < 10 else f"{s:.0f} s"

    m, d = row.get("metric"), row.get("vs_zero_shot")
    value = f"{_value(metric, m['value'])} [{_value(metric, m['ci_low'])}, {_value(metric, m['ci_high'])}]" if m \
        else "—"
    diff = "—"
    if d:
        sure = " *" if not d["ci_low"] <= 0 <= d["ci_high"] else ""
        diff = (f"{_value(metric, d['diff'], True)} [{_value(metric, d['ci_low'], True)}, "
                f"{_value(metric, d['ci_high'], True)}]{sure}")
    trained = row.get("trainable_params")
    cells = [f"{trained:,}" if trained is not None else "—",
             percent(row["trainable_percent"]) if "trainable_percent" in row else "—",
             _size(row.get("weights_bytes")), _size(row.get("peak_rss_bytes"))]
    if gpu:
        cells.append(_size(row.get("gpu_peak_bytes")))
    return cells + [seconds(row.get("seconds_per_step")), seconds(row.get("total_seconds")), value] + \
        ([diff] if zero_shot else [])


def _has_zero_shot(result: dict) -> bool:
    """Whether any arm has a difference to zero-shot (an encoder such as MiniLM can't answer prompts: none)."""
    return any(r.get("vs_zero_shot") for r in result["arms"])


def _header(result: dict) -> list[str]:
    gpu = any(r.get("gpu_peak_bytes") for r in result["arms"])
    metric = result["metric"] or "metric"
    unit, diff_unit = (" %", " (pt)") if metric in PERCENT else ("", "")
    return (["arm", "trainable params", "%", "weights", "peak RSS"] + (["peak GPU"] if gpu else [])
            + ["s/step", "total", f"{metric}{unit} [95% CI]"]
            + ([f"vs zero-shot{diff_unit} [95% CI]"] if _has_zero_shot(result) else []))


def table_text(result: dict) -> str:
    """The aligned table printed at the end, failed arms with their reason and log."""
    header = _header(result)
    gpu = "peak GPU" in header
    body = [[r["name"], *_cells(r, result["metric"], gpu, _has_zero_shot(result))] for r in result["arms"]]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = []
    if result["rows"]:
        lines.append(f"{result['rows']} rows of {result['data']} · {result['metric']} with 95% bootstrap intervals "
                     f"({result['n_resamples']} resamples); * the difference's interval excludes 0")
    for cells, row in zip([header, *body], [None, *result["arms"]]):
        line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        if row is not None and row.get("status") != "ok":
            stage = "evaluation" if row.get("stage") == "eval" else "training"
            line = (line.rstrip() + f"  FAILED in {stage}: {(row.get('error') or '').splitlines()[0]} "
                    f"(log: {row['log']})")
        lines.append(line.rstrip())
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """compare.md: the table in Markdown with the date, machine and command line, ready for BENCHMARKS.md."""
    header = _header(result)
    gpu = "peak GPU" in header
    t = result["train"]
    budget = (f"max_steps={t['max_steps']}" if t.get("max_steps") else f"epochs={t['epochs']}") + \
        f", batch_size={t['batch_size']}, learning_rate={t['learning_rate']}, seed={t['seed']}"
    lines = [f"### Compare: {Path(result['recipe']).name} ({result['date']})", "",
             f"`{result['command']}`", "",
             f"Machine: {result['machine']}. Every arm: {budget}"
             + (" (except the overrides listed below)." if any(r.get("overrides") for r in result["arms"]) else "."),
             (f"Evaluated on {result['rows']} rows of {result['data']}; {result['metric']} with 95% percentile-"
              f"bootstrap intervals over rows ({result['n_resamples']} resamples)"
              + ("; differences to zero-shot are paired-bootstrap intervals (* excludes 0)."
                 if _has_zero_shot(result) else ".") if result["rows"] else "No arm was evaluated."), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["arms"]:
        cells = [row["name"], *_cells(row, result["metric"], gpu, _has_zero_shot(result))]
        if row.get("status") != "ok":
            cells[-1] = f"failed ({row.get('stage')}): {(row.get('error') or '').splitlines()[0]}"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    for row in result["arms"]:
        if row["kind"] == "trained":
            extra = f"; overrides: {', '.join(row['overrides'])}" if row["overrides"] else ""
            lines.append(f"- `{row['name']}`: {row['settings']}{extra}")
    return "\n".join(lines) + "\n"
