"""The loop back (loop.py): logged requests with feedback become rows in the run's format, through the data
check; retrain trains the run's recipe on its own rows plus those, and compares the new run with it, paired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunesmith.cli import main
from tunesmith.recipe import load_recipe
from test_bad_input import snapshot
from tunesmith.loop import INCLUDE, decide, feedback_rows, next_run_name
from tunesmith.serve.requestlog import RequestLog
from tunesmith.train import train_run

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]


def train_chat_run(folder: Path, model_dir: Path, rows: list[dict] = CHATS) -> Path:
    """A tiny random-Llama LoRA run on `rows` (CHATS: 16 training rows, 4 held out), trained for 2 steps."""
    write_jsonl(folder / "train.jsonl", rows)
    settings = {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 64, "log_every": 1, "seed": 7}
    (folder / "recipe.yaml").write_text("\n".join([
        f"model: {{name: {model_dir}}}", "data: {train: train.jsonl, validation_fraction: 0.2}",
        "method: {name: sft, adapter: lora}", "train: " + json.dumps(settings), "eval: {loss_before: false}",
        f"output: {{dir: {folder / 'run'}}}"]) + "\n")
    train_run(load_recipe(folder / "recipe.yaml"), echo=lambda s: None, recipe_path=folder / "recipe.yaml")
    return folder / "run"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def make_log(path: Path, validation_question: str) -> None:
    """A log with every case from-log tells apart (with content, except the request `nocontent`)."""
    def request(log, rid, question, answer, **more):
        row = {"id": rid, "endpoint": "chat.completions", "model": "run", "status": 200, "prompt": chat(question),
               "answer": answer, "input_chars": len(question), **more}
        log.record({**row, "prompt": question} if row["endpoint"] == "completions" else row)

    with RequestLog(path, log_content=True) as log:
        request(log, "up", "What is the capital of France?", "Paris.")
        request(log, "corrected", "What is 7 times 6?", "41.")
        request(log, "down", "Name a red fruit.", "A banana.")
        request(log, "dup-train", "What is 3 plus 3?", "3 plus 3 is 6.")  # a training row, word for word
        request(log, "leaked", validation_question, "I don't know.")
        request(log, "dup-new", "What is the capital of France?", "Paris.")  # the same as `up`
        request(log, "failed", "Hello?", None, status=429, error_code="rate_limit_exceeded")
        request(log, "no-feedback", "Unrated question?", "Unrated answer.")
        request(log, "completion", "Once upon a", " time.", endpoint="completions")
        for rid, rating, correction in [("up", "up", None), ("corrected", "down", "7 times 6 is 42."),
                                        ("down", "down", None), ("dup-train", "up", None), ("leaked", "up", None),
                                        ("dup-new", "up", None), ("failed", "up", None), ("completion", "up", None),
                                        ("corrected", "up", None), ("corrected", None, "7 times 6 is 42.")]:
            assert log.feedback(rid, rating, correction)
    with RequestLog(path, log_content=False) as log:  # a server without --log-content
        request(log, "nocontent", "What is 9 plus 1?", "10.")
        assert log.feedback("nocontent", "up")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return train_chat_run(tmp_path_factory.mktemp("loop"), tiny_model_dir)


def validation_question(run: Path) -> str:
    return rows_of(run / "data" / "validation.jsonl")[0]["data"]["messages"][0]["content"]


def test_from_log_writes_the_upvoted_and_corrected_rows_and_rejects_the_rest(chat_run, tmp_path, capsys):
    log = tmp_path / "requests.sqlite"
    question = validation_question(chat_run)
    assert question not in [r["data"]["messages"][0]["content"] for r in rows_of(chat_run / "data" / "train.jsonl")]
    make_log(log, question)
    out = tmp_path / "new.jsonl"
    assert main(["data", "from-log", str(log), "--run", str(chat_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert rows_of(out) == [
        {"messages": [*chat("What is the capital of France?"), {"role": "assistant", "content": "Paris."}],
         "request_id": "up"},
        {"messages": [*chat("What is 7 times 6?"), {"role": "assistant", "content": "7 times 6 is 42."}],
         "request_id": "corrected"}]
    rejects = {r["request_id"]: r for r in rows_of(tmp_path / "new.rejects.jsonl")}
    assert sorted(rejects) == ["completion", "down", "dup-new", "dup-train", "failed", "leaked", "nocontent"]
    assert rejects["completion"]["reason"].startswith("not a conversation: a completions request continues raw text")
    assert rejects["down"]["reason"] == "not used: downvoted without a correction"
    assert rejects["nocontent"]["reason"].startswith("no logged content: the server ran without --log-content")
    assert rejects["failed"]["reason"] == "failed request: status 429 (rate_limit_exceeded)"
    assert rejects["leaked"]["reason"].startswith("leakage: appears exactly in the run's validation rows at ")
    assert rejects["dup-train"]["reason"].startswith("duplicate: exactly a training row of the run at ")
    assert rejects["dup-new"]["reason"] == "duplicate: exactly the row of request up"
    assert rejects["dup-new"]["row"]["messages"][1]["content"] == "Paris."  # the row it would have made is kept
    assert "10 requests logged, 9 with feedback: 2 chat rows written, 7 rejected" in printed
    assert "rejected — duplicate: 2" in printed and "rejected — no logged content: 1" in printed

    # --include up: the correction is not used, and says so
    assert main(["data", "from-log", str(log), "--run", str(chat_run), "--out", str(out), "--include", "up"]) == 0
    assert [r["request_id"] for r in rows_of(out)] == ["up"]
    rejects = {r["request_id"]: r["reason"] for r in rows_of(tmp_path / "new.rejects.jsonl")}
    assert rejects["corrected"] == "not used: a correction, and --include is up"
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_rows_take_the_runs_kind():
    request = {"id": "clf-1", "endpoint": "classify", "status": 200, "prompt": ["great film", "dull film"],
               "prediction": [{"label": "pos", "probability": 0.9}, {"label": "pos", "probability": 0.6}]}
    labels = ["neg", "pos"]
    upvoted = feedback_rows(request, {"rating": "up", "correction": None}, INCLUDE, "classification", labels, None)
    assert upvoted == [{"text": "great film", "label": "pos"}, {"text": "dull film", "label": "pos"}]
    corrected = feedback_rows(request, {"rating": "down", "correction": '["pos", "neg"]'}, INCLUDE, "classification",
                              labels, None)
    assert corrected == [{"text": "great film", "label": "pos"}, {"text": "dull film", "label": "neg"}]
    from tunesmith.data.records import RowRejected

    for correction, reason in [("neg", "correction for 2 texts: give a JSON list of 2 labels"),
                               ('["pos", "meh"]', "label not in the run's labels: 'meh'")]:
        with pytest.raises(RowRejected, match=reason.replace("[", r"\[")):
            feedback_rows(request, {"rating": "down", "correction": correction}, INCLUDE, "classification", labels,
                          None)
    with pytest.raises(RowRejected, match="no logged content"):
        feedback_rows({**request, "prompt": None}, {"rating": "up"}, INCLUDE, "classification", labels, None)
    chat_answer = {"id": "c", "endpoint": "chat.completions", "status": 200,
                   "prompt": [{"role": "system", "content": "Label it."}, *chat("awful")], "answer": " neg "}
    assert feedback_rows(chat_answer, {"rating": "up"}, INCLUDE, "classification", labels, "Label it.") == \
        [{"text": "awful", "label": "neg"}]
    asked = {"id": "c2", "endpoint": "chat.completions", "status": 200, "prompt": chat("Sum 2 and 2."), "answer": "5"}
    assert feedback_rows(asked, {"rating": "down", "correction": "4"}, INCLUDE, "instruction", None, None) == \
        [{"instruction": "Sum 2 and 2.", "input": "", "output": "4"}]
    long_chat = {**asked, "prompt": [*chat("Hi."), {"role": "assistant", "content": "Hello."}, *chat("Sum 2 and 2.")]}
    with pytest.raises(RowRejected, match=r"not one question: .* 3 messages \(user, assistant, user\)"):
        feedback_rows(long_chat, {"rating": "up"}, INCLUDE, "instruction", None, None)
    assert feedback_rows(long_chat, {"rating": "up"}, INCLUDE, "chat", None, None) == \
        [{"messages": [*long_chat["prompt"], {"role": "assistant", "content": "5"}]}]


def results(diff: float, low: float, high: float) -> dict:
    return {"primary_metric": "rougeL", "folder": "x", "differences": [
        {"metric": "rougeL", "system": "tuned", "versus": "run", "system_score": 0.5 + diff, "versus_score": 0.5,
         "diff": diff, "ci_low": low, "ci_high": high, "p_value": 0.04, "n": 40}]}


@pytest.mark.parametrize("diff,low,high,verdict,reason", [
    (0.1, 0.02, 0.2, "PROMOTE", "the new run is better and the interval excludes a loss: rougeL 0.6000 vs 0.5000, "
                                "difference +0.1000 (95% interval [+0.0200, +0.2000], p=0.04, 40 paired rows)"),
    (0.1, -0.01, 0.2, "KEEP", "the new run is better, but the interval includes a loss"),
    (0.0, -0.1, 0.1, "KEEP", "the new run is no better"),
    (-0.1, -0.2, -0.01, "KEEP", "the new run is worse"),
])
def test_the_verdict_needs_a_gain_whose_interval_excludes_a_loss(diff, low, high, verdict, reason):
    found = decide(results(diff, low, high), Path("run"), Path("run-retrain-1"), 3)
    assert found["verdict"] == verdict and found["reason"].startswith(reason)
    assert (found["diff"], found["ci_low"], found["ci_high"], found["rows"]) == (diff, low, high, 40)


def test_retrain_trains_on_the_runs_rows_plus_the_new_ones_and_compares_paired(tmp_path, tiny_model_dir, capsys):
    run = train_chat_run(tmp_path, tiny_model_dir)
    old_train = [r["data"] for r in rows_of(run / "data" / "train.jsonl")]
    old_validation = [r["data"] for r in rows_of(run / "data" / "validation.jsonl")]
    (tmp_path / "train.jsonl").unlink()  # the files the run was first trained on are never read again
    added = [{"messages": [*chat(f"Spell the number {w}."), {"role": "assistant", "content": w.upper()}],
              "request_id": f"r{i}"} for i, w in enumerate(["one", "two", "three"])]
    write_jsonl(tmp_path / "new.jsonl", added)
    capsys.readouterr()
    assert main(["retrain", str(run), "train.max_steps=1", "--add", str(tmp_path / "new.jsonl"),
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    new = tmp_path / "run-retrain-1"
    assert [r["data"] for r in rows_of(new / "data" / "train.jsonl")] == \
        old_train + [{"messages": a["messages"]} for a in added]
    assert [r["data"] for r in rows_of(new / "data" / "validation.jsonl")] == old_validation
    recipe = load_recipe(new / "recipe.yaml", check_files=False)
    assert recipe.train.max_steps == 1 and recipe.data.train == str((tmp_path / "run-retrain-1-data" /
                                                                      "train.jsonl").resolve())
    verdict = json.loads((new / "promotion.json").read_text())
    assert verdict["primary_metric"] == "rougeL" and verdict["rows"] == 4 and verdict["added_rows"] == 3
    assert verdict["current"] == str(run) and verdict["new"] == str(new) and verdict["adapter"] is True
    evaluated = json.loads((new / "eval" / "promotion" / "results.json").read_text())
    assert set(evaluated["metrics"]) == {"tuned", "run"}
    paired = next(d for d in evaluated["differences"] if d["metric"] == "rougeL")
    assert paired["versus"] == "run" and paired["n"] == 4
    assert [verdict[k] for k in ("new_score", "current_score", "diff", "ci_low", "ci_high", "p_value")] == \
        [paired[k] for k in ("system_score", "versus_score", "diff", "ci_low", "ci_high", "p_value")]
    assert verdict["diff"] == pytest.approx(verdict["new_score"] - verdict["current_score"])
    assert verdict["ci_low"] <= verdict["diff"] <= verdict["ci_high"]
    promoted = verdict["diff"] > 0 and verdict["ci_low"] >= 0
    assert verdict["verdict"] == ("PROMOTE" if promoted else "KEEP")
    assert f"{verdict['verdict']}: {verdict['reason']}" in printed

    # an override of the data retrain decides is refused before anything is written; the first retrain stays
    before = snapshot(tmp_path)
    code = main(["retrain", str(run), "data.train=x.jsonl", "--add", str(tmp_path / "new.jsonl")])
    assert code == 2 and "retrain decides data.train" in capsys.readouterr().err
    code = main(["retrain", str(run), "--add", str(tmp_path / "new.jsonl"), "--out", str(new)])
    assert code == 2 and "run-retrain-1: run folder already exists" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_the_new_run_is_named_after_the_first_free_retrain_number(tmp_path):
    (tmp_path / "run-retrain-1").mkdir()
    (tmp_path / "run-retrain-2-data").mkdir()  # a data folder left by a retrain that stopped counts as taken
    assert next_run_name(tmp_path / "run") == tmp_path / "run-retrain-3"


def test_retrain_of_a_classification_run_compares_accuracy(tmp_path, tiny_model_dir, capsys):
    rows = [{"text": f"review number {i} was {'great' if i % 2 else 'awful'}", "label": "pos" if i % 2 else "neg"}
            for i in range(20)]
    run = train_chat_run(tmp_path, tiny_model_dir, rows)
    write_jsonl(tmp_path / "new.jsonl", [{"text": "a truly great film", "label": "pos"},
                                         {"text": "an awful, dull film", "label": "neg"}])
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "a fine film", "label": "meh"}])
    assert main(["retrain", str(run), "--add", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl: 1 of 1 rows can't be read as classification rows (first: line 1: label not in the label " \
           "set: 'meh'" in capsys.readouterr().err
    assert main(["retrain", str(run), "--add", str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "next")]) == 0
    verdict = json.loads((tmp_path / "next" / "promotion.json").read_text())
    held_out = rows_of(run / "data" / "validation.jsonl")
    assert verdict["primary_metric"] == "accuracy" and verdict["rows"] == len(held_out) == 4
    assert [r["data"] for r in rows_of(tmp_path / "next" / "data" / "train.jsonl")][-2:] == \
        [{"text": "a truly great film", "label": "pos"}, {"text": "an awful, dull film", "label": "neg"}]
    assert verdict["verdict"] == ("PROMOTE" if verdict["diff"] > 0 and verdict["ci_low"] >= 0 else "KEEP")


def test_a_promoted_adapter_is_put_into_service_with_vllms_load_endpoint():
    from tunesmith.loop import verdict_text

    found = {**decide(results(0.1, 0.02, 0.2), Path("run"), Path("runs/run-retrain-1"), 3), "adapter": True}
    text = verdict_text(found)
    assert "POST http://127.0.0.1:8000/v1/load_lora_adapter" in text
    assert f'{{"lora_name": "run-retrain-1", "lora_path": "{Path("runs/run-retrain-1").resolve()}"}}' in text
    assert "restart `tunesmith serve runs/run-retrain-1`" in verdict_text({**found, "adapter": False})
    assert "load_lora_adapter" not in verdict_text(decide(results(-0.1, -0.2, 0.0), Path("run"), Path("new"), 3))
