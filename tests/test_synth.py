"""Synthetic rows from a teacher (a fake OpenAI-compatible server, a tiny local model), review, augmentation."""

from __future__ import annotations

import json
from collections import Counter
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import write_jsonl

from tunesmith.data.augment import add_noise, augment, clean_paraphrase
from tunesmith.data.records import load_records
from tunesmith.data.review import (accept_passing, accepted_rows, export_accepted, read_review, review_file,
                                   review_row)
from tunesmith.data.synth import (HTTPTeacher, LocalTeacher, chunk_text, first_json_object, load_documents,
                                  synthesize)
from tunesmith.errors import DataError

SEEDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Convert 3 kilometres to metres.", "input": "", "output": "Three kilometres are 3000 metres."},
    {"instruction": "Give a synonym for happy.", "input": "", "output": "A synonym for happy is joyful."},
    {"instruction": "Translate 'thank you' into Spanish.", "input": "", "output": "In Spanish you say 'gracias'."},
]
EVAL = [
    {"instruction": "What is the boiling point of water at sea level in Celsius?", "input": "",
     "output": "It is 100 degrees Celsius."},
    {"instruction": "Who wrote the play Hamlet?", "input": "", "output": "William Shakespeare wrote Hamlet."},
]
GOOD_1 = {"instruction": "List three primary colours.", "input": "", "output": "Red, yellow and blue are primary."}
GOOD_2 = {"instruction": "Explain what a leap year is.", "input": "",
          "output": "A leap year has 366 days, adding February 29 every four years."}


