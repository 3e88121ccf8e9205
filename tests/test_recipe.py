"""Recipe parsing: every problem kind, all reported at once, overrides, paths, round trip. No torch needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tunesmith.errors import RecipeError
from tunesmith.methods.sft import SFTParams
from tunesmith.recipe import (
    SECTIONS, STARTER_VALUES, DataSection, EvalSection, MethodParams, OutputSection, Recipe, Strict, TrainSection,
    apply_overrides, load_recipe, parse_recipe, starter_recipe,
)
from tunesmith.schema import description as describe

TRAIN_FIELDS = ", ".join(TrainSection.model_fields)
METHODS = "sft, pretrain, classify, features, fewshot, ensemble, reward, dpo, kto, orpo, grpo, rloo, ppo"  # registry order


def write_recipe(folder: Path, recipe: dict | str, name: str = "recipe.yaml", train_file: bool = True) -> Path:
    """A recipe file (dict dumped as YAML, or raw text) in `folder`, next to a one-row train.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    if train_file:
        write_jsonl(folder / "train.jsonl", [{"text": "hello"}])
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe), encoding="utf-8")
    return path


def problems_of(path: Path, overrides: list[str] = (), **kwargs) -> list[str]:
    """The problem lines of the RecipeError that loading `path` must raise."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides), **kwargs)
    assert info.value.source == str(path)
    return info.value.problems


def recipe_with(**sections) -> dict:
    return {"data": {"train": "train.jsonl"}, **sections}


# ----------------------------------------------------------------------------------------------- one kind each


def test_unknown_key_in_a_section_lists_allowed_keys_and_suggests_the_closest(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train={"learnig_rate": 1e-4}))
    assert problems_of(path) == [
        f"`train.learnig_rate`: unknown key (given 0.0001); allowed here: {TRAIN_FIELDS}; "
        "did you mean `train.learning_rate`?"]


def test_unknown_key_with_nothing_close_has_no_suggestion(tmp_path):
    path = write_recipe(tmp_path, recipe_with(eval={"bananas": 3}))
    assert problems_of(path) == ["`eval.bananas`: unknown key (given 3); allowed here: loss_before, loss_rows"]


def test_unknown_top_level_section_suggests_the_closest_section(tmp_path):
    path = write_recipe(tmp_path, recipe_with(trian={"epochs": 2}))
    assert problems_of(path) == [
        "`trian`: unknown key (given {'epochs': 2}); allowed here: model, data, train, eval, output, distributed, method; "
        "did you mean `train`?"]


@pytest.mark.parametrize("key, value, words", [
    ("batch_size", "eight", "'eight' is not a whole number"),
    ("batch_size", 2.5, "2.5 is not a whole number"),
    ("learning_rate", "fast", "'fast' is not a number"),
    ("padding_free", "maybe", "'maybe' is not true, false or auto"),
])
def test_wrong_type_names_the_value_and_the_expected_type(tmp_path, key, value, words):
    path = write_recipe(tmp_path, recipe_with(train={key: value}))
    assert problems_of(path) == [f"`train.{key}`: {words}"]


@pytest.mark.parametrize("section, key, value, bound", [
    ("train", "batch_size", 0, "> 0"),
    ("train", "max_seq_len", 8, "> 8"),
    ("train", "warmup_ratio", 1.0, "< 1.0"),
    ("data", "validation_fraction", 1.5, "< 1.0"),
    ("data", "max_reject_fraction", -0.1, ">= 0.0"),
])
def test_out_of_range_value_says_the_bound(tmp_path, section, key, value, bound):
    raw = recipe_with()
    raw.setdefault(section, {})[key] = value
    path = write_recipe(tmp_path, raw)
    assert problems_of(path) == [f"`{section}.{key}`: {value!r} is out of range — it must be {bound}"]


def test_bad_choice_lists_choices_and_suggests_the_closest(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train={"scheduler": "cosin"}))
    assert problems_of(path) == [
        "`train.scheduler`: 'cosin' is not allowed; choose one of: linear, cosine, constant; did you mean 'cosine'?"]


@pytest.mark.parametrize("method", [{"name": "sftt"}, "sftt"])
def test_unknown_method_name_suggests_a_registered_method(tmp_path, method):
    path = write_recipe(tmp_path, recipe_with(method=method))
    assert problems_of(path) == [
        f"`method.name`: 'sftt' is not allowed; choose one of: {METHODS}; did you mean 'sft'?"]


def test_bad_choice_inside_the_method_section(tmp_path):
    path = write_recipe(tmp_path, recipe_with(method={"name": "sft", "adapter": "lorra"}))
    assert problems_of(path) == [
        "`method.adapter`: 'lorra' is not allowed; choose one of: lora, qlora, dora, ia3, prefix, prompt, adapter, freeze, full; did you mean 'lora'?"]


def test_unknown_key_at_the_method_level_suggests_the_closest(tmp_path):
    path = write_recipe(tmp_path, recipe_with(method={"name": "sft", "adaptor": "full"}))
    assert problems_of(path) == [
        "`method.adaptor`: unknown key (given 'full'); allowed here: name, adapter, lora, qlora, dora, ia3, prefix, prompt, bottleneck, freeze, "
        "train_on; "
        "did you mean `method.adapter`?"]


def test_unknown_key_nested_inside_the_method_section_lists_the_allowed_keys(tmp_path):
    path = write_recipe(tmp_path, recipe_with(method={"name": "sft", "lora": {"rank": 8}}))
    [line] = problems_of(path)
    assert line.startswith("`method.lora.rank`: unknown key (given 8); allowed here: r, alpha, dropout, target_modules; did you mean `method.lora.r`?")


def test_unknown_lora_rank_suggests_r(tmp_path):
    path = write_recipe(tmp_path, recipe_with(method={"name": "sft", "lora": {"rank": 8}}))
    [line] = problems_of(path)
    assert line.endswith("did you mean `method.lora.r`?")


def test_missing_data_section(tmp_path):
    path = write_recipe(tmp_path, {"train": {"epochs": 2}})
    assert problems_of(path) == [
        "`data`: required section is missing; give at least `data.train: path/to/train.jsonl`"]


def test_empty_recipe_file_reports_only_the_missing_data_section(tmp_path):
    path = write_recipe(tmp_path, "# nothing yet\n")
    assert problems_of(path) == [
        "`data`: required section is missing; give at least `data.train: path/to/train.jsonl`"]


def test_missing_data_train(tmp_path):
    path = write_recipe(tmp_path, {"data": {"format": "chat"}})
    assert problems_of(path) == ["`data.train`: required, but missing"]


def test_section_that_is_not_a_mapping(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train=5))
    assert problems_of(path) == ["`train`: must be a mapping of keys, got 5"]


def test_top_level_that_is_not_a_mapping(tmp_path):
    path = write_recipe(tmp_path, "- data\n- train\n")
    assert problems_of(path) == ["the top level must be a mapping of sections, got list"]


def test_both_warmups_set(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train={"warmup_steps": 10, "warmup_ratio": 0.1}))
    assert problems_of(path) == ["`train.warmup_steps` and `train.warmup_ratio`: can't set both; choose one"]


def test_early_stopping_needs_eval_every(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train={"early_stopping_patience": 3}))
    assert problems_of(path) == [
        "`train.early_stopping_patience`: needs `train.eval_every` (how often to measure validation loss)"]


def test_early_stopping_needs_validation_data(tmp_path):
    raw = {"data": {"train": "train.jsonl", "validation_fraction": 0.0},
           "train": {"early_stopping_patience": 3, "eval_every": 10}}
    path = write_recipe(tmp_path, raw)
    assert problems_of(path) == ["`train.early_stopping_patience`: needs validation data; give `data.validation` "
                                 "or a `data.validation_fraction` above 0"]


def test_keep_best_needs_evaluations_and_a_metric_the_method_measures(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train={"keep_best": True}))
    assert problems_of(path) == [
        "`train.keep_best`: needs `train.eval_every` (how often to measure validation loss)"]
    sft = recipe_with(train={"keep_best": True, "eval_every": 10, "best_metric": "accuracy"})
    assert problems_of(write_recipe(tmp_path, sft)) == [
        "`train.best_metric`: `method: sft` measures no validation accuracy (it measures loss); "
        "set train.best_metric=loss"]
    stopping = recipe_with(train={"early_stopping_patience": 2, "eval_every": 10, "best_metric": "accuracy"})
    assert problems_of(write_recipe(tmp_path, stopping))[0].startswith("`train.best_metric`: `method: sft`")
    features = {"data": {"train": "train.jsonl", "format": "classification"}, "method": {"name": "features"},
                "train": {"keep_best": True, "eval_every": 10}}
    assert problems_of(write_recipe(tmp_path, features)) == [
        "`train.keep_best`: `method: features` has no validation evaluations to choose among; "
        "set train.keep_best=false"]
    classify = {"data": {"train": "train.jsonl", "format": "classification"}, "method": {"name": "classify"},
                "train": {"keep_best": True, "eval_every": 10, "best_metric": "accuracy"}}
    assert load_recipe(write_recipe(tmp_path, classify)).train.best_metric == "accuracy"


def test_classifier_needs_two_distinct_labels(tmp_path):
    path = write_recipe(tmp_path, {"data": {"train": "train.jsonl", "format": "classification",
                                            "labels": ["yes", "yes"]}})
    assert problems_of(path) == ["`data.labels`: ['yes', 'yes'] — a classifier needs at least two distinct labels"]


def test_record_format_the_method_cannot_train(tmp_path):
    path = write_recipe(tmp_path, {"data": {"train": "train.jsonl", "format": "preference"},
                                   "method": {"name": "classify"}})
    assert problems_of(path) == ["`data.format`: 'preference' can't train method 'classify'; "
                                 "it trains on classification"]


@pytest.mark.parametrize("method, train, data, problem", [
    ({"name": "classify"}, {"padding_free": True}, {"format": "classification"},
     "`train.padding_free`: true can't train `method: classify` — each row is classified on its own, so batches are "
     "padded; set train.padding_free=false"),
    ({"name": "sft", "adapter": "prompt"}, {"padding_free": True}, {},
     "`train.padding_free`: true can't train `method.adapter: prompt` — concatenated rows would share its virtual "
     "tokens; set train.padding_free=false"),
    ({"name": "kto"}, {"batch_size": 1}, {"format": "preference"},
     "`train.batch_size`: 1 — KTO estimates its KL term from the other rows of a batch; set train.batch_size=2 or "
     "more (or method.loss_type=apo_zero_unpaired)"),
    ({"name": "grpo", "reward_function": "m:f", "num_generations": 3}, {"batch_size": 4}, {},
     "`method.num_generations`: 3 must divide the replies sampled per optimizer step (train.batch_size × "
     "train.gradient_accumulation = 4); e.g. set train.batch_size=3"),
    ({"name": "rloo", "reward_function": "m:f", "num_generations": 2, "max_completion_length": 512},
     {"batch_size": 4, "max_seq_len": 512}, {},
     "`method.max_completion_length`: 512 leaves no room for the prompt in train.max_seq_len=512; lower it or raise "
     "train.max_seq_len"),
    ({"name": "dpo"}, {"padding_free": True}, {"format": "preference"},
     "`train.padding_free`: true can't train `method: dpo` — preference and generation batches are padded; set "
     "train.padding_free=false"),
    ({"name": "dpo"}, {"group_by_length": True}, {"format": "preference"},
     "`train.group_by_length`: true can't train `method: dpo` — TRL batches the pairs itself; set "
     "train.group_by_length=false"),
    ({"name": "grpo", "reward_function": "m:f", "num_generations": 2}, {"group_by_length": True}, {},
     "`train.group_by_length`: true can't train `method: grpo` — prompts are sampled for rollouts, not batched by "
     "length; set train.group_by_length=false"),
], ids=["classify", "prompt-adapter", "kto", "grpo", "rloo", "dpo", "dpo-grouped", "grpo-grouped"])
def test_what_a_method_cannot_honour_is_reported_when_the_recipe_loads(tmp_path, method, train, data, problem):
    """The methods' own checks run at load time — `tunesmith validate` reports them, nothing is loaded first."""
    path = write_recipe(tmp_path, {"data": {"train": "train.jsonl", **data}, "method": method, "train": train})
    assert problems_of(path) == [problem]


