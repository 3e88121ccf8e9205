"""The Optuna study behind `tunesmith tune`: its storage (SQLite beside the trials, or a server database shared by
several machines), the per-trial seeded sampler, the pruner, and what keeps several workers honest — a lock while
the study is created, killed workers' trials reclaimed, and waiting for other workers' running trials at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

from tunesmith import artifacts
from tunesmith.errors import RunError
from tunesmith.recipe import Recipe

MARKER = ".tunesmith-tune"  # written first into every study folder tune makes

@contextlib.contextmanager
def locked(folder: Path):
    """Hold FOLDER/.tune.lock: workers of this machine create the study, and run the final comparison, one at a
    time (SQLite creates its tables badly when two processes start at once)."""
    import fcntl

    with open(folder / ".tune.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_study(plan, echo: Callable[[str], None]):
    """Create the study (a new search) or load it (--resume: continue or join); refuse a mismatch either way."""
    folder = plan.folder
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).exists():
        raise RunError(f"{folder}: exists and was not made by `tunesmith tune`, so tune won't write into it",
                       "set output.dir to another name (the study goes to OUTPUT_DIR-tune)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()
    with locked(folder):
        return _open_study(plan, echo)


def _open_study(plan, echo: Callable[[str], None]):
    import optuna

    folder, options = plan.folder, plan.options
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sqlite = {"connect_args": {"timeout": 60}} if plan.storage.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(plan.storage, engine_kwargs=sqlite, heartbeat_interval=60, grace_period=180,
                                         failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
    exists = plan.study_name in optuna.study.get_all_study_names(storage)
    definition = {"space": plan.space.to_json(), "metric": options.metric, "direction": plan.direction,
                  "sampler": options.sampler, "seed": options.seed, "recipe_sha": _recipe_sha(plan.recipe)}
    if exists and not options.resume:
        n = len(optuna.load_study(study_name=plan.study_name, storage=storage).trials)
        raise RunError(f"{folder}: a search is already there ({n} trials in {plan.storage})",
                       "add --resume to continue it (or to join it from another process), or set output.dir to "
                       "start another")
    study = optuna.create_study(study_name=plan.study_name, storage=storage, direction=_optuna_direction(plan),
                                load_if_exists=True, sampler=_sampler(plan), pruner=_pruner(plan))
    kept = study.user_attrs.get("definition")
    if kept is None:
        study.set_user_attr("definition", definition)
        for values in plan.enqueued:
            study.enqueue_trial(values, skip_if_exists=True)
    elif kept != definition:
        changed = [k for k in definition if kept.get(k) != definition[k]]
        raise RunError(f"{folder}: the study there was started with another {', '.join(changed)}",
                       "resume with the same recipe, space and options, or set output.dir to start another")
    else:
        for values in plan.enqueued:
            study.enqueue_trial(values, skip_if_exists=True)
    reclaim_killed(study, folder, echo)
    return study


def _recipe_sha(recipe: Recipe) -> str:
    raw = recipe.model_dump(mode="json")
    raw.pop("output", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def _optuna_direction(plan) -> str:
    return "minimize" if plan.direction == "min" else "maximize"


def _sampler(plan):
    """A sampler rebuilt for every trial, seeded by the study seed and the trial number: one worker repeats its
    trials; two workers asking at once (different trial numbers) get different draws."""
    import optuna

    options, space = plan.options, plan.space

    def make(seed: int):
        if options.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if options.sampler == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=options.seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, options.trials // 3)),
                                          constant_liar=True)

    class PerTrialSeed(optuna.samplers.BaseSampler):
        def __init__(self):
            self.inner = make(options.seed)

        def before_trial(self, study, trial):
            self.inner = make((options.seed * 1_000_003 + trial.number) % 2**32)
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

    return PerTrialSeed()


def _pruner(plan):
    import optuna

    if plan.prunable is not None or plan.options.pruner == "none":
        return optuna.pruners.NopPruner()
    if plan.options.pruner == "hyperband":
        max_steps = plan.recipe.train.max_steps
        return optuna.pruners.HyperbandPruner(min_resource=plan.recipe.train.eval_every,
                                              max_resource=max_steps or "auto")
    return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, plan.options.trials // 5)), n_warmup_steps=0)


def reclaim_killed(study, folder: Path, echo: Callable[[str], None]) -> None:
    """Trials left RUNNING by a killed worker of this machine (its process is gone) are marked failed, their
    half-trained folder renamed trial-NNN.killed, and their values queued again; workers elsewhere are reclaimed
    by Optuna's heartbeat (3 minutes without one)."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or alive(pid):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "killed", True)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        run = folder / trial_folder(t.number)
        if run.exists() and artifacts.is_run_folder(run):
            os.replace(run, run.with_name(run.name + ".killed"))
        if t.params:  # killed after its values were chosen: try them again
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        echo(f"trial {t.number}: its worker (pid {pid}) was killed; marked failed"
             + (f", folder renamed {run.name}.killed" if run.with_name(run.name + ".killed").exists() else "")
             + ("; its values are queued again" if t.params else ""))


def alive(pid: int) -> bool:
    """Whether a process of this machine still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_others(study, echo: Callable[[str], None]) -> None:
    """Wait while other workers still train trials of this study, so the summary holds them (a worker gone quiet is
    failed by Optuna's heartbeat check after 3 minutes)."""
    import optuna

    said = False
    while True:
        optuna.storages.fail_stale_trials(study)
        host = socket.gethostname()
        running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if t.user_attrs.get("host") != host or (t.user_attrs.get("pid") != os.getpid()
                                                           and alive(t.user_attrs.get("pid", 0)))]
        if not running:
            return
        if not said:
            echo(f"waiting for {len(running)} trial(s) other workers are training: "
                 f"{', '.join(str(t.number) for t in running)}")
            said = True
        time.sleep(2)


def trial_folder(number: int) -> str:
    """A trial's run folder name inside the study folder."""
    return f"trial-{number:03d}"
