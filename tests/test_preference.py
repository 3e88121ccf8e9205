"""Alignment methods on a tiny random Llama with LoRA: dpo (sigmoid, ipo), kto, orpo, grpo and rloo each train two
steps that change every trainable parameter and no frozen one, save an adapter that reloads to the same logits,
and log TRL's metrics; plus the data conversion by hand, prompt truncation, and the recipe errors."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import write_jsonl
from test_train import make_recipe, probe_logits, snapshots
from tunesmith.artifacts import read_metrics
from tunesmith.errors import RecipeError
from tunesmith.recipe import parse_recipe
from tunesmith.train import train_run

PAIRS = [{"prompt": f"\n\nHuman: What is {i} plus {i}?\n\nAssistant:", "chosen": f" {i} plus {i} is {2 * i}.",
          "rejected": f" No idea, maybe {i + 3}."} for i in range(4)]


def reply_length(prompts, responses):
    """A reward function (tunesmith's signature): longer replies score higher."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    return [float(len(r)) for r in responses]


def recipe_for(tmp_path, model_dir, method: dict, rows=PAIRS, **train):
    return make_recipe(tmp_path, model_dir, rows, method={"adapter": "lora", "lora": {"r": 4}, **method},
                       data={"check": {"enabled": False}, "validation_fraction": 0, "format": "preference"},
                       eval={"loss_before": False}, max_seq_len=48, batch_size=2, **train)


ONLINE = {"reward_function": "test_preference:reply_length", "num_generations": 2, "max_completion_length": 6}
CASES = {"dpo-sigmoid": {"name": "dpo", "loss_type": "sigmoid"}, "dpo-ipo": {"name": "dpo", "loss_type": "ipo"},
         "kto": {"name": "kto"}, "orpo": {"name": "orpo"}, "grpo": {"name": "grpo", **ONLINE},
         "rloo": {"name": "rloo", **ONLINE}}


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_trains_every_lora_weight_and_reloads(tmp_path, tiny_model_dir, tokenizer, case):
    from accelerate.utils import extract_model_from_parallel

    from tunesmith.generate import load_run

    seen = {}
    manifest = train_run(recipe_for(tmp_path, tiny_model_dir, CASES[case]), callbacks=[snapshots(seen)],
                         echo=lambda s: None)
    trainable, before, after = seen["trainable"], seen["before"], seen["after"]
    assert manifest["training"]["steps"] == 2 and manifest["saved"] == "adapter"
    assert len(trainable) == 2 * 7 * 2 and all(".default." in n for n in trainable), sorted(trainable)
    assert [n for n in trainable if torch.equal(before[n], after[n])] == []
    assert [n for n in before if n not in trainable and not torch.equal(before[n], after[n])] == []

    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                  "adapter_model.safetensors"]  # no "ref" copy
    trained = probe_logits(extract_model_from_parallel(seen["model"], keep_fp32_wrapper=False), tokenizer)
    assert torch.allclose(probe_logits(load_run(run).model, tokenizer), trained, atol=1e-5)
    assert (probe_logits(load_run(run, base=True).model, tokenizer) - trained).abs().max() > 1e-5

    metrics = [row for row in read_metrics(run / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in metrics] == [1, 2]
    first = metrics[0]
    if case.startswith("dpo"):  # step 1: the policy is its reference, so every log-ratio is 0
        for row in metrics:
            for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
                assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
            assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-6)
        assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
        expected = math.log(2) if case == "dpo-sigmoid" else (1 / (2 * 0.1)) ** 2  # IPO: (0 - 1/(2β))²
        assert first["loss"] == pytest.approx(expected, rel=1e-4)
        assert metrics[1]["rewards/margins"] > 0  # one step on these pairs already prefers the chosen replies
    elif case == "kto":  # KL clamps at 0 and every reward is 0 at step 1: each row's loss is 1 - σ(0)
        assert first["loss"] == pytest.approx(0.5, rel=1e-4) and first["kl"] == 0
    elif case == "orpo":
        assert {"rewards/chosen", "rewards/accuracies", "nll_loss", "log_odds_ratio"} <= set(first)
    else:  # online: the reward function scored each sampled reply (its length in characters)
        assert first["rewards/reply_length/mean"] > 0 and first["completions/max_length"] <= 6
        assert manifest["losses"]["reward_first"] == first["reward"]
        assert 0 < manifest["training"]["trained_tokens"] <= 2 * 2 * 6  # 2 steps × 2 replies × ≤ 6 tokens
    online = case in ("grpo", "rloo")  # no loss to measure without sampling; offline: the method's own loss
    assert (manifest["losses"]["train_after"] is None) == online
    assert online or math.isfinite(manifest["losses"]["train_after"])


