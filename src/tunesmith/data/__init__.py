"""Data: read the recipe's files into canonical records, reject what can't be used, split off validation."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.records import FIELDS, LoadResult, Record, load_records, write_rejects
from tunesmith.errors import DataError

__all__ = ["FIELDS", "LoadResult", "PreparedData", "Record", "check_reject_share", "load_records", "prepare_data", "validation_split",
           "write_rejects", "file_sha256"]


@dataclass
class PreparedData:
    """Training and validation records with everything needed to account for every input row."""

    kind: str
    train: list[Record]
    validation: list[Record]
    loads: list[LoadResult]
    labels: list[str] | None
    validation_source: str  # "file" or "split"

    @property
    def rejects(self) -> list[dict[str, Any]]:
        return [r for load in self.loads for r in load.rejects]

    def counts(self) -> dict[str, Any]:
        """Rows read, used and rejected per file, for printing and for the manifest."""
        return {
            "files": {load.path: {"read": load.rows_read, "used": len(load.records), "rejected": len(load.rejects),
                                  "reasons": dict(load.reasons())} for load in self.loads},
            "train_rows": len(self.train), "validation_rows": len(self.validation),
            "validation_source": self.validation_source, "kind": self.kind,
        }


def prepare_data(data, seed: int, allowed_kinds: tuple[str, ...] | None = None) -> PreparedData:
    """Load `data.train` (and `data.validation`), check the reject share, and split when needed."""
    train = load_records(data.train, data.format, data.columns, data.labels)
    if allowed_kinds and train.kind not in allowed_kinds:
        raise DataError(f"{data.train}: holds {train.kind} records, which this method can't train on",
                        f"use {', '.join(allowed_kinds)} data, or set `data.format` if the guess is wrong")
    labels = data.labels
    if train.kind == "classification" and labels is None:
        labels = sorted({r.data["label"] for r in train.records})
    loads = [train]
    if data.validation:
        val = load_records(data.validation, train.kind, data.columns, labels)
        loads.append(val)
        train_rows, val_rows, source = train.records, val.records, "file"
    else:
        train_rows, val_rows = validation_split(train.records, data.validation_fraction, seed,
                                                data.check.near_threshold)
        source = "split"
    return PreparedData(train.kind, train_rows, val_rows, loads, labels, source)


def check_reject_share(prepared: PreparedData, max_fraction: float, later_rejects: list[dict[str, Any]] = ()) -> None:
    """Raise DataError when a file's share of rejected rows is above `max_fraction`. `later_rejects` are rows
    rejected after reading (e.g. nothing left to train on after truncation); they count against their file too."""
    later: dict[str, list[dict[str, Any]]] = {}
    for reject in later_rejects:
        later.setdefault(str(reject.get("file")), []).append(reject)
    for load in prepared.loads:
        rejects = load.rejects + later.get(load.path, [])
        share = len(rejects) / max(load.rows_read, 1)
        if share > max_fraction:
            reasons = Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects)
            listed = ", ".join(f"{k} ×{v}" for k, v in reasons.most_common())
            raise DataError(
                f"{load.path}: {len(rejects)} of {load.rows_read} rows rejected ({share:.1%}), above "
                f"`data.max_reject_fraction` = {max_fraction:.1%} ({listed})",
                "see rejects.jsonl for each row's line and reason; fix the file, or raise data.max_reject_fraction")
    if not prepared.train:
        raise DataError(f"{prepared.loads[0].path}: no usable training rows",
                        "see rejects.jsonl for why each row was rejected")


def validation_split(records: list[Record], fraction: float, seed: int,
                     threshold: float = 0.8) -> tuple[list[Record], list[Record]]:
    """Deterministically hold out `fraction` of the records; per label for classification (stratified).

    Exact and near duplicates land on the same side (see data/split.py), so the split itself can't leak a row
    into validation.
    """
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    from tunesmith.data.split import split_records

    parts = split_records(records, {"train": 1 - fraction, "validation": fraction}, seed, threshold)
    return parts["train"], parts["validation"]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, or of every file in a folder (sorted by name)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        with open(item, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
