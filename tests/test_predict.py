"""`tunesmith predict`: texts or a file's rows labelled with the run's own probabilities (classify, features),
the top labels in order, unusable rows to a rejects file with their reasons and the counts printed; a run that is
not a classifier and bad arguments exit 2 with what to do instead."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from conftest import write_jsonl
from test_classify import PROBES, classifier_runs  # noqa: F401 - a fixture
from tunesmith.cli import main


def call(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def own(run, texts, name):
    from tunesmith.methods import classify, features

    return (features if name == "c" else classify).predict(run, texts)


@pytest.mark.parametrize("name", ["a", "c"])  # classify with LoRA; features
def test_texts_on_the_command_line_get_the_runs_own_top_labels(classifier_runs, name):
    from tunesmith.predict import predict_texts

    _, _, runs = classifier_runs
    expected = own(runs[name], PROBES, name)
    answers = predict_texts(runs[name], PROBES, top=2)
    for answer, probs in zip(answers, expected):
        best = max(probs, key=probs.get)
        assert answer["label"] == best and answer["probability"] == pytest.approx(probs[best])
        assert [t["label"] for t in answer["top"]] == sorted(probs, key=lambda k: -probs[k])
        assert [t["probability"] for t in answer["top"]] == pytest.approx(sorted(probs.values(), reverse=True))
    code, stdout, _ = call("predict", str(runs[name]), *PROBES, "--top", "2")
    lines = stdout.strip().splitlines()
    assert code == 0 and len(lines) == len(PROBES)
    for line, answer, text in zip(lines, answers, PROBES):
        assert line.split()[:2] == [answer["label"], f"{answer['probability']:.3f}"] and text in line
        assert f"(then {answer['top'][1]['label']} {answer['top'][1]['probability']:.3f})" in line


def test_a_file_is_labelled_row_by_row_and_unusable_rows_go_to_rejects(classifier_runs, tmp_path):
    _, _, runs = classifier_runs
    data = write_jsonl(tmp_path / "questions.jsonl", [
        {"id": 1, "question": PROBES[0]}, {"id": 2, "question": ""}, {"id": 3, "other": "x"},
        {"id": 4, "question": PROBES[1]}, {"id": 5, "question": 7}])
    with open(data, "a") as fh:
        fh.write("{not json\n")
    out = tmp_path / "labelled.csv"
    code, stdout, _ = call("predict", str(runs["a"]), "--data", str(data), "--column", "question", "--out", str(out),
                           "--top", "1")
    assert code == 0, stdout
    assert stdout.splitlines()[0] == ("6 rows read, 2 labelled, 4 rejected (empty field ×1, missing field ×1, "
                                      "wrong type ×1, malformed JSON ×1)")
    expected = own(runs["a"], PROBES[:2], "a")
    import csv

    rows = list(csv.DictReader(open(out)))
    assert [int(r["line"]) for r in rows] == [1, 4] and [r["text"] for r in rows] == PROBES[:2]
    for row, probs in zip(rows, expected):
        assert row["label"] == max(probs, key=probs.get)
        assert float(row["probability"]) == pytest.approx(max(probs.values()))
        assert len(json.loads(row["top"])) == 1
    rejects = [json.loads(x) for x in (tmp_path / "labelled.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [
        (2, "empty field"), (3, "missing field"), (5, "wrong type"), (6, "malformed JSON")]
    assert "labels: " in stdout and f"predictions: {out}" in stdout
    # default output: RUN/predictions/NAME.jsonl
    code, stdout, _ = call("predict", str(runs["c"]), "--data", str(data), "--column", "question")
    written = [json.loads(x) for x in (runs["c"] / "predictions" / "questions.jsonl").read_text().splitlines()]
    assert code == 0 and [w["line"] for w in written] == [1, 4] and len(written[0]["top"]) == 2
    assert [w["row"] for w in written] == [{"id": 1}, {"id": 4}]  # the other columns, to join the answers back


def test_not_a_classifier_and_bad_arguments_exit_2(classifier_runs, tmp_path, tiny_model_dir):
    from test_classify import make_recipe
    from tunesmith.train import train_run

    _, _, runs = classifier_runs
    sft = make_recipe(tmp_path, tiny_model_dir, {"name": "sft", "adapter": "lora"}, name="sft", precision="fp32")
    train_run(sft, echo=lambda s: None)
    code, _, err = call("predict", str(tmp_path / "sft"), "hello")
    assert code == 2 and "`method: sft` made a text generator" in err and "tunesmith generate" in err
    code, _, err = call("predict", str(runs["a"]))
    assert code == 2 and "give texts to label or --data FILE" in err
    code, _, err = call("predict", str(runs["a"]), "x", "--data", "y.jsonl")
    assert code == 2 and "one of the two" in err
    code, _, err = call("predict", str(runs["a"]), "--data", str(tmp_path / "none.jsonl"))
    assert code == 2 and "none.jsonl: no such file" in err
    only_other = write_jsonl(tmp_path / "other.jsonl", [{"question": "a"}])
    code, _, err = call("predict", str(runs["a"]), "--data", str(only_other))
    assert code == 2 and "no row has a usable 'text' column" in err and "--column" in err
    code, _, err = call("predict", str(tmp_path / "missing-run"), "x")
    assert code == 2 and "no such run folder" in err
    assert "Traceback" not in err
