"""Evaluation metrics: corpus metrics, per-example scores, and the per-example rows the bootstrap resamples.

Scales, the same everywhere in tunesmith:

- **0..1**: accuracy, macro_f1, per-class precision/recall/F1, ROUGE-1/2/L (F-measure), exact_match,
  pairwise_accuracy.
- **0..100**: BLEU and chrF, as sacrebleu reports them.

Two kinds of metric, and which one a metric is matters for the bootstrap:

- *Means of per-example values* (`MEAN_METRICS`): accuracy, rouge1, rouge2, rougeL, exact_match, and, in
  `example_scores` / `corpus_from_examples`, sentence-level ``bleu`` and ``chrf``. Their corpus value is the mean of
  the per-example values, so `paired_bootstrap` resamples them vectorised.
- *Corpus metrics that are not means*: macro_f1, recomputed from the ``gold``/``pred`` that classification rows
  carry; and the corpus BLEU/chrF of `generation_metrics`, which pool n-gram statistics over the whole corpus and so
  differ from the mean sentence-level BLEU/chrF that `corpus_from_examples` (and hence the bootstrap) uses.

Nothing here downloads anything: ROUGE comes from ``rouge_score`` and BLEU/chrF from ``sacrebleu``, both local.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence

import numpy as np

from tunesmith.errors import TunesmithError

TASKS = ("classification", "generation", "preference")
OTHER_LABEL = "(other)"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MEAN_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "generation": ("rouge1", "rouge2", "rougeL", "exact_match", "chrf", "bleu"),
    "preference": ("pairwise_accuracy", "mean_margin"),  # per pair: 1 / 0.5 (tie) / 0, and chosen - rejected
}
CORPUS_METRICS: dict[str, tuple[str, ...]] = {"classification": ("macro_f1",), "generation": (), "preference": ()}


def task_metrics(task: str) -> tuple[str, ...]:
    """Every metric `corpus_from_examples` reports for `task`, means first."""
    _check_task(task)
    return MEAN_METRICS[task] + CORPUS_METRICS[task]


# --------------------------------------------------------------------------------------------- classification

def classification_metrics(gold: list[str], pred: list[str], labels: list[str] | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix of label predictions.

    `labels` defaults to the sorted union of gold and predicted labels. A prediction outside `labels` (say a
    free-text answer) counts as wrong and lands in an extra confusion column ``"(other)"``; pass `labels` when
    predictions may be free text, or each distinct stray answer becomes a class of its own with F1 0. Labels are
    compared as exact strings. A class never predicted has precision 0, never seen has recall 0 (zero_division=0).
    The confusion matrix has one row per label (gold) and one column per entry of ``confusion["columns"]`` (pred).
    """
    _check_pair("gold", gold, "pred", pred)
    labels = _resolve_labels(gold, pred, labels)
    matrix = _confusion(gold, pred, labels)
    precision, recall, f1, support = _per_class(matrix)
    per_class = {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    has_other = bool(matrix[:, -1].any())
    shown = matrix if has_other else matrix[:, :-1]
    return {
        "accuracy": float(np.trace(matrix[:, :-1]) / len(gold)),
        "macro_f1": float(f1.mean()) if len(labels) else 0.0,
        "per_class": per_class,
        "confusion": {"labels": list(labels), "columns": list(labels) + ([OTHER_LABEL] if has_other else []),
                      "matrix": shown.tolist()},
        "n": len(gold),
    }


def macro_f1(gold: list[str], pred: list[str], labels: list[str] | None = None) -> float:
    """Macro-averaged F1 (0..1) over `labels`, with the same rules as `classification_metrics`."""
    _check_pair("gold", gold, "pred", pred)
    labels = _resolve_labels(gold, pred, labels)
    f1 = _per_class(_confusion(gold, pred, labels))[2]
    return float(f1.mean()) if len(labels) else 0.0


def _resolve_labels(gold: Sequence[str], pred: Sequence[str], labels: list[str] | None) -> list[str]:
    """The label list to score over; every gold label must be in it."""
    if labels is None:
        return sorted(set(gold) | set(pred))
    if len(set(labels)) != len(labels):
        raise TunesmithError(f"labels contain duplicates: {labels}")
    missing = sorted(set(gold) - set(labels))
    if missing:
        raise TunesmithError(f"gold labels {missing} are not in labels {list(labels)}",
                             "add them to labels, or leave labels unset to use every label seen")
    return list(labels)


def _confusion(gold: Sequence[str], pred: Sequence[str], labels: list[str]) -> np.ndarray:
    """Counts, rows = gold label, columns = predicted label plus a last column for predictions outside labels."""
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    rows = np.fromiter((index[g] for g in gold), dtype=np.int64, count=len(gold))
    cols = np.fromiter((index.get(p, k) for p in pred), dtype=np.int64, count=len(pred))
    return np.bincount(rows * (k + 1) + cols, minlength=k * (k + 1)).reshape(k, k + 1)


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per label from a confusion matrix; 0 wherever a denominator is 0."""
    square = matrix[:, :-1]
    tp = np.diag(square).astype(float)
    support = matrix.sum(axis=1)
    predicted = square.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = support + predicted  # F1 = 2PR/(P+R) = 2tp/(support+predicted)
    f1 = np.divide(2 * tp, both, out=np.zeros_like(tp), where=both > 0)
    return precision, recall, f1, support


# ------------------------------------------------------------------------------------------------- generation

def generation_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """ROUGE-1/2/L, BLEU, chrF, exact match and length statistics of generated text against references.

    Each example has one or more references (a bare string counts as one). ROUGE is the F-measure (stemmed),
    the best over an example's references, averaged over examples (0..1). BLEU and chrF are sacrebleu's corpus
    scores (0..100) using every reference; examples with fewer references are padded with ``None`` as sacrebleu
    expects. exact_match (0..1) compares after stripping and collapsing whitespace, case-sensitively, and counts
    a match with any reference. Lengths are in whitespace-separated words; reference lengths pool every reference.
    """
    import sacrebleu

    refs = [_as_references(r) for r in references]
    _check_pair("predictions", predictions, "references", refs)
    rouge = [_rouge(p, r) for p, r in zip(predictions, refs)]
    streams = _reference_streams(refs)
    pred_words = [len(p.split()) for p in predictions]
    ref_words = [len(r.split()) for rs in refs for r in rs]
    result = {key: float(np.mean([s[key] for s in rouge])) for key in ROUGE_TYPES}
    result.update({
        "bleu": float(sacrebleu.corpus_bleu(predictions, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, streams).score),
        "exact_match": float(np.mean([_exact_match(p, r) for p, r in zip(predictions, refs)])),
        "pred_words_mean": float(np.mean(pred_words)),
        "pred_words_median": float(statistics.median(pred_words)),
        "ref_words_mean": float(np.mean(ref_words)),
        "ref_words_median": float(statistics.median(ref_words)),
        "n": len(predictions),
    })
    return result


def _as_references(references: str | Sequence[str]) -> list[str]:
    """One example's references as a non-empty list of strings."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise TunesmithError(f"each example needs one or more reference strings, got {references!r}")
    return refs


def _reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-example reference lists transposed into sacrebleu's reference streams, padded with None."""
    depth = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(depth)]


