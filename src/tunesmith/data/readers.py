"""Readers: JSONL (or a JSON array), CSV/TSV, Parquet and saved `datasets` folders, one raw row at a time, with its
line number; and `write_rows`, which writes rows back in any of those formats.

A row that can't be read (malformed JSON, nested too deeply, not an object, the wrong number of CSV cells) comes back
with `error` set instead of being dropped, so the caller can put it in the rejects file. A file that can't be read
as a whole (not UTF-8, a CSV quote that is never closed, empty, a broken Parquet file) is a DataError naming the file
and the line.
"""

from __future__ import annotations

import base64
import csv
import datetime
import decimal
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}
MAX_DEPTH = 100  # JSON nested deeper than this is a reject (Python's own parser gives out near 1,000)
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def utf8_hint(path: Path, encoding: str = "cp1252") -> str:
    """How to re-encode `path` as UTF-8."""
    fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (f"re-encode the file as UTF-8, e.g. `iconv -f {encoding} -t utf-8 {path} > {fixed}` (or save it as UTF-8 "
            "from your editor or spreadsheet; in pandas, `to_csv(path, encoding='utf-8')`)")


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
    reader = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "datasets": _datasets}[kind]
    return _some_rows(path, _readable(path, reader))


def _readable(path: Path, reader) -> Iterator[RawRow]:
    try:
        yield from reader(path)
    except OSError as exc:  # permission denied, a device that fails, ...
        raise DataError(f"{path}: can't be read ({exc.strerror or exc})", "check the file's permissions") from None


def _some_rows(path: Path, rows: Iterator[RawRow]) -> Iterator[RawRow]:
    """The rows, and a DataError at the end when there were none at all."""
    count = 0
    for row in rows:
        count += 1
        yield row
    if count == 0:
        raise DataError(f"{path}: no rows (the file is empty)", "give a file with one row per line (JSONL), "
                        "a header and rows (CSV), or a non-empty Parquet file")


# ----------------------------------------------------------------------------------------------- text and JSON


def decode_utf8(data: bytes, path: Path, offset: int = 0, line: int = 1) -> str:
    """`data` (bytes of `path` starting at byte `offset`, on `line`) as text; a DataError naming the line, the
    column and the byte offset when it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line += data.count(b"\n", 0, exc.start)
        column = len(data[start:exc.start].decode("utf-8", "replace")) + 1
        at = offset + exc.start
        if offset == 0 and data.startswith(UTF16_BOMS):
            raise DataError(f"{path}: is UTF-16 text (it starts with a UTF-16 byte order mark), not UTF-8",
                            utf8_hint(path, "utf-16")) from None
        raise DataError(f"{path}: line {line}, column {column} is not UTF-8 (byte 0x{data[exc.start]:02x} at byte "
                        f"offset {at} of the file)", utf8_hint(path)) from None


def read_text(path: str | Path) -> str:
    """The whole file as text (a UTF-8 byte order mark dropped); a DataError naming the line when it isn't UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: can't be read ({exc.strerror or exc})",
                        "check the path and its permissions") from None
    return decode_utf8(data, path).removeprefix("\ufeff")


_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')


def nesting_depth(text: str) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings don't count)."""
    depth = peak = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            peak = max(peak, depth)
        elif token in "]}":
            depth -= 1
    return peak


def parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None) for a JSON text, or (None, why it can't be read): malformed, or nested too deeply."""
    if text.count("[") + text.count("{") > MAX_DEPTH:  # a cheap bound first: most rows never need the scan
        depth = nesting_depth(text)
        if depth > MAX_DEPTH:
            return None, f"nested too deeply: {depth} levels of arrays/objects, more than {MAX_DEPTH}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
        return None, f"malformed JSON: {exc.msg.removesuffix(' at')} at {where}"
    except RecursionError:  # the scan above keeps this from happening; kept as a last guard
        return None, f"nested too deeply: more than {MAX_DEPTH} levels of arrays/objects"


def _row(number: int, text: str) -> RawRow:
    value, error = parse_json(text)
    if error is None and not isinstance(value, dict):
        error = f"not a JSON object: got {type(value).__name__}"
    return RawRow(number, None, error, text) if error else RawRow(number, value)


def _jsonl(path: Path) -> Iterator[RawRow]:
    if path.suffix.lower() == ".json":
        text = read_text(path)
        if text.lstrip().startswith("["):
            yield from _json_array(path, text)
            return
        _refuse_one_object(path, text)
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            text = decode_utf8(raw, path, offset, number)
            offset += len(raw)
            if number == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue  # blank lines are layout, not rows
            yield _row(number, text.rstrip("\r\n"))


def _refuse_one_object(path: Path, text: str) -> None:
    """A .json file holding one object written over several lines is not rows: say so instead of N rejects."""
    if len([line for line in text.splitlines() if line.strip()]) < 2:
        return
    value, error = parse_json(text)
    if error is None and isinstance(value, dict):
        inner = [k for k, v in value.items() if isinstance(v, list)]
        raise DataError(f"{path}: one JSON object over several lines, not one row per line",
                        "write one JSON object per line (JSONL), or a JSON array of row objects"
                        + (f" (e.g. the list under {inner[0]!r})" if inner else ""))


def _json_array(path: Path, text: str) -> Iterator[RawRow]:
    """The objects of a JSON array file, each numbered by the line it starts on."""
    decoder, pos, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def line_at(at: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, at)
        counted = at
        return line

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        number = line_at(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}, column {exc.colno}: malformed JSON in the array "
                            f"({exc.msg})", "fix that line; a JSON array file must parse as a whole") from None
        except RecursionError:  # too deep for Python's parser: find where it ends, and reject it below
            value, end = None, _value_end(text, pos)
            if end is None:
                raise DataError(f"{path}: line {number}: a value nested too deeply that never closes",
                                "a JSON array file must parse as a whole") from None
        item = text[pos:end]
        depth = nesting_depth(item) if item.count("[") + item.count("{") > MAX_DEPTH else 0
        if depth > MAX_DEPTH:
            yield RawRow(number, None, f"nested too deeply: {depth} levels of arrays/objects, more than {MAX_DEPTH}",
                         item[:1000])
        elif not isinstance(value, dict):
            yield RawRow(number, None, f"not a JSON object: got {type(value).__name__}", item)
        else:
            yield RawRow(number, value)
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[pos + 1:].strip():
            return
        raise DataError(f"{path}: line {line_at(pos)}: expected ',' or the closing ']' of the array",
                        "a JSON array file must parse as a whole; or write one object per line (JSONL)")


def _value_end(text: str, pos: int) -> int | None:
    """Where the array or object starting at `pos` ends (just past its closing bracket), or None."""
    depth = 0
    for match in _TOKENS.finditer(text, pos):
        token = match.group()
        depth += 1 if token in "[{" else -1 if token in "]}" else 0
        if depth == 0:
            return match.end()
    return None


# ----------------------------------------------------------------------------------------------- CSV


def _csv(path: Path) -> Iterator[RawRow]:
    text = read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # no cell is too big to read
    pending: list[str] = []  # the lines of the row being read
    ended = []  # set once the reader asked for a line past the end: only a quote left open does that

    def lines() -> Iterator[str]:
        for item in io.StringIO(text, newline=""):
            pending.append(item)
            yield item
        ended.append(True)

    reader = csv.reader(lines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    _check_closed(path, ended, 1, header, reader.line_num)
    if len(set(header)) != len(header):
        twice = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{path}: line 1 (the header) names column {twice[0]!r} twice",
                        "give every column its own name")
    pending.clear()
    start, rows = 1, 0
    for cells in reader:
        line, start = start + 1, reader.line_num
        raw_text = "".join(pending).rstrip("\r\n")
        pending.clear()
        _check_closed(path, ended, line, cells, start)
        if not cells or all(not c.strip() for c in cells):
            continue
        rows += 1
        if len(cells) != len(header):
            spans = f"; the row runs over lines {line}–{start}: is a quote on line {line} left open?" \
                if start > line else ""
            yield RawRow(line, None, f"wrong cell count: {len(cells)} cells, but the header has {len(header)}"
                         + spans, raw_text)
            continue
        yield RawRow(line, dict(zip(header, cells)))
    if rows == 0:
        raise DataError(f"{path}: only a header (line 1), no rows", "add rows below the header")


