"""The recipe schema's building blocks, below both the recipe and the methods: the strict base section, the base
of every method's parameters, the marker for keys that name files, the words that describe a field, and the lines
that say what is wrong with a value (dotted path, value given, what is allowed).

Every field carries `Field(description=...)`; the starter recipe (`tunesmith init`) and `tunesmith methods` are
written from those descriptions, never typed twice. Nothing here imports torch or any tunesmith module.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

SEED_LIMIT = 2**32  # numpy and torch take seeds in [0, 2**32)


class Strict(BaseModel):
    """Base for every recipe section: frozen; unknown keys, non-finite numbers and booleans or text where a number
    belongs are errors (strict types: only an int is taken for a float)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class MethodParams(Strict):
    """Base of every method's parameters; each method file defines its own subclass."""

    name: str = Field(description="the training method (`tunesmith methods` lists them)")

    def problems(self, train: Any, data: Any) -> list[str]:
        """What these settings can't do together with the `train` and `data` sections, in recipe wording
        (`data` may be None when it is invalid). Mixins add theirs and call super()."""
        return []

    def file_problems(self) -> list[str]:
        """What is wrong with the files and run folders these settings name: every key marked `PathKey('run')`
        must be a finished run folder. Skipped when a recipe is checked without its files."""
        out = []
        for key, mark in path_keys(type(self)).items():
            value = getattr(self, key)
            for item in value if isinstance(value, list) else [value]:
                folder = expand_path(item) if mark.kind == "run" and isinstance(item, str) else None
                if folder is not None and not (folder / "manifest.json").is_file():
                    out.append(f"`method.{key}`: {item!r} is not a finished run folder (no manifest.json); "
                               "train that run first, or fix the path (relative to the recipe file)")
        return out

    def unused_keys(self) -> set[str]:
        """Keys that don't apply to these settings (another adapter's section); the starter recipe leaves them out."""
        return set()


class MethodSchema(Protocol):
    """What the recipe asks of a method (methods/base.py's Method is one): its parameters and checks."""

    name: str
    params: type[MethodParams]
    record_types: tuple[str, ...]
    metrics: tuple[str, ...]
    check: Callable[..., list[str]] | None
    strategies: tuple[str, ...]  # distributed strategies it trains under ("none": one process only)


@dataclass(frozen=True)
class PathKey:
    """Marks a field that names a file or folder (`Annotated[str, PathKey()]`): `~` is expanded, and a relative path
    is taken from the recipe file's folder (from the working directory when given as a command-line override).

    kind: 'file' (a file or folder to read or write), 'run' (a finished run folder), 'model' (a bundled model name
    or a local path, resolved only when it exists there). `words`: values that are names, not paths (e.g. 'auto').
    """

    kind: Literal["file", "run", "model"] = "file"
    words: tuple[str, ...] = ()


def path_keys(cls: type[BaseModel]) -> dict[str, PathKey]:
    """The fields of `cls` marked with PathKey, by name."""
    return {name: mark for name, field in cls.model_fields.items()
            for mark in field.metadata if isinstance(mark, PathKey)}


def expand_path(value: str) -> Path | None:
    """`value` as a path with `~` and `~user` expanded; None when `~user` names no user on this machine."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------------------------- words


def default_of(field: FieldInfo) -> Any:
    """The field's default value (its factory called); Ellipsis when it is required."""
    if field.default_factory is not None:
        return field.default_factory()
    return ... if field.is_required() else field.default


def yaml_value(value: Any) -> str:
    """A value as it is written in a recipe, on one line: `2.0e-4`, `null`, `[-2, -1]`, `{}`."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def type_words(field: FieldInfo) -> str:
    """What a field takes, in words: `number > 0`, `linear | cosine | constant`, `list of run folder or null`."""
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata
              for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if hasattr(m, attr)]
    marks = [m for m in field.metadata if isinstance(m, PathKey)]
    text = _PATH_WORDS[marks[0].kind] if marks else "text"
    optional = typing.get_origin(field.annotation) in (typing.Union, types.UnionType) \
        and type(None) in typing.get_args(field.annotation)
    words = _annotation_words(field.annotation, text, with_null=False)
    words = f"{words} {' and '.join(bounds)}" if bounds else words
    return f"{words} or null" if optional else words


_PATH_WORDS = {"file": "path", "run": "run folder", "model": "name or path"}


def _annotation_words(annotation: Any, text: str = "text", with_null: bool = True) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _annotation_words(args[0], text, with_null)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        choices = all(a is bool or typing.get_origin(a) is Literal for a in args)  # true | false | auto
        words = (" | " if choices else " or ").join(_annotation_words(a, text) for a in args if a is not type(None))
        return words + (" or null" if with_null and type(None) in args else "")
    if origin is list:
        return f"list of {_annotation_words(args[0], text)}" if args else "list"
    if origin is dict:
        return f"mapping of {_annotation_words(args[0])} to {_annotation_words(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return {bool: "true | false", int: "whole number", float: "number", str: text}.get(annotation, str(annotation))


def description(cls: type[BaseModel], key: str) -> str:
    """The field's description, from the nearest class that gives one (a method's `name` narrows MethodParams')."""
    for base in cls.__mro__:
        field = getattr(base, "model_fields", {}).get(key)
        if field is not None and field.description:
            return field.description
    return ""


