"""The review page in a real browser (Debian's headless Chromium driven by playwright): keyboard votes, a comment,
a skip, and the votes in SQLite with the choices made; a page on another origin can't vote.

`make test` installs chromium and playwright. Without them this test fails (it does not skip silently); set
TUNESMITH_SKIP_BROWSER=1 to skip it on a machine that can't have a browser.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunesmith import generate as gen
from tunesmith.review_app import prepare_review, serve_review

pytestmark = pytest.mark.skipif(os.environ.get("TUNESMITH_SKIP_BROWSER") == "1",
                                reason="TUNESMITH_SKIP_BROWSER=1: no browser on this machine")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the system's, never a download)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs the playwright package: `make test` installs it "
                    "(or set TUNESMITH_SKIP_BROWSER=1 to skip it)")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("the browser test needs Debian's chromium: `make test` installs it (apt-get install chromium), "
                    "or set TUNESMITH_SKIP_BROWSER=1 to skip it")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def review(tmp_path, monkeypatch):
    """A 3-item review prepared by the app itself, answers from a fake model ("alpha: …" and "omega: …")."""
    monkeypatch.setattr(gen, "load_run", lambda path, base=False, dtype=None: "omega" if base else "alpha")
    monkeypatch.setattr(gen, "generate", lambda loaded, conversations, **kw: [
        f"{loaded}: {c[-1]['content']}" for c in conversations])
    run = tmp_path / "tuned-run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"tunesmith_run": 1, "method": "sft"}))
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [
        {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "x"}]} for i in range(3)])
    db = prepare_review(run, "base", data, db_path=tmp_path / "r.sqlite", echo=lambda s: None)
    server = serve_review(db, reviewer="ann")
    yield db, server
    server.stop()


def stored_votes(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT item_id, reviewer, choice, winner, comment FROM votes ORDER BY item_id").fetchall()


def sides(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT id, left_system FROM items"))


def test_keyboard_votes_a_comment_and_a_skip_reach_sqlite(browser, review):
    from playwright.sync_api import expect

    db, server = review
    page = browser.new_page()
    page.set_default_timeout(15000)
    page.goto(server.url)
    prompt, progress, status = page.locator("#prompt"), page.locator("#progress"), page.locator("#status")
    left = {i: "alpha" if s == "a" else "omega" for i, s in sides(db).items()}  # the model shown as Answer 1

    def shows(item_id: int) -> None:
        expect(prompt).to_contain_text(f"Question {item_id - 1}?")
        expect(page.locator("#a1")).to_have_text(f"{left[item_id]}: Question {item_id - 1}?")

    shows(1)
    expect(page.locator("#who")).to_have_value("ann")
    page.keyboard.press("1")  # answer 1 is better
    expect(progress).to_contain_text("1 of 3 reviewed")
    shows(2)
    page.keyboard.press("s")  # skip for now
    expect(status).to_have_text("Skipped.")
    shows(3)
    page.keyboard.press("c")  # write a comment, Enter, then a tie
    page.keyboard.type("close call")
    page.keyboard.press("Enter")
    expect(status).to_contain_text("Comment kept")
    page.keyboard.press("t")
    expect(status).to_have_text("Only skipped items are left.")
    expect(progress).to_contain_text("2 of 3 reviewed")
    page.reload()  # the skipped item comes back
    shows(2)
    page.keyboard.press("2")  # answer 2 is better
    expect(status).to_contain_text("All done")
    expect(progress).to_contain_text("3 of 3 reviewed (by you) · 3 votes in all")

    winner = {i: ("a" if side == "a" else "b") for i, side in sides(db).items()}  # the system on the left
    other = {"a": "b", "b": "a"}
    assert stored_votes(db) == [(1, "ann", "left", winner[1], ""), (2, "ann", "right", other[winner[2]], ""),
                                (3, "ann", "tie", "tie", "close call")]
    page.close()


def test_a_page_on_another_origin_cannot_vote(browser, review):
    db, server = review
    elsewhere = serve_review(db)  # another port: another origin, as an attacker's page would be
    try:
        page = browser.new_page()
        page.goto(elsewhere.url)
        body = json.dumps({"item_id": 1, "choice": "left", "reviewer": "mallory"})
        status = page.evaluate("""async ([url, body]) => {
            await fetch(url, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body});
            const form = Object.assign(document.createElement("form"),
                                       {method: "POST", action: url, enctype: "text/plain"});
            document.body.append(form);
            return "sent"; }""", [server.url + "api/vote", body])
        assert status == "sent"
        with page.expect_navigation():  # a cross-site form post, the classic CSRF: the answer is a 403
            page.evaluate("document.querySelector('form').submit()")
        assert json.loads(page.locator("body").inner_text())["error"].startswith("votes are taken only from")
        page.close()
    finally:
        elsewhere.stop()
    assert stored_votes(db) == []
