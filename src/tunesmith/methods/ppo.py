"""PPO against a reward model or a reward function (`method: ppo`), written on transformers and peft.

TRL no longer has a PPO trainer; this file is the loop of Ziegler et al. 2019 / InstructGPT with the details of
"The N+ implementation details of RLHF with PPO". Each step:
    1. sample a reply to each of `rollout_batch_size` prompts (left-padded, KV cache, at `temperature`)
    2. score each reply: `reward_model` (a `method: reward` run) or `reward_function` (module:function)
    3. per-token reward = -kl_coef · (log π − log π_ref), with the score added on the reply's last token
    4. advantages by GAE from a value head (a linear layer on the policy's last hidden state), whitened
    5. `ppo_epochs` passes of clipped policy and value updates over shuffled mini-batches (AdamW, grad clipping)

Prompts, policy, adapters and the run folder are as in online.py / preference.py: a fresh adapter on the base, or
`policy: RUN` to train an SFT run's adapter further. The reference: the model with its adapter disabled (a fresh
peft adapter; for prefix/prompt tuning that is the base without the virtual tokens), the SFT run's adapter loaded
again and frozen ("ref"), or a frozen copy of the start (freeze, full, bottleneck adapters). `kl_coef` is fixed, or with `adaptive_kl` follows Ziegler et al.'s controller.
The run folder is an ordinary causal-LM run (generate, chat, eval and export read it like an SFT run) plus
`value_head.safetensors`; metrics.jsonl gets reward, kl, entropy, clip_fraction, value_loss, policy_loss,
approx_kl, response_length and kl_coef every step. Read top to bottom: parameters, the PPO pieces (pure functions
the tests check by hand), prompts, the policy, rollouts, updates, the loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from tunesmith.methods.base import Method, Shape, TrainOutcome, all_checks
from tunesmith.methods.online import (PROMPT_KINDS, ROLLOUT_BATCHES, OnlineParams, PromptRow,  # noqa: F401 - re-exported
                                     encode_prompts, reply_budget)
from tunesmith.schema import MethodParams

VALUE_HEAD = "value_head.safetensors"
Score = Callable[[list[list[dict[str, str]]], list[str]], list[float]]


class PPOParams(OnlineParams, MethodParams):
    """Policy and adapter (`policy`, `adapter`, ...), reward source, `max_completion_length` and `temperature` are
    OnlineParams'; the rest is PPO's."""

    name: Literal["ppo"] = "ppo"
    kl_coef: float = Field(0.05, ge=0, description="weight of the per-token KL penalty (the start value when adaptive)")
    adaptive_kl: bool = Field(
        False, description="move kl_coef towards target_kl (Ziegler et al.'s proportional controller)")
    target_kl: float = Field(6.0, gt=0, description="adaptive: the wanted KL per reply (nats, summed over its tokens)")
    kl_horizon: int = Field(10000, gt=0, description="adaptive: replies over which kl_coef moves by at most 20%")
    ppo_epochs: int = Field(4, gt=0, description="passes over each step's replies")
    rollout_batch_size: int | None = Field(None, gt=0, description="prompts per step; null: train.batch_size")
    mini_batch_size: int | None = Field(None, gt=0, description="replies per optimizer update; null: the whole rollout")
    clip_range: float = Field(0.2, gt=0, description="the probability ratio is clipped to 1 ± this")
    clip_range_value: float = Field(0.2, gt=0, description="a value moves at most this far from its rollout value")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount per token")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda")
    top_k: int | None = Field(None, gt=0, description="sample from the k likeliest tokens only")
    top_p: float | None = Field(None, gt=0, le=1, description="sample from the smallest set holding this probability")
    whiten_advantages: bool = Field(True, description="advantages to mean 0, variance 1 per step")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of a reply cut off unfinished")


# ----------------------------------------------------------------------------------------------- PPO pieces


def masked_mean(x, mask):
    """Mean of `x` where `mask` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, eps: float = 1e-8):
    """`x` shifted to mean 0 and scaled to variance 1 over the masked entries (unbiased variance); 0 elsewhere."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    return (x - mean) * (var + eps).rsqrt() * mask


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """Per-token rewards: -kl_coef · (logprob − ref_logprob) on each response token, the score added on the last
    real one; 0 on padding. Shapes: scores (B,), the rest (B, T)."""
    import torch

    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns (= advantages + values) over the response tokens.

    delta_t = r_t + gamma · V_{t+1} − V_t (V = 0 after the last real token); A_t = delta_t + gamma · lam · A_{t+1}.
    """
    import torch

    values, rewards = values * mask, rewards * mask
    steps = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(steps)):
        following = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(new_logprobs, old_logprobs, advantages, mask, clip: float):
    """PPO's clipped surrogate, max(−A·ratio, −A·clip(ratio, 1 ± clip)) averaged over tokens, and the share of
    tokens where the clipped term won (the clip fraction)."""
    import torch

    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, clip: float):
    """½ · max((V − R)², (V_clipped − R)²) averaged over tokens, V_clipped = old V ± clip."""
    import torch

    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKL:
    """Ziegler et al.'s controller: kl_coef *= 1 + clip(KL / target − 1, ±0.2) · responses / horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, responses: int) -> float:
        """Move the coefficient after a step whose responses had mean KL `kl`; return the new value."""
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * responses / self.horizon
        return self.value


# ----------------------------------------------------------------------------------------------- prompts


def left_pad(rows: list[list[int]], pad_id: int, device):
    """Token ids and attention mask of `rows`, padded on the left (prompts for batched generation)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def reward_callable(params: PPOParams) -> Score:
    """The scorer, `(prompts, responses) -> list[float]`: the reward function, or the reward run's `score`."""
    from tunesmith.methods.online import reward_source

    return reward_source(params).score