def _check_closed(path: Path, ended: list, line: int, cells: list[str], last_line: int) -> None:
    """A row the reader finished only at the end of the file has a quote that never closes: name its line."""
    if not ended:
        return
    opened = line + sum(len(re.findall(r"\r\n|\r|\n", cell)) for cell in cells[:-1])
    raise DataError(f"{path}: line {opened}: a quote opens here and is never closed, so lines {opened}–{last_line} "
                    "(the rest of the file) would be read as one cell",
                    "close the quote on that line (a quote inside a quoted cell is written twice: \"\"), "
                    "or save the file again from a spreadsheet")


# ----------------------------------------------------------------------------------------------- Parquet, datasets


def _parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({exc})", "re-export the file") from None
    for number, row in enumerate(rows, start=1):
        yield RawRow(number, row)


def _datasets(path: Path) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: not a readable saved `datasets` folder ({type(exc).__name__}: {exc})",
                        "save it again with Dataset.save_to_disk, or export it to JSONL / Parquet") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict with splits {list(ds)} and no 'train'",
                            f"point at one split's folder, e.g. {path}/{next(iter(ds))}")
        ds = ds["train"]
    for number, row in enumerate(ds, start=1):
        yield RawRow(number, dict(row))


def source_schema(path: str | Path):
    """The Arrow schema of a Parquet file or saved `datasets` folder (so rows written back keep their exact types),
    else None."""
    path = Path(path)
    try:
        kind = file_kind(path)
    except DataError:
        return None
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path)
    if kind == "datasets" and not (path / "dataset_dict.json").exists():
        from datasets import load_from_disk

        return load_from_disk(str(path)).data.schema
    return None


# ----------------------------------------------------------------------------------------------- writing


def json_value(value: Any) -> Any:
    """A JSON stand-in for what JSON can't hold: dates and times as ISO 8601 text, decimals as exact text, bytes as
    base64, durations as seconds; anything else as its text."""
    if isinstance(value, (datetime.date, datetime.time)) or hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return str(value)


def to_json(value: Any) -> str:
    """One JSON line for a row (see `json_value` for dates, decimals and bytes)."""
    return json.dumps(value, ensure_ascii=False, default=json_value)


def write_rows(rows: list[dict[str, Any]], path: str | Path, schema=None) -> Path:
    """Write rows to a JSONL, CSV/TSV or Parquet file (by its suffix), through a temporary renamed into place.

    `schema` (see `source_schema`) keeps a Parquet file's column types exact: timestamps, dates, decimals, binary.
    """
    from tunesmith.artifacts import atomic_path

    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: can't write {path.suffix!r} files", "name the output .jsonl, .csv or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if kind == "jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(to_json(row) + "\n")
        elif kind == "csv":
            columns = list(dict.fromkeys(k for row in rows for k in row))
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writer = csv.DictWriter(fh, columns, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: _cell(v) for k, v in row.items()})
        else:
            import pyarrow.parquet as pq

            pq.write_table(_table(rows, schema), tmp)
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (int, float, bool)) or isinstance(value, (list, dict)):
        return to_json(value)
    return json_value(value)


def _table(rows: list[dict[str, Any]], schema):
    """An Arrow table of the rows: the columns `schema` knows keep their types; new columns are inferred."""
    import pyarrow as pa

    if schema is None:
        return pa.Table.from_pylist(rows)
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in schema.names))
    table = pa.Table.from_pylist(rows, schema=schema)
    if extra:
        added = pa.Table.from_pylist([{k: row.get(k) for k in extra} for row in rows])
        for name in extra:
            table = table.append_column(added.schema.field(name), added.column(name))
    return table
