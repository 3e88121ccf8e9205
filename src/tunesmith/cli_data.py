"""`tunesmith data …`: preview, check, clean, split, balance, from-log (synth, review and augment are in cli_synth).

Each subcommand reads data files (with the recipe's format, columns and labels when `--recipe` is given, or the
flags), checks its output paths before any work, writes every file whole or not at all, and prints a summary.
Errors in what was given are TunesmithErrors (exit code 2).
"""

from __future__ import annotations

import argparse
import json

from tunesmith.cli_common import (check_out, comma_list, fraction, input_paths, load_data, near_threshold,
                                  non_negative_int, path, positive_int, quiet_libraries, read_records,
                                  reading_parser, reading_settings, tokenizer_for, write_rows_safely)
from tunesmith.errors import TunesmithError

CLEAN_FLAGS = ("fix_unicode", "strip_markup", "normalize_whitespace", "remove_control_chars")


def register(dsub, common: argparse.ArgumentParser, recipe_args: argparse.ArgumentParser) -> None:
    """Add preview, check, clean, split, balance and from-log to the `data` sub-parser."""
    p = dsub.add_parser("preview", parents=[common, recipe_args],
                        help="formatted examples with trained tokens marked ⟦…⟧, token counts, truncation")
    p.add_argument("-n", "--rows", type=positive_int, default=3, help="examples to show (default 3)")

    reading = reading_parser()
    p = dsub.add_parser("check", parents=[common, reading], help="report duplicates, leakage, lengths, labels, "
                        "broken text and personal data (report.json + report.html)")
    p.add_argument("data", nargs="+", type=path, help="data files, checked as one dataset")
    p.add_argument("--against", nargs="+", type=path, default=[], metavar="EVAL",
                   help="evaluation/test files to check leakage into")
    p.add_argument("--out", type=path, default="data-check",
                   help="folder for report.json and report.html (default data-check)")
    p.add_argument("--model", type=path, default=None,
                   help="tokenizer for token lengths (default: the recipe's, else 'default')")
    p.add_argument("--max-len", type=positive_int, default=None, help="max sequence length in tokens (default: the "
                   "recipe's train.max_seq_len, else 512)")
    p.add_argument("--min-words", type=non_negative_int, default=None,
                   help="rows with fewer words are too short (default 2)")
    p.add_argument("--no-tokens", action="store_true", help="skip token lengths (no tokenizer needed)")

    p = dsub.add_parser("clean", parents=[common, reading], help="fix text, drop duplicates, leaked rows, personal "
                        "data, rows outside the length range; every removed row goes to OUT.rejects.jsonl")
    p.add_argument("data", type=path, help="data file")
    p.add_argument("--out", type=path, required=True, help="cleaned file (.jsonl, .csv or .parquet)")
    p.add_argument("--against", nargs="+", type=path, default=[], metavar="EVAL",
                   help="evaluation files: drop rows leaking into them")
    for name in CLEAN_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--duplicates", choices=("keep", "exact", "near"), default=None)
    p.add_argument("--leaked", choices=("keep", "drop"), default=None)
    p.add_argument("--pii", choices=("keep", "redact", "drop"), default=None)
    p.add_argument("--conflicts", choices=("keep", "drop", "majority"), default=None)
    p.add_argument("--min-words", type=non_negative_int, default=None)
    p.add_argument("--max-tokens", type=positive_int, default=None, help="drop rows longer than this (recipe's model)")

    p = dsub.add_parser("split", parents=[common, reading], help="deterministic train/validation/test split, "
                        "stratified by label, duplicates kept inside one split")
    p.add_argument("data", type=path, help="data file")
    p.add_argument("--out", type=path, required=True, help="folder for NAME.jsonl per split")
    p.add_argument("--fractions", type=comma_list(fraction), default="0.8,0.1,0.1",
                   help="fractions per split (default 0.8,0.1,0.1)")
    p.add_argument("--names", default="train,validation,test", help="split names (default train,validation,test)")
    p.add_argument("--seed", type=non_negative_int, default=42)

    p = dsub.add_parser("balance", parents=[common, reading], help="report label imbalance; down-sample, "
                        "up-sample, or write class weights for training")
    p.add_argument("data", type=path, help="classification data file")
    p.add_argument("--strategy", choices=("report", "down", "up", "weights"), default="report")
    p.add_argument("--out", type=path, default=None, help="output file (rows for down/up; JSON for weights)")
    p.add_argument("--per-class", type=positive_int, default=None, help="rows per label (default: smallest for "
                   "down, largest for up)")
    p.add_argument("--seed", type=non_negative_int, default=42)

    p = dsub.add_parser("from-log", parents=[common], help="served requests with an upvote or a correction -> rows "
                        "in a run's training format, checked for duplicates and leakage (rejects with reasons)")
    p.add_argument("log", type=path, help="the request log `tunesmith serve` wrote (RUN/serve/requests.sqlite)")
    p.add_argument("--run", type=path, required=True, help="the run whose training format, training rows (duplicates) "
                   "and validation rows (leakage) the rows are checked against")
    p.add_argument("--out", type=path, required=True, help="the new rows (.jsonl); rejects go to OUT.rejects.jsonl")
    p.add_argument("--include", type=comma_list(str), default="up,correction",
                   help="which feedback makes a row: up, correction (default both; the latest feedback decides)")


