"""Blinded pairwise human review: two systems answer the same prompts, people pick the better answer in a browser.

    prepare_review   answers every prompt with both systems (greedy) into RUN_A/review/<name>.sqlite; resumable
    serve_review     a local page (standard library only, works offline): prompt + "Answer 1 / Answer 2" in a
                     per-item random order, vote 1 / 2 / t, optional comment, progress
    review_results   win rate of system A with a 95% Wilson interval; export_csv, format_results, report_section

The database holds `items` (prompt, both answers, which system is shown on the left) and `votes` (one per reviewer
per item; a repeat vote replaces the earlier one). SQLite runs in WAL mode with a busy timeout, one connection per
request and every write in its own transaction, so reviewers can vote at the same time and stop and come back.
"""

from __future__ import annotations

import csv
import errno
import gc
import hashlib
import hmac
import html
import io
import ipaddress
import json
import math
import random
import re
import secrets
import socket
import sqlite3
import threading
from collections import defaultdict
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from tunesmith.artifacts import atomic_write, open_run
from tunesmith.data.snapshot import check_input
from tunesmith.errors import DataError, RunError

Z95 = 1.959963984540054  # two-sided 95% normal quantile
CHOICES = ("left", "right", "tie")
MAX_COMMENT = 4000
MAX_BODY = 1 << 20  # bytes of one request body (a vote is well under 10 KiB)
MAX_DRAIN = 64 << 20  # bytes of a refused body read and dropped, so the client gets the answer, not a reset
MAX_ID = (1 << 63) - 1  # SQLite's largest INTEGER
TOKEN_HEADER = "X-Tunesmith-Token"  # the page sends back the token it was served with
SURROGATE = re.compile("[\ud800-\udfff]")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, prompt TEXT NOT NULL,
    answer_a TEXT, answer_b TEXT, left_system TEXT NOT NULL CHECK (left_system IN ('a', 'b')),
    source TEXT, line INTEGER);
CREATE TABLE IF NOT EXISTS votes (
    item_id INTEGER NOT NULL REFERENCES items(id), reviewer TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
    comment TEXT NOT NULL DEFAULT '', voted_at TEXT NOT NULL,
    PRIMARY KEY (item_id, reviewer));
"""
COMPLETE = "answer_a IS NOT NULL AND answer_b IS NOT NULL"


class BadVote(ValueError):
    """A request the review server refuses; the message goes back as a JSON error with `status` (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- preparing: prompts in, both answers stored

def review_db_path(run_a: str | Path, run_b: str | Path) -> Path:
    """Where the review of RUN_A against RUN_B (a run folder or "base") lives: RUN_A/review/<name>.sqlite."""
    name = "base" if str(run_b) == "base" else Path(run_b).resolve().name
    return Path(run_a) / "review" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}.sqlite"


def prepare_review(run_a: str | Path, run_b: str | Path, data: str | Path, limit: int | None = None,
                   max_new_tokens: int = 256, seed: int = 0, db_path: Path | None = None, batch_size: int = 8,
                   echo: Callable[[str], None] = print) -> Path:
    """Store every prompt of `data` with RUN_A's and RUN_B's (or the base model's) answers; return the database.

    Items and answers already stored are kept, never regenerated: calling it again only fills in what is missing
    (new prompts, or answers a stopped run did not finish). Which system is shown on the left is drawn per item
    from `seed` and the prompt, so it is the same on every machine and in every resume.
    """
    run = open_run(run_a)  # wrong folders and unusable data fail here, before any model loads
    other = None if str(run_b) == "base" else open_run(run_b)
    for folder in (run, other):
        if folder is not None and Path(data).exists():
            check_input(folder.root, data, "review --data")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    prompts = read_prompts(data, limit)
    names = _system_names(run.root, None if other is None else other.root)
    db_path = Path(db_path) if db_path else review_db_path(run.root, run_b)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"system_a": names[0], "system_b": names[1], "seed": str(seed), "max_new_tokens": str(max_new_tokens)}
    with closing(_connect(db_path, create=True)) as conn:
        _init_db(conn, db_path, settings, {"run_a": str(run.root), "run_b": str(other.root if other else "base")})
        added = _add_items(conn, prompts, seed)
        from tunesmith import generate as gen

        loaders = {"answer_a": (names[0], lambda: gen.load_run(run.root)),
                   "answer_b": (names[1], lambda: gen.load_run(other.root) if other else gen.load_run(run.root,
                                                                                                     base=True))}
        made = sum(_fill_answers(conn, column, name, load, max_new_tokens, batch_size)
                   for column, (name, load) in loaders.items())
        total = conn.execute(f"SELECT COUNT(*) FROM items WHERE {COMPLETE}").fetchone()[0]
    echo(f"review {names[0]} vs {names[1]}: {total} items ({added} new prompts, {made} answers generated) "
         f"in {db_path}")
    return db_path