def _normalize_space(text: str) -> str:
    """Strip and collapse runs of whitespace to one space."""
    return " ".join(text.split())


def _exact_match(prediction: str, refs: list[str]) -> float:
    """1.0 if the prediction equals any reference after whitespace normalisation (case-sensitive), else 0.0."""
    target = _normalize_space(prediction)
    return float(any(target == _normalize_space(r) for r in refs))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    """The shared stemmed ROUGE scorer (importing rouge_score pulls in nltk, so only when ROUGE is asked for)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _rouge(prediction: str, refs: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure of one prediction, each the best over its references."""
    scores = [_rouge_scorer().score(ref, prediction) for ref in refs]
    return {key: max(s[key].fmeasure for s in scores) for key in ROUGE_TYPES}


@functools.lru_cache(maxsize=1)
def _sentence_scorers():
    """Sentence-level BLEU (effective order, sacrebleu's sentence_bleu defaults) and chrF scorers."""
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU(effective_order=True), CHRF()


# ------------------------------------------------------------------------------------------- per-example rows

def example_scores(task: str, prediction, references) -> dict[str, float]:
    """The per-example metric values of one prediction, the units the bootstrap resamples.

    classification: `references` is the gold label (or a one-element list); returns {"accuracy": 0.0 or 1.0}.
    generation: `references` is one string or a list; returns rouge1/rouge2/rougeL (0..1, best reference),
    exact_match (0/1), chrf (sentence chrF 0..100, best reference) and bleu (sentence BLEU 0..100 with effective
    order and exp smoothing, all references at once).
    """
    _check_task(task)
    if task == "classification":
        return {"accuracy": float(prediction == _gold_label(references))}
    refs = _as_references(references)
    bleu, chrf = _sentence_scorers()
    scores = _rouge(prediction, refs)
    scores["exact_match"] = _exact_match(prediction, refs)
    scores["chrf"] = max(float(chrf.sentence_score(prediction, [r]).score) for r in refs)
    scores["bleu"] = float(bleu.sentence_score(prediction, refs).score)
    return scores


