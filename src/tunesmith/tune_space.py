"""The search space of `tunesmith tune`: a YAML file of dotted recipe keys, each with what it may be.

    train.learning_rate: {log_uniform: [1.0e-5, 5.0e-4]}   # a float, sampled on a log scale
    train.warmup_ratio:  {uniform: [0.0, 0.1]}             # a float
    train.epochs:        {int: [1, 4]}                     # a whole number (optional `step`; `log_int` for a log scale)
    method.adapter:      [lora, dora]                      # a choice
    method.lora.r:       [8, 16, 32]                       # read only when method.adapter is lora: asked only then
    method.dora.r:       {choice: [8, 16], when: {method.adapter: [dora]}}   # a condition written out

Checked like a recipe, every problem at once, before anything trains: each key must be a recipe key (did-you-mean for
a misspelt one) that takes every value the space can give it, a range must be possible, and a key the method would
not read (an adapter's section under another adapter, `train.epochs` beside `train.max_steps`) is an error — or, when
another key of the space chooses the adapter, a condition added for you. No torch and no Optuna at import time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import RecipeError
from tunesmith.recipe import Recipe, apply_overrides, parse_recipe, read_yaml_file
from tunesmith.schema import shown

KINDS = ("choice", "uniform", "log_uniform", "int", "log_int")
NOT_SEARCHED = {  # keys a search must not change, and why
    "data.train": "the search compares settings on the same rows",
    "data.validation": "the trials are scored on a split carved from data.train; the validation file is kept for "
                       "the final comparison",
    "data.validation_fraction": "the trials must be scored on the same held-out rows to be comparable",
    "train.seed": "searching over seeds picks a lucky draw, not a setting (use --seeds to retrain the winner "
                  "with several)",
    "method.name": "search one method at a time; `tunesmith compare` trains several methods side by side",
    "output": "tune chooses each trial's run folder (runs/NAME-tune/trial-NNN)",
    "distributed": "every trial trains the same way; set it in the recipe",
    "model.cache_dir": "where a model is cached changes nothing trained",
}


@dataclass
class Param:
    """One searched key: its distribution and the conditions under which a trial reads it."""

    key: str
    kind: str  # one of KINDS
    values: list[Any] = field(default_factory=list)  # choice
    low: float | int | None = None
    high: float | int | None = None
    step: int | float | None = None
    when: dict[str, list[Any]] = field(default_factory=dict)  # other (choice) keys -> the values that enable this
    when_added: bool = False  # the condition was inferred (an adapter section), not written

    @property
    def log(self) -> bool:
        return self.kind in ("log_uniform", "log_int")

    def probes(self) -> list[Any]:
        """Values that stand for everything this key may take: each choice, or both ends of the range."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(_value_text(v) for v in self.values)
        else:
            text = f"{self.kind} {_value_text(self.low)} .. {_value_text(self.high)}" + (
                f" step {self.step}" if self.step else "")
        if self.when:
            text += " when " + " and ".join(f"{k} in {v}" for k, v in self.when.items())
        return text


@dataclass
class Space:
    """The parsed space: its keys in the order they are asked (a condition's key before the keys it enables)."""

    params: list[Param]
    source: str = "space"

    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        """Ask an Optuna trial for this space's values; a key whose condition fails is not asked (not in the dict)."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if any(chosen.get(k, _MISSING) not in v for k, v in p.when.items()):
                continue
            if p.kind == "choice":
                chosen[p.key] = trial.suggest_categorical(p.key, p.values)
            elif p.kind in ("int", "log_int"):
                chosen[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                chosen[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)
        return chosen

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's space: every value of every key (choices, or whole numbers in a range)."""
        out = {}
        for p in self.params:
            if p.kind == "choice":
                out[p.key] = list(p.values)
            else:
                out[p.key] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        return out

    def grid_problems(self) -> list[str]:
        """Why the grid sampler can't search this space (empty when it can)."""
        problems = []
        for p in self.params:
            if p.kind in ("uniform", "log_uniform", "log_int"):
                problems.append(f"`{p.key}`: --sampler grid needs a list of values or {{int: [a, b]}}, not "
                                f"{p.kind}; write the values to try, e.g. [{_value_text(p.low)}, "
                                f"{_value_text(p.high)}], or use --sampler tpe")
            if p.when:
                problems.append(f"`{p.key}`: --sampler grid can't search a conditional key (asked only when "
                                f"{', '.join(p.when)} allows it); use --sampler tpe or random")
        return problems

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def to_json(self) -> list[dict[str, Any]]:
        """The space as plain data (kept in the study, so a resumed search can tell it is the same one)."""
        return [{"key": p.key, "kind": p.kind, "values": p.values, "low": p.low, "high": p.high, "step": p.step,
                 "when": p.when} for p in self.params]


_MISSING = object()


def _value_text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, float) else f"{value:g}"


