"""`tunesmith plan --probe`: three real training steps on the longest batch and one evaluation, measured.

The probe trains through the recipe's own method (`method.train`, the same model, adapter, trainer and loss) on a
copy of the recipe cut to three steps, in a temporary folder that is removed afterwards: nothing is written into the
run folder. It measures
- peak memory: on the CPU the kernel's high-water mark of the process's resident memory (VmHWM in
  /proc/self/status, reset through /proc/self/clear_refs just before the model loads) less the resident memory at
  that moment — where the reset is refused, a thread sampling VmRSS every 2 ms instead; on CUDA
  `torch.cuda.max_memory_allocated` less what was allocated before;
- seconds per step: the faster of the second and third steps (the first pays one-time costs; on the CPU, steps then
  alternate fast and slow while malloc grows and trims its heap — measured 1.7 vs 5.0 s — and one more step than
  asked for catches a typical one), times gradient accumulation;
- seconds per evaluation batch: the evaluation after training, per batch of the longest rows.
The time to finish counts every step as long as the longest batch's (bench/plan_accuracy.py: scaling it by a
typical batch's tokens fell 10-23% short on classify and dpo, whose per-step costs don't shrink with the tokens);
`finish_low_seconds` is that token-scaled figure, a floor when row lengths vary.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.recipe import Recipe


PROBE_STEPS = 3
POLL_SECONDS = 0.02  # step_clock's look at a loop's metrics rows


@dataclass
class ProbeResult:
    peak_bytes: int  # measured peak above the baseline (see `measured`)
    measured: str  # what was measured, in words
    step_seconds: list[float]  # each probe step on the longest batch (one micro-batch each)
    seconds_per_step: float  # the faster of steps 2 and 3, × gradient accumulation
    eval_seconds_per_batch: float | None
    typical_scale: float  # typical batch tokens / longest batch tokens
    finish_seconds: float  # estimated time to finish the run (steps and evaluations), every batch the longest
    finish_low_seconds: float  # the same with each step scaled by a typical batch's tokens (a floor)
    evaluations: int  # evaluation batches counted in finish_seconds
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- memory


def _status(key: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """The peak of this process's memory above its level at `start()` (CPU: resident memory; CUDA: allocated)."""

    def __init__(self, device: str):
        self.device, self.base, self.sampled, self._stop = device, 0, 0, None
        self.how = ""

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "torch.cuda.max_memory_allocated less what was allocated before the model loaded"
            return
        self.base = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.how = ("peak resident memory (VmHWM, reset just before the model loaded) less the resident memory "
                        "then")
        except OSError:
            self.how = "resident memory sampled every 2 ms (peak) less the resident memory before the model loaded"
            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status("VmRSS"))
            time.sleep(0.002)

    def stop(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self._stop is not None:
            self._stop.set()
            return max(self.sampled, _status("VmRSS")) - self.base
        return _status("VmHWM") - self.base


# ----------------------------------------------------------------------------------------------- timing


def step_clock(rows: Path | None = None):
    """A transformers callback recording when the training steps, the training and each evaluation end. A method
    with a loop of its own (ppo) calls only on_train_begin/on_train_end; it writes one metrics row per step, so with
    `rows` (the run's metrics.jsonl) a thread notes when each new step row appears (polled every POLL_SECONDS), and
    the steps are timed from those — otherwise only their average over the run is known, the first step's one-time
    costs included (spread over 3 steps in the probe, over 5 in bench/plan_accuracy.py's run)."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.steps, self.end, self.evals = None, [], None, []
            self.row_times: list[float] = []
            self._size = -1
            self._stop = threading.Event()
            self._thread = None

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()
            if rows is not None and self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True)
                self._thread.start()

        def _watch(self) -> None:
            while not self._stop.is_set():
                self._look()
                self._stop.wait(POLL_SECONDS)
            self._look()  # the last step's row, written just before on_train_end

        def _look(self) -> None:
            try:
                size = rows.stat().st_size
            except OSError:
                return
            if size == self._size:
                return
            self._size, now = size, time.perf_counter()
            try:
                lines = rows.read_text(encoding="utf-8").splitlines()
            except OSError:
                return
            steps = sum(1 for line in lines if line.startswith('{"step"'))
            self.row_times += [now] * max(0, steps - len(self.row_times))

        def on_step_begin(self, args, state, control, **kw):
            self.steps.append([time.perf_counter(), None])

        def on_step_end(self, args, state, control, **kw):
            if self.steps:
                self.steps[-1][1] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()
            if self._thread is not None:
                self._stop.set()
                self._thread.join()

        def on_evaluate(self, args, state, control, **kw):
            self.evals.append(time.perf_counter())

        def step_seconds(self, total_steps: int) -> list[float]:
            done = [b - a for a, b in self.steps if b is not None]
            if done:
                return done
            if self.begin is not None and len(self.row_times) >= min(total_steps, 2):  # a loop of its own (ppo)
                marks = [self.begin, *self.row_times[:total_steps]]
                return [b - a for a, b in zip(marks, marks[1:])]
            if self.begin is not None and self.end is not None:  # its rows unseen: the average
                return [(self.end - self.begin) / max(total_steps, 1)] * total_steps
            return []

    return _Clock()


# ----------------------------------------------------------------------------------------------- the probe


def _row_tokens(row) -> int:
    return len(row.input_ids) + len(getattr(row, "rejected_ids", ()) or ())


def typical_scale(rows: list, batch_size: int, seed: int = 0, draws: int = 200) -> float:
    """Padded tokens of a random batch over those of the longest batch (step time scales about with tokens)."""
    lengths = [_row_tokens(r) for r in rows]
    longest = sorted(lengths, reverse=True)[:batch_size]
    worst = max(longest) * len(longest)
    rng = random.Random(seed)
    b = min(batch_size, len(lengths))
    mean = sum(max(rng.sample(lengths, b)) * b for _ in range(draws)) / draws
    return min(1.0, mean / max(worst, 1))


def probe_recipe(recipe: Recipe, out: Path) -> Recipe:
    """The recipe cut to PROBE_STEPS steps of one micro-batch, without checkpoints or evaluations while it trains,
    its run folder `out`."""
    t = recipe.train.model_copy(update={"max_steps": PROBE_STEPS, "gradient_accumulation": 1, "eval_every": None,
                                        "save_every": None, "keep_best": False, "early_stopping_patience": None,
                                        "log_every": 1})
    return recipe.model_copy(update={"train": t, "eval": recipe.eval.model_copy(update={"loss_before": False}),
                                     "output": recipe.output.model_copy(update={"dir": str(out)})})


def probe(recipe: Recipe, source=None, train_rows: list | None = None, validation_rows: list | None = None,
          device: str | None = None, plan=None, echo=print) -> ProbeResult:
    """PROBE_STEPS real steps on the longest batch and one evaluation batch through the recipe's method; measured peak
    memory and seconds per step, and the estimated time to finish (steps from `plan` when given)."""
    import torch

    from tunesmith.artifacts import RunDir
    from tunesmith.methods import REGISTRY
    from tunesmith.methods.common import Job
    from tunesmith.model import load_tokenizer, pick_precision
    from tunesmith.plan import encoded_rows

    if source is None or train_rows is None:
        source, train_rows, validation_rows = encoded_rows(recipe)
    method = REGISTRY[recipe.method.name]
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = getattr(recipe.method, "rollout_batch_size", None) or recipe.train.batch_size
    longest = sorted(train_rows, key=_row_tokens, reverse=True)[:size]
    longest = (longest * math.ceil(size / len(longest)))[:size]
    folder = Path(tempfile.mkdtemp(prefix="tunesmith-probe-"))
    clock, memory = step_clock(folder / "run" / "metrics.jsonl"), PeakMemory(kind)
    try:
        cut = probe_recipe(recipe, folder / "run")
        run = RunDir(folder / "run")
        run.root.mkdir(parents=True)
        job = Job(recipe=cut, run=run, source=source, tokenizer=load_tokenizer(source),
                  train_rows=longest * PROBE_STEPS,
                  validation_rows=list(longest), loss_rows=[], precision=pick_precision(recipe.train.precision),
                  callbacks=[clock])
        tokens = max(_row_tokens(r) for r in longest)
        echo(f"probe: {PROBE_STEPS} steps of {size} rows × {tokens} tokens (the longest) and one evaluation, through "
             "the recipe's method…")
        memory.start()
        method.train(job)
        peak = memory.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    steps = clock.step_seconds(PROBE_STEPS)
    per_step = (min(steps[1:] or steps) if steps else float("nan")) * recipe.train.gradient_accumulation
    eval_batch = (clock.evals[-1] - clock.end) if clock.evals and clock.end else None
    scale = typical_scale(train_rows, recipe.train.batch_size, recipe.train.seed)
    if method.name == "ppo" or getattr(recipe.method, "max_completion_length", None):
        scale = 1.0  # generation length, not the prompts, sets a step's time
    total_steps = plan.steps if plan is not None else (recipe.train.max_steps or 0)
    batches = evaluation_batches(recipe, len(validation_rows or []), total_steps)
    finish = total_steps * per_step + batches * (eval_batch or 0.0)
    return ProbeResult(peak_bytes=peak, measured=memory.how, step_seconds=steps, seconds_per_step=per_step,
                       eval_seconds_per_batch=eval_batch, typical_scale=scale, finish_seconds=finish,
                       finish_low_seconds=finish * scale,
                       evaluations=batches)


def evaluation_batches(recipe: Recipe, validation_rows: int, steps: int) -> int:
    """Evaluation batches a run does: the loss before and after (sampled training rows and validation), and every
    `eval_every` steps."""
    t, b = recipe.train, recipe.train.batch_size
    val = math.ceil(validation_rows / b)
    sample = math.ceil(recipe.eval.loss_rows / b)
    during = (steps // t.eval_every) * val if t.eval_every else 0
    return (2 if recipe.eval.loss_before else 1) * (val + sample) + during
