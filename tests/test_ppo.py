"""PPO (`method: ppo`): GAE, the clipped objectives and the KL penalty against hand computations; rollout
log-probabilities equal generation's; a tiny random Llama learns a toy reward while the KL stays bounded."""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import write_jsonl
from tunesmith.artifacts import read_metrics
from tunesmith.errors import RecipeError, RunError
from tunesmith.recipe import parse_recipe
from tunesmith.train import train_run

WORDS = ["apple", "river", "stone", "cloud", "music", "garden", "window", "engine", "paper", "forest"]
METRICS = ("reward", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "response_length", "kl_coef",
           "approx_kl")


def t64(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- pure pieces


def test_gae_and_returns_equal_a_hand_computed_three_token_example():
    from tunesmith.methods.ppo import gae

    # three reply tokens and one padding column whose numbers must not count
    rewards, values, mask = t64([0.1, -0.2, 1.0, 9.0]), t64([0.5, 0.4, 0.6, 7.0]), t64([1, 1, 1, 0])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_2 = 1.0 - 0.6 = 0.4                  A_2 = 0.4
    # delta_1 = -0.2 + 0.9*0.6 - 0.4 = -0.06      A_1 = -0.06 + 0.9*0.8*0.4 = 0.228
    # delta_0 = 0.1 + 0.9*0.4 - 0.5 = -0.04       A_0 = -0.04 + 0.72*0.228 = 0.12416
    assert torch.allclose(advantages, t64([0.12416, 0.228, 0.4, 0.0]), rtol=0, atol=1e-12)
    assert torch.allclose(returns, t64([0.62416, 0.628, 1.0, 0.0]), rtol=0, atol=1e-12)
    # gamma = lam = 1: each advantage is the reward still to come minus the value
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(advantages, t64([0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.6, 0.0]), rtol=0, atol=1e-12)


def test_clipped_policy_objective_equals_hand_values_inside_and_outside_the_clip():
    from tunesmith.methods.ppo import policy_loss

    ratios = t64([1.1, 1.5, 0.5, 0.5, 1.5, 0.9, 3.0])
    advantages = t64([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 5.0])
    mask = t64([1, 1, 1, 1, 1, 1, 0])  # the last token is padding
    loss, clip_fraction = policy_loss(ratios.log(), torch.zeros_like(ratios), advantages, mask, clip=0.2)
    # A>0: inside -1.1; above the clip max(-1.5, -1.2) = -1.2 (clipped); below max(-0.5, -0.8) = -0.5 (not clipped)
    # A<0: below max(0.5, 0.8) = 0.8 (clipped); above max(1.5, 1.2) = 1.5 (not clipped); inside 0.9
    assert loss.item() == pytest.approx((-1.1 - 1.2 - 0.5 + 0.8 + 1.5 + 0.9) / 6, abs=1e-12)
    assert clip_fraction.item() == pytest.approx(2 / 6, abs=1e-12)


def test_clipped_value_loss_equals_hand_values():
    from tunesmith.methods.ppo import value_loss

    loss = value_loss(t64([0.9, 0.6, 5.0]), t64([0.5, 0.5, 0.0]), t64([1.0, 0.55, 0.0]), t64([1, 1, 0]), clip=0.2)
    # token 1: unclipped (0.9-1)^2 = 0.01, clipped to 0.7: 0.09 -> 0.09; token 2: 0.05^2 both ways = 0.0025
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.0025) / 2, abs=1e-12)


def test_kl_penalty_per_token_with_the_score_on_the_last_real_token():
    from tunesmith.methods.ppo import kl_penalized_rewards

    logprobs = t64([-1.0, -2.0, -0.5, -3.0], [-0.2, -5.0, -5.0, -5.0])
    ref_logprobs = t64([-1.5, -1.0, -0.5, -9.0], [-0.4, -1.0, -1.0, -1.0])
    mask = t64([1, 1, 1, 0], [1, 0, 0, 0])  # the second reply is its end-of-turn token alone
    rewards = kl_penalized_rewards(t64(2.0, -1.0), logprobs, ref_logprobs, mask, kl_coef=0.1)
    # row 1: -0.1 * (0.5, -1.0, 0.0) and the score 2.0 on token 3; row 2: -0.1 * 0.2 - 1.0 on its only token
    assert torch.allclose(rewards, t64([-0.05, 0.1, 2.0, 0.0], [-1.02, 0.0, 0.0, 0.0]), rtol=0, atol=1e-12)


