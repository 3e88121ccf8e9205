"""`tunesmith predict`: texts or a file's rows labelled with the run's own probabilities (classify, features),
the top labels in order, unusable rows to a rejects file with their reasons and the counts printed; a run that is
not a classifier and bad arguments exit 2 with what to do instead."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

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


def test_bad_arguments_exit_2(classifier_runs, tmp_path):
    _, _, runs = classifier_runs
    code, _, err = call("predict", str(runs["a"]))
    assert code == 2 and "give texts to label or --data FILE" in err
    code, _, err = call("predict", str(runs["a"]), "x", "--data", "y.jsonl")
    assert code == 2 and "one of the two" in err
    code, _, err = call("predict", str(runs["a"]), "--data", str(tmp_path / "none.jsonl"))
    assert code == 2 and "none.jsonl: no such file" in err
    only_other = write_jsonl(tmp_path / "other.jsonl", [{"question": "a"}])
    code, _, err = call("predict", str(runs["a"]), "--data", str(only_other))
    assert code == 2 and "no row has a usable 'text' column" in err and "--column" in err
    code, _, err = call("predict", str(runs["a"]), "x", "--top", "0")
    assert code == 2 and "argument --top: '0' is not a whole number ≥ 1" in err
    code, _, err = call("predict", str(runs["a"]), "x", "--labels", " , ")
    assert code == 2 and "no labels" in err and "--labels positive,negative" in err
    code, _, err = call("predict", str(tmp_path / "missing-run"), "x")
    assert code == 2 and "no such run folder" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def answering_runs(tmp_path_factory, tiny_model_dir, classifier_runs):
    """An sft run trained on the classification rows (label = the answer) and a fewshot run, with eval's answers
    on the held-out file."""
    from test_classify import make_recipe
    from tunesmith.evaluation.runner import EvalOptions, evaluate_run
    from tunesmith.train import train_run

    tmp = tmp_path_factory.mktemp("answering")
    _, held_out, _ = classifier_runs
    runs = {}
    for name, method, settings in (
            ("sft", {"name": "sft", "adapter": "lora"}, {"max_steps": 100, "learning_rate": 5e-3}),
            ("fewshot", {"name": "fewshot", "shots": 2}, {})):
        recipe = make_recipe(tmp, tiny_model_dir, method, name=name, precision="fp32",
                             data={"validation": str(held_out), "system_prompt": "Answer pos or neg."}, **settings)
        train_run(recipe, echo=lambda s: None)
        results = evaluate_run(tmp / name, EvalOptions(against=(), forgetting=False, n_resamples=10),
                               echo=lambda s: None)
        runs[name] = (tmp / name, [json.loads(x) for x in
                                   (Path(results["folder"]) / "examples.jsonl").read_text().splitlines()])
    return runs


@pytest.mark.parametrize("name", ["sft", "fewshot"])
def test_a_run_that_answers_in_text_chooses_among_its_trained_labels_as_eval_does(answering_runs, name):
    """Generative classification: the labels default to the trained ones, the probabilities are normalized over
    them, and the choice is eval's for the same rows (same system prompt, same shots)."""
    from tunesmith.predict import predict_texts

    run, examples = answering_runs[name]
    texts = [e["input"] for e in examples]
    answers = predict_texts(run, texts, top=2)
    assert [a["label"] for a in answers] == [e["tuned"]["pred"] for e in examples]
    assert all(sorted(t["label"] for t in a["top"]) == ["neg", "pos"] for a in answers)
    assert all(sum(t["probability"] for t in a["top"]) == pytest.approx(1.0) for a in answers)
    if name == "sft":
        assert len({a["label"] for a in answers}) == 2  # it answers both ways: the agreement with eval means something
    three = predict_texts(run, texts[:2], top=3, labels=["pos", "neg", "maybe"])
    assert all(sorted(t["label"] for t in a["top"]) == ["maybe", "neg", "pos"] for a in three)


def test_labels_are_refused_for_a_classifier_and_required_for_a_generator_without_them(classifier_runs, tmp_path,
                                                                                       tiny_model_dir):
    from test_classify import make_recipe
    from tunesmith.train import train_run

    _, _, runs = classifier_runs
    code, _, err = call("predict", str(runs["a"]), "x", "--labels", "pos,neg")
    assert code == 2 and "`classify` classifier" in err and "leave --labels out" in err
    text_run = make_recipe(tmp_path, tiny_model_dir, {"name": "pretrain"}, name="lm", precision="fp32",
                           rows=[{"text": f"plain text number {i} about the garden"} for i in range(12)])
    train_run(text_run, echo=lambda s: None)
    code, _, err = call("predict", str(tmp_path / "lm"), "x")
    assert code == 2 and "not trained on classification rows" in err and "--labels A,B" in err
    code, stdout, err = call("predict", str(tmp_path / "lm"), "the garden", "--labels", "yes,no")
    assert code == 0 and stdout.split()[0] in ("yes", "no"), err
