"""The run folder is the one contract: train stages then renames, never replaces what it did not make, records the
rows it used; later stages read only the run folder and refuse when a file they are pointed at changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl
from test_bad_input import snapshot
from tunesmith.artifacts import RunDir, open_run, read_metrics
from tunesmith.cli import main
from tunesmith.errors import DataError, RunError
from tunesmith.recipe import load_recipe
from tunesmith.train import train_run

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]


def write_recipe(folder: Path, model_dir: Path, out: str = "run", rows=CHATS, **train) -> Path:
    write_jsonl(folder / "train.jsonl", rows)
    settings = {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 64, "log_every": 1,
                "seed": 7, **train}
    lines = [f"model: {{name: {model_dir}}}", "data: {train: train.jsonl, validation_fraction: 0.2}",
             "train: " + json.dumps(settings), f"output: {{dir: {out}}}"]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def train(path: Path, *overrides: str, **kw):
    return train_run(load_recipe(path, list(overrides)), echo=lambda s: None, recipe_path=path, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny LoRA run (its folder and the recipe beside it)."""
    folder = tmp_path_factory.mktemp("finished")
    train(write_recipe(folder, tiny_model_dir, save_every=1))
    return folder


def copy_of(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "w")
    return tmp_path / "w"


# ----------------------------------------------------------------------------------------------- never delete


