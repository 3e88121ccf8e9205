"""Sequence classification (`method: classify`): a classification head on any model, tuned with an adapter.

Decoders (Llama-family) score the last non-pad token; encoders (BERT) their pooled [CLS] — the model's own head
(`pooling: model`). A sentence-transformers encoder (e.g. `model.name: minilm`) was trained to be read by the mean
of its token states, not by its [CLS] pooler, so there the head reads that mean (`pooling: mean`, the `auto` choice
when the model folder's sentence-transformers config declares mean pooling; the unused pooler is frozen). A row is
the record's plain text (no chat template) and its label id; the loss is cross-entropy with each row multiplied by
its label's class weight (`data.class_weights`), averaged over the rows. The head starts random, or with
`head_init: probe` as a logistic regression of what it reads from the frozen model (linear probing then
fine-tuning). Read top to bottom: parameters, rows, pooling, probe and loss, trainer, model, save, predict.

Any adapter of methods/adapters.py adapts the body. The run folder holds `adapter/` (peft: the head travels in
`modules_to_save`; bottleneck adapters: with their own weights) or `model/` (freeze, full), and `labels.json`.
Decoder batches are padded on the left (see `padding_side`). Reload a peft or full run with plain libraries:

    labels = json.load(open(RUN / "labels.json"))
    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=labels["num_labels"],
                                                              pad_token_id=labels["pad_token_id"])
    model = PeftModel.from_pretrained(base, RUN / "adapter")   # or from_pretrained(RUN / "model")

With `"pooling": "mean"` in labels.json the logits are the head applied to the mean of the last hidden states over
the attention mask: `model.classifier(mean)` (BERT) or `model.score(mean)` (Llama), not `model(...).logits`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from tunesmith.artifacts import atomic_write
from tunesmith.data.format import Encoded
from tunesmith.errors import DataError
from tunesmith.methods.adapters import AdapterParamsMixin
from tunesmith.methods.base import TRAINER_STRATEGIES, Method, Shape, TrainOutcome, padded_batches
from tunesmith.schema import MethodParams, Strict

TASK = "seq-cls"
SLOT = "{text}"


class TextTemplateMixin(Strict):
    """How a row's text is put to the model, shared by the methods that read a label from it (classify, features)."""

    # a decoder's last token then stands where the answer would begin, which is what the head reads
    template: str | None = Field(None, description="a prompt around each text, {text} marking where it goes, e.g. "
                                                   "'Review: {text}\\nSentiment:'; null: the text alone")

    @field_validator("template")
    @classmethod
    def _template_has_the_slot(cls, value: str | None) -> str | None:
        if value is not None and value.count(SLOT) != 1:
            raise ValueError(f"the template needs {SLOT} exactly once, where the row's text goes, "
                             f"e.g. 'Review: {SLOT}\\nSentiment:'")
        return value


class ClassifyParams(TextTemplateMixin, AdapterParamsMixin, MethodParams):
    """Any adapter of methods/adapters.py adapts the body; the new head is always trained in full."""

    name: Literal["classify"] = "classify"
    # auto: mean where the model folder's sentence-transformers config says it was trained for mean pooling
    pooling: Literal["auto", "model", "mean"] = Field(
        "auto", description="what the head reads: the model's own choice (last token / [CLS] pooler), or the mean "
                            "of the token states; auto: mean for sentence-transformers encoders")
    # probe: linear probing then fine-tuning ("LP-FT", Kumar et al. 2022): training starts at the features method's
    # accuracy instead of chance and the body's features are disturbed less
    head_init: Literal["random", "probe"] = Field(
        "random", description="the head's starting weights: random, or a logistic regression fitted on what it "
                              "reads from the frozen model (linear probing, then fine-tuning)")
    probe_C: float = Field(1.0, gt=0, description="the probe's inverse regularization strength (scikit-learn's C)")


