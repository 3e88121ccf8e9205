"""`tunesmith data …`: preview, check, clean, split, balance, synth, review, augment.

Each subcommand reads data files (with the recipe's format, columns and labels when `--recipe` is given, or the
flags), writes files, and prints a summary. Errors in what was given are TunesmithErrors (exit code 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

CLEAN_FLAGS = ("fix_unicode", "strip_markup", "normalize_whitespace", "remove_control_chars")


def register(dsub, common: argparse.ArgumentParser, recipe_args: argparse.ArgumentParser) -> None:
    """Add the data subcommands to the `data` sub-parser."""
    p = dsub.add_parser("preview", parents=[common, recipe_args],
                        help="formatted examples with trained tokens marked ⟦…⟧, token counts, truncation")
    p.add_argument("-n", "--rows", type=int, default=3, help="examples to show (default 3)")

    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--recipe", help="take model, max_seq_len, format, columns, labels and thresholds from it")
    reading.add_argument("--format", choices=("auto", "text", "instruction", "chat", "classification", "preference"),
                         default=None, help="record type (default: the recipe's, else detected)")
    reading.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                         help="map a canonical field to your column, e.g. --column output=summary (repeatable)")
    reading.add_argument("--labels", default=None, help="allowed labels, comma-separated")
    reading.add_argument("--threshold", type=float, default=None,
                         help="near-duplicate similarity (Jaccard of 5-character shingles; default 0.8)")

    p = dsub.add_parser("check", parents=[common, reading], help="report duplicates, leakage, lengths, labels, "
                        "broken text and personal data (report.json + report.html)")
    p.add_argument("data", nargs="+", help="data files, checked as one dataset")
    p.add_argument("--against", nargs="+", default=[], metavar="EVAL", help="evaluation/test files to check leakage into")
    p.add_argument("--out", default="data-check", help="folder for report.json and report.html (default data-check)")
    p.add_argument("--model", default=None, help="tokenizer for token lengths (default: the recipe's, else 'default')")
    p.add_argument("--max-len", type=int, default=None, help="max sequence length in tokens (default: the recipe's "
                   "train.max_seq_len, else 512)")
    p.add_argument("--min-words", type=int, default=None, help="rows with fewer words are too short (default 2)")
    p.add_argument("--no-tokens", action="store_true", help="skip token lengths (no tokenizer needed)")

    p = dsub.add_parser("clean", parents=[common, reading], help="fix text, drop duplicates, leaked rows, personal "
                        "data, rows outside the length range; every removed row goes to OUT.rejects.jsonl")
    p.add_argument("data", help="data file")
    p.add_argument("--out", required=True, help="cleaned file (.jsonl, .csv or .parquet)")
    p.add_argument("--against", nargs="+", default=[], metavar="EVAL", help="evaluation files: drop rows leaking into them")
    for name in CLEAN_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--duplicates", choices=("keep", "exact", "near"), default=None)
    p.add_argument("--leaked", choices=("keep", "drop"), default=None)
    p.add_argument("--pii", choices=("keep", "redact", "drop"), default=None)
    p.add_argument("--conflicts", choices=("keep", "drop", "majority"), default=None)
    p.add_argument("--min-words", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="drop rows longer than this (recipe's model)")

    p = dsub.add_parser("split", parents=[common, reading], help="deterministic train/validation/test split, "
                        "stratified by label, duplicates kept inside one split")
    p.add_argument("data", help="data file")
    p.add_argument("--out", required=True, help="folder for NAME.jsonl per split")
    p.add_argument("--fractions", default="0.8,0.1,0.1", help="fractions per split (default 0.8,0.1,0.1)")
    p.add_argument("--names", default="train,validation,test", help="split names (default train,validation,test)")
    p.add_argument("--seed", type=int, default=42)

    p = dsub.add_parser("balance", parents=[common, reading], help="report label imbalance; down-sample, "
                        "up-sample, or write class weights for training")
    p.add_argument("data", help="classification data file")
    p.add_argument("--strategy", choices=("report", "down", "up", "weights"), default="report")
    p.add_argument("--out", default=None, help="output file (rows for down/up; JSON for weights)")
    p.add_argument("--per-class", type=int, default=None, help="rows per label (default: smallest for down, "
                   "largest for up)")
    p.add_argument("--seed", type=int, default=42)

    from tunesmith import cli_synth

    cli_synth.register(dsub, common, reading)


# ----------------------------------------------------------------------------------------------- shared


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


def _threshold(args, settings) -> float:
    if args.threshold is not None:
        return args.threshold
    recipe = settings["recipe"]
    return recipe.data.check.near_threshold if recipe else 0.8


def _tokenizer(settings, model: str | None = None):
    from tunesmith.cli import _quiet_libraries
    from tunesmith.model import load_tokenizer, resolve_model

    _quiet_libraries()
    return load_tokenizer(resolve_model(model or settings["model"], settings["cache_dir"]))


def _load(paths: list[str], settings) -> list:
    from tunesmith.data.check import load_files

    return load_files(paths, settings["format"], settings["columns"], settings["labels"])


def _records(path: str, settings) -> tuple[list, Any]:
    load = _load([path], settings)[0]
    if load.rejects:
        print(f"{path}: {len(load.rejects)} of {load.rows_read} rows can't be read as {load.kind} rows "
              f"({', '.join(f'{k} ×{v}' for k, v in load.reasons().items())})")
    return load.records, load


# ----------------------------------------------------------------------------------------------- commands


def cmd_check(args) -> int:
    from tunesmith.data.check import CheckOptions, check_data, write_report
    from tunesmith.data.check_view import summary_text

    settings = reading_settings(args)
    recipe = settings["recipe"]
    min_words = args.min_words if args.min_words is not None else recipe.data.check.min_words if recipe else 2
    options = CheckOptions(near_threshold=_threshold(args, settings), min_words=min_words,
                           max_len=args.max_len or settings["max_len"], system_prompt=settings["system_prompt"],
                           max_duplicate_fraction=recipe.data.check.max_duplicate_fraction if recipe else 0.05,
                           leakage=recipe.data.check.leakage if recipe else "stop")
    if not args.no_tokens:
        options.tokenizer = _tokenizer(settings, args.model)
        options.model_name = args.model or settings["model"]
    train = _load(args.data, settings)
    against = _load(args.against, {**settings, "format": train[0].kind}) if args.against else None
    report = check_data(train, against, options, progress=lambda what: print(f"checking {what}…", flush=True))
    paths = write_report(report, Path(args.out))
    print(summary_text(report))
    print(f"wrote {paths['json']} and {paths['html']}")
    return 1 if any(p["severity"] == "error" for p in report["problems"]) else 0


def cmd_clean(args) -> int:
    from tunesmith.data.clean import CleanOptions, clean_file, write_clean

    settings = reading_settings(args)
    recipe = settings["recipe"]
    base = recipe.data.clean.model_dump() if recipe else {}
    chosen = {**base, **{k: v for k, v in vars(args).items() if k in CleanOptions.__dataclass_fields__
                         and v is not None}}
    options = CleanOptions(**{**chosen, "near_threshold": _threshold(args, settings)})
    against = _load(args.against, settings) if args.against else None
    tokenizer = _tokenizer(settings) if options.max_tokens else None
    result = clean_file(args.data, options, settings["format"], settings["columns"], settings["labels"],
                        against, tokenizer, settings["system_prompt"])
    paths = write_clean(result, args.out)
    s = result.summary()
    print(f"{s['file']}: {s['read']} rows read, {s['kept']} kept, {s['removed']} removed")
    for reason, n in s["removed_by_reason"].items():
        print(f"  removed — {reason}: {n}")
    for fix, n in s["rows_fixed"].items():
        print(f"  fixed — {fix.replace('_', ' ')}: {n} rows")
    print(f"wrote {paths['cleaned']}, {paths['rejects']} (each removed row and why), {paths['summary']}")
    return 0


def cmd_split(args) -> int:
    from collections import Counter

    from tunesmith.data.readers import write_rows
    from tunesmith.data.split import split_records

    settings = reading_settings(args)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    try:
        fractions = [float(x) for x in args.fractions.split(",")]
    except ValueError:
        raise TunesmithError(f"--fractions {args.fractions!r}: give numbers, e.g. 0.8,0.1,0.1") from None
    if len(names) != len(fractions) or len(set(names)) != len(names):
        raise TunesmithError(f"--names {args.names!r} and --fractions {args.fractions!r}: need one distinct name "
                             "per fraction", "e.g. --names train,validation,test --fractions 0.8,0.1,0.1")
    records, load = _records(args.data, settings)
    parts = split_records(records, dict(zip(names, fractions)), args.seed, _threshold(args, settings))
    out = Path(args.out)
    for name, rows in parts.items():
        write_rows([r.raw for r in rows], out / f"{name}.jsonl")
        labels = Counter(r.data["label"] for r in rows) if load.kind == "classification" else None
        detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(labels.items()))})" if labels else ""
        print(f"{name}: {len(rows)} rows{detail} → {out / (name + '.jsonl')}")
    if load.rejects:
        write_rows(load.rejects, out / "rejects.jsonl")
        print(f"rejected: {len(load.rejects)} rows → {out / 'rejects.jsonl'}")
    print("exact and near duplicates (and augmented copies) were kept inside one split")
    return 0


def cmd_balance(args) -> int:
    from tunesmith.data import balance
    from tunesmith.data.readers import write_rows

    settings = reading_settings(args)
    if settings["format"] == "auto":
        settings["format"] = "classification"
    records, _ = _records(args.data, settings)
    info = balance.imbalance(records)
    print(f"{info['rows']} rows, {info['classes']} labels, imbalance {info['imbalance_ratio']}:1 (largest/smallest)")
    for label, n in info["counts"].items():
        print(f"  {label:<24} {n:>7}  {info['shares'][label]:.1%}")
    if args.strategy == "report":
        return 0
    if not args.out:
        raise TunesmithError(f"--strategy {args.strategy} writes a file: give --out")
    if args.strategy == "weights":
        weights = balance.class_weights(records)
        Path(args.out).write_text(json.dumps({"weights": weights, "counts": info["counts"]}, indent=2) + "\n")
        print(f"wrote class weights to {args.out}; use them with data.class_weights={args.out}")
        return 0
    if args.strategy == "down":
        rows = [r.raw for r in balance.downsample(records, args.seed, args.per_class)]
    else:
        rows = [r.raw for r in records] + balance.upsample(records, args.seed, args.per_class)
    write_rows(rows, args.out)
    after = balance.imbalance(_records(args.out, {**settings, "labels": None})[0])
    print(f"wrote {len(rows)} rows to {args.out}: " + ", ".join(f"{k} {v}" for k, v in after["counts"].items()))
    return 0


def cmd_preview(args) -> int:
    from tunesmith.cli import _quiet_libraries
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_libraries()
    from tunesmith.preview import preview

    print(preview(recipe, rows=args.rows))
    return 0


DATA_COMMANDS = {"preview": cmd_preview, "check": cmd_check, "clean": cmd_clean, "split": cmd_split,
                 "balance": cmd_balance}


def run(args) -> int:
    """Dispatch `tunesmith data SUBCOMMAND`."""
    from tunesmith import cli_synth

    return {**DATA_COMMANDS, **cli_synth.COMMANDS}[args.data_command](args)