def test_missing_data_files_are_reported_with_their_resolved_paths(tmp_path):
    path = write_recipe(tmp_path, {"data": {"train": "nope.jsonl", "validation": "sub/val.csv"}}, train_file=False)
    hint = "does not exist; give a JSONL, CSV or Parquet file, or a saved `datasets` folder"
    assert problems_of(path) == [f"`data.train`: {str(tmp_path / 'nope.jsonl')!r} {hint}",
                                 f"`data.validation`: {str(tmp_path / 'sub' / 'val.csv')!r} {hint}"]


def test_check_files_false_skips_the_file_checks(tmp_path):
    path = write_recipe(tmp_path, {"data": {"train": "nope.jsonl"}}, train_file=False)
    assert load_recipe(path, check_files=False).data.train == str(tmp_path / "nope.jsonl")


def test_missing_local_model_folder(tmp_path):
    path = write_recipe(tmp_path, recipe_with(model={"name": "no/such/model"}))
    assert problems_of(path) == [
        "`model.name`: 'no/such/model' is neither a bundled model (default, minilm) nor an existing local folder or .gguf file"]


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "absent.yaml"
    assert problems_of(path) == [f"recipe file not found: {path} (create one with `tunesmith init {path}`)"]


@pytest.mark.parametrize("text, where", [
    ("data:\n  train: train.jsonl\ntrain:\n  batch_size: 8\n   epochs: 2\n",
     "line 5, column 10: mapping values are not allowed here"),
    ("data: {train: train.jsonl}\n\ttrain: {}\n",
     "line 2, column 1: found character '\\t' that cannot start any token"),
    ("data:\n  train: \"train.jsonl\n", "line 3, column 1: found unexpected end of stream"),
])
def test_invalid_yaml_reports_line_and_column(tmp_path, text, where):
    path = write_recipe(tmp_path, text)
    assert problems_of(path) == [f"not valid YAML at {where}"]


