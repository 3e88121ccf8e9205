"""`tunesmith data balance`: report label imbalance and fix it by down-sampling, up-sampling or class weights.

Up-sampled copies carry `"upsampled": {"from": "FILE:LINE"}`, so the data check doesn't count them as accidental
duplicates and a split keeps each copy with its original. Class weights are a JSON file `{label: weight}` that
`data.class_weights` hands to training, where each row's loss is multiplied by its label's weight.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tunesmith.data.records import Record
from tunesmith.errors import DataError

STRATEGIES = ("report", "down", "up", "weights")


def label_counts(records: list[Record]) -> Counter:
    """Rows per label; DataError if the records aren't classification rows."""
    if not records or records[0].kind != "classification":
        kind = records[0].kind if records else "no"
        raise DataError(f"balancing needs classification rows (text + label); got {kind} rows",
                        "set --format classification and map the columns with --column text=... --column label=...")
    return Counter(r.data["label"] for r in records)


def imbalance(records: list[Record]) -> dict[str, Any]:
    """Counts, shares and the imbalance ratio (largest / smallest class)."""
    counts = label_counts(records)
    total = sum(counts.values())
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"rows": total, "classes": len(counts), "counts": ordered,
            "shares": {k: round(v / total, 4) for k, v in ordered.items()},
            "imbalance_ratio": round(max(counts.values()) / min(counts.values()), 3)}


def class_weights(records: list[Record]) -> dict[str, float]:
    """Inverse-frequency weights, `rows / (classes × rows of the label)`: the mean weight per row is 1."""
    counts = label_counts(records)
    total, k = sum(counts.values()), len(counts)
    return {label: round(total / (k * n), 6) for label, n in sorted(counts.items())}


def downsample(records: list[Record], seed: int, per_class: int | None = None) -> list[Record]:
    """Keep at most `per_class` rows of each label (default: the smallest class's count), in input order."""
    counts = label_counts(records)
    cap = per_class or min(counts.values())
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_label[r.data["label"]].append(i)
    keep: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        keep.update(random.Random(f"{seed}:{label}").sample(idx, min(cap, len(idx))))
    return [r for i, r in enumerate(records) if i in keep]


def upsample(records: list[Record], seed: int, per_class: int | None = None) -> list[dict[str, Any]]:
    """Rows to append so each label has `per_class` rows (default: the largest class's count), marked upsampled.

    Copies cycle through a label's rows in a seeded order, so each original is copied at most once more than
    any other.
    """
    counts = label_counts(records)
    target = per_class or max(counts.values())
    by_label: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_label[r.data["label"]].append(r)
    extra = []
    for label in sorted(by_label):
        rows = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(rows)
        for n in range(max(target - len(rows), 0)):
            original = rows[n % len(rows)]
            extra.append({**(original.raw or original.data), "upsampled": {"from": f"{original.source}:{original.line}"}})
    return extra


def load_class_weights(value: str, records: list[Record]) -> dict[str, float]:
    """`auto` (computed from `records`) or a JSON file of `{label: weight}` that covers every label."""
    if value == "auto":
        return class_weights(records)
    from tunesmith.data.readers import parse_json, read_text

    path = Path(value)
    weights, error = parse_json(read_text(path))
    if error is not None:
        raise DataError(f"{path}: can't read class weights ({error})",
                        "write them with `tunesmith data balance DATA --strategy weights --out FILE`")
    weights = weights.get("weights", weights) if isinstance(weights, dict) else weights
    if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in weights.values()):
        raise DataError(f"{path}: class weights must be a JSON object of label → positive number")
    missing = sorted(set(label_counts(records)) - set(weights))
    if missing:
        raise DataError(f"{path}: no weight for labels {', '.join(missing)}",
                        "recompute the weights on this data with `tunesmith data balance`")
    return {k: float(v) for k, v in weights.items()}
