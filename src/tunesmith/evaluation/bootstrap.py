"""Paired bootstrap comparison of two systems scored on the same examples.

Both systems are resampled with the *same* example indices, so what the interval measures is the difference
a - b with the per-example correlation between the systems kept. The interval is the percentile interval of the
resampled differences. The p-value is two-sided: twice the share of resampled differences on the other side of 0
from the observed difference (a resampled difference of exactly 0 counts as the other side), capped at 1; it is 1
when the observed difference is 0.

Metrics that are means of per-example values (`MeanOf`, and every metric in `metrics.MEAN_METRICS` when called
through `compare_systems`) take a vectorised path, `paired_bootstrap_means`; macro-F1 (`MacroF1`) is recomputed
on each resample from batched confusion matrices; any other callable is called on each resampled list of rows.
Every path draws the same indices for the same (n, n_resamples, seed), so they agree to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from tunesmith.errors import TunesmithError
from tunesmith.evaluation.metrics import MEAN_METRICS, corpus_from_examples, macro_f1, task_metrics

_MAX_CELLS = 4_000_000  # array cells per batch (resample indices, confusion counts): ~32 MB of int64


@dataclass(frozen=True)
class MeanOf:
    """A metric that is the mean of the per-example value `key`; `paired_bootstrap` vectorises it."""

    key: str

    def __call__(self, rows: list[dict]) -> float:
        """The mean of `key` over the rows."""
        return float(np.mean([row[self.key] for row in rows]))


@dataclass(frozen=True)
class MacroF1:
    """Macro-F1 of rows' "gold"/"pred" over `labels` (None: the labels seen); `paired_bootstrap` batches it."""

    labels: tuple[str, ...] | None = None

    def __call__(self, rows: list[dict]) -> float:
        """Macro-F1 (0..1) of the rows."""
        labels = None if self.labels is None else list(self.labels)
        return macro_f1([row["gold"] for row in rows], [row["pred"] for row in rows], labels)


