"""`tunesmith eval` on a tiny trained run: label scoring matches a hand forward pass, the leakage guard, few-shot
prompts, metrics recomputed from examples.jsonl, forgetting, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from test_check import CLEAN, LABELS
from test_train import make_recipe
from tunesmith.cli import main
from tunesmith.data.records import Record
from tunesmith.evaluation.runner import EvalOptions, answer_contains, evaluate_run, with_shots
from tunesmith.train import train_run


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("cls")
    rows = [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)]
    recipe = make_recipe(tmp, tiny_model_dir, rows, data={"validation_fraction": 0.3})
    train_run(recipe, echo=lambda s: None)
    return tmp / "run"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("chat")
    rows = [{"messages": [{"role": "user", "content": question},
                          {"role": "assistant", "content": f"The number is {i}."}]} for i, question in enumerate(CLEAN[:12])]
    recipe = make_recipe(tmp, tiny_model_dir, rows, data={"validation_fraction": 0.25})
    train_run(recipe, echo=lambda s: None)
    return tmp / "run"


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["separate", "shared-prefix-cache"])
@pytest.mark.parametrize("allowed", [["neg", "pos"], ["neg", "negative", "not sure", "pos", "positive", "pos pos"]],
                         ids=["2-labels", "labels-sharing-tokens"])
def test_label_scores_equal_a_hand_computed_forward_pass(classification_run, shared_prefix, allowed, monkeypatch):
    from tunesmith.data.format import encode_chat
    from tunesmith.evaluation import scoring
    from tunesmith.evaluation.scoring import last_answer_only, score_labels
    from tunesmith.generate import load_run

    if shared_prefix:  # the cached path really runs: the one-sequence-at-a-time path is not there to fall back on
        monkeypatch.setattr(scoring, "sequence_logprobs", None)

    loaded = load_run(classification_run)
    prompts = [[{"role": "user", "content": CLEAN[0]}], [{"role": "user", "content": CLEAN[5]}],
               [{"role": "user", "content": CLEAN[1]}, {"role": "assistant", "content": "pos"},  # a few-shot prompt
                {"role": "user", "content": CLEAN[2]}]]
    scores = score_labels(loaded, prompts, allowed, batch_size=4, shared_prefix=shared_prefix)
    for prompt, got in zip(prompts, scores):
        assert list(got) == allowed
        for label in allowed:
            ids, labels = last_answer_only(*encode_chat(loaded.tokenizer, prompt + [
                {"role": "assistant", "content": label}]))
            with torch.inference_mode():
                logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            expected = sum(logp[i, t].item() for i, t in enumerate(labels[1:]) if t != -100)
            assert got[label] == pytest.approx(expected, abs=1e-3)


def test_eval_classification_writes_results_that_match_the_examples(classification_run, capsys):
    results = evaluate_run(classification_run, EvalOptions(against=("base", "fewshot"), shots=2, n_resamples=200,
                                                          forgetting=False), echo=lambda s: None)
    assert results["task"] == "classification" and results["systems"] == ["tuned", "base", "fewshot"]
    assert results["rows"] == 6 and results["excluded_leaked"] == 0  # 30% of 20 held out
    folder = classification_run / "eval" / "heldout"
    examples = [json.loads(x) for x in (folder / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 6
    for system in results["systems"]:
        correct = sum(e[system]["pred"] == e["label"] for e in examples)
        assert results["metrics"][system]["accuracy"] == pytest.approx(correct / 6)
        assert all(e[system]["pred"] in ("neg", "pos") for e in examples)  # label scoring: no free text
    diffs = {(d["metric"], d["versus"]): d for d in results["differences"]}
    tb = diffs[("accuracy", "base")]
    assert tb["diff"] == pytest.approx(results["metrics"]["tuned"]["accuracy"] - results["metrics"]["base"]["accuracy"])
    assert tb["ci_low"] <= tb["diff"] <= tb["ci_high"]
    regressions = (folder / "regressions.jsonl").read_text().splitlines()
    assert len(regressions) == results["regressions"] == sum(
        e["tuned"]["accuracy"] < e["base"]["accuracy"] for e in examples)
    assert json.loads((folder / "results.json").read_text())["rows"] == 6


def test_leakage_guard_excludes_rows_seen_in_training(classification_run, tmp_path):
    from tunesmith.recipe import load_recipe
    from tunesmith.data import prepare_data

    recipe = load_recipe(classification_run / "recipe.yaml", check_files=False)
    train = prepare_data(recipe.data, recipe.train.seed).train
    seen = train[0].data
    path = write_jsonl(tmp_path / "eval.jsonl", [seen, {"text": "A completely fresh sentence about films.",
                                                        "label": "pos"}])
    results = evaluate_run(classification_run, EvalOptions(data=str(path), against=("base",), forgetting=False,
                                                          n_resamples=50, name="fresh"), echo=lambda s: None)
    assert results["rows"] == 1 and results["excluded_leaked"] == 1
    assert results["excluded"][0]["line"] == 1 and results["excluded"][0]["exact"] is True
    kept = evaluate_run(classification_run, EvalOptions(data=str(path), against=("base",), forgetting=False,
                                                       include_leaked=True, n_resamples=50, name="all"),
                        echo=lambda s: None)
    assert kept["rows"] == 2 and kept["excluded_leaked"] == 1


def test_few_shot_prompt_puts_solved_examples_before_the_question():
    train = [Record("classification", {"text": f"train text {i}", "label": "pos" if i % 2 else "neg"}, "t", i + 1)
             for i in range(6)]
    row = Record("classification", {"text": "the question", "label": "pos"}, "e", 1)
    prompt = with_shots(row, train, 2, seed=0, system_prompt="Label the review.")
    assert prompt[0] == {"role": "system", "content": "Label the review."}
    assert prompt[-1] == {"role": "user", "content": "the question"}
    assert [m["role"] for m in prompt[1:-1]] == ["user", "assistant", "user", "assistant"]
    shown = [m["content"] for m in prompt[1:-1:2]]
    assert all(s.startswith("train text ") for s in shown)
    assert with_shots(row, train, 2, seed=0) == with_shots(row, train, 2, seed=0)[0:]  # deterministic
    assert with_shots(row, train, 0, seed=0) == [{"role": "user", "content": "the question"}]


def test_answer_contains_whole_words_only():
    assert answer_contains("The capital is Paris.", ["Paris"])
    assert not answer_contains("Parisian food", ["Paris"])
    assert answer_contains("It has 8 legs", ["eight", "8"])
    assert not answer_contains("It has 18 legs", ["8"])


def test_eval_generation_with_forgetting_on_the_cli(chat_run, capsys):
    assert main(["eval", str(chat_run), "--against", "base", "--max-new-tokens", "8", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "rougeL" in out and "general-ability set: QA accuracy base" in out
    results = json.loads((chat_run / "eval" / "heldout" / "results.json").read_text())
    assert results["task"] == "generation" and results["rows"] == 3
    f = results["forgetting"]
    assert f["qa_rows"] == 40 and f["text_rows"] == 15
    assert f["perplexity_rise"] == pytest.approx(f["tuned"]["perplexity"] / f["base"]["perplexity"] - 1, abs=1e-4)
    assert math.isfinite(f["base"]["perplexity"]) and f["base"]["perplexity"] > 1
    examples = [json.loads(x) for x in (chat_run / "eval" / "heldout" / "examples.jsonl").read_text().splitlines()]
    assert all(e["references"][0].startswith("The number is ") for e in examples)
    assert main(["eval", str(chat_run / "nope")]) == 2


def test_report_and_review_commands(chat_run, tmp_path, capsys):
    assert main(["report", str(chat_run)]) == 0
    page = (chat_run / "report.html").read_text()
    assert "tunesmith run report: run" in page and "data-series='train_loss'" in page
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["review", str(chat_run), "base", "--results"]) == 2
    assert "no review yet" in capsys.readouterr().err
    assert main(["review", str(chat_run), "base"]) == 2
    assert "--data is required" in capsys.readouterr().err


@pytest.mark.parametrize("low, high, legend", [(0.02, 0.3, "  * the interval excludes 0"),
                                               (-0.1, 0.3, "  (every interval includes 0)")])
def test_the_star_legend_is_printed_only_when_a_difference_is_starred(low, high, legend):
    from tunesmith.evaluation.view import results_text

    results = {"rows": 10, "data": "d.jsonl", "excluded_leaked": 0, "systems": ["tuned", "base"],
               "task": "classification",
               "primary_metric": "accuracy", "metrics": {"tuned": {"accuracy": 0.8}, "base": {"accuracy": 0.7}},
               "differences": [{"metric": "accuracy", "versus": "base", "diff": 0.1, "ci_low": low,
                                "ci_high": high}]}
    lines = results_text(results).splitlines()
    assert lines[lines.index("tuned minus … (paired bootstrap, 95% interval):") + 2] == legend
    assert lines[lines.index("tuned minus … (paired bootstrap, 95% interval):") + 1].endswith("*") == (low > 0)
