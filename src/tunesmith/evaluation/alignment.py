"""Alignment metrics for `tunesmith eval RUN --reward-model RM`: what a policy's answers are worth to a reward model.

For every system's answers on the same prompts: the reward model's mean score (with a 95% interval); the tuned
system's win rate against each other system (per prompt, the higher reward wins, a tie counts one half; 95%
interval); every system's answer length in tokens (a policy that games the reward by talking longer shows here:
its reward rises with its length); and the
KL of the tuned model to its base on the tuned answers: the mean over prompts of Σ_t log p_tuned(y_t) − log
p_base(y_t) over the answer's tokens. With greedy answers (eval's default) that is the log-ratio on the answer
the policy prefers, not a sampled estimate of KL(π‖π_ref); it is what drifts when the policy drifts.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def alignment_metrics(reward_run: str, prompts: list[list[dict[str, str]]], outputs: dict[str, list[str]],
                      per_example: dict[str, list[dict[str, Any]]], kl: dict[str, Any] | None,
                      n_resamples: int = 1000, seed: int = 0, batch_size: int = 8,
                      count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """Score every system's answers with `reward_run`; add `reward` (and `answer_tokens`, given `count_tokens`) to
    each per-example row; return the summary."""
    from tunesmith.evaluation.bootstrap import mean_interval
    from tunesmith.methods.reward import load_reward_model

    model = load_reward_model(reward_run, batch_size=batch_size)
    out: dict[str, Any] = {"reward_model": str(reward_run), "systems": {}, "win_rate": {}}
    rewards: dict[str, np.ndarray] = {}
    for name, answers in outputs.items():
        rewards[name] = np.asarray(model.score(prompts, answers), dtype=float)
        for row, r in zip(per_example[name], rewards[name]):
            row["reward"] = float(r)
        interval = mean_interval(rewards[name], n_resamples, seed)
        out["systems"][name] = {"mean_reward": interval["mean"], "reward_ci": [interval["ci_low"],
                                                                                interval["ci_high"]]}
        if count_tokens is not None:
            lengths = [count_tokens(a) for a in answers]
            for row, n in zip(per_example[name], lengths):
                row["answer_tokens"] = n
            out["systems"][name]["answer_tokens_mean"] = float(np.mean(lengths)) if lengths else 0.0
    for other in (n for n in outputs if n != "tuned"):
        out["win_rate"][other] = win_rate(rewards["tuned"], rewards[other], n_resamples, seed)
    if kl is not None:
        out["kl_to_base"] = kl
    return out


def win_rate(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Share of prompts where system a's reward beats b's (ties count one half), with a bootstrap 95% interval."""
    from tunesmith.evaluation.bootstrap import mean_interval

    outcome = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    interval = mean_interval(outcome, n_resamples, seed)
    return {"win_rate": interval["mean"], "ci_low": interval["ci_low"], "ci_high": interval["ci_high"],
            "wins": int((a > b).sum()), "losses": int((a < b).sum()), "ties": int((a == b).sum()), "n": len(a)}


def kl_to_base(tuned, base, prompts: list[list[dict[str, str]]], answers: list[str],
               batch_size: int = 8) -> dict[str, Any]:
    """Mean summed log-ratio log p_tuned − log p_base over the tokens of the tuned answers, per answer and per
    token, and the answers' mean length in tokens. `tuned` and `base` are loaded systems (model + tokenizer)."""
    from tunesmith.data.format import encode_chat, last_answer_only, pad_token_id
    from tunesmith.evaluation.scoring import sequence_logprobs

    tok = tuned.tokenizer
    sequences = [last_answer_only(*encode_chat(tok, p + [{"role": "assistant", "content": a}]))
                 for p, a in zip(prompts, answers)]
    tuned_lp = sequence_logprobs(tuned.model, sequences, pad_token_id(tok), batch_size)
    base_lp = sequence_logprobs(base.model, sequences, pad_token_id(tok), batch_size)
    ratios = np.array([t - b for (t, _), (b, _) in zip(tuned_lp, base_lp)])
    tokens = np.array([n for _, n in tuned_lp])
    return {"kl_per_answer": float(ratios.mean()), "kl_per_token": float(ratios.sum() / max(tokens.sum(), 1)),
            "answer_tokens_mean": float(tokens.mean())}