def read_prompts(data: str | Path, limit: int | None = None) -> list[tuple[str, list[dict[str, str]], str, int]]:
    """(key, chat messages, file, line) for each distinct prompt in a data file, in file order."""
    from tunesmith.data.format import prompt_messages
    from tunesmith.data.records import load_records

    if not Path(data).exists():
        raise DataError(f"{data}: no such data file", "give --data a JSONL / CSV / Parquet file of prompts")
    loaded = load_records(data)
    if loaded.kind == "text":
        raise DataError(f"{data}: plain text rows hold no prompt to answer",
                        "use chat, instruction, classification or preference rows")
    out, seen = [], set()
    for record in loaded.records:
        if record.kind == "preference":
            messages = [{"role": "user", "content": record.data["prompt"]}]
        else:
            messages = prompt_messages(record)
        key = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]
        if key not in seen:
            seen.add(key)
            out.append((key, messages, record.source, record.line))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{data}: no usable prompts ({len(loaded.rejects)} rows rejected)",
                        "`tunesmith data check` shows why each row was rejected")
    return out


def side_for(seed: int, key: str) -> str:
    """Which system ('a' or 'b') an item shows on the left: a fair coin seeded by the seed and the prompt."""
    return "a" if random.Random(f"{seed}:{key}").random() < 0.5 else "b"


def _system_names(root_a: Path, root_b: Path | None) -> tuple[str, str]:
    a = root_a.resolve().name
    b = "base" if root_b is None else root_b.resolve().name
    if a == b:  # two runs in same-named folders: say which parent each one is in
        a, b = (f"{p.resolve().parent.name}/{p.resolve().name}" for p in (root_a, root_b))
    return a, b


def _init_db(conn: sqlite3.Connection, db_path: Path, settings: dict[str, str], info: dict[str, str]) -> None:
    conn.executescript(SCHEMA)
    with _transaction(conn):
        stored = _meta(conn)
        if "system_a" not in stored:
            rows = {**settings, **info, "schema": "1", "created": _now()}
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows.items())
            return
    changed = [f"{k}: stored {stored.get(k)!r}, now {v!r}" for k, v in settings.items() if stored.get(k) != v]
    if changed:
        raise RunError(f"{db_path}: this review was prepared with other settings ({'; '.join(changed)})",
                       "pass the same runs, --seed and --max-new-tokens to continue it, or remove the file to "
                       "start a new review")


def _add_items(conn: sqlite3.Connection, prompts: list, seed: int) -> int:
    with _transaction(conn):
        before = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        conn.executemany("INSERT OR IGNORE INTO items (key, prompt, left_system, source, line) VALUES (?, ?, ?, ?, ?)",
                         [(key, json.dumps(messages, ensure_ascii=False), side_for(seed, key), source, line)
                          for key, messages, source, line in prompts])
        return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] - before


