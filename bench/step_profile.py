"""Where a LoRA SFT step of the default model goes: a torch.profiler table by part of the model.

The step is tunesmith's own (`tunesmith.train.train_run` on the bench recipe of bench/sft_throughput.py: the default
model, rows of examples/meeting-json/train.jsonl, batch 8, LoRA r=16 on every linear layer), or with `--plain` the
plain TRL tutorial script's. Steps `--skip` + 1 … `--skip` + `--steps` run under torch.profiler; every aten op is
attributed to the innermost part of the model it ran in (module forward hooks open a `ts::PART` profiler range), and
each backward op to the part whose forward op made its autograd node (matched by the profiler's sequence number).

    .venv/bin/python bench/step_profile.py [--precision fp32|bf16|auto] [--padding-free] [--plain] [--steps 3]

Parts: embedding, attention (q/k/v/o projections' frozen matmuls, rotary, softmax), mlp (frozen gate/up/down),
lora (lora_A/lora_B/dropout of every adapted layer), norm (RMSNorm), head (lm_head), loss (cross-entropy and the
label gathering around it; a fused head-and-loss — tunesmith's chunked one, TRL's chunked log-probabilities — counts
here whole), optimizer (AdamW step, gradient clipping, zero_grad), data (collation), other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_throughput as sft  # noqa: E402 - the same recipe, rows and plain arm

PARTS = ("embedding", "attention", "mlp", "lora", "norm", "head", "loss", "optimizer", "data", "other")


def part_of(name: str, module) -> str | None:
    """The part a module's forward belongs to, None for containers (their children say)."""
    kind = type(module).__name__
    if "lora_" in name.rsplit(".", 1)[-1] or kind == "_FastDropout" or ".lora_" in name:
        return "lora"
    if name.endswith("embed_tokens"):
        return "embedding"
    if name.endswith("lm_head"):
        return "head"
    if "Norm" in kind:
        return "norm"
    if name.endswith("self_attn"):
        return "attention"
    if name.endswith(".mlp"):
        return "mlp"
    return None


def install_ranges(model) -> list:
    """Forward hooks opening a profiler range `ts::PART` around each part's forward; returns the hook handles."""
    import torch

    handles = []
    for name, module in model.named_modules():
        part = part_of(name, module)
        if part is None:
            continue

        def pre(mod, args, _part=part):
            rf = torch.autograd.profiler.record_function(f"ts::{_part}")
            rf.__enter__()
            mod._ts_ranges = getattr(mod, "_ts_ranges", []) + [rf]

        def post(mod, args, output):
            mod._ts_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def attribute(events) -> dict[str, dict[str, float]]:
    """Milliseconds per part, forward and backward, from the profiler's events (self time, so nothing counts twice)."""
    forward_part: dict[int, str] = {}
    out = {p: {"forward": 0.0, "backward": 0.0} for p in PARTS}
    ops: dict[str, dict[str, float]] = {p: defaultdict(float) for p in PARTS}  # what each part is made of (--top)

    def enclosing(ev) -> str | None:
        node = ev.cpu_parent
        while node is not None:
            if node.name.startswith("ts::"):
                return node.name[4:]
            if "ChunkedHeadLoss" in node.name or "ChunkedLogProb" in node.name:  # tunesmith's / TRL's fused head
                return "loss"
            if node.name.startswith("Optimizer.") or "AdamW" in node.name or "clip_grad" in node.name:
                return "optimizer"
            if "DataLoader" in node.name or "collat" in node.name.lower():
                return "data"
            if node.name.startswith("autograd::engine::evaluate_function"):
                return "bwd:" + str(node.sequence_nr)
            node = node.cpu_parent
        return None

    def is_loss(name: str) -> bool:
        return any(k in name for k in ("cross_entropy", "log_softmax", "nll_loss", "_log_softmax"))

    ordered = sorted(events, key=lambda e: e.time_range.start)
    for ev in ordered:  # first: every forward op's sequence number → its part
        if ev.sequence_nr >= 0 and not ev.name.startswith("autograd::"):
            where = enclosing(ev)
            if where and not where.startswith("bwd:"):
                forward_part.setdefault(ev.sequence_nr, where)
            elif where is None and is_loss(ev.name):
                forward_part.setdefault(ev.sequence_nr, "loss")
    for ev in ordered:
        if ev.name.startswith("ts::") or ev.name.startswith("ProfilerStep"):
            continue
        self_ms = ev.self_cpu_time_total / 1000
        where = enclosing(ev)
        if ev.name.startswith("autograd::engine::evaluate_function"):
            part, phase = forward_part.get(ev.sequence_nr, "other"), "backward"
        elif where is not None and where.startswith("bwd:"):
            part, phase = forward_part.get(int(where[4:]), "other"), "backward"
        elif where is not None:
            part, phase = where, "forward"
        elif is_loss(ev.name):
            part, phase = "loss", "forward"
        elif any(k in ev.name for k in ("AdamW", "Optimizer", "zero_grad", "clip_grad", "_foreach")):
            part, phase = "optimizer", "forward"
        else:
            part, phase = "other", "forward"
        part = part if part in out else "other"
        out[part][phase] += self_ms
        ops[part][f"{ev.name} ({phase[0]})"] += self_ms
    for part in PARTS:
        out[part]["ops"] = dict(sorted(ops[part].items(), key=lambda kv: -kv[1])[:10])
    return out


