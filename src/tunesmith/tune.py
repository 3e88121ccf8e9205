"""`tunesmith tune RECIPE --space SPACE.yaml --trials N`: hyper-parameter search on Optuna, honest about what it bought.

Read top to bottom: the plan (recipe, space, metric, sampler, pruner and the study folder, all checked before anything
trains), the study (Optuna storage: SQLite in runs/NAME-tune/study.db unless --storage), the trials (each a normal
run folder runs/NAME-tune/trial-NNN/, trained with train_run on the recipe plus the trial's values, scored on a
validation split carved from the training rows — the recipe's validation file is never seen by the search), pruning
(the run's own `train.eval_every` evaluations reported to the pruner), and the final comparison: the winner and the
recipe as written retrained (`--seeds K` seeds each) and scored once on the validation file, paired, with bootstrap
intervals, in `tunesmith eval` terms. best.yaml is a normal recipe; tune.json and report.html say what happened.

Several processes — on one machine or many, sharing a `--storage` database — work on one study at once: each runs
`tunesmith tune … --resume`; trial numbers come from the storage, so no two workers train the same trial, and each
trial's sampler is seeded by the study seed and the trial's number (a seeded search repeats its trials).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith import artifacts
from tunesmith.errors import RecipeError, RunError, TunesmithError
from tunesmith.methods import REGISTRY
from tunesmith.recipe import Recipe, apply_overrides, load_recipe, parse_recipe
from tunesmith.tune_space import Space, load_space, overrides, recipe_dict
from tunesmith.tune_study import locked, open_study, trial_folder, wait_for_others

METRICS = {"validation.loss": ("eval_loss", "validation_after", "min"),
           "validation.accuracy": ("eval_accuracy", "validation_accuracy_after", "max")}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
FINAL = "final"  # runs/NAME-tune/final/{best,recipe}-seedS: the retrained winner and the recipe as written
MAX_FAILED_IN_A_ROW = 3


@dataclass
class TuneOptions:
    """What to search and how (the `tunesmith tune` arguments)."""

    recipe: str
    space: str
    trials: int
    overrides: list[str] = field(default_factory=list)
    timeout_s: float | None = None  # no new trial starts after this (a running one finishes)
    metric: str = "validation.loss"
    direction: str | None = None  # min | max; default: the metric's own
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    storage: str | None = None  # an Optuna storage URL; default sqlite:///runs/NAME-tune/study.db
    resume: bool = False  # continue (or join) the study instead of starting one
    seeds: int = 1  # the winner and the recipe as written are retrained with this many seeds
    data: str | None = None  # the file the final comparison scores (default: the recipe's data.validation)
    enqueue: list[str] = field(default_factory=list)  # 'k=v,k=v' settings tried first
    final: bool = True  # retrain and compare once the trials are done
    limit: int | None = None  # final comparison: first N rows
    batch_size: int = 16  # final comparison's evaluation batch


@dataclass
class TunePlan:
    """Everything checked before the first trial."""

    options: TuneOptions
    recipe: Recipe
    space: Space
    folder: Path
    storage: str
    study_name: str
    direction: str
    eval_key: str
    manifest_key: str
    prunable: str | None  # None when pruning works; otherwise why not (said once)
    enqueued: list[dict[str, Any]]
    final_data: str | None


# ----------------------------------------------------------------------------------------------- the plan


def plan_tune(options: TuneOptions) -> TunePlan:
    """Check the recipe, the space and every option together; one error listing every problem."""
    recipe = load_recipe(options.recipe, options.overrides)
    problems: list[str] = []
    try:
        space = load_space(options.space, recipe)
    except RecipeError as exc:
        problems += [f"{exc.source}: {p}" for p in exc.problems]
        space = None
    method = REGISTRY[recipe.method.name]
    if options.metric not in METRICS:
        problems.append(f"--metric {options.metric!r}: choose one of {', '.join(METRICS)}")
    elif options.metric == "validation.accuracy" and "accuracy" not in method.metrics and method.predict is None:
        problems.append(f"--metric validation.accuracy: method {method.name} measures no accuracy on its validation "
                        "rows (classify, features and reward do); use --metric validation.loss")
    own = METRICS.get(options.metric, (None, None, None))[2]
    direction = options.direction or own
    if options.direction not in (None, "min", "max"):
        problems.append(f"--direction {options.direction!r}: choose min or max")
    elif own and direction != own:
        problems.append(f"--direction {direction} with --metric {options.metric}: that would pick the worst trial "
                        f"({options.metric} is better {'lower' if own == 'min' else 'higher'}); leave out --direction")
    if options.sampler not in SAMPLERS:
        problems.append(f"--sampler {options.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if options.pruner not in PRUNERS:
        problems.append(f"--pruner {options.pruner!r}: choose one of {', '.join(PRUNERS)}")
    if options.trials < 1:
        problems.append(f"--trials {options.trials}: give a whole number ≥ 1")
    if options.seeds < 1:
        problems.append(f"--seeds {options.seeds}: give a whole number ≥ 1")
    if options.timeout_s is not None and not (options.timeout_s > 0 and math.isfinite(options.timeout_s)):
        problems.append(f"--timeout {options.timeout_s}: give a positive time, e.g. 30m or 2h")
    if not recipe.data.validation_fraction > 0:
        problems.append("`data.validation_fraction`: 0 leaves no rows to score the trials on; tune carves its "
                        "validation split from data.train (e.g. data.validation_fraction=0.1)")
    if space is not None and options.sampler == "grid":
        problems += space.grid_problems()
    enqueued = []
    for item in options.enqueue:
        values, found = _enqueued(item, space)
        enqueued.append(values)
        problems += found
    if options.storage is not None and "://" not in options.storage:
        problems.append(f"--storage {options.storage!r}: give a database URL, e.g. sqlite:///study.db or "
                        "postgresql://user@host/db")
    if problems:
        raise RecipeError("tune", problems)
    folder = Path(f"{recipe.output.dir}-tune")
    final_data = options.data or recipe.data.validation
    if options.data and not Path(options.data).is_file():
        raise TunesmithError(f"--data {options.data}: no such file", "give the file the final comparison scores")
    eval_key, manifest_key, _ = METRICS[options.metric]
    if "ddp" not in method.strategies:
        prunable = f"method {method.name} trains no Trainer, so there are no evaluations during training to prune on"
    elif recipe.train.eval_every is None:
        prunable = "the recipe has no train.eval_every (set it, e.g. train.eval_every=50, to let the pruner see " \
                   "evaluations during training)"
    else:
        prunable = None if options.pruner != "none" else "--pruner none"
    storage = options.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    return TunePlan(options, recipe, space, folder, storage, folder.name, direction, eval_key, manifest_key,
                    prunable, enqueued, final_data)


def _enqueued(item: str, space: Space | None) -> tuple[dict[str, Any], list[str]]:
    """`--enqueue k=v,k=v`: values of the space's keys for a trial run first."""
    import yaml

    from tunesmith.recipe import RecipeLoader

    values, problems = {}, []
    keys = space.keys() if space else []
    for part in [p for p in item.split(",") if p.strip()]:
        key, sep, text = part.strip().partition("=")
        if not sep:
            problems.append(f"--enqueue {item!r}: write KEY=VALUE[,KEY=VALUE…] with keys of the space")
            continue
        if space is not None and key not in keys:
            problems.append(f"--enqueue {item!r}: {key!r} is not a key of the space ({', '.join(keys)})")
            continue
        values[key] = yaml.load(text, Loader=RecipeLoader)
    return values, problems


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '1h30m' as seconds; ValueError otherwise."""
    import re

    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(text)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)




# ----------------------------------------------------------------------------------------------- the trials


def trial_recipe(plan: TunePlan, values: dict[str, Any], out: Path, final: bool = False, seed: int | None = None,
                 ) -> Recipe:
    """The recipe with a trial's values: during the search validated on a split carved from data.train (never the
    validation file); `final` keeps the recipe's own data section."""
    raw = recipe_dict(plan.recipe, values)
    extra = [] if final else ["data.validation=null"]
    extra += [f"output.dir={json.dumps(str(out.resolve()))}", "output.overwrite=true"]
    extra += [f"train.seed={seed}"] if seed is not None else []
    raw, problems = apply_overrides(raw, overrides(values) + extra)
    return parse_recipe(raw, f"trial {out.name}", problems=problems)