def test_dpo_trains_an_sft_runs_adapter_further_against_it(tmp_path, tiny_model_dir, chat_rows, tokenizer):
    from accelerate.utils import extract_model_from_parallel
    from safetensors.torch import load_file

    from tunesmith.generate import load_run

    (tmp_path / "sft").mkdir()
    (tmp_path / "dpo").mkdir()
    sft = make_recipe(tmp_path / "sft", tiny_model_dir, chat_rows[:8], method={"adapter": "lora", "lora": {"r": 4}},
                      data={"check": {"enabled": False}, "validation_fraction": 0}, eval={"loss_before": False},
                      max_seq_len=48)
    train_run(sft, echo=lambda s: None)
    policy = str(tmp_path / "sft" / "run")
    with pytest.raises(RecipeError) as err:  # the adapter is trained further, so its shape can't change
        train_run(recipe_for(tmp_path / "dpo", tiny_model_dir, {"name": "dpo", "policy": policy, "lora": {"r": 8}},
                             name="bad"), echo=lambda s: None)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("`method.lora`: {'r': 8, ") \
        and "differs from the policy run's {'r': 4, " in err.value.problems[0]

    seen = {}
    train_run(recipe_for(tmp_path / "dpo", tiny_model_dir, {"name": "dpo", "policy": policy}),
              callbacks=[snapshots(seen)], echo=lambda s: None)
    sft_weights = load_file(tmp_path / "sft" / "run" / "adapter" / "adapter_model.safetensors")
    start = {n.replace(".default", ""): seen["before"][n] for n in seen["trainable"]}
    assert start.keys() == sft_weights.keys() and all(torch.equal(start[k], sft_weights[k]) for k in start)
    assert any(k.endswith("lora_B.weight") and sft_weights[k].abs().max() > 0 for k in sft_weights)
    assert [n for n in seen["trainable"] if torch.equal(seen["before"][n], seen["after"][n])] == []
    first = next(row for row in read_metrics(tmp_path / "dpo" / "run" / "metrics.jsonl") if "loss" in row)
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0  # the reference is the SFT policy
    trained = probe_logits(extract_model_from_parallel(seen["model"], keep_fp32_wrapper=False), tokenizer)
    assert torch.allclose(probe_logits(load_run(tmp_path / "dpo" / "run").model, tokenizer), trained, atol=1e-5)


# ----------------------------------------------------------------------------------------------- data


def _rows(tmp_path, tokenizer, rows, method: str = "dpo", fmt: str = "preference", max_seq_len: int = 48, **data):
    from tunesmith.data import prepare_data
    from tunesmith.methods import REGISTRY

    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = parse_recipe({"data": {"train": str(tmp_path / "train.jsonl"), "validation_fraction": 0, "format": fmt,
                                    **data},
                           "method": {"name": method, **(ONLINE if method in ("grpo", "rloo") else {})},
                           "train": {"max_seq_len": max_seq_len}})
    prepared = prepare_data(recipe.data, 0, REGISTRY[method].record_types)
    return REGISTRY[method].encode(prepared, tokenizer, recipe)


HH = {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant:",
      "chosen": " 2+2 is 4.", "rejected": " It is 5."}


def test_an_hh_rlhf_row_reaches_trl_as_chat_turns(tmp_path, tokenizer):
    from tunesmith.methods.common import to_dataset

    encoded = _rows(tmp_path, tokenizer, [HH], max_seq_len=512)
    expected = {"prompt": [{"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello! How can I help?"},
                           {"role": "user", "content": "What is 2+2?"}],
                "chosen": [{"role": "assistant", "content": "2+2 is 4."}],
                "rejected": [{"role": "assistant", "content": "It is 5."}]}
    assert to_dataset(encoded.train)[0] == expected  # exactly what DPOTrainer / ORPOTrainer receive
    row = encoded.train[0]
    assert not row.truncated and encoded.rejects == []
    # the two sequences the model runs, and their replies (with the end-of-turn) as the trained tokens
    chosen = tokenizer.apply_chat_template(expected["prompt"] + expected["chosen"], tokenize=False)
    rejected = tokenizer.apply_chat_template(expected["prompt"] + expected["rejected"], tokenize=False)
    assert tokenizer.decode(row.input_ids) == chosen + rejected
    trained = tokenizer.decode([t for t in row.labels if t != -100])
    assert trained == "2+2 is 4.<|im_end|>\nIt is 5.<|im_end|>\n"