def profiler_callback(skip: int, steps: int, holder: dict):
    """A TrainerCallback profiling steps skip+1 … skip+steps of whatever Trainer it is given to."""
    import torch
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            holder["handles"] = install_ranges(model)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == skip:
                holder["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                holder["prof"].__enter__()
                holder["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == skip + steps and "prof" in holder:
                holder["wall_ms"] = (time.perf_counter() - holder["t0"]) * 1000
                holder["prof"].__exit__(None, None, None)
                holder["events"] = holder.pop("prof").events()
                control.should_training_stop = True

    return _Profile()


def run_tunesmith(args, holder: dict) -> dict:
    from tunesmith.recipe import parse_recipe
    from tunesmith.train import train_run

    with tempfile.TemporaryDirectory(prefix="tunesmith-profile-") as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in sft.first_rows(args.rows)), encoding="utf-8")
        raw = {
            "model": {"name": "default"},
            "data": {"train": str(train_file), "validation_fraction": 0},
            "method": {"name": "sft", "adapter": "lora", "lora": dict(sft.LORA)},
            "train": {"learning_rate": sft.LR, "scheduler": "constant", "batch_size": sft.BATCH,
                      "max_steps": args.skip + args.steps, "max_seq_len": sft.MAX_LEN, "log_every": 1,
                      "seed": sft.SEED, "padding_free": args.padding_free, "precision": args.precision},
            "eval": {"loss_before": False},
            "output": {"dir": str(Path(tmp) / "run"), "overwrite": True},
        }
        manifest = train_run(parse_recipe(raw, "profile"), callbacks=[profiler_callback(args.skip, args.steps, holder)],
                             echo=lambda s: print(s, file=sys.stderr, flush=True))
    return {"precision": manifest["precision"], "batching": "padding-free" if args.padding_free else "padded"}


def run_plain(args, holder: dict) -> dict:
    """The plain TRL script of bench/sft_throughput.py, profiled the same way."""
    from trl import SFTTrainer

    original = SFTTrainer.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(profiler_callback(args.skip, args.steps, holder))

    SFTTrainer.__init__ = init
    try:
        sft.arm_plain(args.rows, args.skip + args.steps)
    finally:
        SFTTrainer.__init__ = original
    return {"precision": "fp32", "batching": "padded"}


def table(parts: dict[str, dict[str, float]], steps: int, wall_ms: float) -> str:
    total = sum(v["forward"] + v["backward"] for v in parts.values())
    lines = ["| part | forward ms/step | backward ms/step | total ms/step | share |", "|---|---|---|---|---|"]
    for p in PARTS:
        f, b = parts[p]["forward"] / steps, parts[p]["backward"] / steps
        lines.append(f"| {p} | {f:.0f} | {b:.0f} | {f + b:.0f} | {100 * (f + b) * steps / max(total, 1e-9):.1f}% |")
    lines.append(f"| **all (profiled op time)** | | | {total / steps:.0f} | 100% |")
    lines.append(f"| wall time of the step (profiler on) | | | {wall_ms / steps:.0f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    ap.add_argument("--padding-free", action="store_true")
    ap.add_argument("--plain", action="store_true", help="profile the plain TRL script instead (fp32, padded)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--skip", type=int, default=1, help="steps run before profiling starts (warm-up)")
    ap.add_argument("--steps", type=int, default=3, help="steps profiled")
    ap.add_argument("--top", nargs="*", choices=PARTS, help="also list the largest ops of these parts")
    ap.add_argument("--json", help="also write the table's numbers to this file")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    holder: dict = {}
    info = run_plain(args, holder) if args.plain else run_tunesmith(args, holder)
    if "events" not in holder:
        raise SystemExit("no step was profiled: give more --rows or fewer --skip/--steps")
    parts = attribute(holder["events"])
    arm = "plain TRL script" if args.plain else "tunesmith"
    print(f"\n{arm}, {info['precision']}, {info['batching']}, batch {sft.BATCH}, {args.steps} steps profiled after "
          f"{args.skip}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}\n")
    print(table(parts, args.steps, holder["wall_ms"]))
    for part in args.top or ():
        print(f"\nlargest ops of {part} (ms/step; f forward, b backward): " + ", ".join(
            f"{name} {ms / args.steps:.0f}" for name, ms in parts[part]["ops"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"arm": arm, **info, "parts": parts, "steps": args.steps,
                                               "wall_ms": holder["wall_ms"]}, indent=1))


if __name__ == "__main__":
    main()