def test_whitened_advantages_have_mean_zero_and_unit_variance_over_real_tokens():
    from tunesmith.methods.ppo import whiten

    out = whiten(t64([1.0, 2.0, 3.0, 100.0]), t64([1, 1, 1, 0]), eps=0.0)
    assert torch.allclose(out, t64([-1.0, 0.0, 1.0, 0.0]), rtol=0, atol=1e-12)  # mean 2, unbiased variance 1


def test_adaptive_kl_coefficient_moves_towards_the_target():
    from tunesmith.methods.ppo import AdaptiveKL

    above = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert above.update(kl=12.0, responses=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped to 0.2
    assert above.update(kl=6.6, responses=10) == pytest.approx(0.102 * (1 + 0.1 * 0.1))  # 10% too much
    below = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert below.update(kl=3.0, responses=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # -0.5 clipped to -0.2
    assert below.update(kl=6.0, responses=10) == pytest.approx(0.098)  # on target: unchanged


# ----------------------------------------------------------------------------------------------- prompts


def test_prompts_come_from_every_record_type_with_the_generation_prompt(tmp_path, tokenizer):
    from tunesmith.data import prepare_data
    from tunesmith.methods.ppo import encode_prompts
    from tunesmith.methods.preference import chat_ids

    cases = {
        "preference": ({"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit\n\nAssistant:",
                        "chosen": " Apple", "rejected": " Rock"},
                       [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Name a fruit"}]),
        "chat": ({"messages": [{"role": "user", "content": "Name a river"}, {"role": "assistant", "content": "Nile"}]},
                 [{"role": "user", "content": "Name a river"}]),
        "instruction": ({"instruction": "Name a stone", "input": "one word", "output": "granite"},
                        [{"role": "user", "content": "Name a stone\n\none word"}]),
        "text": ({"text": "Name a cloud"}, [{"role": "user", "content": "Name a cloud"}]),
    }
    for kind, (row, messages) in cases.items():
        path = write_jsonl(tmp_path / f"{kind}.jsonl", [row, {**row}])
        recipe = make_recipe(tmp_path, "unused", path, {"reward_function": "m:f"}, name=kind,
                             data={"validation_fraction": 0.0, "format": kind}, check_files=False)
        rows = encode_prompts(prepare_data(recipe.data, 7), tokenizer, recipe).train
        assert rows[0].prompt == messages, kind
        assert rows[0].input_ids == chat_ids(tokenizer, messages, add_generation_prompt=True), kind
        assert tokenizer.decode(rows[0].input_ids).endswith("<|im_start|>assistant\n"), kind
        assert rows[0].trained_tokens == 0


def test_a_prompt_too_long_for_the_reply_budget_loses_its_start_or_is_rejected(tmp_path, tokenizer):
    from tunesmith.data import prepare_data
    from tunesmith.methods.ppo import encode_prompts

    long = " ".join(WORDS * 6)
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "short question"}, {"text": long},
                                              {"text": f"\n\nHuman: {long}\n\nAssistant: ok\n\nHuman: and now?"}])
    recipe = make_recipe(tmp_path, "unused", path, {"reward_function": "m:f", "max_completion_length": 16},
                         data={"validation_fraction": 0.0}, check_files=False, max_seq_len=64)
    out = encode_prompts(prepare_data(recipe.data, 7), tokenizer, recipe)
    kept = [r.prompt for r in out.train]
    assert kept[0] == [{"role": "user", "content": "short question"}] and not out.train[0].truncated
    assert len(kept[1]) == 1 and long.endswith(kept[1][0]["content"]) and len(kept[1][0]["content"]) < len(long)
    assert kept[2] == [{"role": "user", "content": "and now?"}]  # whole turns go first
    assert all(len(r.input_ids) <= 64 - 16 for r in out.train) and out.train[1].truncated and out.train[2].truncated
    assert out.rejects == []
    tight = make_recipe(tmp_path, "unused", path, {"reward_function": "m:f", "max_completion_length": 40},
                        data={"validation_fraction": 0.0}, check_files=False, max_seq_len=64)
    out = encode_prompts(prepare_data(tight.data, 7), tokenizer, tight)  # 24 tokens: not even the template fits
    assert out.train == [] and [r["line"] for r in out.rejects] == [1, 2, 3]
    assert "prompt too long: not even its last turn fits in train.max_seq_len - method.max_completion_length = 24" \
        in out.rejects[0]["reason"]


# ----------------------------------------------------------------------------------------------- the policy


def make_recipe(tmp_path, model_dir, data_path, method, name="run", data=None, check_files=True, **train):
    settings = {"batch_size": 8, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 96, "log_every": 1,
                "seed": 7, "precision": "fp32", **train}
    return parse_recipe({"model": {"name": str(model_dir)},
                         "data": {"train": str(data_path), "validation_fraction": 0.0, "check": {"enabled": False},
                                  **(data or {})},
                         "method": {"name": "ppo", "temperature": 0.05, "max_completion_length": 3, **method},
                         "train": settings, "output": {"dir": str(tmp_path / name)}}, check_files=check_files)


def prompt_file(tmp_path, n=30):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"text": f"Tell me about the {w} number {i}."}
                                                    for i, w in enumerate((WORDS * 3)[:n])])