def test_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"data:\n  train: caf\xe9.jsonl\n")
    [line] = problems_of(path)
    assert line.startswith("not UTF-8 text: 'utf-8' codec can't decode byte 0xe9")


@pytest.mark.parametrize("item", ["train.batch_size", "=3", "train..epochs=2", ".epochs=2", "train.=2"])
def test_bad_override_syntax(tmp_path, item):
    path = write_recipe(tmp_path, recipe_with())
    assert problems_of(path, [item]) == [
        f"override {item!r}: write it as section.key=value, e.g. train.learning_rate=1e-4"]


def test_error_message_counts_and_lists_every_problem(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train={"batch_size": 0, "scheduler": "cosin"}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert err.exit_code == 2
    assert err.message.splitlines()[0] == f"{path}: 2 problems:"
    assert err.message.splitlines()[1:] == [f"  - {p}" for p in err.problems]
    assert err.hint == "fix each line above; `tunesmith init` writes a commented starter recipe"
    assert str(err) == f"{err.message}\nhint: {err.hint}"


# ----------------------------------------------------------------------------------------------- all at once


def test_every_problem_kind_is_reported_together_in_one_error(tmp_path):
    """One recipe holding one of each problem kind that can coexist; all are reported, in one RecipeError.

    Kinds that exclude each other by nature are left out: invalid YAML stops parsing; a missing `data` section, a
    missing `data.train` and a missing data file are three states of one key; an unknown method name leaves no
    method schema to check `method.lora.rank` against (both are covered by the next tests). The cross-field check
    here is the one on `data`, since `train` holds field errors (see the xfail test below for why that matters).
    """
    text = """\
modle: {name: default}
data:
  train: missing.jsonl
  format: classification
  labels: [pos]
method:
  name: sft
  lora: {rank: 8}
train:
  learnig_rate: 1.0e-4
  batch_size: eight
  scheduler: cosin
  gradient_accumulation: 0
output:
  overwrite: perhaps
"""
    path = write_recipe(tmp_path, text, train_file=False)
    problems = problems_of(path, ["train.seed", "eval.lose_rows=3"])
    expected = [
        "override 'train.seed': write it as section.key=value, e.g. train.learning_rate=1e-4",
        "`modle`: unknown key (given {'name': 'default'}); allowed here: model, data, train, eval, output, distributed, method; "
        "did you mean `model`?",
        f"`train.learnig_rate`: unknown key (given 0.0001); allowed here: {TRAIN_FIELDS}; "
        "did you mean `train.learning_rate`?",
        "`train.batch_size`: 'eight' is not a whole number",
        "`train.scheduler`: 'cosin' is not allowed; choose one of: linear, cosine, constant; did you mean 'cosine'?",
        "`train.gradient_accumulation`: 0 is out of range — it must be > 0",
        "`eval.lose_rows`: unknown key (given 3); allowed here: loss_before, loss_rows; did you mean `eval.loss_rows`?",
        "`output.overwrite`: 'perhaps' is not true or false",
        "`method.lora.rank`: unknown key (given 8); allowed here: r, alpha, dropout, target_modules; did you mean `method.lora.r`?",
        "`data.labels`: ['pos'] — a classifier needs at least two distinct labels",
        f"`data.train`: {str(tmp_path / 'missing.jsonl')!r} does not exist; give a JSONL, CSV or Parquet file, "
        "or a saved `datasets` folder",
    ]
    assert len(problems) == 11
    for line in expected:
        assert line in problems
    assert sorted(problems) == sorted(expected)


def test_train_cross_checks_are_reported_together_with_other_sections_problems(tmp_path):
    text = """\
data:
  train: train.jsonl
  validation_fraction: 1.5
method:
  name: sft
  adapter: lorra
train:
  warmup_steps: 10
  warmup_ratio: 0.1
  early_stopping_patience: 2
eval:
  loss_befor: true
  loss_rows: 0
"""
    path = write_recipe(tmp_path, text)
    problems = problems_of(path)
    assert sorted(problems) == sorted([
        "`data.validation_fraction`: 1.5 is out of range — it must be < 1.0",
        "`method.adapter`: 'lorra' is not allowed; choose one of: lora, qlora, dora, ia3, prefix, prompt, adapter, freeze, full; did you mean 'lora'?",
        "`train.warmup_steps` and `train.warmup_ratio`: can't set both; choose one",
        "`train.early_stopping_patience`: needs `train.eval_every` (how often to measure validation loss)",
        "`eval.loss_befor`: unknown key (given true); allowed here: loss_before, loss_rows; "
        "did you mean `eval.loss_before`?",
        "`eval.loss_rows`: 0 is out of range — it must be > 0",
    ])


def test_missing_data_and_unknown_method_are_reported_together(tmp_path):
    path = write_recipe(tmp_path, {"method": {"name": "sftt"}, "train": {"batch_size": "eight"}})
    assert sorted(problems_of(path, ["train.scheduler=cosin"])) == sorted([
        "`data`: required section is missing; give at least `data.train: path/to/train.jsonl`",
        "`train.batch_size`: 'eight' is not a whole number",
        "`train.scheduler`: 'cosin' is not allowed; choose one of: linear, cosine, constant; did you mean 'cosine'?",
        f"`method.name`: 'sftt' is not allowed; choose one of: {METHODS}; did you mean 'sft'?",
    ])


def test_cross_field_and_file_problems_are_reported_alongside_field_errors_in_the_same_section(tmp_path):
    raw = {"data": {"train": "missing.jsonl", "validation_fraction": 1.5},
           "train": {"learnig_rate": 1e-4, "warmup_steps": 10, "warmup_ratio": 0.1}}
    path = write_recipe(tmp_path, raw, train_file=False)
    problems = problems_of(path)
    assert "`train.warmup_steps` and `train.warmup_ratio`: can't set both; choose one" in problems
    assert any(p.startswith("`data.train`:") and "does not exist" in p for p in problems)
    assert len(problems) == 4


# ----------------------------------------------------------------------------------------------- overrides


def test_override_values_are_parsed_as_yaml_types():
    raw, problems = apply_overrides({"train": {"batch_size": 8}}, [
        "train.batch_size=16", "train.learning_rate=0.0003", "train.padding_free=false",
        "method.lora.target_modules=[q_proj, v_proj]", "data.system_prompt=Be brief.", "train.max_steps=null",
        "data.labels=['1', '2']", "eval.loss_before=",
    ])
    assert problems == []
    assert raw["train"] == {"batch_size": 16, "learning_rate": 0.0003, "padding_free": False, "max_steps": None}
    assert type(raw["train"]["batch_size"]) is int and type(raw["train"]["learning_rate"]) is float
    assert raw["method"] == {"lora": {"target_modules": ["q_proj", "v_proj"]}}
    assert raw["data"] == {"system_prompt": "Be brief.", "labels": ["1", "2"]}
    assert raw["eval"] == {"loss_before": ""}


def test_apply_overrides_does_not_change_its_input():
    original = {"train": {"batch_size": 8}}
    raw, _ = apply_overrides(original, ["train.batch_size=4"])
    assert original == {"train": {"batch_size": 8}} and raw == {"train": {"batch_size": 4}}


def test_overrides_win_over_the_file_and_reach_the_recipe(tmp_path):
    path = write_recipe(tmp_path, recipe_with(train={"batch_size": 4, "epochs": 3}))
    recipe = load_recipe(path, ["train.batch_size=16", "train.learning_rate=1e-4", "method.adapter=lora",
                                "method.lora.target_modules=[q_proj, v_proj]", "train.padding_free=no"])
    assert recipe.train.batch_size == 16 and recipe.train.epochs == 3.0
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.train.padding_free is False
    assert recipe.method.adapter == "lora"
    assert recipe.method.lora.target_modules == ["q_proj", "v_proj"]


def test_override_of_an_unknown_key_suggests_the_closest(tmp_path):
    path = write_recipe(tmp_path, recipe_with())
    assert problems_of(path, ["train.lerning_rate=1e-4"]) == [
        f"`train.lerning_rate`: unknown key (given 0.0001); allowed here: {TRAIN_FIELDS}; "
        "did you mean `train.learning_rate`?"]


def test_override_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "work"
    path = write_recipe(recipe_dir, recipe_with())
    cwd.mkdir()
    write_jsonl(cwd / "other.jsonl", [{"text": "x"}])
    monkeypatch.chdir(cwd)
    recipe = load_recipe(path, ["data.train=other.jsonl", "output.dir=out/run1"])
    assert recipe.data.train == str(cwd / "other.jsonl")
    assert recipe.output.dir == str(cwd / "out" / "run1")


# ----------------------------------------------------------------------------------------------- paths and defaults


def test_relative_paths_are_resolved_against_the_recipe_folder(tmp_path, monkeypatch):
    data_dir, recipe_dir = tmp_path / "data", tmp_path / "configs"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", [{"text": "a"}])
    write_jsonl(data_dir / "val.jsonl", [{"text": "b"}])
    (recipe_dir / "models" / "tiny").mkdir(parents=True)
    path = write_recipe(recipe_dir, {"data": {"train": "../data/train.jsonl", "validation": "../data/val.jsonl"},
                                     "model": {"name": "models/tiny", "cache_dir": "cache"},
                                     "output": {"dir": "out/run"}}, train_file=False)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.data.train == str(data_dir / "train.jsonl")
    assert recipe.data.validation == str(data_dir / "val.jsonl")
    assert recipe.model.name == str(recipe_dir / "models" / "tiny")
    assert recipe.model.cache_dir == str(recipe_dir / "cache")
    assert recipe.output.dir == str(recipe_dir / "out" / "run")


def test_absolute_paths_and_the_default_model_are_kept(tmp_path):
    train = write_jsonl(tmp_path / "abs.jsonl", [{"text": "a"}])
    path = write_recipe(tmp_path / "r", {"data": {"train": str(train)}, "model": {"name": "default"}})
    recipe = load_recipe(path)
    assert recipe.data.train == str(train)
    assert recipe.model.name == "default"


def test_default_output_dir_is_runs_slash_the_recipe_stem(tmp_path):
    path = write_recipe(tmp_path, recipe_with(), name="sentiment-v2.yaml")
    recipe = load_recipe(path)
    assert recipe.output.dir == str(Path("runs") / "sentiment-v2")
    assert recipe.output.overwrite is False


def test_defaults_are_filled_in(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, recipe_with()))
    assert recipe.method.name == "sft" and recipe.method.adapter == "lora" and recipe.method.lora.r == 16
    assert recipe.train == TrainSection()
    assert recipe.eval == EvalSection()
    assert recipe.data.validation_fraction == 0.1 and recipe.data.max_reject_fraction == 0.05
    assert recipe.data.format == "auto" and recipe.data.columns == {}


