"""What a method is: its parameters, the records it trains on, and how it trains. No torch at import time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.schema import MethodParams


TRAINER_STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")  # what a transformers/TRL Trainer runs under


@dataclass(frozen=True)
class Shape:
    """How a method's step uses memory, for `tunesmith plan` (its only per-method knowledge)."""

    task: str = "causal-lm"  # or "seq-cls": a classification head instead of the vocabulary
    loss: str = "trained"  # trained: logits at labelled positions · fused: TRL log-probs at every position ·
    # head: a small head · generated: log-softmax over the sampled replies (ppo)
    sequences: int = 1  # sequences per row in a batch beyond what the row holds (kto: the row and its KL partner)
    reference: bool = False  # a frozen reference model (when its params' beta / kl_coef is above 0)
    generates: bool = False  # samples replies while training (KV cache)
    value_head: bool = False
    trains: bool = True  # False: nothing back-propagates (features, fewshot, ensemble)


@dataclass(frozen=True)
class Method:
    """One entry of the registry. `train(job)` runs the method and returns a TrainOutcome.

    `predict(run_dir, texts)`, for methods whose run is a classifier rather than a generator, returns one
    `{label: probability}` dict per text; `tunesmith eval` uses it instead of scoring label words.
    `prompting(run_dir)`, for methods that train nothing (fewshot), returns the run's shot picker: `for_rows(records)`
    gives each evaluation row's in-context examples, `fixed()` those generate and chat put before a conversation.
    `check(method, train, data)` lists the settings this method can't honour, in recipe wording; the recipe loader
    runs it, so `tunesmith validate` reports them before anything is loaded (`data` may be None when invalid).
    What its parameters alone say (an adapter's limits, the run folders they name) the params class checks itself:
    `MethodParams.problems` and `file_problems` (tunesmith/schema.py). The recipe reads a method only through these
    fields (`name`, `params`, `record_types`, `metrics`, `check`: schema.MethodSchema) and never by its name.
    `export(run_dir, out)`, for classifier runs that can stand alone as a transformers model (classify, reward),
    writes that folder; `tunesmith export` refuses the other classifiers and merges the generators.
    `scores_replies`: the run is a reward model — it scores (prompt, reply) pairs, so eval measures it on preference
    rows and predict points to `tunesmith score`. `models_line(params)`, for runs whose models come from elsewhere
    (an ensemble's members), is the line train prints instead of the model's; each of those models then reads the
    texts with its own tokenizer. `summary_rows(losses)` adds the method's own lines to train's summary table.
    `strategies`: how it may train on several processes (`distributed.strategy`); a method with its own loop
    (ppo, features, fewshot, ensemble) trains on one. `shape`: how its step uses memory, for `tunesmith plan`.
    """

    name: str
    summary: str
    params: type[MethodParams]
    record_types: tuple[str, ...]
    train: Callable[["Any"], "TrainOutcome"]
    predict: Callable[..., list[dict[str, float]]] | None = None
    encode: Callable[..., Any] | None = None  # rows -> model inputs, when not the chat-formatted causal-LM rows
    prompting: Callable[..., Any] | None = None  # runs that prompt the base model instead of training: run dir -> shots
    check: Callable[..., list[str]] | None = None  # (method, train, data sections) -> what the recipe alone gets wrong
    metrics: tuple[str, ...] = ("loss",)  # validation metrics its training measures (keep_best, early stopping)
    export: Callable[..., Any] | None = None  # (run dir, out folder) -> out: a classifier as a standalone folder
    scores_replies: bool = False  # a reward model: scores replies to prompts (eval on preference rows, `score`)
    models_line: Callable[[MethodParams], str] | None = None  # its models come from elsewhere: what train prints
    summary_rows: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None  # its own summary-table lines
    strategies: tuple[str, ...] = ("none",)  # distributed strategies: Trainer-based methods take TRAINER_STRATEGIES
    shape: Shape = Shape()  # how its step uses memory (`tunesmith plan`)


@dataclass
class TrainOutcome:
    """What training produced, for the summary and the manifest."""

    steps: int
    seconds: float
    trained_tokens: int
    losses: dict[str, float | None] = field(default_factory=dict)  # train/validation before/after
    saved: str = ""  # 'adapter' or 'model'
    trainable_params: int = 0
    total_params: int = 0
    stopped_early: bool = False
    kept_step: int | None = None  # keep_best: the step whose weights were saved, when not the last
    kept_metric: str | None = None  # ... chosen by this validation metric
    kept_value: float | None = None  # ... whose value there was this


def refuses(setting: str, why: str) -> Callable[..., list[str]]:
    """A `check` refusing a true `train.<setting>` for a method that can't honour it, saying why."""

    def check(method, train, data) -> list[str]:
        if getattr(train, setting) is not True:  # false, or `auto` (which is off where the method can't honour it)
            return []
        return [f"`train.{setting}`: true can't train `method: {method.name}` — {why}; set train.{setting}=false"]

    return check


def padded_batches(why: str) -> Callable[..., list[str]]:
    """A `check` refusing `train.padding_free` for methods whose batches must stay padded, saying why."""
    return refuses("padding_free", why)


def own_batches(why: str) -> Callable[..., list[str]]:
    """A `check` refusing `train.group_by_length` for methods that build their batches themselves."""
    return refuses("group_by_length", why)


def all_checks(*checks: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """One `check` running several."""
    return lambda method, train, data: [p for check in checks for p in check(method, train, data)]
