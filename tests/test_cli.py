"""The command line: exit codes, messages on the right stream, no tracebacks for bad input. No model is trained."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tunesmith import cli_common
from tunesmith.cli import build_parser, main
from tunesmith.cli_common import (comma_list, finite_float, fraction, non_negative_float, non_negative_int,
                                  positive_float, positive_int)
from tunesmith.errors import RecipeError, TunesmithError
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
    (["export", "some-run"], "say what to write with --format merged|gguf|ollama (or --merge)"),
    (["data"], "the following arguments are required: SUBCOMMAND"),
    (["generate", "run"], "the following arguments are required: prompts"),
])
def test_bad_arguments_exit_2(argv, words, capsys):
    assert main(argv) == 2  # main returns argparse's code too, as it does for every other bad input
    assert words in capsys.readouterr().err


def test_help_returns_0(capsys):
    assert main(["data", "split", "--help"]) == 0
    assert "--fractions" in capsys.readouterr().out


def test_unknown_subcommand_in_a_subprocess():
    result = run_cli("bogus")
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------- argument types


@pytest.mark.parametrize("convert, good, bad", [
    (positive_int, {"1": 1, "16": 16, " 3 ": 3}, ["0", "-3", "1.5", "ten", ""]),
    (non_negative_int, {"0": 0, "42": 42}, ["-1", "nan", "1e3"]),
    (cli_common.port, {"0": 0, "8765": 8765, "65535": 65535}, ["99999", "65536", "-1", "http"]),
    (finite_float, {"0.5": 0.5, "-2": -2.0, "1e-3": 0.001}, ["nan", "inf", "-inf", "NaN", "x"]),
    (positive_float, {"120": 120.0, "0.5": 0.5}, ["0", "-1", "nan", "inf"]),
    (non_negative_float, {"0": 0.0, "0.7": 0.7}, ["-0.1", "nan", "inf"]),
    (fraction, {"0": 0.0, "1": 1.0, "0.25": 0.25}, ["nan", "1.5", "-0.1", "inf"]),
])
def test_argument_types_keep_good_values_and_name_bad_ones(convert, good, bad):
    for text, value in good.items():
        assert convert(text) == value and type(convert(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError) as info:
            convert(text)
        assert str(info.value) == f"{text!r} is not {convert.__name__}"


def test_comma_list_checks_every_item():
    assert comma_list(fraction)("0.8, 0.1,0.1") == [0.8, 0.1, 0.1]
    with pytest.raises(argparse.ArgumentTypeError, match="'nan' is not a number from 0 to 1"):
        comma_list(fraction)("nan,0.5,0.5")


def test_path_type_expands_home_and_refuses_an_unknown_user():
    assert cli_common.path("~/data/x.jsonl") == str(Path.home() / "data" / "x.jsonl")
    assert cli_common.path("data/x.jsonl") == "data/x.jsonl"
    with pytest.raises(argparse.ArgumentTypeError, match="can't expand '~nosuchuser-ts' \\(no such user\\)"):
        cli_common.path("~nosuchuser-ts/x.jsonl")


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield parser.prog, action


def test_every_numeric_option_is_checked_where_it_is_parsed():
    """No option takes a bare int or float: each uses a checking type, so -1, 0 or nan is refused by name."""
    actions = list(_actions(build_parser()))
    assert len(actions) > 100
    assert [(prog, a.dest) for prog, a in actions if a.type in (int, float)] == []
    checked = {prog.split(" ", 1)[1] for prog, a in actions if a.type in (positive_int, non_negative_int)}
    assert {"generate", "chat", "eval", "compare", "review", "predict", "data balance", "data synth",
            "data clean", "data check", "data split", "data augment", "data preview"} <= checked


def test_every_path_argument_expands_home():
    names = {"recipe", "path", "run", "run_a", "run_b", "data", "against", "out", "export", "file", "seeds",
             "documents", "existing", "teacher", "reward_model", "model"}
    loose = [(prog, a.dest) for prog, a in _actions(build_parser())
             if a.dest in names and a.type is not cli_common.path and not (prog == "tunesmith eval" and
                                                                          a.dest == "against")]
    assert loose == []


def test_the_data_commands_never_import_cli():
    """Imports flow one way: cli > cli_data, cli_synth > cli_common."""
    import tunesmith

    forbidden = {"cli_common": {"cli", "cli_data", "cli_synth"}, "cli_data": {"cli", "cli_synth"},
                 "cli_synth": {"cli", "cli_data"}}
    for module, names in forbidden.items():
        tree = ast.parse(Path(tunesmith.__file__).with_name(f"{module}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & {f"tunesmith.{n}" for n in names}, module


# ----------------------------------------------------------------------------------------------- closed pipes


@pytest.mark.parametrize("argv, code", [(["methods"], 141), (["data", "check", "--help"], 0)])
def test_a_reader_that_stops_early_gets_no_traceback(argv, code):
    """`tunesmith methods | head -1`: the reader has gone before anything is written."""
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == code
    assert err == ""


def test_a_reader_that_takes_one_line(tmp_path):
    result = subprocess.run(f"{sys.executable} -m tunesmith methods | head -1", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.startswith("sft ") and result.stdout.count("\n") == 1
    assert result.stderr == ""


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


def test_init_refuses_a_folder_even_with_force(tmp_path, capsys):
    assert main(["init", str(tmp_path), "--force"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path}: is a folder; `init` writes a recipe file",
        f"hint: give a file name, e.g. tunesmith init {tmp_path / 'recipe.yaml'}"]
    (tmp_path / "notes").write_text("mine\n")
    assert main(["init", str(tmp_path / "notes" / "recipe.yaml")]) == 2
    assert f"error: {tmp_path / 'notes' / 'recipe.yaml'}: can't make the folder {tmp_path / 'notes'}" \
        in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"] and (tmp_path / "notes").read_text() == "mine\n"


# ----------------------------------------------------------------------------------------------- export paths


@pytest.fixture
def manifest_only_run(tmp_path) -> tuple[Path, Path]:
    """A run folder holding a manifest and placeholder adapter files (and a base model folder): enough for the
    checks that come before anything loads."""
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    run = tmp_path / "runs" / "r"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (run / "manifest.json").write_text(json.dumps({"tunesmith_run": 1, "method": "sft", "saved": "adapter",
                                                   "base_model": {"name": str(base), "resolved": str(base)}}))
    return run, base


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_an_out_related_to_the_run_or_its_base_before_loading_anything(manifest_only_run, tmp_path,
                                                                                      monkeypatch):
    from tunesmith import generate

    run, base = manifest_only_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "file.bin").write_bytes(b"x")
    monkeypatch.setattr(generate, "load_run", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr("tunesmith.methods.adapters.run_adapter", lambda *a, **k: pytest.fail("read the adapter"))
    before = _tree(tmp_path)
    for out, words in [
        (run, f"--out {run}: the output would replace the run {run} it exports from"),
        (tmp_path / "runs", f"--out {tmp_path / 'runs'}: the output would replace the run {run}"),
        (base, f"--out {base}: the output would be (or contain, or lie inside) the input {base}"),
        (base / "merged", f"--out {base / 'merged'}: the output would be (or contain, or lie inside) the input"),
        (mine, f"--out {mine}: not a folder tunesmith exported (no tunesmith_export.json); --overwrite replaces "
               "only those"),
        (tmp_path / "file.bin", f"--out {tmp_path / 'file.bin'}: is a file; give a folder"),
        (tmp_path / "no" / "such", f"--out {tmp_path / 'no' / 'such'}: the folder {tmp_path / 'no'} does not exist"),
    ]:
        with pytest.raises(TunesmithError) as info:
            generate.export_merged(run, out, overwrite=True)
        assert info.value.message == words or info.value.message.startswith(words), info.value.message
    with pytest.raises(TunesmithError, match="already exists"):
        generate.export_merged(run, mine, overwrite=False)
    assert _tree(tmp_path) == before


def test_export_target_allows_the_default_and_an_earlier_export(manifest_only_run, tmp_path):
    from tunesmith.artifacts import open_run
    from tunesmith.generate import EXPORT_MARKER, export_target

    run, _ = manifest_only_run
    opened = open_run(run)
    manifest = opened.read_manifest()
    assert export_target(opened, manifest, run / "merged", overwrite=False) == run / "merged"
    earlier = tmp_path / "exported"
    earlier.mkdir()
    (earlier / EXPORT_MARKER).write_text("{}")
    assert export_target(opened, manifest, earlier, overwrite=True) == earlier
    with pytest.raises(TunesmithError, match="already exists"):
        export_target(opened, manifest, earlier, overwrite=False)


# ----------------------------------------------------------------------------------------------- predict


def test_predict_rejects_empty_texts_as_data_rows_are_and_labels_the_rest(manifest_only_run, monkeypatch, capsys):
    from tunesmith import predict

    run, _ = manifest_only_run
    sent = []

    def fake_predict_texts(run_path, texts, top=3, batch_size=16, labels=None):
        sent.append(list(texts))
        return [{"label": "pos", "probability": 0.75, "top": [{"label": "pos", "probability": 0.75}]} for _ in texts]

    monkeypatch.setattr(predict, "predict_texts", fake_predict_texts)
    assert main(["predict", str(run), "a fine day", "", "   ", "a dull day"]) == 0
    captured = capsys.readouterr()
    assert sent == [["a fine day", "a dull day"]]
    assert captured.out.splitlines() == ["pos  0.750  a fine day", "pos  0.750  a dull day"]
    assert captured.err.splitlines() == ["text 2: rejected — empty field: the text has no words",
                                         "text 3: rejected — empty field: the text has no words",
                                         "4 texts given, 2 to label, 2 rejected (empty field ×2)"]
    assert main(["predict", str(run), ""]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == ["text 1: rejected — empty field: the text has no words",
                       "1 text given, 0 to label, 1 rejected (empty field ×1)",
                       "error: no text to label: every text given is empty"]
    assert sent == [["a fine day", "a dull day"]]  # nothing sent to the model
