"""Reward model (`method: reward`): a one-output head that scores a conversation, trained on preference pairs.

Each pair (prompt, chosen, rejected) becomes two conversations rendered with the model's chat template; the head
reads the last token of each (decoders pad on the left). The loss is Bradley-Terry: -log σ(r_chosen - r_rejected),
plus `center_rewards` × mean((r_chosen + r_rejected)²) to keep scores near zero (Eisenstein et al., 2023). Long
conversations lose their *start*, never the reply being judged. Validation reports pairwise accuracy (chosen
scored higher) and the mean margin. Read top to bottom: parameters, rows, loss and trainer, model, save, scoring.

The run folder is a classifier run with one output (`labels.json` names it "reward"): any adapter, the head in
`adapter/` (peft `modules_to_save`) or `model/`. `load_reward_model(RUN).score(prompts, responses)` is how PPO,
GRPO/RLOO, `tunesmith score` and `tunesmith eval` use it.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from tunesmith.data.format import Encoded, encode_chat, preference_pair
from tunesmith.errors import DataError
from tunesmith.methods.adapters import AdapterParamsMixin
from tunesmith.methods.base import TRAINER_STRATEGIES, Method, Shape, TrainOutcome, padded_batches
from tunesmith.schema import MethodParams, PathKey

TASK = "seq-cls"
LABEL = "reward"


class RewardParams(AdapterParamsMixin, MethodParams):
    """Any adapter adapts the body; the one-output head is always trained in full."""

    name: Literal["reward"] = "reward"
    start_from: Annotated[str | None, PathKey("run")] = Field(
        None, min_length=1, description="an SFT run folder whose weights the reward model starts from (null: the base)")
    center_rewards: float = Field(0.0, ge=0, description="weight of the mean squared score (keeps rewards centred "
                                                         "on 0)")


# ----------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class PairRow(Encoded):
    """A preference pair: `input_ids` is the chosen conversation, `rejected_ids` the rejected one."""

    rejected_ids: list[int] = field(default_factory=list, repr=False)
    COLUMNS: ClassVar[tuple[str, ...]] = ("input_ids", "rejected_ids")

    @property
    def trained_tokens(self) -> int:  # the loss back-propagates through both conversations
        return len(self.input_ids) + len(self.rejected_ids)


@dataclass
class PairRows:
    """Encoded training and validation pairs and the pairs that had to be rejected (train.py's EncodedData shape)."""

    train: list[PairRow]
    validation: list[PairRow]
    rejects: list[dict[str, Any]]


def conversation_ids(tokenizer, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], int]:
    """The chat-template token ids of a conversation, keeping its *last* `max_len` tokens; and the full length."""
    ids, _ = encode_chat(tokenizer, messages)
    return ids[-max_len:], len(ids)


def encode_pairs(data, tokenizer, recipe) -> PairRows:
    """Preference records -> PairRows; a pair whose two sides are identical after truncation is rejected."""
    if data.kind != "preference":
        raise DataError(f"method {recipe.method.name!r} trains on preference rows (prompt, chosen, rejected), "
                        f"got {data.kind} rows", "set data.format: preference and map the three columns")
    out = PairRows([], [], [])
    max_len = recipe.train.max_seq_len
    for records, target in ((data.train, out.train), (data.validation, out.validation)):
        for record in records:
            pair = preference_pair(record, recipe.data.system_prompt)
            chosen, chosen_len = conversation_ids(tokenizer, pair.conversation("chosen"), max_len)
            rejected, rejected_len = conversation_ids(tokenizer, pair.conversation("rejected"), max_len)
            if chosen == rejected:
                out.rejects.append({"file": record.source, "line": record.line, "row": record.data,
                                    "reason": "chosen and rejected are identical"
                                              + (f" within the last train.max_seq_len={max_len} tokens"
                                                 if max(chosen_len, rejected_len) > max_len else "")})
                continue
            target.append(PairRow(chosen, chosen, max(chosen_len, rejected_len) > max_len,
                                  max(chosen_len, rejected_len), rejected_ids=rejected))
    return out


class PairCollator:
    """A batch of B pairs -> 2B padded conversations: the chosen ones first, then the rejected ones."""

    def __init__(self, pad_id: int, side: str):
        from tunesmith.methods.classify import PadCollator

        self.pad = PadCollator(pad_id, side)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [{"input_ids": e["input_ids"]} for e in examples] + [{"input_ids": e["rejected_ids"]} for e in examples]
        return self.pad(rows)