def recipe_dict(recipe: Recipe, values: dict[str, Any]) -> dict[str, Any]:
    """The recipe as a dict ready for a trial's overrides: when the trial picks another adapter, the method section
    is the one `tunesmith compare` gives that adapter (the recipe's own settings where they apply: lora, qlora and
    dora share LoRA's rank; defaults elsewhere), so the recipe's adapter section doesn't stand in the way."""
    raw = recipe.model_dump(mode="json")
    adapter = values.get("method.adapter")
    if adapter is not None and adapter != getattr(recipe.method, "adapter", adapter):
        from tunesmith.compare import arm_method_section

        raw["method"] = arm_method_section(recipe.method, recipe.method.name, adapter)
    return raw


def overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` recipe overrides for a trial's values (JSON text, which the recipe reads as YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


# ----------------------------------------------------------------------------------------------- reading


def load_space(path: str | Path, recipe: Recipe) -> Space:
    """Read and check a space file against the recipe; one RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"space file not found: {path} (write one: dotted recipe keys, e.g. "
                                      "`train.learning_rate: {log_uniform: [1.0e-5, 5.0e-4]}`)"])
    raw, twice = read_yaml_file(path, "space file")
    if twice:
        raise RecipeError(str(path), twice)
    return parse_space(raw, recipe, str(path))


def parse_space(raw: Any, recipe: Recipe, source: str = "space") -> Space:
    """Check a space (the parsed YAML) against the recipe; one RecipeError listing every problem."""
    if not isinstance(raw, dict) or not raw:
        raise RecipeError(source, ["the space must be a mapping of dotted recipe keys to what each may be, e.g. "
                                   "`train.learning_rate: {log_uniform: [1.0e-5, 5.0e-4]}`"])
    problems: list[str] = []
    params = []
    for key, spec in raw.items():
        key = str(key)
        param, found = _param(key, spec)
        problems += found
        if param is not None:
            params.append(param)
    by_key = {p.key: p for p in params}
    for p in params:
        problems += _when_problems(p, by_key)
    unread = _unread_keys(params, by_key, recipe)
    problems += unread
    flagged = {p.key for p in params if any(line.startswith(f"`{p.key}`") for line in unread)}
    problems += _recipe_problems(params, recipe, flagged)
    ordered = _ordered(params)
    if ordered is None:
        problems.append("the conditions (`when`) go round in a circle: each key can only depend on keys that don't "
                        "depend on it")
    if problems:
        raise RecipeError(source, list(dict.fromkeys(problems)))
    return Space(ordered, source)


def _param(key: str, spec: Any) -> tuple[Param | None, list[str]]:
    """One key's entry: a list (a choice) or a mapping with one distribution (plus `when`, `step`)."""
    where = f"`{key}`"
    for banned, why in NOT_SEARCHED.items():
        if key == banned or key.startswith(banned + "."):
            return None, [f"{where}: not searchable — {why}"]
    if "." not in key:
        return None, [f"{where}: give a dotted recipe key, e.g. train.{key} or method.{key}"]
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict):
        return None, [f"{where}: {shown(spec)} is not a search range; write a list of values, e.g. [8, 16, 32], or "
                      f"one of {{{', '.join(f'{k}: [a, b]' for k in KINDS[1:])}}}"]
    kinds = [k for k in spec if k in KINDS]
    extra = [str(k) for k in spec if k not in (*KINDS, "when", "step")]
    problems = [f"{where}: unknown entry `{k}`; allowed: {', '.join(KINDS)}, when, step" for k in extra]
    if len(kinds) != 1:
        problems.append(f"{where}: give exactly one of {', '.join(KINDS)} (given: {', '.join(kinds) or 'none'})")
        return None, problems
    kind, value = kinds[0], spec[kinds[0]]
    when = spec.get("when") or {}
    if not isinstance(when, dict) or any(not isinstance(v, (list, str, int, float, bool)) for v in when.values()):
        problems.append(f"{where}: `when` must map other keys of the space to their enabling values, e.g. "
                        "{method.adapter: [lora]}")
        when = {}
    when = {str(k): (v if isinstance(v, list) else [v]) for k, v in when.items()}
    param = Param(key, kind, when=when, step=spec.get("step"))
    if kind == "choice":
        if not isinstance(value, list) or not value:
            problems.append(f"{where}: a choice needs a non-empty list of values, got {shown(value)}")
        elif any(isinstance(v, (dict, list)) for v in value):
            problems.append(f"{where}: each choice must be a single value (number, text, true/false, null)")
        elif len({json.dumps(v) for v in value}) != len(value):
            problems.append(f"{where}: a value is listed twice in {shown(value)}")
        else:
            param.values = list(value)
        return (param if not problems else None), problems
    problems += _range_problems(where, kind, value, param.step)
    if not problems:
        param.low, param.high = value
    return (param if not problems else None), problems


def _range_problems(where: str, kind: str, value: Any, step: Any) -> list[str]:
    """What makes `{kind: value}` impossible: not two numbers, low ≥ high, a log range through 0, fractional ints."""
    if not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return [f"{where}: {kind} needs [low, high], two finite numbers, got {shown(value)}"]
    low, high = value
    problems = []
    if low >= high:
        problems.append(f"{where}: {kind} [{low}, {high}] is an impossible range: low must be below high")
    if kind.startswith("log") and low <= 0:
        problems.append(f"{where}: {kind} [{low}, {high}] needs low > 0 (a log scale has no 0); use uniform, or "
                        "start at a small positive value")
    if kind.endswith("int") and not all(float(v).is_integer() for v in value):
        problems.append(f"{where}: {kind} [{low}, {high}] needs whole numbers; use uniform for fractions")
    if step is not None:
        if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0:
            problems.append(f"{where}: step {shown(step)} must be a number > 0")
        elif kind.startswith("log"):
            problems.append(f"{where}: step can't be used with {kind} (Optuna samples a log scale without steps)")
        elif kind == "int" and not float(step).is_integer():
            problems.append(f"{where}: step {step} must be a whole number for int")
    return problems


def _when_problems(p: Param, by_key: dict[str, Param]) -> list[str]:
    problems = []
    for key, values in p.when.items():
        parent = by_key.get(key)
        if parent is None:
            problems.append(f"`{p.key}`: its condition names `{key}`, which is not a key of this space (a condition "
                            "reads another searched choice)")
        elif parent.kind != "choice":
            problems.append(f"`{p.key}`: its condition names `{key}`, which is a range; a condition reads a choice")
        elif key == p.key:
            problems.append(f"`{p.key}`: a key can't be conditional on itself")
        else:
            bad = [v for v in values if v not in parent.values]
            if bad:
                problems.append(f"`{p.key}`: its condition allows {shown(bad)} for `{key}`, which the space never "
                                f"chooses; choose from {shown(parent.values)}")
    return problems


def _unread_keys(params: list[Param], by_key: dict[str, Param], recipe: Recipe) -> list[str]:
    """Keys the trials would set but the method would not read; an adapter section becomes conditional instead when
    the space chooses the adapter and some of its choices read it."""
    from tunesmith.methods.adapters import ADAPTERS, SECTIONS

    problems = []
    adapter_param = by_key.get("method.adapter")
    own = getattr(recipe.method, "adapter", None)
    for p in params:
        parts = p.key.split(".")
        if len(parts) >= 3 and parts[0] == "method" and parts[1] in SECTIONS and own is not None:
            readers = [a for a, spec in ADAPTERS.items() if spec.params_key == parts[1]]
            if adapter_param is None:
                if own not in readers:
                    problems.append(f"`{p.key}`: not read — the recipe's adapter is {own}, which doesn't read "
                                    f"method.{parts[1]} ({', '.join(readers)} does); search method.adapter too, or "
                                    f"drop this key")
                continue
            possible = p.when.get("method.adapter", adapter_param.values)
            reading = [a for a in possible if a in readers]
            if not reading:
                problems.append(f"`{p.key}`: not read — none of the adapters it is asked with ({shown(possible)}) "
                                f"reads method.{parts[1]} ({', '.join(readers)} does)")
            elif "method.adapter" in p.when and len(reading) < len(possible):
                problems.append(f"`{p.key}`: its condition allows {shown([a for a in possible if a not in readers])}"
                                f", which don't read method.{parts[1]}; allow only {shown(reading)}")
            elif len(reading) < len(possible):
                p.when["method.adapter"], p.when_added = reading, True
        if p.key == "train.epochs" and (recipe.train.max_steps is not None or "train.max_steps" in by_key):
            problems.append("`train.epochs`: not read — train.max_steps is set and wins over epochs; search "
                            "train.max_steps, or set train.max_steps=null in the recipe")
    return problems


def _recipe_problems(params: list[Param], recipe: Recipe, flagged: set[str]) -> list[str]:
    """Every value the space can give a key, set on the recipe and checked as a recipe (unknown keys with a
    did-you-mean, wrong types, out-of-range values, settings the method refuses). A key already reported (`flagged`)
    is not checked again; an unknown key is reported once, not once per value."""
    keys = {p.key for p in params}
    problems = []
    for p in params:
        if p.key in flagged:
            continue
        enabling = {k: v[0] for k, v in p.when.items() if k in keys}
        for value in p.probes():
            values = {**enabling, p.key: value}
            raw, found = apply_overrides(recipe_dict(recipe, values), overrides(values))
            try:
                parse_recipe(raw, check_files=False, problems=found)
            except RecipeError as exc:
                unknown = [line for line in exc.problems if "unknown key" in line]
                if unknown:
                    problems += unknown
                    break
                problems += [f"`{p.key}` = {_value_text(value)}: {line}" for line in exc.problems]
    return problems


def _ordered(params: list[Param]) -> list[Param] | None:
    """Conditions first: a key comes after every key its condition reads; None when the conditions form a cycle."""
    done: list[Param] = []
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(k in {d.key for d in done} for k in p.when)]
        if not ready:
            names = {p.key for p in params}
            return None if all(k in names for p in pending for k in p.when) else done + pending
        done += ready
        pending = [p for p in pending if p not in ready]
    return done