def _fill_answers(conn: sqlite3.Connection, column: str, name: str, load: Callable[[], Any], max_new_tokens: int,
                  batch_size: int) -> int:
    """Generate the missing answers of one system, storing each batch as soon as it is done."""
    from tqdm.auto import tqdm

    from tunesmith import generate as gen

    todo = conn.execute(f"SELECT id, prompt FROM items WHERE {column} IS NULL ORDER BY id").fetchall()
    if not todo:
        return 0
    loaded = load()
    with tqdm(total=len(todo), desc=f"answers from {name}", unit="answer", disable=None) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            answers = gen.generate(loaded, [json.loads(row["prompt"]) for row in chunk],
                                   max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
            with _transaction(conn):
                conn.executemany(f"UPDATE items SET {column} = ? WHERE id = ?",
                                 [(answer, row["id"]) for answer, row in zip(answers, chunk)])
            bar.update(len(chunk))
    del loaded
    gc.collect()
    return len(todo)


# ---------------------------------------------------------------- the database

def _connect(db_path: Path, create: bool = False) -> sqlite3.Connection:
    """A connection of our own (one per request or thread): autocommit, WAL, a 30 s busy timeout."""
    if not create and not Path(db_path).is_file():
        raise RunError(f"{db_path}: no review database",
                       "prepare one with `tunesmith review RUN_A RUN_B|base --data FILE`")
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    if create:
        conn.execute("PRAGMA journal_mode = WAL")  # stays set in the file for every later connection
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so concurrent writers queue instead of failing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def next_item(conn: sqlite3.Connection, reviewer: str, skip: tuple[int, ...] = ()) -> dict[str, Any]:
    """The next item for a reviewer (not yet voted by them, fewest votes first), blinded, and their progress."""
    marks = ",".join("?" * len(skip))
    row = conn.execute(
        f"""SELECT i.id, i.prompt, i.answer_a, i.answer_b, i.left_system, COUNT(v.item_id) AS n
            FROM items i LEFT JOIN votes v ON v.item_id = i.id
            WHERE i.answer_a IS NOT NULL AND i.answer_b IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM votes m WHERE m.item_id = i.id AND m.reviewer = ?)
              {f"AND i.id NOT IN ({marks})" if skip else ""}
            GROUP BY i.id ORDER BY n, i.id LIMIT 1""", (reviewer, *skip)).fetchone()
    item = None
    if row is not None:
        shown = [row["answer_a"], row["answer_b"]] if row["left_system"] == "a" else [row["answer_b"], row["answer_a"]]
        item = {"id": row["id"], "prompt": json.loads(row["prompt"]), "answers": shown}
    return {"item": item, "progress": _progress(conn, reviewer)}


def _progress(conn: sqlite3.Connection, reviewer: str) -> dict[str, int]:
    total = conn.execute(f"SELECT COUNT(*) FROM items WHERE {COMPLETE}").fetchone()[0]
    done = conn.execute("SELECT COUNT(*) FROM votes WHERE reviewer = ?", (reviewer,)).fetchone()[0]
    return {"done": done, "total": total, "votes": conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]}


def record_vote(conn: sqlite3.Connection, payload: Any, default_reviewer: str | None = None) -> dict[str, Any]:
    """Check and store one vote {item_id, choice: left|right|tie, comment, reviewer}; a repeat replaces the last."""
    if not isinstance(payload, dict):
        raise BadVote('the body must be a JSON object like {"item_id": 1, "choice": "left", "reviewer": "ann"}')
    for field in ("reviewer", "choice", "comment", "item_id"):
        if isinstance(payload.get(field), str) and SURROGATE.search(payload[field]):
            raise BadVote(f"{field} is not valid Unicode text: it holds a lone surrogate such as \\ud800")
    reviewer = _reviewer(payload.get("reviewer") or default_reviewer)
    item_id, choice, comment = payload.get("item_id"), payload.get("choice"), payload.get("comment") or ""
    if isinstance(item_id, str) and re.fullmatch(r"[0-9]{1,100}", item_id):
        item_id = int(item_id)
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise BadVote(f"item_id must be a whole number, got {_short(item_id)}")
    if choice not in CHOICES:
        raise BadVote(f"choice must be 'left', 'right' or 'tie', got {_short(choice)}")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise BadVote(f"comment must be text of at most {MAX_COMMENT} characters")
    with _transaction(conn):
        row = None
        if 1 <= item_id <= MAX_ID:  # a larger number can't be an SQLite row id (and overflows its INTEGER)
            row = conn.execute(f"SELECT left_system FROM items WHERE id = ? AND {COMPLETE}", (item_id,)).fetchone()
        if row is None:
            total = conn.execute(f"SELECT COUNT(*) FROM items WHERE {COMPLETE}").fetchone()[0]
            raise BadVote(f"unknown item_id {_short(item_id)}: this review has {total} items")
        left = row["left_system"]
        winner = {"left": left, "right": "b" if left == "a" else "a", "tie": "tie"}[choice]
        conn.execute("""INSERT INTO votes (item_id, reviewer, choice, winner, comment, voted_at)
                        VALUES (?, ?, ?, ?, ?, ?)
                        ON CONFLICT (item_id, reviewer) DO UPDATE SET choice = excluded.choice,
                            winner = excluded.winner, comment = excluded.comment, voted_at = excluded.voted_at""",
                     (item_id, reviewer, choice, winner, comment.strip(), _now()))
    return {"ok": True, "progress": _progress(conn, reviewer)}