def nested_section(field: FieldInfo) -> type[Strict] | None:
    """The section class when the field is a nested section (e.g. `data.check`), else None."""
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, Strict) else None


def field_rows(cls: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """One row per field of `cls` (nested sections expanded): dotted key, type in words, default, description."""
    rows = []
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}.{name}" if prefix else name
        sub = nested_section(field)
        if sub is not None:
            rows.extend(field_rows(sub, key))
            continue
        default = default_of(field)
        rows.append((key, type_words(field), "required" if default is ... else yaml_value(default),
                     description(cls, name)))
    return rows


def field_table(cls: type[BaseModel], prefix: str, skip: tuple[str, ...] = (), indent: str = "  ") -> list[str]:
    """`field_rows` as aligned lines: `key  type (default D) — meaning`."""
    rows = field_rows(cls, prefix, skip)
    if not rows:
        return []
    width = max(len(key) for key, *_ in rows)
    return [f"{indent}{key:<{width}}  {kind} ({'required' if default == 'required' else 'default ' + default})"
            + (f" — {meaning}" if meaning else "") for key, kind, default, meaning in rows]


# ----------------------------------------------------------------------------------------------- messages


def describe_errors(exc: ValidationError, prefix: str, cls: type[BaseModel]) -> list[str]:
    """Turn pydantic's errors into one line each: dotted path, value given, what is allowed."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        kind, given = err["type"], err.get("input")
        if kind == "extra_forbidden":
            out.append(unknown_key(path, _fields_at(cls, loc[:-1]), given))
        elif kind == "literal_error":
            allowed = re.findall(r"'([^']*)'", err["ctx"]["expected"])
            out.append(bad_choice(path, given, allowed))
        elif kind == "missing":
            out.append(f"`{path}`: required, but missing")
        elif kind == "string_too_short" and given == "":
            out.append(f"`{path}`: is empty; give a value, or leave the key out for its default")
        elif kind in _TYPE_WORDS:
            out.append(f"`{path}`: {shown(given)} is not {_TYPE_WORDS[kind]}")
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            out.append(f"`{path}`: {shown(given)} is out of range — it must be {_RANGE_WORDS[kind]} {_bound(err)}")
        else:
            out.append(f"`{path}`: {shown(given)} — {err['msg']}")
    return out


_TYPE_WORDS = {
    "float_parsing": "a number", "float_type": "a number", "int_parsing": "a whole number",
    "int_type": "a whole number", "int_from_float": "a whole number", "bool_parsing": "true or false",
    "bool_type": "true or false", "bool_or_auto": "true, false or auto", "string_type": "text (a string)", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
    "finite_number": "a finite number", "tuple_type": "a list",
}
_RANGE_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _bound(err: dict) -> Any:
    return next(iter(err.get("ctx", {}).values()), "")


_ALIASES = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "lr": "learning_rate", "grad_accum": "gradient_accumulation", "bs": "batch_size"}


def shown(value: Any) -> str:
    """A value given in a recipe as the user wrote it: `true`, `null`; anything else as Python's repr."""
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def unknown_key(path: str, allowed: list[str], given: Any) -> str:
    """`path` is no key here: say so, list the keys allowed, suggest the closest (or a known alias)."""
    key = path.rsplit(".", 1)[-1]
    alias = _ALIASES.get(key)
    guess = [alias] if alias in allowed else difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean `{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{guess[0]}`?" if guess else ""
    return f"`{path}`: unknown key (given {shown(given)}); allowed here: {', '.join(allowed)}{hint}"


def bad_choice(path: str, given: Any, allowed: list[str]) -> str:
    """`given` is none of `allowed`: list them, suggest the closest."""
    guess = difflib.get_close_matches(str(given), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return f"`{path}`: {shown(given)} is not allowed; choose one of: {', '.join(allowed)}{hint}"


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
