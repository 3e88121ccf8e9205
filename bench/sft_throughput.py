"""SFT throughput: tunesmith (padding-free bf16, padded bf16) against a plain TRL tutorial script (padded fp32).

The same LoRA SFT in every arm: the default model (SmolLM2-135M-Instruct), the first N rows of
examples/meeting-json/train.jsonl, batch 8, LoRA r=16 alpha=32 dropout 0.05 on every linear layer, learning rate 2e-4
with a constant schedule and no warm-up, seed 42, the same number of optimizer steps.

Each arm runs in its own subprocess (this script re-invoked with `--arm NAME`), so peak RSS is per arm; the child
prints one JSON line, the parent prints a markdown table.

    .venv/bin/python bench/sft_throughput.py [--rows 64] [--steps 12] [--arms tunesmith-pf,tunesmith-padded,plain]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "meeting-json" / "train.jsonl"
ARMS = ("tunesmith-pf", "tunesmith-padded", "plain")
EXTRA_ARMS = ("tunesmith-pf-fp32", "tunesmith-padded-fp32")  # not run by default: attribute bf16's share
RESULT_PREFIX = "BENCH_RESULT "
BATCH, LR, SEED, MAX_LEN = 8, 2e-4, 42, 256
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def first_rows(n: int) -> list[dict]:
    rows = []
    with open(DATA, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{DATA} has only {len(rows)} rows, --rows {n} asked for")
    return rows


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def cpu_meter():
    """A transformers callback recording wall time, process CPU time and load average around `trainer.train()`.

    CPU seconds / wall seconds near the thread count means the arm had the cores; far below means other processes
    were taking them (the machine is shared).
    """
    from transformers import TrainerCallback

    class _Meter(TrainerCallback):
        def __init__(self):
            self.info = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.info.update(wall0=time.time(), cpu0=time.process_time(), load_begin=os.getloadavg()[0])

        def on_train_end(self, args, state, control, **kwargs):
            wall, cpu = time.time() - self.info["wall0"], time.process_time() - self.info["cpu0"]
            self.info.update(train_cpu_seconds=round(cpu, 1), cpu_per_wall=round(cpu / max(wall, 1e-9), 2),
                             load_end=os.getloadavg()[0])

    return _Meter()


def meter_fields(meter) -> dict:
    i = meter.info
    return {k: i[k] for k in ("train_cpu_seconds", "cpu_per_wall", "load_begin", "load_end") if k in i}


def last_losses_mean(losses: list[float], k: int = 4) -> float:
    tail = losses[-k:]
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------------------------- arms


VALIDATION = ROOT / "examples" / "meeting-json" / "validation.jsonl"


def heldout_loss(model) -> float:
    """Mean loss over the trained tokens of the 40 validation rows, fp32, no autocast: the same yardstick for
    every arm (tunesmith's formatting and masking; the plain arm also trains on the newline after <|im_end|>,
    which makes its running train loss lower without making the model better)."""
    import torch

    from tunesmith.data.format import encode
    from tunesmith.data.records import load_records
    from tunesmith.methods.common import trained_token_loss
    from tunesmith.model import ModelSource, default_model_dir, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(default_model_dir()))
    total, count = 0.0, 0
    model.eval()
    for record in load_records(VALIDATION).records:
        enc = encode(record, tokenizer, MAX_LEN)
        inputs = {"input_ids": torch.tensor([enc.input_ids]), "labels": torch.tensor([enc.labels])}
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            loss, _, n, _ = trained_token_loss(model, inputs)
        total, count = total + float(loss) * int(n), count + int(n)
    return round(total / count, 4)


def arm_tunesmith(rows: int, steps: int, padding_free: bool, precision: str = "auto") -> dict:
    from tunesmith.recipe import parse_recipe
    from tunesmith.train import train_run

    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in first_rows(rows)), encoding="utf-8")
        run_dir = Path(tmp) / "run"
        raw = {
            "model": {"name": "default"},
            "data": {"train": str(train_file), "validation_fraction": 0},
            "method": {"name": "sft", "adapter": "lora", "lora": dict(LORA)},
            "train": {"learning_rate": LR, "scheduler": "constant", "batch_size": BATCH, "max_steps": steps,
                      "max_seq_len": MAX_LEN, "log_every": 1, "seed": SEED, "padding_free": padding_free,
                      "precision": precision},
            "eval": {"loss_before": False},
            "output": {"dir": str(run_dir), "overwrite": True},
        }
        recipe = parse_recipe(raw, "bench")
        meter = cpu_meter()
        manifest = train_run(recipe, callbacks=[meter], echo=lambda s: print(s, file=sys.stderr, flush=True))
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        from tunesmith.generate import load_run

        held = heldout_loss(load_run(run_dir).model)
    by_step = {}
    for m in metrics:
        if "loss" in m:
            by_step[m["step"]] = m["loss"]  # one row per step (log_every=1); a repeat keeps the last
    losses = [by_step[s] for s in sorted(by_step)]
    runtime = next(m["train_runtime"] for m in metrics if "train_runtime" in m)
    tr = manifest["training"]
    return {
        "precision": manifest["precision"],
        "batching": "padding-free" if padding_free else "padded",
        "steps": tr["steps"],
        "train_seconds": runtime,
        "trained_tokens": tr["trained_tokens"],
        "per_epoch_trained_tokens": manifest["data"]["train_tokens"]["trained_tokens"],
        "per_epoch_tokens": manifest["data"]["train_tokens"]["tokens"],
        "epochs": round(tr["trained_tokens"] / max(manifest["data"]["train_tokens"]["trained_tokens"], 1), 4),
        "losses": losses,
        "heldout_loss": held,
        **meter_fields(meter),
    }


def arm_plain(rows: int, steps: int) -> dict:
    """The way the usual TRL tutorials write it: prompt/completion chats, LoraConfig, SFTConfig, SFTTrainer."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunesmith.model import default_model_dir

    folder = str(default_model_dir())
    data = [{"prompt": [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in first_rows(rows)]
    dataset = Dataset.from_list(data)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="plain-bench-") as tmp:
        args = SFTConfig(output_dir=tmp, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                         per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                         lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                         max_length=MAX_LEN, seed=SEED)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
        meter = cpu_meter()
        trainer.add_callback(meter)
        result = trainer.train()
        held = heldout_loss(trainer.model)
    prepared = trainer.train_dataset
    cols = prepared.column_names
    if "labels" in cols:
        per_epoch_trained = sum(sum(1 for x in lab if x != -100) for lab in prepared["labels"])
    else:
        per_epoch_trained = sum(sum(m) for m in prepared["completion_mask"])
    per_epoch_tokens = sum(len(ids) for ids in prepared["input_ids"])
    state = trainer.state
    by_step = {}
    for h in state.log_history:
        if "loss" in h:
            by_step[h["step"]] = h["loss"]
    losses = [by_step[s] for s in sorted(by_step)]
    epochs = state.epoch or 0.0
    return {
        "precision": str(next(model.parameters()).dtype).replace("torch.", "").replace("float32", "fp32"),
        "batching": "padded",
        "steps": state.global_step,
        "train_seconds": result.metrics["train_runtime"],
        "trained_tokens": int(round(per_epoch_trained * epochs)),
        "per_epoch_trained_tokens": per_epoch_trained,
        "per_epoch_tokens": per_epoch_tokens,
        "epochs": round(epochs, 4),
        "losses": losses,
        "heldout_loss": held,
        **meter_fields(meter),
    }


def run_arm(name: str, rows: int, steps: int) -> None:
    t0 = time.time()
    if name.startswith("tunesmith-") and name in ARMS + EXTRA_ARMS:
        out = arm_tunesmith(rows, steps, padding_free="-pf" in name,
                            precision="fp32" if name.endswith("-fp32") else "auto")
    elif name == "plain":
        out = arm_plain(rows, steps)
    else:
        raise SystemExit(f"unknown arm {name!r}; choose from {', '.join(ARMS + EXTRA_ARMS)}")
    import torch

    out.update(arm=name, rows=rows, wall_seconds_total=round(time.time() - t0, 1), threads=torch.get_num_threads(),
               peak_rss_gb=peak_rss_gb())
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------- parent


def spawn(name: str, rows: int, steps: int) -> dict:
    """Run one arm in a fresh interpreter; stream its output to stderr; return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", name, "--rows", str(rows), "--steps", str(steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                            bufsize=1)
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        else:
            sys.stderr.write(f"[{name}] {line}")
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"arm {name} failed (exit {proc.returncode})")
    return result


def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    """This machine's matmul rate in GFLOP/s: a plain torch.matmul loop of two size x size matrices, best of 3."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * size**3 / best / 1e9


def model_shape() -> dict:
    """The default model's linear parameters outside the embedding, its width and its vocabulary."""
    from transformers import AutoConfig

    from tunesmith.model import default_model_dir

    c = AutoConfig.from_pretrained(default_model_dir())
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    body = c.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size)
    return {"body": body, "hidden": h, "vocab": c.vocab_size}


