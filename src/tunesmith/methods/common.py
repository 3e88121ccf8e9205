"""Training machinery every method shares: the job, trainer arguments, metrics, early stopping, keep-best,
the loop."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith import distributed
from tunesmith.artifacts import RunDir, atomic_write, truncate_metrics
from tunesmith.data.format import Encoded
from tunesmith.errors import RunError
from tunesmith.methods.base import TrainOutcome
from tunesmith.model import ModelSource
from tunesmith.recipe import Recipe


@dataclass
class Job:
    """Everything a method needs to train: the recipe, the run folder, the model source and encoded rows."""

    recipe: Recipe
    run: RunDir
    source: ModelSource
    tokenizer: Any
    train_rows: list[Encoded]
    validation_rows: list[Encoded]
    loss_rows: list[Encoded]  # a fixed sample of training rows: train loss before and after
    precision: str  # bf16 | fp16 | fp32 (already resolved from 'auto')
    resume: bool = False
    callbacks: list = field(default_factory=list)  # extra transformers callbacks (tests use them)


def to_dataset(rows: list[Encoded]):
    """A `datasets.Dataset` of the rows' COLUMNS (input_ids and labels for most rows), and `weight` when some
    row's loss weight isn't 1."""
    from datasets import Dataset

    names = rows[0].COLUMNS if rows else Encoded.COLUMNS
    columns = {name: [getattr(r, name) for r in rows] for name in names}
    if any(r.weight != 1.0 for r in rows):
        columns["weight"] = [r.weight for r in rows]
    return Dataset.from_dict(columns)


class WeightedCollator:
    """Wraps a collator: takes each example's `weight` out before it and puts a `weights` tensor in the batch."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        import torch

        weights = [float(e.get("weight", 1.0)) for e in examples]
        batch = self.inner([{k: v for k, v in e.items() if k != "weight"} for e in examples])
        if any(w != 1.0 for w in weights):
            w = torch.tensor(weights)
            if batch["input_ids"].shape[0] != len(examples):  # padding-free: one row of concatenated examples
                lengths = torch.tensor([len(e["input_ids"]) for e in examples])
                w = torch.repeat_interleave(w, lengths).unsqueeze(0)  # a weight per token
            batch["weights"] = w
        return batch


def trainer_arguments(job: Job) -> dict[str, Any]:
    """TrainingArguments keywords from the recipe's `train` section (shared by every Trainer-based method)."""
    import torch

    t = job.recipe.train
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(job.run.tensorboard)  # transformers 5 reads the folder from here
    has_val = bool(job.validation_rows)
    args: dict[str, Any] = dict(
        output_dir=str(job.run.checkpoints),
        learning_rate=t.learning_rate, lr_scheduler_type=t.scheduler, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, optim="adamw_torch",
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        bf16=job.precision == "bf16", fp16=job.precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed, data_seed=t.seed,
        eval_strategy="steps" if (t.eval_every and has_val) else "no", eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no", save_steps=t.save_every,
        save_total_limit=t.save_total_limit,
        logging_strategy="steps", logging_steps=t.log_every, logging_first_step=True,
        report_to=["tensorboard"], disable_tqdm=False, dataloader_num_workers=0,
        remove_unused_columns=False, prediction_loss_only=True, logging_nan_inf_filter=False, use_cpu=not torch.cuda.is_available(),
    )
    args.update(distributed.trainer_arguments(job.recipe.distributed))
    if t.group_by_length:  # otherwise each trainer's own default (random; TRL's KTO: sequential)
        args["train_sampling_strategy"] = "group_by_length"
    if t.warmup_steps is not None:
        args["warmup_steps"] = t.warmup_steps
    elif t.warmup_ratio is not None:
        args["warmup_steps"] = t.warmup_ratio  # transformers 5: a float below 1 is a ratio of the total steps
    return args


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(_logical_numel(p) for p in model.parameters())


def _logical_numel(param) -> int:
    """Weights a parameter stands for: a 4-bit (bitsandbytes) tensor packs two per stored byte; count the weights."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else param.numel()


class MetricsCallback:
    """Appends every log and evaluation to metrics.jsonl (TensorBoard gets them from the Trainer). `extra` is added
    to each row while set: the evaluation of kept weights after training carries `kept_from_step`, so that a reader
    does not take it for a second measurement of the last step's weights."""

    def __new__(cls, path):
        from transformers import TrainerCallback

        class _Metrics(TrainerCallback):
            extra: dict = {}

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero or not logs:
                    return
                row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs, **self.extra}
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                check_finite(logs, state.global_step, args.learning_rate)

        return _Metrics()