# ----------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class LabelRow(Encoded):
    """One classification row: the text's token ids and `labels = [label id]`; `classes` names every id."""

    classes: tuple[str, ...] = field(default=(), repr=False, compare=False)
    text: str = field(default="", repr=False, compare=False)  # the row's text as given (ensembles re-read it)

    @property
    def trained_tokens(self) -> int:  # the loss back-propagates through every token of the text
        return len(self.input_ids)


@dataclass
class LabelledRows:
    """Encoded training and validation rows, and the rows encoding had to reject (train.py's EncodedData shape)."""

    train: list[LabelRow]
    validation: list[LabelRow]
    rejects: list[dict[str, Any]]


def tokenize_text(tokenizer, text: str, max_len: int, template: str | None = None) -> tuple[list[int], int]:
    """The text's ids with the tokenizer's own special tokens ([CLS]/[SEP], BOS), cut to `max_len`; full length.

    With a `template` the text goes in its `{text}` slot, and a row that is too long loses the end of its text, not
    of the template: the words after the text are the ones a decoder's head reads."""
    if template is None:
        ids = tokenizer(text)["input_ids"]
        if len(ids) <= max_len:
            return list(ids), len(ids)
        return list(tokenizer(text, truncation=True, max_length=max_len)["input_ids"]), len(ids)
    ids = tokenizer(template.replace(SLOT, text))["input_ids"]
    full = len(ids)
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(words)
    while len(ids) > max_len and keep > 0:  # re-tokenizing the joined string can shift a token or two: repeat
        keep = max(0, keep - (len(ids) - max_len))
        ids = tokenizer(template.replace(SLOT, tokenizer.decode(words[:keep])))["input_ids"]
    if len(ids) > max_len:
        raise DataError(f"method.template alone is {len(ids)} tokens, more than train.max_seq_len={max_len}",
                        "shorten the template or raise train.max_seq_len")
    return list(ids), full


def encode_labelled(data, tokenizer, recipe) -> LabelledRows:
    """Classification records -> LabelRows: plain text, label ids in `data.labels` order, class weights on train."""
    if data.kind != "classification":
        raise DataError(f"method {recipe.method.name!r} trains on classification rows (text + label), "
                        f"got {data.kind} rows", "set data.format: classification and map text/label columns")
    classes = tuple(data.labels)
    if len(classes) < 2:
        raise DataError(f"{recipe.data.train}: only one label ({', '.join(classes) or 'none'}) — a classifier "
                        "needs at least two", "add rows of the other labels, or list them in data.labels")
    index = {label: i for i, label in enumerate(classes)}
    weights = {}
    if recipe.data.class_weights:
        from tunesmith.data.balance import load_class_weights

        weights = load_class_weights(recipe.data.class_weights, data.train)
    out = LabelledRows([], [], [])
    for records, target in ((data.train, out.train), (data.validation, out.validation)):
        for record in records:
            ids, full = tokenize_text(tokenizer, record.data["text"], recipe.train.max_seq_len,
                                      recipe.method.template)
            if not ids:
                out.rejects.append({"file": record.source, "line": record.line, "reason": "the text has no tokens",
                                    "row": record.data})
                continue
            label = record.data["label"]
            weight = weights.get(label, 1.0) if target is out.train else 1.0  # validation measures the real task
            target.append(LabelRow(ids, [index[label]], full > len(ids), full, weight, classes,
                                   record.data["text"]))
    return out


class PadCollator:
    """Pads `input_ids` on `side` (attention mask alongside) and stacks the label ids into a (batch,) tensor."""

    def __init__(self, pad_id: int, side: str = "right"):
        self.pad_id, self.side = pad_id, side

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            cols = slice(0, n) if self.side == "right" else slice(width - n, width)
            ids[i, cols] = torch.tensor(e["input_ids"])
            mask[i, cols] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"][0] for e in examples], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------- pooling and loss

HEADS = ("score", "classifier")  # the label layer of Llama-style and BERT-style sequence-classification models


def resolve_pooling(requested: str, source) -> str:
    """'model' or 'mean': `requested`, or for 'auto' what the model folder's sentence-transformers config declares."""
    if requested != "auto":
        return requested
    return "mean" if sentence_transformers_pooling(source.path) == "mean" else "model"


