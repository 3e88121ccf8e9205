"""Frozen features (`method: features`): pooled embeddings of a frozen model and a linear classifier on them.

The model is never trained: each text is embedded once (mean of its non-pad tokens' last hidden states, or the
last non-pad token's), in bf16 where the hardware runs it fast, and scikit-learn fits a logistic regression or a
linear SVM on the embeddings. Minutes on a laptop CPU where fine-tuning takes hours; a strong baseline with an
encoder (`model.name: minilm`). Read top to bottom: parameters, embeddings, classifier, train, save, predict.

The run folder holds `classifier/` (weights.npz: coefficients, intercepts, standardization; classifier.json:
what they mean, no pickle) and `labels.json`. Scores: probabilities for `logistic`; for `linear_svm`, a softmax
of the decision values (ordered like probabilities, not calibrated).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from tunesmith.methods.base import Method, Shape, TrainOutcome
from tunesmith.methods.classify import TextTemplateMixin, encode_labelled, tokenize_text  # the same rows
from tunesmith.schema import MethodParams


class FeaturesParams(TextTemplateMixin, MethodParams):
    name: Literal["features"] = "features"
    pooling: Literal["mean", "last"] = Field("mean", description="mean over non-pad tokens, or the last non-pad "
                                                                 "token (decoders)")
    classifier: Literal["logistic", "linear_svm"] = Field("logistic", description="the scikit-learn classifier "
                                                                                  "fitted on the embeddings")
    C: float = Field(1.0, gt=0, description="inverse regularization strength: smaller = simpler classifier")
    standardize: bool = Field(True, description="scale each embedding dimension to mean 0, sd 1 over the training "
                                                "rows")
    max_iter: int = Field(1000, gt=0, description="solver iterations")


# ----------------------------------------------------------------------------------------------- embeddings


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_encoder(source, precision: str = "fp32"):
    """The frozen base model without any head (AutoModel), in `precision`, in eval mode."""
    import torch
    from transformers import AutoModel

    from tunesmith.errors import ModelError

    try:
        model = AutoModel.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch_dtype(precision))
    except Exception as exc:
        raise ModelError(f"can't load model {source.describe()}: {type(exc).__name__}: {exc}",
                         "check that the folder holds config.json and complete weights (or a valid .gguf file)") \
            from None
    model.requires_grad_(False)
    if torch.cuda.is_available():
        model.to("cuda")
    return model.eval()


def pool(hidden, attention_mask, pooling: str):
    """(batch, hidden) float32 embeddings: the mean over positions where the mask is 1, or the last such position."""
    import torch

    hidden, mask = hidden.float(), attention_mask.to(hidden.device)
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(1)  # the rightmost real token, with either padding side
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def embed(model, rows: list[list[int]], pad_id: int, pooling: str, batch_size: int = 16, desc: str = "embedding",
          progress: Callable[[int], None] | None = None):
    """Pooled embeddings (numpy, rows × hidden) of token-id rows, batched by similar length, with a progress bar."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from tunesmith.methods.classify import PadCollator

    collate = PadCollator(pad_id)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.zeros((len(rows), model.config.get_text_config().hidden_size), dtype=np.float32)
    with tqdm(total=len(rows), desc=desc, unit="row", leave=False, disable=progress is not None) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([{"input_ids": rows[i]} for i in chunk]).items()}
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            out[chunk] = pool(hidden, batch["attention_mask"], pooling).cpu().numpy()
            bar.update(len(chunk))
            if progress:
                progress(len(chunk))
    return out


# ----------------------------------------------------------------------------------------------- classifier


@dataclass
class LinearClassifier:
    """A fitted linear classifier as plain arrays: scores = f((x - mean) / scale @ coef.T + intercept)."""

    kind: str  # logistic | linear_svm
    coef: Any  # (classes, dims), or (1, dims) with two classes
    intercept: Any  # (classes,) or (1,)
    class_ids: Any  # the label ids the columns of `scores` belong to (those seen in training)
    mean: Any  # (dims,) zeros without standardization
    scale: Any  # (dims,) ones without standardization

    def decision(self, x):
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def scores(self, x):
        """(rows, len(class_ids)): logistic probabilities, or a softmax of the SVM's decision values."""
        import numpy as np

        d = self.decision(np.asarray(x, dtype=np.float64))
        if d.shape[1] == 1:  # binary: the one column is the second class's margin
            d = np.concatenate([np.zeros_like(d), d], axis=1)
        d = d - d.max(axis=1, keepdims=True)
        e = np.exp(d)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x):
        return self.class_ids[self.scores(x).argmax(1)]


