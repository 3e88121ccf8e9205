"""The training stage, wired in order: run folder -> data -> tokenizer -> formatting -> method -> save -> summary."""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith import artifacts
from tunesmith.artifacts import RunDir
from tunesmith.data import check_reject_share, file_sha256, prepare_data, write_rejects
from tunesmith.data.format import Encoded, encode, end_of_turn_ids, stats
from tunesmith.errors import RunError
from tunesmith.methods import REGISTRY
from tunesmith.model import load_tokenizer, pick_precision, resolve_model
from tunesmith.recipe import Recipe, recipe_changes


@dataclass
class EncodedData:
    """Formatted rows plus the rows formatting had to reject."""

    train: list[Encoded]
    validation: list[Encoded]
    rejects: list[dict[str, Any]]


def train_run(recipe: Recipe, resume: bool = False, callbacks: list | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as the recipe says and write a complete run folder; return the manifest."""
    started = time.time()
    method = REGISTRY[recipe.method.name]
    run = prepare_run_dir(recipe, resume)
    run.recipe.write_text(recipe.to_yaml())

    timings: dict[str, float] = {}
    t = time.time()
    data = prepare_data(recipe.data, recipe.train.seed, method.record_types)
    source = resolve_model(recipe.model.name, recipe.model.cache_dir)
    tokenizer = load_tokenizer(source)
    encoded = (method.encode or encode_rows)(data, tokenizer, recipe)
    all_rejects = data.rejects + encoded.rejects
    write_rejects(all_rejects, run.rejects)
    echo(data_summary(data.counts(), len(encoded.rejects), stats(encoded.train), recipe, run))
    check_reject_share(data, recipe.data.max_reject_fraction)
    if recipe.data.check.enabled:
        check_gate(data, recipe, run, echo)
    timings["data_seconds"] = round(time.time() - t, 2)

    from tunesmith.methods.common import Job

    rng = random.Random(recipe.train.seed)
    loss_rows = rng.sample(encoded.train, min(recipe.eval.loss_rows, len(encoded.train)))
    precision = pick_precision(recipe.train.precision)
    members = getattr(recipe.method, "members", None)  # an ensemble: its members bring their own models
    echo(f"members: {', '.join(members)} · method: {method.name} (each member in its own precision)" if members else
         f"model: {source.describe()} · method: {method.name} ({getattr(recipe.method, 'adapter', '-')}) · "
         f"precision: {precision}" + (" (auto)" if recipe.train.precision == "auto" else ""))
    job = Job(recipe=recipe, run=run, source=source, tokenizer=tokenizer, train_rows=encoded.train,
              validation_rows=encoded.validation, loss_rows=loss_rows, precision=precision, resume=resume,
              callbacks=list(callbacks or []))
    outcome = method.train(job)
    timings["train_seconds"] = round(outcome.seconds, 2)

    save_tokenizer_and_generation(run, tokenizer, source)
    manifest = {
        "tunesmith_run": 1,
        "method": method.name,
        "saved": outcome.saved,
        "adapter": getattr(recipe.method, "adapter", None),
        "base_model": {"name": recipe.model.name, "cache_dir": recipe.model.cache_dir,
                       "resolved": source.describe()},
        "precision": precision,
        "seed": recipe.train.seed,
        "data": {**data.counts(),
                 "formatting_rejects": len(encoded.rejects),
                 "hashes": {load.path: file_sha256(load.path) for load in data.loads},
                 "train_tokens": stats(encoded.train), "validation_tokens": stats(encoded.validation),
                 "labels": data.labels},
        "training": {"steps": outcome.steps, "trained_tokens": outcome.trained_tokens,
                     "trained_tokens_per_second": round(outcome.trained_tokens / max(outcome.seconds, 1e-9), 2),
                     "trainable_params": outcome.trainable_params, "total_params": outcome.total_params,
                     "stopped_early": outcome.stopped_early, "resumed": resume,
                     "kept": None if outcome.kept_step is None else {
                         "step": outcome.kept_step, "metric": outcome.kept_metric, "value": outcome.kept_value}},
        "losses": outcome.losses,
        "timings": {**timings, "total_seconds": round(time.time() - started, 2)},
        "versions": artifacts.versions(),
        "git_sha": artifacts.git_sha(Path(__file__).parent),
        "machine": artifacts.machine(),
    }
    artifacts.write_json(run.manifest, manifest)
    (run.root / ".losses_before.json").unlink(missing_ok=True)
    echo(train_summary(manifest, run))
    return manifest


def check_gate(data, recipe: Recipe, run: RunDir, echo: Callable[[str], None]) -> None:
    """Check the training data (duplicates; leakage into a validation file) and stop on what the recipe forbids."""
    from tunesmith.data.check import CheckOptions, gate

    c = recipe.data.check
    options = CheckOptions(near_threshold=c.near_threshold, min_words=c.min_words, leakage=c.leakage,
                           max_duplicate_fraction=c.max_duplicate_fraction, system_prompt=recipe.data.system_prompt)
    against = data.loads[1:] if data.validation_source == "file" else None  # a split of ours can't leak
    report = gate(data.loads[:1], against, options, run.root)
    dup = report["duplicates"]
    line = (f"data check: {dup['duplicate_rows']} duplicate training rows ({dup['duplicate_fraction']:.1%}, "
            f"limit {c.max_duplicate_fraction:.1%})")
    if "leakage" in report:
        line += f"; {report['leakage']['train_rows']} rows leak into the validation file"
    warnings = [p["message"] for p in report["problems"] if p["severity"] == "warning"]
    echo(line + (f"; {len(warnings)} warnings" if warnings else "") + f" (report: {run.root / 'data_check.html'})")


def prepare_run_dir(recipe: Recipe, resume: bool) -> RunDir:
    """Create (or, to resume, re-open) the run folder; refuse to clobber a finished run unless told."""
    run = RunDir(Path(recipe.output.dir))
    if resume:
        if not run.recipe.exists():
            raise RunError(f"{run.root}: nothing to resume (no recipe.yaml)", "run without --resume to start")
        if run.recipe.read_text() != recipe.to_yaml():
            raise RunError(f"{run.root}: the recipe differs from the one this run started with: "
                           f"{recipe_changes(run.recipe.read_text(), recipe.to_yaml())}",
                           f"resume with the same recipe and overrides (see {run.recipe})")
        return run
    if run.root.exists() and any(run.root.iterdir()):
        if not recipe.output.overwrite:
            raise RunError(f"{run.root}: run folder already exists",
                           "pass output.overwrite=true to replace it, --resume to continue it, "
                           "or output.dir=another/folder")
        shutil.rmtree(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    return run


def encode_rows(data, tokenizer, recipe: Recipe) -> EncodedData:
    """Format every record; a row left with no trained tokens after truncation becomes a reject."""
    train_on = getattr(recipe.method, "train_on", "responses")
    weights = {}
    if recipe.data.class_weights and data.kind == "classification":
        from tunesmith.data.balance import load_class_weights

        weights = load_class_weights(recipe.data.class_weights, data.train)
    out = EncodedData([], [], [])
    for records, target in ((data.train, out.train), (data.validation, out.validation)):
        for record in records:
            enc = encode(record, tokenizer, recipe.train.max_seq_len, train_on, recipe.data.system_prompt)
            if weights and target is out.train:  # validation loss stays unweighted: it measures the real task
                enc = dataclasses.replace(enc, weight=weights[record.data["label"]])
            if enc.trained_tokens == 0:
                out.rejects.append({"file": record.source, "line": record.line,
                                    "reason": f"no trained tokens left after truncation to "
                                              f"train.max_seq_len={recipe.train.max_seq_len} "
                                              f"(row has {enc.full_length} tokens)",
                                    "row": record.data})
                continue
            target.append(enc)
    return out


def save_tokenizer_and_generation(run: RunDir, tokenizer, source) -> None:
    """Save the tokenizer (with its chat template) and a generation config that stops at end of turn."""
    from transformers import GenerationConfig

    tokenizer.save_pretrained(run.tokenizer)
    try:
        config = GenerationConfig.from_pretrained(source.path)
    except OSError:
        config = GenerationConfig()
    stops = sorted(end_of_turn_ids(tokenizer))
    if not stops:  # an encoder (e.g. MiniLM) has no end of turn: nothing to generate with
        return
    config.eos_token_id = stops if len(stops) > 1 else stops[0]
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(run.root)


def data_summary(counts: dict[str, Any], formatting_rejects: int, train_stats: dict[str, Any], recipe: Recipe,
                 run: RunDir) -> str:
    """The data lines printed before training."""
    lines = [f"data ({counts['kind']}):"]
    for path, c in counts["files"].items():
        reasons = ", ".join(f"{k} ×{v}" for k, v in c["reasons"].items())
        lines.append(f"  {path}: {c['read']} rows read, {c['used']} used, {c['rejected']} rejected"
                     + (f" ({reasons})" if reasons else ""))
    lines.append(f"  train {counts['train_rows']} rows · validation {counts['validation_rows']} rows "
                 f"({'from file' if counts['validation_source'] == 'file' else 'held out from train'})")
    if getattr(recipe.method, "members", None):  # an ensemble: each member reads the texts its own way
        lines.append("  tokens: each member reads the texts with its own tokenizer, template and max_seq_len")
    else:
        lines.append(f"  tokens: {train_stats['tokens']} ({train_stats['trained_tokens']} trained), length "
                     f"median {train_stats['length_median']} / max {train_stats['length_max']}; "
                     f"{train_stats['truncated_rows']} rows truncated to max_seq_len={recipe.train.max_seq_len}")
    if formatting_rejects:
        lines.append(f"  {formatting_rejects} rows rejected after formatting (nothing left to train on)")
    lines.append(f"  rejects: {run.rejects}")
    return "\n".join(lines)


def kept_text(kept: dict[str, Any]) -> str:
    """What `train.keep_best` saved, in words."""
    return f"the weights of step {kept['step']} (best validation {kept['metric']}, {kept['value']:.4f}), not the last"


def train_summary(manifest: dict[str, Any], run: RunDir) -> str:
    """The table printed when training ends."""
    tr, losses = manifest["training"], manifest["losses"]

    def fmt(x):
        return "—" if x is None else f"{x:.4f}"

    rows = [
        ("run folder", str(run.root)),
        ("saved", f"{manifest['saved']}/"),
        ("steps", str(tr["steps"]) + (" (stopped early)" if tr["stopped_early"] else "")),
        *([("kept", kept_text(tr["kept"]))] if tr.get("kept") else []),
        ("train time", f"{manifest['timings']['train_seconds']:.1f} s"),
        ("trained tokens/s", f"{tr['trained_tokens_per_second']:.1f}"),
        ("trainable params", f"{tr['trainable_params']:,} of {tr['total_params']:,}"),
        ("train loss", f"{fmt(losses.get('train_before'))} -> {fmt(losses.get('train_after'))}"),
        ("validation loss", f"{fmt(losses.get('validation_before'))} -> {fmt(losses.get('validation_after'))}"),
    ]
    if losses.get("validation_accuracy_after") is not None:  # classifiers
        rows.append(("validation accuracy", f"{fmt(losses.get('validation_accuracy_before'))} -> "
                                            f"{fmt(losses['validation_accuracy_after'])}"))
    members = sorted(int(k.split("_")[1]) for k in losses if re.fullmatch(r"member_\d+_validation_accuracy", k))
    for i in members:  # method: ensemble
        rows.append((f"member {i}", f"validation accuracy {fmt(losses[f'member_{i}_validation_accuracy'])}"))
    if losses.get("probe_train_accuracy") is not None:  # classify with head_init: probe
        rows.append(("head init", f"linear probe, training accuracy {losses['probe_train_accuracy']:.4f} "
                                  f"({losses['probe_seconds']:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])