# ----------------------------------------------------------------------------------------------- commands


def cmd_check(args) -> int:
    from tunesmith.artifacts import staged_files
    from tunesmith.data.check import CheckOptions, check_like_training, data_section, write_report
    from tunesmith.data.check_view import summary_text
    from tunesmith.data.records import write_rejects

    out = check_out(args, args.out, folder=True)
    settings = reading_settings(args)
    recipe = settings["recipe"]
    data = data_section(recipe, args.data[0], settings["format"], settings["columns"], settings["labels"])
    options = CheckOptions.for_recipe(data)  # the thresholds training uses; the flags below win
    options.near_threshold = near_threshold(args, settings)
    options.min_words = args.min_words if args.min_words is not None else options.min_words
    options.max_len = args.max_len or settings["max_len"]
    if not args.no_tokens:
        options.tokenizer = tokenizer_for(settings, args.model)
        options.model_name = args.model or settings["model"]
    kinds, against = None, args.against
    if recipe is not None:  # read as this recipe's training would: its method's record types, its validation file
        from tunesmith.methods import REGISTRY

        kinds = REGISTRY[recipe.method.name].record_types
        against = against or ([recipe.data.validation] if recipe.data.validation else [])
    report, prepared = check_like_training(args.data, against, data, options, kinds,
                                           progress=lambda what: print(f"checking {what}…", flush=True))
    with staged_files(out, protect=input_paths(args)) as stage:
        names = {kind: p.name for kind, p in write_report(report, stage).items()}
        write_rejects(prepared.rejects, stage / "rejects.jsonl")
    print(summary_text(report))
    print(f"wrote {out / names['json']}, {out / names['html']} and {out / 'rejects.jsonl'} (each rejected row "
          "with its line and reason)")
    return 1 if report["gate"]["stops_training"] else 0