@pytest.mark.parametrize("adapter", ["lora", "prompt", "full"])
def test_rollout_logprobs_are_generations_and_the_first_ratio_is_one(tmp_path, tiny_model_dir, tokenizer, adapter):
    from tunesmith.model import ModelSource
    from tunesmith.methods.ppo import build_policy, encode_prompts, left_pad
    from tunesmith.data import prepare_data

    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "Hi"}, {"text": "Tell me about the apple and the river"},
                                              {"text": "Why?"}, {"text": "Name a stone"}])
    recipe = make_recipe(tmp_path, tiny_model_dir, path, {"reward_function": "m:f", "adapter": adapter})
    job = types.SimpleNamespace(recipe=recipe, source=ModelSource(tiny_model_dir), precision="fp32")
    policy = build_policy(job, recipe.method)
    rows = encode_prompts(prepare_data(recipe.data, 7), tokenizer, recipe).train
    query, query_mask = left_pad([r.input_ids for r in rows], tokenizer.pad_token_id, policy.device)
    assert (query_mask[:, 0] == 0).any()  # prompts of different lengths: some are padded on the left
    policy.model.eval()
    with torch.no_grad():
        out = policy.model.generate(input_ids=query, attention_mask=query_mask, do_sample=False, max_new_tokens=3,
                                    output_logits=True, return_dict_in_generate=True, pad_token_id=2)
    response = out.sequences[:, query.shape[1]:]
    generated = torch.stack(out.logits, 1).float().div(0.05).log_softmax(-1)
    expected = generated.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        logprobs, _, values = policy.forward(query, query_mask, response)
        policy.model.train()  # updates run in train mode: dropout is off, so nothing changes
        again, _, _ = policy.forward(query, query_mask, response)
        reference, _, _ = policy.forward(query, query_mask, response, with_values=False, reference=True)
    assert torch.allclose(logprobs, expected, atol=1e-4)  # left padding, positions and the prompt-tuning hook agree
    assert torch.equal(again, logprobs)  # the first update's ratio is exactly 1
    # the reference: a fresh LoRA disabled, a full model's frozen copy = the start; prompt tuning's = the bare base
    assert torch.equal(reference, logprobs) == (adapter != "prompt")
    assert torch.equal(values, torch.zeros_like(values))  # the value head starts at 0