def sentence_transformers_pooling(folder: Path) -> str | None:
    """'mean', 'cls', 'max', … from a sentence-transformers folder's Pooling module config; None for other folders."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        entry = next(m for m in modules if str(m.get("type", "")).endswith("Pooling"))
        config = json.loads((folder / entry.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError):
        return None
    modes = [key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
             for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
    return modes[0] if len(modes) == 1 else None


def label_head(model, needed_by: str = "method.pooling: mean", instead: str = "method.pooling: model"):
    """The linear layer that maps a pooled vector to the labels (`score` or `classifier`; peft's trainable copy)."""
    import torch.nn as nn

    from tunesmith.errors import ModelError

    found = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in HEADS]
    if found:
        name, module = min(found, key=lambda f: f[0].count("."))
        if isinstance(getattr(module, "original_module", module), nn.Linear):
            return module
    raise ModelError(f"{needed_by} needs a model whose label head is one linear layer (`score` or "
                     f"`classifier`), and {type(model).__name__} has none", f"set {instead}")


def head_logits(model, inputs: dict[str, Any], pooling: str):
    """The (batch, labels) logits: the model's own head, or for 'mean' the head applied to the masked mean of the
    last hidden states (with the model's classifier dropout while training)."""
    if pooling == "model":
        return model(**inputs).logits
    import torch
    import torch.nn.functional as F

    from tunesmith.methods.features import pool

    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    mask = inputs["attention_mask"]
    if hidden.shape[1] > mask.shape[1]:  # prompt tuning prepends virtual tokens; every real token sees them
        mask = torch.cat([mask.new_ones(mask.shape[0], hidden.shape[1] - mask.shape[1]), mask], 1)
    config = model.config
    dropout = getattr(config, "classifier_dropout", None)
    dropout = getattr(config, "hidden_dropout_prob", 0.0) if dropout is None else dropout
    pooled = F.dropout(pool(hidden, mask, "mean"), dropout, training=model.training)
    head = label_head(model)
    return head(pooled.to(next(head.parameters()).dtype))


