"""An ensemble of classifier runs (`method: ensemble`): each member answers, their class probabilities are pooled.

Members are finished classifier run folders — `classify` with any adapter and model, `features`, or another
ensemble — over the same labels, e.g. a fine-tuned encoder and a fine-tuned decoder whose mistakes differ. Nothing
is trained: "training" checks the members, measures each one and the ensemble on the validation rows, and writes
`ensemble.json` (the members' folders, weights and validation accuracies) and `labels.json`. `tunesmith eval`
treats the run folder like any other classifier's.

Pooling (`combine`): `mean` averages the members' probabilities (soft voting); `geometric` averages their
log-probabilities and renormalizes (a product of experts: a label one member rules out stays out). `weights`
scale the members (default equal). Read top to bottom: parameters, members, pooling, train, predict.
"""

from __future__ import annotations

import json
import re
import math
import time
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Literal

from pydantic import Field

from tunesmith.artifacts import atomic_write
from tunesmith.errors import RecipeError, RunError
from tunesmith.methods.base import Method, Shape, TrainOutcome
from tunesmith.methods.classify import encode_labelled
from tunesmith.schema import MethodParams, PathKey

FILE = "ensemble.json"


class EnsembleParams(MethodParams):
    name: Literal["ensemble"] = "ensemble"
    members: Annotated[list[str], PathKey("run")] = Field(min_length=2, description="classifier run folders "
                                                          "(classify, features, ensemble) over the same labels")
    weights: list[float] | None = Field(None, description="one per member, > 0; null: equal")
    combine: Literal["mean", "geometric"] = Field("mean", description="mean of probabilities, or of "
                                                  "log-probabilities renormalized")
    template: ClassVar[None] = None  # each member puts the text in its own prompt

    def file_problems(self) -> list[str]:
        """Every member is a finished classifier run over the first member's labels (member_runs)."""
        try:
            member_runs(self.members)
        except RecipeError as exc:
            return exc.problems
        return []


# ----------------------------------------------------------------------------------------------- members


def member_problems(method, train, data) -> list[str]:
    """What is wrong with `method.members` and `method.weights`, in recipe wording (the recipe check)."""
    out = []
    if method.weights is not None:
        if len(method.weights) != len(method.members):
            out.append(f"`method.weights`: {len(method.weights)} weights for {len(method.members)} members; "
                       "give one per member, or none for equal weights")
        elif any(w <= 0 for w in method.weights):
            out.append(f"`method.weights`: {method.weights} — each weight must be above 0")
    if len(set(method.members)) < len(method.members):
        out.append("`method.members`: a run is named twice; name each member once (weights say how much each "
                   "counts)")
    if train.early_stopping_patience:
        out.append("`train.early_stopping_patience`: `method: ensemble` trains nothing; remove it")
    return out


def member_runs(members: list[str]) -> list[dict]:
    """Each member's folder, method and labels; a RecipeError naming every member that is not a classifier run
    (or whose labels differ from the first member's)."""
    from tunesmith.methods import REGISTRY

    found, problems = [], []
    for i, folder in enumerate(members):
        root = Path(folder)
        where = f"`method.members[{i}]`: {folder!r}"
        if not (root / "manifest.json").is_file() or not (root / "labels.json").is_file():
            problems.append(f"{where} is not a finished classifier run folder (no manifest.json or labels.json); "
                            "train it first, or fix the path (relative to the recipe file)")
            continue
        try:
            method = json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("method", "")
            labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))["labels"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{where}: its manifest.json or labels.json is damaged ({type(exc).__name__}: {exc}); "
                            "train that member again")
            continue
        if not isinstance(method, str) or REGISTRY.get(method) is None or REGISTRY[method].predict is None \
                or method == "reward":
            problems.append(f"{where} is a `{method}` run, which does not classify; members must be classify, "
                            "features or ensemble runs")
            continue
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            problems.append(f"{where}: labels.json holds no list of labels; train that member again")
            continue
        found.append({"path": str(root.resolve()), "method": method, "labels": labels})
    if found:
        first = set(found[0]["labels"])
        for i, member in enumerate(found[1:], 1):
            if set(member["labels"]) != first:
                extra, missing = sorted(set(member["labels"]) - first), sorted(first - set(member["labels"]))
                problems.append(f"`method.members`: {member['path']} has other labels than {found[0]['path']} "
                                f"(only in it: {extra or 'none'}; missing: {missing or 'none'}); members must be "
                                "trained on the same labels")
    if problems:
        raise RecipeError("recipe", problems)
    return found


# ----------------------------------------------------------------------------------------------- pooling


def pool(answers: list[list[dict[str, float]]], weights: list[float], combine: str) -> list[dict[str, float]]:
    """Per text: the members' `{label: probability}` pooled into one distribution over the first member's labels.

    mean: Σ wᵢ pᵢ / Σ wᵢ. geometric: exp(Σ wᵢ log pᵢ / Σ wᵢ), renormalized (probabilities floored at 1e-12)."""
    total = sum(weights)
    out = []
    for per_member in zip(*answers):
        labels = list(per_member[0])
        if combine == "mean":
            item = {label: sum(w * p[label] for w, p in zip(weights, per_member)) / total for label in labels}
        else:
            logs = {label: sum(w * math.log(max(p[label], 1e-12)) for w, p in zip(weights, per_member)) / total
                    for label in labels}
            top = max(logs.values())
            item = {label: math.exp(v - top) for label, v in logs.items()}
            norm = sum(item.values())
            item = {label: v / norm for label, v in item.items()}
        out.append(item)
    return out


