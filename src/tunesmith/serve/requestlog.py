"""The request log: one SQLite row per served request, and users' feedback beside it (RUN/serve/requests.sqlite).

`tunesmith serve` writes a row when it answers (or refuses) a request; `tunesmith monitor` and `tunesmith data
from-log` read the file. The database is in WAL mode with synchronous=FULL and each row is committed on its own,
so a `kill -9` of the server loses no request that was answered. Prompts and answers are kept only with
`log_content=True`, and then with personal data (emails, phone numbers, cards, IBANs, IPs, secrets) replaced by
the data check's placeholders ([EMAIL], [PHONE], …).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

__all__ = ["COLUMNS", "DEFAULT_NAME", "RequestLog", "mask_content", "read_feedback", "read_requests"]

DEFAULT_NAME = "serve/requests.sqlite"  # inside the run folder
COLUMNS = {  # column -> SQL type, in table order
    "id": "TEXT PRIMARY KEY", "time": "REAL", "endpoint": "TEXT", "model": "TEXT", "run": "TEXT",
    "status": "INTEGER", "error_code": "TEXT", "finish_reason": "TEXT",
    "queue_s": "REAL", "ttft_s": "REAL", "e2e_s": "REAL", "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER",
    "input_chars": "INTEGER", "prompt": "TEXT", "answer": "TEXT", "prediction": "TEXT",
}
CONTENT = ("prompt", "answer")  # kept only with log_content, masked
JSON_COLUMNS = ("prompt", "prediction")  # stored as JSON text, read back as objects
SCHEMA = (f"CREATE TABLE IF NOT EXISTS requests ({', '.join(f'{k} {v}' for k, v in COLUMNS.items())});"
          "CREATE TABLE IF NOT EXISTS feedback (request_id TEXT, time REAL, rating TEXT, correction TEXT);"
          "CREATE INDEX IF NOT EXISTS requests_time ON requests(time);"
          "CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);")
RATINGS = ("up", "down")


def mask_content(text: str) -> str:
    """`text` with personal data replaced by the data check's placeholders ([EMAIL], [PHONE], [CARD], …)."""
    from tunesmith.data.quality import redact_pii

    return redact_pii(text)[0]


def _mask(value: Any) -> Any:
    """Every string inside a JSON-like value masked (chat messages, lists of texts, plain text)."""
    if isinstance(value, str):
        return mask_content(value)
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    return value


class RequestLog:
    """Appends request rows and feedback to a SQLite file; safe to call from any thread."""

    def __init__(self, path: str | Path, log_content: bool = False):
        self.path = Path(path)
        self.log_content = log_content
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # each commit reaches the disk before record() returns
            self._conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise TunesmithError(f"{self.path}: can't be used as a request log ({exc})",
                                 "give a new file, or a request log tunesmith wrote") from None

    def record(self, row: dict[str, Any]) -> None:
        """Append one request (keys of COLUMNS; missing ones are NULL) and commit it before returning.

        `prompt` is the request's input as an object (chat messages, a list of texts, or a text) and `answer` the
        answer text: both are dropped without `log_content` and masked with it. `prediction` (classify: a list of
        {"label", "probability"} per input) is always kept."""
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"request log: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
        values = dict(row)
        values.setdefault("time", time.time())
        for key in CONTENT:
            values[key] = _mask(values.get(key)) if self.log_content else None
        for key in JSON_COLUMNS:
            if values.get(key) is not None:
                values[key] = json.dumps(values[key], ensure_ascii=False)
        sql = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self._lock:
            self._conn.execute(sql, [values.get(k) for k in COLUMNS])

    def feedback(self, request_id: str, rating: str | None, correction: str | None = None) -> bool:
        """Store a rating ("up" | "down") and/or a correction for a logged request; False when the id is unknown.

        A correction is content: it is masked like prompts and answers (and kept even without log_content, since
        the user sent it to be kept)."""
        if rating is not None and rating not in RATINGS:
            raise ValueError(f"rating must be one of {', '.join(RATINGS)}, not {rating!r}")
        with self._lock:
            if self._conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is None:
                return False
            self._conn.execute("INSERT INTO feedback VALUES (?, ?, ?, ?)", (
                request_id, time.time(), rating, None if correction is None else mask_content(correction)))
        return True

    def close(self) -> None:
        """Close the connection (every row is already on disk)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _connect_read_only(path: str | Path) -> sqlite3.Connection:
    """A connection that only reads (query_only); a TunesmithError naming the file when it is missing or is not
    a request log."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TunesmithError(f"{path}: no such request log" if not path.exists() else f"{path}: not a file",
                             "give the SQLite file `tunesmith serve` writes (RUN/serve/requests.sqlite)")
    # mode=rw (never creates the file; read-only media open read-only) rather than mode=ro: as the last connection,
    # it removes the -wal and -shm files SQLite makes beside the log, where a read-only one would leave them
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)
    try:
        conn.execute("PRAGMA query_only = 1")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "requests" not in tables:
            raise TunesmithError(f"{path}: a SQLite file without a `requests` table — not a request log",
                                 "give the SQLite file `tunesmith serve` writes (RUN/serve/requests.sqlite)")
        missing = sorted(set(COLUMNS) - {r[1] for r in conn.execute("PRAGMA table_info(requests)")})
        if missing:
            raise TunesmithError(f"{path}: the requests table lacks column(s) {', '.join(missing)}",
                                 "give a request log written by this version of `tunesmith serve`")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise TunesmithError(f"{path}: not a SQLite request log ({exc})",
                             "give the SQLite file `tunesmith serve` writes (RUN/serve/requests.sqlite)") from None
    except TunesmithError:
        conn.close()
        raise
    return conn


def read_requests(path: str | Path, since: float | None = None) -> list[dict[str, Any]]:
    """Every logged request (received at or after `since`, unix seconds), oldest first; `prompt` and
    `prediction` decoded from JSON."""
    conn = _connect_read_only(path)
    try:
        cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM requests WHERE time >= ? ORDER BY time, rowid",
                              (float("-inf") if since is None else since,))
        rows = [dict(zip(COLUMNS, values)) for values in cursor]
    except sqlite3.DatabaseError as exc:
        raise TunesmithError(f"{path}: can't be read ({exc})", "the request log is damaged") from None
    finally:
        conn.close()
    for row in rows:
        for key in JSON_COLUMNS:
            if row[key] is not None:
                try:
                    row[key] = json.loads(row[key])
                except ValueError:
                    raise TunesmithError(f"{path}: request {row['id']}: `{key}` is not JSON",
                                         "the request log is damaged") from None
    return rows


def read_feedback(path: str | Path) -> list[dict[str, Any]]:
    """Every feedback row (request_id, time, rating, correction), oldest first."""
    conn = _connect_read_only(path)
    try:
        cursor = conn.execute("SELECT request_id, time, rating, correction FROM feedback ORDER BY time, rowid")
        return [dict(zip(("request_id", "time", "rating", "correction"), values)) for values in cursor]
    except sqlite3.DatabaseError as exc:
        raise TunesmithError(f"{path}: can't be read ({exc})", "the request log is damaged") from None
    finally:
        conn.close()
