"""`tunesmith predict`: label texts with a run — a classifier (classify, features, ensemble), or a run that answers
in text (sft, fewshot, …) choosing among allowed labels (generative classification).

The texts come from the command line or from every row of a data file (JSONL, CSV, Parquet, a saved `datasets`
folder); each gets its most probable label and the top labels with their probabilities, from the run's own
`predict` (its head, template and pooling, or its scikit-learn classifier, or its members pooled), or from each
allowed label's log-probability as the run's answer, normalized over the labels. A row without a
usable text goes to a rejects file with its reason, and the counts are printed. Read top to bottom: which runs can
predict, predicting texts, predicting a file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.artifacts import open_run
from tunesmith.data.snapshot import check_input
from tunesmith.errors import DataError, RunError

PREDICTIONS = "predictions"  # RUN/predictions/FILE.jsonl unless --out says otherwise


def classifier_predict(run_path: str | Path, labels: list[str] | None = None) -> Callable[..., list[dict[str, float]]]:
    """`predict(run_dir, texts, batch_size, progress=…)` for the run: a classifier's own, or for a run that answers
    in text (sft, fewshot, …) the allowed `labels` scored as its answer — by default the labels of the
    classification rows it was trained on. A RunError says what to use instead for a reward model, or for a text
    generator with no labels to choose from."""
    from tunesmith.methods import REGISTRY

    run = open_run(run_path)
    if not run.manifest.exists():
        raise RunError(f"{run.root}: no manifest.json — the run did not finish", "train it to the end first")
    manifest = run.read_manifest()
    name = manifest.get("method", "")
    method = REGISTRY.get(name)
    if method is not None and method.scores_replies:
        raise RunError(f"{run.root}: a reward model scores replies to a prompt; it has no labels",
                       f"score replies with `tunesmith score {run.root} PROMPT REPLY …`")
    if method is not None and method.predict is not None:
        if labels:
            raise RunError(f"--labels: {run.root} is a `{name}` classifier; it answers with the labels it was "
                           "trained on", "leave --labels out")
        return method.predict
    labels = labels or (manifest.get("data") or {}).get("labels")
    if not labels:
        raise RunError(f"{run.root}: `method: {name}` made a text generator, not trained on classification rows",
                       f"name the answers to choose from with --labels A,B,…, or answer prompts with "
                       f"`tunesmith generate {run.root} PROMPT`")
    return label_scorer(run, list(labels))


def label_scorer(run, labels: list[str]) -> Callable[..., list[dict[str, float]]]:
    """Generative classification: each label's log-probability as the run's answer to the text (the run's system
    prompt, and a fewshot run's shots, in front), normalized over the labels into probabilities."""
    import math

    from tunesmith.data.format import prompt_messages
    from tunesmith.data.records import Record
    from tunesmith.evaluation.runner import load_system, tuned_spec
    from tunesmith.evaluation.scoring import score_labels
    from tunesmith.methods.fewshot import shot_messages, with_context

    spec = tuned_spec(run)
    system_prompt = (run.read_recipe().get("data") or {}).get("system_prompt") if run.recipe.exists() else None

    def predict(run_dir, texts: list[str], batch_size: int = 16, precision: str | None = None,
                progress: Callable[[int], None] | None = None) -> list[dict[str, float]]:
        records = [Record("classification", {"text": t, "label": labels[0]}, "predict", i)
                   for i, t in enumerate(texts, 1)]
        prompts = [prompt_messages(r, system_prompt) for r in records]
        if spec.examples is not None:
            prompts = [with_context(p, shot_messages(shots)) for p, shots in zip(prompts, spec.examples(records))]
        counted = [0.0]

        def step(n: float) -> None:  # score_labels counts (prompt, label) pairs; report whole texts
            before = int(counted[0])
            counted[0] += n / len(labels)
            if progress and int(counted[0]) > before:
                progress(int(counted[0]) - before)

        scores = score_labels(load_system(spec), prompts, labels, batch_size, progress=step)
        out = []
        for row in scores:
            top = max(row.values())
            weights = {label: math.exp(v - top) for label, v in row.items()}
            total = sum(weights.values())
            out.append({label: w / total for label, w in weights.items()})
        return out

    return predict


def ranked(probabilities: dict[str, float], top: int) -> dict[str, Any]:
    """The most probable label, its probability, and the `top` labels with theirs (most probable first)."""
    order = sorted(probabilities.items(), key=lambda kv: -kv[1])
    return {"label": order[0][0], "probability": order[0][1],
            "top": [{"label": label, "probability": p} for label, p in order[:max(top, 1)]]}


def predict_texts(run_path: str | Path, texts: list[str], top: int = 3, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None, labels: list[str] | None = None) -> list[dict[str, Any]]:
    """One `ranked` answer per text, in order."""
    predict = classifier_predict(run_path, labels)
    if not texts:
        return []
    return [ranked(p, top) for p in predict(run_path, texts, batch_size=batch_size, progress=progress)]


@dataclass
class FilePredictions:
    """What `predict_file` did: where the predictions and rejects went, and the counts."""

    out: Path
    rejects_file: Path | None
    rows_read: int
    predicted: int
    rejects: int
    reasons: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)