def test_recipe_errors_name_the_fields(tmp_path, tiny_model_dir):
    path = prompt_file(tmp_path)
    with pytest.raises(RecipeError) as both:
        make_recipe(tmp_path, tiny_model_dir, path, {"reward_function": "m:f", "reward_model": str(tmp_path)})
    assert "`method.reward_model` or `method.reward_function`, not both" in str(both.value)
    with pytest.raises(RecipeError) as neither:
        make_recipe(tmp_path, tiny_model_dir, path, {})
    assert "method.reward_model" in str(neither.value) and "method.reward_function" in str(neither.value)
    with pytest.raises(RecipeError) as train:  # at load (and `tunesmith validate`), before anything is loaded
        make_recipe(tmp_path, tiny_model_dir, path, {"reward_function": "m:f", "mini_batch_size": 16,
                                                     "max_completion_length": 96},
                    gradient_accumulation=2, padding_free=True)
    assert train.value.problems == [
        "`train.padding_free`: true can't train `method: ppo` — rollouts are padded batches; set "
        "train.padding_free=false",
        "`method.max_completion_length`: 96 leaves no room for the prompt in train.max_seq_len=96; lower it or "
        "raise train.max_seq_len",
        "`train.gradient_accumulation`: PPO accumulates by itself (each update covers `method.mini_batch_size` "
        "replies in passes of `train.batch_size`); leave it at 1",
        "`method.mini_batch_size`: 16 is more than the 8 replies of a step (method.rollout_batch_size, default "
        "train.batch_size)"]
    recipe = make_recipe(tmp_path, tiny_model_dir, path, {"reward_function": "no_such_module_xyz:f"}, name="bad")
    with pytest.raises(RecipeError, match="`method.reward_function`: can't load 'no_such_module_xyz:f'"):
        train_run(recipe, echo=lambda s: None)


# ----------------------------------------------------------------------------------------------- end to end

NEAR_YES = '''
from safetensors.torch import load_file
from transformers import AutoTokenizer

MODEL = {model!r}
EMBED = load_file(MODEL + "/model.safetensors")["model.embed_tokens.weight"]
TOKENIZER = AutoTokenizer.from_pretrained(MODEL)
(WORD,) = TOKENIZER("yes", add_special_tokens=False)["input_ids"]


def near_yes(prompts, responses):
    """Mean over a reply's tokens of its embedding's projection on "yes" (1 for "yes" itself, ~0 at random)."""
    target = EMBED[WORD]
    out = []
    for text in responses:
        ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
        out.append(float((EMBED[ids] @ target).mean() / (target @ target)) if ids else 0.0)
    return out
'''