def test_overwrite_never_removes_the_recipes_own_folder(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, out=".")
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match="would be, contain or lie inside"):
        train(path, "output.overwrite=true")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_run_tunesmith_made(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, out="elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "thesis.tex").write_text("years of work")
    with pytest.raises(RunError, match="not a tunesmith run folder"):
        train(path, "output.overwrite=true")
    assert (tmp_path / "elsewhere" / "thesis.tex").read_text() == "years of work"


def test_overwrite_happens_only_after_the_data_is_read_and_checked(finished, tmp_path):
    work = copy_of(finished, tmp_path)
    old_manifest = (work / "run" / "manifest.json").read_text()
    write_jsonl(work / "train.jsonl", CHATS[:16] + ["{broken"] * 4)  # 4 of 20 rejected: above 5%
    with pytest.raises(DataError, match="4 of 20 rows rejected"):
        train(work / "recipe.yaml", "output.overwrite=true")
    assert (work / "run" / "manifest.json").read_text() == old_manifest  # the old run is intact
    assert len((work / "run.failed" / "rejects.jsonl").read_text().splitlines()) == 4
    assert not [p for p in work.iterdir() if p.name.startswith(".run.")]


def test_a_gate_failure_leaves_nothing_in_the_way_of_the_next_train(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, rows=CHATS + CHATS[:5])  # 5 exact duplicates: above 5%
    with pytest.raises(DataError, match="data check found problems"):
        train(path)
    assert not (tmp_path / "run").exists() and (tmp_path / "run.failed" / "data_check.html").is_file()
    write_jsonl(tmp_path / "train.jsonl", CHATS)
    manifest = train(path)  # no output.overwrite needed: nothing half-made was left at runs/…
    assert manifest["training"]["steps"] == 2


# ----------------------------------------------------------------------------------------------- the run's rows


def test_eval_reads_the_held_out_rows_from_the_run_not_the_changed_file(tmp_path, tiny_model_dir, capsys):
    work = tmp_path
    train(write_recipe(work, tiny_model_dir))
    held = [json.loads(x) for x in (work / "run" / "data" / "validation.jsonl").read_text().splitlines()]
    write_jsonl(work / "train.jsonl", list(reversed(CHATS)))  # same rows, other order: a re-split would differ
    from tunesmith.evaluation.runner import EvalOptions, eval_rows

    rows = eval_rows(open_run(work / "run"), EvalOptions())
    assert [(r.line, r.data) for r in rows.rows] == [(h["line"], h["data"]) for h in held]
    assert len(rows.train) == 16 and not rows.excluded
    code = main(["eval", str(work / "run"), "--data", str(work / "train.jsonl"), "--no-forgetting"])
    err = capsys.readouterr().err
    assert code == 2 and "changed since the run trained on it" in err
    recorded = json.loads((work / "run" / "data" / "data.json").read_text())["hashes"]
    assert next(iter(recorded.values()))[:16] in err  # both hashes are named
    for argv in (["predict", str(work / "run"), "--data", str(work / "train.jsonl"), "--labels", "a,b"],
                 ["review", str(work / "run"), "base", "--data", str(work / "train.jsonl")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "changed since the run trained on it" in err
        assert f"{argv[0]} --data" in err


def test_resume_refuses_a_changed_training_file(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, max_steps=4, save_every=2)
    train(path)
    write_jsonl(tmp_path / "train.jsonl", CHATS[:-1])
    with pytest.raises(DataError, match="changed since the run trained on it") as stopped:
        train(path, resume=True)
    assert "--resume" in stopped.value.message


# ----------------------------------------------------------------------------------------------- damaged folders


@pytest.mark.parametrize("damage, named", [
    (lambda run: (run / "manifest.json").write_text((run / "manifest.json").read_text()[:40]), "manifest.json"),
    (lambda run: shutil.rmtree(run / "adapter"), "adapter_config.json"),
    (lambda run: (run / "adapter" / "adapter_model.safetensors").unlink(), "safetensors"),
    (lambda run: shutil.rmtree(run / "tokenizer"), "tokenizer_config.json"),
    (lambda run: (run / "data" / "validation.jsonl").write_text("{torn"), "validation.jsonl"),
])
def test_a_damaged_run_folder_is_an_error_naming_the_file(finished, tmp_path, capsys, damage, named):
    run = copy_of(finished, tmp_path) / "run"
    damage(run)
    code = main(["eval", str(run), "--no-forgetting", "--against", "base"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and named in err, err


def test_a_torn_last_metrics_line_is_left_out_and_a_torn_middle_line_named(finished, tmp_path):
    run = copy_of(finished, tmp_path) / "run"
    rows = read_metrics(run / "metrics.jsonl")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    assert read_metrics(run / "metrics.jsonl") == rows
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1] + ["{bad"] + lines[1:]) + "\n")
    with pytest.raises(RunError, match="metrics.jsonl, line 2"):
        read_metrics(run / "metrics.jsonl")


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, max_steps=4, save_every=1, save_total_limit=4)
    straight = train(path)
    run = RunDir(tmp_path / "run")
    (run.checkpoints / "checkpoint-4" / "trainer_state.json").unlink()  # the kill came before the last write
    (run.checkpoints / "checkpoint-3" / "trainer_state.json").write_text('{"global_st')
    assert run.last_checkpoint().name == "checkpoint-2"
    (run.manifest).unlink()
    resumed = train(path, resume=True)
    assert resumed["training"]["steps"] == 4
    assert abs(resumed["losses"]["validation_after"] - straight["losses"]["validation_after"]) < 1e-4


# ----------------------------------------------------------------------------------------------- counts


def test_a_diverging_loss_stops_training_and_saves_no_weights(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, max_steps=6, learning_rate=1e30)
    from tunesmith.methods.common import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d") as stopped:
        train(path)
    assert "learning rate" in stopped.value.hint
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "manifest.json").exists()


def test_too_few_rows_to_validate_stops_with_the_reason(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, rows=CHATS[:2])
    with pytest.raises(DataError, match="1 training row.* at least 2"):
        train(path)  # 2 rows: one is held out
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    val = write_jsonl(tmp_path / "val.jsonl", [long])
    with pytest.raises(DataError, match="`data.validation`.*leaves no validation rows"):
        train(path, f"data.validation={val}", "data.max_reject_fraction=1",
              f"data.train={write_jsonl(tmp_path / 'more.jsonl', CHATS)}")


def test_rows_rejected_at_formatting_count_toward_the_reject_share(tmp_path, tiny_model_dir):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    path = write_recipe(tmp_path, tiny_model_dir, rows=CHATS + [long] * 3)
    with pytest.raises(DataError, match=r"3 of 23 rows rejected .*no trained tokens"):
        train(path)