class TrainingDiverged(RunError):
    """The loss (or gradient norm) became NaN or infinite: training stops, and no weights are saved as a result."""


def check_finite(values: dict[str, Any], step: int, learning_rate: float) -> None:
    """Raise TrainingDiverged when a logged loss or gradient norm is NaN or infinite, naming the step and cause."""
    bad = {k: v for k, v in values.items() if (k.endswith("loss") or k == "grad_norm")
           and isinstance(v, (int, float)) and not math.isfinite(v)}
    if bad:
        found = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TrainingDiverged(f"training diverged at step {step}: {found}; no weights were saved as the result",
                               f"the usual cause is a learning rate too high for this model and data "
                               f"(train.learning_rate = {learning_rate:g}: try 10x lower), or fp16 overflow "
                               "(train.precision=bf16 or fp32); checkpoints written before this step are kept")


def watch_callbacks(job: Job) -> list:
    """The callbacks that watch validation: early stopping and keep-best, as the recipe's `train` asks."""
    t = job.recipe.train
    out = []
    if t.early_stopping_patience:
        out.append(EarlyStopping(t.early_stopping_patience, t.best_metric))
    if t.keep_best:
        last = job.run.last_checkpoint() if job.resume else None
        resume_step = int(last.name.split("-")[-1]) if last is not None else None
        store = job.run.checkpoints / "best" if t.save_every else None  # a resumable run keeps it on disk too
        out.append(KeepBest(t.best_metric, store, resume_step))
    return out


def _standing(metric: str, metrics: dict | None) -> tuple[float, ...] | None:
    """How good an evaluation is, higher being better: the validation `metric`, then (for accuracy) the loss.

    Accuracy on a few hundred rows ties often; between two evaluations that tie, the lower loss is the better."""
    metrics = metrics or {}
    value = metrics.get(f"eval_{metric}")
    if value is None:
        return None
    if metric == "loss":
        return (-value,)
    loss = metrics.get("eval_loss")
    return (value,) if loss is None else (value, -loss)


def _better(standing: tuple[float, ...], best: tuple[float, ...] | None) -> bool:
    """Whether an evaluation's standing beats the best so far; complete ties keep the first."""
    if best is None:
        return True
    for new, old in zip(standing, best):
        if abs(new - old) > 1e-9:
            return new > old
    return False


class EarlyStopping:
    """Stops training after `patience` evaluations without a better validation `metric` (loss or accuracy)."""

    def __new__(cls, patience: int, metric: str = "loss"):
        from transformers import TrainerCallback

        class _EarlyStopping(TrainerCallback):
            best: tuple[float, ...] | None = None
            bad = 0

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                standing = _standing(metric, metrics)
                if standing is None:
                    return
                if _better(standing, self.best):
                    self.best, self.bad = standing, 0
                else:
                    self.bad += 1
                    if self.bad >= patience:
                        control.should_training_stop = True
                        state.stopped_early = True

        return _EarlyStopping()


class KeepBest:
    """Remembers the trainable weights of the evaluation with the best validation `metric` during training (the
    measurement before training is not a candidate; the last weights are, once run_trainer has evaluated them);
    `restore(model)` puts them back. With `store` (a run that writes checkpoints) the best weights are also written
    there, so a resumed run still knows them — unless they came after the checkpoint it resumes from."""

    def __new__(cls, metric: str, store: Path | None = None, resume_step: int | None = None):
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import TrainerCallback

        class _KeepBest(TrainerCallback):
            def __init__(self):
                self.metric, self.best, self.step, self.weights = metric, None, None, None
                self.standing: tuple[float, ...] | None = None
                info = store / "best.json" if store else None
                if resume_step is not None and info is not None and info.exists():
                    found = json.loads(info.read_text())
                    if found["step"] <= resume_step:
                        self.best, self.step = found["value"], found["step"]
                        self.standing = tuple(found.get("standing") or  # best.json of an older version: value only
                                              _standing(metric, {f"eval_{metric}": found["value"]}))
                        self.weights = load_file(str(store / "weights.safetensors"))

            def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
                standing = _standing(metric, metrics)
                if standing is None or model is None or state.global_step == 0:
                    return
                if not _better(standing, self.standing):
                    return
                self.best, self.step, self.standing = metrics[f"eval_{metric}"], state.global_step, standing
                self.weights = {name: p.detach().to("cpu", copy=True).contiguous()
                                for name, p in model.named_parameters() if p.requires_grad}
                if store is not None and state.is_world_process_zero:
                    store.mkdir(parents=True, exist_ok=True)
                    save_file(self.weights, str(store / "weights.safetensors"))
                    atomic_write(store / "best.json", json.dumps({"step": self.step, "metric": metric,
                                                                  "value": self.best, "standing": standing}))

            def restore(self, model) -> None:
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for name, weight in (self.weights or {}).items():
                        params[name].copy_(weight.to(params[name].device))

        return _KeepBest()