def test_ppo_raises_a_toy_reward_with_bounded_kl_training_only_the_adapter(tmp_path, tiny_model_dir):
    """The toy reward is a bag-of-words reward model: how close each reply token is to "yes" in the tiny model's
    own embedding space. A random 49k-vocabulary model never says a chosen word, so counting one gives no signal;
    this reward is dense, and a policy that steers its hidden state towards "yes" earns more of it. The tiny model's
    logits span about ±0.6, so it samples at temperature 0.05 (at 1 it is uniform over 49k tokens)."""
    from safetensors.torch import load_file

    from tunesmith.generate import generate, load_run

    reward_file = tmp_path / "near_yes.py"
    reward_file.write_text(NEAR_YES.format(model=str(tiny_model_dir)))
    seen = {}
    recipe = make_recipe(tmp_path, tiny_model_dir, prompt_file(tmp_path),
                         {"reward_function": f"{reward_file}:near_yes", "kl_coef": 0.02, "ppo_epochs": 2},
                         batch_size=16, max_steps=18, scheduler="constant", log_every=6)
    manifest = train_run(recipe, callbacks=[snapshots(seen)], echo=lambda s: None)

    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, 19)) and all(set(METRICS) <= set(r) for r in rows)
    reward = [r["reward"] for r in rows]
    kl = [r["kl"] for r in rows]
    first, last = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    print(f"reward first 3 steps {first:.3f}, last 5 {last:.3f}; kl max {max(kl):.2f}, last 5 {sum(kl[-5:]) / 5:.2f}")
    assert last > first + 0.1  # measured 0.04 -> 0.26
    assert kl[0] == 0.0 and max(kl) < 10.0  # the first rollout is the reference's own; measured at most ~6
    assert all(r["response_length"] == 3 for r in rows) and all(r["kl_coef"] == 0.02 for r in rows)
    assert manifest["losses"]["reward_first"] == reward[0] and manifest["losses"]["reward_last"] == reward[-1]
    assert manifest["training"]["trained_tokens"] == 18 * 16 * 3

    trainable = seen["trainable"]
    assert trainable and all("lora_" in n for n in trainable)
    assert [n for n in trainable if torch.equal(seen["before"][n], seen["after"][n])] == []
    frozen = [n for n in seen["before"] if n not in trainable]
    assert frozen and [n for n in frozen if not torch.equal(seen["before"][n], seen["after"][n])] == []
    head = load_file(tmp_path / "run" / "value_head.safetensors")
    assert head["weight"].shape == (1, 32) and head["weight"].abs().sum() > 0  # it started at 0
    loaded = load_run(tmp_path / "run")  # an ordinary causal-LM run: generate, chat, eval and export read it
    assert manifest["saved"] == "adapter" and len(generate(loaded, [[{"role": "user", "content": "hi"}]], 3)) == 1


