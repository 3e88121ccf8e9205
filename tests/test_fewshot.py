"""method: fewshot — the run folder records the pool and the selection, nearest picks the hand-known nearest rows,
eval on a fewshot run equals the `fewshot` comparison of an sft run, generate prepends the shots, bad settings name
their field."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from tunesmith.data.records import Record
from tunesmith.errors import RecipeError, RunError
from tunesmith.methods.fewshot import nearest_shots, shot_messages, shot_picker
from tunesmith.recipe import parse_recipe
from tunesmith.train import train_run

PETS = ["my cat sleeps on the sofa all day", "the kitten chased a ball of yarn", "a puppy learned to fetch the stick"]
MONEY = ["stock markets fell sharply this morning", "the central bank raised interest rates",
         "bond yields climbed after the report"]
POOL = [PETS[0], MONEY[0], PETS[1], MONEY[1], PETS[2], MONEY[2]]
QUESTIONS = [{"text": "my kitten naps on the couch", "label": "pets"},
             {"text": "shares dropped as the bank lifted rates", "label": "money"}]


def make_recipe(tmp_path, model_dir, method, rows=None, validation=None, name="run", **train):
    rows = rows or [{"text": t, "label": "pets" if t in PETS else "money"} for t in POOL]
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
            "validation": str(write_jsonl(tmp_path / "validation.jsonl", validation or QUESTIONS)),
            "check": {"enabled": False}}
    settings = {"batch_size": 2, "max_steps": 1, "max_seq_len": 64, "seed": 7, **train}
    return parse_recipe({"model": {"name": str(model_dir)}, "data": data, "method": method, "train": settings,
                         "output": {"dir": str(tmp_path / name)}})


def records(rows: list[dict], source: str) -> list[Record]:
    return [Record("classification", row, source, i + 1) for i, row in enumerate(rows)]


def test_a_random_fewshot_run_records_its_pool_and_shots_without_weights(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "shots": 2, "seed": 3})
    manifest = train_run(recipe, echo=lambda s: None)
    run = tmp_path / "run"
    assert manifest["method"] == "fewshot" and manifest["saved"] == "none" and manifest["adapter"] is None
    assert manifest["training"]["steps"] == 0 and manifest["training"]["trainable_params"] == 0
    assert sorted(p.name for p in run.iterdir()) == [".tunesmith-run", "data", "fewshot", "generation_config.json",
                                                     "manifest.json", "recipe.yaml", "rejects.jsonl", "tokenizer"]
    assert sorted(p.name for p in (run / "fewshot").iterdir()) == ["pool.jsonl", "settings.json", "shots.jsonl"]
    settings = json.loads((run / "fewshot" / "settings.json").read_text())
    assert {k: settings[k] for k in ("name", "shots", "selection", "embedder", "seed", "pool_rows")} == {
        "name": "fewshot", "shots": 2, "selection": "random", "embedder": "base", "seed": 3, "pool_rows": 6}
    pool = [json.loads(x) for x in (run / "fewshot" / "pool.jsonl").read_text().splitlines()]
    assert [p["data"]["text"] for p in pool] == POOL and [p["line"] for p in pool] == [1, 2, 3, 4, 5, 6]
    picker = shot_picker(run)
    assert picker.fixed() == random.Random(3).sample(picker.pool, 2)
    # per evaluation row: two pool rows, drawn by the row's own seed
    shots = picker.for_rows(records(QUESTIONS, "q.jsonl"))
    assert [len(s) for s in shots] == [2, 2] and all(r in picker.pool for s in shots for r in s)
    assert shots == picker.for_rows(records(QUESTIONS, "q.jsonl"))


def test_generate_on_a_fewshot_run_prepends_its_shots_and_export_refuses(tmp_path, tiny_model_dir):
    from tunesmith.generate import export_merged, generate, load_run

    train_run(make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "shots": 2, "seed": 3}), echo=lambda s: None)
    loaded = load_run(tmp_path / "run")
    fixed = shot_picker(tmp_path / "run").fixed()
    assert loaded.context == shot_messages(fixed)
    assert [m["content"] for m in loaded.context] == [fixed[0].data["text"], fixed[0].data["label"],
                                                      fixed[1].data["text"], fixed[1].data["label"]]
    conversation = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "hello"}]
    answer = generate(loaded, [conversation], max_new_tokens=4)
    loaded.context = []
    assert generate(loaded, [conversation[:1] + shot_messages(fixed) + conversation[1:]], max_new_tokens=4) == answer
    with pytest.raises(RunError, match="no trained weights to export"):
        export_merged(tmp_path / "run", tmp_path / "merged")


def test_nearest_shots_pick_the_most_similar_rows_nearest_last():
    angles = np.radians([0, 90, 30, 180, 60, 30])
    pool = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    query = np.array([np.cos(np.radians(40)), np.sin(np.radians(40))])
    # similarities: 30° (rows 2 and 5, equal) > 60° (row 4) > 0° (row 0) > 90° > 180°
    assert nearest_shots(query, pool, 3) == [4, 5, 2]  # a tie keeps pool order: row 2 is nearer
    assert nearest_shots(query, pool, 3, exclude={2}) == [0, 4, 5]
    assert nearest_shots(query, pool, 10) == [3, 1, 0, 4, 5, 2]


def test_nearest_with_minilm_picks_the_rows_on_the_same_topic(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "shots": 2, "selection": "nearest",
                                                    "embedder": "minilm"}, precision="fp32")
    train_run(recipe, echo=lambda s: None)
    embeddings = np.load(tmp_path / "run" / "fewshot" / "embeddings.npy")
    assert embeddings.shape == (6, 384) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    pets, money = shot_picker(tmp_path / "run").for_rows(records(QUESTIONS, "q.jsonl"))
    assert [r.data["text"] for r in pets] == [PETS[1], PETS[0]]  # the sleeping cat is nearest: it comes last
    assert {r.data["text"] for r in money} == set(MONEY[:2])


def test_nearest_with_the_base_model_equals_a_hand_computed_cosine(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModel

    train_run(make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "shots": 3, "selection": "nearest"},
                          precision="fp32"), echo=lambda s: None)
    model = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def unit(text):
        with torch.no_grad():
            v = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0].mean(0)
        return (v / v.norm()).numpy()

    pool = np.stack([unit(t) for t in POOL])
    assert np.allclose(np.load(tmp_path / "run" / "fewshot" / "embeddings.npy"), pool, atol=1e-5)
    picked = shot_picker(tmp_path / "run").for_rows(records(QUESTIONS, "q.jsonl"))
    for question, shots in zip(QUESTIONS, picked):
        nearest = np.argsort(-(pool @ unit(question["text"])))[:3][::-1]
        assert [r.data["text"] for r in shots] == [POOL[i] for i in nearest]


def test_eval_of_a_fewshot_run_equals_the_fewshot_comparison_of_an_sft_run(tmp_path, tiny_model_dir):
    from tunesmith.artifacts import open_run
    from tunesmith.evaluation.runner import EvalOptions, eval_rows, evaluate_run, shot_prompts, system_specs

    words = ["apple", "river", "stone", "cloud", "music", "garden", "window", "engine", "paper", "forest"]
    colours = ["red", "green", "blue", "gold"]
    rows = [{"text": f"the colour of the {w}", "label": colours[i % 4]} for i, w in enumerate(words)]
    held_out = [{"text": "a ripe tomato", "label": "red"}, {"text": "the summer sky", "label": "blue"},
                {"text": "fresh spring grass", "label": "green"}]
    sft = make_recipe(tmp_path, tiny_model_dir, {"name": "sft"}, rows, held_out, name="sft")
    fewshot = make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "shots": 3, "seed": 5}, rows, held_out,
                          name="fewshot")
    for recipe in (sft, fewshot):
        train_run(recipe, echo=lambda s: None)
    by_sft = evaluate_run(tmp_path / "sft", EvalOptions(against=("fewshot",), shots=3, seed=5, forgetting=False,
                                                        n_resamples=50), echo=lambda s: None)
    by_run = evaluate_run(tmp_path / "fewshot", EvalOptions(against=("base",), forgetting=False, n_resamples=50),
                          echo=lambda s: None)
    assert by_run["rows"] == by_sft["rows"] == 3
    assert by_run["metrics"]["tuned"] == by_sft["metrics"]["fewshot"]

    def predictions(run, system):
        lines = (tmp_path / run / "eval" / "heldout" / "examples.jsonl").read_text().splitlines()
        return [json.loads(x)[system]["pred"] for x in lines]

    assert predictions("fewshot", "tuned") == predictions("sft", "fewshot")
    # the same prompts, word for word: three solved rows, then the question
    prompts = {}
    for run, system, options in (("sft", "fewshot", EvalOptions(shots=3, seed=5)),
                                 ("fewshot", "tuned", EvalOptions(against=()))):
        folder = open_run(tmp_path / run)
        prompts[run] = shot_prompts(system_specs(folder, options)[system], eval_rows(folder, options), 5)
    assert prompts["fewshot"] == prompts["sft"]
    assert [len(p) for p in prompts["fewshot"]] == [7, 7, 7]
    assert [p[-1]["content"] for p in prompts["fewshot"]] == [r["text"] for r in held_out]


def test_bad_fewshot_settings_name_the_field(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError) as err:
        make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "shots": 0, "embedder": "minilm"})
    assert err.value.problems == [
        "`method.shots`: 0 is out of range — it must be > 0",
        "`method.embedder`: 'minilm' — only `selection: nearest` embeds prompts; set method.selection=nearest or "
        "remove method.embedder"]
    with pytest.raises(RecipeError) as err:
        make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "selction": "nearest"})
    assert "did you mean `method.selection`?" in err.value.problems[0]
    with pytest.raises(RecipeError) as err:
        train_run(make_recipe(tmp_path, tiny_model_dir, {"name": "fewshot", "shots": 7}), echo=lambda s: None)
    assert err.value.problems == ["`method.shots`: 7 is more than the 6 training rows; lower it or give more "
                                  "training rows"]
