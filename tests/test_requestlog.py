"""The request log: rows and feedback round-trip, content only with log_content and then masked, threads, and a
kill -9 under load losing no acknowledged row."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.serve.requestlog import COLUMNS, RequestLog, mask_content, read_feedback, read_requests

PERSONAL = "Mail me at jane.doe@example.com or call +44 20 7946 0958 about my refund."


def row(i: int, **extra) -> dict:
    return {"id": f"chatcmpl-{i}", "time": 1000.0 + i, "endpoint": "chat.completions", "model": "run", "run": "/r",
            "status": 200, "finish_reason": "stop", "queue_s": 0.01, "ttft_s": 0.1, "e2e_s": 0.5,
            "prompt_tokens": 12, "completion_tokens": 7, "input_chars": len(PERSONAL), **extra}


def test_mask_content_uses_the_data_checks_detector():
    assert mask_content(PERSONAL) == "Mail me at [EMAIL] or call [PHONE] about my refund."


def test_rows_round_trip_without_content(tmp_path):
    path = tmp_path / "serve" / "requests.sqlite"
    with RequestLog(path) as log:
        log.record(row(1, prompt=[{"role": "user", "content": PERSONAL}], answer="ok jane.doe@example.com"))
        log.record(row(2, endpoint="classify", prediction=[{"label": "positive", "probability": 0.9}]))
    rows = read_requests(path)
    assert [r["id"] for r in rows] == ["chatcmpl-1", "chatcmpl-2"]
    assert rows[0]["prompt"] is None and rows[0]["answer"] is None  # no content without log_content
    assert rows[0]["e2e_s"] == 0.5 and rows[0]["completion_tokens"] == 7 and rows[0]["input_chars"] == 73
    assert rows[1]["prediction"] == [{"label": "positive", "probability": 0.9}]  # predictions are kept
    assert set(rows[0]) == set(COLUMNS)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert read_requests(path, since=1001.5) == rows[1:]


def test_content_is_masked_with_log_content(tmp_path):
    path = tmp_path / "requests.sqlite"
    with RequestLog(path, log_content=True) as log:
        log.record(row(1, prompt=[{"role": "user", "content": PERSONAL}],
                       answer="Sure, writing to jane.doe@example.com"))
        log.record(row(2, endpoint="classify", prompt=["call me on 020 7946 0958", "fine"]))
        on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the file and its -wal while open
        assert len(on_disk) > 4096 and b"jane.doe" not in on_disk and b"7946" not in on_disk
    first, second = read_requests(path)
    assert first["prompt"] == [{"role": "user", "content": "Mail me at [EMAIL] or call [PHONE] about my refund."}]
    assert first["answer"] == "Sure, writing to [EMAIL]"
    assert second["prompt"] == ["call me on [PHONE]", "fine"]
    assert b"jane.doe" not in path.read_bytes() and b"[EMAIL]" in path.read_bytes()


def test_feedback_for_known_ids_only(tmp_path):
    path = tmp_path / "requests.sqlite"
    with RequestLog(path) as log:
        log.record(row(1))
        assert log.feedback("chatcmpl-1", "down", "The answer is 42; ask jane.doe@example.com") is True
        assert log.feedback("chatcmpl-1", "up") is True
        assert log.feedback("nope", "up") is False
        with pytest.raises(ValueError, match="rating"):
            log.feedback("chatcmpl-1", "meh")
    fb = read_feedback(path)
    assert [(f["request_id"], f["rating"], f["correction"]) for f in fb] == [
        ("chatcmpl-1", "down", "The answer is 42; ask [EMAIL]"), ("chatcmpl-1", "up", None)]


def test_unknown_column_is_refused(tmp_path):
    with RequestLog(tmp_path / "r.sqlite") as log, pytest.raises(ValueError, match="latency"):
        log.record({"id": "x", "latency": 1})


def test_threads_write_every_row(tmp_path):
    path = tmp_path / "requests.sqlite"
    log = RequestLog(path)

    def write(t):
        for i in range(50):
            log.record(row(t * 1000 + i))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert len({r["id"] for r in read_requests(path)}) == 200


@pytest.mark.parametrize("content", [b"", b"not a database at all\n" * 100])
def test_not_a_request_log(tmp_path, content):
    path = tmp_path / "x.sqlite"
    path.write_bytes(content)
    with pytest.raises(TunesmithError, match="request log"):
        read_requests(path)
    assert path.read_bytes() == content
    with pytest.raises(TunesmithError, match="no such request log"):
        read_requests(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()


WRITER = """
import sys
from tunesmith.serve.requestlog import RequestLog
log = RequestLog(sys.argv[1])
i = 0
while True:
    log.record({"id": f"req-{i}", "status": 200, "e2e_s": 0.1, "input_chars": i})
    print(f"req-{i}", flush=True)  # acknowledged: the row is committed
    i += 1
"""


def test_kill_9_loses_no_acknowledged_row(tmp_path):
    path = tmp_path / "requests.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        acknowledged.append(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acknowledged += [line.strip() for line in proc.stdout if line.strip()]  # whatever was printed before the kill
    proc.stdout.close()
    assert len(acknowledged) >= 300
    stored = {r["id"] for r in read_requests(path)}
    assert set(acknowledged) <= stored
    assert len(stored) - len(acknowledged) <= 1  # at most the row committed but not yet printed
