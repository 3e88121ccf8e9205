"""The rows a run trained and validated on, kept inside the run folder: every later stage reads them from there.

    RUN/data/train.jsonl        the training records in canonical form, each with its source file and line
    RUN/data/validation.jsonl   the rows held out (a validation file's rows, or the split of train)
    RUN/data/data.json          record kind, labels, where validation came from, and each input file's SHA-256

`tunesmith eval` scores the held-out rows from here and guards against leakage with the training rows from here,
so it never re-reads (or re-splits) the user's files. A stage pointed at one of the run's own input files checks
its hash first and refuses, with both hashes, when the file changed since training (`check_unchanged`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tunesmith.artifacts import atomic_path, atomic_write
from tunesmith.data.records import Record
from tunesmith.errors import DataError, RunError

FOLDER = "data"


@dataclass
class Snapshot:
    """What a run recorded about its data."""

    kind: str
    train: list[Record]
    validation: list[Record]
    labels: list[str] | None
    validation_source: str  # "file" or "split"
    hashes: dict[str, str]  # input file -> SHA-256 at training time


def write_records(path: Path, records: Iterable[Record]) -> None:
    """Canonical records as JSONL (kind, data, source, line), through a temporary renamed into place."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({"kind": r.kind, "data": r.data, "source": r.source, "line": r.line},
                                ensure_ascii=False) + "\n")


def read_records(path: Path) -> list[Record]:
    """The records `write_records` wrote; a damaged file is a RunError naming it and the line."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: can't be read ({exc})", "the run folder is damaged; train the run again") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Record(kind=row["kind"], data=row["data"], source=row["source"], line=row["line"]))
        except (ValueError, KeyError, TypeError):
            raise RunError(f"{path}, line {number}: not a record this run wrote",
                           "the run folder is damaged; train the run again") from None
    return out


def write_snapshot(root: Path, prepared, hashes: dict[str, str]) -> None:
    """Write RUN/data/: the training and validation records and what identifies the files they came from."""
    folder = root / FOLDER
    folder.mkdir(exist_ok=True)
    write_records(folder / "train.jsonl", prepared.train)
    write_records(folder / "validation.jsonl", prepared.validation)
    info = {"kind": prepared.kind, "labels": prepared.labels, "validation_source": prepared.validation_source,
            "train_rows": len(prepared.train), "validation_rows": len(prepared.validation), "hashes": hashes}
    atomic_write(folder / "data.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def has_snapshot(root: Path) -> bool:
    return (Path(root) / FOLDER / "data.json").is_file()


def read_snapshot(root: Path) -> Snapshot:
    """The run's recorded data; a RunError naming the file when it is missing or damaged."""
    folder = Path(root) / FOLDER
    info_path = folder / "data.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        kind, hashes = info["kind"], dict(info["hashes"])
    except FileNotFoundError:
        raise RunError(f"{info_path}: missing — this run folder does not record the rows it trained on",
                       "train the run again with this version of tunesmith") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{info_path}: damaged ({exc})", "train the run again") from None
    snap = Snapshot(kind, read_records(folder / "train.jsonl"), read_records(folder / "validation.jsonl"),
                    info.get("labels"), info.get("validation_source", "split"), hashes)
    for name, rows in (("train", snap.train), ("validation", snap.validation)):
        expected = info.get(f"{name}_rows")
        if expected is not None and expected != len(rows):
            raise RunError(f"{folder / (name + '.jsonl')}: {len(rows)} rows, but the run recorded {expected}",
                           "the run folder is damaged (cut short?); train the run again")
    return snap


def check_unchanged(recorded: dict[str, str], paths: Iterable[str | Path], what: str) -> None:
    """Refuse, with both hashes, when one of `paths` that the run recorded has changed since training."""
    from tunesmith.data import file_sha256

    resolved = {str(Path(k).resolve()): (k, v) for k, v in recorded.items()}
    for path in paths:
        key = str(Path(path).resolve())
        if key not in resolved:
            continue
        name, before = resolved[key]
        if not Path(path).exists():
            raise DataError(f"{name}: {what} reads this file, but it no longer exists (the run recorded "
                            f"sha256 {before[:16]}…)", "restore the file, or start a new run")
        now = file_sha256(path)
        if now != before:
            raise DataError(f"{name}: changed since the run trained on it — sha256 then {before[:16]}…, "
                            f"now {now[:16]}…; {what} would use other rows without saying so",
                            "restore the file as it was, or start a new run (without --resume) on the new data")


def recorded_hashes(root: Path) -> dict[str, str]:
    """The input files' SHA-256 as the run recorded them (RUN/data/data.json, or an older run's manifest)."""
    root = Path(root)
    for path, keys in ((root / FOLDER / "data.json", ("hashes",)), (root / "manifest.json", ("data", "hashes"))):
        try:
            node = json.loads(path.read_text(encoding="utf-8"))
            for key in keys:
                node = node[key]
            return dict(node)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {}


def check_input(root: Path, data: str | Path, what: str) -> None:
    """`check_unchanged` for a file a stage is pointed at, against what run `root` recorded."""
    check_unchanged(recorded_hashes(root), [data], what)