def _short(value: Any) -> str:
    """A value for an error message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reviewer(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadVote("say who is reviewing: type your name at the top of the page (reviewer is missing)")
    if len(value.strip()) > 100:
        raise BadVote("reviewer names are at most 100 characters")
    return value.strip()


# ---------------------------------------------------------------- results

def review_results(db_path: Path) -> dict[str, Any]:
    """Vote counts, system A's win rate (ties count half) and its 95% interval, overall and per reviewer.

    The interval is a Wilson score interval over items: each item's votes are averaged first (a=1, tie=½, b=0),
    so an item several people judged weighs as much as one judged once, and n is the number of items voted on.
    With one reviewer this is the textbook Wilson interval for (a_wins + ties/2) out of votes.
    """
    with closing(_connect(db_path)) as conn:
        meta = _meta(conn)
        items = conn.execute(f"SELECT COUNT(*) FROM items WHERE {COMPLETE}").fetchone()[0]
        votes = conn.execute("SELECT item_id, reviewer, winner FROM votes").fetchall()
    per_item: dict[int, list[float]] = defaultdict(list)
    per_reviewer: dict[str, list[str]] = defaultdict(list)
    for vote in votes:
        per_item[vote["item_id"]].append({"a": 1.0, "tie": 0.5, "b": 0.0}[vote["winner"]])
        per_reviewer[vote["reviewer"]].append(vote["winner"])
    scores = [sum(v) / len(v) for v in per_item.values()]
    rate = sum(scores) / len(scores) if scores else None
    low, high = wilson_interval(rate, len(scores)) if scores else (None, None)
    return {"systems": [meta.get("system_a"), meta.get("system_b")], "items": items, "items_voted": len(scores),
            **_counts([v["winner"] for v in votes]), "win_rate_a": rate, "ci_low": low, "ci_high": high,
            "interval": "95% Wilson score interval over items; ties count half",
            "by_reviewer": {name: _counts(w) for name, w in sorted(per_reviewer.items())}}


def _counts(winners: list[str]) -> dict[str, Any]:
    a, b, t = winners.count("a"), winners.count("b"), winners.count("tie")
    return {"votes": len(winners), "a_wins": a, "b_wins": b, "ties": t,
            "win_rate_a": (a + t / 2) / len(winners) if winners else None}


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion `rate` observed over `n` trials."""
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def format_results(results: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, the win rate and its interval, per reviewer."""
    a, b = results["systems"]
    lines = [f"review: {a} (A) vs {b} (B) · {results['items_voted']} of {results['items']} items voted · "
             f"{results['votes']} votes by {len(results['by_reviewer'])} reviewer(s)",
             f"  {'A wins':<10}{results['a_wins']:>6}", f"  {'B wins':<10}{results['b_wins']:>6}",
             f"  {'ties':<10}{results['ties']:>6}"]
    if results["win_rate_a"] is None:
        return "\n".join(lines + ["  no votes yet"])
    lines.append(f"  win rate of {a}: {results['win_rate_a']:.1%} "
                 f"(95% CI {results['ci_low']:.1%} to {results['ci_high']:.1%}; ties count half)")
    lines += [f"  {name}: {c['votes']} votes, A {c['a_wins']} · B {c['b_wins']} · tie {c['ties']}"
              for name, c in results["by_reviewer"].items()]
    return "\n".join(lines)


def reward_agreement(db_path: Path, reward_run: str | Path) -> dict[str, Any]:
    """How often a reward model prefers the answer the reviewers preferred, over items whose votes are not a tie
    (a reward tie counts half); with a 95% Wilson interval. Saved next to the votes for the report."""
    from tunesmith.methods.reward import load_reward_model

    model = load_reward_model(reward_run)
    with closing(_connect(db_path)) as conn:
        rows = conn.execute(
            "SELECT items.prompt, items.answer_a, items.answer_b, AVG(CASE winner WHEN 'a' THEN 1.0 "
            "WHEN 'tie' THEN 0.5 ELSE 0.0 END) AS human FROM votes JOIN items ON items.id = votes.item_id "
            f"WHERE {COMPLETE} GROUP BY items.id HAVING human != 0.5").fetchall()
    prompts = [json.loads(r["prompt"]) for r in rows]
    scores_a = model.score(prompts, [r["answer_a"] for r in rows])
    scores_b = model.score(prompts, [r["answer_b"] for r in rows])
    agree = [0.5 if sa == sb else float((sa > sb) == (r["human"] > 0.5))
             for r, sa, sb in zip(rows, scores_a, scores_b)]
    rate = sum(agree) / len(agree) if agree else None
    low, high = wilson_interval(rate, len(agree)) if agree else (None, None)
    found = {"reward_model": str(reward_run), "items": len(agree), "agreement": rate, "ci_low": low, "ci_high": high,
             "reward_prefers_a": sum(sa > sb for sa, sb in zip(scores_a, scores_b))}
    atomic_write(db_path.with_suffix(".reward.json"), json.dumps(found, indent=2))
    return found


def format_agreement(found: dict[str, Any]) -> str:
    """One line: the reward model's agreement with the reviewers."""
    if found["agreement"] is None:
        return f"reward model {found['reward_model']}: no decided items to compare yet"
    return (f"reward model {found['reward_model']} agrees with the reviewers on {found['agreement']:.1%} of "
            f"{found['items']} decided items (95% CI {found['ci_low']:.1%} to {found['ci_high']:.1%})")


def report_section(db_path: Path) -> str:
    """An HTML fragment (a <div> headed "A vs B") with one review's results, for the run's report section."""
    r = review_results(db_path)
    e = html.escape
    a, b = (e(str(s)) for s in r["systems"])
    rate = "no votes yet" if r["win_rate_a"] is None else \
        f"{r['win_rate_a']:.1%} (95% CI {r['ci_low']:.1%} – {r['ci_high']:.1%}, ties count half)"
    rows = "".join(f"<tr><td>{e(name)}</td><td>{c['votes']}</td><td>{c['a_wins']}</td><td>{c['b_wins']}</td>"
                   f"<td>{c['ties']}</td></tr>" for name, c in r["by_reviewer"].items())
    saved = db_path.with_suffix(".reward.json")
    agreement = f"<p>{e(format_agreement(json.loads(saved.read_text())))}</p>" if saved.exists() else ""
    return (f"<div class='review'><h3>{a} vs {b}</h3>"
            f"<p>{r['items_voted']} of {r['items']} items voted · {r['votes']} votes · win rate of {a}: {rate}</p>"
            f"<table><tr><th>reviewer</th><th>votes</th><th>{a} wins</th><th>{b} wins</th><th>ties</th></tr>"
            f"<tr><td><b>all</b></td><td>{r['votes']}</td><td>{r['a_wins']}</td><td>{r['b_wins']}</td>"
            f"<td>{r['ties']}</td></tr>{rows}</table>{agreement}</div>")


def export_csv(db_path: Path, out: Path) -> Path:
    """Write one row per vote: item, prompt, both answers in the order shown, the winning system, comment, who, when."""
    with closing(_connect(db_path)) as conn:
        text = _csv_text(conn)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    return out


def _csv_text(conn: sqlite3.Connection) -> str:
    meta = _meta(conn)
    names = {"a": meta.get("system_a", "a"), "b": meta.get("system_b", "b"), "tie": "tie"}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["item_id", "prompt", "left_system", "answer_left", "right_system", "answer_right", "choice",
                     "winner", "comment", "reviewer", "voted_at"])
    for row in conn.execute("""SELECT v.*, i.prompt, i.answer_a, i.answer_b, i.left_system FROM votes v
                               JOIN items i ON i.id = v.item_id ORDER BY v.item_id, v.reviewer"""):
        left, right = ("a", "b") if row["left_system"] == "a" else ("b", "a")
        prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in json.loads(row["prompt"]))
        writer.writerow([row["item_id"], prompt, names[left], row[f"answer_{left}"], names[right],
                         row[f"answer_{right}"], row["choice"], names[row["winner"]], row["comment"],
                         row["reviewer"], row["voted_at"]])
    return buf.getvalue()