def example_rows(task: str, predictions: list, references: list) -> list[dict]:
    """One row per example: `example_scores`, plus "gold" and "pred" for classification (macro-F1 needs them)."""
    _check_pair("predictions", predictions, "references", references)
    rows = []
    for prediction, refs in zip(predictions, references):
        row = example_scores(task, prediction, refs)
        if task == "classification":
            row.update(gold=_gold_label(refs), pred=prediction)
        rows.append(row)
    return rows


def corpus_from_examples(task: str, rows: list[dict], labels: list[str] | None = None) -> dict[str, float]:
    """Corpus value of every metric of `task`, recomputed from a (possibly resampled) list of per-example rows.

    The metrics in `MEAN_METRICS` (accuracy, rouge1/2/L, exact_match, sentence chrf and bleu) are the mean of
    their per-example values. macro_f1 is recomputed from the rows' "gold" and "pred", over `labels` (default:
    the labels seen in these rows, as in `classification_metrics`).
    """
    _check_task(task)
    if not rows:
        raise TunesmithError("no examples to score")
    result = {key: float(np.mean([_row_value(row, key) for row in rows])) for key in MEAN_METRICS[task]}
    if task == "classification":
        if any("gold" not in row or "pred" not in row for row in rows):
            raise TunesmithError("macro_f1 needs 'gold' and 'pred' in every classification row",
                                 "build the rows with example_rows()")
        result["macro_f1"] = macro_f1([row["gold"] for row in rows], [row["pred"] for row in rows], labels)
    return result


def _row_value(row: dict, key: str) -> float:
    """A per-example metric value from a row, with an error that says what is missing."""
    try:
        return row[key]
    except KeyError:
        raise TunesmithError(f"a per-example row has no {key!r} (it has {sorted(row)})",
                             "build the rows with example_rows()") from None


def _gold_label(references) -> str:
    """The single gold label of a classification example."""
    if isinstance(references, str):
        return references
    refs = list(references)
    if len(refs) != 1:
        raise TunesmithError(f"a classification example needs exactly one gold label, got {references!r}")
    return refs[0]


# ------------------------------------------------------------------------------------- likelihood and pairs

def perplexity(token_nll_sums: list[float], token_counts: list[int]) -> dict:
    """Corpus perplexity exp(total NLL / total tokens) from per-example summed token NLLs (nats) and counts."""
    _check_pair("token_nll_sums", token_nll_sums, "token_counts", token_counts)
    tokens = int(sum(token_counts))
    if tokens <= 0:
        raise TunesmithError("perplexity needs at least one scored token")
    nll = float(sum(token_nll_sums)) / tokens
    return {"perplexity": math.exp(nll) if nll < 709 else math.inf, "nll_per_token": nll, "tokens": tokens}


def pairwise_accuracy(chosen_scores: list[float], rejected_scores: list[float]) -> dict:
    """Share of preference pairs where the chosen response scores higher (a tie counts 0.5), and the mean margin."""
    rows = pair_rows(chosen_scores, rejected_scores)
    return {"pairwise_accuracy": float(np.mean([r["pairwise_accuracy"] for r in rows])),
            "mean_margin": float(np.mean([r["mean_margin"] for r in rows])), "n": len(rows)}


def pair_rows(chosen_scores: list[float], rejected_scores: list[float]) -> list[dict]:
    """The per-pair rows the bootstrap resamples: pairwise_accuracy 1 / 0.5 / 0, mean_margin = chosen - rejected."""
    _check_pair("chosen_scores", chosen_scores, "rejected_scores", rejected_scores)
    return [{"pairwise_accuracy": 1.0 if c > r else 0.5 if c == r else 0.0, "mean_margin": float(c - r),
             "chosen_score": float(c), "rejected_score": float(r)}
            for c, r in zip(chosen_scores, rejected_scores)]


# ------------------------------------------------------------------------------------------------- checking

def _check_task(task: str) -> None:
    """Raise unless `task` is one tunesmith scores."""
    if task not in TASKS:
        raise TunesmithError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")


def _check_pair(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    """Raise unless two per-example sequences are non-empty and of equal length."""
    if len(a) != len(b):
        raise TunesmithError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}",
                             "there must be exactly one of each per example, in the same order")
    if not a:
        raise TunesmithError(f"no examples to score ({name_a} is empty)")
