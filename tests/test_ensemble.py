"""`method: ensemble`: the pooled probabilities are the weighted mean (or renormalized geometric mean) of the members'
own predictions; the run measures each member and itself on validation; eval reads it like any classifier; bad
members and weights are named in the recipe check."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import write_jsonl
from test_classify import PROBES, WORDS, classifier_runs, make_recipe  # noqa: F401 - a fixture
from tunesmith.errors import RecipeError
from tunesmith.train import train_run


@pytest.fixture(scope="module")
def members(classifier_runs):
    """Three classifier runs on the same rows, with a held-out file: classify (LoRA, full) and features."""
    return classifier_runs


def own_predictions(runs, texts):
    from tunesmith.methods import classify, features

    return {name: (features if name == "c" else classify).predict(run, texts) for name, run in runs.items()}


@pytest.mark.parametrize("combine", ["mean", "geometric"])
def test_ensemble_pools_the_members_own_probabilities(members, tiny_model_dir, combine):
    from tunesmith.methods import ensemble

    tmp, held_out, runs = members
    weights = [1.0, 2.0, 0.5]
    recipe = make_recipe(tmp, tiny_model_dir, {"name": "ensemble", "members": [str(r) for r in runs.values()],
                                               "weights": weights, "combine": combine},
                         name=f"ens-{combine}", data={"validation": str(held_out)})
    printed = []
    manifest = train_run(recipe, echo=printed.append)
    run = tmp / f"ens-{combine}"
    own = own_predictions(runs, PROBES)
    got = ensemble.predict(run, PROBES)
    for i, answer in enumerate(got):
        assert list(answer) == ["neg", "pos"] and sum(answer.values()) == pytest.approx(1.0)
        for label in ("neg", "pos"):
            parts = [(w, own[name][i][label]) for w, name in zip(weights, "abc")]
            if combine == "mean":
                expected = sum(w * p for w, p in parts) / sum(weights)
            else:
                geo = {lab: math.exp(sum(w * math.log(own[n][i][lab]) for w, n in zip(weights, "abc")) / sum(weights))
                       for lab in ("neg", "pos")}
                expected = geo[label] / sum(geo.values())
            assert answer[label] == pytest.approx(expected, abs=1e-9)

    # the run measured every member and itself on the held-out rows
    rows = [json.loads(x) for x in held_out.read_text().splitlines()]
    texts, gold = [r["text"] for r in rows], [r["label"] for r in rows]
    own_val = own_predictions(runs, texts)
    summary = json.loads((run / "ensemble.json").read_text())
    assert summary["validation_rows"] == 10 and summary["combine"] == combine
    for member, name in zip(summary["members"], "abc"):
        assert member["path"] == str(runs[name].resolve())
        assert member["validation_accuracy"] == pytest.approx(
            np.mean([max(p, key=p.get) == g for p, g in zip(own_val[name], gold)]))
    pooled = ensemble.predict(run, texts)
    accuracy = np.mean([max(p, key=p.get) == g for p, g in zip(pooled, gold)])
    assert manifest["losses"]["validation_accuracy_after"] == pytest.approx(accuracy)
    assert manifest["losses"]["validation_after"] == pytest.approx(
        np.mean([-math.log(p[g]) for p, g in zip(pooled, gold)]))
    assert manifest["saved"] == "ensemble" and manifest["training"]["trainable_params"] == 0
    summary_text = "\n".join(printed)
    assert f"members: {runs['a']}, {runs['b']}, {runs['c']} · method: ensemble (each member in its own precision)" \
        in summary_text
    assert "tokens: each model reads the texts" in summary_text and "truncated to max_seq_len" not in summary_text
    for i, member in enumerate(summary["members"]):
        assert f"member {i}" in summary_text and f"validation accuracy {member['validation_accuracy']:.4f}" in \
            summary_text


def test_eval_reads_an_ensemble_like_any_classifier(members, tiny_model_dir):
    from tunesmith.evaluation.runner import EvalOptions, evaluate_run
    from tunesmith.methods import ensemble

    tmp, held_out, runs = members
    recipe = make_recipe(tmp, tiny_model_dir, {"name": "ensemble", "members": [str(runs["a"]), str(runs["c"])]},
                         name="ens-eval", data={"validation": str(held_out)})
    train_run(recipe, echo=lambda s: None)
    results = evaluate_run(tmp / "ens-eval", EvalOptions(against=(str(runs["a"]),), forgetting=False,
                                                         n_resamples=50), echo=lambda s: None)
    rows = [json.loads(x) for x in held_out.read_text().splitlines()]
    pooled = ensemble.predict(tmp / "ens-eval", [r["text"] for r in rows])
    assert results["metrics"]["tuned"]["accuracy"] == pytest.approx(
        np.mean([max(p, key=p.get) == r["label"] for p, r in zip(pooled, rows)]))
    assert results["systems"] == ["tuned", "a"]


def test_members_and_weights_that_cannot_pool_are_named(members, tiny_model_dir, tmp_path):
    tmp, held_out, runs = members
    other = write_jsonl(tmp_path / "xyz.jsonl", [{"text": f"{w} item {i}", "label": ["x", "y", "z"][i % 3]}
                                                   for i, w in enumerate(WORDS * 2)])
    three = make_recipe(tmp_path, tiny_model_dir, {"name": "classify", "adapter": "lora"}, name="three",
                        data={"train": str(other)})
    train_run(three, echo=lambda s: None)
    with pytest.raises(RecipeError) as err:
        make_recipe(tmp, tiny_model_dir, {"name": "ensemble", "members": [str(runs["a"]), str(tmp_path / "three"),
                                                                          str(tmp_path / "nowhere")],
                                          "weights": [1, 2]}, name="bad")
    text = str(err.value)
    assert "`method.weights`: 2 weights for 3 members" in text
    assert "`method.members[2]`" in text and "not a finished classifier run folder" in text
    assert "has other labels" in text and "only in it: ['x', 'y', 'z']" in text
    with pytest.raises(RecipeError, match="members.*at least 2|List should have at least 2"):
        make_recipe(tmp, tiny_model_dir, {"name": "ensemble", "members": [str(runs["a"])]}, name="one")


def test_generate_chat_and_export_refuse_a_classifier_run(members):
    """They would load the base language model and silently leave the head out; they say what to use instead
    (export writes a classify run as a sequence-classifier: test_classify.py)."""
    from tunesmith.errors import RunError
    from tunesmith.generate import export_merged, load_run

    tmp, _, runs = members
    for name, method in (("a", "classify"), ("c", "features")):
        with pytest.raises(RunError, match=f"`method: {method}` made a classifier") as err:
            load_run(runs[name])
        assert "tunesmith eval" in err.value.hint
    with pytest.raises(RunError, match="no bias to hold the linear classifier's intercept"):  # a Llama's head
        export_merged(runs["c"], tmp / "merged")
    assert not (tmp / "merged").exists()
    assert load_run(runs["a"], base=True).label.startswith("base")  # its base model still answers


def test_nonpositive_weights_a_repeated_member_and_early_stopping_are_named(members, tiny_model_dir):
    tmp, _, runs = members
    with pytest.raises(RecipeError) as err:
        make_recipe(tmp, tiny_model_dir, {"name": "ensemble", "members": [str(runs["a"]), str(runs["a"])],
                                          "weights": [1, 0]}, name="bad2", early_stopping_patience=2, eval_every=1)
    text = str(err.value)
    assert "`method.weights`: [1.0, 0.0] — each weight must be above 0" in text
    assert "`method.members`: a run is named twice" in text
    assert "`train.early_stopping_patience`: `method: ensemble` trains nothing" in text