def test_kto_rows_come_from_pairs_or_from_labelled_rows(tmp_path, tokenizer):
    from tunesmith.methods.common import to_dataset

    encoded = _rows(tmp_path, tokenizer, [HH], "kto", max_seq_len=512)
    got = sorted((r["completion"][0]["content"], r["label"]) for r in to_dataset(encoded.train))
    assert got == [("2+2 is 4.", True), ("It is 5.", False)]
    assert to_dataset(encoded.train)[0]["prompt"][-1] == {"role": "user", "content": "What is 2+2?"}

    rows = [{"prompt": "Say hi", "completion": "Hi!", "thumbs_up": True},
            {"prompt": "Say bye", "completion": "No.", "thumbs_up": "false"},
            {"prompt": "Say what", "completion": "What?"}]
    encoded = _rows(tmp_path, tokenizer, rows, "kto", "instruction", max_seq_len=512,
                    columns={"instruction": "prompt", "output": "completion", "label": "thumbs_up"})
    assert sorted((r.prompt[-1]["content"], r.completion[0]["content"], r.label) for r in encoded.train) == [
        ("Say bye", "No.", False), ("Say hi", "Hi!", True)]
    assert [(r["line"], r["reason"].split(" (")[0]) for r in encoded.rejects] == [
        (3, "missing field: KTO needs a boolean 'thumbs_up' on instruction rows")]


def test_long_prompts_lose_their_start_and_the_replies_survive(tmp_path, tokenizer):
    from tunesmith.methods.preference import chat_ids

    long_first = {**HH, "prompt": "\n\nHuman: " + "Tell me a long story about dragons. " * 8 + HH["prompt"][2:]}
    long_last = {**HH, "prompt": "\n\nHuman: " + " ".join(f"w{i}" for i in range(60)) + "\n\nAssistant:"}
    too_long = {**HH, "chosen": " " + "four " * 80}
    encoded = _rows(tmp_path, tokenizer, [long_first, long_last, too_long], max_seq_len=64)
    first, last = encoded.train
    assert first.truncated and first.prompt == [{"role": "user", "content": "What is 2+2?"}]  # whole turns dropped
    kept = last.prompt[0]["content"]
    assert last.truncated and len(last.prompt) == 1 and kept.endswith("w58 w59") and len(kept) < 200
    for row in (first, last):
        assert row.chosen == [{"role": "assistant", "content": "2+2 is 4."}]
        longest = max(len(chat_ids(tokenizer, row.prompt + reply)) for reply in (row.chosen, row.rejected))
        assert longest <= 64
    # one more word of the last turn would not have fitted
    assert len(chat_ids(tokenizer, [{"role": "user", "content": "w" + kept}] + last.chosen)) > 60
    assert [r["line"] for r in encoded.rejects] == [3] and encoded.rejects[0]["reason"].startswith(
        "replies too long: with train.max_seq_len=64 no room is left for the prompt")


def test_online_prompts_come_from_chat_rows_and_leave_room_for_the_reply(tmp_path, tokenizer):
    chats = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Count" + " one two" * 40},
                           {"role": "assistant", "content": "x"}]}]
    encoded = _rows(tmp_path, tokenizer, chats, "grpo", "chat", max_seq_len=48)
    (row,) = encoded.train
    assert row.truncated and [m["role"] for m in row.prompt] == ["user"]
    assert row.prompt[0]["content"].endswith("one two") and len(row.input_ids) <= 48 - 6
    assert row.trained_tokens == 0  # replies are sampled during training, not read from the data


# ----------------------------------------------------------------------------------------------- recipe


def _method_problems(tmp_path, method: dict) -> list[str]:
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(RecipeError) as err:
        parse_recipe({"data": {"train": str(tmp_path / "train.jsonl")}, "method": method})
    return err.value.problems


