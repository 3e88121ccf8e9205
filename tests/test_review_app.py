"""Blinded pairwise review: items and answers in SQLite, the web API, concurrent votes, resume, results and CSV."""

from __future__ import annotations

import csv
import json
import re
import socket
import sqlite3
import threading
import urllib.error
import urllib.request

import pytest

from conftest import write_jsonl
from tunesmith import generate as gen
from tunesmith.errors import RunError
from tunesmith.recipe import parse_recipe
from tunesmith.review_app import (export_csv, format_results, prepare_review, report_section, review_results,
                                  serve_review)


def chats(n: int, start: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Name a colour number {i}."},
                          {"role": "assistant", "content": f"Colour {i} is blue."}]} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA run folder named tuned-run (two SFT steps on the random Llama)."""
    from tunesmith.train import train_run

    root = tmp_path_factory.mktemp("review")
    data = write_jsonl(root / "train.jsonl", chats(20))
    recipe = parse_recipe({"model": {"name": str(tiny_model_dir)},  # near-identical prompts: a split holds none out
                           "data": {"train": str(data), "validation_fraction": 0},
                           "method": {"name": "sft", "adapter": "lora"},
                           "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 64,
                                     "log_every": 1, "seed": 7},
                           "eval": {"loss_rows": 8}, "output": {"dir": str(root / "tuned-run")}})
    train_run(recipe, echo=lambda s: None)
    return root / "tuned-run"


@pytest.fixture
def fake_run(tmp_path):
    """A run folder as far as a review with fake_models needs one: named tuned-run, with its manifest."""
    root = tmp_path / "tuned-run"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"tunesmith_run": 1, "method": "sft"}))
    return root


@pytest.fixture
def fake_models(monkeypatch):
    """Generation without a model: system A answers "alpha: <prompt>", the base answers "omega: <prompt>"."""
    calls = []

    def load_run(path, base=False, dtype=None):
        return "omega" if base else "alpha"

    def generate(loaded, conversations, max_new_tokens=128, temperature=0.0, batch_size=8):
        calls.append((loaded, len(conversations)))
        return [f"{loaded}: {c[-1]['content']}" for c in conversations]

    monkeypatch.setattr(gen, "load_run", load_run)
    monkeypatch.setattr(gen, "generate", generate)
    return calls


def stored(db, columns="id, prompt, answer_a, answer_b, left_system"):
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT {columns} FROM items ORDER BY id")]


def votes(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT item_id, reviewer, choice, winner, comment FROM votes ORDER BY item_id, reviewer"
                            ).fetchall()


def get(server, path):
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read().decode("utf-8")


def post(server, payload, raw: bytes | None = None):
    """A vote as the page sends it: JSON, with the token the page was served with."""
    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(server.url + "api/vote", data=body, headers={
        "Content-Type": "application/json", "X-Tunesmith-Token": server.token})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def next_item(server, reviewer):
    status, _, body = get(server, f"/api/next?reviewer={reviewer}")
    assert status == 200
    return json.loads(body)


@pytest.fixture
def served(tmp_path, fake_run, fake_models):
    """A 6-item review database (fake answers) and a server on a free port."""
    data = write_jsonl(tmp_path / "prompts.jsonl", chats(6))
    db = prepare_review(fake_run, "base", data, db_path=tmp_path / "r.sqlite", echo=lambda s: None)
    server = serve_review(db)
    yield db, server
    server.stop()


def test_prepare_stores_both_real_answers_and_resumes_without_generating(tmp_path, tiny_run, monkeypatch):
    from tunesmith.data.format import prompt_messages
    from tunesmith.data.records import load_records

    data = write_jsonl(tmp_path / "prompts.jsonl", chats(6))
    lines = []
    db = prepare_review(tiny_run, "base", data, max_new_tokens=5, seed=0, echo=lines.append)
    assert db == tiny_run / "review" / "base.sqlite"
    items = stored(db)
    prompts = [prompt_messages(r) for r in load_records(data).records]
    assert [json.loads(i["prompt"]) for i in items] == prompts
    expected_a = gen.generate(gen.load_run(tiny_run), prompts, max_new_tokens=5)
    expected_b = gen.generate(gen.load_run(tiny_run, base=True), prompts, max_new_tokens=5)
    assert [i["answer_a"] for i in items] == expected_a and [i["answer_b"] for i in items] == expected_b
    assert "6 items (6 new prompts, 12 answers generated)" in lines[0]

    def fail(*args, **kwargs):
        raise AssertionError("must not regenerate stored answers")

    monkeypatch.setattr(gen, "generate", fail)
    monkeypatch.setattr(gen, "load_run", fail)
    assert prepare_review(tiny_run, "base", data, max_new_tokens=5, seed=0, echo=lines.append) == db
    assert stored(db) == items and "0 answers generated" in lines[1]
    with pytest.raises(RunError, match="max_new_tokens: stored '5', now '9'"):
        prepare_review(tiny_run, "base", data, max_new_tokens=9, seed=0)


def test_side_assignment_is_seeded_and_only_missing_items_are_generated(tmp_path, fake_run, fake_models):
    data = write_jsonl(tmp_path / "prompts.jsonl", chats(6))
    sides = {}
    for name, seed in (("one", 0), ("two", 0), ("three", 1)):
        db = prepare_review(fake_run, "base", data, seed=seed, db_path=tmp_path / f"{name}.sqlite",
                            echo=lambda s: None)
        sides[name] = "".join(i["left_system"] for i in stored(db))
    assert sides["one"] == sides["two"] and sides["one"] != sides["three"]
    assert set(sides["one"]) == {"a", "b"}
    assert fake_models == [("alpha", 6), ("omega", 6)] * 3

    fake_models.clear()  # two new prompts and a limit: only the new ones are answered, in one batch each
    more = write_jsonl(tmp_path / "more.jsonl", chats(9))
    prepare_review(fake_run, "base", more, limit=8, seed=0, db_path=tmp_path / "one.sqlite", echo=lambda s: None)
    items = stored(tmp_path / "one.sqlite")
    assert fake_models == [("alpha", 2), ("omega", 2)]
    assert len(items) == 8 and "".join(i["left_system"] for i in items[:6]) == sides["one"]
    assert items[7]["answer_a"] == "alpha: Name a colour number 7." == items[7]["answer_b"].replace("omega", "alpha")


def test_page_is_offline_and_shows_shortcuts(served):
    _, server = served
    status, kind, page = get(server, "/")
    assert status == 200 and kind.startswith("text/html")
    for text in ("1 is better", "2 is better", "Tie", "<kbd>1</kbd>", "<kbd>2</kbd>", "<kbd>t</kbd>",
                 "<kbd>Enter</kbd>", "reviewed (by you)", "votes in all"):
        assert text in page
    assert not re.search(r"https?:|src=|<link|@import", page)  # no external URLs, scripts or stylesheets


def test_votes_are_blinded_unblinded_and_counted(served):
    db, server = served
    choices = []
    for n in range(6):  # pick alpha (system A) for 4 items, omega (the base) for one, a tie for the last
        d = next_item(server, "ann")
        assert d["progress"] == {"done": n, "total": 6, "votes": n}
        item = d["item"]
        assert set(item) == {"id", "prompt", "answers"}
        text = json.dumps(d)
        assert "tuned-run" not in text and "base" not in text and "system" not in text
        want = "alpha" if n < 4 else "omega"
        choice = "tie" if n == 5 else "left" if item["answers"][0].startswith(want) else "right"
        choices.append((item["id"], choice))
        assert post(server, {"item_id": item["id"], "choice": choice, "reviewer": "ann",
                             "comment": f"note {n}"})[0] == 200
    assert next_item(server, "ann") == {"item": None, "progress": {"done": 6, "total": 6, "votes": 6}}
    sides = {i["id"]: i["left_system"] for i in stored(db)}
    assert [(v[0], v[2]) for v in votes(db)] == sorted(choices)
    assert [v[3] for v in votes(db)] == ["a", "a", "a", "a", "b", "tie"]
    assert len(set(sides.values())) == 2  # both orders were shown, so both translations were exercised

    results = review_results(db)
    assert results["systems"] == ["tuned-run", "base"]
    assert (results["votes"], results["a_wins"], results["b_wins"], results["ties"]) == (6, 4, 1, 1)
    assert results["win_rate_a"] == pytest.approx(4.5 / 6)
    assert results["by_reviewer"]["ann"]["win_rate_a"] == pytest.approx(0.75)
    assert json.loads(get(server, "/api/results")[2]) == results
    assert "75.0%" in format_results(results) and "<h3>tuned-run vs base</h3>" in report_section(db)

    item_id = choices[0][0]  # a repeat vote replaces the earlier one
    assert post(server, {"item_id": item_id, "choice": "tie", "reviewer": "ann"})[0] == 200
    assert review_results(db)["votes"] == 6 and review_results(db)["ties"] == 2


def test_bad_votes_get_400_with_a_message(served):
    _, server = served
    status, body = post(server, {"item_id": 999, "choice": "left", "reviewer": "ann"})
    assert status == 400 and body["error"] == "unknown item_id 999: this review has 6 items"
    status, body = post(server, {"item_id": 1, "choice": "up", "reviewer": "ann"})
    assert status == 400 and body["error"] == "choice must be 'left', 'right' or 'tie', got 'up'"
    status, body = post(server, {"item_id": 1, "choice": "left"})
    assert status == 400 and "reviewer is missing" in body["error"]
    status, body = post(server, None, raw=b"{not json")
    assert status == 400 and body["error"].startswith("the body is not valid JSON")
    assert get(server, "/api/next")[0] == 400
    assert review_results(served[0])["votes"] == 0


def test_wilson_interval_for_eight_wins_and_two_losses(served):
    db, server = served
    with sqlite3.connect(db) as conn:  # four more items, so ten in all
        conn.executemany("INSERT INTO items (key, prompt, answer_a, answer_b, left_system) "
                         "VALUES (?, '[]', 'x', 'y', 'a')", [(f"extra{i}",) for i in range(4)])
    for item_id in range(1, 11):
        side = next(i["left_system"] for i in stored(db) if i["id"] == item_id)
        a_side = "left" if side == "a" else "right"
        choice = a_side if item_id <= 8 else {"left": "right", "right": "left"}[a_side]
        assert post(server, {"item_id": item_id, "choice": choice, "reviewer": "bo"})[0] == 200
    r = review_results(db)
    assert (r["a_wins"], r["b_wins"], r["win_rate_a"]) == (8, 2, 0.8)
    z, n, p = 1.96, 10, 0.8  # Wilson score interval, by hand: 0.4902 .. 0.9433
    denom = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / denom, z / denom * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert r["ci_low"] == pytest.approx(centre - half, abs=1e-3) == pytest.approx(0.4902, abs=1e-3)
    assert r["ci_high"] == pytest.approx(centre + half, abs=1e-3) == pytest.approx(0.9433, abs=1e-3)


def test_two_reviewers_voting_at_once_lose_no_votes(tmp_path, fake_run, fake_models):
    data = write_jsonl(tmp_path / "prompts.jsonl", chats(50))
    db = prepare_review(fake_run, "base", data, db_path=tmp_path / "many.sqlite", echo=lambda s: None)
    server = serve_review(db)
    failures = []

    def reviewer(name, choice):
        for item_id in range(1, 51):
            status, body = post(server, {"item_id": item_id, "choice": choice, "reviewer": name})
            if status != 200:
                failures.append(body)

    try:
        threads = [threading.Thread(target=reviewer, args=args) for args in (("r1", "left"), ("r2", "tie"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert failures == []
    r = review_results(db)
    assert r["votes"] == 100 and r["ties"] == 50 and r["items_voted"] == 50
    assert {k: v["votes"] for k, v in r["by_reviewer"].items()} == {"r1": 50, "r2": 50}


def test_fewest_votes_first_and_progress_survives_a_restart(served):
    db, server = served
    first = next_item(server, "ann")["item"]["id"]
    assert post(server, {"item_id": first, "choice": "left", "reviewer": "ann"})[0] == 200
    assert next_item(server, "cy")["item"]["id"] != first  # cy gets an item nobody has judged yet
    for _ in range(2):
        item_id = next_item(server, "ann")["item"]["id"]
        assert post(server, {"item_id": item_id, "choice": "right", "reviewer": "ann"})[0] == 200
    server.stop()

    again = serve_review(db, reviewer="ann")  # a new server on the same database; ann is the default reviewer
    try:
        status, _, body = get(again, "/api/next")
        d = json.loads(body)
        assert status == 200 and d["progress"] == {"done": 3, "total": 6, "votes": 3}
        assert d["item"]["id"] not in {v[0] for v in votes(db)}
        assert '"ann"' in get(again, "/")[2]  # the page starts with the default reviewer filled in
    finally:
        again.stop()


def test_export_csv_has_one_unblinded_row_per_vote(served, tmp_path):
    db, server = served
    for reviewer, choice in (("ann", "left"), ("bo", "right"), ("cy", "tie")):
        assert post(server, {"item_id": 2, "choice": choice, "reviewer": reviewer, "comment": "ok, \"fine\""})[0] == 200
    item = next(i for i in stored(db) if i["id"] == 2)
    names = {"a": "tuned-run", "b": "base"}
    left, right = item["left_system"], "b" if item["left_system"] == "a" else "a"
    rows = list(csv.DictReader(open(export_csv(db, tmp_path / "out" / "votes.csv"), encoding="utf-8")))
    assert [(r["reviewer"], r["choice"], r["winner"]) for r in rows] == [
        ("ann", "left", names[left]), ("bo", "right", names[right]), ("cy", "tie", "tie")]
    row = rows[0]
    assert row["item_id"] == "2" and row["prompt"] == "user: Name a colour number 1."
    assert (row["left_system"], row["answer_left"]) == (names[left], item[f"answer_{left}"])
    assert (row["right_system"], row["answer_right"]) == (names[right], item[f"answer_{right}"])
    assert row["comment"] == 'ok, "fine"' and re.match(r"\d{4}-\d\d-\d\dT", row["voted_at"])
    status, kind, text = get(server, "/export.csv")
    assert status == 200 and kind.startswith("text/csv") and list(csv.DictReader(text.splitlines())) == rows


def test_reward_model_agreement_with_the_reviewers(served, monkeypatch):
    from tunesmith.methods import reward
    from tunesmith.review_app import format_agreement, reward_agreement

    db, server = served
    for n in range(6):  # alpha (A) wins 4 items, omega (B) one, the last is a tie
        item = next_item(server, "cy")["item"]
        want = "alpha" if n < 4 else "omega"
        choice = "tie" if n == 5 else "left" if item["answers"][0].startswith(want) else "right"
        assert post(server, {"item_id": item["id"], "choice": choice, "reviewer": "cy"})[0] == 200

    class Fake:  # a reward model that always prefers alpha's answers
        def score(self, prompts, responses):
            assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
            return [1.0 if r.startswith("alpha") else 0.0 for r in responses]

    monkeypatch.setattr(reward, "load_reward_model", lambda run: Fake())
    found = reward_agreement(db, "rm-run")
    assert (found["items"], found["agreement"], found["reward_prefers_a"]) == (5, 0.8, 5)  # the tie is left out
    assert "agrees with the reviewers on 80.0% of 5 decided items" in format_agreement(found)
    assert "80.0% of 5 decided items" in report_section(db)


# ---------------------------------------------------------------- bad requests: always a status and a JSON error

def raw_request(server, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are; the status and JSON error of the answer. The server must answer and close within
    10 s: a dropped connection, a hang or a non-JSON answer fails here."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, head
    return int(head.split()[1]), json.loads(body)


def vote_bytes(server, body: bytes, **headers: str | None) -> bytes:
    """A POST /api/vote as the page sends it; `headers` replace (None: remove) the page's own."""
    port = server.server_address[1]
    sent = {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json",
            "X-Tunesmith-Token": server.token, "Content-Length": str(len(body))}
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = "".join(f"{k}: {v}\r\n" for k, v in sent.items() if v is not None)
    return f"POST /api/vote HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


