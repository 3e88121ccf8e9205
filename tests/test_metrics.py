"""Metrics and the paired bootstrap against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunesmith.errors import TunesmithError
from tunesmith.evaluation import bootstrap
from tunesmith.evaluation.bootstrap import (MacroF1, MeanOf, compare_systems, paired_bootstrap, paired_bootstrap_means,
                                            wins_losses)
from tunesmith.evaluation.metrics import (classification_metrics, corpus_from_examples, example_rows,
                                          example_scores, generation_metrics, pairwise_accuracy, perplexity)

# ------------------------------------------------------------------------------------------- classification


def test_classification_three_classes_by_hand():
    gold = ["a", "a", "a", "b", "b", "c", "c", "c"]
    pred = ["a", "a", "b", "b", "b", "c", "a", "a"]
    # confusion (rows gold, cols pred a b c):  a: 2 1 0 | b: 0 2 0 | c: 2 0 1
    # predicted per column: a 4, b 3, c 1; support a 3, b 2, c 3; correct 2+2+1 = 5 of 8
    # a: P 2/4, R 2/3, F 2tp/(support+predicted) = 4/7
    # b: P 2/3, R 2/2, F 4/5
    # c: P 1/1, R 1/3, F 2/4 = 1/2
    # macro-F1 = (4/7 + 4/5 + 1/2) / 3 = (40 + 56 + 35) / 210 / 3 = 131/210
    m = classification_metrics(gold, pred)
    assert m["accuracy"] == 5 / 8
    assert m["n"] == 8
    assert m["macro_f1"] == pytest.approx(131 / 210, abs=1e-12)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1 / 2, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 4 / 5, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 1 / 2, "support": 3})
    assert m["confusion"] == {"labels": ["a", "b", "c"], "columns": ["a", "b", "c"],
                              "matrix": [[2, 1, 0], [0, 2, 0], [2, 0, 1]]}


def test_prediction_outside_labels_goes_to_other_column():
    # a: 1 right, 1 free-text answer; b: 1 predicted as a, 1 right -> accuracy 2/4
    # a: P 1/2 (a predicted twice), R 1/2, F 1/2;  b: P 1/1, R 1/2, F 2/3;  macro (1/2 + 2/3)/2 = 7/12
    m = classification_metrics(["a", "a", "b", "b"], ["a", "maybe a?", "b", "a"], labels=["a", "b"])
    assert m["accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx(7 / 12, abs=1e-12)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["confusion"] == {"labels": ["a", "b"], "columns": ["a", "b", "(other)"],
                              "matrix": [[1, 0, 1], [1, 1, 0]]}


def test_zero_division_classes_score_zero():
    # c: no gold, never predicted -> 0/0/0; b: never predicted -> P 0, R 0/1 = 0; a: P 1/2, R 1, F 2/3
    m = classification_metrics(["a", "b"], ["a", "a"], labels=["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx(2 / 9, abs=1e-12)
    assert m["accuracy"] == 0.5


def test_classification_agrees_with_scikit_learn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(3)
    labels = ["neg", "neu", "pos", "spam"]
    gold = list(rng.choice(labels[:3], 300))
    pred = list(rng.choice(labels, 300))
    m = classification_metrics(gold, pred)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    assert [m["per_class"][x]["f1"] for x in labels] == pytest.approx(list(f), abs=1e-12)
    assert [m["per_class"][x]["precision"] for x in labels] == pytest.approx(list(p), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["confusion"]["matrix"] == confusion_matrix(gold, pred, labels=labels).tolist()


def test_classification_rejects_bad_input():
    with pytest.raises(TunesmithError, match="gold has 2 items but pred has 1"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(TunesmithError, match=r"gold labels \['c'\] are not in labels"):
        classification_metrics(["a", "c"], ["a", "a"], labels=["a", "b"])


# ----------------------------------------------------------------------------------------------- generation


def test_rouge_by_hand():
    # "the cat sat" vs "the cat ran": unigrams 2 of 3 shared -> P = R = F = 2/3; bigrams "the cat" 1 of 2 -> 1/2;
    # longest common subsequence "the cat" = 2 -> 2/3
    m = generation_metrics(["the cat sat"], [["the cat ran"]])
    assert m["rouge1"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["rouge2"] == pytest.approx(1 / 2, abs=1e-12)
    assert m["rougeL"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["exact_match"] == 0.0
    assert m["n"] == 1


def test_rouge_is_stemmed():
    assert example_scores("generation", "the cats sat", ["the cat sat"])["rouge1"] == 1.0


def test_identical_text_scores_full_marks():
    m = generation_metrics(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert (m["bleu"], m["chrf"]) == pytest.approx((100.0, 100.0), abs=1e-9)  # sacrebleu scale, 0..100
    assert (m["rouge1"], m["rouge2"], m["rougeL"], m["exact_match"]) == (1.0, 1.0, 1.0, 1.0)  # 0..1


def test_exact_match_normalises_whitespace_not_case_and_takes_any_reference():
    preds = ["  The  cat\nsat ", "the cat sat", "a dog"]
    refs = [["The cat sat"], ["The cat sat"], ["a cat", "a dog"]]
    assert [example_scores("generation", p, r)["exact_match"] for p, r in zip(preds, refs)] == [1.0, 0.0, 1.0]
    assert generation_metrics(preds, refs)["exact_match"] == pytest.approx(2 / 3, abs=1e-12)


def test_multiple_references_take_the_best():
    # rouge1 vs "a dog ran" = 0, vs "the cat sat" = 1 -> 1; sacrebleu streams padded with None for example 2
    m = generation_metrics(["the cat sat on the mat", "hello there"],
                           [["a dog ran", "the cat sat on the mat"], ["hello there"]])
    assert m["rouge1"] == 1.0
    assert m["bleu"] == pytest.approx(100.0, abs=1e-9)
    assert m["exact_match"] == 1.0
    one = example_scores("generation", "the cat sat", ["a dog ran", "the cat sat"])
    assert (one["rouge1"], one["chrf"], one["bleu"]) == pytest.approx((1.0, 100.0, 100.0), abs=1e-9)


def test_sentence_scores_by_hand():
    # sentence BLEU, effective order 3 (3 tokens): precisions 2/3, 1/2, and 0/1 smoothed (exp) to 1/2
    # -> (2/3 * 1/2 * 1/2) ** (1/3) * 100 = 6 ** (-1/3) * 100; brevity penalty 1 (equal lengths)
    s = example_scores("generation", "the cat sat", "the cat ran")
    assert s["bleu"] == pytest.approx(100 * 6 ** (-1 / 3), abs=1e-9)
    assert s["rouge1"] == pytest.approx(2 / 3, abs=1e-12)
    assert s["exact_match"] == 0.0
    assert sorted(s) == ["bleu", "chrf", "exact_match", "rouge1", "rouge2", "rougeL"]


def test_length_statistics_in_words():
    m = generation_metrics(["a b c", "a"], [["a b"], ["a b c d", "x"]])
    assert (m["pred_words_mean"], m["pred_words_median"]) == (2.0, 2.0)
    # references pooled: 2, 4, 1 words
    assert m["ref_words_mean"] == pytest.approx(7 / 3, abs=1e-12)
    assert m["ref_words_median"] == 2.0


# ----------------------------------------------------------------------------------- rows and corpus values


def test_corpus_from_examples_means_and_macro_f1():
    rows = example_rows("classification", ["a", "b", "b", "b"], ["a", "a", "b", "b"])
    assert rows[1] == {"accuracy": 0.0, "gold": "a", "pred": "b"}
    # a: P 1, R 1/2, F 2/3; b: P 2/3, R 1, F 4/5 -> macro 11/15
    assert corpus_from_examples("classification", rows) == pytest.approx({"accuracy": 0.75, "macro_f1": 11 / 15})
    gen = [{"rouge1": 1.0, "rouge2": 0.5, "rougeL": 1.0, "exact_match": 1.0, "chrf": 80.0, "bleu": 60.0},
           {"rouge1": 0.5, "rouge2": 0.0, "rougeL": 0.25, "exact_match": 0.0, "chrf": 40.0, "bleu": 0.0}]
    assert corpus_from_examples("generation", gen) == {"rouge1": 0.75, "rouge2": 0.25, "rougeL": 0.625,
                                                       "exact_match": 0.5, "chrf": 60.0, "bleu": 30.0}
    with pytest.raises(TunesmithError, match="needs 'gold' and 'pred'"):
        corpus_from_examples("classification", [{"accuracy": 1.0}])


# ------------------------------------------------------------------------------------ perplexity and pairs


def test_perplexity_is_exp_of_mean_token_nll():
    # (2 + 4) nats over (2 + 3) tokens = 1.2 per token
    p = perplexity([2.0, 4.0], [2, 3])
    assert p["nll_per_token"] == pytest.approx(1.2, abs=1e-12)
    assert p["perplexity"] == pytest.approx(math.exp(1.2), abs=1e-12)
    assert p["tokens"] == 5


def test_pairwise_accuracy_counts_a_tie_as_half():
    # margins 1, 0 (tie), -0.5, 1 -> (1 + 0.5 + 0 + 1) / 4 = 0.625; mean margin 1.5 / 4
    p = pairwise_accuracy([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 2.0])
    assert p == {"pairwise_accuracy": 0.625, "mean_margin": 0.375, "n": 4}


# ------------------------------------------------------------------------------------------------ bootstrap


def _correlated_pair(rng: np.random.Generator, n: int, p_a: float, p_b: float, shared: float = 0.5):
    """Per-example 0/1 correctness of two systems: with probability `shared` both see the same latent draw."""
    u = rng.random(n)
    v = np.where(rng.random(n) < shared, u, rng.random(n))
    return (u < p_a).astype(float), (v < p_b).astype(float)


def test_bootstrap_is_deterministic_for_a_seed():
    a, b = _correlated_pair(np.random.default_rng(0), 200, 0.7, 0.6)
    first = paired_bootstrap_means(a, b, n_resamples=300, seed=7)
    assert paired_bootstrap_means(a, b, n_resamples=300, seed=7) == first
    assert paired_bootstrap_means(a, b, n_resamples=300, seed=8)["ci_low"] != first["ci_low"]
    assert (first["n"], first["n_resamples"]) == (200, 300)
    assert first["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)


def test_vectorised_and_generic_paths_agree():
    a, b = _correlated_pair(np.random.default_rng(1), 150, 0.7, 0.6)
    rows_a, rows_b = [{"accuracy": x} for x in a], [{"accuracy": x} for x in b]
    fast = paired_bootstrap(rows_a, rows_b, MeanOf("accuracy"), n_resamples=400, seed=3)
    slow = paired_bootstrap(rows_a, rows_b, lambda rows: float(np.mean([r["accuracy"] for r in rows])),
                            n_resamples=400, seed=3)
    assert fast == pytest.approx(slow, abs=1e-12)


@pytest.mark.parametrize("labels", [None, ("neg", "neu", "pos")])
def test_batched_macro_f1_agrees_with_recomputing_it(labels):
    rng = np.random.default_rng(5)
    gold = list(rng.choice(["neg", "neu", "pos"], 120))
    rows_a = example_rows("classification", list(rng.choice(["neg", "neu", "pos", "no idea"], 120)), gold)
    rows_b = example_rows("classification", list(rng.choice(["neg", "pos"], 120)), gold)
    lab = None if labels is None else list(labels)
    fast = paired_bootstrap(rows_a, rows_b, MacroF1(labels), n_resamples=300, seed=4)
    slow = paired_bootstrap(rows_a, rows_b, lambda rows: corpus_from_examples("classification", rows, lab)["macro_f1"],
                            n_resamples=300, seed=4)
    assert fast == pytest.approx(slow, abs=1e-12)
    assert fast["a"] == classification_metrics(gold, [r["pred"] for r in rows_a], lab)["macro_f1"]


def test_interval_covers_the_true_difference_at_about_the_nominal_rate():
    # 200 synthetic experiments, p_a = 0.7 and p_b = 0.6 on 300 correlated pairs: the true difference is 0.1
    rng = np.random.default_rng(2024)
    covered, significant_null = 0, 0
    for rep in range(200):
        a, b = _correlated_pair(rng, 300, 0.7, 0.6)
        found = paired_bootstrap_means(a, b, n_resamples=500, seed=rep)
        covered += found["ci_low"] <= 0.1 <= found["ci_high"]
        a0, b0 = _correlated_pair(rng, 300, 0.65, 0.65)
        significant_null += paired_bootstrap_means(a0, b0, n_resamples=500, seed=rep)["p_value"] < 0.05
    assert 0.90 <= covered / 200 <= 0.99
    assert significant_null / 200 <= 0.10  # no real difference: p >= 0.05 in most runs


def test_identical_systems_have_zero_difference():
    a = np.array([1.0, 0.0, 1.0, 1.0, 0.5])
    found = paired_bootstrap_means(a, a.copy(), n_resamples=200)
    assert (found["diff"], found["ci_low"], found["ci_high"], found["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    rows = example_rows("classification", ["a", "b", "a"], ["a", "a", "b"])
    generic = paired_bootstrap(rows, rows, lambda r: corpus_from_examples("classification", r)["macro_f1"],
                               n_resamples=50)
    assert (generic["diff"], generic["ci_low"], generic["ci_high"], generic["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_compare_systems_macro_f1_difference(monkeypatch):
    gold = ["a", "a", "b", "b"]
    per_example = {"tuned": example_rows("classification", ["a", "a", "b", "b"], gold),
                   "base": example_rows("classification", ["a", "b", "b", "b"], gold)}
    means_calls = []
    real = bootstrap.paired_bootstrap_means
    monkeypatch.setattr(bootstrap, "paired_bootstrap_means", lambda *a, **k: means_calls.append(1) or real(*a, **k))
    found = {d["metric"]: d for d in compare_systems(per_example, "classification", "tuned", n_resamples=1000)}
    assert len(means_calls) == 1  # accuracy took the vectorised means path; macro_f1 the batched one
    # tuned is perfect (macro 1); base: a P 1 R 1/2 F 2/3, b P 2/3 R 1 F 4/5 -> 11/15; diff 4/15
    f1 = found["macro_f1"]
    assert (f1["system"], f1["versus"], f1["n"]) == ("tuned", "base", 4)
    assert f1["diff"] == pytest.approx(4 / 15, abs=1e-12)
    assert (f1["system_score"], f1["versus_score"]) == pytest.approx((1.0, 11 / 15), abs=1e-12)
    assert found["accuracy"]["diff"] == 0.25
    # tuned is perfect on every resample, so no resampled difference is negative; base ties only when
    # example 1 is never drawn, probability (3/4)^4 -> p about 2 * 0.316
    assert f1["ci_low"] >= 0.0
    assert f1["p_value"] == pytest.approx(2 * 0.75 ** 4, abs=0.08)


def test_compare_systems_rejects_mismatched_systems():
    rows = example_rows("classification", ["a", "b"], ["a", "b"])
    other = example_rows("classification", ["a", "b"], ["b", "b"])
    with pytest.raises(TunesmithError, match="reference system 'tuned'"):
        compare_systems({"base": rows}, "classification", "tuned")
    with pytest.raises(TunesmithError, match="example 0: gold is 'a' for 'tuned' but 'b' for 'base'"):
        compare_systems({"tuned": rows, "base": other}, "classification", "tuned")
    with pytest.raises(TunesmithError, match=r"unknown classification metrics \['bleu'\]"):
        compare_systems({"tuned": rows, "base": rows}, "classification", "tuned", metrics=["bleu"])


def test_wins_losses_counts_per_example():
    a = [{"rougeL": x} for x in (1.0, 0.5, 0.2, 0.2)]
    b = [{"rougeL": x} for x in (0.5, 0.5, 0.3, 0.1)]
    assert wins_losses(a, b, "rougeL") == {"wins": 2, "losses": 1, "ties": 1, "n": 4}
    with pytest.raises(TunesmithError, match="per-example row 0 has no 'bleu'"):
        wins_losses(a, b, "bleu")