def test_recipe_is_frozen(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, recipe_with()))
    with pytest.raises(Exception, match="frozen"):
        recipe.train.batch_size = 3


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    raw = {"data": {"train": "train.jsonl", "format": "instruction", "columns": {"instruction": "q", "output": "a"},
                    "system_prompt": "Be brief."},
           "method": {"name": "sft", "adapter": "lora", "lora": {"r": 4, "target_modules": ["q_proj"]}},
           "train": {"learning_rate": 3.0e-4, "scheduler": "cosine", "warmup_steps": 5, "max_steps": 7,
                     "eval_every": 2, "early_stopping_patience": 2},
           "eval": {"loss_rows": 16}}
    recipe = load_recipe(write_recipe(tmp_path, raw), ["train.seed=7"])
    text = recipe.to_yaml()
    loaded = yaml.safe_load(text)
    assert list(loaded) == ["model", "data", "method", "train", "eval", "output", "distributed"]
    assert loaded["train"]["seed"] == 7 and loaded["train"]["log_every"] == 10
    again = parse_recipe(loaded, "round-trip")
    assert isinstance(again, Recipe)
    assert again == recipe
    assert again.to_yaml() == text


# ----------------------------------------------------------------------------------------------- starter


def test_starter_recipe_parses_once_its_train_file_exists(tmp_path):
    text = starter_recipe("starter.yaml")
    assert "tunesmith validate starter.yaml" in text
    path = write_recipe(tmp_path, text, name="starter.yaml")
    recipe = load_recipe(path)
    assert recipe.data.train == str(tmp_path / "train.jsonl")
    assert recipe.method.name == "sft" and recipe.method.lora.r == 16 and recipe.method.lora.alpha == 32
    assert recipe.train.warmup_ratio == 0.05 and recipe.train.learning_rate == 2e-4
    assert recipe.output.dir == str(Path("runs") / "starter")