# ----------------------------------------------------------------------------------------------- the policy


@dataclass
class Policy:
    """The model being trained, its value head, and its reference: `reference` is a frozen copy, or None when the
    reference is the model itself with its adapter disabled (`ref_adapter` None) or swapped for `ref_adapter`."""

    model: Any
    value_head: Any
    reference: Any
    ref_adapter: str | None
    temperature: float
    precision: str
    device: Any

    def trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    @contextlib.contextmanager
    def as_reference(self):
        """The model that computes reference log-probabilities, for the duration of the block."""
        if self.reference is not None:
            yield self.reference
        elif self.ref_adapter is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(self.ref_adapter, inference_mode=True)
            try:
                yield self.model
            finally:
                self.model.set_adapter("default")  # trainable again

    def forward(self, query, query_mask, response, with_values: bool = True, reference: bool = False):
        """Log-probabilities (at the sampling temperature) of the response tokens (B, T), each position's entropy
        (no gradient), and the value before each token (None without `with_values`)."""
        import torch

        ids = torch.cat([query, response], dim=1)
        mask = torch.cat([query_mask, torch.ones_like(response)], dim=1)  # what generation attended to
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # and its position ids
        width = response.shape[1]
        scope = self.as_reference() if reference else contextlib.nullcontext(self.model)
        with scope as model, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1,
                        output_hidden_states=with_values, use_cache=False)
        logp_all = torch.log_softmax(out.logits[:, :-1].float() / self.temperature, dim=-1)
        logprobs = logp_all.gather(-1, response.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        values = None
        if with_values:
            values = self.value_head(out.hidden_states[-1][:, -width - 1:-1].float()).squeeze(-1)
        return logprobs, entropy, values


def build_policy(job, params: PPOParams) -> Policy:
    """preference.build_policy's model (dropout off unless told), a value head starting at 0, and the reference."""
    import copy

    import torch

    from tunesmith.artifacts import RunDir
    from tunesmith.methods import preference

    model = preference.build_policy(job, params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if next(model.parameters()).device.type == "cpu":  # qlora bases are placed already
        model.to(device)
    if params.disable_dropout:  # the rollout's log-probabilities must be what the first update recomputes
        preference.without_dropout(model)
    if job.recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference, ref_adapter = None, None
    if params.policy:  # the SFT run's adapter once more, frozen (preference.save drops it)
        ref_adapter = "ref"
        model.load_adapter(str(RunDir(Path(params.policy)).adapter), adapter_name=ref_adapter, is_trainable=False)
    elif not hasattr(model, "disable_adapter"):  # freeze, full, bottleneck adapters: a frozen copy of the start
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    head = torch.nn.Linear(model.config.hidden_size, 1).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return Policy(model, head, reference, ref_adapter, params.temperature, job.precision, device)


# ----------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One step's prompts and sampled replies and what the updates need; tensors are (B, T) unless noted."""

    query: Any
    query_mask: Any
    response: Any  # token ids; padding after the first end-of-turn token
    mask: Any  # 1 on the reply's tokens, its end-of-turn token included
    scores: Any  # (B,) the reward, less the missing-EOS penalty
    raw_scores: list[float]  # what the reward said
    texts: list[str]
    logprobs: Any = None
    ref_logprobs: Any = None
    values: Any = None
    advantages: Any = None
    returns: Any = None


def sample(policy: Policy, tokenizer, rows: list[PromptRow], params: PPOParams, stops: list[int],
           batch_size: int) -> tuple[Any, Any, Any, Any, list[str]]:
    """Sample a reply to each prompt: (query, query mask, response, response mask, reply texts)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=params.max_completion_length, do_sample=True,
                              temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    query, query_mask = left_pad([r.input_ids for r in rows], tokenizer.pad_token_id, policy.device)
    pieces = []
    policy.model.eval()
    with torch.no_grad(), torch.autocast(policy.device.type, dtype=torch.bfloat16,
                                         enabled=policy.precision == "bf16"):
        for start in range(0, len(rows), batch_size):
            part = slice(start, start + batch_size)
            out = policy.model.generate(input_ids=query[part], attention_mask=query_mask[part],
                                        generation_config=config)
            pieces.append(out[:, query.shape[1]:])
    width = max(p.shape[1] for p in pieces)
    response = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=tokenizer.pad_token_id)
                          for p in pieces])
    is_stop = torch.isin(response, torch.tensor(stops, device=response.device))
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), width)
    mask = (torch.arange(width, device=response.device) <= first_stop.unsqueeze(1)).float()
    response = response.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = [tokenizer.decode(row[:int(n)], skip_special_tokens=True).strip()
             for row, n in zip(response.tolist(), mask.sum(1).tolist())]
    return query, query_mask, response, mask, texts


def checked_scores(score: Score, rows: list[PromptRow], texts: list[str]) -> list[float]:
    """The reward's scores for the replies: one finite number each, or a RunError."""
    from tunesmith.errors import RunError

    try:
        values = [float(v) for v in score([list(r.prompt) for r in rows], texts)]
    except (TypeError, ValueError) as exc:
        raise RunError(f"the reward did not return a list of numbers ({exc})") from None
    if len(values) != len(texts) or not all(math.isfinite(v) for v in values):
        raise RunError(f"the reward returned {len(values)} scores for {len(texts)} replies, or a score that is not "
                       "a finite number", "return one finite float per (prompt, response), in order")
    return values


def rollout(policy: Policy, tokenizer, rows: list[PromptRow], params: PPOParams, score: Score, stops: list[int],
            batch_size: int, kl_coef: float) -> Rollout:
    """Sample and score; then log-probabilities, reference log-probabilities, values, rewards and advantages."""
    import torch

    query, query_mask, response, mask, texts = sample(policy, tokenizer, rows, params, stops, batch_size)
    raw = checked_scores(score, rows, texts)
    scores = torch.tensor(raw, device=policy.device)
    if params.missing_eos_penalty is not None:
        ended = torch.isin(response, torch.tensor(stops, device=response.device)).any(1)
        scores = scores - params.missing_eos_penalty * (~ended).float()
    r = Rollout(query, query_mask, response, mask, scores, raw, texts)
    parts: dict[str, list] = {"logprobs": [], "ref_logprobs": [], "values": []}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = slice(start, start + batch_size)
            logprobs, _, values = policy.forward(query[part], query_mask[part], response[part])
            ref_logprobs, _, _ = policy.forward(query[part], query_mask[part], response[part], with_values=False,
                                                reference=True)
            for key, value in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("values", values)):
                parts[key].append(value)
    r.logprobs, r.ref_logprobs, r.values = (torch.cat(parts[k]) * mask for k in parts)
    rewards = kl_penalized_rewards(scores, r.logprobs, r.ref_logprobs, mask, kl_coef)
    r.advantages, r.returns = gae(rewards, r.values, mask, params.gamma, params.lam)
    if params.whiten_advantages:
        r.advantages = whiten(r.advantages, mask)
    return r


# ----------------------------------------------------------------------------------------------- updates


def update(policy: Policy, r: Rollout, params: PPOParams, optimizer, mini_batch: int, batch_size: int,
           max_grad_norm: float, generator) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in shuffled mini-batches, each accumulated over passes of `batch_size`
    replies; returns each statistic's mean over the passes."""
    import torch

    policy.model.train()
    totals = dict.fromkeys(("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl"), 0.0)
    passes, n = 0, r.response.shape[0]
    for _ in range(params.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(r.response.device)
        for start in range(0, n, mini_batch):
            chosen = order[start:start + mini_batch]
            optimizer.zero_grad(set_to_none=True)
            for rows in chosen.split(batch_size):
                mask = r.mask[rows]
                logprobs, entropy, values = policy.forward(r.query[rows], r.query_mask[rows], r.response[rows])
                pg, clipped = policy_loss(logprobs, r.logprobs[rows], r.advantages[rows], mask, params.clip_range)
                vf = value_loss(values, r.values[rows], r.returns[rows], mask, params.clip_range_value)
                ((pg + params.vf_coef * vf) * len(rows) / len(chosen)).backward()
                with torch.no_grad():
                    for key, value in (("policy_loss", pg), ("value_loss", vf), ("clip_fraction", clipped),
                                       ("entropy", masked_mean(entropy, mask)),
                                       ("approx_kl", 0.5 * masked_mean((logprobs - r.logprobs[rows]) ** 2, mask))):
                        totals[key] += value.item()
                passes += 1
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(policy.trainable(), max_grad_norm)
            optimizer.step()
    return {k: v / max(passes, 1) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------- the loop


def ppo_problems(params: PPOParams, t, data) -> list[str]:
    """`train` settings this loop can't honour, in recipe wording (before anything is loaded)."""
    out = []
    rollout_size = params.rollout_batch_size or t.batch_size
    if t.gradient_accumulation != 1:
        out.append("`train.gradient_accumulation`: PPO accumulates by itself (each update covers "
                   "`method.mini_batch_size` replies in passes of `train.batch_size`); leave it at 1")
    if t.eval_every or t.early_stopping_patience:
        out.append("`train.eval_every` / `train.early_stopping_patience`: `method: ppo` has no validation loss to "
                   "watch; leave them out (metrics.jsonl has the reward of every step)")
    if params.mini_batch_size and params.mini_batch_size > rollout_size:
        out.append(f"`method.mini_batch_size`: {params.mini_batch_size} is more than the {rollout_size} replies "
                   "of a step (method.rollout_batch_size, default train.batch_size)")
    return out


def train(job) -> TrainOutcome:
    """PPO steps against the reward; save the policy like an SFT run, and the value head."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from tunesmith.data.format import end_of_turn_ids
    from tunesmith.errors import RecipeError
    from tunesmith.methods.common import count_parameters
    from tunesmith.methods.preference import policy_problems

    params: PPOParams = job.recipe.method
    t = job.recipe.train
    problems = policy_problems(job, params)
    if problems:
        raise RecipeError("recipe", problems)
    score = reward_callable(params)
    tok, stops = job.tokenizer, sorted(end_of_turn_ids(job.tokenizer))
    rollout_size = params.rollout_batch_size or t.batch_size
    steps = t.max_steps or max(1, math.ceil(t.epochs * len(job.train_rows) / rollout_size))

    policy = build_policy(job, params)
    optimizer = torch.optim.AdamW(policy.trainable(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_epsilon, weight_decay=t.weight_decay)
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil((t.warmup_ratio or 0.0) * steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    kl = AdaptiveKL(params.kl_coef, params.target_kl, params.kl_horizon)
    generator = torch.Generator().manual_seed(t.seed)
    loop = Progress()
    if job.resume:
        loop = resume(job, policy, optimizer, scheduler, kl, generator)
    for callback in job.callbacks:  # transformers callbacks (tests use them): only train begin/end, with the model
        callback.on_train_begin(None, None, None, model=policy.model)

    writer, t0 = _tensorboard(job.run.tensorboard), time.time() - loop.seconds
    order, rewards = loop.order, loop.rewards
    bar = tqdm(range(loop.step + 1, steps + 1), desc="ppo", unit="step", initial=loop.step, total=steps)
    for step in bar:
        if len(order) < rollout_size:  # a fresh shuffle of the prompts whenever they run out
            order += torch.randperm(len(job.train_rows), generator=generator).tolist()
        rows, order = [job.train_rows[i] for i in order[:rollout_size]], order[rollout_size:]
        coef, lr = kl.value, scheduler.get_last_lr()[0]
        r = rollout(policy, tok, rows, params, score, stops, t.batch_size, coef)
        stats = update(policy, r, params, optimizer, params.mini_batch_size or rollout_size, t.batch_size,
                       t.max_grad_norm, generator)
        scheduler.step()
        sequence_kl = ((r.logprobs - r.ref_logprobs) * r.mask).sum(1).mean().item()
        if params.adaptive_kl:
            kl.update(sequence_kl, len(rows))
        loop.trained_tokens += int(r.mask.sum().item())
        row = {"step": step, "epoch": round(step * rollout_size / len(job.train_rows), 4),
               "reward": sum(r.raw_scores) / len(r.raw_scores), "kl": sequence_kl, **stats,
               "response_length": r.mask.sum(1).mean().item(), "kl_coef": coef, "learning_rate": lr}
        rewards.append(row["reward"])
        _log(job.run.metrics, writer, row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{sequence_kl:.3f}")
        if step % t.log_every == 0 or step == steps:
            bar.write(f"step {step}/{steps}  reward {row['reward']:.4f}  kl {sequence_kl:.4f}  "
                      f"entropy {stats['entropy']:.3f}  clip {stats['clip_fraction']:.3f}  "
                      f"value loss {stats['value_loss']:.4f}  length {row['response_length']:.1f}")
        if t.save_every and step % t.save_every == 0 and step < steps:
            loop.step, loop.order, loop.seconds = step, order, time.time() - t0
            save_checkpoint(job, policy, optimizer, scheduler, kl, generator, loop)
    bar.close()
    seconds = time.time() - t0
    if writer is not None:
        writer.close()
    for callback in job.callbacks:
        callback.on_train_end(None, None, None, model=policy.model)
    trainable, total = count_parameters(policy.model)
    return TrainOutcome(steps=steps, seconds=seconds, trained_tokens=loop.trained_tokens,
                        losses={"reward_first": rewards[0], "reward_last": rewards[-1]},
                        saved=save(job, policy, params), trainable_params=trainable, total_params=total)


# ----------------------------------------------------------------------------------------------- checkpoints

CHECKPOINT_TENSORS = "ppo_state.safetensors"  # every tensor of the state: weights, optimizer moments, random states
CHECKPOINT_STATE = "ppo_state.json"  # everything else, with {"__tensor__": key} where a tensor was; written last
LEGACY_STATE = "ppo_state.pt"  # the pickle older versions wrote: never loaded (unpickling can run code)


@dataclass
class Progress:
    """Where the loop is: what a checkpoint stores besides the weights and optimizer, so a resume continues exactly."""

    step: int = 0
    order: list[int] = field(default_factory=list)  # prompts left in the current shuffle
    rewards: list[float] = field(default_factory=list)
    trained_tokens: int = 0
    seconds: float = 0.0


def save_checkpoint(job, policy: Policy, optimizer, scheduler, kl: AdaptiveKL, generator, loop: Progress) -> Path:
    """`checkpoints/checkpoint-STEP/`: trainable weights, value head, optimizer, schedule, KL coefficient, random
    states and loop position, as safetensors and JSON (no pickle); built in a temporary folder, then renamed; only
    the newest `train.save_total_limit` are kept."""
    import shutil

    import torch

    from tunesmith.artifacts import staged_dir

    state = {"trainable": {n: p.detach() for n, p in policy.model.named_parameters() if p.requires_grad},
             "value_head": policy.value_head.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "kl_coef": kl.value, "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "progress": vars(loop)}
    folder = job.run.checkpoints / f"checkpoint-{loop.step}"
    with staged_dir(folder, replace=True) as staging:
        write_state(staging, state)
    found = sorted(_checkpoints(job.run.checkpoints), key=_step_of)
    for old in found[:-job.recipe.train.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def resume(job, policy: Policy, optimizer, scheduler, kl: AdaptiveKL, generator) -> Progress:
    """Load the newest checkpoint into the freshly built loop; metrics logged after it are dropped (redone)."""
    import torch

    from tunesmith.artifacts import truncate_metrics
    from tunesmith.errors import RunError

    found = sorted(_checkpoints(job.run.checkpoints), key=_step_of)
    if not found:
        raise RunError(f"{job.run.checkpoints}: no PPO checkpoint to resume from",
                       "checkpoints are written every `train.save_every` steps; run without --resume")
    state = read_state(found[-1])
    params = dict(policy.model.named_parameters())
    missing = [n for n in state["trainable"] if n not in params]
    if missing:
        raise RunError(f"{found[-1]}: the checkpoint has weights this model lacks ({missing[0]}, …)",
                       "resume with the recipe the run started with")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device))
    policy.value_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl.value = state["kl_coef"]
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loop = Progress(**state["progress"])
    truncate_metrics(job.run.metrics, loop.step)
    return loop


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write a nested state (dicts, lists, tuples, numbers, text, None, tensors) as CHECKPOINT_TENSORS + the JSON
    CHECKPOINT_STATE: tensors exactly (dtype, shape, bits), floats as their shortest exact decimal."""
    import json

    from safetensors.torch import save_file

    from tunesmith.artifacts import atomic_path, atomic_write

    tensors: dict[str, Any] = {}
    plain = _to_plain(state, "", tensors)
    with atomic_path(folder / CHECKPOINT_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write(folder / CHECKPOINT_STATE, json.dumps({"format": 1, "state": plain}, allow_nan=True))


def read_state(folder: Path) -> dict[str, Any]:
    """The state `write_state` wrote, without unpickling anything; a RunError naming the file when it is missing,
    damaged, or only the pickle of an older version is there."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tunesmith.errors import RunError

    if not (folder / CHECKPOINT_STATE).is_file() and (folder / LEGACY_STATE).is_file():
        raise RunError(f"{folder / LEGACY_STATE}: a PPO checkpoint in the pickle format of an older tunesmith, "
                       "which is not loaded (unpickling a file can run code)",
                       "train again without --resume, or resume with the tunesmith version that wrote it")
    try:
        meta = json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / CHECKPOINT_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise RunError(f"{folder}: the PPO checkpoint can't be read ({str(exc).splitlines()[0]})",
                       "remove that checkpoint folder to resume from an earlier one, or train without --resume"
                       ) from None
    if not isinstance(meta, dict) or meta.get("format") != 1 or not isinstance(meta.get("state"), dict):
        raise RunError(f"{folder / CHECKPOINT_STATE}: not a PPO checkpoint state this version reads",
                       "train again without --resume")
    try:
        return _from_plain(meta["state"], tensors)
    except KeyError as exc:
        raise RunError(f"{folder / CHECKPOINT_TENSORS}: the tensor {exc} is missing",
                       "remove that checkpoint folder to resume from an earlier one, or train without --resume"
                       ) from None


def _to_plain(value: Any, key: str, tensors: dict[str, Any]) -> Any:
    """JSON-ready `value`: tensors moved into `tensors` (by their path of keys), tuples and non-text dict keys
    marked so that _from_plain gives back the same types."""
    import torch

    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors of the checkpoint would be stored as {key}")
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _to_plain(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _to_plain(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_to_plain(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint can't store {type(value).__name__} (at {key or 'the top'})")


def _from_plain(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_from_plain(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(_from_plain(v, tensors) for v in value["__tuple__"])
    if set(value) == {"__items__"}:
        return {k: _from_plain(v, tensors) for k, v in value["__items__"]}
    return {k: _from_plain(v, tensors) for k, v in value.items()}


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-N folders (a staging folder, hidden, is never one)."""
    return [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional here: metrics.jsonl has every number
        return None
    return SummaryWriter(str(folder))


def _log(path: Path, writer, row: dict[str, float]) -> None:
    """Append the step's numbers to metrics.jsonl (and to TensorBoard, under ppo/)."""
    import json

    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if key not in ("step", "epoch"):
                writer.add_scalar(f"ppo/{key}", value, row["step"])


def save(job, policy: Policy, params: PPOParams) -> str:
    """The policy as preference.save writes it (`adapter/` or `model/`), and `value_head.safetensors`."""
    from safetensors.torch import save_file

    from tunesmith.methods import preference

    saved = preference.save(job, policy.model, params)
    head = {k: v.detach().float().cpu().contiguous() for k, v in policy.value_head.state_dict().items()}
    save_file(head, str(job.run.root / VALUE_HEAD))
    return saved


METHOD = Method(
    name="ppo",
    summary="PPO: sample replies, score them (reward run or function), clipped updates with a value head and KL",
    params=PPOParams,
    record_types=PROMPT_KINDS,
    train=train,
    encode=encode_prompts,
    check=all_checks(ROLLOUT_BATCHES, reply_budget, ppo_problems),
    metrics=(),
    shape=Shape(loss="generated", reference=True, generates=True, value_head=True),
)