def head_inputs(model, rows: list[list[int]], collate: PadCollator, pooling: str, precision: str = "fp32",
                batch_size: int = 32):
    """(rows × hidden) float64 numpy: what the label head reads for each token-id row, the model in eval mode.

    Caught on the way into the head, so it is exactly the pooled vector whatever the pooling (BERT's [CLS] pooler,
    the masked mean); a decoder's head scores every position and the model keeps the last real token's scores."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from tunesmith.methods.features import pool

    head = label_head(model, "method.head_init: probe", "method.head_init: random")
    seen: list = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    device = next(model.parameters()).device
    out = np.zeros((len(rows), getattr(head, "original_module", head).in_features))
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch: less padding
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="probe: reading the frozen model", unit="batch",
                          leave=False):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([{"input_ids": rows[i]} for i in chunk]).items()}
            seen.clear()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                head_logits(model, batch, pooling)
            x = seen[-1].float()
            if x.dim() == 3:
                x = pool(x, batch["attention_mask"], "last")
            out[chunk] = x.cpu().numpy()
    finally:
        hook.remove()
        model.train(was_training)
    return out


def probe_head(model, rows: list[LabelRow], collate: PadCollator, pooling: str, C: float, precision: str = "fp32",
               seed: int = 0) -> dict[str, float]:
    """Set the label head of a bare model (no adapter yet) to a logistic regression fitted on `head_inputs` of the
    training rows (class weights as sample weights), standardization folded into the weights; return its training
    accuracy and seconds.

    A head without a bias gets a probe without an intercept. Binary logistic regression has one margin; the two
    outputs get -margin/2 and +margin/2 (the same softmax). Labels no training row has keep their random rows."""
    import time

    import numpy as np
    import torch

    from tunesmith.methods.features import FeaturesParams, fit_classifier

    t0 = time.time()
    head = label_head(model, "method.head_init: probe", "method.head_init: random")
    x = head_inputs(model, [r.input_ids for r in rows], collate, pooling, precision)
    y = np.array([r.labels[0] for r in rows])
    bias = head.bias is not None
    clf = fit_classifier(x, y, FeaturesParams(C=C), seed, np.array([r.weight for r in rows]), intercept=bias)
    coef, intercept = clf.coef / clf.scale, clf.intercept - (clf.coef / clf.scale) @ clf.mean
    if coef.shape[0] == 1:  # binary: class_ids[1]'s margin over class_ids[0]
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    ids = torch.as_tensor(clf.class_ids, dtype=torch.long)
    with torch.no_grad():
        head.weight[ids] = torch.as_tensor(coef, dtype=head.weight.dtype)
        if bias:
            head.bias[ids] = torch.as_tensor(intercept, dtype=head.bias.dtype)
    return {"probe_train_accuracy": float((clf.predict(x) == y).mean()), "probe_seconds": time.time() - t0}


def classification_loss(model, inputs: dict[str, Any], pooling: str = "model"):
    """Mean over rows of cross-entropy × the row's weight (its label's class weight; 1 without `weights`).

    Returns (loss, logits). With inverse-frequency weights (mean weight 1 over the data set) the expected loss keeps
    its scale; the rare class pulls as hard as the common one.
    """
    import torch.nn.functional as F

    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "weights")}
    logits = head_logits(model, model_inputs, pooling)
    per_row = F.cross_entropy(logits.float(), inputs["labels"], reduction="none")
    weights = inputs.get("weights")
    if weights is not None:
        per_row = per_row * weights.to(device=per_row.device, dtype=per_row.dtype)
    return per_row.mean(), logits


def accuracy(prediction) -> dict[str, float]:
    """`compute_metrics` for the Trainer: share of rows whose arg-max logit is the gold label."""
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(prediction.label_ids)).mean())}


def _trainer_class(pooling: str):
    from transformers import Trainer

    class ClassifyTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, logits = classification_loss(model, inputs, pooling)
            return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    return ClassifyTrainer


class AccuracyLog:
    """Keeps the first and last `train_sample_accuracy` / `eval_accuracy` the Trainer reports."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _AccuracyLog(TrainerCallback):
            def __init__(self):
                self.seen: dict[str, list[float]] = {}

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                for key, name in (("train_sample_accuracy", "train"), ("eval_accuracy", "validation")):
                    if key in (metrics or {}):
                        self.seen.setdefault(name, []).append(metrics[key])

            def summary(self, before: bool) -> dict[str, float | None]:
                out = {}
                for name, values in self.seen.items():
                    out[f"{name}_accuracy_after"] = values[-1]
                    out[f"{name}_accuracy_before"] = values[0] if before and len(values) > 1 else None
                return out

        return _AccuracyLog()


def train(job) -> TrainOutcome:
    """Train a classification head (and adapter); save `adapter/` or `model/` plus `labels.json`."""
    from tunesmith.methods.common import WeightedCollator, run_trainer

    params: ClassifyParams = job.recipe.method
    classes = job.train_rows[0].classes
    pooling = resolve_pooling(params.pooling, job.source)
    probe: dict[str, float] = {}
    model = build_model(job, params, classes, pooling, probe)
    side = padding_side(model.config)
    collator = WeightedCollator(PadCollator(job.tokenizer.pad_token_id, side))
    trainer, log = head_trainer(job, _trainer_class(pooling), model, collator, accuracy, label_names=["labels"])
    outcome = run_trainer(job, trainer, model)
    outcome.losses.update(log.summary(before=job.recipe.eval.loss_before and not job.resume))
    outcome.losses.update(probe)
    outcome.saved = save(job, trainer.model, params, classes, side, pooling)
    return outcome