def cmd_clean(args) -> int:
    from tunesmith.artifacts import staged_files
    from tunesmith.data.clean import CleanOptions, clean_file, write_clean

    out = check_out(args, args.out)
    settings = reading_settings(args)
    recipe = settings["recipe"]
    base = recipe.data.clean.model_dump() if recipe else {}
    chosen = {**base, **{k: v for k, v in vars(args).items() if k in CleanOptions.__dataclass_fields__
                         and v is not None}}
    options = CleanOptions(**{**chosen, "near_threshold": near_threshold(args, settings)})
    against = load_data(args.against, settings) if args.against else None
    tokenizer = tokenizer_for(settings) if options.max_tokens else None
    result = clean_file(args.data, options, settings["format"], settings["columns"], settings["labels"],
                        against, tokenizer, settings["system_prompt"])
    with staged_files(out.parent, protect=input_paths(args)) as stage:
        paths = {kind: out.parent / p.name for kind, p in write_clean(result, stage / out.name).items()}
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

    from tunesmith.artifacts import staged_files
    from tunesmith.data.split import split_records, write_splits

    out = check_out(args, args.out, folder=True)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    if len(names) != len(args.fractions) or len(set(names)) != len(names):
        raise TunesmithError(f"--names {args.names!r} and --fractions {','.join(map(str, args.fractions))}: need "
                             "one distinct name per fraction",
                             "e.g. --names train,validation,test --fractions 0.8,0.1,0.1")
    settings = reading_settings(args)
    records, load = read_records(args.data, settings)
    parts = split_records(records, dict(zip(names, args.fractions)), args.seed, near_threshold(args, settings))
    with staged_files(out, protect=input_paths(args)) as stage:
        written = {name: out / p.name for name, p in write_splits(parts, args.data, stage, load.rejects).items()}
    for name, rows in parts.items():
        labels = Counter(r.data["label"] for r in rows) if load.kind == "classification" else None
        detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(labels.items()))})" if labels else ""
        print(f"{name}: {len(rows)} rows{detail} → {written[name]}")
    if load.rejects:
        print(f"rejected: {len(load.rejects)} rows → {out / 'rejects.jsonl'}")
    print("exact and near duplicates (and augmented copies) were kept inside one split")
    return 0


def cmd_balance(args) -> int:
    from tunesmith.artifacts import atomic_write
    from tunesmith.data import balance

    if (args.strategy == "report") != (args.out is None):
        raise TunesmithError(f"--strategy {args.strategy} writes a file: give --out" if args.out is None else
                             f"--out {args.out}: --strategy report writes nothing",
                             "--strategy down|up writes rows, --strategy weights writes class weights (JSON)")
    out = check_out(args, args.out) if args.out else None
    settings = reading_settings(args)
    if settings["format"] == "auto":
        settings["format"] = "classification"
    records, _ = read_records(args.data, settings)
    info = balance.imbalance(records)
    print(f"{info['rows']} rows, {info['classes']} labels, imbalance {info['imbalance_ratio']}:1 (largest/smallest)")
    for label, n in info["counts"].items():
        print(f"  {label:<24} {n:>7}  {info['shares'][label]:.1%}")
    if out is None:
        return 0
    if args.strategy == "weights":
        weights = balance.class_weights(records)
        atomic_write(out, json.dumps({"weights": weights, "counts": info["counts"]}, indent=2) + "\n")
        print(f"wrote class weights to {out}; use them with data.class_weights={out}")
        return 0
    if args.strategy == "down":
        rows = [r.raw for r in balance.downsample(records, args.seed, args.per_class)]
    else:
        rows = [r.raw for r in records] + balance.upsample(records, args.seed, args.per_class)
    write_rows_safely(rows, out, args)
    after = balance.imbalance(read_records(str(out), {**settings, "labels": None})[0])
    print(f"wrote {len(rows)} rows to {out}: " + ", ".join(f"{k} {v}" for k, v in after["counts"].items()))
    return 0


def cmd_preview(args) -> int:
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    quiet_libraries()
    from tunesmith.preview import preview

    print(preview(recipe, rows=args.rows))
    return 0


def cmd_from_log(args) -> int:
    from pathlib import Path

    from tunesmith.artifacts import check_output
    from tunesmith.loop import from_log, from_log_text, rejects_path, write_from_log

    out = check_output(args.out, "--out", inputs=[args.log, args.run])
    if out.suffix.lower() != ".jsonl":
        raise TunesmithError(f"--out {out}: from-log writes JSON lines", f"name it {out.with_suffix('.jsonl').name}")
    check_output(rejects_path(out), "--out's rejects file", inputs=[args.log, args.run])
    found = from_log(args.log, args.run, tuple(x for x in args.include if x))
    write_from_log(found, Path(out), protect=[args.log, args.run])
    print(from_log_text(found, out))
    return 0


COMMANDS = {"preview": cmd_preview, "check": cmd_check, "clean": cmd_clean, "split": cmd_split,
            "balance": cmd_balance, "from-log": cmd_from_log}
