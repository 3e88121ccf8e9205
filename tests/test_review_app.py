"""Blinded pairwise review: items and answers in SQLite, the web API, concurrent votes, resume, results and CSV."""

from __future__ import annotations

import csv
import json
import re
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
    recipe = parse_recipe({"model": {"name": str(tiny_model_dir)},
                           "data": {"train": str(data), "validation_fraction": 0.2},
                           "method": {"name": "sft", "adapter": "lora"},
                           "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 64,
                                     "log_every": 1, "seed": 7},
                           "eval": {"loss_rows": 8}, "output": {"dir": str(root / "tuned-run")}})
    train_run(recipe, echo=lambda s: None)
    return root / "tuned-run"


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
    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(server.url + "api/vote", data=body, headers={"Content-Type": "application/json"})
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
def served(tmp_path, tiny_run, fake_models):
    """A 6-item review database (fake answers) and a server on a free port."""
    data = write_jsonl(tmp_path / "prompts.jsonl", chats(6))
    db = prepare_review(tiny_run, "base", data, db_path=tmp_path / "r.sqlite", echo=lambda s: None)
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


def test_side_assignment_is_seeded_and_only_missing_items_are_generated(tmp_path, tiny_run, fake_models):
    data = write_jsonl(tmp_path / "prompts.jsonl", chats(6))
    sides = {}
    for name, seed in (("one", 0), ("two", 0), ("three", 1)):
        db = prepare_review(tiny_run, "base", data, seed=seed, db_path=tmp_path / f"{name}.sqlite",
                            echo=lambda s: None)
        sides[name] = "".join(i["left_system"] for i in stored(db))
    assert sides["one"] == sides["two"] and sides["one"] != sides["three"]
    assert set(sides["one"]) == {"a", "b"}
    assert fake_models == [("alpha", 6), ("omega", 6)] * 3

    fake_models.clear()  # two new prompts and a limit: only the new ones are answered, in one batch each
    more = write_jsonl(tmp_path / "more.jsonl", chats(9))
    prepare_review(tiny_run, "base", more, limit=8, seed=0, db_path=tmp_path / "one.sqlite", echo=lambda s: None)
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


def test_two_reviewers_voting_at_once_lose_no_votes(tmp_path, tiny_run, fake_models):
    data = write_jsonl(tmp_path / "prompts.jsonl", chats(50))
    db = prepare_review(tiny_run, "base", data, db_path=tmp_path / "many.sqlite", echo=lambda s: None)
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