def snapshots(seen: dict):
    """A callback keeping the parameters at train begin and end and the names of the trainable ones."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    return Snapshots()


def test_from_an_sft_run_the_reference_is_that_run_and_the_saved_adapter_loads(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tunesmith.generate import load_run

    rows = [{"messages": [{"role": "user", "content": f"Tell me about the {w}."},
                          {"role": "assistant", "content": f"The {w} is nice."}]} for w in WORDS]
    sft = parse_recipe({"model": {"name": str(tiny_model_dir)},
                        "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)), "validation_fraction": 0.0,
                                 "check": {"enabled": False}},
                        "method": {"name": "sft"}, "train": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 4,
                                                             "max_seq_len": 48, "precision": "fp32"},
                        "eval": {"loss_before": False}, "output": {"dir": str(tmp_path / "sft")}})
    train_run(sft, echo=lambda _: None)
    reward_file = tmp_path / "length.py"
    reward_file.write_text("def short(prompts, responses):\n    return [-len(r) / 10 for r in responses]\n")
    recipe = make_recipe(tmp_path, tiny_model_dir, tmp_path / "sft.jsonl",
                         {"reward_function": f"{reward_file}:short", "policy": str(tmp_path / "sft"),
                          "ppo_epochs": 1, "adaptive_kl": True, "target_kl": 0.5, "kl_horizon": 40})
    manifest = train_run(recipe, echo=lambda _: None)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    # the first rollout's policy is the SFT adapter itself: with the base as reference (adapter disabled) the
    # 2-step SFT adapter would already differ from it
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0
    coef = 0.05 * (1 + max(min(rows[0]["kl"] / 0.5 - 1, 0.2), -0.2) * 8 / 40)  # adaptive: 0 KL lowers it by 4%
    assert rows[1]["kl_coef"] == pytest.approx(coef) and coef == pytest.approx(0.048)
    saved = tmp_path / "run" / "adapter"
    assert manifest["saved"] == "adapter" and not (saved / "ref").exists()  # the frozen reference isn't saved
    before, after = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors"), \
        load_file(saved / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 16
    assert load_run(tmp_path / "run").model.active_adapter == "default"


def test_full_fine_tuning_keeps_a_frozen_copy_as_the_reference_and_trains_every_weight(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    seen = {}
    reward_file = tmp_path / "length.py"
    reward_file.write_text("def short(prompts, responses):\n    return [-len(r) / 10 for r in responses]\n")
    recipe = make_recipe(tmp_path, tiny_model_dir, prompt_file(tmp_path, 8),
                         {"reward_function": f"{reward_file}:short", "adapter": "full", "ppo_epochs": 1,
                          "missing_eos_penalty": 1.0}, max_steps=2, learning_rate=1e-2)
    manifest = train_run(recipe, callbacks=[snapshots(seen)], echo=lambda _: None)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0  # the reference stays where the policy started
    assert seen["trainable"] == set(seen["before"])
    assert [n for n in seen["trainable"] if torch.equal(seen["before"][n], seen["after"][n])] == []
    assert manifest["saved"] == "model" and (tmp_path / "run" / "model" / "config.json").exists()
    assert load_file(tmp_path / "run" / "value_head.safetensors")["weight"].abs().sum() > 0


def test_scores_must_be_one_finite_number_per_reply():
    from tunesmith.errors import RunError
    from tunesmith.methods.online import PromptRow
    from tunesmith.methods.ppo import checked_scores

    rows = [PromptRow([1], [-100], False, 1, prompt=[{"role": "user", "content": "q"}])] * 2
    assert checked_scores(lambda p, r: [len(x) for x in r], rows, ["a", "bcd"]) == [1.0, 3.0]
    for bad, words in ((lambda p, r: "xy", "did not return a list of numbers"),
                       (lambda p, r: [1.0], "1 scores for 2 replies"),
                       (lambda p, r: [1.0, float("nan")], "not a finite number")):
        with pytest.raises(RunError, match=words):
            checked_scores(bad, rows, ["a", "b"])


def test_reward_model_runs_score_the_replies(tmp_path, tiny_model_dir):
    from test_reward import make_recipe as reward_recipe
    from tunesmith.methods.ppo import reward_callable
    from tunesmith.methods.reward import load_reward_model

    train_run(reward_recipe(tmp_path, tiny_model_dir, max_steps=2), echo=lambda _: None)
    recipe = make_recipe(tmp_path, tiny_model_dir, tmp_path / "rm.jsonl",
                         {"reward_model": str(tmp_path / "rm"), "ppo_epochs": 1}, max_steps=1, batch_size=4)
    prompts = [[{"role": "user", "content": "Tell me about rivers."}]] * 2
    expected = load_reward_model(tmp_path / "rm").score(prompts, ["Yes, gladly.", "no"])
    assert reward_callable(recipe.method)(prompts, ["Yes, gladly.", "no"]) == expected and expected[0] != expected[1]
    manifest = train_run(recipe, echo=lambda _: None)  # preference rows: their prompts are sampled for
    assert manifest["method"] == "ppo" and manifest["training"]["steps"] == 1
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert row["reward"] == manifest["losses"]["reward_first"] and row["kl"] == 0.0


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    """4 steps straight vs 4 steps cut after step 3 (checkpoint at 2) and resumed: the same rewards, weights and
    value head — the checkpoint carries optimizer, schedule, KL coefficient, random states and prompt order."""
    from safetensors.torch import load_file

    from tunesmith.methods import ppo

    reward_file = tmp_path / "length.py"
    reward_file.write_text("def short(prompts, responses):\n    return [-len(r) / 10 for r in responses]\n")
    method = {"reward_function": f"{reward_file}:short", "ppo_epochs": 1, "adaptive_kl": True, "target_kl": 0.5,
              "temperature": 1.0}
    settings = dict(batch_size=4, max_steps=4, save_every=2, scheduler="cosine", warmup_steps=1)
    data = prompt_file(tmp_path, 10)  # 4 prompts a step: the shuffle runs out mid-run, so its order is state too
    train_run(make_recipe(tmp_path, tiny_model_dir, data, method, name="straight", **settings), echo=lambda _: None)

    real_update, calls = ppo.update, []

    def cut_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(ppo, "update", cut_at_step_3)
    recipe = make_recipe(tmp_path, tiny_model_dir, data, method, name="cut", **settings)
    with pytest.raises(RuntimeError, match="power cut"):
        train_run(recipe, echo=lambda _: None)
    cut = tmp_path / "cut"
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["checkpoint-2"]
    monkeypatch.setattr(ppo, "update", real_update)
    plant_pickle(cut / "checkpoints" / "checkpoint-2" / ppo.LEGACY_STATE, tmp_path / "pwned")  # beside the state
    manifest = train_run(recipe, resume=True, echo=lambda _: None)
    assert not (tmp_path / "pwned").exists()  # never unpickled: the safetensors and JSON state were used

    straight = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "reward" in r]
    resumed = [r for r in read_metrics(cut / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # step 3's first try left no row behind
    for a, b in zip(straight, resumed):  # bit for bit: every logged number is the same float
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}
    assert straight[3]["kl_coef"] != 0.05  # the adaptive coefficient moved, and the checkpoint carried it
    for name in ("adapter/adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest["training"]["steps"] == 4 and manifest["training"]["resumed"] is True
    assert manifest["training"]["trained_tokens"] == sum(r["response_length"] * 4 for r in straight)


def plant_pickle(path, marker):
    """A pickle that writes `marker` when it is unpickled (the attack a torch.load(weights_only=False) lets in)."""
    import pathlib
    import pickle

    class Plant:
        def __reduce__(self):
            return pathlib.Path.write_text, (marker, "the planted pickle ran")

    path.write_bytes(pickle.dumps(Plant()))


def test_resume_refuses_a_missing_foreign_damaged_or_pickled_checkpoint(tmp_path, tiny_model_dir):
    import pickle
    import shutil

    from tunesmith.methods.ppo import (CHECKPOINT_STATE, CHECKPOINT_TENSORS, LEGACY_STATE, read_state,
                                       write_state)

    reward_file = tmp_path / "length.py"
    reward_file.write_text("def short(prompts, responses):\n    return [-len(r) / 10 for r in responses]\n")
    recipe = make_recipe(tmp_path, tiny_model_dir, prompt_file(tmp_path, 8), {"reward_function": f"{reward_file}:short"},
                         max_steps=2, save_every=1)
    train_run(recipe, echo=lambda _: None)
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in folder.iterdir()) == [CHECKPOINT_STATE, CHECKPOINT_TENSORS]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no staging folder left behind
    state = read_state(folder)
    assert state["progress"]["step"] == 1 and isinstance(state["optimizer"]["state"], dict)
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])  # parameter indices stay numbers
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    state["trainable"]["model.no_such_layer.weight"] = torch.zeros(1)  # a checkpoint of some other model
    write_state(folder, state)
    with pytest.raises(RunError, match="the checkpoint has weights this model lacks \\(model.no_such_layer.weight"):
        train_run(recipe, resume=True, echo=lambda _: None)

    (folder / CHECKPOINT_STATE).write_text('{"format": 1, "state": {"trai')  # cut short
    with pytest.raises(RunError, match="checkpoint-1: the PPO checkpoint can't be read"):
        train_run(recipe, resume=True, echo=lambda _: None)

    marker, proof = tmp_path / "pwned", tmp_path / "proof"
    plant_pickle(folder / LEGACY_STATE, marker)  # where older versions kept their state
    plant_pickle(tmp_path / "live.pkl", proof)
    pickle.loads((tmp_path / "live.pkl").read_bytes())  # the plant is live: unpickling it runs its code
    assert proof.read_text() == "the planted pickle ran"
    for name in (CHECKPOINT_STATE, CHECKPOINT_TENSORS):
        (folder / name).unlink()
    with pytest.raises(RunError, match="ppo_state.pt: a PPO checkpoint in the pickle format of an older tunesmith, "
                                       "which is not loaded"):
        train_run(recipe, resume=True, echo=lambda _: None)
    assert not marker.exists()

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(RunError, match="no PPO checkpoint to resume from"):
        train_run(recipe, resume=True, echo=lambda _: None)