def head_trainer(job, trainer_class, model, collator, compute_metrics, label_names: list[str]):
    """The Trainer a head-training method (classify, reward) runs, and the log of its validation accuracy."""
    from transformers import TrainingArguments

    from tunesmith.methods.common import MetricsCallback, to_dataset, trainer_arguments, watch_callbacks

    args = TrainingArguments(**{**trainer_arguments(job), "prediction_loss_only": False, "label_names": label_names})
    log = AccuracyLog()
    callbacks = [MetricsCallback(job.run.metrics), log, *job.callbacks, *watch_callbacks(job)]
    trainer = trainer_class(
        model=model, args=args, train_dataset=to_dataset(job.train_rows),
        eval_dataset=to_dataset(job.validation_rows) if job.validation_rows else None,
        data_collator=collator, processing_class=job.tokenizer, compute_metrics=compute_metrics, callbacks=callbacks)
    return trainer, log


# ----------------------------------------------------------------------------------------------- model


def padding_side(config) -> str:
    """'right' for encoders (absolute positions, [CLS] first); 'left' for decoders, whose head reads the last
    position: with prompt tuning peft hands the model embeddings only, so it can't look for the padding."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "right" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "left"


def build_model(job, params: ClassifyParams, classes: tuple[str, ...], pooling: str = "model",
                probe: dict[str, float] | None = None):
    """The base model with a `len(classes)` head that knows the labels and the pad token, wrapped in the adapter;
    under mean pooling the [CLS] pooler is unused, so it is frozen (its adapter weights too). With `head_init:
    probe` the head starts as a linear probe of the base model (not on resume: the checkpoint has the head); its
    training accuracy and seconds go into `probe`."""
    from transformers import set_seed

    from tunesmith.methods.adapters import apply_adapter, load_base_for

    set_seed(job.recipe.train.seed)  # the head and the adapter start random: seed them like the rest of the run
    model = load_base_for(params.adapter, params, job.source, TASK, len(classes))
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {label: i for i, label in enumerate(classes)}
    model.config.pad_token_id = job.tokenizer.pad_token_id  # decoders pool the last token that isn't padding
    model.config.use_cache = False
    if params.head_init == "probe" and not job.resume:
        collate = PadCollator(job.tokenizer.pad_token_id, padding_side(model.config))
        found = probe_head(model, job.train_rows, collate, pooling, params.probe_C, job.precision,
                           job.recipe.train.seed)
        if probe is not None:
            probe.update(found)
    model = apply_adapter(model, params, TASK, job.precision)
    if pooling == "mean":
        label_head(model)  # a model without a linear head fails here, before training
        for name, parameter in model.named_parameters():
            if ".pooler." in f".{name}":
                parameter.requires_grad_(False)
    return model


def save(job, model, params: ClassifyParams, classes: tuple[str, ...], side: str, pooling: str) -> str:
    """The weights (`adapter/`, or `model/` with the tokenizer) and `labels.json`; return the weights folder."""
    from tunesmith.methods.adapters import save_adapter

    saved = save_adapter(model, params, job.run, job.tokenizer)
    write_labels(job.run.root, classes, job.tokenizer.pad_token_id, saved, padding_side=side, pooling=pooling,
                 template=params.template)
    return saved


def write_labels(root: Path, classes: tuple[str, ...], pad_token_id: int | None, saved: str, task: str = TASK,
                 padding_side: str = "right", pooling: str = "model", template: str | None = None) -> None:
    """`labels.json`: the label of each head output (id ↔ label) and what a plain reload needs (`template`: the
    prompt each text is put in before tokenizing, `{text}` marking its place; null = the text alone)."""
    from tunesmith import distributed
    from tunesmith.artifacts import write_json

    if not distributed.is_main():
        return
    write_json(root / "labels.json", {
        "labels": list(classes), "id2label": {str(i): label for i, label in enumerate(classes)},
        "label2id": {label: i for i, label in enumerate(classes)}, "num_labels": len(classes),
        "pad_token_id": pad_token_id, "padding_side": padding_side, "pooling": pooling, "task": task,
        "template": template, "saved": saved})


# ----------------------------------------------------------------------------------------------- predict


@dataclass
class LoadedClassifier:
    """A run's classifier ready to score texts."""

    model: Any
    tokenizer: Any
    labels: list[str]
    max_len: int
    precision: str
    collate: PadCollator
    pooling: str = "model"
    template: str | None = None

    def logits(self, batch: dict[str, Any]):
        """(batch, labels) fp32 logits, without gradients, in the run's precision."""
        import torch

        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return head_logits(self.model, batch, self.pooling).float()


