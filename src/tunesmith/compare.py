"""`tunesmith compare RECIPE --methods lora,ia3,full`: one task under several methods, one table.

Every arm gets the same recipe — data, seed, `train` section, `--set` overrides — and changes only its method or
adapter (plus its own `--arm-set` overrides). Read top to bottom: the arms (parsed and validated before anything
trains), each arm's run, the bootstrap intervals, the table and the files.

Each arm trains in its own process, `python -m tunesmith.compare OUT/arms/ARM.spec.json`, which trains with
train_run, records its peak memory right after training (so it is that arm's alone), then evaluates the run on the
validation rows with the evaluation runner. An arm that crashes or runs out of memory is reported as failed; the
others go on. Each arm is a normal run folder `OUT/ARM/`; an arm whose folder holds a finished run of the same
recipe is reused, not retrained, which makes a long comparison restartable.

The zero-shot base model is always a row (evaluated alongside the first arm that trains), so every table has its
reference; `fewshot` adds the base model prompted with `--shots` solved examples, unless a `fewshot` method is
registered, which then trains as an arm like any other.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith import artifacts
from tunesmith.artifacts import RunDir
from tunesmith.compare_table import markdown, paired_difference, score, table_text
from tunesmith.errors import RecipeError, TunesmithError
from tunesmith.methods import REGISTRY
from tunesmith.model import quiet_libraries
from tunesmith.recipe import MethodParams, Recipe, apply_overrides, load_recipe, parse_recipe, recipe_changes

ZERO_SHOT = ("zero-shot", "base")
FEWSHOT = "fewshot"
ENSEMBLE = "ensemble"  # an arm that pools the classifier arms (methods/ensemble.py)
LORA_FAMILY = ("lora", "qlora", "dora")  # they share LoRA's settings, so they compare at the same rank
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")
EVAL_NAME = "compare"  # the arms' evaluations go to RUN/eval/compare/


@dataclass
class CompareOptions:
    """What to compare and how (the `tunesmith compare` arguments)."""

    recipe: str
    methods: list[str]
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for every arm
    arm_overrides: list[str] = field(default_factory=list)  # ARM:KEY=VALUE for one arm
    out: str | None = None  # default runs/compare-<recipe stem>
    limit: int | None = None  # validation rows evaluated
    shots: int = 4  # solved examples in the few-shot baseline's prompts
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0  # the bootstrap's and the few-shot examples' seed (training uses train.seed)
    n_resamples: int = 1000
    fresh: bool = False  # retrain every arm even when its run folder matches
    verbose: bool = False  # show each arm's output (default: OUT/logs/ARM.log only)


@dataclass
class Arm:
    """One row of the table: a method/adapter to train, or a baseline the evaluation runner answers with the base."""

    name: str  # as written in --methods
    method: str | None = None  # None for a baseline
    adapter: str | None = None
    baseline: str | None = None  # 'base' (zero-shot) or 'fewshot'
    overrides: list[str] = field(default_factory=list)
    recipe: Recipe | None = None

    @property
    def folder(self) -> str:
        return self.name.replace(":", "-")


# ----------------------------------------------------------------------------------------------- the arms


def valid_names() -> list[str]:
    """Every entry --methods accepts (besides METHOD:ADAPTER)."""
    from tunesmith.methods.adapters import ADAPTERS

    names = list(ADAPTERS) + list(REGISTRY) + list(ZERO_SHOT)
    return names + ([FEWSHOT] if FEWSHOT not in names else [])


def parse_arms(spec: str | list[str], recipe_method: MethodParams) -> list[Arm]:
    """The arms --methods names, in order; a TunesmithError (exit 2) listing the valid names for an unknown one."""
    from tunesmith.methods.adapters import ADAPTERS

    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip()]
    adapter_methods = [m for m, method in REGISTRY.items() if "adapter" in method.params.model_fields]
    own = recipe_method.name if recipe_method.name in adapter_methods else None
    arms, bad = [], []
    for item in items:
        method, _, adapter = item.rpartition(":") if ":" in item else ("", "", item)
        if item in ZERO_SHOT:
            arms.append(Arm(item, baseline="base"))
        elif item == FEWSHOT and FEWSHOT not in REGISTRY:
            arms.append(Arm(item, baseline="fewshot"))
        elif method:
            if method not in adapter_methods or adapter not in ADAPTERS:
                bad.append(item)
            else:
                arms.append(Arm(item, method, adapter))
        elif item in REGISTRY:
            takes = item in adapter_methods
            arms.append(Arm(item, item, getattr(recipe_method, "adapter", "lora") if takes else None))
        elif item in ADAPTERS:
            if own is None:
                raise TunesmithError(f"--methods {item}: the recipe's method {recipe_method.name!r} takes no adapter",
                                     f"name the method too, e.g. {' or '.join(f'{m}:{item}' for m in adapter_methods)}")
            arms.append(Arm(item, own, item))
        else:
            bad.append(item)
    if bad:
        combos = ", ".join(f"{m}:ADAPTER" for m in adapter_methods)
        raise TunesmithError(f"--methods: unknown {', '.join(repr(b) for b in bad)}",
                             f"choose from: {', '.join(valid_names())} (or {combos})")
    if not arms:
        raise TunesmithError("--methods: nothing to compare", "e.g. --methods lora,ia3,full")
    seen = [a.folder for a in arms]
    twice = sorted({f for f in seen if seen.count(f) > 1})
    if twice or sum(a.baseline == "base" for a in arms) > 1:
        raise TunesmithError(f"--methods names {', '.join(twice) or 'zero-shot'} twice", "name each arm once")
    return arms


def split_arm_overrides(items: list[str], arms: list[Arm]) -> None:
    """Give each arm its `ARM:KEY=VALUE` overrides; unknown arms and baselines are errors."""
    by_name = {a.name: a for a in arms}
    for item in items:
        head, sep, value = item.partition("=")
        name, colon, key = head.rpartition(":")
        if not sep or not colon or not key:
            raise TunesmithError(f"--arm-set {item!r}: write it as ARM:KEY=VALUE",
                                 "e.g. --arm-set prompt:train.learning_rate=3e-2")
        arm = by_name.get(name)
        if arm is None:
            raise TunesmithError(f"--arm-set {item!r}: {name!r} is not one of the arms",
                                 f"the arms are: {', '.join(by_name)}")
        if arm.baseline:
            raise TunesmithError(f"--arm-set {item!r}: {name} trains nothing, so it has no recipe to change")
        arm.overrides.append(f"{key}={value}")


def _refuse_output_keys(items: list[str], flag: str) -> None:
    for item in items:
        key = item.partition("=")[0].rpartition(":")[2]
        if key.split(".")[0] == "output":
            raise TunesmithError(f"{flag} {item!r}: compare chooses each arm's run folder (OUT/ARM)",
                                 "choose the folder that holds them with --out")


def arm_method_section(params: MethodParams, method: str, adapter: str | None) -> dict[str, Any]:
    """The arm's `method` section: the recipe's own settings where they apply to the arm, defaults elsewhere.

    Switching method keeps the keys the new method also has, with values it accepts (e.g. `train_on` is dropped for
    classify, and classify's `pooling: model` for features, whose pooling is mean or last). An adapter's section is
    kept for that adapter; lora, qlora and dora share the LoRA keys (r, alpha, dropout, target_modules), so they
    compare at the same rank. Any other adapter starts from its own defaults.
    """
    from pydantic import ValidationError

    from tunesmith.methods.adapters import ADAPTERS, SECTIONS, LoraParams

    def accepted(key: str, value: Any) -> bool:
        try:
            REGISTRY[method].params.model_validate({"name": method, key: value})
        except ValidationError:
            return False
        return True

    given = params.model_dump(mode="json", exclude_defaults=True)
    target = REGISTRY[method].params.model_fields
    section = {k: v for k, v in given.items() if k in target and k not in SECTIONS and accepted(k, v)}
    section["name"] = method
    if adapter is None:
        return section
    section["adapter"] = adapter
    own, theirs = ADAPTERS[adapter].params_key, getattr(params, "adapter", None)
    their_key = ADAPTERS[theirs].params_key if theirs else None
    if own and own == their_key and own in given:
        section[own] = given[own]
    elif own in LORA_FAMILY and their_key in LORA_FAMILY and their_key in given:
        section[own] = {k: v for k, v in given[their_key].items() if k in LoraParams.model_fields}
    return section


def arm_recipe(base: Recipe, arm: Arm, out: Path, members: list[Arm] = ()) -> Recipe:
    """The arm's full recipe: the base recipe with the arm's method section, run folder and overrides.

    An `ensemble` arm pools the comparison's classifier arms (`members`): their run folders don't exist yet, so its
    recipe's files are checked when it trains, after them."""
    raw = base.model_dump(mode="json")
    raw["method"] = arm_method_section(base.method, arm.method, arm.adapter)
    if arm.method == ENSEMBLE:
        raw["method"]["members"] = [str((out / m.folder).resolve()) for m in members]
    raw["output"] = {"dir": str((out / arm.folder).resolve()), "overwrite": True}
    raw, problems = apply_overrides(raw, arm.overrides)
    return parse_recipe(raw, f"arm {arm.name}", check_files=arm.method != ENSEMBLE, problems=problems)


def ensemble_members(arms: list[Arm]) -> list[Arm]:
    """The arms an `ensemble` arm pools: every arm that trains a classifier (classify, features)."""

    return [a for a in arms if a.method and a.method != ENSEMBLE and REGISTRY[a.method].predict is not None]


def plan_arms(options: CompareOptions) -> tuple[Recipe, list[Arm], Path]:
    """The base recipe and every arm with its recipe, checked before anything trains; every problem at once."""
    _refuse_output_keys(options.overrides, "--set")
    _refuse_output_keys(options.arm_overrides, "--arm-set")
    if options.limit is not None and options.limit < 1:
        raise TunesmithError(f"--limit {options.limit}: give a positive number of rows")
    base = load_recipe(options.recipe, options.overrides)
    arms = parse_arms(options.methods, base.method)
    split_arm_overrides(options.arm_overrides, arms)
    out = Path(options.out or Path("runs") / f"compare-{Path(options.recipe).stem}")
    problems = []
    members = ensemble_members(arms)
    if any(a.method == ENSEMBLE for a in arms) and len(members) < 2:
        raise TunesmithError(f"--methods ensemble: it pools this comparison's classifier arms (classify, features), "
                             f"and {'only ' + members[0].name if members else 'none'} is named",
                             "name at least two, e.g. --methods classify:lora,classify:full,features,ensemble")
    for arm in arms:
        if arm.baseline:
            continue
        try:
            arm.recipe = arm_recipe(base, arm, out, members)
        except RecipeError as exc:
            problems.extend(f"arm {arm.name}: {p}" for p in exc.problems)
    if problems:
        raise RecipeError(options.recipe, problems)
    if not any(a.recipe for a in arms):
        raise TunesmithError("--methods: every arm is a baseline; the evaluation needs one arm that trains",
                             "add one, e.g. --methods lora,zero-shot")
    return base, arms, out


def describe(params: MethodParams) -> str:
    """The arm's method and settings in one line, e.g. `sft · lora (r=16, alpha=32.0, …)`."""
    from tunesmith.methods.adapters import adapter_settings

    def kv(values: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in values.items())

    adapter = getattr(params, "adapter", None)
    if adapter is None:
        return f"{params.name} ({kv(params.model_dump(mode='json', exclude={'name'}))})"
    settings = adapter_settings(params)
    return f"{params.name} · {adapter}" + (f" ({kv(settings.model_dump(mode='json'))})" if settings else "")


# ----------------------------------------------------------------------------------------------- running


def run_compare(options: CompareOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate every arm, then print the table and write OUT/compare.json and OUT/compare.md."""
    base, arms, out = plan_arms(options)
    for sub in ("recipes", "logs", "arms"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    wanted = [a.baseline for a in arms if a.baseline == "fewshot"]
    needs = ["base", *wanted]  # the zero-shot row always; answered with the first arm that trains
    holder: Arm | None = None
    trained = sorted((a for a in arms if a.recipe), key=lambda a: a.method == ENSEMBLE)  # after its members
    for i, arm in enumerate(trained, 1):
        against = needs if holder is None else []
        record = run_arm(arm, out, options, against, f"[{i}/{len(trained)}]", echo)
        if holder is None and record.get("status") == "ok" and "base" in _eval_systems(record):
            holder = arm
    result = collect(base, arms, holder, out, options)
    artifacts.write_json(out / "compare.json", result)
    artifacts.atomic_write(out / "compare.md", markdown(result))
    echo("")
    echo(table_text(result))
    echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'}")
    return result


def run_arm(arm: Arm, out: Path, options: CompareOptions, against: list[str], tag: str,
            echo: Callable[[str], None]) -> dict[str, Any]:
    """Train (unless a finished run of the same recipe is there) and evaluate one arm in its own process."""
    run = RunDir(out / arm.folder)
    recipe_file = out / "recipes" / f"{arm.folder}.yaml"
    artifacts.atomic_write(recipe_file, arm.recipe.to_yaml())
    record_file, log = out / "arms" / f"{arm.folder}.json", out / "logs" / f"{arm.folder}.log"
    previous = json.loads(record_file.read_text()) if record_file.exists() else {}
    finished = (run.manifest.exists() and run.recipe.exists() and run.recipe.read_text() == arm.recipe.to_yaml())
    reuse = finished and not options.fresh and arm.method != ENSEMBLE  # its members may have been retrained
    eval_key = {"limit": options.limit, "seed": options.seed, "shots": options.shots, "against": against,
                "max_new_tokens": options.max_new_tokens}
    same_run = reuse and previous.get("manifest_sha") == _sha(run.manifest)
    what = describe(arm.recipe.method)
    if same_run and previous.get("status") == "ok" and previous.get("eval_key") == eval_key \
            and (Path(previous.get("eval_folder", "")) / "examples.jsonl").exists():
        echo(f"{tag} {arm.name}: reusing {run.root} and its evaluation (same recipe; --fresh retrains)")
        return previous
    if reuse:
        echo(f"{tag} {arm.name}: reusing the finished run in {run.root} (same recipe); evaluating")
    else:
        stale = ""
        if run.manifest.exists() and run.recipe.exists():
            changed = recipe_changes(run.recipe.read_text(), arm.recipe.to_yaml())
            stale = f" (replaces the run there; its recipe differs: {changed})"
        elif run.root.exists():
            stale = " (replaces the unfinished run there)"
        echo(f"{tag} {arm.name}: training {what}{stale}")
    keep = {k: previous[k] for k in ("peak_rss_bytes", "gpu_peak_bytes", "manifest_sha") if k in previous} \
        if same_run else {}
    spec = {"name": arm.name, "recipe": str(recipe_file.resolve()), "run": str(run.root.resolve()),
            "train": not reuse, "keep": keep, "record": str(record_file.resolve()), "eval_key": eval_key,
            "eval": {"against": against, "limit": options.limit, "shots": options.shots,
                     "max_new_tokens": options.max_new_tokens, "batch_size": options.batch_size,
                     "forgetting": False, "seed": options.seed, "name": EVAL_NAME,
                     "n_resamples": options.n_resamples}}
    spec_file = out / "arms" / f"{arm.folder}.spec.json"
    artifacts.write_json(spec_file, spec)
    record_file.unlink(missing_ok=True)
    started = time.time()
    code, peak = _spawn(spec_file, log, run, arm.recipe, options.verbose)
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    if record.get("status") != "ok":
        why = record.get("error") or _exit_words(code)
        record = {**record, "status": "failed", "stage": record.get("stage", "train"), "error": why,
                  "exit_code": code}
        record.setdefault("peak_rss_bytes", peak)  # killed before it could say: the whole process's peak
        artifacts.write_json(record_file, record)
        echo(f"    failed ({record['stage']}): {why.splitlines()[0]} — log: {log}")
    else:
        echo(f"    done in {time.time() - started:.1f} s — log: {log}")
    return record


def _spawn(spec_file: Path, log: Path, run: RunDir, recipe: Recipe, verbose: bool) -> tuple[int, int]:
    """Run the arm's process; return its exit code and its peak resident memory (bytes, from wait4)."""
    from tqdm.auto import tqdm

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tunesmith.compare", str(spec_file)]
    with open(log, "w", encoding="utf-8") as fh:
        sink = None if verbose else fh
        proc = tied_popen(command, stdout=sink, stderr=subprocess.STDOUT if sink else None, env=env)
        # steps from the run's metrics.jsonl; no bar when its output is shown, or off a terminal (disable=None)
        bar = tqdm(total=recipe.train.max_steps, desc="steps", unit="step", leave=False, disable=verbose or None)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                step = _last_step(run)
                if step > bar.n:
                    bar.update(step - bar.n)
                time.sleep(0.5)
        except BaseException:  # Ctrl-C or an error here: the arm stops with us
            proc.terminate()
            proc.wait()
            raise
        finally:
            bar.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, _maxrss_bytes(usage.ru_maxrss)


def tied_popen(command: list[str], **kwargs) -> subprocess.Popen:
    """Popen whose process ends with ours: on Linux the kernel sends it SIGTERM when this process exits, however
    it exits (a `kill` of compare must not leave an arm training unseen in the background)."""
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _terminate_when_parent_exits
    return subprocess.Popen(command, **kwargs)


def _terminate_when_parent_exits() -> None:
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _last_step(run: RunDir) -> int:
    try:
        lines = run.metrics.read_text().splitlines()
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError):
        return 0


def _exit_words(code: int) -> str:
    if code < 0:
        import signal

        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exited with code {code} before reporting"


def _maxrss_bytes(maxrss: int) -> int:
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports kilobytes


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _eval_systems(record: dict[str, Any]) -> list[str]:
    path = Path(record.get("eval_folder", "")) / "results.json"
    return json.loads(path.read_text())["systems"] if path.exists() else []


# ----------------------------------------------------------------------------------------------- the arm process


def arm_process(spec_file: str) -> int:
    """Inside the arm's process: train (unless reused), record peak memory, evaluate; write OUT/arms/ARM.json."""
    import resource
    import traceback

    spec = json.loads(Path(spec_file).read_text())
    record_file = Path(spec["record"])
    record: dict[str, Any] = {**spec["keep"], "name": spec["name"], "stage": "train"}
    quiet_libraries()
    try:
        if spec["train"]:
            from tunesmith.train import train_run

            train_run(load_recipe(spec["recipe"]), recipe_path=spec["recipe"])
            record["peak_rss_bytes"] = _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                record["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
            record["manifest_sha"] = _sha(RunDir(Path(spec["run"])).manifest)
        record["stage"] = "eval"
        artifacts.write_json(record_file, record)
        from tunesmith.evaluation.runner import EvalOptions, evaluate_run

        options = EvalOptions(**{**spec["eval"], "against": tuple(spec["eval"]["against"])})
        results = evaluate_run(spec["run"], options)
        record.update(status="ok", eval_folder=results["folder"], eval_key=spec["eval_key"])
        code = 0
    except TunesmithError as exc:
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        record.update(status="failed", error=exc.message)
        code = exc.exit_code
    except Exception as exc:  # an arm's crash is that arm's result; the comparison goes on
        traceback.print_exc()
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        code = 1
    artifacts.write_json(record_file, record)
    return code


# ----------------------------------------------------------------------------------------------- the table


def _examples(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "examples.jsonl").read_text().splitlines() if x.strip()]


def weights_bytes(run: RunDir, saved: str) -> int | None:
    """Bytes of the weight files the run saved (RUN/adapter, RUN/model or RUN/classifier; not configs)."""
    folder = run.root / saved
    if not folder.is_dir():  # e.g. a fewshot run saves no weights (saved: none)
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def collect(base: Recipe, arms: list[Arm], holder: Arm | None, out: Path, options: CompareOptions) -> dict:
    """compare.json's content: one row per arm with its costs, its metric and interval, and its difference to
    zero-shot with the paired interval."""
    rows, task, meta = [], None, {}
    reference: dict[tuple, dict] = {}
    evaluated = [a for a in arms if a.recipe and _record(out, a).get("status") == "ok"]
    if evaluated:  # the rows, task and metric are the same for every arm: read them from one
        folder = Path(_record(out, holder or evaluated[0])["eval_folder"])
        meta = json.loads((folder / "results.json").read_text())
        task = meta["task"]
    if holder is not None:
        examples = _examples(folder)
        reference = {(e["file"], e["line"]): e["base"] for e in examples}
        for system, label in (("base", "zero-shot"), ("fewshot", f"fewshot ({options.shots}-shot)")):
            if system in meta["systems"]:
                rows.append({"name": label, "kind": "baseline", "status": "ok", "trainable_params": 0,
                             "trainable_percent": 0.0, "per_example": [e[system] for e in examples]})
    base_shown = holder is not None
    for arm in arms:
        if arm.baseline:
            continue
        rows.append(_arm_row(arm, out))
    keys = list(reference)
    for row in rows:
        per = row.pop("per_example", None)
        if per is None or task is None:
            continue
        row["metric"] = score(per, task, options.n_resamples, options.seed)
        order = row.pop("keys", keys)
        if base_shown and row["name"] != "zero-shot" and order == keys:
            row["vs_zero_shot"] = paired_difference(per, [reference[k] for k in keys], task,
                                                    options.n_resamples, options.seed)
    manifest = next((r["manifest"] for r in rows if r.get("manifest")), {})
    for r in rows:
        r.pop("manifest", None)
    return {
        "recipe": str(Path(options.recipe).resolve()), "out": str(out.resolve()), "command": command_line(options),
        "date": datetime.date.today().isoformat(), "machine": _machine(manifest),
        "task": task, "metric": meta.get("primary_metric"), "data": meta.get("data"), "rows": meta.get("rows"),
        "excluded_leaked": meta.get("excluded_leaked"), "n_resamples": options.n_resamples,
        "train": base.train.model_dump(mode="json"), "arms": rows,
    }


def _record(out: Path, arm: Arm) -> dict[str, Any]:
    """What the arm's process reported (OUT/arms/ARM.json)."""
    path = out / "arms" / f"{arm.folder}.json"
    return json.loads(path.read_text()) if path.exists() else {"status": "failed", "error": "no record"}


def _arm_row(arm: Arm, out: Path) -> dict[str, Any]:
    """One trained arm's numbers from its run folder and its process's record."""
    run = RunDir(out / arm.folder)
    record = _record(out, arm)
    row: dict[str, Any] = {"name": arm.name, "kind": "trained", "settings": describe(arm.recipe.method),
                           "overrides": arm.overrides, "run": str(run.root), "status": record.get("status"),
                           "log": str(out / "logs" / f"{arm.folder}.log"),
                           "peak_rss_bytes": record.get("peak_rss_bytes"),
                           "gpu_peak_bytes": record.get("gpu_peak_bytes")}
    if record.get("status") != "ok":
        row.update(stage=record.get("stage"), error=record.get("error"))
    if run.manifest.exists() and record.get("stage") != "train":
        m = run.read_manifest()
        tr, steps = m["training"], m["training"]["steps"]
        row.update(manifest=m, steps=steps, trainable_params=tr["trainable_params"], total_params=tr["total_params"],
                   trainable_percent=100 * tr["trainable_params"] / max(tr["total_params"], 1),
                   weights_bytes=weights_bytes(run, m["saved"]), train_seconds=m["timings"]["train_seconds"],
                   seconds_per_step=m["timings"]["train_seconds"] / steps if steps else None,
                   total_seconds=m["timings"]["total_seconds"])
    if record.get("status") == "ok":
        examples = _examples(Path(record["eval_folder"]))
        row["per_example"] = [e["tuned"] for e in examples]
        row["keys"] = [(e["file"], e["line"]) for e in examples]
    return row


def _machine(manifest: dict) -> str:
    m = manifest.get("machine") or {}
    cpus = m.get("cpu_count") or os.cpu_count()
    gpu = m.get("cuda")
    torch = (manifest.get("versions") or {}).get("torch")
    return (f"{m.get('platform') or platform.platform()}, {cpus} CPU cores" + (f", GPU {gpu}" if gpu else ", no GPU")
            + (f", torch {torch}" if torch else ""))


def command_line(options: CompareOptions) -> str:
    """The command that reproduces this comparison."""
    import shlex

    parts = ["tunesmith", "compare", options.recipe, "--methods", ",".join(
        options.methods if isinstance(options.methods, list) else [options.methods])]
    parts += [x for item in options.overrides for x in ("--set", item)]
    parts += [x for item in options.arm_overrides for x in ("--arm-set", item)]
    for flag, value, default in (("--out", options.out, None), ("--limit", options.limit, None),
                                 ("--shots", options.shots, 4), ("--max-new-tokens", options.max_new_tokens, 128),
                                 ("--seed", options.seed, 0)):
        if value != default:
            parts += [flag, str(value)]
    return shlex.join(parts)


if __name__ == "__main__":
    raise SystemExit(arm_process(sys.argv[1]))
