"""`tunesmith tune RECIPE [KEY=VALUE...] --space SPACE.yaml --trials N`: hyper-parameter search on Optuna (tune.py).
Errors in what was given are TunesmithErrors (exit code 2), every problem at once."""

from __future__ import annotations

import argparse

from tunesmith.cli_common import non_negative_int, path, positive_int, quiet_libraries


def duration(text: str) -> float:
    """An argparse type: a time like 90, 90s, 30m, 2h or 1h30m, as seconds (> 0)."""
    from tunesmith.tune import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time; write e.g. 90s, 30m, 2h or 1h30m") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time > 0")
    return seconds


def register(sub, common: argparse.ArgumentParser, recipe_args: argparse.ArgumentParser) -> None:
    """Add the `tune` subcommand to the top-level sub-parser."""
    from tunesmith.tune import METRICS, PRUNERS, SAMPLERS

    p = sub.add_parser("tune", parents=[common, recipe_args], help="search hyper-parameters (Optuna): trials as run "
                       "folders, pruning, resume, several workers; the winner against the recipe as written on rows "
                       "the search never saw")
    p.add_argument("--space", type=path, required=True, help="YAML file of dotted recipe keys and what each may be, "
                   "e.g. `train.learning_rate: {log_uniform: [1.0e-5, 5.0e-4]}`, `method.lora.r: [8, 16, 32]`")
    p.add_argument("--trials", type=positive_int, required=True,
                   help="finished trials the study should hold (counting every worker's)")
    p.add_argument("--timeout", type=duration, default=None, metavar="TIME",
                   help="start no trial after this long, e.g. 30m or 2h (a running one finishes)")
    p.add_argument("--metric", choices=tuple(METRICS), default="validation.loss",
                   help="what trials are scored on, on a split carved from data.train (default validation.loss)")
    p.add_argument("--direction", choices=("min", "max"), default=None,
                   help="the metric's own by default (loss: min, accuracy: max)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="tpe (default), random or grid")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="stop hopeless trials at train.eval_every "
                   "evaluations: median (default), hyperband or none")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the sampler (the same seed gives the same "
                   "trials) and the bootstrap")
    p.add_argument("--storage", default=None, metavar="URL", help="Optuna storage URL (default sqlite:///"
                   "OUTPUT_DIR-tune/study.db); a server database (postgresql://…, mysql://…) lets several machines "
                   "work on one study: run the same command with --resume on each")
    p.add_argument("--resume", action="store_true", help="continue a killed search without repeating finished "
                   "trials, or join a running one as another worker")
    p.add_argument("--seeds", dest="final_seeds", type=positive_int, default=1, metavar="K", help="retrain the "
                   "winner and the recipe as written with K seeds each for the final comparison (default 1)")
    p.add_argument("--data", type=path, default=None, help="the file the final comparison scores (default the "
                   "recipe's data.validation, which the search never sees)")
    p.add_argument("--enqueue", action="append", default=[], metavar="KEY=VALUE,…",
                   help="try these values first (repeat for several), e.g. train.learning_rate=2e-4")
    p.add_argument("--no-final", action="store_true", help="stop after the trials: no retraining, no comparison")
    p.add_argument("--limit", type=positive_int, default=None, help="final comparison: the first N rows only")
    p.add_argument("--batch-size", type=positive_int, default=16, help="final comparison's evaluation batch size")


def cmd_tune(args) -> int:
    """Run the search; exit 0 when a winner was found."""
    from tunesmith.tune import TuneOptions, run_tune

    options = TuneOptions(recipe=args.recipe, space=args.space, trials=args.trials, overrides=args.overrides,
                          timeout_s=args.timeout, metric=args.metric, direction=args.direction,
                          sampler=args.sampler, pruner=args.pruner, seed=args.seed, storage=args.storage,
                          resume=args.resume, seeds=args.final_seeds, data=args.data, enqueue=args.enqueue,
                          final=not args.no_final, limit=args.limit, batch_size=args.batch_size)
    quiet_libraries()
    run_tune(options)
    return 0


COMMANDS = {"tune": cmd_tune}