def run_trainer(job: Job, trainer, model) -> TrainOutcome:
    """Measure loss before, train (or resume), measure loss after; return the outcome."""
    before_path = job.run.root / ".losses_before.json"
    resume_from = None
    if job.resume:
        resume_from = job.run.last_checkpoint()
        if resume_from is None:
            raise RunError(f"{job.run.checkpoints}: no checkpoint to resume from",
                           "checkpoints are written every `train.save_every` steps; run without --resume")
        if distributed.is_main():
            truncate_metrics(job.run.metrics, int(resume_from.name.split("-")[-1]))
    spread = job.recipe.distributed
    distributed.check_strategy(trainer, spread, print if distributed.is_main() else lambda text: None)
    if distributed.world_size() > 1:
        trainer.add_callback(distributed.heartbeat_callback())
        trainer.add_callback(distributed.wrapped_callback(trainer, spread))
    before = distributed.share(json.loads(before_path.read_text()) if before_path.exists() else None)
    first: dict[str, Any] = {}
    if before is None and distributed.world_size() > 1:
        # Several processes: measured once training has set up its engine (an evaluation before `train` leaves
        # accelerate skipping the DDP wrap, and the DeepSpeed engine unusable for training)
        trainer.add_callback(_EvaluateFirst(job, trainer, before_path, first))
    elif before is None:
        before = _losses(job, trainer) if job.recipe.eval.loss_before else {}
        atomic_write(before_path, json.dumps(before))
    start_epoch = 0.0
    if resume_from is not None:
        start_epoch = json.loads((resume_from / "trainer_state.json").read_text()).get("epoch", 0.0)
    t0 = time.time()
    with distributed.collectives_watched(trainer, spread):
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.time() - t0
    before = first if before is None else before
    after = _losses(job, trainer)  # the last weights: a keep-best candidate too
    check_finite({f"{k}_loss": v for k, v in after.items()}, trainer.state.global_step, job.recipe.train.learning_rate)
    state = trainer.state
    kept = next((c for c in trainer.callback_handler.callbacks if hasattr(c, "restore")), None)
    kept_step = None
    if kept is not None and kept.step is not None and kept.step != state.global_step:
        kept.restore(model)
        kept_step = kept.step
        log = [c for c in trainer.callback_handler.callbacks if hasattr(c, "extra")]
        for c in log:
            c.extra = {"kept_from_step": kept_step}
        after = _losses(job, trainer)
        for c in log:
            c.extra = {}
    per_epoch = sum(r.trained_tokens for r in job.train_rows)
    trained_tokens = int(round(per_epoch * max((state.epoch or 0.0) - start_epoch, 0.0)))
    trainable, total = count_parameters(model)
    losses = {f"{k}_before": before.get(k) for k in ("train", "validation")}
    losses.update({f"{k}_after": after.get(k) for k in ("train", "validation")})
    losses["train_running"] = result.training_loss
    return TrainOutcome(steps=state.global_step, seconds=seconds, trained_tokens=trained_tokens, losses=losses,
                        trainable_params=trainable, total_params=total,
                        stopped_early=bool(getattr(state, "stopped_early", False)),
                        kept_step=kept_step, kept_metric=kept.metric if kept_step is not None else None,
                        kept_value=kept.best if kept_step is not None else None)


