"""`tunesmith plan RECIPE [KEY=VALUE...] [--device cpu|cuda] [--gpus N] [--memory GB] [--probe]`: will the run fit,
and how long will it take. The analytic plan loads no weights; `--probe` trains three real steps (plan_probe.py).
Errors in what was given are TunesmithErrors (exit code 2).
"""

from __future__ import annotations

import argparse

from tunesmith.cli_common import positive_float, positive_int, quiet_libraries
from tunesmith.errors import TunesmithError


def register(sub, common: argparse.ArgumentParser, recipe_args: argparse.ArgumentParser) -> None:
    """Add the `plan` subcommand to the top-level sub-parser."""
    p = sub.add_parser("plan", parents=[common, recipe_args], help="memory per device (weights, gradients, optimizer, "
                       "activations, logits, reference models, KV cache), steps and a verdict before a run; "
                       "--probe measures three real steps")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="plan for this device (default: a GPU when there is one here, else the CPU)")
    p.add_argument("--gpus", type=positive_int, default=None,
                   help="GPUs to split the run over (cuda; default: the recipe's distributed.nproc × nnodes)")
    p.add_argument("--memory", type=positive_float, default=None, metavar="GB",
                   help="memory of one device in GiB (default: this machine's RAM, this GPU's memory, or 80 for "
                        "--device cuda without a GPU here)")
    p.add_argument("--probe", action="store_true", help="also train three real steps on the longest batch and one "
                   "evaluation batch: measured peak memory, seconds per step, time to finish (nothing is saved)")


def cmd_plan(args) -> int:
    """Print the plan (and the probe's measurements); exit 1 when the run will not fit."""
    import torch  # noqa: F401 - before the recipe's methods, as train does

    from tunesmith.plan import build_plan, encoded_rows, format_plan
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.gpus and args.device == "cpu":
        raise TunesmithError(f"--gpus {args.gpus} with --device cpu: GPUs are for --device cuda",
                             "leave out --gpus, or plan with --device cuda")
    device = args.device or ("cuda" if args.gpus else None)
    if args.probe and device == "cuda" and not torch.cuda.is_available():
        raise TunesmithError("--probe on --device cuda: there is no GPU on this machine to measure",
                             "probe on the machine that will train, or leave out --probe for the analytic plan")
    quiet_libraries()
    source, train_rows, validation_rows = encoded_rows(recipe)
    memory = int(args.memory * 1024**3) if args.memory else None
    plan = build_plan(recipe, source, train_rows, validation_rows, device=device, gpus=args.gpus,
                      memory_bytes=memory)
    if args.probe:
        from tunesmith.plan_probe import probe

        if plan.verdict == "will not fit":
            print(format_plan(plan))
            print("\nprobe skipped: the plan says this run will not fit (apply a fix above, then probe)")
            return 1
        plan.probe = probe(recipe, source, train_rows, validation_rows, device=plan.device, plan=plan)
    print(format_plan(plan))
    return 1 if plan.verdict == "will not fit" else 0


COMMANDS = {"plan": cmd_plan}