class FakeOpenAI:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers from a script, in order.

    A script item is the reply's content (str), a (status, body) pair sent as-is, or a function of the request body.
    """

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                item = fake.script.pop(0)
                item = item(body) if callable(item) else item
                if isinstance(item, tuple):
                    status, payload = item
                else:
                    status, payload = 200, json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": item}}]})
                data = payload.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.requests]


@pytest.fixture
def server():
    fake = FakeOpenAI()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


@pytest.fixture
def seed_data(tmp_path):
    seeds = load_records(write_jsonl(tmp_path / "seeds.jsonl", SEEDS)).records
    against = load_records(write_jsonl(tmp_path / "eval.jsonl", EVAL)).records
    return seeds, against, tmp_path


def statuses(rows):
    return [(r["_review"]["status"], [c["check"] for c in r["_review"]["checks"]]) for r in rows]


def test_first_json_object_takes_the_first_object_around_fences_and_prose():
    assert first_json_object('Sure!\n```json\n{"a": 1, "b": "}"}\n```\nanything else? {"c": 2}') == {"a": 1, "b": "}"}
    assert first_json_object("{broken {\"x\": [1, 2]} tail") == {"x": [1, 2]}
    assert first_json_object("no object here, only [1, 2]") is None


def test_synth_from_seeds_checks_every_row_and_writes_the_review_file(server, seed_data, monkeypatch):
    seeds, against, tmp = seed_data
    monkeypatch.setenv("TS_TEST_KEY", "sk-test")
    long_row = {"instruction": "Describe the water cycle.", "input": "", "output": "Water evaporates. " * 20}
    server.script = [
        json.dumps(SEEDS[2]),                                       # 1 the same as seed row 3
        json.dumps({**EVAL[0], "output": "Water boils at one hundred degrees Celsius at sea level."}),  # 2 leaks
        "Sure! Here is a new row for you.",                          # 3 no JSON
        f"Here you go:\n```json\n{json.dumps(GOOD_1)}\n```\nHope it helps.",  # 4 fenced, good
        json.dumps({**GOOD_1, "output": "red, yellow and BLUE  are primary."}),  # 5 the same as row 4
        json.dumps({"instruction": "Is the sky blue?", "input": "", "output": "Yes."}),  # 6 too short
        json.dumps({"instruction": "Spell five.", "output": 5}),      # 7 wrong type
        json.dumps(long_row),                                        # 8 too long
        json.dumps({"instruction": "How do I reach support?", "input": "",
                    "output": "Write to help.desk@example.com and we reply within a day."}),  # 9 personal data
        json.dumps({"instruction": "Bold the word cat.", "input": "", "output": "Here it is: <b>cat</b> in bold."}),
        json.dumps(GOOD_2),                                          # 11 good
    ]
    teacher = HTTPTeacher(server.base_url, "teacher-model", api_key_env="TS_TEST_KEY")
    seen = []
    result = synthesize(teacher, seeds=seeds, n=2, existing=seeds, against=against, max_chars=300,
                        max_new_tokens=256, max_attempts=12, seed=5, progress=lambda a, p: seen.append((a, p)))

    assert statuses(result.rows) == [
        ("rejected", ["duplicate_of_existing"]), ("rejected", ["leakage"]), ("rejected", ["format"]),
        ("pending", []), ("rejected", ["duplicate_of_generated"]), ("rejected", ["length"]),
        ("rejected", ["format"]), ("rejected", ["length"]), ("rejected", ["pii"]), ("rejected", ["quality"]),
        ("pending", [])]
    details = [c["detail"] for r in result.rows for c in r["_review"]["checks"]]
    assert details == [
        f"exact duplicate of {tmp / 'seeds.jsonl'}:3",
        f"prompt is exact duplicate of evaluation row {tmp / 'eval.jsonl'}:1",
        "no JSON object in the reply",
        "exact duplicate of generated row 4",
        "too short: 1 word in output (at least 3)",
        "wrong type: field 'output' must be text, got int",
        "too long: 386 characters (max 300)",
        "email: h***@e***.com",
        "markup: '<b>', '</b>'",
    ]
    # batches shrink to what is still missing
    assert seen == [(2, 0), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1), (10, 1), (11, 2)]
    assert result.summary == {
        "teacher": f"{server.base_url} (teacher-model)", "mode": "seeds", "kind": "instruction", "asked": 2,
        "attempts": 11, "max_attempts": 12, "pending": 2, "rejected": 9, "reached": True,
        "checks": {"duplicate_of_existing": 1, "duplicate_of_generated": 1, "format": 2, "leakage": 1, "length": 2,
                   "pii": 1, "quality": 1}}

    good = result.rows[3]
    assert {k: v for k, v in good.items() if k != "_review"} == GOOD_1
    review = good["_review"]
    assert (review["status"], review["reviewed"], review["kind"], review["origin"], review["note"]) == \
        ("pending", False, "instruction", "synth", "")
    assert review["source"]["mode"] == "seeds" and len(review["source"]["seeds"]) == 3
    assert all(re.fullmatch(rf"{re.escape(str(tmp / 'seeds.jsonl'))}:[1-4]", s) for s in review["source"]["seeds"])
    assert "raw" not in review and result.rows[2]["_review"]["raw"] == "Sure! Here is a new row for you."
    assert result.rows[6]["output"] == 5  # what the teacher wrote is kept for the reviewer

    # the requests: OpenAI body, bearer key, three seed rows shown as JSON, a seed per prompt
    assert len(server.requests) == 11
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    body = first["body"]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("teacher-model", 256, 0.7)
    assert [r["body"]["seed"] for r in server.requests] == list(range(5, 16))
    assert [m["role"] for m in body["messages"]] == ["user"]
    shown = [json.loads(line) for line in body["messages"][0]["content"].splitlines() if line.startswith("{")]
    assert len(shown) == 3 and all(row in SEEDS for row in shown)
    assert 'exactly the fields "instruction", "input", "output"' in body["messages"][0]["content"]

    path, summary = result.write(tmp / "review.jsonl")
    assert summary.name == "review.summary.json" and json.loads(summary.read_text()) == result.summary
    assert read_review(path) == result.rows
    loaded = load_records(path)  # nothing is accepted yet: every row of a review file stays out of training
    assert loaded.kind == "instruction" and loaded.records == []
    assert Counter(r["reason"] for r in loaded.rejects) == Counter({
        "not accepted in review: pending": sum(r["_review"]["status"] == "pending" for r in result.rows),
        "not accepted in review: rejected": sum(r["_review"]["status"] == "rejected" for r in result.rows)})


def test_synth_without_an_api_key_sends_no_auth_header_and_stops_at_the_budget(server, seed_data, monkeypatch):
    seeds, against, _ = seed_data
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.script = ["I can't do that."] * 6
    result = synthesize(HTTPTeacher(server.base_url, "m"), seeds=seeds, n=2, existing=seeds, against=against)
    assert [r["auth"] for r in server.requests] == [None] * 6
    assert statuses(result.rows) == [("rejected", ["format"])] * 6
    assert (result.summary["attempts"], result.summary["pending"], result.summary["reached"]) == (6, 0, False)


def test_synth_classification_keeps_the_label_set_and_cycles_labels(server, tmp_path):
    rows = [{"text": "A warm, funny and moving film.", "label": "positive"},
            {"text": "Dull from the first scene to the last.", "label": "negative"},
            {"text": "The cast shines in every single scene.", "label": "positive"},
            {"text": "A tired plot and wooden acting throughout.", "label": "negative"}]
    seeds = load_records(write_jsonl(tmp_path / "sst.jsonl", rows)).records
    server.script = [
        json.dumps({"text": "The jokes never land and the story drags on and on for two long hours.",
                    "label": "negative"}),
        json.dumps({"text": "An average film with some good moments.", "label": "neutral"}),
        json.dumps({"text": "The jokes never land, and the story drags on for two long hours.", "label": "negative"}),
        json.dumps({"text": "A bright, clever script and a cast that clearly loves it.", "label": "positive"})]
    result = synthesize(HTTPTeacher(server.base_url, "m"), seeds=seeds, n=2, existing=seeds, against=[],
                        per_prompt_examples=2)
    assert statuses(result.rows) == [("pending", []), ("rejected", ["format"]),
                                     ("rejected", ["duplicate_of_generated"]), ("pending", [])]
    assert [r["_review"]["checks"][0]["detail"] for r in result.rows[1:3]] == [
        "label not in the label set: 'neutral' (allowed: negative, positive)",
        "near duplicate (similarity 0.91) of generated row 1"]
    asked = [re.search(r'Its "label" must be "(\w+)"', p).group(1) for p in server.prompts()]
    assert asked == ["negative", "positive", "negative", "positive"]
    assert [r["_review"]["source"]["label"] for r in result.rows] == asked
    for prompt, label in zip(server.prompts(), asked):  # every prompt shows an example of the label it asks for
        shown = [json.loads(line) for line in prompt.splitlines() if line.startswith("{")]
        assert len(shown) == 2 and label in {s["label"] for s in shown}


def test_http_teacher_keeps_the_order_of_concurrent_requests(server):
    server.script = [lambda body: body["messages"][0]["content"].upper() + f" #{body['seed']}"] * 6
    prompts = [f"prompt {i}" for i in range(6)]
    replies = HTTPTeacher(server.base_url, "m", concurrency=3).complete(
        [[{"role": "user", "content": p}] for p in prompts], 8, 0.0, 10)
    assert replies == [f"PROMPT {i} #{10 + i}" for i in range(6)]


def test_http_teacher_errors_name_the_url(server):
    teacher = HTTPTeacher(server.base_url, "m")
    url = f"{server.base_url}/chat/completions"
    server.script = [(500, '{"error": "model overloaded, try later"}')]
    with pytest.raises(DataError) as err:
        teacher.complete([[{"role": "user", "content": "hi"}]], 8, 0.0, 0)
    assert err.value.message == \
        f'teacher {url}: HTTP 500 Internal Server Error: {{"error": "model overloaded, try later"}}'
    server.script = [(200, "<html>not json</html>")]
    with pytest.raises(DataError, match=re.escape(f"teacher {url}: malformed reply")):
        teacher.complete([[{"role": "user", "content": "hi"}]], 8, 0.0, 0)
    server.script = [(200, json.dumps({"choices": []}))]
    with pytest.raises(DataError, match="malformed reply"):
        teacher.complete([[{"role": "user", "content": "hi"}]], 8, 0.0, 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: nothing listens there
    with pytest.raises(DataError) as err:
        HTTPTeacher(f"http://127.0.0.1:{port}/v1", "m", timeout=5).complete([[{"role": "user", "content": "x"}]],
                                                                           8, 0.0, 0)
    assert err.value.message.startswith(f"teacher http://127.0.0.1:{port}/v1/chat/completions: can't connect")
    assert "server running" in err.value.hint


def test_chunk_text_splits_on_paragraphs_then_sentences():
    text = "Tides rise. Tides fall.\n\nThe moon pulls the sea.\n\n" + "Waves break on the rocks today. " * 4
    assert chunk_text(text, size=60) == [
        "Tides rise. Tides fall.\n\nThe moon pulls the sea.",
        "Waves break on the rocks today.", "Waves break on the rocks today.",
        "Waves break on the rocks today.", "Waves break on the rocks today."]
    assert chunk_text(text, size=70) == [
        "Tides rise. Tides fall.\n\nThe moon pulls the sea.",
        "Waves break on the rocks today. Waves break on the rocks today.",
        "Waves break on the rocks today. Waves break on the rocks today."]
    assert chunk_text("a" * 25 + " bb", size=10) == ["a" * 10, "a" * 10, "aaaaa bb"]


def test_synth_from_documents_makes_grounded_instruction_rows(server, tmp_path):
    (tmp_path / "tides.txt").write_text("The moon's pull raises the tides twice a day.\n\n"
                                        "Spring tides happen at full and new moon.\n", encoding="utf-8")
    (tmp_path / "notes.jsonl").write_text(json.dumps({"text": "Neap tides come at the quarter moons."}) + "\n")
    docs = load_documents([tmp_path / "tides.txt", tmp_path / "notes.jsonl"])
    assert [d.name for d in docs] == ["tides.txt", "notes.jsonl:1"]
    server.script = [
        json.dumps({"question": "What raises the tides?", "answer": "The pull of the moon raises them."}),
        json.dumps({"question": "When do spring tides happen?"}),
        'Answer: {"question": "When do neap tides come?", "answer": "They come at the quarter moons."}',
        json.dumps({"question": "How often do tides rise each day?", "answer": "They rise twice every day."}),
    ]
    result = synthesize(HTTPTeacher(server.base_url, "m"), documents=docs, n=3, chunk_chars=50)
    assert statuses(result.rows) == [("pending", []), ("rejected", ["format"]), ("pending", []), ("pending", [])]
    assert [r["_review"]["source"] for r in result.rows] == [
        {"mode": "documents", "document": "tides.txt", "chunk": 0},
        {"mode": "documents", "document": "tides.txt", "chunk": 1},
        {"mode": "documents", "document": "notes.jsonl:1", "chunk": 0},
        {"mode": "documents", "document": "tides.txt", "chunk": 0}]  # chunks start over once all were asked
    assert {k: v for k, v in result.rows[0].items() if k != "_review"} == {
        "instruction": "What raises the tides?", "input": "", "output": "The pull of the moon raises them."}
    assert result.rows[1]["_review"]["checks"][0]["detail"] == "missing field: 'answer' (mapped from 'output')"
    assert result.rows[1]["question"] == "When do spring tides happen?"
    assert '"""\nThe moon\'s pull raises the tides twice a day.\n"""' in server.prompts()[0]
    assert "Spring tides happen at full and new moon." in server.prompts()[1]
    assert result.summary["mode"] == "documents" and result.summary["pending"] == 3
    with pytest.raises(DataError, match="documents make instruction rows"):
        synthesize(HTTPTeacher(server.base_url, "m"), documents=docs, kind="classification", n=1)