def useful_flops(r: dict, shape: dict) -> float:
    """The work a LoRA step cannot avoid, whatever the arm: forward and input-gradient matmuls of the frozen body
    for every real token (4 x body parameters), and of the head for every trained token (4 x vocabulary x width).
    Padding and the head at untrained positions are not credited; attention scores and the LoRA matmuls are left
    out (a few per cent here), so the share of peak is slightly understated."""
    tokens = r["per_epoch_tokens"] * r["epochs"]
    return 4 * shape["body"] * tokens + 4 * shape["vocab"] * shape["hidden"] * r["trained_tokens"]


def table(results: list[dict], peaks: dict[str, float] | None = None, shape: dict | None = None) -> str:
    plain = next((r for r in results if r["arm"] == "plain"), None)
    head = ("| arm | precision | batching | s/step | trained tok/s | peak RSS GB | train loss (last 4) | held-out loss | "
            "ratio vs plain (tok/s) | useful GFLOP/s | share of matmul peak |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tps = r["trained_tokens"] / r["train_seconds"]
        ratio = "—" if plain is None else f"{tps / (plain['trained_tokens'] / plain['train_seconds']):.2f}×"
        rate = useful_flops(r, shape) / r["train_seconds"] / 1e9 if shape else None
        peak = (peaks or {}).get(r["precision"])
        lines.append(f"| {r['arm']} | {r['precision']} | {r['batching']} | {r['train_seconds'] / r['steps']:.2f} | "
                     f"{tps:.0f} | {r['peak_rss_gb']:.2f} | {last_losses_mean(r['losses']):.4f} | "
                     f"{r['heldout_loss']:.4f} | {ratio} | {'—' if rate is None else f'{rate:.0f}'} | "
                     f"{'—' if not (rate and peak) else f'{100 * rate / peak:.0f}%'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS + EXTRA_ARMS)}")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    ap.add_argument("--json", help="also write every arm's full result to this file")
    args = ap.parse_args()
    if args.arm:
        run_arm(args.arm, args.rows, args.steps)
        return
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS + EXTRA_ARMS:
            ap.error(f"unknown arm {a!r}; choose from {', '.join(ARMS + EXTRA_ARMS)}")
    peaks = {p: matmul_peak(p) for p in ("fp32", "bf16")}  # before the arms, on the same machine, same invocation
    results = [spawn(a, args.rows, args.steps) for a in arms]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"\nrows={args.rows} steps={args.steps} batch={BATCH} git={sha.strip() or '?'} (load average at end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print(f"matmul peak (2048 x 2048 torch.matmul, best of 3): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 "
          f"{peaks['bf16']:.0f} GFLOP/s\n")
    print(table(results, peaks, model_shape()))
    print()
    for r in results:
        print(f"{r['arm']}: trained tokens {r['trained_tokens']} ({r['per_epoch_trained_tokens']}/epoch of "
              f"{r['per_epoch_tokens']} tokens, {r['epochs']} epochs), train {r['train_seconds']:.1f} s, "
              f"CPU {r.get('train_cpu_seconds')} s ({r.get('cpu_per_wall')} cores busy of {r['threads']} threads), "
              f"load {r.get('load_begin')} -> {r.get('load_end')}; losses {' '.join(f'{x:.3f}' for x in r['losses'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
