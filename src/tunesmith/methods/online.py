"""Online methods on TRL: `method: grpo` and `method: rloo` sample replies to prompts and learn from their rewards.

Prompts come from preference rows (the prompt), chat rows (every turn before the last assistant turn) or
instruction rows (the instruction and input); replies the data holds are not used. A prompt longer than
`train.max_seq_len - method.max_completion_length` loses its start, as in preference.py. Rewards come from exactly
one of
    reward_model: RUN               a `method: reward` run (methods/reward.py's load_reward_model(RUN).score)
    reward_function: MODULE:NAME    a Python function, `module:function` (importable) or `path/to/file.py:function`
both called as `score(prompts, responses) -> list[float]`: `prompts` are chat messages (the conversation up to the
reply), `responses` the sampled replies' text. Policy, adapters, reference and the run folder are as in
preference.py; TRL's reward, reward_std, rewards/<name>/mean and KL (beta > 0) go to metrics.jsonl.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from tunesmith.data.format import IGNORE, Encoded, preference_pair, prompt_messages
from tunesmith.errors import RecipeError
from tunesmith.methods.base import (TRAINER_STRATEGIES, Method, Shape, TrainOutcome, all_checks, own_batches,
                                    padded_batches)
from tunesmith.methods.preference import AlignmentRows, PolicyParams, chat_ids, fit_prompt
from tunesmith.schema import MethodParams, PathKey

# GRPOConfig.loss_type in TRL 1.16 (its field help; a test keeps them equal)
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


# ----------------------------------------------------------------------------------------------- parameters


class OnlineParams(PolicyParams):
    """Sampling and the reward source, shared by GRPO and RLOO."""

    max_completion_length: int = Field(256, gt=0, le=2**20, description="tokens sampled per reply (the prompt gets "
                                                                        "the rest of train.max_seq_len)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    reward_model: Annotated[str | None, PathKey("run")] = Field(
        None, min_length=1, description="a `method: reward` run folder that scores the replies")
    reward_function: str | None = Field(None, validate_default=True, description="or `module:function` / "
                                        "`file.py:function` returning one score per reply")

    @field_validator("reward_function", mode="after")
    @classmethod
    def _one_reward_source(cls, value, info):
        model = info.data.get("reward_model")
        if model and value:
            raise PydanticCustomError("reward_both", "set `method.reward_model` or `method.reward_function`, not both")
        if not model and not value:
            raise PydanticCustomError(
                "reward_none", "the replies need a reward: set `method.reward_model: RUN` (a `method: reward` run) "
                               "or `method.reward_function: module:function` (or path/to/file.py:function)")
        if value and (value.count(":") != 1 or not all(part.strip() for part in value.split(":"))):
            raise PydanticCustomError("reward_spec", "write it as module:function or path/to/file.py:function")
        return value


class GRPOParams(OnlineParams, MethodParams):
    name: Literal["grpo"] = "grpo"
    num_generations: int = Field(8, ge=2, description="replies sampled per prompt; advantages compare them within "
                                                      "the group")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference (0: no reference model is run)")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="TRL's GRPO loss variants")


class RLOOParams(OnlineParams, MethodParams):
    name: Literal["rloo"] = "rloo"
    num_generations: int = Field(2, ge=2, description="replies per prompt; each is baselined by the others' mean "
                                                      "reward")
    beta: float = Field(0.05, ge=0, description="KL penalty towards the reference (0: no reference model is run)")


# ----------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class PromptRow(Encoded):
    """A prompt to sample replies for: its chat messages (`input_ids`: the rendered prompt, nothing labelled)."""

    prompt: list[dict[str, str]] = field(default_factory=list)
    COLUMNS: ClassVar[tuple[str, ...]] = ("prompt",)


PROMPT_KINDS = ("preference", "chat", "instruction", "text")  # rows whose prompts the online methods answer


def record_prompt(record, system_prompt: str | None) -> list[dict[str, str]]:
    """The messages a reply is sampled for: a preference row's prompt, a chat/instruction row's turns before the
    last assistant turn, or a text row's text as the user's turn (an HH-RLHF style transcript becomes its turns)."""
    if record.kind == "preference":
        return preference_pair(record, system_prompt).prompt
    if record.kind == "text":
        from tunesmith.data.format import transcript_messages

        messages = transcript_messages(record.data["text"])
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    return prompt_messages(record, system_prompt)


def encode_prompts(data, tokenizer, recipe) -> AlignmentRows:
    """Records -> PromptRows whose rendered prompt fits in max_seq_len - max_completion_length tokens."""
    from tunesmith.errors import DataError

    if data.kind not in PROMPT_KINDS:
        raise DataError(f"method {recipe.method.name!r} samples replies to prompts from preference, chat, "
                        f"instruction or text rows, got {data.kind} rows", "set data.format and map the columns")
    budget = recipe.train.max_seq_len - recipe.method.max_completion_length  # > 0: see reply_budget
    out = AlignmentRows([], [], [])

    def length(messages):
        return len(chat_ids(tokenizer, messages, add_generation_prompt=True))

    for records, target in ((data.train, out.train), (data.validation, out.validation)):
        for record in records:
            prompt = record_prompt(record, recipe.data.system_prompt)
            full = length(prompt)
            fitted = fit_prompt(tokenizer, prompt, length, budget)
            if fitted is None:
                out.rejects.append({"file": record.source, "line": record.line, "row": record.data,
                                    "reason": f"prompt too long: not even its last turn fits in train.max_seq_len - "
                                              f"method.max_completion_length = {budget} tokens"})
                continue
            ids = chat_ids(tokenizer, fitted, add_generation_prompt=True)
            target.append(PromptRow(ids, [IGNORE] * len(ids), fitted is not prompt, full, prompt=fitted))
    return out


# ----------------------------------------------------------------------------------------------- rewards


Score = Callable[[list[list[dict[str, str]]], list[str]], list[float]]


class RewardFunction:
    """`score(prompts, responses)` in the shape TRL calls reward functions, counting the tokens it is shown.

    TRL calls `f(prompts=…, completions=…, completion_ids=…, **kwargs)` with conversational prompts and
    completions (lists of messages); `score` gets the prompts as they are and each completion's text.
    """

    def __init__(self, name: str, score: Score):
        self.__name__ = name  # TRL's metric name: rewards/<name>/mean
        self.score = score
        self.trainer = None  # set once the trainer exists: only training replies are counted
        self.trained_tokens = 0

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [float(s) for s in self.score([list(p) for p in prompts], responses)]
        if len(scores) != len(responses):
            from tunesmith.errors import RunError

            raise RunError(f"reward {self.__name__} returned {len(scores)} scores for {len(responses)} replies",
                           "return one number per (prompt, response)")
        if self.trainer is not None and self.trainer.model.training and completion_ids is not None:
            self.trained_tokens += sum(len(ids) for ids in completion_ids)
        return scores


def load_reward_function(spec: str) -> Callable:
    """The function named by `module:function` or `path/to/file.py:function` (a RecipeError when it can't be had)."""
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        function = getattr(module, name)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported against the recipe key
        raise RecipeError("recipe", [f"`method.reward_function`: can't load {spec!r} ({type(exc).__name__}: {exc}); "
                                     "give module:function (the module importable from here) or "
                                     "path/to/file.py:function"]) from None
    if not callable(function):
        raise RecipeError("recipe", [f"`method.reward_function`: {spec!r} is not a function"])
    return function


def reward_source(params: OnlineParams) -> RewardFunction:
    """The recipe's reward (model or function) as a TRL reward function."""
    if params.reward_function:
        function = load_reward_function(params.reward_function)
        return RewardFunction(getattr(function, "__name__", "reward_function"), function)
    from tunesmith.errors import RunError
    from tunesmith.methods.reward import load_reward_model

    try:
        model = load_reward_model(params.reward_model)
    except RunError as exc:
        raise RecipeError("recipe", [f"`method.reward_model`: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")
                                     ]) from None
    return RewardFunction("reward_model", model.score)