def pruning_callback(trial, eval_key: str, enabled: bool):
    """A TrainerCallback reporting each evaluation during training to the trial; when the pruner says stop, it stops
    training (`pruned_at` holds the step). A non-finite value stops the trial too."""
    from transformers import TrainerCallback

    class Prune(TrainerCallback):
        pruned_at: int | None = None
        ended = False

        def on_train_end(self, args, state, control, **kwargs):
            self.ended = True

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(eval_key)
            if self.ended or state.global_step == 0 or value is None:
                return
            if not math.isfinite(value):
                self.pruned_at, control.should_training_stop = state.global_step, True
                return
            trial.report(float(value), state.global_step)
            last = bool(state.max_steps) and state.global_step >= state.max_steps  # nothing left to save by stopping
            if enabled and not last and trial.should_prune():
                self.pruned_at, control.should_training_stop = state.global_step, True

    return Prune()


def run_trials(plan: TunePlan, study, echo: Callable[[str], None]) -> None:
    """Run trials until the study holds --trials finished ones (complete or pruned, counting other workers' running
    ones), --timeout passes, or trials keep failing; then wait for other workers' running trials."""
    options = plan.options
    target = min(options.trials, plan.space.grid_size()) if options.sampler == "grid" else options.trials
    if target < options.trials:
        echo(f"--sampler grid: the space has {target} points, so {target} trials")
    _run_trials(plan, study, target, echo)
    wait_for_others(study, echo)