def test_starter_recipe_shows_every_key_with_its_schema_default():
    """Every key of every section is written with the schema's default, except the two set on purpose; the method
    section is the default method's with only its adapter's settings section."""
    starter = yaml.safe_load(starter_recipe())
    assert list(starter) == ["model", "data", "method", "train", "eval", "output", "distributed"]
    for section, cls in SECTIONS.items():
        assert list(starter[section]) == list(cls.model_fields), section
        expected = cls.model_validate(STARTER_VALUES.get(section, {}))
        assert cls.model_validate(starter[section]) == expected, section
    assert STARTER_VALUES == {"data": {"train": "train.jsonl"}, "train": {"warmup_ratio": 0.05}}
    assert list(starter["method"]) == ["name", "adapter", "lora", "train_on"]
    assert SFTParams.model_validate(starter["method"]) == SFTParams()


def test_starter_recipe_comments_are_the_schema_descriptions():
    lines = {line.split(":")[0].strip(): line for line in starter_recipe().splitlines() if ":" in line
             and not line.startswith("#")}
    rate = TrainSection.model_fields["learning_rate"].description
    assert rate == "peak learning rate (AdamW)"
    assert lines["learning_rate"] == f"  learning_rate: 0.0002{' ' * 9}# {rate}"
    assert lines["scheduler"].endswith("# how the learning rate moves after warmup (linear | cosine | constant)")
    assert lines["r"] == f"{'    r: 16':<30}  # rank of the update matrices"
    assert lines["train"] == f"train:{' ' * 26}# the optimizer and the training loop"
    assert "  name: sft                     # the training method (`tunesmith methods` lists them)" in starter_recipe()
    assert "qlora" not in yaml.safe_load(starter_recipe())["method"]