def paired_bootstrap(rows_a: list[dict], rows_b: list[dict], metric_fn: Callable[[list[dict]], float],
                     n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Difference metric(a) - metric(b) between two systems on the same examples, with a bootstrap CI and p-value.

    rows_a[i] and rows_b[i] are the same example scored for each system. Returns {"a", "b", "diff", "ci_low",
    "ci_high", "p_value", "n", "n_resamples"}; the interval is the central 1 - alpha percentile interval.
    A `MeanOf` metric is handed to `paired_bootstrap_means`; a `MacroF1` metric is batched the same way.
    """
    _check_paired(len(rows_a), len(rows_b), n_resamples, alpha)
    if isinstance(metric_fn, MeanOf):
        a, b = _column(rows_a, metric_fn.key), _column(rows_b, metric_fn.key)
        return paired_bootstrap_means(a, b, n_resamples=n_resamples, seed=seed, alpha=alpha)
    if isinstance(metric_fn, MacroF1):
        return _paired_bootstrap_macro_f1(rows_a, rows_b, metric_fn, n_resamples, seed, alpha)
    n = len(rows_a)
    diffs = np.empty(n_resamples)
    done = 0
    for chunk in _index_chunks(n, n_resamples, seed):
        for indices in chunk:
            diffs[done] = metric_fn([rows_a[i] for i in indices]) - metric_fn([rows_b[i] for i in indices])
            done += 1
    return _summary(float(metric_fn(rows_a)), float(metric_fn(rows_b)), diffs, alpha, n)


def paired_bootstrap_means(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict:
    """`paired_bootstrap` for a metric that is the mean of per-example values a[i], b[i], vectorised."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    _check_paired(len(a), len(b), n_resamples, alpha)
    per_example = a - b
    diffs = np.concatenate([per_example[chunk].mean(axis=1)
                            for chunk in _index_chunks(len(a), n_resamples, seed)])
    return _summary(float(a.mean()), float(b.mean()), diffs, alpha, len(a))


def mean_interval(values, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """A percentile bootstrap interval of one system's mean per-example value: {"mean", "ci_low", "ci_high", "n"}."""
    values = np.asarray(values, dtype=float)
    found = paired_bootstrap_means(values, np.zeros_like(values), n_resamples, seed, alpha)
    return {"mean": found["a"], "ci_low": found["ci_low"], "ci_high": found["ci_high"], "n": found["n"]}


def compare_systems(per_example: dict[str, list[dict]], task: str, reference_system: str,
                    metrics: list[str] | None = None, n_resamples: int = 1000, seed: int = 0,
                    labels: list[str] | None = None) -> list[dict]:
    """Paired bootstrap of `reference_system` against every other system, for every metric.

    `per_example` maps a system name to its per-example rows (`metrics.example_rows`), all in the same example
    order. Metrics default to every metric of the task (`metrics.task_metrics`); each is computed as
    `corpus_from_examples` does, macro-F1 over `labels` (default: the labels seen in each resample).
    Returns one dict per (other system, metric): {"metric", "system", "versus", "system_score", "versus_score",
    "diff" (system - versus), "ci_low", "ci_high", "p_value", "n"}.
    """
    names = list(metrics) if metrics is not None else list(task_metrics(task))
    _check_compare(per_example, task, reference_system, names)
    ref_rows = per_example[reference_system]
    results = []
    for other, rows in per_example.items():
        if other == reference_system:
            continue
        _check_same_examples(task, reference_system, ref_rows, other, rows)
        for metric in names:
            found = paired_bootstrap(ref_rows, rows, _metric_fn(task, metric, labels), n_resamples, seed)
            results.append({"metric": metric, "system": reference_system, "versus": other,
                            "system_score": found["a"], "versus_score": found["b"], "diff": found["diff"],
                            "ci_low": found["ci_low"], "ci_high": found["ci_high"],
                            "p_value": found["p_value"], "n": found["n"]})
    return results


def wins_losses(per_example_a: list[dict], per_example_b: list[dict], metric: str) -> dict:
    """How many examples system a scores higher ("wins"), lower ("losses") or equal ("ties") on `metric`."""
    if len(per_example_a) != len(per_example_b):
        raise TunesmithError(f"system a has {len(per_example_a)} rows but system b has {len(per_example_b)}",
                             "score both systems on the same examples, in the same order")
    a, b = _column(per_example_a, metric), _column(per_example_b, metric)
    return {"wins": int((a > b).sum()), "losses": int((a < b).sum()), "ties": int((a == b).sum()), "n": len(a)}


def _column(rows: list[dict], key: str) -> np.ndarray:
    """One per-example value from every row, as floats, with an error naming a row that lacks it."""
    missing = next((i for i, row in enumerate(rows) if key not in row), None)
    if missing is not None:
        raise TunesmithError(f"per-example row {missing} has no {key!r} (it has {sorted(rows[missing])})",
                             "build the rows with metrics.example_rows()")
    return np.array([row[key] for row in rows], dtype=float)


def _metric_fn(task: str, metric: str, labels: list[str] | None) -> Callable[[list[dict]], float]:
    """The bootstrap metric function for one metric: `MeanOf` for mean metrics, `MacroF1`, else a recomputation."""
    if metric in MEAN_METRICS[task]:
        return MeanOf(metric)
    if metric == "macro_f1":
        return MacroF1(None if labels is None else tuple(labels))
    return lambda rows: corpus_from_examples(task, rows, labels)[metric]


def _paired_bootstrap_macro_f1(rows_a: list[dict], rows_b: list[dict], metric: MacroF1, n_resamples: int,
                               seed: int, alpha: float) -> dict:
    """`paired_bootstrap` for macro-F1: each side's (gold, pred) pairs coded once, confusions counted in batches."""
    a, b = metric(rows_a), metric(rows_b)  # also validates the labels
    names = (sorted({row[key] for row in rows_a + rows_b for key in ("gold", "pred")})
             if metric.labels is None else list(metric.labels))
    index = {name: i for i, name in enumerate(names)}
    size = len(names) + 1  # the last code is a prediction outside the labels

    def pair_codes(rows: list[dict]) -> np.ndarray:
        return np.array([index[row["gold"]] * size + index.get(row["pred"], size - 1) for row in rows])

    codes_a, codes_b = pair_codes(rows_a), pair_codes(rows_b)
    per_batch = max(1, _MAX_CELLS // (size * size))
    fixed = metric.labels is not None
    diffs = []
    for chunk in _index_chunks(len(rows_a), n_resamples, seed):
        for start in range(0, len(chunk), per_batch):
            batch = chunk[start:start + per_batch]
            diffs.append(_macro_f1_batch(codes_a[batch], size, fixed) - _macro_f1_batch(codes_b[batch], size, fixed))
    return _summary(a, b, np.concatenate(diffs), alpha, len(rows_a))


def _macro_f1_batch(pair_codes: np.ndarray, size: int, fixed_labels: bool) -> np.ndarray:
    """Macro-F1 of each row of coded (gold * size + pred) pairs; without fixed labels, over the labels seen."""
    resamples = pair_codes.shape[0]
    offsets = np.arange(resamples)[:, None] * (size * size)
    counts = np.bincount((pair_codes + offsets).ravel(), minlength=resamples * size * size)
    confusion = counts.reshape(resamples, size, size)
    k = size - 1
    tp = np.diagonal(confusion, axis1=1, axis2=2)[:, :k].astype(float)
    both = confusion[:, :k, :].sum(axis=2) + confusion[:, :, :k].sum(axis=1)  # support + predicted
    f1 = np.divide(2 * tp, both, out=np.zeros_like(tp), where=both > 0)
    classes = np.full(resamples, k) if fixed_labels else (both > 0).sum(axis=1)
    return f1.sum(axis=1) / classes


def _index_chunks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resample indices (with replacement, seeded) in chunks of rows, so memory stays bounded for large n."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _MAX_CELLS // n)
    for start in range(0, n_resamples, per_chunk):
        yield rng.integers(0, n, size=(min(per_chunk, n_resamples - start), n))


def _summary(a: float, b: float, diffs: np.ndarray, alpha: float, n: int) -> dict:
    """Point estimates, percentile interval and two-sided p-value from the resampled differences."""
    diff = a - b
    ci_low, ci_high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    if diff == 0:
        p_value = 1.0
    else:
        other_side = np.mean(diffs <= 0) if diff > 0 else np.mean(diffs >= 0)
        p_value = min(1.0, 2 * float(other_side))
    return {"a": a, "b": b, "diff": diff, "ci_low": float(ci_low), "ci_high": float(ci_high),
            "p_value": p_value, "n": n, "n_resamples": len(diffs)}


def _check_paired(n_a: int, n_b: int, n_resamples: int, alpha: float) -> None:
    """Raise unless both systems have the same, non-zero number of rows and the settings make sense."""
    if n_a != n_b:
        raise TunesmithError(f"system a has {n_a} rows but system b has {n_b}",
                             "score both systems on the same examples, in the same order")
    if n_a == 0:
        raise TunesmithError("no examples to compare")
    if n_resamples < 1:
        raise TunesmithError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise TunesmithError(f"alpha must be between 0 and 1, got {alpha}", "0.05 gives a 95% interval")


def _check_compare(per_example: dict[str, list[dict]], task: str, reference_system: str, names: list[str]) -> None:
    """Raise on an unknown task, reference system or metric, naming the valid choices."""
    known = task_metrics(task)
    if reference_system not in per_example:
        raise TunesmithError(f"reference system {reference_system!r} has no per-example scores",
                             f"choose one of: {', '.join(per_example)}")
    unknown = [m for m in names if m not in known]
    if unknown:
        raise TunesmithError(f"unknown {task} metrics {unknown}", f"choose from: {', '.join(known)}")


def _check_same_examples(task: str, name_a: str, rows_a: list[dict], name_b: str, rows_b: list[dict]) -> None:
    """Raise unless two systems' rows are the same examples in the same order (same count; same gold labels)."""
    if len(rows_a) != len(rows_b):
        raise TunesmithError(f"{name_a!r} has {len(rows_a)} rows but {name_b!r} has {len(rows_b)}",
                             "score every system on the same examples, in the same order")
    if task != "classification":
        return
    for i, (row_a, row_b) in enumerate(zip(rows_a, rows_b)):
        if row_a.get("gold") != row_b.get("gold"):
            raise TunesmithError(f"example {i}: gold is {row_a.get('gold')!r} for {name_a!r} but "
                                 f"{row_b.get('gold')!r} for {name_b!r}",
                                 "score every system on the same examples, in the same order")