def _run_trials(plan: TunePlan, study, target: int, echo: Callable[[str], None]) -> None:
    import optuna

    options = plan.options
    if plan.prunable and options.pruner != "none":
        echo(f"no pruning: {plan.prunable}")
    started, failed_in_a_row = time.time(), 0
    (plan.folder / "logs").mkdir(exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while True:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if done + running >= target:
            break
        if options.timeout_s is not None and time.time() - started > options.timeout_s:
            echo(f"--timeout: {options.timeout_s:.0f} s passed; no new trial starts ({done} of {target} done)")
            break
        if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            raise RunError(f"{failed_in_a_row} trials in a row failed; the search stops",
                           f"read their logs in {plan.folder / 'logs'}")
        before = len(trials)
        study.optimize(lambda trial: objective(plan, trial, target), n_trials=1,
                       catch=(Exception,), gc_after_trial=True,
                       callbacks=[lambda s, t: t.user_attrs.get("surplus") or echo(trial_line(plan, t, target))])
        last = [t for t in study.get_trials(deepcopy=False)[before:] if t.user_attrs.get("pid") == os.getpid()]
        if last and last[-1].user_attrs.get("surplus"):
            break
        failed_in_a_row = failed_in_a_row + 1 if last and last[-1].state == optuna.trial.TrialState.FAIL else 0


def objective(plan: TunePlan, trial, target: int) -> float:
    """Train one trial's run folder and return its metric on the carved validation split."""
    from tunesmith.train import train_run

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    if _surplus(trial, target):
        trial.set_user_attr("surplus", True)
        raise Surplus(f"trial {trial.number}: other workers already hold {target} trials; not run")
    values = plan.space.suggest(trial)
    folder = plan.folder / trial_folder(trial.number)
    trial.set_user_attr("run", str(folder))
    recipe = trial_recipe(plan, values, folder)
    callback = pruning_callback(trial, plan.eval_key, plan.prunable is None)
    started, cpu = time.time(), time.process_time()
    try:
        with logged(plan.folder / "logs" / f"{folder.name}.log") as echo:
            manifest = train_run(recipe, callbacks=[callback], echo=echo)
    except Exception as exc:
        trial.set_user_attr("seconds", round(time.time() - started, 1))
        if callback.pruned_at is not None:
            return _pruned(trial, folder, callback.pruned_at, recipe, f"stopping it failed: {exc}")
        trial.set_user_attr("error", str(exc).splitlines()[0][:300])
        _note(folder, {"trial": trial.number, "state": "failed", "values": values, "error": str(exc)})
        raise
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    trial.set_user_attr("cpu_seconds", round(time.process_time() - cpu, 1))  # all threads: the CPU budget it used
    trial.set_user_attr("steps", manifest["training"]["steps"])
    if callback.pruned_at is not None:
        return _pruned(trial, folder, callback.pruned_at, recipe)
    value = (manifest.get("losses") or {}).get(plan.manifest_key)
    if value is None or not math.isfinite(value):
        raise RunError(f"trial {trial.number}: the run measured no finite {plan.options.metric} ({value})")
    _note(folder, {"trial": trial.number, "state": "complete", "values": values, plan.options.metric: value})
    return float(value)


@contextlib.contextmanager
def logged(path: Path):
    """Everything a training prints (its summary, the Trainer's lines and progress bars) goes to `path`; yields
    the echo function that writes there."""
    with open(path, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield lambda text: print(text, file=fh, flush=True)


class Surplus(TunesmithError):
    """Two workers asked for the last trial at once: the later one gives its trial up."""


def _surplus(trial, target: int) -> bool:
    """True when trials numbered below this one, finished or running, already make up the target."""
    import optuna

    held = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=held) if t.number < trial.number]
    return len(earlier) >= target