def all_fields(cls, prefix: str):
    """(dotted key, FieldInfo) of every field of `cls`, nested sections included."""
    for name, field in cls.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, Strict) \
            else None
        yield from all_fields(sub, f"{prefix}.{name}") if sub else [(f"{prefix}.{name}", cls, name)]


def test_every_schema_field_has_a_one_line_description():
    from tunesmith.methods import REGISTRY

    classes = [(cls, name) for name, cls in SECTIONS.items()] + [(m.params, "method") for m in REGISTRY.values()]
    keys = [(key, describe(cls, name)) for root, prefix in classes for key, cls, name in all_fields(root, prefix)]
    assert len(keys) > 150
    assert [key for key, text in keys if not text or "\n" in text or len(text) > 200] == []


def test_methods_listing_shows_each_parameter_with_type_default_and_meaning(capsys):
    from tunesmith.cli import main
    from tunesmith.methods import REGISTRY
    from tunesmith.methods.adapters import ADAPTERS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("sft       supervised fine-tuning")
    assert "          method.train_on  responses | all (default responses) — loss on assistant turns only, or on " \
           "every token" in lines
    assert any(line.startswith("          method.adapter ") and "lora | qlora | dora | ia3 | prefix | prompt | "
               "adapter | freeze | full (default lora) — which weights train" in line for line in lines)
    assert "          method.lora.r               whole number > 0 (default 16) — rank of the update matrices" in lines
    assert any(line.startswith("          method.members  list of run folder (required) — ") for line in lines)
    assert any(line.startswith("          method.seed ") and "whole number >= 0 and < 4294967296 (default 0)" in line
               for line in lines)
    starts = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert starts == [*REGISTRY, "adapters", *ADAPTERS]
    for method in REGISTRY.values():  # every parameter but the adapter sections, with its description
        for key, cls, name in all_fields(method.params, "method"):
            if name != "name" and key.count(".") == 1:
                assert any(f" {key} " in line and line.endswith(describe(cls, name)) for line in lines), key


# ----------------------------------------------------------------------------------------------- methods