_CACHE: dict[tuple, LoadedClassifier] = {}


def load_classifier(run_dir: str | Path, precision: str | None = None, cache: bool = True) -> LoadedClassifier:
    """Load (once per run folder and precision, unless `cache` is off) the trained classifier; precision defaults to
    the training one."""
    import torch
    from transformers import AutoTokenizer

    from tunesmith.artifacts import RunDir
    from tunesmith.methods.adapters import load_base_for, load_trained, run_adapter
    from tunesmith.model import resolve_model

    run = RunDir(Path(run_dir).resolve())
    meta = json.loads((run.root / "labels.json").read_text())
    manifest = {**(run.read_manifest() if run.manifest.exists() else {}), "saved": meta["saved"]}
    precision = precision or manifest.get("precision", "fp32")
    key = (str(run.root), precision, (run.root / "labels.json").stat().st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    recipe = run.read_recipe()
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer if run.tokenizer.exists() else run.model)
    base = None
    if meta["saved"] == "adapter":
        params = run_adapter(run, manifest)
        source = resolve_model(recipe["model"]["name"], recipe["model"].get("cache_dir"))
        base = load_base_for(params.adapter, params, source, TASK, meta["num_labels"])
        base.config.pad_token_id = meta["pad_token_id"]
    model = load_trained(run, manifest, base).eval()
    model.config.pad_token_id = meta["pad_token_id"]
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":  # qlora bases load on the GPU
        model.to("cuda")
    collate = PadCollator(meta["pad_token_id"], meta.get("padding_side", "right"))
    loaded = LoadedClassifier(model, tokenizer, meta["labels"], recipe["train"]["max_seq_len"], precision, collate,
                              meta.get("pooling", "model"), meta.get("template"))
    if cache:
        _CACHE[key] = loaded
    return loaded


