"""`tunesmith tune` on a tiny random Llama: a seeded search repeats its trials, pruning stops a planted bad trial, a
killed search resumes to the same number of trials, two worker processes share one study without duplicates, the
grid visits each point once, best.yaml trains, and the final comparison's numbers match the evaluation files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from test_check import CLEAN, LABELS
from test_compare import VALIDATION
from tunesmith.errors import RecipeError
from tunesmith.recipe import load_recipe
from tunesmith.tune import TuneOptions, parse_duration, run_tune
from tunesmith.tune_space import parse_space

RECIPE = """\
model:
  name: {model}
data:
  train: train.jsonl
  validation: validation.jsonl
  validation_fraction: 0.25
method:
  name: sft
  adapter: lora
  lora: {{r: 4}}
train:
  learning_rate: 1.0e-3
  batch_size: 4
  max_steps: 3
  max_seq_len: 64
  eval_every: 1
  log_every: 1
  seed: 7
eval:
  loss_rows: 4
output:
  dir: runs/tiny
"""
SPACE = "train.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}\nmethod.lora.r: [2, 4, 8]\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("tune")
    write_jsonl(folder / "train.jsonl", [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)])
    write_jsonl(folder / "validation.jsonl", [{"text": t, "label": "pos" if i % 2 == 0 else "neg"}
                                              for i, t in enumerate(VALIDATION)])
    (folder / "recipe.yaml").write_text(RECIPE.format(model=tiny_model_dir))
    (folder / "space.yaml").write_text(SPACE)
    return folder


def search(folder: Path, name: str, trials: int, *overrides: str, **options) -> dict:
    options.setdefault("final", False)
    return run_tune(TuneOptions(recipe=str(folder / "recipe.yaml"), space=options.pop("space", str(
        folder / "space.yaml")), trials=trials, overrides=[f"output.dir={folder / 'runs' / name}", *overrides],
        **options), echo=lambda s: None)


def finished(summary: dict) -> list[dict]:
    return [t for t in summary["trials"] if t["state"] in ("complete", "pruned")]


def test_seeded_search_repeats_its_trials(folder):
    a = search(folder, "seeded-a", 3, seed=3)
    b = search(folder, "seeded-b", 3, seed=3)
    other = search(folder, "seeded-c", 1, seed=4, pruner="none")
    assert [t["params"] for t in a["trials"]] == [t["params"] for t in b["trials"]]
    assert [t["value"] for t in a["trials"]] == pytest.approx([t["value"] for t in b["trials"]], abs=1e-6)
    assert other["trials"][0]["params"] != a["trials"][0]["params"]
    assert len(finished(a)) == 3
    # every trial is a normal run folder whose manifest holds the value the study recorded
    for t in a["trials"]:
        run = Path(t["run"])
        manifest = json.loads((run / "manifest.json").read_text())
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        assert recipe["train"]["learning_rate"] == pytest.approx(t["params"]["train.learning_rate"])
        assert recipe["method"]["lora"]["r"] == t["params"]["method.lora.r"]
        assert recipe["data"]["validation"] is None  # the search never reads the validation file
        if t["state"] == "complete":
            assert manifest["losses"]["validation_after"] == pytest.approx(t["value"])
            assert 0 < t["cpu_seconds"] and 0 < manifest["timings"]["total_seconds"] <= t["seconds"]
    # the page: one dot per finished trial in the history and in each parameter's chart
    page = (folder / "runs" / "seeded-a-tune" / "report.html").read_text()
    assert page.count("data-state=") == 3 * (1 + 2)
    assert "<script" not in page
    best = min((t for t in a["trials"] if t["state"] == "complete"), key=lambda t: t["value"])
    assert a["best"]["number"] == best["number"]


def test_pruning_stops_a_planted_bad_trial(folder):
    # on this random tiny model a huge learning rate lowers the loss for three steps before it diverges (NaN
    # gradients at step 4, a failed trial); the planted bad trial is one that learns nothing: 1e-7
    (folder / "bad-space.yaml").write_text("train.learning_rate: [0.01, 1.0e-7]\n")
    summary = search(folder, "pruned", 2, "train.max_steps=4", space=str(folder / "bad-space.yaml"),
                     enqueue=["train.learning_rate=0.01", "train.learning_rate=1e-7"])
    good, bad = summary["trials"]
    assert good["params"] == {"train.learning_rate": 0.01} and good["state"] == "complete"
    assert bad["params"] == {"train.learning_rate": 1e-7} and bad["state"] == "pruned"
    assert bad["pruned_at"] == 1 and bad["steps"] in (1, None)  # stopped at its first evaluation, not step 4
    assert good["steps"] == 4
    if bad["intermediate"]:  # a finite value was reported: worse than the good trial's at the same step
        assert bad["intermediate"][1] > good["intermediate"][1]
    note = json.loads((Path(bad["run"]) / "tune_trial.json").read_text())
    assert note["state"] == "pruned" and "half-trained" in note["note"]
    assert summary["best"]["number"] == good["number"]


def _command(folder: Path, name: str, trials: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tunesmith", "tune", str(folder / "recipe.yaml"),
            f"output.dir={folder / 'runs' / name}", "--space", str(folder / "space.yaml"), "--trials", str(trials),
            "--no-final", *flags]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def _trials(storage: Path) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=storage.parent.name, storage=f"sqlite:///{storage}").get_trials()


def test_killed_search_resumes_with_the_same_number_of_trials(folder):
    import optuna

    db = folder / "runs" / "killed-tune" / "study.db"
    proc = subprocess.Popen(_command(folder, "killed", 4, "--pruner", "none"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if not (db.parent / "logs" / "trial-000.log").exists():  # the study is made (reading it while the worker
                continue  # creates its tables could break that)
            try:
                trials = _trials(db)
            except Exception:  # noqa: BLE001 - the study is still being created
                continue
            states = [t.state for t in trials]
            running = states[-1:] == [optuna.trial.TrialState.RUNNING] and trials[-1].params  # values chosen
            if states.count(optuna.trial.TrialState.COMPLETE) >= 1 and running:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = _trials(db)
    killed = [t for t in before if t.state == optuna.trial.TrialState.RUNNING]
    assert killed, "the worker was not killed during a trial"
    summary = search(folder, "killed", 4, resume=True, pruner="none")
    assert len([t for t in summary["trials"] if t["state"] == "complete"]) == 4
    marked = [t for t in summary["trials"] if t["killed"]]
    assert [t["number"] for t in marked] == [t.number for t in killed] and marked[0]["state"] == "failed"
    # the killed trial's half-trained folder is set aside, and its values are tried again
    assert (folder / "runs" / "killed-tune" / f"trial-{killed[0].number:03d}.killed").is_dir() or \
        not (folder / "runs" / "killed-tune" / f"trial-{killed[0].number:03d}").exists()
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    assert killed[0].params in [t["params"] for t in complete]
    finished_before = [t.number for t in before if t.state == optuna.trial.TrialState.COMPLETE]
    assert set(finished_before) <= {t["number"] for t in complete}  # finished trials were not repeated


def test_two_workers_share_one_study_without_duplicates(folder):
    import optuna

    command = _command(folder, "workers", 6, "--resume", "--pruner", "none", "--sampler", "random")
    procs = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = [t for t in _trials(folder / "runs" / "workers-tune" / "study.db") if not t.user_attrs.get("surplus")]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    params = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(params)) == len(params)  # no two trials with the same values
    assert len({t.user_attrs["run"] for t in complete}) == 6
    assert len({t.user_attrs["pid"] for t in complete}) == 2  # both workers trained trials


def test_grid_visits_each_point_once(folder):
    (folder / "grid.yaml").write_text("train.learning_rate: [0.001, 0.002]\nmethod.lora.r: [2, 4]\n")
    summary = search(folder, "grid", 10, space=str(folder / "grid.yaml"), sampler="grid", pruner="none")
    points = sorted((t["params"]["train.learning_rate"], t["params"]["method.lora.r"]) for t in summary["trials"])
    assert points == [(0.001, 2), (0.001, 4), (0.002, 2), (0.002, 4)]


def test_best_yaml_trains_and_the_final_comparison_adds_up(folder):
    from tunesmith.compare_table import paired_difference
    from tunesmith.train import train_run

    summary = search(folder, "final", 2, final=True, pruner="none")
    tune = folder / "runs" / "final-tune"
    best = summary["best"]["params"]
    recipe = load_recipe(tune / "best.yaml", [f"output.dir={folder / 'runs' / 'from-best'}"])
    assert recipe.train.learning_rate == pytest.approx(best["train.learning_rate"])
    assert recipe.method.lora.r == best["method.lora.r"]
    assert recipe.data.validation == str((folder / "validation.jsonl").resolve())  # a normal recipe: its own data
    manifest = train_run(recipe, echo=lambda s: None)
    assert manifest["training"]["steps"] == 3
    final = summary["final"]
    assert final["rows"] == len(VALIDATION) and final["metric"] == "accuracy"
    rows = {}
    for arm in ("best", "recipe"):
        examples = [json.loads(x) for x in (tune / "final" / f"{arm}-seed7" / "eval" / "tune" / "examples.jsonl")
                    .read_text().splitlines()]
        rows[arm] = [e["tuned"] for e in examples]
    mean = {arm: sum(r["accuracy"] for r in rows[arm]) / len(rows[arm]) for arm in rows}
    assert final["best"]["value"] == pytest.approx(mean["best"])
    assert final["recipe"]["value"] == pytest.approx(mean["recipe"])
    expected = paired_difference(rows["best"], rows["recipe"], "classification")
    assert final["difference"]["diff"] == pytest.approx(mean["best"] - mean["recipe"])
    assert final["difference"]["ci_low"] == pytest.approx(expected["ci_low"])
    assert json.loads((tune / "tune.json").read_text())["final"]["difference"] == final["difference"]


def test_an_adapter_section_is_asked_only_with_its_adapter(folder, tiny_model_dir):
    from optuna.trial import FixedTrial

    recipe = load_recipe(folder / "recipe.yaml")
    space = parse_space({"method.lora.r": [2, 4], "method.adapter": ["lora", "ia3"],
                         "train.learning_rate": {"log_uniform": [1e-4, 1e-2]}}, recipe)
    assert space.keys() == ["method.adapter", "train.learning_rate", "method.lora.r"]  # the condition first
    lora_r = space.params[-1]
    assert lora_r.when == {"method.adapter": ["lora"]} and lora_r.when_added
    asked = space.suggest(FixedTrial({"method.adapter": "ia3", "train.learning_rate": 1e-3, "method.lora.r": 2}))
    assert asked == {"method.adapter": "ia3", "train.learning_rate": 1e-3}
    asked = space.suggest(FixedTrial({"method.adapter": "lora", "train.learning_rate": 1e-3, "method.lora.r": 2}))
    assert asked["method.lora.r"] == 2
    with pytest.raises(RecipeError) as err:
        parse_space({"method.lora.r": {"choice": [2], "when": {"method.adapter": ["ia3"]}},
                     "method.adapter": ["lora", "ia3"]}, recipe)
    assert "allow only ['lora']" in str(err.value) or "none of the adapters" in str(err.value)


def test_timeout_starts_no_trial_after_it_passes(folder):
    summary = search(folder, "timeout", 5, timeout_s=0.01, pruner="hyperband")
    assert [t["state"] for t in summary["trials"]] == ["complete"]  # the first ran to the end; no second began


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