# ----------------------------------------------------------------------------------------------- loss and trainer


def pairwise_loss(chosen, rejected, center: float = 0.0):
    """Mean Bradley-Terry loss -log σ(chosen - rejected), plus `center` × mean((chosen + rejected)²)."""
    import torch.nn.functional as F

    loss = -F.logsigmoid(chosen - rejected).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss


def pair_scores(model, inputs: dict[str, Any]):
    """(chosen scores, rejected scores) for a PairCollator batch."""
    scores = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0].float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def pair_metrics(prediction) -> dict[str, float]:
    """`compute_metrics`: pairwise accuracy (a tie counts one half) and mean margin over the evaluated pairs."""
    import numpy as np

    margins = np.asarray(prediction.predictions).reshape(-1)
    return {"accuracy": float(((margins > 0) + 0.5 * (margins == 0)).mean()), "margin": float(margins.mean())}


def _trainer_class():
    import torch
    from transformers import Trainer

    class RewardTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            chosen, rejected = pair_scores(model, inputs)
            loss = pairwise_loss(chosen, rejected, self.center_rewards)
            return (loss, {"margins": chosen - rejected}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, out = self.compute_loss(model, inputs, return_outputs=True)
            margins = out["margins"].detach()
            return loss.detach(), margins, torch.zeros_like(margins)  # labels only so compute_metrics runs

    return RewardTrainer


def train(job) -> TrainOutcome:
    """Train the reward head (and adapter) on pairs; save the weights and `labels.json`."""
    from tunesmith.methods.classify import head_trainer, padding_side
    from tunesmith.methods.common import run_trainer

    params: RewardParams = job.recipe.method
    with start_source(params, job.source) as source:
        model = build_model(job, params, source)
    side = padding_side(model.config)
    trainer, log = head_trainer(job, _trainer_class(), model, PairCollator(job.tokenizer.pad_token_id, side),
                                pair_metrics, label_names=[])
    trainer.center_rewards = params.center_rewards
    outcome = run_trainer(job, trainer, model)
    outcome.losses.update(log.summary(before=job.recipe.eval.loss_before and not job.resume))
    margins = [row.get("eval_margin") for row in _evaluations(job.run.metrics)]
    outcome.losses["validation_margin_after"] = margins[-1] if margins else None
    outcome.saved = save(job, trainer.model, params, side)
    return outcome


def _evaluations(metrics_path: Path) -> list[dict[str, Any]]:
    import json

    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_margin" in r]


# ----------------------------------------------------------------------------------------------- model


@contextlib.contextmanager
def start_source(params: RewardParams, base):
    """The weights to start from: the recipe's base model, or an SFT run's model with its adapter merged in
    (written to a temporary folder that is removed once the model is loaded)."""
    if not params.start_from:
        yield base
        return
    from tunesmith.methods.adapters import merged_run_folder

    with tempfile.TemporaryDirectory(prefix="tunesmith-start-") as folder:
        yield merged_run_folder(params.start_from, Path(folder))


def build_model(job, params: RewardParams, source):
    """The base (or SFT) model with a one-output head that knows the pad token, wrapped in the adapter."""
    from transformers import set_seed

    from tunesmith.methods.adapters import apply_adapter, load_base_for

    set_seed(job.recipe.train.seed)  # the head and the adapter start random: seed them like the rest of the run
    model = load_base_for(params.adapter, params, source, TASK, 1)
    model.config.id2label, model.config.label2id = {0: LABEL}, {LABEL: 0}
    model.config.pad_token_id = job.tokenizer.pad_token_id  # decoders pool the last token that isn't padding
    model.config.use_cache = False
    return apply_adapter(model, params, TASK, job.precision)


def save(job, model, params: RewardParams, side: str) -> str:
    """The weights (`adapter/` or `model/`) and `labels.json` (one output, named "reward")."""
    from tunesmith.methods.adapters import save_adapter
    from tunesmith.methods.classify import write_labels

    saved = save_adapter(model, params, job.run, job.tokenizer)
    write_labels(job.run.root, (LABEL,), job.tokenizer.pad_token_id, saved, padding_side=side)
    return saved


# ----------------------------------------------------------------------------------------------- scoring


@dataclass
class RewardModel:
    """A trained reward model: `score(prompts, responses)` gives one number per reply (higher = preferred)."""

    run_dir: str
    precision: str | None = None
    batch_size: int = 8

    def score(self, prompts: list[list[dict[str, str]]], responses: list[str],
              progress=None) -> list[float]:
        """The reward of each response to its prompt (chat messages without the final assistant turn)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        conversations = [p + [{"role": "assistant", "content": r.strip()}] for p, r in zip(prompts, responses)]
        return self.score_conversations(conversations, progress)

    def score_conversations(self, conversations: list[list[dict[str, str]]], progress=None) -> list[float]:
        """The reward of each conversation's last assistant turn."""
        from tunesmith.methods.classify import load_classifier

        loaded = load_classifier(self.run_dir, self.precision)
        encoded = [conversation_ids(loaded.tokenizer, c, loaded.max_len)[0] for c in conversations]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        out = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            scores = loaded.logits(loaded.collate([{"input_ids": encoded[i]} for i in chunk]))[:, 0].tolist()
            for i, s in zip(chunk, scores):
                out[i] = s
            if progress:
                progress(len(chunk))
        return out


def load_reward_model(run_dir: str | Path, precision: str | None = None, batch_size: int = 8) -> RewardModel:
    """A reward-model run folder, checked to be one (a RunError says what it is otherwise)."""
    from tunesmith.artifacts import open_run
    from tunesmith.errors import RunError

    run = open_run(run_dir)
    method = run.read_manifest().get("method") if run.manifest.exists() else None
    if method != "reward":
        raise RunError(f"{run.root}: not a reward-model run (method: {method or 'unknown'})",
                       "train one with `method: reward` on preference pairs and pass that run folder")
    return RewardModel(str(run.root), precision, batch_size)


def score_pairs(run_dir: str | Path, records, system_prompt: str | None = None, batch_size: int = 8,
                progress=None) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of preference records under a reward-model run."""
    model = load_reward_model(run_dir, batch_size=batch_size)
    pairs = [preference_pair(r, system_prompt) for r in records]
    scores = model.score_conversations([p.conversation("chosen") for p in pairs]
                                       + [p.conversation("rejected") for p in pairs], progress)
    return scores[:len(pairs)], scores[len(pairs):]


# ----------------------------------------------------------------------------------------------- export


def export(run_dir: str | Path, out: Path) -> Path:
    """The reward model as a plain one-output sequence-classification folder (classify.export), with a README.md
    whose code scores a conversation as `score_conversations` does."""
    from tunesmith.methods.classify import export as export_classifier

    return export_classifier(run_dir, out, readme=_export_readme)


def _export_readme(info: dict[str, Any], tokenizer) -> str:
    """How to score a conversation with the exported reward model; says so where this tokenizer's plain chat
    template tokens differ from what the model was trained on (tunesmith adds a missing BOS or end of turn)."""
    from tunesmith.data.format import render

    sample = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi, how can I help?"}]
    plain = tokenizer(render(tokenizer, sample), add_special_tokens=False)["input_ids"]
    differs = list(plain) != encode_chat(tokenizer, sample)[0]
    warning = ("\n**Note:** for this tokenizer tunesmith adds tokens the plain chat template lacks (a BOS token or "
               "an end-of-turn token after each reply); add them the same way or scores will differ.\n"
               if differs else "")
    return f"""# Reward model exported by tunesmith

From the run `{info['run']}`: one output, the reward of a conversation's last assistant reply (higher = preferred),
adapter merged into the weights. Below, `FOLDER` is this folder's path and `prompt`, `reply` the texts to score.
{warning}
```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained(FOLDER).eval()
tokenizer = AutoTokenizer.from_pretrained(FOLDER)
conversation = [{{"role": "user", "content": prompt}}, {{"role": "assistant", "content": reply.strip()}}]
text = tokenizer.apply_chat_template(conversation, tokenize=False)
ids = tokenizer(text, add_special_tokens=False)["input_ids"][-{info['max_length']}:]  # trained on the last {info['max_length']} tokens
with torch.no_grad():
    reward = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
```
"""


METHOD = Method(
    name="reward",
    summary="a reward model from preference pairs (prompt, chosen, rejected), with any adapter",
    params=RewardParams,
    record_types=("preference",),
    train=train,
    encode=encode_pairs,
    check=padded_batches("each conversation is scored on its own, so batches are padded"),
    metrics=("loss", "accuracy"),
    export=export,
    scores_replies=True,
    strategies=TRAINER_STRATEGIES,
    shape=Shape(task="seq-cls", loss="head"),
)