def predict(run_dir: str | Path, texts: list[str], batch_size: int = 16, precision: str | None = None,
            progress: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """`{label: probability}` (softmax over the head's outputs) for each text, in order; a progress bar unless
    the caller counts rows with `progress`."""
    from tqdm.auto import tqdm

    loaded = load_classifier(run_dir, precision)
    encoded = [tokenize_text(loaded.tokenizer, t, loaded.max_len, loaded.template)[0] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
    out: list[dict[str, float]] = [{} for _ in texts]
    bar = tqdm(total=len(texts), desc="classifying", unit="row", leave=False, disable=progress is not None)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        probs = loaded.logits(loaded.collate([{"input_ids": encoded[i]} for i in chunk])).softmax(-1)
        for i, row in zip(chunk, probs.tolist()):
            out[i] = dict(zip(loaded.labels, row))
        bar.update(len(chunk))
        if progress:
            progress(len(chunk))
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------- export

EXPORT_INFO = "tunesmith_classifier.json"


def export(run_dir: str | Path, out: Path, readme: Callable[[dict[str, Any], Any], str] | None = None) -> Path:
    """Write the run's classifier to `out` as a plain transformers sequence-classification folder: the adapter
    merged into the base (a RunError where that isn't exact; export_merged says so before loading); see
    `write_classifier`. `readme(info, tokenizer)` writes README.md for other kinds of classifier (a reward model)."""
    from tunesmith.artifacts import open_run
    from tunesmith.methods.adapters import merge_for_export, run_adapter

    run = open_run(run_dir)
    adapter = run_adapter(run, run.read_manifest()).adapter
    loaded = load_classifier(run.root, "fp32", cache=False)
    model = merge_for_export(loaded.model, adapter)
    return write_classifier(model, loaded.tokenizer, out, run.root, loaded.labels, pooling=loaded.pooling,
                            template=loaded.template, side=loaded.collate.side, max_len=loaded.max_len,
                            readme=readme)


def write_classifier(model, tokenizer, out: Path, run_root: Path, labels: list[str], pooling: str,
                     template: str | None, side: str, max_len: int,
                     readme: Callable[[dict[str, Any], Any], str] | None = None) -> Path:
    """Save a sequence-classification model to `out` with the labels in config.json's id2label/label2id, the
    tokenizer padding on the side the head expects, and `tunesmith_classifier.json` plus a README.md saying how to
    read it — the template each text goes into, and for `pooling: mean` that the logits are the head applied to
    the masked mean of the last hidden states (no transformers class pools that way)."""
    from tunesmith.artifacts import write_json
    from tunesmith.errors import RunError

    head = next((name for name in HEADS if hasattr(model, name)), None)
    if head is None:
        raise RunError(f"{run_root}: {type(model).__name__} has no `score` or `classifier` head to export",
                       "label texts with `tunesmith predict RUN TEXT …` instead")
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    model.save_pretrained(out)
    tokenizer.padding_side = side
    tokenizer.save_pretrained(out)
    info = {"labels": list(labels), "pooling": pooling, "template": template, "padding_side": side,
            "max_length": max_len, "head": head, "run": str(run_root)}
    write_json(out / EXPORT_INFO, info)
    atomic_write(out / "README.md", (readme or _export_readme)(info, tokenizer))
    return out


def _export_readme(info: dict[str, Any], tokenizer=None) -> str:
    """How to read an exported classifier with plain transformers (README.md of the exported folder)."""
    text = (f"TEMPLATE = {json.dumps(info['template'])}  # the prompt each text was put in\n"
            'text = TEMPLATE.replace("{text}", text)'
            if info["template"] else "# each text goes in as it is (the run had no template)")
    cut = ("; tunesmith shortens a longer text inside the template (the template's words are kept), while "
           "`truncation=True` above cuts the end of the whole prompt" if info["template"] else "")
    if info["pooling"] == "mean":
        read = ("    hidden = model.base_model(**batch).last_hidden_state\n"
                "    mask = batch[\"attention_mask\"].unsqueeze(-1).to(hidden.dtype)\n"
                f"    logits = model.{info['head']}((hidden * mask).sum(1) / mask.sum(1))")
        note = ("The head reads the **mean of the last hidden states** over the attention mask, not the model's own "
                "pooling, so `model(**batch).logits` is *not* this classifier's answer: compute it as below.")
    else:
        read = "    logits = model(**batch).logits"
        note = "`model(**batch).logits` is the classifier's answer (the head reads the model's own pooling)."
    return f"""# Classifier exported by tunesmith

From the run `{info['run']}`: {len(info['labels'])} labels ({', '.join(info['labels'][:8])}{', …' if len(info['labels']) > 8 else ''}),
adapter merged into the weights. {note} `tunesmith_classifier.json` holds the same facts for programs. Below,
`FOLDER` is this folder's path and `text` the text to classify.

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained(FOLDER).eval()
tokenizer = AutoTokenizer.from_pretrained(FOLDER)  # pads on the {info['padding_side']}, as the head expects
{text}
batch = tokenizer([text], return_tensors="pt", padding=True, truncation=True, max_length={info['max_length']})
with torch.no_grad():
{read}
probabilities = logits.softmax(-1)  # column i is model.config.id2label[i]
```

Trained with texts of at most {info['max_length']} tokens{cut}.
"""


METHOD = Method(
    name="classify",
    summary="a classification head on any model (decoder or encoder, e.g. minilm), with any adapter",
    params=ClassifyParams,
    record_types=("classification",),
    train=train,
    predict=predict,
    encode=encode_labelled,
    check=padded_batches("each row is classified on its own, so batches are padded"),
    metrics=("loss", "accuracy"),
    export=export,
    strategies=TRAINER_STRATEGIES,
    shape=Shape(task="seq-cls", loss="head"),
    summary_rows=lambda losses: [] if losses.get("probe_train_accuracy") is None else [
        ("head init", f"linear probe, training accuracy {losses['probe_train_accuracy']:.4f} "
                      f"({losses['probe_seconds']:.1f} s)")],
)