def test_the_recipe_module_imports_no_method(tmp_path):
    """Layering: recipe.py sits below the methods; it reads them only from the table handed to it."""
    import ast

    import tunesmith.recipe as recipe_module

    tree = ast.parse(Path(recipe_module.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not [name for name in imported if name and name.startswith("tunesmith.methods")]
    assert "sft" not in Path(recipe_module.__file__).read_text(encoding="utf-8")


def test_a_method_table_handed_in_is_the_one_the_recipe_reads(tmp_path):
    """Any table of methods will do: the first is the default, its params schema and check are asked."""
    from dataclasses import dataclass
    from typing import Literal

    from pydantic import Field

    class ToyParams(MethodParams):
        name: Literal["toy"] = "toy"
        level: int = Field(1, gt=0, description="how much")

    @dataclass
    class Toy:
        name: str = "toy"
        params: type = ToyParams
        record_types: tuple = ("text",)
        metrics: tuple = ("loss",)
        check = staticmethod(lambda method, train, data: [f"`method.level`: {method.level} is too high"]
                             if method.level > 2 else [])

    path = write_recipe(tmp_path, recipe_with())
    assert load_recipe(path, methods={"toy": Toy()}).method == ToyParams()
    assert problems_of(path, ["method.level=3"], methods={"toy": Toy()}) == ["`method.level`: 3 is too high"]
    assert problems_of(path, ["method.name=sft"], methods={"toy": Toy()}) == [
        "`method.name`: 'sft' is not allowed; choose one of: toy"]
    assert "  level: 1                      # how much" in starter_recipe(methods={"toy": Toy()})


# ----------------------------------------------------------------------------------------------- values train would crash on

NO_USER = "~no-such-user-tunesmith"


@pytest.mark.parametrize("text, problem", [
    ("train: {learning_rate: .inf}", "`train.learning_rate`: inf is not a finite number"),
    ("train: {epochs: .inf}", "`train.epochs`: inf is not a finite number"),
    ("train: {learning_rate: .nan}", "`train.learning_rate`: nan is not a finite number"),
    ("train: {max_grad_norm: -.inf}", "`train.max_grad_norm`: -inf is not a finite number"),
    ("data: {train: train.jsonl, validation_fraction: .nan}", "`data.validation_fraction`: nan is not a finite number"),
    ("method: {name: sft, lora: {alpha: .inf}}", "`method.lora.alpha`: inf is not a finite number"),
    ("method: {name: ensemble, members: [a, b], weights: [1, .nan]}", "`method.weights[1]`: nan is not a finite number"),
    ("train: {batch_size: true}", "`train.batch_size`: true is not a whole number"),
    ("train: {learning_rate: false}", "`train.learning_rate`: false is not a number"),
    ("train: {padding_free: 1}", "`train.padding_free`: 1 is not true, false or auto"),
    ("train: {max_steps: '10'}", "`train.max_steps`: '10' is not a whole number"),
    ("train: {seed: -1}", "`train.seed`: -1 is out of range — it must be >= 0"),
    ("train: {seed: 4294967296}", "`train.seed`: 4294967296 is out of range — it must be < 4294967296"),
    ("method: {name: fewshot, seed: -3}", "`method.seed`: -3 is out of range — it must be >= 0"),
    ("train: {epochs: 1.0e+300}", "`train.epochs`: 1e+300 is out of range — it must be <= 10000.0"),
    ("train: {max_seq_len: 100000000000000000000}",
     "`train.max_seq_len`: 100000000000000000000 is out of range — it must be <= 1048576"),
    ("model: {name: 3}", "`model.name`: 3 is not text (a string)"),
    ("method: {name: [sft]}", "`method.name`: ['sft'] is not a method name; write one name, e.g. `method: sft`, "
                              f"from: {METHODS}; did you mean 'sft'?"),
    ("method: {name: {sft: 1}}", "`method.name`: {'sft': 1} is not a method name; write one name, e.g. "
                                 f"`method: sft`, from: {METHODS}"),
    ("method: [sft]", "`method`: must be a mapping with a `name`, got ['sft']"),
    ("data: {train: train.jsonl, validation: ''}",
     "`data.validation`: is empty; give a value, or leave the key out for its default"),
], ids=lambda v: v if len(v) < 40 else None)
def test_values_train_would_crash_on_are_reported_by_name(tmp_path, text, problem):
    extra = "" if text.startswith("data:") else "data: {train: train.jsonl}\n"
    path = write_recipe(tmp_path, extra + text + "\n")
    assert problems_of(path) == [problem]


def test_numbers_stay_numbers_however_they_are_written(tmp_path):
    """Ints are taken for floats; `1e-4` (YAML 1.1 would read text) is a number, in the file and in overrides."""
    path = write_recipe(tmp_path, "data: {train: train.jsonl}\ntrain: {learning_rate: 1e-4, epochs: 2, "
                                  "max_grad_norm: 1}\nmethod: {name: sft, lora: {alpha: 2E1}}\n")
    recipe = load_recipe(path)
    assert (recipe.train.learning_rate, recipe.train.epochs, recipe.method.lora.alpha) == (1e-4, 2.0, 20.0)
    assert type(recipe.train.epochs) is float
    assert load_recipe(path, ["train.learning_rate=3e-5", "train.seed=7"]).train.learning_rate == 3e-5
    assert problems_of(path, ["train.batch_size=yes"]) == ["`train.batch_size`: true is not a whole number"]


def test_a_method_left_empty_is_the_default_method(tmp_path):
    path = write_recipe(tmp_path, "data: {train: train.jsonl}\nmethod:\n")
    assert load_recipe(path).method.name == "sft"


def test_duplicate_keys_are_errors_naming_the_key_and_both_lines(tmp_path):
    text = """\
data:
  train: train.jsonl
train:
  epochs: 1
  batch_size: 0
  epochs: 3
method:
  name: sft
  lora:
    r: 8
    r: 4
data: {train: train.jsonl}
"""
    path = write_recipe(tmp_path, text)
    assert problems_of(path) == [  # in the file's order, then the other problems: all at once
        "`train.epochs`: given twice, at lines 4 and 6; keep one (the last would silently win)",
        "`method.lora.r`: given twice, at lines 10 and 11; keep one (the last would silently win)",
        "`data`: given twice, at lines 1 and 12; keep one (the last would silently win)",
        "`train.batch_size`: 0 is out of range — it must be > 0",
    ]


def test_the_same_key_in_different_mappings_is_no_duplicate(tmp_path):
    path = write_recipe(tmp_path, "data: {train: train.jsonl, check: {min_words: 1}, clean: {min_words: 2}}\n"
                                  "train: {epochs: 2, seed: 1}\n")
    recipe = load_recipe(path)
    assert (recipe.data.check.min_words, recipe.data.clean.min_words, recipe.train.epochs) == (1, 2, 2.0)


def test_recipe_nested_too_deeply_is_refused_by_name(tmp_path):
    path = write_recipe(tmp_path, "data: " + "[" * 50_000)
    assert problems_of(path) == ["not a recipe: its YAML is nested too deeply to read"]


@pytest.mark.parametrize("section, key", [("data", "train"), ("data", "validation"), ("model", "cache_dir"),
                                          ("output", "dir")])
def test_home_of_an_unknown_user_is_reported_by_key(tmp_path, section, key):
    raw = recipe_with()
    raw.setdefault(section, {})[key] = f"{NO_USER}/x"
    path = write_recipe(tmp_path, raw)
    assert problems_of(path) == [f"`{section}.{key}`: '{NO_USER}/x' — can't expand '{NO_USER}' (no such user); give "
                                 "the path without ~, or with ~/ for your own home folder"]


def test_home_of_an_unknown_user_in_overrides_and_run_folders(tmp_path):
    path = write_recipe(tmp_path, recipe_with(method={"name": "dpo", "policy": f"{NO_USER}/sft-run"},
                                              data={"train": "train.jsonl", "format": "preference"}))
    hint = "(no such user); give the path without ~, or with ~/ for your own home folder"
    assert problems_of(path, [f"data.validation={NO_USER}/v.jsonl"]) == [
        f"`data.validation`: '{NO_USER}/v.jsonl' — can't expand '{NO_USER}' {hint}",
        f"`method.policy`: '{NO_USER}/sft-run' — can't expand '{NO_USER}' {hint}"]


def test_a_damaged_ensemble_member_is_a_recipe_problem(tmp_path):
    for name, manifest in (("a", "{not json"), ("b", '{"method": "classify"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(manifest)
        (tmp_path / name / "labels.json").write_text('{"labels": ["neg", "pos"]}')
    path = write_recipe(tmp_path, {"data": {"train": "train.jsonl", "format": "classification"},
                                   "method": {"name": "ensemble", "members": ["a", "b"]}})
    [line] = problems_of(path)
    assert line.startswith(f"`method.members[0]`: {str(tmp_path / 'a')!r}: its manifest.json or labels.json is "
                           "damaged (JSONDecodeError")
    assert line.endswith("train that member again")


# ----------------------------------------------------------------------------------------------- no torch


def test_loading_a_recipe_does_not_import_torch(tmp_path):
    path = write_recipe(tmp_path, recipe_with())
    code = ("import sys, tunesmith.methods, tunesmith.recipe as r; r.load_recipe(sys.argv[1]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------- known source bugs


def test_home_relative_data_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    path = write_recipe(tmp_path / "r", {"data": {"train": "~/train.jsonl"}}, train_file=False)
    assert load_recipe(path).data.train == str(tmp_path / "train.jsonl")


def test_override_below_method_shorthand_keeps_the_method_name(tmp_path):
    path = write_recipe(tmp_path, recipe_with(method="sftt"))
    assert problems_of(path, ["method.adapter=full"]) == [
        f"`method.name`: 'sftt' is not allowed; choose one of: {METHODS}; did you mean 'sft'?"]


def test_data_check_and_class_weights_errors_name_their_keys(tmp_path):
    path = write_recipe(tmp_path, recipe_with(data={"train": "train.jsonl", "class_weights": "no-such.json",
                                                    "check": {"near_threshold": 0.2, "leakage": "ignore"}}))
    problems = problems_of(path)
    assert "`data.check.near_threshold`: 0.2 is out of range — it must be >= 0.5" in problems
    assert "`data.check.leakage`: 'ignore' is not allowed; choose one of: stop, warn" in problems
    assert any(p.startswith("`data.class_weights`:") and "neither 'auto' nor an existing JSON file" in p
               for p in problems)


def test_recipe_changes_name_each_differing_key_in_order():
    """What `train --resume` and `compare` say when a run's recipe is not the one asked for."""
    from tunesmith.recipe import recipe_changes

    before = "model: {name: default}\ntrain: {epochs: 2, learning_rate: 0.001}\nmethod: {name: classify}\n"
    after = "model: {name: default}\ntrain: {epochs: 4, learning_rate: 0.001}\nmethod: {name: classify, " \
            "head_init: probe}\n"
    assert recipe_changes(before, after) == "train.epochs 2 -> 4, method.head_init (new) probe"
    assert recipe_changes(after, before) == "train.epochs 4 -> 2, method.head_init probe (gone)"
    assert recipe_changes(before, before) == ""
    many = "train: {a: 1, b: 1, c: 1, d: 1, e: 1, f: 1}\n"
    assert recipe_changes(many, many.replace("1", "2"), limit=4) == \
        "train.a 1 -> 2, train.b 1 -> 2, train.c 1 -> 2, train.d 1 -> 2, and 2 more"


def test_classify_head_init_and_probe_c_reject_bad_values_by_name(tmp_path):
    path = write_recipe(tmp_path, recipe_with(method={"name": "classify", "head_init": "prob", "probe_C": 0}))
    assert problems_of(path) == [
        "`method.head_init`: 'prob' is not allowed; choose one of: random, probe; did you mean 'probe'?",
        "`method.probe_C`: 0 is out of range — it must be > 0.0"]


def test_a_program_that_imports_only_the_recipe_module_can_load_a_recipe(tmp_path):
    """The registry is looked up at run time when nothing registered it (a script using tunesmith as a library)."""
    import subprocess
    import sys

    (tmp_path / "train.jsonl").write_text('{"text": "hello there"}\n')
    (tmp_path / "r.yaml").write_text("data: {train: train.jsonl}\nmethod: {name: pretrain}\n")
    code = ("import sys; from tunesmith.recipe import load_recipe; "
            "assert 'tunesmith.methods' not in sys.modules; "
            f"print(load_recipe({str(tmp_path / 'r.yaml')!r}).method.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pretrain"