def member_answers(members: list[dict], texts: list[str], batch_size: int) -> list[list[dict[str, float]]]:
    """Each member's `{label: probability}` for each text (the member's own predict: its model, head, template)."""
    from tunesmith.methods import REGISTRY

    return [REGISTRY[m["method"]].predict(m["path"], texts, batch_size=batch_size) for m in members]


def accuracy(answers: list[dict[str, float]], gold: list[str]) -> float | None:
    if not gold:
        return None
    return sum(max(a, key=a.get) == g for a, g in zip(answers, gold)) / len(gold)


def mean_nll(answers: list[dict[str, float]], gold: list[str]) -> float | None:
    """Mean negative log-probability of the gold label (the validation loss of a classifier)."""
    if not gold:
        return None
    return sum(-math.log(max(a.get(g, 0.0), 1e-12)) for a, g in zip(answers, gold)) / len(gold)


# ----------------------------------------------------------------------------------------------- train


def train(job) -> TrainOutcome:
    """Check the members, measure each and the ensemble on the validation rows, write `ensemble.json`."""
    from tunesmith.methods.classify import write_labels

    params: EnsembleParams = job.recipe.method
    t0 = time.time()
    members = member_runs(params.members)
    classes = job.train_rows[0].classes
    unknown = sorted(set(classes) - set(members[0]["labels"]))
    if unknown:
        raise RecipeError("recipe", [f"`method.members`: the members were not trained on the data's labels "
                                     f"{unknown}; train them on this data, or fix data.train"])
    weights = params.weights or [1.0] * len(members)
    labels = tuple(members[0]["labels"])
    texts = [r.text for r in job.validation_rows]
    gold = [classes[r.labels[0]] for r in job.validation_rows]
    answers = member_answers(members, texts, job.recipe.train.batch_size) if texts else [[] for _ in members]
    pooled = pool(answers, weights, params.combine) if texts else []
    for member, weight, own in zip(members, weights, answers):
        member.update(weight=weight, validation_accuracy=accuracy(own, gold), validation_loss=mean_nll(own, gold))
    seconds = time.time() - t0
    for member in members:
        del member["labels"]  # labels.json has them
    summary = {"combine": params.combine, "members": members, "validation_rows": len(gold),
               "validation_accuracy": accuracy(pooled, gold), "validation_loss": mean_nll(pooled, gold)}
    atomic_write(job.run.root / FILE, json.dumps(summary, indent=2) + "\n")
    write_labels(job.run.root, labels, job.tokenizer.pad_token_id, "ensemble", task="ensemble")
    with open(job.run.metrics, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 0, "epoch": 0.0, "eval_accuracy": summary["validation_accuracy"],
                             "eval_loss": summary["validation_loss"], "seconds": round(seconds, 2)}) + "\n")
    total = sum(json.loads((Path(m["path"]) / "manifest.json").read_text())["training"].get("total_params") or 0
                for m in members)
    losses = {"validation_after": summary["validation_loss"],
              "validation_accuracy_after": summary["validation_accuracy"]}
    for i, m in enumerate(members):
        losses[f"member_{i}_validation_accuracy"] = m["validation_accuracy"]
    return TrainOutcome(steps=0, seconds=seconds, trained_tokens=0, losses=losses, saved="ensemble",
                        trainable_params=0, total_params=total)


# ----------------------------------------------------------------------------------------------- predict


def predict(run_dir: str | Path, texts: list[str], batch_size: int = 16, precision: str | None = None,
            progress: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """`{label: probability}` for each text, in order: the members' answers pooled as the run was made."""
    summary = json.loads((Path(run_dir) / FILE).read_text())
    members = summary["members"]
    missing = [m["path"] for m in members if not (Path(m["path"]) / "manifest.json").is_file()]
    if missing:
        raise RunError(f"{run_dir}: ensemble member(s) {', '.join(missing)} are gone",
                       "an ensemble reads its members' run folders; put them back, or make the ensemble again")
    answers = member_answers(members, texts, batch_size)
    if progress:
        progress(len(texts))
    return pool(answers, [m["weight"] for m in members], summary["combine"])


METHOD = Method(
    name="ensemble",
    summary="pool the class probabilities of finished classifier runs (classify, features); trains nothing",
    params=EnsembleParams,
    record_types=("classification",),
    train=train,
    predict=predict,
    encode=encode_labelled,
    check=member_problems,
    metrics=(),
    models_line=lambda params: f"members: {', '.join(params.members)} · method: ensemble "
                               "(each member in its own precision)",
    summary_rows=lambda losses: [
        (f"member {i}", f"validation accuracy {losses[f'member_{i}_validation_accuracy']:.4f}")
        for i in sorted(int(k.split("_")[1]) for k in losses if re.fullmatch(r"member_\d+_validation_accuracy", k))],
    shape=Shape(trains=False),
)