def predict_file(run_path: str | Path, data: str | Path, column: str = "text", out: str | Path | None = None,
                 top: int = 3, batch_size: int = 16, labels: list[str] | None = None) -> FilePredictions:
    """Label every row of `data` by its `column`; write one line per row (file, line, the row's other columns under
    `row`, text, label, probability, top) to `out` (JSONL, CSV or Parquet by its suffix; default RUN/predictions/DATA_NAME.jsonl) and the unusable
    rows with their reasons to OUT_NAME.rejects.jsonl beside it."""
    from tqdm.auto import tqdm

    from tunesmith.data.readers import write_rows
    from tunesmith.data.records import load_records, write_rejects

    predict = classifier_predict(run_path, labels)
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file", "give a JSONL, CSV or Parquet file, or a saved `datasets` folder")
    run = open_run(run_path)
    check_input(run.root, data, "predict --data")
    out = Path(out) if out else run.root / PREDICTIONS / f"{data.stem}.jsonl"
    loaded = load_records(data, fmt="text", columns={"text": column})
    if not loaded.records and loaded.rejects:
        first = loaded.rejects[0]
        raise DataError(f"{data}: no row has a usable {column!r} column (line {first['line']}: {first['reason']})",
                        "name the column that holds the text with --column")
    texts = [r.data["text"] for r in loaded.records]
    bar = tqdm(total=len(texts), desc="predicting", unit="row", leave=False)
    answers = predict(run_path, texts, batch_size=batch_size, progress=bar.update) if texts else []
    bar.close()
    rows = [{"file": r.source, "line": r.line, **_other_columns(r.raw, column), "text": r.data["text"],
             **ranked(p, top)} for r, p in zip(loaded.records, answers)]
    write_rows(rows, out)
    rejects_file = None
    if loaded.rejects:
        rejects_file = out.with_name(f"{out.stem}.rejects.jsonl")
        write_rejects(loaded.rejects, rejects_file)
    return FilePredictions(out, rejects_file, loaded.rows_read, len(rows), len(loaded.rejects), loaded.reasons(),
                           Counter(row["label"] for row in rows))


def _other_columns(raw: dict[str, Any] | None, column: str) -> dict[str, Any]:
    """The input row's other columns (an id, a gold label), under `row`, so the predictions join back to it."""
    other = {k: v for k, v in (raw or {}).items() if k != column}
    return {"row": other} if other else {}


def describe_file(result: FilePredictions) -> str:
    """The lines `tunesmith predict --data` prints: counts, the labels given, where everything went."""
    reasons = ", ".join(f"{k} ×{v}" for k, v in result.reasons.items())
    lines = [f"{result.rows_read} rows read, {result.predicted} labelled, {result.rejects} rejected"
             + (f" ({reasons})" if reasons else "")]
    common = result.labels.most_common(10)
    if common:
        rest = len(result.labels) - len(common)
        lines.append("labels: " + ", ".join(f"{label} ×{n}" for label, n in common)
                     + (f", and {rest} more" if rest > 0 else ""))
    lines.append(f"predictions: {result.out}")
    if result.rejects_file is not None:
        lines.append(f"rejects: {result.rejects_file}")
    return "\n".join(lines)


def describe_texts(texts: list[str], answers: list[dict[str, Any]]) -> str:
    """One line per text: label, probability, the runners-up, and the text (shortened)."""
    width = max(len(a["label"]) for a in answers)
    lines = []
    for text, a in zip(texts, answers):
        others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in a["top"][1:])
        text = " ".join(text.split())
        lines.append(f"{a['label']:<{width}}  {a['probability']:.3f}  {text[:80] + ('…' if len(text) > 80 else '')}"
                     + (f"  (then {others})" if others else ""))
    return "\n".join(lines)