def _pruned(trial, folder: Path, step: int, recipe: Recipe, extra: str = "") -> float:
    """Mark a pruned trial's run folder (half-trained: not a result to use) and tell Optuna."""
    import optuna

    total = recipe.train.max_steps
    note = (f"pruned at step {step}" + (f" of {total}" if total else "") + ": its weights are half-trained, "
            "stopped because its validation metric was worse than other trials' at the same step"
            + (f"; {extra}" if extra else ""))
    trial.set_user_attr("pruned_at", step)
    _note(folder, {"trial": trial.number, "state": "pruned", "values": trial.params, "note": note})
    raise optuna.TrialPruned(note)


def _note(folder: Path, record: dict[str, Any]) -> None:
    """RUN/tune_trial.json: what the search did with this run folder."""
    if folder.is_dir():
        artifacts.write_json(folder / "tune_trial.json", record)


def trial_line(plan: TunePlan, t, target: int) -> str:
    """One finished trial, as printed while the search runs."""
    values = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in t.params.items())
    state = t.state.name.lower()
    value = f"{plan.options.metric} {t.value:.4f}" if t.value is not None else ""
    if state == "pruned":
        value = f"pruned at step {t.user_attrs.get('pruned_at')}" + (f" ({t.value:.4f})" if t.value is not None
                                                                     else "")
    elif state == "fail":
        value = f"failed: {t.user_attrs.get('error', '?')}"
    seconds = t.user_attrs.get("seconds") or 0
    return f"trial {t.number:>3} ({len(t.params)} values: {values}) — {value} · {seconds:.0f} s"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------- the whole search


def run_tune(options: TuneOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, search, compare the winner with the recipe as written, write best.yaml, tune.json and report.html."""
    from tunesmith.tune_final import final_comparison
    from tunesmith.tune_view import study_summary, trial_table, write_report

    plan = plan_tune(options)
    study = open_study(plan, echo)
    echo(f"searching {len(plan.space.params)} keys ({', '.join(plan.space.keys())}) for the "
         f"{'lowest' if plan.direction == 'min' else 'highest'} {options.metric} on a split carved from "
         f"data.train · sampler {options.sampler} (seed {options.seed}) · pruner "
         f"{options.pruner if plan.prunable is None else 'none'} · study {plan.storage}")
    for p in plan.space.params:
        if p.when_added:
            echo(f"{p.key}: asked only when method.adapter is {' or '.join(p.when['method.adapter'])} (the other "
                 f"adapters don't read method.{p.key.split('.')[1]})")
    t0 = time.time()
    run_trials(plan, study, echo)
    summary = study_summary(study, plan, search_seconds=time.time() - t0)
    echo("")
    echo(trial_table(summary))
    if summary["best"] is None:
        raise RunError("no trial finished, so there is no winner", f"read the logs in {plan.folder / 'logs'}")
    best_recipe = trial_recipe(plan, summary["best"]["params"], Path(f"{plan.recipe.output.dir}-best"), final=True)
    artifacts.atomic_write(plan.folder / "best.yaml", best_header(summary) + best_recipe.to_yaml())
    echo(f"best: trial {summary['best']['number']} ({options.metric} {summary['best']['value']:.4f}) — "
         f"wrote {plan.folder / 'best.yaml'}")
    if options.final:
        with locked(plan.folder):  # a second worker here reuses the first one's final runs
            summary["final"] = final_comparison(plan, summary["best"]["params"], echo)
    artifacts.write_json(plan.folder / "tune.json", summary)
    echo(f"report: {write_report(plan.folder, summary)}")
    return summary


def best_header(summary: dict[str, Any]) -> str:
    best = summary["best"]
    lines = [f"# written by `tunesmith tune`: trial {best['number']} of {len(summary['trials'])}, "
             f"{summary['metric']} {best['value']:.4f} on a split carved from data.train",
             "# the values the search chose: " + ", ".join(f"{k}={v}" for k, v in best["params"].items()),
             "# train it like any recipe: tunesmith train best.yaml"]
    return "\n".join(lines) + "\n"
