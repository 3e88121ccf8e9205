"""Plan accuracy (issue 20): `tunesmith plan`'s predicted peak memory and `--probe`'s predicted step time against
what a real short `tunesmith train` run measures, over recipes of the default model on the shared datasets.

    touch /tmp/bench-running; .venv/bin/python bench/plan_accuracy.py; rm /tmp/bench-running

Each recipe runs twice, each time in a fresh process: (1) the analytic plan, then the probe (two steps on the
longest batch, one evaluation batch); (2) a real `train_run` of `STEPS` steps. Memory is measured the same way in
both: the kernel's peak resident memory (VmHWM, reset through /proc/self/clear_refs) less the resident memory at
the reset — in the real run just after the data is prepared (before the model loads), as in the probe. The real run's
seconds per step are the median of its steps after the first (machine noise: single steps of
the same batch ranged 1.5-18 s); ppo's loop gives no step callbacks, so its steps are timed, in both processes, by
when each step's row appears in metrics.jsonl (plan_probe.step_clock). Errors are (predicted - measured) / measured.
The datasets are read from ../shared/datasets: the 64 longest of the first 2,000 rows (so that every batch is cut to
max_seq_len, as long as the planned worst batch), written to a temporary folder, never into the project.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
ROWS = 64
STEPS = 5  # real run: the first step warms up; steps 2..5 are timed

SFT = {"data": "alpaca", "method": {"name": "sft", "adapter": "lora"}}
RECIPES: dict[str, dict] = {
    "sft-lora-b4-s128": {**SFT, "train": {"batch_size": 4, "max_seq_len": 128}},
    "sft-lora-b4-s256": {**SFT, "train": {"batch_size": 4, "max_seq_len": 256}},
    "sft-lora-b8-s128": {**SFT, "train": {"batch_size": 8, "max_seq_len": 128}},
    "sft-lora-b4-s128-gc": {**SFT, "train": {"batch_size": 4, "max_seq_len": 128, "gradient_checkpointing": True}},
    "sft-full-b4-s128": {"data": "alpaca", "method": {"name": "sft", "adapter": "full"},
                         "train": {"batch_size": 4, "max_seq_len": 128}},
    "sft-qlora-b4-s128": {"data": "alpaca", "method": {"name": "sft", "adapter": "qlora"},
                          "train": {"batch_size": 4, "max_seq_len": 128}},
    "classify-lora-b8-s128": {"data": "sst2", "method": {"name": "classify", "adapter": "lora"},
                              "train": {"batch_size": 8, "max_seq_len": 128}},
    "dpo-lora-b2-s256": {"data": "hh_rlhf", "method": {"name": "dpo", "adapter": "lora"},
                         "train": {"batch_size": 2, "max_seq_len": 256}},
    "dpo-lora-b4-s256": {"data": "hh_rlhf", "method": {"name": "dpo", "adapter": "lora"},
                         "train": {"batch_size": 4, "max_seq_len": 256}},
    "ppo-lora-b4-s128": {"data": "alpaca", "method": {"name": "ppo", "adapter": "lora", "max_completion_length": 32,
                                                      "reward_function": "REWARD"},
                         "train": {"batch_size": 4, "max_seq_len": 128}},
}
REWARD = "def reward(prompts, responses):\n    return [min(len(r), 200) / 200 for r in responses]\n"


def recipe_for(name: str, folder: Path, steps: int | None):
    """The recipe of `name`, its data a 64-row slice of the shared dataset in `folder`."""
    from tunesmith.recipe import parse_recipe

    spec = RECIPES[name]
    data = folder / f"{spec['data']}.jsonl"
    if not data.exists():  # the longest rows of the first 2,000: every batch is cut to max_seq_len, the longest
        with open(SHARED / spec["data"] / "train.jsonl", encoding="utf-8") as fh:
            lines = list(itertools.islice(fh, 2000))
        lines = [line for line in lines if len(line) < 4000]  # an HH-RLHF pair whose replies alone pass 256 tokens
        data.write_text("".join(sorted(lines, key=len, reverse=True)[:ROWS]), encoding="utf-8")  # is a reject
    (folder / "length_reward.py").write_text(REWARD)
    method = {k: (f"{folder / 'length_reward.py'}:reward" if v == "REWARD" else v) for k, v in spec["method"].items()}
    train = {"precision": "fp32", "seed": 1, "log_every": 1, "max_steps": steps or 1000, **spec["train"]}
    return parse_recipe({"model": {"name": "default"},
                         "data": {"train": str(data), "validation_fraction": 0.1, "check": {"enabled": False},
                                  "max_reject_fraction": 1.0},
                         "method": method, "train": train, "eval": {"loss_rows": 8},
                         "output": {"dir": str(folder / f"run-{name}"), "overwrite": True}})


def worker_plan(name: str, folder: Path) -> dict:
    """The analytic plan and the probe, in this process."""
    from tunesmith.plan import build_plan
    from tunesmith.plan_probe import probe

    recipe = recipe_for(name, folder, STEPS)
    t0 = time.time()
    plan = build_plan(recipe)
    plan_seconds = time.time() - t0
    result = probe(recipe, plan=plan, echo=lambda s: None)
    return {"plan_peak": plan.peak, "terms": {t.name: t.bytes for t in plan.terms}, "plan_seconds": plan_seconds,
            "probe_peak": result.peak_bytes, "probe_steps": result.step_seconds,
            "probe_step": result.seconds_per_step, "scale": result.typical_scale,
            "predicted_step": result.seconds_per_step, "measured_how": result.measured}


def worker_run(name: str, folder: Path) -> dict:
    """A real short training run, its peak memory measured from just before the model loads."""
    from tunesmith import plan_probe, train

    recipe = recipe_for(name, folder, STEPS)
    memory = plan_probe.PeakMemory("cpu")
    prepare = train.prepare_stage

    def prepared_then_measured(*args, **kwargs):
        out = prepare(*args, **kwargs)
        memory.start()
        return out

    train.prepare_stage = prepared_then_measured
    clock = plan_probe.step_clock(Path(recipe.output.dir) / "metrics.jsonl")  # ppo's steps: from its rows
    train.train_run(recipe, callbacks=[clock], echo=lambda s: None)
    peak = memory.stop()
    steps = clock.step_seconds(STEPS)
    later = sorted(steps[1:])
    return {"run_peak": peak, "run_steps": steps, "run_step": later[len(later) // 2] if later else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="recipe names (default: all)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.worker:
        from tunesmith.model import quiet_libraries

        quiet_libraries()
        kind, name = args.worker
        result = (worker_plan if kind == "plan" else worker_run)(name, Path(args.folder))
        print("RESULT " + json.dumps(result), flush=True)
        return
    names = args.only or list(RECIPES)
    results = {}
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        for name in names:
            row = {}
            for kind in ("plan", "run"):
                t0 = time.time()
                proc = subprocess.run([sys.executable, __file__, "--worker", kind, name, "--folder", tmp],
                                      capture_output=True, text=True, cwd=tmp, env={**os.environ})
                found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not found:
                    row[f"{kind}_error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                    print(f"{name} {kind}: failed: {row[f'{kind}_error']}", file=sys.stderr, flush=True)
                    continue
                row.update(json.loads(found[-1][len("RESULT "):]))
                row[f"{kind}_wall"] = round(time.time() - t0, 1)
            results[name] = row
            print(line_of(name, row), flush=True)
    print()
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def _err(predicted, measured) -> str:
    if predicted is None or measured is None or not measured:
        return "—"
    return f"{(predicted - measured) / measured:+.0%}"


def line_of(name: str, r: dict) -> str:
    g = 1024**3
    if "plan_peak" not in r or "run_peak" not in r:
        return f"{name}: incomplete {r}"
    return (f"{name}: plan {r['plan_peak'] / g:.2f} GB, probe {r['probe_peak'] / g:.2f} GB, run {r['run_peak'] / g:.2f}"
            f" GB; step predicted {r['predicted_step']:.2f} s, run {r['run_step']:.2f} s")


def table(results: dict) -> str:
    g = 1024**3
    lines = ["| recipe | plan peak GB | probe peak GB | run peak GB | plan error | probe s/step (typical/longest) "
             "| run s/step | step error |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "plan_peak" not in r or "run_peak" not in r:
            lines.append(f"| {name} | failed: {r.get('plan_error') or r.get('run_error')} |||||||")
            continue
        lines.append(f"| {name} | {r['plan_peak'] / g:.2f} | {r['probe_peak'] / g:.2f} | {r['run_peak'] / g:.2f} | "
                     f"{_err(r['plan_peak'], r['run_peak'])} | {r['probe_step']:.2f} ({r['scale']:.2f}) | "
                     f"{r['run_step']:.2f} | {_err(r['predicted_step'], r['run_step'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