VOTE = b'{"item_id": 1, "choice": "left", "reviewer": "ann"}'
BAD_REQUESTS = [  # id, body, header changes, status, words of the error
    ("negative-length", VOTE, {"Content_Length": "-5"}, 400, "Content-Length must be a whole number of bytes"),
    ("text-length", VOTE, {"Content_Length": "lots"}, 400, "Content-Length must be a whole number of bytes"),
    ("claims-10^30-bytes", b"", {"Content_Length": str(10 ** 30)}, 413, "a vote is at most 1048576"),
    ("sends-2-MiB", b"x" * (2 << 20), {}, 413, f"the body is {2 << 20} bytes"),
    ("chunked", b"5\r\nhello\r\n0\r\n\r\n", {"Content_Length": None, "Transfer_Encoding": "chunked"}, 411,
     "Content-Length"),
    ("item-id-10^30", b'{"item_id": 1000000000000000000000000000000, "choice": "left", "reviewer": "ann"}', {},
     400, "unknown item_id 1000000000000000000000000000000"),
    ("item-id-text-10^30", b'{"item_id": "1000000000000000000000000000000", "choice": "tie", "reviewer": "a"}', {},
     400, "unknown item_id"),
    ("item-id-negative", b'{"item_id": -1, "choice": "left", "reviewer": "ann"}', {}, 400, "unknown item_id -1"),
    ("item-id-superscript", '{"item_id": "²", "choice": "left", "reviewer": "ann"}'.encode(), {}, 400,
     "item_id must be a whole number"),
    ("surrogate-reviewer", b'{"item_id": 1, "choice": "left", "reviewer": "\\ud800"}', {}, 400,
     "reviewer is not valid Unicode text"),
    ("surrogate-comment", b'{"item_id": 1, "choice": "left", "reviewer": "ann", "comment": "ok \\udfff"}', {},
     400, "comment is not valid Unicode text"),
    ("surrogate-choice", b'{"item_id": 1, "choice": "\\udc00", "reviewer": "ann"}', {}, 400,
     "choice is not valid Unicode text"),
    ("not-utf8", b'{"item_id": 1, "choice": "left", "reviewer": "\xff"}', {}, 400, "the body is not valid JSON"),
    ("nested-50000-deep", b"[" * 50000 + b"]" * 50000, {}, 400, "nested too deeply"),
    ("not-an-object", b"[1, 2]", {}, 400, "the body must be a JSON object"),
]


