"""What every `tunesmith` subcommand shares, below cli, cli_data and cli_synth (they import it; it imports none):
argparse `type=` functions that check a value where it is parsed (so the message names the option), output-path
checks, and the flags and helpers the data commands use to read files.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import TunesmithError
from tunesmith.model import quiet_libraries  # noqa: F401 - re-exported for the CLI modules

# ----------------------------------------------------------------------------------------------- argument types


def _checked(parse: Callable[[str], Any], ok: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    """An argparse type: `parse` the text, then insist on `ok`; otherwise "'TEXT' is not WANTED"."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    convert.__name__ = wanted
    return convert


positive_int = _checked(int, lambda v: v >= 1, "a whole number ≥ 1")
non_negative_int = _checked(int, lambda v: v >= 0, "a whole number ≥ 0")
port = _checked(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535 (0 = any free port)")
finite_float = _checked(float, math.isfinite, "a finite number")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0")
fraction = _checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")  # NaN fails both comparisons


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse type for 'A,B,C' whose every item is checked by the type `item`."""

    def convert(text: str) -> list:
        return [item(part.strip()) for part in text.split(",")]

    convert.__name__ = f"comma-separated list of {item.__name__}"
    return convert


def path(text: str) -> str:
    """An argparse type for a file or folder: `~` and `~user` expanded; an unknown user is an error."""
    try:
        return str(Path(text).expanduser())
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r}: can't expand {text.split('/')[0]!r} (no such user); give the "
                                         "path without ~, or with ~/ for your own home folder") from None


# ----------------------------------------------------------------------------------------------- outputs

INPUT_ARGUMENTS = ("recipe", "data", "against", "seeds", "documents", "existing", "file")


def input_paths(args: argparse.Namespace) -> list[str]:
    """Every file the command reads, from its arguments (an output must not be, contain or lie inside one)."""
    found: list[str] = []
    for name in INPUT_ARGUMENTS:
        value = getattr(args, name, None)
        if value:
            found += [value] if isinstance(value, str) else list(value)
    return found


def check_out(args: argparse.Namespace, value: str, option: str = "--out", folder: bool = False) -> Path:
    """The output path `value` of option `option`, checked against the command's inputs before any work."""
    from tunesmith.artifacts import check_output

    return check_output(value, option, inputs=input_paths(args), folder=folder)


def write_rows_safely(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> Path:
    """Write rows to the data file `out` (by its suffix) through a staging folder: whole or not at all, and never
    over one of the command's inputs."""
    from tunesmith.artifacts import staged_files
    from tunesmith.data.readers import write_rows

    with staged_files(out.parent, protect=input_paths(args)) as stage:
        write_rows(rows, stage / out.name)
    return out


# ----------------------------------------------------------------------------------------------- reading data


def reading_parser() -> argparse.ArgumentParser:
    """The parent parser of the flags that say how to read data files (--recipe, --format, --column, …)."""
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--recipe", type=path,
                         help="take model, max_seq_len, format, columns, labels and thresholds from it")
    reading.add_argument("--format", choices=("auto", "text", "instruction", "chat", "classification", "preference"),
                         default=None, help="record type (default: the recipe's, else detected)")
    reading.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                         help="map a canonical field to your column, e.g. --column output=summary (repeatable)")
    reading.add_argument("--labels", default=None, help="allowed labels, comma-separated")
    reading.add_argument("--threshold", type=finite_float, default=None,
                         help="near-duplicate similarity (Jaccard of 5-character shingles; default 0.8)")
    return reading


def reading_settings(args) -> dict[str, Any]:
    """Format, columns, labels, recipe sections and model from --recipe and the flags (flags win)."""
    settings: dict[str, Any] = {"format": "auto", "columns": {}, "labels": None, "recipe": None,
                                "model": "default", "cache_dir": None, "max_len": 512, "system_prompt": None}
    if args.recipe:
        from tunesmith.recipe import load_recipe

        recipe = load_recipe(args.recipe, check_files=False)
        d = recipe.data
        settings.update(format=d.format, columns=dict(d.columns), labels=d.labels, recipe=recipe,
                        model=recipe.model.name, cache_dir=recipe.model.cache_dir, max_len=recipe.train.max_seq_len,
                        system_prompt=d.system_prompt)
    if args.format:
        settings["format"] = args.format
    for item in args.column:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            raise TunesmithError(f"--column {item!r}: write it as FIELD=COLUMN", "e.g. --column output=summary")
        settings["columns"][field] = column
    if args.labels:
        settings["labels"] = [x.strip() for x in args.labels.split(",") if x.strip()]
    if args.threshold is not None and not 0.5 <= args.threshold <= 1.0:
        raise TunesmithError(f"--threshold {args.threshold}: must be between 0.5 and 1.0",
                             "0.8 finds sentences that differ by a word; 1.0 finds only exact copies")
    return settings


def near_threshold(args, settings) -> float:
    """--threshold, else the recipe's data.check.near_threshold, else 0.8."""
    if args.threshold is not None:
        return args.threshold
    recipe = settings["recipe"]
    return recipe.data.check.near_threshold if recipe else 0.8


def tokenizer_for(settings, model: str | None = None):
    """The tokenizer of `model` (default: the recipe's, else the bundled model)."""
    from tunesmith.model import load_tokenizer, resolve_model

    quiet_libraries()
    return load_tokenizer(resolve_model(model or settings["model"], settings["cache_dir"]))


def load_data(paths: list[str], settings) -> list:
    """Each file read as the settings say (one load per file, records and rejects)."""
    from tunesmith.data.check import load_files

    return load_files(paths, settings["format"], settings["columns"], settings["labels"])


def read_records(path: str, settings) -> tuple[list, Any]:
    """One file's records and its load; rows that can't be read are counted on the terminal."""
    load = load_data([path], settings)[0]
    if load.rejects:
        print(f"{path}: {len(load.rejects)} of {load.rows_read} rows can't be read as {load.kind} rows "
              f"({', '.join(f'{k} ×{v}' for k, v in load.reasons().items())})")
    return load.records, load
