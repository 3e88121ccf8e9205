"""Offline preference methods on TRL: `method: dpo` (every loss variant TRL offers), `kto` and `orpo`.

All three read preference records (prompt, chosen, rejected); HH-RLHF transcripts ("\\n\\nHuman: …\\n\\nAssistant:")
become chat turns (data.format.preference_pair). TRL gets them in its conversational format — prompt = a list of
messages, chosen/rejected = [{"role": "assistant", …}] — and applies the model's chat template itself. A pair too
long for `train.max_seq_len` loses the *start* of its prompt (whole turns first, then the front of the last user
turn); the replies are kept whole, and a pair whose replies alone fill the budget is rejected with its reason.
KTO learns from unpaired rows: each pair gives (prompt, chosen, True) and (prompt, rejected, False); chat or
instruction rows that carry a boolean `label` column give one row each (prompt, reply, label).

Any adapter of methods/adapters.py; `policy: RUN` trains a finished SFT run's adapter further instead of a fresh
one. The reference model is the starting policy: with a peft adapter TRL keeps a frozen copy of it ("ref"); with
`freeze`/`full` it loads the base again. The run folder is an ordinary causal-LM run (generate, chat, eval and
export read it like an SFT run); TRL's rewards/margins/accuracies go to metrics.jsonl.
Read top to bottom: parameters, rows, the policy, the shared loop, one trainer per method.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tunesmith.data.format import IGNORE, Encoded, preference_pair, prompt_messages, to_messages
from tunesmith.errors import DataError, RecipeError
from tunesmith.methods.adapters import AdapterParamsMixin
from tunesmith.methods.base import (TRAINER_STRATEGIES, Method, Shape, TrainOutcome, all_checks, own_batches,
                                    padded_batches)
from tunesmith.schema import MethodParams, PathKey

# DPOConfig.loss_type in TRL 1.16 (its field help and DPOTrainer's "Unknown loss type" list; a test keeps them equal)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


# ----------------------------------------------------------------------------------------------- parameters


class PolicyParams(AdapterParamsMixin):
    """What every alignment method starts from, shared by preference.py and online.py."""

    policy: Annotated[str | None, PathKey("run")] = Field(
        None, min_length=1, description="a finished SFT run whose adapter this run trains further (null: a fresh "
                                        "adapter)")
    disable_dropout: bool = Field(True, description="no dropout (TRL's default), so policy and reference "
                                                    "log-probs compare like for like")


class DPOParams(PolicyParams, MethodParams):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="how far from the reference the policy may move (higher: less); "
                                               "IPO's tau")
    loss_type: list[str] = Field(["sigmoid"], description=f"one of {', '.join(DPO_LOSS_TYPES)}; or a list of "
                                                          "them combined with loss_weights")
    loss_weights: list[float] | None = Field(None, description="one weight per loss_type (null: 1 each)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust: chance a label is flipped; exo_pair: "
                                                                  "epsilon (> 0)")
    precompute_ref_log_probs: bool = Field(False, description="score every pair under the reference once, before "
                                                              "training")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _known_losses(cls, value):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise PydanticCustomError("dpo_loss", "give one loss name, or a list of them")
        bad = [v for v in values if v not in DPO_LOSS_TYPES]
        if bad:
            guess = difflib.get_close_matches(bad[0], DPO_LOSS_TYPES, n=1, cutoff=0.6)
            raise PydanticCustomError(
                "dpo_loss", "{bad}not a DPO loss TRL offers; choose one (or a list weighted by `loss_weights`) "
                            "of: {allowed}{hint}",
                {"bad": "" if isinstance(value, str) else ", ".join(repr(b) for b in bad) + " is ",
                 "allowed": ", ".join(DPO_LOSS_TYPES), "hint": f"; did you mean {guess[0]!r}?" if guess else ""})
        return values

    @model_validator(mode="after")
    def _weights_and_smoothing(self):
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise PydanticCustomError("dpo_weights", "`loss_weights` has {n} weights for {m} loss types; give one each",
                                      {"n": len(self.loss_weights), "m": len(self.loss_type)})
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise PydanticCustomError("dpo_exo", "loss_type exo_pair needs `label_smoothing` > 0 (the EXO paper "
                                                 "uses 1e-3)")
        return self


class KTOParams(PolicyParams, MethodParams):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, description="how far from the reference the policy may move (higher: less)")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="TRL's two unpaired losses")
    desirable_weight: float = Field(1.0, gt=0, description="weight of the desirable (label true) rows' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of the undesirable rows' loss; balance rare "
                                                             "labels")
    precompute_ref_log_probs: bool = Field(False, description="score every row under the reference once, before "
                                                              "training")


class ORPOParams(PolicyParams, MethodParams):
    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term next to the chosen replies' NLL (the "
                                               "paper's λ)")


# ----------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class PreferenceRow(Encoded):
    """A pair as TRL takes it: `prompt` messages, `chosen`/`rejected` as one assistant message each.

    `input_ids` holds both sequences the model runs (prompt+chosen, then prompt+rejected), the replies labelled.
    """

    prompt: list[dict[str, str]] = field(default_factory=list)
    chosen: list[dict[str, str]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    COLUMNS: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class UnpairedRow(Encoded):
    """A KTO row: `prompt` messages, one assistant `completion`, and whether it is desirable (`label`)."""

    prompt: list[dict[str, str]] = field(default_factory=list)
    completion: list[dict[str, str]] = field(default_factory=list)
    label: bool = True
    COLUMNS: ClassVar[tuple[str, ...]] = ("prompt", "completion", "label")


@dataclass
class AlignmentRows:
    """Encoded training and validation rows and the rows that had to be rejected (train.py's EncodedData shape)."""

    train: list[Encoded]
    validation: list[Encoded]
    rejects: list[dict[str, Any]]


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` under the chat template, tokenized the way TRL tokenizes conversational rows."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def fit_prompt(tokenizer, prompt: list[dict[str, str]], length, max_len: int) -> list[dict[str, str]] | None:
    """The prompt, cut from the front until `length(prompt) <= max_len`; None when even an empty last turn is too long.

    Whole turns go first (a leading system message stays; the kept part starts with a user turn), then the front
    of the last user turn's text. `length(messages)` is the longest token sequence the row makes with that prompt.
    """
    if length(prompt) <= max_len:
        return prompt
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    turns = prompt[len(system):]
    if not turns:
        return None
    for start in range(1, len(turns)):
        if turns[start]["role"] == "user" and length(system + turns[start:]) <= max_len:
            return system + turns[start:]
    last = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=len(turns) - 1)
    message, tail = turns[last], turns[last + 1:]
    ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]

    def with_last(n: int) -> list[dict[str, str]]:
        return system + [{**message, "content": tokenizer.decode(ids[len(ids) - n:]) if n else ""}] + tail

    low, high = 0, len(ids)  # the most of the turn's last tokens that fit (binary search)
    if length(with_last(0)) > max_len:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if length(with_last(mid)) <= max_len else (low, mid - 1)
    return with_last(low)


def pair_row(tokenizer, record, system_prompt: str | None, max_len: int) -> PreferenceRow | str:
    """One preference record as a PreferenceRow fitted into `max_len` tokens, or the reason it can't be."""
    pair = preference_pair(record, system_prompt)
    if pair.chosen == pair.rejected:
        return "chosen and rejected are identical"
    chosen = [{"role": "assistant", "content": pair.chosen}]
    rejected = [{"role": "assistant", "content": pair.rejected}]

    def length(prompt):
        return max(len(chat_ids(tokenizer, prompt + chosen)), len(chat_ids(tokenizer, prompt + rejected)))

    full = length(pair.prompt)
    prompt = fit_prompt(tokenizer, pair.prompt, length, max_len)
    if prompt is None:
        return (f"replies too long: with train.max_seq_len={max_len} no room is left for the prompt (the longer "
                f"conversation has {full} tokens); raise train.max_seq_len")
    ids, labels = [], []
    n_prompt = len(chat_ids(tokenizer, prompt, add_generation_prompt=True))
    for reply in (chosen, rejected):
        seq = chat_ids(tokenizer, prompt + reply)
        ids += seq
        labels += [IGNORE] * n_prompt + seq[n_prompt:]
    return PreferenceRow(ids, labels, prompt is not pair.prompt, full, prompt=prompt, chosen=chosen,
                         rejected=rejected)


def unpaired_rows(tokenizer, record, system_prompt: str | None, max_len: int,
                  label_column: str) -> list[UnpairedRow] | str:
    """KTO rows from one record: a pair gives two (chosen: True, rejected: False); a chat or instruction row with a
    boolean `label` gives one. Returns the reason instead when the record can't give any."""
    if record.kind == "preference":
        pair = preference_pair(record, system_prompt)
        if pair.chosen == pair.rejected:
            return "chosen and rejected are identical"
        turns = [(pair.prompt, pair.chosen, True), (pair.prompt, pair.rejected, False)]
    else:
        label = _boolean((record.raw or {}).get(label_column))
        if label is None:
            return (f"missing field: KTO needs a boolean {label_column!r} on {record.kind} rows (true: a desirable "
                    f"reply, false: an undesirable one), got {(record.raw or {}).get(label_column)!r}")
        prompt = prompt_messages(record, system_prompt)
        reply = next(m["content"] for m in reversed(to_messages(record)) if m["role"] == "assistant")
        turns = [(prompt, reply, label)]
    out = []
    for prompt, reply, label in turns:
        completion = [{"role": "assistant", "content": reply.strip()}]
        full = len(chat_ids(tokenizer, prompt + completion))
        fitted = fit_prompt(tokenizer, prompt, lambda p: len(chat_ids(tokenizer, p + completion)), max_len)
        if fitted is None:
            return (f"reply too long: with train.max_seq_len={max_len} no room is left for the prompt (the "
                    f"conversation has {full} tokens); raise train.max_seq_len")
        n_prompt = len(chat_ids(tokenizer, fitted, add_generation_prompt=True))
        ids = chat_ids(tokenizer, fitted + completion)
        out.append(UnpairedRow(ids, [IGNORE] * n_prompt + ids[n_prompt:], fitted is not prompt, full,
                               prompt=fitted, completion=completion, label=label))
    return out


def _boolean(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return None


def encode_pairs(data, tokenizer, recipe) -> AlignmentRows:
    """Preference records -> PreferenceRows (DPO, ORPO)."""
    _expect(data, recipe, ("preference",))
    return _encode(data, recipe, lambda r: pair_row(tokenizer, r, recipe.data.system_prompt,
                                                    recipe.train.max_seq_len))


def encode_unpaired(data, tokenizer, recipe) -> AlignmentRows:
    """Records -> UnpairedRows (KTO), shuffled with the seed: TRL reads KTO rows in order, and estimates its KL
    term from neighbours, so a pair's two halves should not sit side by side, nor all desirable rows together."""
    _expect(data, recipe, ("preference", "chat", "instruction"))
    label_column = recipe.data.columns.get("label", "label")
    out = _encode(data, recipe, lambda r: unpaired_rows(tokenizer, r, recipe.data.system_prompt,
                                                        recipe.train.max_seq_len, label_column))
    random.Random(recipe.train.seed).shuffle(out.train)
    return out


def _expect(data, recipe, kinds: tuple[str, ...]) -> None:
    if data.kind not in kinds:
        raise DataError(f"method {recipe.method.name!r} trains on {' or '.join(kinds)} rows, got {data.kind} rows",
                        "set data.format: preference and map the prompt/chosen/rejected columns")


def _encode(data, recipe, convert) -> AlignmentRows:
    out = AlignmentRows([], [], [])
    for records, target in ((data.train, out.train), (data.validation, out.validation)):
        for record in records:
            made = convert(record)
            if isinstance(made, str):
                out.rejects.append({"file": record.source, "line": record.line, "reason": made, "row": record.data})
            else:
                target.extend(made if isinstance(made, list) else [made])
    return out


# ----------------------------------------------------------------------------------------------- the policy


def policy_problems(job, params: PolicyParams) -> list[str]:
    """Why `method.policy` can't be trained further with this recipe (empty when it can, or when there is none)."""
    if not params.policy:
        return []
    from tunesmith.artifacts import RunDir
    from tunesmith.methods.adapters import ADAPTERS, adapter_settings, run_adapter

    run = RunDir(Path(params.policy))
    if not run.manifest.exists():
        return [f"`method.policy`: {params.policy!r} is not a finished run folder (no manifest.json); give the "
                "output.dir of a finished sft run"]
    manifest = run.read_manifest()
    if (run.root / "labels.json").exists():
        return [f"`method.policy`: {params.policy!r} is a {manifest.get('method')} run (a classifier); give an sft "
                "run, whose model writes replies"]
    if manifest.get("saved") == "model":
        return [f"`method.policy`: {params.policy!r} saved a whole model (model/); start from it with "
                f"model.name: {run.model} and leave method.policy out"]
    out = []
    theirs = manifest.get("base_model", {})
    if theirs.get("resolved") != job.source.describe():
        out.append(f"`model.name`: {job.recipe.model.name!r}, but the policy run was trained on "
                   f"{theirs.get('resolved')}; set model.name: {theirs.get('name')}")
    policy = run_adapter(run, manifest)
    if ADAPTERS[policy.adapter].saved != "adapter":
        out.append(f"`method.policy`: {params.policy!r} trained a `{policy.adapter}` adapter, which can't be trained "
                   "further here; start from an sft run with a peft adapter (lora, qlora, dora, ia3, prefix, prompt)")
    elif policy.adapter != params.adapter:
        out.append(f"`method.adapter`: {params.adapter!r}, but the policy run trained a {policy.adapter!r} adapter, "
                   f"which this run trains further; set method.adapter: {policy.adapter}")
    elif adapter_settings(policy) != adapter_settings(params):
        key = ADAPTERS[params.adapter].params_key
        out.append(f"`method.{key}`: {adapter_settings(params).model_dump()} differs from the policy run's "
                   f"{adapter_settings(policy).model_dump()}; the adapter keeps its shape, so set method.{key} to "
                   "those")
    return out


def build_policy(job, params: PolicyParams):
    """The model to train: a fresh adapter on the base, or the `policy` run's adapter loaded trainable."""
    from transformers import set_seed

    from tunesmith.artifacts import RunDir
    from tunesmith.methods import adapters

    set_seed(job.recipe.train.seed)  # adapter initialisation is random: seed it like the rest of the run
    model = adapters.load_base_for(params.adapter, params, job.source)
    if not params.policy:
        return adapters.apply_adapter(model, params, precision=job.precision)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, RunDir(Path(params.policy)).adapter, is_trainable=True)
    if params.adapter in ("lora", "qlora", "dora"):  # what apply_adapter does to a fresh adapter of these kinds
        if job.precision in ("bf16", "fp16"):
            adapters.keep_adapter_sums_in_fp32(model)
        adapters.use_fast_dropout(model)
    if params.adapter == "prompt":
        adapters.align_logits_with_inputs(model)
    return model


def without_dropout(model) -> None:
    """Set every dropout to p=0, our fast LoRA dropout included (TRL's disable_dropout knows only nn.Dropout)."""
    from torch import nn

    from tunesmith.methods.common import fast_dropout_class

    for module in model.modules():
        if isinstance(module, (nn.Dropout, fast_dropout_class())):
            module.p = 0.0


def save(job, model, params: PolicyParams) -> str:
    """Write the trained weights in plain peft / transformers format, without TRL's frozen reference copy."""
    from tunesmith.methods.adapters import save_adapter

    if "ref" in (getattr(model, "peft_config", None) or {}):
        model.delete_adapter("ref")
    model.config.use_cache = True
    return save_adapter(model, params, job.run, job.tokenizer)


# ----------------------------------------------------------------------------------------------- the shared loop


PADDED = all_checks(padded_batches("preference and generation batches are padded"),
                    own_batches("TRL batches the pairs itself"))


def kto_problems(method, train, data) -> list[str]:
    if method.loss_type == "kto" and train.batch_size < 2:
        return ["`train.batch_size`: 1 — KTO estimates its KL term from the other rows of a batch; set "
                "train.batch_size=2 or more (or method.loss_type=apo_zero_unpaired)"]
    return []


def train_with(job, params: PolicyParams, trainer_class, config, **trainer_kwargs):
    """Check, build the policy, run TRL's trainer with our metrics and early stopping, save; the outcome."""
    from tunesmith.errors import RunError
    from tunesmith.methods.adapters import trainable_weights_in_fp32
    from tunesmith.methods.common import MetricsCallback, run_trainer, to_dataset, watch_callbacks

    problems = policy_problems(job, params)
    if problems:
        raise RecipeError("recipe", problems)
    model = build_policy(job, params)
    callbacks = [MetricsCallback(job.run.metrics), *job.callbacks, *watch_callbacks(job)]
    trainer = trainer_class(model=model, args=config, train_dataset=to_dataset(job.train_rows),
                            eval_dataset=to_dataset(job.validation_rows) if job.validation_rows else None,
                            processing_class=job.tokenizer, callbacks=callbacks, **trainer_kwargs)
    if len(trainer.train_dataset) != len(job.train_rows):  # every row was fitted to max_length: TRL drops none
        raise RunError(f"TRL kept {len(trainer.train_dataset)} of {len(job.train_rows)} training rows",
                       "report this: tunesmith fits every row into train.max_seq_len before TRL sees it")
    trainable_weights_in_fp32(trainer.model)  # undo TRL's bf16 cast of qlora adapters (see adapters.py)
    if params.disable_dropout:
        without_dropout(trainer.model)
    outcome = run_trainer(job, trainer, model)
    outcome.saved = save(job, trainer.model, params)
    return outcome


def base_config(job) -> dict[str, Any]:
    """TRL config keywords every preference trainer shares: our trainer arguments and the length limit."""
    from tunesmith.methods.common import trainer_arguments

    return {**trainer_arguments(job), "max_length": job.recipe.train.max_seq_len}


# ----------------------------------------------------------------------------------------------- the methods


def train_dpo(job) -> TrainOutcome:
    """DPO with any of TRL's losses; the reference is the starting policy."""
    from trl import DPOConfig, DPOTrainer

    p: DPOParams = job.recipe.method
    config = DPOConfig(**base_config(job), beta=p.beta, loss_type=list(p.loss_type), loss_weights=p.loss_weights,
                       label_smoothing=p.label_smoothing, precompute_ref_log_probs=p.precompute_ref_log_probs,
                       disable_dropout=p.disable_dropout, padding_free=False)
    return train_with(job, p, DPOTrainer, config)


def train_kto(job) -> TrainOutcome:
    """KTO on unpaired rows; the reference is the starting policy."""
    from trl import KTOConfig, KTOTrainer

    p: KTOParams = job.recipe.method
    config = KTOConfig(**base_config(job), beta=p.beta, loss_type=p.loss_type, desirable_weight=p.desirable_weight,
                       undesirable_weight=p.undesirable_weight, precompute_ref_log_probs=p.precompute_ref_log_probs,
                       disable_dropout=p.disable_dropout)
    return train_with(job, p, KTOTrainer, config)


def train_orpo(job) -> TrainOutcome:
    """ORPO (trl.experimental): the chosen replies' NLL plus beta × the odds-ratio term; no reference model."""
    ORPOConfig, _ = _orpo()
    p: ORPOParams = job.recipe.method
    config = ORPOConfig(**base_config(job), beta=p.beta, disable_dropout=p.disable_dropout)
    return train_with(job, p, _orpo_trainer_class(), config)


def _orpo():
    """trl.experimental's ORPOConfig and ORPOTrainer, without its import-time notice (we pin TRL's version)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def _orpo_trainer_class():
    """TRL's ORPOTrainer, whose `evaluate` also takes a conversational dataset (as DPO's and KTO's do)."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    _, ORPOTrainer = _orpo()

    class TunesmithORPOTrainer(ORPOTrainer):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if eval_dataset is not None and "chosen_input_ids" not in eval_dataset.column_names:
                eval_dataset = eval_dataset.map(maybe_extract_prompt).map(
                    maybe_apply_chat_template, fn_kwargs={"processing_class": self.processing_class}
                ).map(self.tokenize_row)
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    return TunesmithORPOTrainer


METHODS = (
    Method(name="dpo", summary="direct preference optimization on preference pairs, any TRL loss (sigmoid, ipo, …)",
           params=DPOParams, record_types=("preference",), train=train_dpo, encode=encode_pairs, check=PADDED,
           strategies=TRAINER_STRATEGIES, shape=Shape(loss="fused", reference=True)),
    Method(name="kto", summary="KTO on desirable/undesirable replies (from pairs, or rows with a boolean label)",
           params=KTOParams, record_types=("preference", "chat", "instruction"), train=train_kto,
           encode=encode_unpaired, check=all_checks(PADDED, kto_problems), strategies=TRAINER_STRATEGIES,
           shape=Shape(loss="fused", sequences=2, reference=True)),
    Method(name="orpo", summary="ORPO: SFT on the chosen reply plus an odds-ratio preference term, no reference",
           params=ORPOParams, record_types=("preference",), train=train_orpo, encode=encode_pairs, check=PADDED,
           strategies=TRAINER_STRATEGIES, shape=Shape(loss="fused")),
)