def test_local_teacher_answers_every_prompt_and_gibberish_is_rejected_as_format(tiny_model_dir, seed_data):
    seeds, against, _ = seed_data
    teacher = LocalTeacher(str(tiny_model_dir))
    replies = teacher.complete([[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Hi there"}],
                                [{"role": "user", "content": "Write JSON"}]], 6, 0.0, 0)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    result = synthesize(teacher, seeds=seeds, n=2, existing=seeds, against=against, max_new_tokens=6,
                        max_attempts=3, temperature=0.0)
    assert len(result.rows) == 3
    assert statuses(result.rows) == [("rejected", ["format"])] * 3
    assert result.summary["checks"] == {"format": 3} and result.summary["teacher"] == str(tiny_model_dir)
    assert all(isinstance(r["_review"]["raw"], str) for r in result.rows)


def test_local_teacher_loads_a_run_folder(tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    shutil.copytree(tiny_model_dir, run / "tokenizer")
    shutil.copy(tiny_model_dir / "generation_config.json", run / "generation_config.json")
    (run / "manifest.json").write_text(json.dumps(
        {"tunesmith_run": 1, "method": "sft", "saved": "model",
         "base_model": {"name": str(tiny_model_dir), "resolved": str(tiny_model_dir)}}))
    teacher = LocalTeacher(str(run))
    assert teacher.loaded.label == f"tuned ({run})" and teacher.loaded.tokenizer.padding_side == "left"
    assert len(teacher.complete([[{"role": "user", "content": "Hello"}]] * 2, 4, 0.0, 0)) == 2


def _review_rows():
    def row(fields, status="pending", checks=()):
        return review_row("instruction", fields, status=status, checks=list(checks), origin="synth", teacher="t",
                          source={"mode": "documents", "document": "d.txt", "chunk": 0})

    return [row(GOOD_1),
            row(GOOD_2, "rejected", [{"check": "leakage", "detail": "prompt is exact duplicate of eval.jsonl:1"}]),
            row({"instruction": "Name a planet.", "input": "", "output": "Mars."}, "rejected",
                [{"check": "length", "detail": "too short: 1 word in output (at least 3)"}]),
            row({"instruction": "Name an ocean.", "input": "", "output": "The Pacific is the largest ocean."}),
            row({"question": "What is a tide?"}, "rejected",
                [{"check": "format", "detail": "missing field: 'instruction'"}])]


def test_review_file_decides_saves_after_each_and_resumes(tmp_path):
    path = tmp_path / "review.jsonl"
    from tunesmith.data.review import write_review

    write_review(path, _review_rows())
    on_disk = []

    def scripted(answers):
        answers = iter(answers)

        def read(prompt):
            on_disk.append([(r["_review"]["status"], r["_review"]["reviewed"]) for r in read_review(path)])
            return next(answers)
        return read

    def editor(file):
        fields = json.loads(file.read_text())
        assert fields == {"instruction": "Name a planet.", "input": "", "output": "Mars."}
        file.write_text(json.dumps({**fields, "output": "Mars is the fourth planet."}))

    out: list[str] = []
    counts = review_file(path, read=scripted(["a", "x", "r", "e", "a", "s", "a", "q"]), write=out.append,
                         editor=editor)
    assert counts == {"total": 5, "reviewed": 3, "accepted": 2, "rejected": 1, "waiting": 2}
    assert on_disk[1][0] == ("accepted", True)  # saved before the next question
    assert on_disk[3][1] == ("rejected", True)
    rows = read_review(path)
    assert [(r["_review"]["status"], r["_review"]["reviewed"]) for r in rows] == [
        ("accepted", True), ("rejected", True), ("accepted", True), ("pending", False), ("rejected", False)]
    assert rows[2]["output"] == "Mars is the fourth planet." and rows[2]["_review"]["edited"] is True
    assert rows[2]["_review"]["checks"] == [{"check": "length", "detail": "too short: 1 word in output (at least 3)"}]
    assert "unknown answer 'x'; type one of a, r, e, s, q" in out
    assert any(line.startswith("can't accept: not a usable instruction row (missing field: 'instruction')")
               for line in out)
    assert out[0] == f"{path}: 5 of 5 rows to review · [a]ccept  [r]eject  [e]dit  [s]kip  [q]uit"
    assert "1/5 reviewed · 1 accepted · 0 rejected" in out and out[-1] == \
        f"saved {path} · 3/5 reviewed · 2 accepted · 1 rejected · 2 still to review (run again to go on)"

    # resume: only the skipped and the unreviewed rows come back; inline edit fixes the broken row
    out.clear()
    counts = review_file(path, read=scripted(["a", "e", "instruction=What is a tide?",
                                              "output=The regular rise and fall of the sea.", "", "a"]),
                         write=out.append)
    assert out[0] == f"{path}: 2 of 5 rows to review · [a]ccept  [r]eject  [e]dit  [s]kip  [q]uit"
    assert out[1].startswith("── row 4/5 · pending · synth · d.txt chunk 0\n  instruction: Name an ocean.\n")
    assert counts == {"total": 5, "reviewed": 5, "accepted": 4, "rejected": 1, "waiting": 0}
    rows = read_review(path)
    assert {k: v for k, v in rows[4].items() if k != "_review"} == {
        "instruction": "What is a tide?", "input": "", "output": "The regular rise and fall of the sea."}
    assert rows[4]["_review"]["checks"] == [] and rows[4]["_review"]["status"] == "accepted"
    assert review_file(path, read=scripted([]), write=out.append)["waiting"] == 0  # nothing left to ask

    accepted = accepted_rows(path)
    assert [r["instruction"] for r in accepted] == ["List three primary colours.", "Name a planet.",
                                                    "Name an ocean.", "What is a tide?"]
    assert all(r["synthetic"] is True and "_review" not in r for r in accepted)
    assert export_accepted(path, tmp_path / "accepted.jsonl") == 4
    exported = [json.loads(line) for line in (tmp_path / "accepted.jsonl").read_text().splitlines()]
    assert exported == accepted
    loaded = load_records(tmp_path / "accepted.jsonl")
    assert (loaded.kind, len(loaded.records), len(loaded.rejects)) == ("instruction", 4, 0)


def test_accept_passing_accepts_only_unreviewed_pending_rows(tmp_path):
    from tunesmith.data.review import write_review

    path = write_review(tmp_path / "review.jsonl", _review_rows())
    assert accept_passing(path) == 2
    assert [r["_review"]["status"] for r in read_review(path)] == \
        ["accepted", "rejected", "rejected", "accepted", "rejected"]
    assert accept_passing(path) == 0
    (tmp_path / "plain.jsonl").write_text(json.dumps(GOOD_1) + "\n")
    with pytest.raises(DataError, match=r"plain.jsonl:1: not a review row"):
        read_review(tmp_path / "plain.jsonl")


def _records(tmp_path, rows, name="data.jsonl"):
    return load_records(write_jsonl(tmp_path / name, rows)).records


def test_noise_is_seeded_label_preserving_and_marked(tmp_path):
    rows = [{"text": "The service at this restaurant was wonderful and friendly.", "label": "positive"},
            {"text": "Terrible food, rude waiters and a long wait for everything.", "label": "negative"}]
    records = _records(tmp_path, rows)
    first = augment(records, "noise", copies=2, seed=0)
    assert first == augment(records, "noise", copies=2, seed=0)
    assert first != augment(records, "noise", copies=2, seed=1)
    assert [r["text"] for r in first] == ["Teh service at this restaurant was wonderful and friendly.",
                                          "The service at thsi restaurant was wonderful and friendly.",
                                          "Terrbile food, rude waiters and a long wait for everything.",
                                          "Terrible food, rude waters and a long wait for everything."]
    path = tmp_path / "data.jsonl"
    assert [r["augmented"] for r in first] == [{"from": f"{path}:1", "how": "noise"}] * 2 + \
        [{"from": f"{path}:2", "how": "noise"}] * 2
    assert [r["label"] for r in first] == ["positive", "positive", "negative", "negative"]
    for variant, original in zip(first, [rows[0], rows[0], rows[1], rows[1]]):
        assert variant["text"] != original["text"]
        assert set(variant) == {"text", "label", "augmented"}
        words_a, words_b = variant["text"].split(), original["text"].split()
        assert abs(len(words_a) - len(words_b)) <= 1  # light: one word at this rate and length
        assert sum(a != b for a, b in zip(words_a, words_b)) >= 1


def test_noise_touches_only_the_input_side(tmp_path):
    rows = [{"instruction": "Summarise the following paragraph briefly.", "input": "Rivers carry water to seas.",
             "output": "Rivers flow into seas."}]
    [variant] = augment(_records(tmp_path, rows), "noise", protect=("input",))  # seeded by file name and line
    assert variant["output"] == rows[0]["output"] and variant["input"] == rows[0]["input"]
    assert variant["instruction"] == "uSmmarise the following paragraph briefly."
    chats = [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": "Please explain photosynthesis simply."},
                           {"role": "assistant", "content": "Plants turn light into sugar."}]}]
    [chat] = augment(_records(tmp_path, chats, "chat.jsonl"), "noise")
    assert [m["content"] for m in chat["messages"]][0::2] == ["You are a helpful assistant.",
                                                              "Plants turn light into sugar."]
    assert chat["messages"][1]["content"] != "Please explain photosynthesis simply."
    import random

    assert [add_noise("Add 12 and 30", random.Random(seed)) for seed in range(6)] == [
        "Add 12 adn 30", "AAdd 12 and 30", "dAd 12 and 30", "Add 12 30", "Add 12 30", "12 and 30"]  # numbers stay
    assert add_noise("12 34 ok", random.Random(0)) == "12 34 ok"  # no word long enough to touch
    with pytest.raises(DataError, match="can't protect unknown field 'answer'"):
        augment(_records(tmp_path, rows), "noise", protect=("answer",))


