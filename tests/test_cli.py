"""The command line: exit codes, messages on the right stream, no tracebacks for bad input. No model is trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tunesmith.cli import main
from tunesmith.errors import RecipeError
from tunesmith.recipe import starter_recipe

BAD_RECIPE = """\
data:
  train: train.jsonl
train:
  batch_size: 0
  scheduler: cosin
  learnig_rate: 1.0e-4
"""
BAD_PROBLEMS = [
    "`train.scheduler`: 'cosin' is not allowed; choose one of: linear, cosine, constant; did you mean 'cosine'?",
    "`train.batch_size`: 0 is out of range — it must be > 0",
    "`train.learnig_rate`: unknown key (given 0.0001); allowed here: ",
]


@pytest.fixture
def good_recipe(tmp_path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}, {"text": "world"}])
    path = tmp_path / "good.yaml"
    path.write_text("data:\n  train: train.jsonl\n", encoding="utf-8")
    return path


@pytest.fixture
def bad_recipe(tmp_path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}])
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_RECIPE, encoding="utf-8")
    return path


@pytest.fixture
def quiet_env(monkeypatch):
    """Commands that touch libraries set TOKENIZERS_PARALLELISM; keep that out of later tests."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


# ----------------------------------------------------------------------------------------------- init


def test_init_writes_the_starter_recipe(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    assert main(["init", str(path)]) == 0
    assert path.read_text() == starter_recipe("mine.yaml")
    assert yaml.safe_load(path.read_text())["data"]["train"] == "train.jsonl"
    out = capsys.readouterr().out
    assert out == f"wrote {path}; edit data.train, then `tunesmith validate {path}`\n"


def test_init_default_path_is_recipe_yaml_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (tmp_path / "recipe.yaml").read_text() == starter_recipe("recipe.yaml")


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("mine: true\n")
    assert main(["init", str(path)]) == 2
    assert path.read_text() == "mine: true\n"
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"error: {path} already exists",
                                         "hint: pass --force to overwrite it, or give another path"]
    assert main(["init", str(path), "--force"]) == 0
    assert path.read_text() == starter_recipe("recipe.yaml")


def test_init_into_a_new_folder(tmp_path, capsys):
    path = tmp_path / "configs" / "recipe.yaml"
    assert main(["init", str(path)]) == 0
    assert path.read_text() == starter_recipe("recipe.yaml")


# ----------------------------------------------------------------------------------------------- validate


def test_validate_good_recipe_prints_ok(good_recipe, tmp_path, capsys):
    assert main(["validate", str(good_recipe)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == (f"{good_recipe}: ok — method sft, model default, train {tmp_path / 'train.jsonl'}, "
                            f"run folder {Path('runs') / 'good'}\n")


def test_validate_applies_command_line_overrides(good_recipe, capsys):
    assert main(["validate", str(good_recipe), "output.dir=/tmp/elsewhere", "train.epochs=2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("run folder /tmp/elsewhere")
    assert main(["validate", str(good_recipe), "train.epochs=0"]) == 2
    assert "`train.epochs`: 0 is out of range — it must be > 0" in capsys.readouterr().err


def test_validate_bad_recipe_lists_every_problem_without_a_traceback(bad_recipe, capsys):
    assert main(["validate", str(bad_recipe)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"error: {bad_recipe}: 3 problems:"
    for problem in BAD_PROBLEMS:
        assert sum(line.startswith(f"  - {problem}") for line in lines) == 1, problem
    assert lines[-1] == "hint: fix each line above; `tunesmith init` writes a commented starter recipe"
    assert len(lines) == 5
    assert "Traceback" not in captured.err


def test_validate_missing_recipe_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"recipe file not found: {path} (create one with `tunesmith init {path}`)" in err


def test_validate_with_debug_lets_the_error_propagate(bad_recipe):
    with pytest.raises(RecipeError) as info:
        main(["validate", "--debug", str(bad_recipe)])
    assert len(info.value.problems) == 3


def test_debug_before_the_subcommand_also_propagates(bad_recipe):
    with pytest.raises(RecipeError):
        main(["--debug", "validate", str(bad_recipe)])


def test_validate_bad_recipe_in_a_subprocess(bad_recipe):
    result = run_cli("validate", str(bad_recipe))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {bad_recipe}: 3 problems:\n")
    for problem in BAD_PROBLEMS:
        assert f"  - {problem}" in result.stderr


def test_validate_good_recipe_in_a_subprocess(good_recipe, tmp_path):
    result = run_cli("validate", "good.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("good.yaml: ok — method sft, model default")


# ----------------------------------------------------------------------------------------------- methods, argparse


def test_methods_lists_every_registered_method(capsys):
    from tunesmith.methods import REGISTRY

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert names[:len(REGISTRY)] == list(REGISTRY)  # then the adapters (tests/test_recipe.py checks the rows)
    assert "supervised fine-tuning" in lines[0]
    assert lines[1].strip() == "trains on: chat, instruction, classification, text, preference"
    assert lines[2].split()[0] == "method.adapter" and lines[3].split()[0] == "method.train_on"


@pytest.mark.parametrize("argv, words", [
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
    (["validate"], "the following arguments are required: recipe"),
    (["validate", "r.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    (["export", "some-run"], "the following arguments are required: --merge"),
    (["data"], "the following arguments are required: SUBCOMMAND"),
    (["generate", "run"], "the following arguments are required: prompts"),
])
def test_bad_arguments_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_unknown_subcommand_in_a_subprocess():
    result = run_cli("bogus")
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------- train, data, generate


def test_train_resume_without_a_run_exits_2(good_recipe, tmp_path, capsys, quiet_env):
    run_dir = tmp_path / "no-run-yet"
    assert main(["train", str(good_recipe), f"output.dir={run_dir}", "--resume"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {run_dir}: nothing to resume (no recipe.yaml)",
                                         "hint: run without --resume to start"]
    assert not run_dir.exists()


def test_train_resume_with_a_different_recipe_exits_2(good_recipe, tmp_path, capsys, quiet_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("data: {train: other.jsonl}\n")
    assert main(["train", str(good_recipe), f"output.dir={run_dir}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: {run_dir}: the recipe differs from the one this run started with: data.train other.jsonl -> " \
        in err and ", and " in err and " more" in err  # the first changes named, the rest counted
    assert (run_dir / "recipe.yaml").read_text() == "data: {train: other.jsonl}\n"


def test_train_bad_recipe_exits_2_before_anything_starts(bad_recipe, tmp_path, capsys):
    assert main(["train", str(bad_recipe), f"output.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad_recipe}: 3 problems:")
    assert not (tmp_path / "run").exists()


def test_data_preview_with_a_missing_recipe_exits_2(tmp_path, capsys):
    assert main(["data", "preview", str(tmp_path / "none.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_generate_on_a_folder_that_is_not_a_run(tmp_path, capsys, quiet_env):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    assert main(["generate", str(folder), "hello"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"error: {folder}: not a finished tunesmith run (no manifest.json)",
        "hint: give the folder `tunesmith train` wrote (output.dir), after it finished"]
    assert main(["generate", str(tmp_path / "missing"), "hello"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: {tmp_path / 'missing'}: no such run folder"
