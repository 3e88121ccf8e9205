"""Readers: JSONL, CSV, Parquet and saved `datasets` folders, one raw row at a time, with its line number.

A row that can't be read (malformed JSON, invalid UTF-8, not an object) comes back with `error` set instead of
being dropped, so the caller can put it in the rejects file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class RawRow:
    """One row of a file: its 1-based line (or row) number, and either its value or why it can't be read."""

    line: int
    value: dict[str, Any] | None
    error: str | None = None
    text: str | None = None  # the raw text of an unreadable row, kept for the rejects file


def file_kind(path: Path) -> str:
    """Which reader handles `path`: jsonl, csv, parquet or datasets (a folder saved by `save_to_disk`)."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return "datasets"
        raise DataError(f"{path}: a folder, but not one saved by `datasets` (no dataset_info.json or state.json)",
                        "give a .jsonl, .csv or .parquet file, or a folder written by Dataset.save_to_disk")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}",
                        f"use one of {', '.join(sorted(SUFFIXES))}, or a saved `datasets` folder")
    return kind


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a data file as a RawRow; raise DataError if the file as a whole can't be read."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file", "check the path in `data.train` / `data.validation`")
    kind = file_kind(path)
    return {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "datasets": _datasets}[kind](path)


def _jsonl(path: Path) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(number, None, f"invalid UTF-8: at byte {exc.start}",
                             raw.decode("utf-8", "replace").rstrip("\n"))
                continue
            if number == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue  # blank lines are layout, not rows
            text = text.rstrip("\r\n")
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(number, None, f"malformed JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}",
                             text)
                continue
            if not isinstance(value, dict):
                yield RawRow(number, None, f"not a JSON object: got {type(value).__name__}", text)
                continue
            yield RawRow(number, value)


def _csv(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    if any(_has_bad_bytes(h) for h in header):
        raise DataError(f"{path}: line 1 (the header) is not valid UTF-8", "save the file as UTF-8")
    start = 1
    for cells in reader:
        line, start = start + 1, reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        raw_text = delimiter.join(cells)
        if any(_has_bad_bytes(c) for c in cells):
            yield RawRow(line, None, "invalid UTF-8", raw_text.encode("utf-8", "surrogateescape").decode(
                "utf-8", "replace"))
            continue
        if len(cells) != len(header):
            yield RawRow(line, None, f"wrong cell count: {len(cells)} cells, but the header has {len(header)}",
                         raw_text)
            continue
        yield RawRow(line, dict(zip(header, cells)))


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({exc})", "re-export the file") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield RawRow(number, row)


def _datasets(path: Path) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict with splits {list(ds)} and no 'train'",
                            f"point at one split's folder, e.g. {path}/{next(iter(ds))}")
        ds = ds["train"]
    for number, row in enumerate(ds, start=1):
        yield RawRow(number, dict(row))


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows to a JSONL, CSV/TSV or Parquet file (by its suffix), atomically."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: can't write {path.suffix!r} files", "name the output .jsonl, .csv or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if kind == "jsonl":
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif kind == "csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, columns, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)
                                 for k, v in row.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)
    return path
