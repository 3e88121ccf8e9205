"""Deterministic, leak-free splits: stratified by label, and duplicates kept together.

Rows that are exact or near duplicates of each other (by what the model is asked: `record_text(..., "prompt")`),
and augmented rows with the row they were made from, form one group, and a group goes to one split whole, so no
split can hold a near copy of another's row. Groups are shuffled by a seed after ordering them by content, so the
same rows give the same split whatever their order in the file.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from tunesmith.data.readers import source_schema, write_rows
from tunesmith.data.records import Record, record_text
from tunesmith.errors import DataError


def duplicate_groups(records: list[Record], threshold: float = 0.8) -> list[list[int]]:
    """Indices of records that must stay together: near/exact-duplicate clusters plus augmented-from links."""
    from tunesmith.data.dedup import find_duplicates

    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    found = find_duplicates([record_text(r.kind, r.data, "prompt") for r in records], threshold=threshold)
    for cluster in found.clusters:
        for member in cluster[1:]:
            union(cluster[0], member)
    at = {f"{r.source}:{r.line}": i for i, r in enumerate(records)}
    line_only = {str(r.line): i for i, r in enumerate(records)}
    for i, r in enumerate(records):
        origin = (r.raw or {}).get("augmented") or (r.raw or {}).get("upsampled")
        source = origin.get("from") if isinstance(origin, dict) else None
        if isinstance(source, str):
            j = at.get(source, line_only.get(source.rsplit(":", 1)[-1]))
            if j is not None:
                union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(records)):
        groups[find(i)].append(i)
    return list(groups.values())


def split_records(records: list[Record], fractions: dict[str, float], seed: int,
                  threshold: float = 0.8) -> dict[str, list[Record]]:
    """Split into named parts; the first name takes the remainder, the others `round(fraction × rows)` per label.

    Each part keeps the input order. A label with at least two groups gives every other part at least one row
    when its fraction is above zero.
    """
    names = list(fractions)
    if abs(sum(fractions.values()) - 1.0) > 1e-6 or any(f < 0 for f in fractions.values()):
        raise DataError(f"split fractions {fractions} must be non-negative and add up to 1",
                        "e.g. --fractions 0.8,0.1,0.1")
    parts: dict[str, list[int]] = {name: [] for name in names}
    strata: dict[str, list[list[int]]] = defaultdict(list)
    for group in duplicate_groups(records, threshold):
        strata[_stratum(records, group)].append(group)
    for key in sorted(strata):
        groups = sorted(strata[key], key=lambda g: _content_key(records, g))
        random.Random(f"{seed}:{key}").shuffle(groups)
        size = sum(len(g) for g in groups)
        targets = {}
        for name in names[1:]:
            n = round(size * fractions[name])
            if n == 0 and fractions[name] > 0 and len(groups) >= len(names):
                n = 1
            targets[name] = n
        filled = dict.fromkeys(names[1:], 0)
        for group in groups:
            home = next((n for n in names[1:] if filled[n] + len(group) <= targets[n]), names[0])
            if home != names[0]:
                filled[home] += len(group)
            parts[home].extend(group)
    return {name: [records[i] for i in sorted(idx)] for name, idx in parts.items()}


def _stratum(records: list[Record], group: list[int]) -> str:
    """The label a group is stratified under (its most common label; '' for unlabelled data)."""
    labels = [records[i].data.get("label", "") for i in group if records[i].kind == "classification"]
    return max(sorted(set(labels)), key=labels.count) if labels else ""


def _content_key(records: list[Record], group: list[int]) -> str:
    texts = sorted(repr(sorted(records[i].data.items())) for i in group)
    return hashlib.sha1("\x00".join(texts).encode("utf-8")).hexdigest()


def write_splits(parts: dict[str, list[Record]], source: str | Path, folder: Path,
                 rejects: list[dict[str, Any]] = ()) -> dict[str, Path]:
    """Write each part's rows as read (every column) to FOLDER/NAME.jsonl — NAME.parquet, with the input's exact
    column types, when the input is Parquet or a saved `datasets` folder — and the rejects to FOLDER/rejects.jsonl
    when there are any. Returns the path per part name (and `rejects`)."""
    if rejects and "rejects" in parts:
        raise DataError("a split named 'rejects' would share rejects.jsonl with the rows that can't be read",
                        "give the split another name")
    schema = source_schema(source)
    suffix = ".parquet" if schema is not None else ".jsonl"
    paths = {name: write_rows([r.raw for r in rows], folder / f"{name}{suffix}", schema=schema)
             for name, rows in parts.items()}
    if rejects:
        paths["rejects"] = write_rows(list(rejects), folder / "rejects.jsonl")
    return paths