# ---------------------------------------------------------------- the web app

class ReviewServer(ThreadingHTTPServer):
    """The review page and its JSON API over one database; each request runs in its own thread.

    Binding happens here, so a port in use is a RunError before any answer is generated; `start()` serves.
    Votes are taken only from the page: same origin, JSON, and the random `token` embedded in the page.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], db_path: Path, reviewer: str | None = None):
        host, port = address
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise RunError(f"--port {port}: a port is a number from 0 to 65535", "use --port 0 for any free port")
        self.db_path, self.reviewer = Path(db_path), reviewer
        self.token = secrets.token_urlsafe(24)
        self.loopback = _is_loopback(host)  # then only localhost names are answered (no DNS rebinding)
        self._thread: threading.Thread | None = None
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise _bind_error(host, port, exc) from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> ReviewServer:
        """Serve in a background thread; returns the server."""
        self._thread = threading.Thread(target=self.serve_forever, name="tunesmith-review", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread = None
        self.server_close()


def serve_review(db_path: Path, host: str = "127.0.0.1", port: int = 0,
                 reviewer: str | None = None) -> ReviewServer:
    """Start the review page in a background thread and return the server (`.url`; `.stop()` ends it)."""
    with closing(_connect(db_path)):  # a missing database fails here, not on the first request
        pass
    return ReviewServer((host, port), db_path, reviewer).start()


def _bind_error(host: str, port: int, exc: OSError) -> RunError:
    """What to do when the server can't listen on host:port, in the CLI's words."""
    if exc.errno == errno.EADDRINUSE:
        return RunError(f"port {port} on {host} is already in use (another `tunesmith review` still running, or "
                        "another program)", f"pass --port 0 for any free port, or another port such as --port "
                        f"{_free_port(host)}")
    if exc.errno == errno.EACCES:
        return RunError(f"port {port} on {host}: permission denied (ports below 1024 need root)",
                        "pass --port 0 for any free port, or a port above 1023")
    return RunError(f"can't listen on {host}:{port}: {exc.strerror or exc}",
                    "--host 127.0.0.1 serves this machine only, --host 0.0.0.0 every network interface")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _is_loopback(host: str) -> bool:
    """True for localhost, 127.x.x.x and ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    timeout = 30  # seconds a client may take to send its request: a stalled one can't hold a thread forever
    default_request_version = "HTTP/1.0"  # answers to a garbled request line carry a status line and headers too

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if not self._host_allowed():
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            values = {"DEFAULT_REVIEWER": self.server.reviewer or "", "TOKEN": self.server.token}
            page = re.sub(r"__(DEFAULT_REVIEWER|TOKEN)__", lambda m: _script_value(values[m[1]]), PAGE)
            self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")
        elif url.path == "/api/next":
            self._api(lambda conn: next_item(conn, _reviewer(query.get("reviewer") or self.server.reviewer),
                                             _skip_list(query.get("skip", ""))))
        elif url.path == "/api/results":
            self._api(lambda conn: review_results(self.server.db_path))
        elif url.path == "/export.csv":
            self._api(lambda conn: _csv_text(conn), kind="text/csv; charset=utf-8", headers={
                "Content-Disposition": f'attachment; filename="{self.server.db_path.stem}-votes.csv"'})
        else:
            self._json(404, {"error": f"no such page: {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            body = self._read_body()  # at most MAX_BODY bytes, read before anything is refused
        except BadVote as exc:
            self._json(exc.status, {"error": str(exc)})
            return self._drain()
        if not self._host_allowed():
            return
        if urlsplit(self.path).path != "/api/vote":
            return self._json(404, {"error": f"no such endpoint: POST {urlsplit(self.path).path}"})
        try:
            self._check_from_page()
            payload = _parse_json(body)
        except BadVote as exc:
            return self._json(exc.status, {"error": str(exc)})
        self._api(lambda conn: record_vote(conn, payload, self.server.reviewer))

    def _read_body(self) -> bytes:
        """The request body by its Content-Length: a whole number of bytes up to MAX_BODY, all of it in time."""
        if self.headers.get("Transfer-Encoding"):
            raise BadVote("send the body with a Content-Length (chunked transfer is not accepted)", 411)
        text = (self.headers.get("Content-Length") or "0").strip()
        if not re.fullmatch(r"[0-9]{1,100}", text):
            raise BadVote(f"Content-Length must be a whole number of bytes, got {_short(text)}")
        length = int(text)
        if length > MAX_BODY:
            raise BadVote(f"the body is {length} bytes; a vote is at most {MAX_BODY}", 413)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise BadVote(f"the body did not arrive within {self.timeout} s", 408) from None
        if len(body) < length:
            raise BadVote(f"the body ended after {len(body)} of its {length} bytes")
        return body

    def _drain(self) -> None:
        """Read and drop what is left of a refused body (up to MAX_DRAIN, until 1 s of silence), so the client can
        finish sending and read the answer instead of a reset connection."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client may close at once
            self.connection.settimeout(1)
            left = MAX_DRAIN
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _host_allowed(self) -> bool:
        """A server on a loopback address answers only to localhost names: a page on another domain that
        resolves to 127.0.0.1 (DNS rebinding) gets a 403."""
        host = self.headers.get("Host")
        if not self.server.loopback or host is None:
            return True
        name = host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if _is_loopback(name):
            return True
        self._json(403, {"error": f"this review answers only at localhost or 127.0.0.1, not at {_short(host)}"})
        return False

    def _check_from_page(self) -> None:
        """A vote must come from the review page: its own origin, a JSON body, and the page's token."""
        own, origin = f"http://{self.headers.get('Host', '')}", self.headers.get("Origin")
        if origin is not None and origin != own:
            raise BadVote(f"votes are taken only from the review page at {own}, not from {_short(origin)}", 403)
        if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise BadVote(f"votes are taken only from the review page at {own}", 403)
        token = self.headers.get(TOKEN_HEADER, "").encode("latin-1", "replace")
        if not hmac.compare_digest(token, self.server.token.encode()):
            raise BadVote(f"the vote lacks this server's {TOKEN_HEADER}: reload the review page (the server may "
                          "have restarted)", 403)
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise BadVote(f"a vote is JSON: send Content-Type: application/json, not {_short(kind or 'none')}", 415)

    def _api(self, answer: Callable[[sqlite3.Connection], Any], kind: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        try:
            with closing(_connect(self.server.db_path)) as conn:
                data = answer(conn)
        except BadVote as exc:
            return self._json(exc.status, {"error": str(exc)})
        except sqlite3.Error as exc:
            return self._json(500, {"error": f"database error: {exc}"})
        except Exception as exc:  # a bug must still answer, not drop the connection
            return self._json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        if kind == "application/json":
            return self._json(200, data)
        self._send(200, data.encode("utf-8", "backslashreplace"), kind, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method, …) as JSON errors too."""
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode("ascii"), "application/json")  # ASCII: any text is sendable

    def _send(self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": kind, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep the terminal for the summary, not access logs
        pass


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadVote(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadVote("the body is not a vote: its JSON is nested too deeply") from None


def _script_value(value: str) -> str:
    """A string as a JavaScript literal safe inside <script> (no `</script>` can end it early)."""
    return json.dumps(value).replace("</", "<\\/")


def _skip_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if re.fullmatch(r"[0-9]{1,18}", x.strip()))[:500]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tunesmith review</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:12px 20px;color:#222}
header{display:flex;gap:16px;align-items:center;flex-wrap:wrap;border-bottom:1px solid #ddd;padding-bottom:8px}
h1{font-size:18px;margin:0}#progress{color:#555}#status{color:#a40;min-height:1.4em;margin:6px 0}
.msg{white-space:pre-wrap;background:#f6f6f4;border-radius:6px;padding:8px 10px;margin:6px 0}
.role{font-weight:600;color:#666;font-size:12px;text-transform:uppercase}
.answers{display:grid;grid-template-columns:1fr 1fr;gap:16px;margin-top:10px}
.answers h2{font-size:15px;margin:4px 0}.answer{white-space:pre-wrap;border:1px solid #ccc;border-radius:6px;
padding:10px;min-height:80px;overflow-wrap:anywhere}
.bar{display:flex;gap:10px;margin:12px 0;align-items:flex-start;flex-wrap:wrap}
button{font-size:15px;padding:8px 16px;border-radius:6px;border:1px solid #888;background:#fff;cursor:pointer}
button:hover{background:#eef}textarea{flex:1;min-width:240px;height:3.2em;font:inherit}kbd{border:1px solid #aaa;
border-radius:3px;padding:0 4px;font-size:12px}.hint{color:#666;font-size:13px}
</style></head><body>
<header><h1>Which answer is better?</h1>
<label>Reviewer <input id="who" size="14" placeholder="your name"></label>
<span id="progress"></span></header>
<div id="status"></div>
<div id="review" hidden>
<div id="prompt"></div>
<div class="answers"><div><h2>Answer 1</h2><div class="answer" id="a1"></div></div>
<div><h2>Answer 2</h2><div class="answer" id="a2"></div></div></div>
<div class="bar"><button id="b1">1 is better</button><button id="bt">Tie</button><button id="b2">2 is better</button>
<textarea id="comment" placeholder="optional comment (press c to write, Enter when done)"></textarea>
<button id="bs">Skip</button></div>
<p class="hint">Shortcuts: <kbd>1</kbd> answer 1 is better · <kbd>2</kbd> answer 2 is better · <kbd>t</kbd> tie ·
<kbd>c</kbd> write a comment · <kbd>Enter</kbd> done with the comment (then vote) · <kbd>s</kbd> skip for now.
The order of the two answers is random for every prompt.</p></div>
<script>
"use strict";
const $ = id => document.getElementById(id), who = $("who"), DEFAULT_REVIEWER = __DEFAULT_REVIEWER__;
const TOKEN = __TOKEN__;
let item = null, busy = false, skipped = [];
who.value = localStorage.getItem("tunesmith-reviewer") || DEFAULT_REVIEWER;
const name = () => who.value.trim();
const say = text => { $("status").textContent = text; };
async function call(path, options) {
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}
function showProgress(p) {
  $("progress").textContent = p.done + " of " + p.total + " reviewed (by you) \\u00b7 " + p.votes + " votes in all";
}
async function next() {
  if (!name()) { say("Type your name at the top to start."); $("review").hidden = true; who.focus(); return; }
  localStorage.setItem("tunesmith-reviewer", name());
  try {
    const d = await call("/api/next?reviewer=" + encodeURIComponent(name()) + "&skip=" + skipped.join(","));
    showProgress(d.progress);
    item = d.item;
    if (!item) {
      $("review").hidden = true;
      say(skipped.length ? "Only skipped items are left." : "All done \\u2014 thank you! Results: /api/results");
      skipped = [];
      return;
    }
    const prompt = $("prompt");
    prompt.replaceChildren();
    for (const m of item.prompt) {
      const box = document.createElement("div"), role = document.createElement("div");
      box.className = "msg"; role.className = "role"; role.textContent = m.role;
      box.append(role, document.createTextNode(m.content)); prompt.append(box);
    }
    $("a1").textContent = item.answers[0]; $("a2").textContent = item.answers[1];
    $("comment").value = ""; $("review").hidden = false;
  } catch (err) { say(err.message); }
}
async function vote(choice) {
  if (!item || busy) return;
  busy = true;
  try {
    const d = await call("/api/vote", {method: "POST",
      headers: {"Content-Type": "application/json", "X-Tunesmith-Token": TOKEN},
      body: JSON.stringify({item_id: item.id, choice: choice, comment: $("comment").value, reviewer: name()})});
    showProgress(d.progress); say("Saved."); await next();
  } catch (err) { say(err.message); }
  busy = false;
}
function skip() { if (item) { skipped.push(item.id); say("Skipped."); next(); } }
$("b1").onclick = () => vote("left"); $("b2").onclick = () => vote("right"); $("bt").onclick = () => vote("tie");
$("bs").onclick = skip; who.onchange = () => { skipped = []; next(); };
document.addEventListener("keydown", e => {
  if (e.target === $("comment")) {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault(); e.target.blur(); say("Comment kept: now press 1, 2 or t.");
    }
    else if (e.key === "Escape") e.target.blur();
    return;
  }
  if (e.target === who) { if (e.key === "Enter") who.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  if (k === "1") vote("left"); else if (k === "2") vote("right"); else if (k === "t") vote("tie");
  else if (k === "s") skip(); else if (k === "c") { e.preventDefault(); $("comment").focus(); }
});
next();
</script></body></html>
"""