# ----------------------------------------------------------------------------------------------- training


def reply_budget(method, train, data) -> list[str]:
    """The prompt needs room beside the longest reply (PPO, GRPO, RLOO)."""
    if train.max_seq_len - method.max_completion_length <= 0:
        return [f"`method.max_completion_length`: {method.max_completion_length} leaves no room for the prompt in "
                f"train.max_seq_len={train.max_seq_len}; lower it or raise train.max_seq_len"]
    return []


def online_problems(method, train, data) -> list[str]:
    """Batch settings TRL's samplers can't use, in recipe wording."""
    t, out = train, []
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate for distributed runs
    validates = data is not None and (data.validation is not None or data.validation_fraction > 0)
    if (t.batch_size * t.gradient_accumulation * processes) % method.num_generations:
        out.append(f"`method.num_generations`: {method.num_generations} must divide the replies sampled per "
                   f"optimizer step (train.batch_size × train.gradient_accumulation = "
                   f"{t.batch_size * t.gradient_accumulation}); e.g. set train.batch_size={method.num_generations}")
    elif t.eval_every and validates and (t.batch_size * processes) % method.num_generations:
        out.append(f"`method.num_generations`: {method.num_generations} must divide train.batch_size "
                   f"({t.batch_size}) to evaluate; change one of them")
    if t.early_stopping_patience:
        out.append(f"`train.early_stopping_patience`: `method: {method.name}` has no validation loss to watch; "
                   "leave it out (metrics.jsonl has eval_reward)")
    return out