def test_paraphrase_asks_the_teacher_and_skips_copies_of_the_original(server, tmp_path):
    rows = [{"text": "The service was wonderful and the staff were friendly.", "label": "positive"},
            {"text": "The food was cold.", "label": "negative"}]
    server.script = ['Paraphrase: "Friendly staff and wonderful service."', "The food was cold."]
    teacher = HTTPTeacher(server.base_url, "para-model")
    out = augment(_records(tmp_path, rows), "paraphrase", teacher=teacher, seed=3)
    assert out == [{"text": "Friendly staff and wonderful service.", "label": "positive",
                    "augmented": {"from": f"{tmp_path / 'data.jsonl'}:1", "how": "paraphrase",
                                  "teacher": f"{server.base_url} (para-model)"}}]
    assert [p.endswith(f"Text:\n{r['text']}") for p, r in zip(server.prompts(), rows)] == [True, True]
    assert [r["body"]["model"] for r in server.requests] == ["para-model"] * 2
    assert clean_paraphrase("```\nShort and sweet.\n```") == "Short and sweet."
    with pytest.raises(DataError, match="paraphrasing needs a teacher"):
        augment(_records(tmp_path, rows), "paraphrase")


def test_review_keeps_the_augmented_mark_through_edits_and_export(tmp_path):
    from tunesmith.data.review import write_review

    mark = {"from": "data.jsonl:4", "how": "paraphrase", "teacher": "t"}
    row = review_row("classification", {"text": "Friendly staff, great srevice.", "label": "positive",
                                        "augmented": mark},
                     status="pending", checks=[], origin="augment", teacher="t", source={"from": "data.jsonl:4"})
    path = write_review(tmp_path / "review.jsonl", [row])

    def editor(file):
        fields = json.loads(file.read_text())
        assert fields == {"text": "Friendly staff, great srevice.", "label": "positive"}  # the mark isn't edited
        file.write_text(json.dumps({**fields, "text": "Friendly staff, great service."}))

    out: list[str] = []
    answers = iter(["e", "a"])
    review_file(path, read=lambda prompt: next(answers), write=out.append, editor=editor)
    assert accepted_rows(path) == [{"text": "Friendly staff, great service.", "label": "positive",
                                    "augmented": mark, "synthetic": True}]
    assert "── row 1/1 · pending · augment · from data.jsonl:4 · edited" in "\n".join(out)
    assert out[-1] == f"saved {path} · 1/1 reviewed · 1 accepted · 0 rejected"
