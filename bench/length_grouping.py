"""Length-grouped batches (`train.group_by_length: true`) against random batches, the Trainer's default.

The SST-2 and BANKING77 classification recipes (examples/*/recipe.yaml: SmolLM2-135M-Instruct, LoRA r=16, batch 32,
max_seq_len 64) train for the same number of steps with each sampler, in this one process, one after the other.
Validation is 2% of the training file (the validation files are not read: this measures steps, not accuracy).
Per arm, over the steps after the first two (warm-up): seconds per step, tokens in the padded batches and real
tokens (counted by wrapping the collator), padding overhead = padded / real tokens, and real tokens per second —
the fair speed: the sampler puts the longest batch first, so grouped steps carry more real tokens early on.

    .venv/bin/python bench/length_grouping.py [--steps 12] [--datasets sst2,banking77] [--model default]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_timer(counts: dict[str, int]):
    """A transformers callback keeping each optimizer step's wall time; token counting is on during training only
    (the batches of the evaluations after it are left out)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            counts.update(on=1, batches=[])

        def on_train_end(self, args, state, control, **kwargs):
            counts["on"] = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    return Timer()


def count_tokens(counts: dict[str, int]):
    """Wrap classify's PadCollator so every batch it builds adds its padded and real token counts to `counts`."""
    from tunesmith.methods import classify

    inner = classify.PadCollator.__call__

    def counted(self, examples):
        batch = inner(self, examples)
        if counts.get("on"):
            counts["batches"].append((batch["input_ids"].numel(), int(batch["attention_mask"].sum())))
        return batch

    classify.PadCollator.__call__ = counted


def run_arm(dataset: str, grouped: bool, steps: int, model: str, counts: dict[str, int]) -> dict:
    from tunesmith.recipe import load_recipe
    from tunesmith.train import train_run

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(ROOT / "examples" / dataset / "recipe.yaml", [
            f"model.name={model}", "data.validation=null", "data.validation_fraction=0.02",
            "data.check.enabled=false", f"train.max_steps={steps}", f"train.group_by_length={str(grouped).lower()}",
            "eval.loss_before=false", "eval.loss_rows=8", f"output.dir={out}/run"])
        timer = step_timer(counts)
        train_run(recipe, callbacks=[timer], echo=lambda s: None)
    times, batches = timer.times[2:], counts["batches"][2:len(timer.times)]  # one batch per step (no accumulation)
    padded, real = sum(b[0] for b in batches), sum(b[1] for b in batches)
    return {"s_per_step": sum(times) / len(times), "padded": padded, "real": real, "tok_s": real / sum(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--datasets", default="sst2,banking77")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    counts: dict[str, int] = {}
    count_tokens(counts)
    print("| dataset | batches | s/step | padded tokens | real tokens | padded / real | real tokens/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        results = {grouped: run_arm(dataset, grouped, args.steps, args.model, counts) for grouped in (False, True)}
        for grouped, r in results.items():
            ratio = r["tok_s"] / results[False]["tok_s"]
            print(f"| {dataset} | {'grouped by length' if grouped else 'random (Trainer default)'} | "
                  f"{r['s_per_step']:.2f} | {r['padded']:,} | {r['real']:,} | {r['padded'] / r['real']:.2f} | "
                  f"{r['tok_s']:.0f} | {ratio:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