ROLLOUT_BATCHES = all_checks(padded_batches("rollouts are padded batches"),
                             own_batches("prompts are sampled for rollouts, not batched by length"))
ONLINE_CHECKS = all_checks(ROLLOUT_BATCHES, reply_budget, online_problems)


def sampling_config(job, params, config_class, **extra):
    """The TRL config: our trainer arguments plus sampling and KL settings."""
    from tunesmith.methods.common import trainer_arguments

    return config_class(**trainer_arguments(job), num_generations=params.num_generations,
                        max_completion_length=params.max_completion_length, temperature=params.temperature,
                        beta=params.beta, disable_dropout=params.disable_dropout, **extra)


def train_online(job, trainer_class, config) -> TrainOutcome:
    """Check, load the reward and the policy, sample and train, save; no loss before/after (rewards are logged)."""
    from tunesmith.methods.adapters import trainable_weights_in_fp32
    from tunesmith.methods.common import MetricsCallback, run_trainer, to_dataset
    from tunesmith.methods.preference import build_policy, policy_problems, save, without_dropout

    params = job.recipe.method
    problems = policy_problems(job, params)
    if problems:
        raise RecipeError("recipe", problems)
    reward = reward_source(params)
    model = build_policy(job, params)
    evaluate = bool(job.recipe.train.eval_every and job.validation_rows)
    trainer = trainer_class(model=model, reward_funcs=[reward], args=config, train_dataset=to_dataset(job.train_rows),
                            eval_dataset=to_dataset(job.validation_rows) if evaluate else None,
                            processing_class=job.tokenizer,
                            callbacks=[MetricsCallback(job.run.metrics), *job.callbacks])
    reward.trainer = trainer
    trainable_weights_in_fp32(trainer.model)  # undo TRL's bf16 cast of qlora adapters (see adapters.py)
    if params.disable_dropout:
        without_dropout(trainer.model)
    outcome = run_trainer(replace(job, loss_rows=[], validation_rows=[]), trainer, model)
    outcome.trained_tokens = reward.trained_tokens  # the sampled replies: what the policy gradient trains on
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    outcome.losses.update({"reward_first": rewards[0] if rewards else None,
                           "reward_last": rewards[-1] if rewards else None})
    outcome.saved = save(job, trainer.model, params)
    return outcome


def train_grpo(job) -> TrainOutcome:
    """GRPO: advantages are each reply's reward against its group's (num_generations replies to one prompt)."""
    from trl import GRPOConfig, GRPOTrainer

    p: GRPOParams = job.recipe.method
    level = {"importance_sampling_level": "sequence"} if p.loss_type == "luspo" else {}  # LUSPO is sequence-level
    return train_online(job, GRPOTrainer, sampling_config(job, p, GRPOConfig, loss_type=p.loss_type, **level))


def train_rloo(job) -> TrainOutcome:
    """RLOO: each reply's baseline is the mean reward of the other replies to the same prompt."""
    from trl import RLOOConfig, RLOOTrainer

    return train_online(job, RLOOTrainer, sampling_config(job, job.recipe.method, RLOOConfig))


METHODS = (
    Method(name="grpo", summary="GRPO: sample replies to prompts, learn from a reward model or a Python function",
           params=GRPOParams, record_types=PROMPT_KINDS, train=train_grpo,
           encode=encode_prompts, check=ONLINE_CHECKS, metrics=(), strategies=TRAINER_STRATEGIES,
           shape=Shape(loss="fused", reference=True, generates=True)),
    Method(name="rloo", summary="RLOO: REINFORCE leave-one-out on sampled replies, reward model or Python function",
           params=RLOOParams, record_types=PROMPT_KINDS, train=train_rloo,
           encode=encode_prompts, check=ONLINE_CHECKS, metrics=(), strategies=TRAINER_STRATEGIES,
           shape=Shape(loss="fused", reference=True, generates=True)),
)