def test_dpo_names_every_loss_trl_offers_when_one_is_unknown(tmp_path):
    from tunesmith.methods.preference import DPO_LOSS_TYPES

    allowed = ", ".join(DPO_LOSS_TYPES)
    assert _method_problems(tmp_path, {"name": "dpo", "loss_type": "sigmod"}) == [
        f"`method.loss_type`: 'sigmod' — not a DPO loss TRL offers; choose one (or a list weighted by "
        f"`loss_weights`) of: {allowed}; did you mean 'sigmoid'?"]
    assert _method_problems(tmp_path, {"name": "dpo", "loss_type": ["sigmoid", "ipox"]}) == [
        f"`method.loss_type`: ['sigmoid', 'ipox'] — 'ipox' is not a DPO loss TRL offers; choose one (or a list "
        f"weighted by `loss_weights`) of: {allowed}; did you mean 'ipo'?"]
    recipe = parse_recipe({"data": {"train": str(tmp_path / "train.jsonl")},
                           "method": {"name": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5]}})
    assert recipe.method.loss_type == ["sigmoid", "sft"]


def test_our_loss_lists_are_the_installed_trls(tmp_path):
    import re

    from trl import DPOConfig, GRPOConfig, KTOConfig

    from tunesmith.methods.online import GRPO_LOSS_TYPES, GRPOParams
    from tunesmith.methods.preference import DPO_LOSS_TYPES, KTOParams

    def offered(config, start: str) -> tuple[str, ...]:
        text = config.__dataclass_fields__["loss_type"].metadata["help"].split(start, 1)[1]
        return tuple(re.findall(r"'([a-z_]+)'", text.split(". ")[0]))

    assert offered(DPOConfig, "Possible values are: ") == DPO_LOSS_TYPES
    assert offered(GRPOConfig, "Supported values are ") == GRPO_LOSS_TYPES
    assert GRPOParams.model_fields["loss_type"].annotation.__args__ == GRPO_LOSS_TYPES
    assert set(KTOParams.model_fields["loss_type"].annotation.__args__) == set(
        re.findall(r'`"([a-z_]+)"`', KTOConfig.__doc__.split("loss_type (", 1)[1].split("beta (", 1)[0]))


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_online_methods_need_exactly_one_reward(tmp_path, name):
    neither = _method_problems(tmp_path, {"name": name})
    assert neither == ["`method.reward_function`: null — the replies need a reward: set `method.reward_model: RUN` "
                       "(a `method: reward` run) or `method.reward_function: module:function` (or "
                       "path/to/file.py:function)"]
    both = _method_problems(tmp_path, {"name": name, "reward_model": "runs/rm", "reward_function": "m:f"})
    assert both == ["`method.reward_function`: 'm:f' — set `method.reward_model` or `method.reward_function`, "
                    "not both"]


def test_a_reward_function_loads_from_a_file_or_says_why_not(tmp_path):
    from tunesmith.methods.online import RewardFunction, load_reward_function

    (tmp_path / "rewards.py").write_text("def shout(prompts, responses):\n"
                                         "    return [r.count('!') for r in responses]\n")
    reward = RewardFunction("shout", load_reward_function(f"{tmp_path / 'rewards.py'}:shout"))
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    completions = [[{"role": "assistant", "content": "yes!!"}], [{"role": "assistant", "content": "no"}]]
    assert reward(prompts=prompts, completions=completions, completion_ids=[[1, 2], [3]]) == [2.0, 0.0]
    with pytest.raises(RecipeError) as err:
        load_reward_function(f"{tmp_path / 'rewards.py'}:whisper")
    assert err.value.problems == [
        f"`method.reward_function`: can't load '{tmp_path / 'rewards.py'}:whisper' (AttributeError: module "
        "'rewards' has no attribute 'whisper'); give module:function (the module importable from here) or "
        "path/to/file.py:function"]


def test_a_reward_model_must_be_a_reward_run(tmp_path):
    from tunesmith.methods.online import GRPOParams, reward_source

    (tmp_path / "manifest.json").write_text('{"method": "sft"}')
    with pytest.raises(RecipeError) as err:
        reward_source(GRPOParams(reward_model=str(tmp_path)))
    (problem,) = err.value.problems
    assert problem.startswith(f"`method.reward_model`: {tmp_path}: not a reward-model run (method: sft)")
