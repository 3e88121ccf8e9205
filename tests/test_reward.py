"""method: reward — pair encoding by hand, the Bradley-Terry loss by hand, training moves only what trains and
learns a toy preference, scoring reloads the run, starting from an SFT run starts from its merged weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from conftest import epoch_padding, write_jsonl
from test_classify import assert_only_trainable_moved
from tunesmith.data.format import encode_chat, preference_pair
from tunesmith.data.records import Record
from tunesmith.errors import RunError
from tunesmith.recipe import parse_recipe
from tunesmith.train import train_run

TOPICS = ["apples", "rivers", "stones", "clouds", "music", "gardens", "windows", "engines", "paper", "forests",
          "bread", "trains"]


def preference_rows() -> list[dict]:
    """The chosen reply always says 'yes, gladly', the rejected one 'no'."""
    return [{"prompt": f"\n\nHuman: Tell me about {t}.\n\nAssistant:", "chosen": f" Yes, gladly: {t} are nice.",
             "rejected": f" No. {t}."} for t in TOPICS * 2]


def make_recipe(tmp_path, model_dir, method=None, name="rm", rows=None, **train):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows or preference_rows())
    settings = {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 64, "log_every": 1,
                "seed": 3, **train}
    return parse_recipe({"model": {"name": str(model_dir)},
                         "data": {"train": str(path), "format": "preference", "validation_fraction": 0.25,
                                  "check": {"enabled": False}},
                         "method": {"name": "reward", **(method or {})}, "train": settings,
                         "eval": {"loss_rows": 8}, "output": {"dir": str(tmp_path / name)}})


def test_pairs_are_the_chat_template_of_each_conversation_keeping_the_end(tokenizer):
    from tunesmith.methods.reward import conversation_ids

    record = Record("preference", {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and now?\n\nAssistant:",
                                   "chosen": " Fine.", "rejected": " Go away."}, "f.jsonl", 1)
    pair = preference_pair(record)
    assert pair.conversation("chosen") == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                           {"role": "user", "content": "and now?"},
                                           {"role": "assistant", "content": "Fine."}]
    full, _ = encode_chat(tokenizer, pair.conversation("chosen"))
    ids, length = conversation_ids(tokenizer, pair.conversation("chosen"), 10)
    assert length == len(full) and len(full) > 10
    assert ids == full[-10:]  # the reply survives; the start of the conversation goes
    assert tokenizer.decode(ids).rstrip().endswith("Fine.<|im_end|>")


def test_pairs_identical_after_truncation_are_rejected_with_the_reason(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.data import prepare_data
    from tunesmith.methods.reward import encode_pairs

    rows = preference_rows()[:4] + [{"prompt": "Say it.", "chosen": "Same words.", "rejected": "Same words."}]
    recipe = make_recipe(tmp_path, tiny_model_dir, rows=rows)
    data = prepare_data(recipe.data, recipe.train.seed, ("preference",))
    encoded = encode_pairs(data, tokenizer, recipe)
    assert len(encoded.train) + len(encoded.validation) == 4
    assert [r["reason"] for r in encoded.rejects] == ["chosen and rejected are identical"]
    assert all(r.trained_tokens == len(r.input_ids) + len(r.rejected_ids) for r in encoded.train)


def test_pairwise_loss_matches_hand_values():
    from tunesmith.methods.reward import pairwise_loss

    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    plain = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2  # -log σ(1), -log σ(0)
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(plain, abs=1e-6)
    assert pairwise_loss(chosen, rejected, center=0.1).item() == pytest.approx(plain + 0.1 * (1 + 0) / 2, abs=1e-6)


def test_reward_trains_only_what_trains_and_scores_after_reload(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.methods.reward import load_reward_model, score_pairs
    from test_classify import recorder

    callback, seen = recorder(tokenizer, side="left")
    recipe = make_recipe(tmp_path, tiny_model_dir)
    manifest = train_run(recipe, callbacks=[callback], echo=lambda _: None)
    assert manifest["method"] == "reward" and manifest["saved"] == "adapter"
    assert manifest["data"]["train_rows"] == 18 and manifest["data"]["validation_rows"] == 6
    assert_only_trainable_moved(seen)
    assert any("score" in n for n in seen["trainable"])  # the new head trains in full
    assert 0.0 <= manifest["losses"]["validation_accuracy_after"] <= 1.0
    model = load_reward_model(recipe.output.dir)
    prompt = [{"role": "user", "content": "Tell me about apples."}]
    one = model.score([prompt, prompt], ["Yes, gladly: apples are nice.", "No. apples."])
    again = model.score([prompt], ["No. apples."])
    assert one[1] == pytest.approx(again[0], abs=1e-5)  # batching and padding don't change a score
    records = [Record("preference", r, "x", i) for i, r in enumerate(preference_rows()[:3])]
    chosen, rejected = score_pairs(recipe.output.dir, records)
    assert len(chosen) == len(rejected) == 3 and chosen[0] != rejected[0]


def test_reward_learns_a_toy_preference(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, method={"adapter": "full"}, max_steps=30, learning_rate=3e-3,
                         eval_every=30)
    manifest = train_run(recipe, echo=lambda _: None)
    losses = manifest["losses"]
    assert losses["validation_after"] < losses["validation_before"]
    assert losses["validation_accuracy_after"] == 1.0  # 'yes, gladly' over 'no' on every held-out pair
    assert losses["validation_margin_after"] > 0.5


def test_scoring_a_run_that_is_not_a_reward_model_says_so(tmp_path, tiny_model_dir):
    from test_classify import make_recipe as classify_recipe
    from tunesmith.methods.reward import load_reward_model

    recipe = classify_recipe(tmp_path, tiny_model_dir, {"name": "classify"}, name="cls")
    train_run(recipe, echo=lambda _: None)
    with pytest.raises(RunError, match="not a reward-model run"):
        load_reward_model(recipe.output.dir)


def test_reward_model_can_start_from_an_sft_run(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.methods.adapters import merged_run_folder
    from test_classify import recorder

    rows = [{"messages": [{"role": "user", "content": f"Tell me about {t}."},
                          {"role": "assistant", "content": f"{t} are nice."}]} for t in TOPICS]
    sft = parse_recipe({"model": {"name": str(tiny_model_dir)},
                        "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)), "check": {"enabled": False}},
                        "method": {"name": "sft"}, "train": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 4,
                                                             "max_seq_len": 48},
                        "output": {"dir": str(tmp_path / "sft")}})
    train_run(sft, echo=lambda _: None)
    callback, seen = recorder(tokenizer, side="left")
    recipe = make_recipe(tmp_path, tiny_model_dir, method={"start_from": str(tmp_path / "sft")})
    manifest = train_run(recipe, callbacks=[callback], echo=lambda _: None)
    assert manifest["method"] == "reward"
    from transformers import AutoModelForCausalLM

    merged_run_folder(tmp_path / "sft", tmp_path / "merged")
    sft_weights = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    start = {n.split("base_model.model.", 1)[-1].replace(".base_layer", ""): p for n, p in seen["before"].items()}
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(start[layer], sft_weights[layer], atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert not torch.allclose(start[layer], base[layer])  # it really started from the tuned weights


def test_start_from_must_be_a_finished_run(tmp_path, tiny_model_dir):
    from tunesmith.errors import RecipeError

    with pytest.raises(RecipeError, match=r"`method.start_from`: '.*nowhere' is not a finished run folder"):
        make_recipe(tmp_path, tiny_model_dir, method={"start_from": str(tmp_path / "nowhere")})


def test_eval_and_score_a_reward_run(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main
    from tunesmith.evaluation.runner import EvalOptions, evaluate_run
    from tunesmith.methods.reward import load_reward_model

    recipe = make_recipe(tmp_path, tiny_model_dir, method={"adapter": "full"}, max_steps=30, learning_rate=3e-3)
    train_run(recipe, echo=lambda _: None)
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"prompt": "\n\nHuman: Tell me about lamps.\n\nAssistant:", "chosen": " Yes, gladly: lamps are nice.",
         "rejected": " No. lamps."},
        {"prompt": "Tell me about boats.", "chosen": " Yes, gladly: boats are nice.", "rejected": " No. boats."},
        {"prompt": "Tell me about cats.", "chosen": " No. cats.", "rejected": " Yes, gladly: cats are nice."}])
    results = evaluate_run(recipe.output.dir, EvalOptions(data=str(test), name="pairs"), echo=lambda _: None)
    assert results["task"] == "preference" and results["systems"] == ["tuned"]  # base has no reward head
    tuned = results["metrics"]["tuned"]
    assert tuned["pairwise_accuracy"] == pytest.approx(2 / 3)  # the third pair's 'chosen' is the 'no' reply
    low, high = tuned["pairwise_accuracy_ci"]
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0
    model = load_reward_model(recipe.output.dir)
    prompt = [{"role": "user", "content": "Tell me about cats."}]
    good, bad = model.score([prompt, prompt], ["Yes, gladly: cats are nice.", "No. cats."])
    assert tuned["mean_margin"] == pytest.approx(
        sum(e["tuned"]["mean_margin"] for e in map(json.loads, open(f"{results['folder']}/examples.jsonl"))) / 3)
    examples = [json.loads(line) for line in open(f"{results['folder']}/examples.jsonl")]
    assert examples[2]["tuned"]["mean_margin"] == pytest.approx(bad - good, abs=1e-4)
    capsys.readouterr()  # drop the trainer's log lines
    assert main(["score", recipe.output.dir, "--prompt", "Tell me about cats.",
                 "--response", "No. cats.", "--response", "Yes, gladly: cats are nice."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == f"{bad:.4f}" and lines[0].endswith("(#2)")
    assert lines[1].split()[0] == f"{good:.4f}" and lines[1].endswith("(#1)")


def test_eval_refuses_preference_rows_for_an_sft_run_and_score_a_non_reward_run(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main
    from test_classify import make_recipe as classify_recipe

    recipe = classify_recipe(tmp_path, tiny_model_dir, {"name": "classify"}, name="cls")
    train_run(recipe, echo=lambda _: None)
    assert main(["score", recipe.output.dir, "--prompt", "hi", "--response", "hello"]) == 2
    assert "not a reward-model run" in capsys.readouterr().err


def test_win_rate_by_hand():
    import numpy as np

    from tunesmith.evaluation.alignment import win_rate

    found = win_rate(np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 1.0, 4.0, 0.0]))
    assert found["win_rate"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert (found["wins"], found["losses"], found["ties"], found["n"]) == (2, 1, 1, 4)
    assert found["ci_low"] <= found["win_rate"] <= found["ci_high"]


def test_eval_a_policy_with_a_reward_model(tmp_path, tiny_model_dir):
    from tunesmith.evaluation.alignment import kl_to_base
    from tunesmith.evaluation.runner import EvalOptions, SystemSpec, evaluate_run, load_system
    from tunesmith.evaluation.view import results_text

    rm = make_recipe(tmp_path, tiny_model_dir, method={"adapter": "full"}, max_steps=4, learning_rate=3e-3)
    train_run(rm, echo=lambda _: None)
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {t}."},
                          {"role": "assistant", "content": f"Yes, gladly: {t} are nice."}]} for t in TOPICS]
    sft = parse_recipe({"model": {"name": str(tiny_model_dir)},
                        "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)), "check": {"enabled": False}},
                        "method": {"name": "sft"}, "train": {"max_steps": 3, "learning_rate": 1e-2, "batch_size": 4,
                                                             "max_seq_len": 48},
                        "output": {"dir": str(tmp_path / "sft")}})
    train_run(sft, echo=lambda _: None)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", preference_rows()[:4])  # preference rows: their prompts
    results = evaluate_run(sft.output.dir, EvalOptions(data=str(prompts), reward_model=rm.output.dir,
                                                       max_new_tokens=6, forgetting=False, shots=1, name="aligned"),
                           echo=lambda _: None)
    a = results["alignment"]
    assert set(a["systems"]) == {"tuned", "base", "fewshot"} and set(a["win_rate"]) == {"base", "fewshot"}
    examples = [json.loads(line) for line in open(f"{results['folder']}/examples.jsonl")]
    tuned = [e["tuned"]["reward"] for e in examples]
    base = [e["base"]["reward"] for e in examples]
    assert a["systems"]["tuned"]["mean_reward"] == pytest.approx(sum(tuned) / 4)
    wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned, base))
    assert a["win_rate"]["base"]["win_rate"] == pytest.approx(wins / 4)
    assert examples[0]["references"] == ["Yes, gladly: apples are nice."]  # the chosen reply is the reference
    assert a["kl_to_base"]["answer_tokens_mean"] > 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for system in a["systems"]:  # every system's answer length, counted with the policy's tokenizer
        lengths = [len(tok(e[system]["output"], add_special_tokens=False)["input_ids"]) for e in examples]
        assert [e[system]["answer_tokens"] for e in examples] == lengths
        assert a["systems"][system]["answer_tokens_mean"] == pytest.approx(sum(lengths) / 4)
    assert "tuned wins vs base" in results_text(results)
    from tunesmith.report import render_report

    html = render_report(sft.output.dir)
    assert "tuned wins against it" in html and f"{a['systems']['tuned']['mean_reward']:+.3f}" in html
    base_spec = SystemSpec("base", sft.output.dir, base=True)
    same = kl_to_base(load_system(base_spec), load_system(base_spec),
                      [[{"role": "user", "content": "Tell me about apples."}]], ["apples are nice"])
    assert same["kl_per_answer"] == 0.0  # a model against itself


def test_sft_on_preference_rows_learns_only_the_chosen_reply_and_keeps_the_end(tokenizer):
    from tunesmith.data.format import IGNORE, encode

    record = Record("preference", {"prompt": "\n\nHuman: hi\n\nAssistant: HELLO THERE\n\nHuman: and now?\n\nAssistant:",
                                   "chosen": " Fine.", "rejected": " Go away."}, "f.jsonl", 1)
    full = encode(record, tokenizer, 512)
    trained = tokenizer.decode([t for t in full.labels if t != IGNORE])
    assert trained == "Fine.<|im_end|>"  # not the earlier assistant turn, not the rejected reply
    cut = encode(record, tokenizer, 8)
    assert cut.truncated and cut.input_ids == full.input_ids[-8:] and cut.labels == full.labels[-8:]


def test_group_by_length_reaches_the_reward_trainer(tmp_path, tiny_model_dir):
    """Pairs batched by length (of the chosen conversation) pad far less than random pairs."""
    rows = [{"prompt": f"\n\nHuman: Tell me about {' '.join(TOPICS[:1 + (5 * i) % 12])} {i}.\n\nAssistant:",
             "chosen": " Yes, gladly.", "rejected": " No."} for i in range(96)]
    padding = {grouped: epoch_padding(make_recipe(tmp_path, tiny_model_dir, name=f"rm-{grouped}", rows=rows,
                                                  group_by_length=grouped, max_steps=1)) for grouped in (False, True)}
    assert padding[True] < padding[False] / 1.5  # measured 394 against 770; the rest is chosen vs rejected length


def test_export_writes_a_reward_model_that_plain_transformers_scores_as_tunesmith_does(tmp_path, tiny_model_dir):
    """The LoRA merged into a one-output sequence classifier; the exported README's own code gives
    `RewardModel.score` for each reply (to 1e-4), including one longer than max_seq_len (its end is kept)."""
    from transformers import AutoConfig

    from tunesmith.generate import export_merged
    from tunesmith.methods.reward import load_reward_model

    train_run(make_recipe(tmp_path, tiny_model_dir, precision="fp32", max_steps=4, learning_rate=1e-2),
              echo=lambda _: None)
    out = export_merged(tmp_path / "rm", tmp_path / "exported")
    assert AutoConfig.from_pretrained(out).num_labels == 1 and not list(out.glob("adapter*"))
    readme = (out / "README.md").read_text()
    assert "Note:" not in readme  # this tokenizer's plain chat template gives the trained tokens
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    prompt = "Tell me about apples."
    replies = ["Yes, gladly: apples are nice.", "No. apples.", " ".join(["apples are very nice indeed"] * 20)]
    expected = load_reward_model(tmp_path / "rm", precision="fp32").score([[{"role": "user", "content": prompt}]] * 3,
                                                                         replies)
    got = []
    for reply in replies:
        scope = {"FOLDER": str(out), "prompt": prompt, "reply": reply}
        exec(code, scope)
        got.append(scope["reward"])
    assert got == pytest.approx(expected, abs=1e-4)
    assert abs(expected[0] - expected[1]) > 1e-3  # different replies score differently: a wrong export would show