def fit_classifier(x, y, params: FeaturesParams, seed: int = 0, sample_weight=None,
                   intercept: bool = True) -> LinearClassifier:
    """Fit scikit-learn's LogisticRegression or LinearSVC on embeddings `x` and label ids `y`, each row counted
    `sample_weight` times (default 1). `intercept=False` fits scores = x / scale @ coef.T (no centring, no
    intercept): the shape of a label head without a bias."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if len(np.unique(y)) < 2:
        from tunesmith.errors import DataError

        raise DataError("the training rows hold only one label; a classifier needs at least two",
                        "add rows of the other labels")
    mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if params.standardize:
        std = x.std(axis=0)
        # a dimension that is constant but for rounding (MiniLM has three, sd 1e-32 .. 1e-9) stays unscaled: scaled
        # up, its rounding noise would look like a feature, and folded into a label head, weights of 1e7
        scale = np.where(std > 1e-6 * std.max(initial=0.0), std, 1.0)
        mean = x.mean(axis=0) if intercept else mean
    if params.classifier == "logistic":
        model = LogisticRegression(C=params.C, max_iter=params.max_iter, random_state=seed, fit_intercept=intercept)
    else:
        model = LinearSVC(C=params.C, max_iter=params.max_iter, random_state=seed, fit_intercept=intercept)
    model.fit((x - mean) / scale, y, sample_weight=sample_weight)
    return LinearClassifier(params.classifier, model.coef_.copy(), np.atleast_1d(model.intercept_).copy(),
                            model.classes_.copy(), mean, scale)


def save_classifier(folder: Path, clf: LinearClassifier, meta: dict[str, Any]) -> None:
    """`weights.npz` (arrays) and `classifier.json` (kind and `meta`) in `folder`; no pickle anywhere."""
    import numpy as np

    from tunesmith.artifacts import write_json

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "weights.npz", coef=clf.coef, intercept=clf.intercept, class_ids=clf.class_ids,
             mean=clf.mean, scale=clf.scale)
    write_json(folder / "classifier.json", {"kind": clf.kind, **meta})


def load_linear(folder: Path) -> tuple[LinearClassifier, dict[str, Any]]:
    """The classifier and its metadata, as `save_classifier` wrote them."""
    import numpy as np

    meta = json.loads((folder / "classifier.json").read_text())
    with np.load(folder / "weights.npz", allow_pickle=False) as w:
        clf = LinearClassifier(meta["kind"], w["coef"], w["intercept"], w["class_ids"], w["mean"], w["scale"])
    return clf, meta


def evaluate(clf: LinearClassifier, x, y) -> dict[str, float | None]:
    """Accuracy, and log loss for the logistic classifier (its scores are probabilities)."""
    import numpy as np

    if len(y) == 0:
        return {"accuracy": None, "loss": None}
    y = np.asarray(y)
    scores = clf.scores(x)
    column = {int(c): j for j, c in enumerate(clf.class_ids)}
    gold = np.array([scores[i, column[int(t)]] if int(t) in column else 0.0 for i, t in enumerate(y)])
    loss = float(-np.log(np.clip(gold, 1e-12, None)).mean()) if clf.kind == "logistic" else None
    return {"accuracy": float((clf.class_ids[scores.argmax(1)] == y).mean()), "loss": loss}


# ----------------------------------------------------------------------------------------------- train


def train(job) -> TrainOutcome:
    """Embed every row with the frozen model, fit the classifier, save `classifier/` and `labels.json`."""
    import numpy as np

    from tunesmith.methods.classify import write_labels
    from tunesmith.methods.common import count_parameters

    params: FeaturesParams = job.recipe.method
    classes = job.train_rows[0].classes
    t0 = time.time()
    model = load_encoder(job.source, job.precision)
    pad = job.tokenizer.pad_token_id
    batch = job.recipe.train.batch_size
    x_train = embed(model, [r.input_ids for r in job.train_rows], pad, params.pooling, batch, "embedding train")
    x_val = embed(model, [r.input_ids for r in job.validation_rows], pad, params.pooling, batch,
                  "embedding validation")
    y_train = np.array([r.labels[0] for r in job.train_rows])
    y_val = np.array([r.labels[0] for r in job.validation_rows])
    clf = fit_classifier(x_train, y_train, params, job.recipe.train.seed)
    seconds = time.time() - t0
    on_train, on_val = evaluate(clf, x_train, y_train), evaluate(clf, x_val, y_val)
    folder = job.run.root / "classifier"
    save_classifier(folder, clf, {
        "pooling": params.pooling, "template": params.template, "precision": job.precision,
        "standardize": params.standardize, "C": params.C,
        "labels": list(classes), "dims": int(x_train.shape[1]), "train_rows": len(y_train),
        "train_accuracy": on_train["accuracy"], "validation_accuracy": on_val["accuracy"]})
    write_labels(job.run.root, classes, pad, "classifier", task="features", template=params.template)
    with open(job.run.metrics, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 0, "epoch": 1.0, "train_accuracy": on_train["accuracy"],
                             "train_loss": on_train["loss"], "eval_accuracy": on_val["accuracy"],
                             "eval_loss": on_val["loss"], "seconds": round(seconds, 2)}) + "\n")
    _, total = count_parameters(model)
    fitted = int(clf.coef.size + clf.intercept.size)
    return TrainOutcome(
        steps=0, seconds=seconds, trained_tokens=sum(len(r.input_ids) for r in job.train_rows),
        losses={"train_before": None, "validation_before": None, "train_after": on_train["loss"],
                "validation_after": on_val["loss"], "train_accuracy_after": on_train["accuracy"],
                "validation_accuracy_after": on_val["accuracy"]},
        saved="classifier", trainable_params=fitted, total_params=total + fitted)


# ----------------------------------------------------------------------------------------------- predict

_CACHE: dict[tuple, tuple] = {}


def load_features_run(run_dir: str | Path, precision: str | None = None):
    """(encoder, tokenizer, classifier, metadata, max_len) of a run, loaded once per folder and precision."""
    from transformers import AutoTokenizer

    from tunesmith.artifacts import RunDir
    from tunesmith.model import resolve_model

    run = RunDir(Path(run_dir).resolve())
    clf, meta = load_linear(run.root / "classifier")
    precision = precision or meta["precision"]  # the training precision: the same embeddings the classifier saw
    key = (str(run.root), precision, (run.root / "classifier" / "weights.npz").stat().st_mtime_ns)
    if key not in _CACHE:
        recipe = run.read_recipe()
        source = resolve_model(recipe["model"]["name"], recipe["model"].get("cache_dir"))
        _CACHE[key] = (load_encoder(source, precision), AutoTokenizer.from_pretrained(run.tokenizer), clf, meta,
                       recipe["train"]["max_seq_len"])
    return _CACHE[key]


def predict(run_dir: str | Path, texts: list[str], batch_size: int = 16, precision: str | None = None,
            progress: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """`{label: score}` for each text, in order; labels the classifier never saw in training score 0."""
    model, tokenizer, clf, meta, max_len = load_features_run(run_dir, precision)
    rows = [tokenize_text(tokenizer, t, max_len, meta.get("template"))[0] for t in texts]
    x = embed(model, rows, tokenizer.pad_token_id, meta["pooling"], batch_size, "embedding", progress)
    scores = clf.scores(x)
    labels = meta["labels"]
    out = []
    for row in scores:
        item = dict.fromkeys(labels, 0.0)
        item.update({labels[int(c)]: float(s) for c, s in zip(clf.class_ids, row)})
        out.append(item)
    return out


# ----------------------------------------------------------------------------------------------- export


def export(run_dir: str | Path, out: Path) -> Path:
    """The frozen model with the linear classifier folded into a sequence-classification head (standardization in
    the weights; a binary classifier's one margin as a second row; labels it never saw get bias -1e4), written by
    classify.write_classifier. Mean pooling and a decoder's last token export; an encoder read at its last token
    has no plain form, and a head without a bias (Llama's `score`) can't hold the intercept: both are refused."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.artifacts import open_run
    from tunesmith.errors import RunError
    from tunesmith.methods.classify import label_head, padding_side, write_classifier
    from tunesmith.model import resolve_model

    run = open_run(run_dir)
    clf, meta = load_linear(run.root / "classifier")
    recipe = run.read_recipe()
    source = resolve_model(recipe["model"]["name"], recipe["model"].get("cache_dir"))
    labels = meta["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(source.path, gguf_file=source.gguf_file,
                                                               num_labels=len(labels), dtype=torch.float32)
    side = padding_side(model.config)
    pooling = "mean" if meta["pooling"] == "mean" else "model"
    if meta["pooling"] == "last" and side != "left":
        raise RunError(f"{run.root}: a `features` run that reads an encoder's last token has no plain "
                       "transformers form (its head would read the [CLS] pooler)",
                       "train it with method.pooling: mean, or label texts with `tunesmith predict`")
    weight = np.zeros((len(labels), clf.coef.shape[1]))
    bias = np.full(len(labels), -1e4)  # labels the classifier never saw: probability ~0, as predict gives 0
    coef, intercept = clf.coef / clf.scale, clf.intercept - (clf.coef / clf.scale) @ clf.mean
    if coef.shape[0] == 1:  # binary: scores = softmax([0, margin])
        coef, intercept = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    weight[clf.class_ids], bias[clf.class_ids] = coef, intercept
    head = label_head(model, "export", "method.pooling: mean")
    if head.bias is None:
        raise RunError(f"{run.root}: {type(model).__name__}'s label head has no bias to hold the linear classifier's "
                       "intercept, so the classifier can't be folded into it",
                       f"label texts with `tunesmith predict {run.root} TEXT …`; or train `method: classify`, whose "
                       "head is the model's own")
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    return write_classifier(model, tokenizer, out, run.root, labels, pooling=pooling, template=meta.get("template"),
                            side=side, max_len=recipe["train"]["max_seq_len"])


METHOD = Method(
    name="features",
    summary="a frozen model's pooled embeddings + a linear classifier (logistic | linear_svm); no fine-tuning",
    params=FeaturesParams,
    record_types=("classification",),
    train=train,
    predict=predict,
    encode=encode_labelled,
    metrics=(),
    export=export,
    shape=Shape(trains=False),
)