@pytest.mark.parametrize("body, headers, status, words", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_vote_request_gets_its_status_and_a_json_error(served, body, headers, status, words):
    db, server = served
    got, answer = raw_request(server, vote_bytes(server, body, **headers))
    assert (got, words in answer["error"]) == (status, True), answer
    assert votes(db) == []
    assert post(server, {"item_id": 1, "choice": "left", "reviewer": "ann"})[0] == 200  # the server still works
    assert [v[:3] for v in votes(db)] == [(1, "ann", "left")]


def test_a_body_that_stops_arriving_gets_408_not_a_hang(served, monkeypatch):
    from tunesmith import review_app

    monkeypatch.setattr(review_app._Handler, "timeout", 1)
    db, server = served
    status, answer = raw_request(server, vote_bytes(server, VOTE[:10], Content_Length=str(len(VOTE))))
    assert status == 408 and answer["error"] == "the body did not arrive within 1 s"
    assert votes(db) == []


@pytest.mark.parametrize("request_bytes, status, words", [
    (b"GARBAGE\r\n\r\n", 400, "Bad request"),
    (b"PUT /api/vote HTTP/1.0\r\n\r\n", 501, "Unsupported method ('PUT')"),
    (b"GET /nowhere HTTP/1.0\r\n\r\n", 404, "no such page: /nowhere"),
    (b"GET /api/next?reviewer=ann&skip=%C2%B2,1000000000000000000000000000000,1 HTTP/1.0\r\n\r\n", 200, None),
], ids=["garbage-request-line", "unknown-method", "unknown-page", "odd-skip-list"])
def test_malformed_requests_get_a_json_answer(served, request_bytes, status, words):
    got, answer = raw_request(served[1], request_bytes)
    assert got == status and (words is None or words in answer["error"])
    if words is None:  # item 1 was skipped; the odd numbers were ignored
        assert answer["item"]["id"] == 2


# ---------------------------------------------------------------- votes only from the page itself

FOREIGN = [  # id, header changes, status, words of the error
    ("cross-site-text-plain", {"Origin": "http://evil.example", "Content_Type": "text/plain",
                               "X_Tunesmith_Token": None},
     403, "votes are taken only from the review page at http://127.0.0.1:"),
    ("cross-site-with-sec-fetch", {"Origin": None, "Sec_Fetch_Site": "cross-site"}, 403, "only from the review page"),
    ("null-origin", {"Origin": "null"}, 403, "not from 'null'"),
    ("no-token", {"X_Tunesmith_Token": None}, 403, "the vote lacks this server's X-Tunesmith-Token"),
    ("wrong-token", {"X_Tunesmith_Token": "guess"}, 403, "reload the review page"),
    ("text-plain-from-the-page", {"Content_Type": "text/plain"}, 415, "send Content-Type: application/json"),
    ("dns-rebinding", {"Host": "evil.example:80", "Origin": "http://evil.example:80"}, 403,
     "this review answers only at localhost or 127.0.0.1, not at 'evil.example:80'"),
]


@pytest.mark.parametrize("headers, status, words", [c[1:] for c in FOREIGN], ids=[c[0] for c in FOREIGN])
def test_votes_not_from_the_page_are_refused_and_nothing_reaches_sqlite(served, headers, status, words):
    db, server = served
    got, answer = raw_request(server, vote_bytes(server, VOTE, **headers))
    assert (got, words in answer["error"]) == (status, True), answer
    assert votes(db) == []


def test_the_page_carries_the_token_and_its_own_origin_votes(served):
    db, server = served
    page = get(server, "/")[2]
    assert f"const TOKEN = {json.dumps(server.token)};" in page and '"X-Tunesmith-Token": TOKEN' in page
    for host in ("127.0.0.1", "localhost"):  # either name of this machine, as the browser sends it
        port = server.server_address[1]
        got, answer = raw_request(server, vote_bytes(server, VOTE, Host=f"{host}:{port}",
                                                     Origin=f"http://{host}:{port}"))
        assert got == 200 and answer["ok"] is True
    assert votes(db) == [(1, "ann", "left", votes(db)[0][3], "")]
    other = serve_review(db)  # a new server: a new token, so an old page's token is refused
    try:
        assert other.token != server.token
        got, answer = raw_request(other, vote_bytes(server, VOTE).replace(
            f":{server.server_address[1]}".encode(), f":{other.server_address[1]}".encode()))
        assert got == 403 and "reload the review page" in answer["error"]
    finally:
        other.stop()


# ---------------------------------------------------------------- the port

@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_a_clear_error_naming_a_free_one(served, taken_port):
    db, _ = served
    with pytest.raises(RunError) as caught:
        serve_review(db, port=taken_port)
    assert str(caught.value).startswith(f"port {taken_port} on 127.0.0.1 is already in use")
    free = int(re.search(r"--port (\d+)", caught.value.hint.split("such as")[1])[1])
    assert "--port 0 for any free port" in caught.value.hint and free != taken_port
    serve_review(db, port=free).stop()  # the port it names is one that works
    with pytest.raises(RunError, match="--port 70000: a port is a number from 0 to 65535"):
        serve_review(db, port=70000)


def test_review_command_on_a_taken_port_exits_2_before_generating(tmp_path, fake_run, fake_models, taken_port,
                                                                  capsys):
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "prompts.jsonl", chats(3))
    code = main(["review", str(fake_run), "base", "--data", str(data), "--port", str(taken_port)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"port {taken_port} on 127.0.0.1 is already in use" in err and "--port 0" in err
    assert fake_models == [] and not (fake_run / "review").exists()  # nothing generated, nothing written
