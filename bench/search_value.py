"""What search buys (issue 21): `tunesmith tune` on BANKING77 (MiniLM, classify) and SST-2 (the default model,
classify), each within a stated CPU budget, then the winner against the recipe as written on validation rows the
search never saw.

    .venv/bin/python bench/search_value.py banking77 [--trials 8]
    .venv/bin/python bench/search_value.py sst2 [--trials 5]

Each task: a seeded sample of the training file (written under runs/bench-search-value/TASK/, never into the
project), trials of a few steps each scored on 20% of it carved off by tune, and the first --rows rows of the
validation file for the final comparison. Prints the Markdown row BENCHMARKS.md records and writes
runs/bench-search-value/TASK/result.json. Runs only while /tmp/bench-running is absent (the machine's 2 cores are
shared with other benchmarks); holds it while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
LOCK = Path("/tmp/bench-running")

TASKS = {
    "banking77": {
        "model": "minilm", "train_rows": 2000, "val_rows": 500, "trials": 8,
        "recipe": {"method": {"name": "classify", "adapter": "full"},
                   "train": {"learning_rate": 1.0e-4, "scheduler": "linear", "batch_size": 32, "max_steps": 60,
                             "max_seq_len": 64, "eval_every": 20, "log_every": 10}},
        "space": {"train.learning_rate": {"log_uniform": [2.0e-5, 2.0e-3]},
                  "train.warmup_ratio": {"uniform": [0.0, 0.2]},
                  "train.weight_decay": [0.0, 0.01, 0.1],
                  "method.head_init": ["random", "probe"]},
    },
    "sst2": {
        "model": "default", "train_rows": 800, "val_rows": 300, "trials": 5,
        "recipe": {"method": {"name": "classify", "adapter": "lora", "lora": {"r": 16, "alpha": 32}},
                   "train": {"learning_rate": 5.0e-4, "scheduler": "cosine", "warmup_ratio": 0.05, "batch_size": 16,
                             "max_steps": 12, "max_seq_len": 64, "eval_every": 6, "log_every": 6}},
        "space": {"train.learning_rate": {"log_uniform": [5.0e-5, 5.0e-3]},
                  "method.lora.r": [4, 16, 32],
                  "train.warmup_ratio": {"uniform": [0.0, 0.2]}},
    },
}


def sample(src: Path, dst: Path, n: int, seed: int) -> None:
    """A seeded sample of `n` lines of `src` (or its first `n` lines for the validation file: seed None)."""
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    picked = lines[:n] if seed is None else random.Random(seed).sample(lines, min(n, len(lines)))
    dst.write_text("\n".join(picked) + "\n", encoding="utf-8")


def cpu() -> str:
    """lscpu's model name and the flags that decide the fast path."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("Model name")), "?")
    flags = next((x.split(":", 1)[1].split() for x in out.splitlines() if x.startswith("Flags")), [])
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of avx2/avx512f/avx512_bf16/amx'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=tuple(TASKS))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = TASKS[args.task]
    trials = args.trials or task["trials"]
    try:  # taken atomically: two benchmarks can't both see it absent
        fd = os.open(LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"{LOCK} exists: another benchmark is running; try again when it is gone", file=sys.stderr)
        return 3
    os.write(fd, f"bench/search_value.py {args.task} pid {os.getpid()}\n".encode())
    os.close(fd)
    try:
        return run(args.task, task, trials, args.seed)
    finally:
        LOCK.unlink(missing_ok=True)


def run(name: str, task: dict, trials: int, seed: int) -> int:
    import yaml

    from tunesmith.model import quiet_libraries
    from tunesmith.tune import TuneOptions, run_tune

    work = ROOT / "runs" / "bench-search-value" / name
    work.mkdir(parents=True, exist_ok=True)
    sample(DATA / name / "train.jsonl", work / "train.jsonl", task["train_rows"], seed)
    sample(DATA / name / "validation.jsonl", work / "validation.jsonl", task["val_rows"], None)
    recipe = {"model": {"name": task["model"]},
              "data": {"train": "train.jsonl", "validation": "validation.jsonl", "format": "classification",
                       "validation_fraction": 0.2, "check": {"leakage": "warn"}},
              **task["recipe"], "output": {"dir": str(work / "run")}}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (work / "space.yaml").write_text(yaml.safe_dump(task["space"], sort_keys=False))
    command = (f"tunesmith tune {work / 'recipe.yaml'} --space {work / 'space.yaml'} --trials {trials} "
               f"--metric validation.accuracy --seed {seed} --batch-size 32")
    print(command, flush=True)
    quiet_libraries()
    started = time.time()
    summary = run_tune(TuneOptions(recipe=str(work / "recipe.yaml"), space=str(work / "space.yaml"), trials=trials,
                                   metric="validation.accuracy", seed=seed, batch_size=32, resume=True))
    total = time.time() - started
    final, best = summary.get("final") or {}, summary["best"]
    result = {"task": name, "date": time.strftime("%Y-%m-%d"), "machine": cpu(), "python": platform.python_version(),
              "command": command, "train_rows": task["train_rows"], "val_rows": task["val_rows"],
              "trials": len(summary["trials"]), "states": {s: sum(t["state"] == s for t in summary["trials"])
                                                          for s in ("complete", "pruned", "failed")},
              "best_trial": best["number"], "best_params": best["params"], "best_value": best["value"],
              "search_seconds": summary["search_seconds"], "total_seconds": round(total, 1), "final": final,
              "trial_seconds": [t["seconds"] for t in summary["trials"]],
              "trial_seconds_sum": round(sum(t["seconds"] or 0 for t in summary["trials"]), 1),
              "importances": summary["importances"]}
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    d, b, r = final.get("difference", {}), final.get("best", {}), final.get("recipe", {})
    print(f"trial seconds: {result['trial_seconds']} (sum {result['trial_seconds_sum']} s; this session's search "
          f"wall {summary['search_seconds']} s — a resumed study counts only the resumed part)")
    print("\n| task | trials (complete/pruned) | search wall | best trial (carved split) | winner on validation | "
          "recipe as written | difference [95% CI] | total wall |")
    print(f"| {name} | {result['trials']} ({result['states']['complete']}/{result['states']['pruned']}) | "
          f"{summary['search_seconds'] / 60:.1f} min | {best['value']:.3f} | "
          f"{b.get('value', float('nan')):.3f} | {r.get('value', float('nan')):.3f} | "
          f"{d.get('diff', float('nan')):+.3f} [{d.get('ci_low', float('nan')):+.3f}, "
          f"{d.get('ci_high', float('nan')):+.3f}] | {total / 60:.1f} min |")
    print(f"machine: {result['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
