"""`tunesmith data synth | review | augment`: grow a dataset with a teacher model, with a person in the loop."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tunesmith.errors import TunesmithError


def register(dsub, common: argparse.ArgumentParser, reading: argparse.ArgumentParser) -> None:
    """Add synth, review and augment to the `data` sub-parser."""
    teacher = argparse.ArgumentParser(add_help=False)
    teacher.add_argument("--teacher", default=None, metavar="MODEL|RUN",
                         help="a model tunesmith can load ('default', a folder, a .gguf file) or a run folder")
    teacher.add_argument("--teacher-url", default=None, metavar="URL",
                         help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    teacher.add_argument("--teacher-model", default=None, help="model name to send to --teacher-url")
    teacher.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's API key")
    teacher.add_argument("--timeout", type=float, default=120.0, help="seconds per request (endpoint)")
    teacher.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (endpoint)")
    teacher.add_argument("--temperature", type=float, default=0.7)
    teacher.add_argument("--max-new-tokens", type=int, default=512)
    teacher.add_argument("--seed", type=int, default=0)

    p = dsub.add_parser("synth", parents=[common, reading, teacher], help="generate rows with a teacher model "
                        "from seed rows or documents; every row is checked and lands in a review file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--seeds", metavar="FILE", help="seed rows (self-instruct: new rows like these)")
    source.add_argument("--documents", nargs="+", metavar="FILE",
                        help="text files (or data files) to draw question/answer pairs from")
    p.add_argument("-n", "--rows", type=int, required=True, help="rows to generate that pass every check")
    p.add_argument("--out", required=True, help="review file to write (JSONL)")
    p.add_argument("--existing", nargs="+", default=None, metavar="FILE",
                   help="data new rows must not duplicate (default: the seed file)")
    p.add_argument("--against", nargs="+", default=[], metavar="EVAL", help="evaluation data new rows must not leak into")
    p.add_argument("--max-chars", type=int, default=None, help="rows longer than this are too long")
    p.add_argument("--examples-per-prompt", type=int, default=3)
    p.add_argument("--max-attempts", type=int, default=None, help="replies to ask for at most (default 3 × rows)")
    p.add_argument("--chunk-chars", type=int, default=1500, help="document chunk size in characters")

    p = dsub.add_parser("review", parents=[common], help="accept, edit or reject each generated row "
                        "(only accepted rows reach training)")
    p.add_argument("file", help="review file written by `tunesmith data synth`")
    p.add_argument("--accept-passing", action="store_true", help="accept every pending row that passed all checks")
    p.add_argument("--export", default=None, metavar="OUT", help="write the accepted rows to OUT (plain data)")

    p = dsub.add_parser("augment", parents=[common, reading, teacher], help="add label-preserving variants "
                        "(light noise, or teacher paraphrases), each marked as augmented")
    p.add_argument("data", help="data file")
    p.add_argument("--how", choices=("noise", "paraphrase"), default="noise")
    p.add_argument("--copies", type=int, default=1, help="variants per row")
    p.add_argument("--protect", nargs="+", default=[], metavar="FIELD", help="fields to leave untouched")
    p.add_argument("--out", required=True, help="file for the variants (the original rows are not repeated)")


def make_teacher(args, settings):
    """The teacher the flags name: a local model/run (--teacher) or an HTTP endpoint (--teacher-url)."""
    from tunesmith.data.synth import HTTPTeacher, LocalTeacher

    if args.teacher and args.teacher_url:
        raise TunesmithError("give --teacher or --teacher-url, not both")
    if args.teacher_url:
        if not args.teacher_model:
            raise TunesmithError("--teacher-url needs --teacher-model (the model name the endpoint serves)")
        return HTTPTeacher(args.teacher_url, args.teacher_model, args.api_key_env, args.timeout, args.concurrency)
    from tunesmith.cli import _quiet_libraries

    _quiet_libraries()
    return LocalTeacher(args.teacher or settings["model"], settings["cache_dir"])


def cmd_synth(args) -> int:
    from tunesmith.cli_data import _load, _threshold, reading_settings
    from tunesmith.data.check import records_of
    from tunesmith.data.synth import load_documents, synthesize

    settings = reading_settings(args)
    seeds = records_of(_load([args.seeds], settings)) if args.seeds else None
    documents = load_documents(args.documents) if args.documents else None
    existing_paths = args.existing if args.existing is not None else ([args.seeds] if args.seeds else [])
    existing = records_of(_load(existing_paths, settings)) if existing_paths else []
    against = records_of(_load(args.against, settings)) if args.against else []
    teacher = make_teacher(args, settings)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.rows, desc="rows passing checks", unit="row")

    def progress(attempts: int, passed: int) -> None:
        bar.n = passed
        bar.set_postfix(asked=attempts)
        bar.refresh()

    result = synthesize(teacher, seeds=seeds, documents=documents, n=args.rows, existing=existing, against=against,
                        labels=settings["labels"], threshold=_threshold(args, settings), max_chars=args.max_chars,
                        per_prompt_examples=args.examples_per_prompt, seed=args.seed, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, max_attempts=args.max_attempts,
                        chunk_chars=args.chunk_chars, progress=progress)
    bar.close()
    result.write(args.out)
    s = result.summary
    print(f"teacher {s['teacher']}: {s['attempts']} replies, {s['pending']} passed every check, "
          f"{s['rejected']} failed one")
    for check, n in s["checks"].items():
        print(f"  failed {check}: {n}")
    print(f"wrote {args.out}; next: `tunesmith data review {args.out}` (only accepted rows reach training)")
    return 0


def cmd_review(args) -> int:
    from tunesmith.data.review import accept_passing, export_accepted, read_review, review_counts, review_file

    if not Path(args.file).is_file():
        raise TunesmithError(f"{args.file}: no such review file", "write one with `tunesmith data synth`")
    if args.accept_passing:
        print(f"accepted {accept_passing(args.file)} rows that passed every check")
    elif not args.export:
        review_file(args.file, read=input, editor=os.environ.get("EDITOR"))
    counts = review_counts(read_review(args.file))
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.export:
        print(f"wrote {export_accepted(args.file, args.export)} accepted rows to {args.export}")
    return 0


def cmd_augment(args) -> int:
    from tunesmith.cli_data import _records, reading_settings
    from tunesmith.data.augment import augment
    from tunesmith.data.readers import write_rows

    settings = reading_settings(args)
    records, _ = _records(args.data, settings)
    teacher = make_teacher(args, settings) if args.how == "paraphrase" else None
    rows = augment(records, args.how, copies=args.copies, teacher=teacher, seed=args.seed, protect=args.protect,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    write_rows(rows, args.out)
    print(f"{len(records)} rows → {len(rows)} {args.how} variants in {args.out} (marked \"augmented\"; "
          "a split keeps each with its original)")
    return 0


COMMANDS = {"synth": cmd_synth, "review": cmd_review, "augment": cmd_augment}