def _EvaluateFirst(job: Job, trainer, path: Path, into: dict):  # noqa: N802 - a TrainerCallback made lazily
    """A callback measuring the losses before the first step (when the recipe asks), into `into` and `path`."""
    from transformers import TrainerCallback

    class _First(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            into.update(_losses(job, trainer) if job.recipe.eval.loss_before else {})
            if distributed.is_main():
                atomic_write(path, json.dumps(into))

    return _First()


def _losses(job: Job, trainer) -> dict[str, float]:
    """Mean token loss on the training sample and on validation."""
    out = {}
    if job.loss_rows:
        out["train"] = trainer.evaluate(to_dataset(job.loss_rows), metric_key_prefix="train_sample")[
            "train_sample_loss"]
    if job.validation_rows:
        out["validation"] = trainer.evaluate(metric_key_prefix="eval")["eval_loss"]
    return out


def token_ranks(trainer) -> int:
    """What a token-summed loss is multiplied by, as the Trainer's own compute_loss does: with
    `num_items_in_batch` counted over every rank, each rank's loss is its share of the global mean, and DDP then
    averages the gradients over the ranks — so each loss is scaled by their number (1 on one process)."""
    return trainer.accelerator.num_processes if trainer.args.average_tokens_across_devices else 1


def trained_token_loss(model, inputs: dict[str, Any], num_items_in_batch=None, ranks: int = 1):
    """Mean cross-entropy over the labelled tokens, computing vocabulary logits only where a label exists.

    Most of a chat is prompt, and the vocabulary projection (49k wide for SmolLM2) dominates memory; projecting
    only the tokens that are trained on, a chunk at a time (methods/head_loss.py), makes a step cheaper without
    changing the loss. A head that is not a plain linear layer (see head_loss.plain_head) gets the model's own
    projection at the positions where any row has a label.
    `num_items_in_batch`: the labelled tokens of the whole step (over accumulation and ranks; `ranks`: see
    token_ranks). Returns (loss, logits of the kept positions — None on the chunked path, where none are kept —,
    number of labelled tokens, number of correct top-1 tokens).
    """
    import torch
    import torch.nn.functional as F

    from tunesmith.methods.head_loss import chunked_head_loss, head_set_aside, plain_head

    labels = inputs["labels"]
    shifted = labels[:, 1:]
    keep = (shifted != -100).any(dim=0).nonzero().flatten()
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "weights")}
    model_inputs["use_cache"] = False
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    targets = shifted[:, keep]
    weights = inputs.get("weights")
    if weights is not None:  # class weights: each row's tokens count `weight` times (see data/balance.py)
        weights = weights[:, 1:][:, keep] if weights.dim() == 2 else weights.unsqueeze(1).expand_as(targets)
    head = plain_head(model)
    if head is not None:  # the head only at labelled tokens, chunked (methods/head_loss.py)
        with head_set_aside(head):
            hidden = model(**model_inputs, logits_to_keep=keep).logits
        labelled = targets != -100
        result = chunked_head_loss(hidden[labelled], head.weight, targets[labelled],
                                   None if weights is None else weights[labelled])
        total, count, correct, logits = result.total, result.count, result.correct, None
    else:
        logits = model(**model_inputs, logits_to_keep=keep).logits
        count = (targets != -100).sum()
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                    ignore_index=-100, reduction="none").view_as(targets)
        if weights is not None:
            per_token = per_token * weights.to(device=per_token.device, dtype=per_token.dtype)
        total = per_token.sum()
        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & (targets != -100)).sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
    if num_items_in_batch is not None and ranks > 1:  # a count over every rank (see token_ranks)
        loss = loss * ranks
    return loss, logits, count, correct


def FastDropout(p: float):  # noqa: N802 - reads like the nn.Dropout it replaces; torch is imported lazily
    """nn.Dropout(p) whose CPU mask is 16-bit lanes of int64 random words (4 elements per draw, p to 1/65536)."""
    return fast_dropout_class()(p)


@functools.cache
def fast_dropout_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    low, high = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max

    class _FastDropout(nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p
            self.threshold = -32768 + round(p * 65536)

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            if x.device.type != "cpu":
                return F.dropout(x, self.p, True)
            n = x.numel()
            words = torch.randint(low, high, ((n + 3) // 4,), dtype=torch.int64)
            keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold
            return x * keep * (1.0 / (1.0 - self.p))

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return _FastDropout
