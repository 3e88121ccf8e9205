"""`tunesmith data synth | review | augment`: grow a dataset with a teacher model, with a person in the loop."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tunesmith.cli_common import (check_out, input_paths, load_data, near_threshold, non_negative_float,
                                  non_negative_int, path, positive_float, positive_int, quiet_libraries,
                                  read_records, reading_parser, reading_settings, write_rows_safely)
from tunesmith.errors import TunesmithError


def register(dsub, common: argparse.ArgumentParser) -> None:
    """Add synth, review and augment to the `data` sub-parser."""
    reading = reading_parser()
    teacher = argparse.ArgumentParser(add_help=False)
    teacher.add_argument("--teacher", type=path, default=None, metavar="MODEL|RUN",
                         help="a model tunesmith can load ('default', a folder, a .gguf file) or a run folder")
    teacher.add_argument("--teacher-url", default=None, metavar="URL",
                         help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    teacher.add_argument("--teacher-model", default=None, help="model name to send to --teacher-url")
    teacher.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's API key")
    teacher.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request (endpoint)")
    teacher.add_argument("--concurrency", type=positive_int, default=1, help="requests in flight at once (endpoint)")
    teacher.add_argument("--temperature", type=non_negative_float, default=0.7)
    teacher.add_argument("--max-new-tokens", type=positive_int, default=512)
    teacher.add_argument("--seed", type=non_negative_int, default=0)

    p = dsub.add_parser("synth", parents=[common, reading, teacher], help="generate rows with a teacher model "
                        "from seed rows or documents; every row is checked and lands in a review file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--seeds", type=path, metavar="FILE", help="seed rows (self-instruct: new rows like these)")
    source.add_argument("--documents", nargs="+", type=path, metavar="FILE",
                        help="text files (or data files) to draw question/answer pairs from")
    p.add_argument("-n", "--rows", type=positive_int, required=True, help="rows to generate that pass every check")
    p.add_argument("--out", type=path, required=True, help="review file to write (JSONL)")
    p.add_argument("--existing", nargs="+", type=path, default=None, metavar="FILE",
                   help="data new rows must not duplicate (default: the seed file)")
    p.add_argument("--against", nargs="+", type=path, default=[], metavar="EVAL",
                   help="evaluation data new rows must not leak into")
    p.add_argument("--max-chars", type=positive_int, default=None, help="rows longer than this are too long")
    p.add_argument("--examples-per-prompt", type=positive_int, default=3)
    p.add_argument("--max-attempts", type=positive_int, default=None,
                   help="replies to ask for at most (default 3 × rows)")
    p.add_argument("--chunk-chars", type=positive_int, default=1500, help="document chunk size in characters")

    p = dsub.add_parser("review", parents=[common], help="accept, edit or reject each generated row "
                        "(only accepted rows reach training)")
    p.add_argument("file", type=path, help="review file written by `tunesmith data synth`")
    p.add_argument("--accept-passing", action="store_true", help="accept every pending row that passed all checks")
    p.add_argument("--export", type=path, default=None, metavar="OUT",
                   help="write the accepted rows to OUT (plain data)")

    p = dsub.add_parser("augment", parents=[common, reading, teacher], help="add label-preserving variants "
                        "(light noise, or teacher paraphrases), each marked as augmented")
    p.add_argument("data", type=path, help="data file")
    p.add_argument("--how", choices=("noise", "paraphrase"), default="noise")
    p.add_argument("--copies", type=positive_int, default=1, help="variants per row")
    p.add_argument("--protect", nargs="+", default=[], metavar="FIELD", help="fields to leave untouched")
    p.add_argument("--out", type=path, required=True, help="file for the variants (the original rows are not repeated)")


def make_teacher(args, settings):
    """The teacher the flags name: a local model/run (--teacher) or an HTTP endpoint (--teacher-url)."""
    from tunesmith.data.synth import HTTPTeacher, LocalTeacher

    if args.teacher and args.teacher_url:
        raise TunesmithError("give --teacher or --teacher-url, not both")
    if args.teacher_url:
        if not args.teacher_model:
            raise TunesmithError("--teacher-url needs --teacher-model (the model name the endpoint serves)")
        return HTTPTeacher(args.teacher_url, args.teacher_model, args.api_key_env, args.timeout, args.concurrency)
    quiet_libraries()
    return LocalTeacher(args.teacher or settings["model"], settings["cache_dir"])


def cmd_synth(args) -> int:
    from tunesmith.artifacts import staged_files
    from tunesmith.data.check import records_of
    from tunesmith.data.synth import load_documents, synthesize

    out = check_out(args, args.out)
    settings = reading_settings(args)
    seeds = records_of(load_data([args.seeds], settings)) if args.seeds else None
    documents = load_documents(args.documents) if args.documents else None
    existing_paths = args.existing if args.existing is not None else ([args.seeds] if args.seeds else [])
    existing = records_of(load_data(existing_paths, settings)) if existing_paths else []
    against = records_of(load_data(args.against, settings)) if args.against else []
    teacher = make_teacher(args, settings)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.rows, desc="rows passing checks", unit="row")

    def progress(attempts: int, passed: int) -> None:
        bar.n = passed
        bar.set_postfix(asked=attempts)
        bar.refresh()

    result = synthesize(teacher, seeds=seeds, documents=documents, n=args.rows, existing=existing, against=against,
                        labels=settings["labels"], threshold=near_threshold(args, settings),
                        max_chars=args.max_chars, per_prompt_examples=args.examples_per_prompt, seed=args.seed,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                        max_attempts=args.max_attempts, chunk_chars=args.chunk_chars, progress=progress)
    bar.close()
    with staged_files(out.parent, protect=input_paths(args)) as stage:
        result.write(stage / out.name)
    s = result.summary
    print(f"teacher {s['teacher']}: {s['attempts']} replies, {s['pending']} passed every check, "
          f"{s['rejected']} failed one")
    for check, n in s["checks"].items():
        print(f"  failed {check}: {n}")
    print(f"wrote {out}; next: `tunesmith data review {out}` (only accepted rows reach training)")
    return 0


def cmd_review(args) -> int:
    from tunesmith.data.review import accept_passing, export_accepted, read_review, review_counts, review_file

    if not Path(args.file).is_file():
        raise TunesmithError(f"{args.file}: no such review file", "write one with `tunesmith data synth`")
    export = check_out(args, args.export, "--export") if args.export else None
    if args.accept_passing:
        print(f"accepted {accept_passing(args.file)} rows that passed every check")
    elif export is None:
        review_file(args.file, read=input, editor=os.environ.get("EDITOR"))
    counts = review_counts(read_review(args.file))
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    if export is not None:
        print(f"wrote {export_accepted(args.file, export)} accepted rows to {export}")
    return 0


def cmd_augment(args) -> int:
    from tunesmith.data.augment import augment

    out = check_out(args, args.out)
    settings = reading_settings(args)
    records, _ = read_records(args.data, settings)
    teacher = make_teacher(args, settings) if args.how == "paraphrase" else None
    rows = augment(records, args.how, copies=args.copies, teacher=teacher, seed=args.seed, protect=args.protect,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    write_rows_safely(rows, out, args)
    print(f"{len(records)} rows → {len(rows)} {args.how} variants in {out} (marked \"augmented\"; "
          "a split keeps each with its original)")
    return 0


COMMANDS = {"synth": cmd_synth, "review": cmd_review, "augment": cmd_augment}
