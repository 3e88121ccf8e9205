"""The one registry of training methods. Adding a method = one file in this folder + one line here.

The CLI choices, the recipe schema, `tunesmith methods` and the per-method tests all derive from REGISTRY.
"""

from __future__ import annotations

from tunesmith.methods import classify, ensemble, features, fewshot, online, ppo, preference, pretrain, reward, sft
from tunesmith.methods.base import Method, TrainOutcome
from tunesmith.recipe import register_methods

REGISTRY: dict[str, Method] = {m.name: m for m in (
    sft.METHOD, pretrain.METHOD, classify.METHOD, features.METHOD, fewshot.METHOD,  # fine-tuning and baselines
    ensemble.METHOD,  # pooled classifier runs
    reward.METHOD, *preference.METHODS, *online.METHODS, ppo.METHOD,  # alignment: dpo kto orpo, grpo rloo, ppo
)}
register_methods(REGISTRY)  # what a recipe may name; the first (sft) is what a recipe without `method` trains


def scores_replies(manifest: dict) -> bool:
    """True when the run a manifest describes is a reward model (its method scores replies)."""
    method = REGISTRY.get(manifest.get("method", ""))
    return method is not None and method.scores_replies


__all__ = ["REGISTRY", "scores_replies", "Method", "TrainOutcome"]
