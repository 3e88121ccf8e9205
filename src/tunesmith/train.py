"""The training stage, wired in order: run folder -> data -> tokenizer -> formatting -> method -> save -> summary."""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith import artifacts, distributed
from tunesmith.artifacts import RunDir
from tunesmith.data import check_reject_share, file_sha256, prepare_data, write_rejects
from tunesmith.data.format import Encoded, encode, end_of_turn_ids, stats
from tunesmith.data.snapshot import recorded_hashes, write_snapshot
from tunesmith.errors import RunError, TunesmithError
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
              echo: Callable[[str], None] = print, recipe_path: str | Path | None = None,
              force: bool = False) -> dict[str, Any]:
    """Train as the recipe says and write a complete run folder; return the manifest.

    A new run is built in a folder beside `output.dir` and moved into place only once the data has been read and
    has passed its checks; an existing run there is replaced only with `output.overwrite` and only when tunesmith
    made it. `recipe_path` (the recipe file) is one of the inputs the run folder may never swallow. A run the plan
    says will not fit is refused unless `force`. Under torchrun every rank calls this; rank 0 alone writes.
    """
    started = time.time()
    method = REGISTRY[recipe.method.name]
    distributed.start(recipe.distributed)  # in a launched run: the process group; only rank 0 writes and prints
    if not distributed.is_main():
        echo = _quiet
    t = time.time()
    if distributed.is_main():
        try:
            run, data, encoded, source, tokenizer = open_run(recipe, method, resume, recipe_path, echo, force)
        except BaseException:
            distributed.share(None)  # the other ranks stop too
            raise
        distributed.share((str(run.root), encoded))
    else:
        shared = distributed.share()
        if shared is None:
            raise RankStopped("rank 0 stopped before training (its error is above)")
        run, data, encoded = RunDir(Path(shared[0])), None, shared[1]
        source = resolve_model(recipe.model.name, recipe.model.cache_dir)  # rank 0 converted it already
        tokenizer = load_tokenizer(source)
    timings: dict[str, float] = {"data_seconds": round(time.time() - t, 2)}

    from tunesmith.methods.common import Job

    rng = random.Random(recipe.train.seed)
    loss_rows = rng.sample(encoded.train, min(recipe.eval.loss_rows, len(encoded.train)))
    precision = pick_precision(recipe.train.precision)
    echo(method.models_line(recipe.method) if method.models_line else
         f"model: {source.describe()} · method: {method.name} ({getattr(recipe.method, 'adapter', '-')}) · "
         f"precision: {precision}" + (" (auto)" if recipe.train.precision == "auto" else "") + f" · {_threads()}")
    job = Job(recipe=recipe, run=run, source=source, tokenizer=tokenizer, train_rows=encoded.train,
              validation_rows=encoded.validation, loss_rows=loss_rows, precision=precision, resume=resume,
              callbacks=list(callbacks or []))
    outcome = method.train(job)
    timings["train_seconds"] = round(outcome.seconds, 2)
    if not distributed.is_main():
        distributed.finish()
        return {}

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
                 "hashes": recorded_hashes(run.root),
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
    distributed.finish()
    return manifest


def open_run(recipe: Recipe, method, resume: bool, recipe_path: str | Path | None, echo: Callable[[str], None],
             force: bool = False):
    """The run folder, ready to train in: a new one staged beside `output.dir`, filled with the checked data and
    moved into place once the plan says it fits (or `force`; or the run to resume, its inputs unchanged); the data,
    formatted rows, model source and tokenizer."""
    target = Path(recipe.output.dir)
    if resume:
        stage = reopen_run(recipe)
    else:
        check_target(target, recipe.output.overwrite, recipe_inputs(recipe, recipe_path))
        stage = RunDir(artifacts.new_staging(target))
        (stage.root / artifacts.RUN_MARKER).write_text("made by tunesmith train\n")
    shown = RunDir(target)  # the paths printed are where the run will be
    try:
        data, encoded, source, tokenizer = prepare_stage(recipe, method, stage, shown, echo)
    except BaseException as exc:
        if not resume:
            keep_failed_stage(stage, target, exc)
        raise
    if not force:
        try:
            check_plan(recipe, source, encoded, echo)
        except BaseException:
            if not resume:
                shutil.rmtree(stage.root, ignore_errors=True)
            raise
    return (stage if resume else place_run(stage, target)), data, encoded, source, tokenizer


def check_plan(recipe: Recipe, source, encoded: EncodedData, echo: Callable[[str], None]) -> None:
    """The memory plan before the model loads: one line, and a RunError when the run will not fit. A plan that can't
    be made for this model or method is said and skipped: it must never be what stops a run that would fit."""
    from tunesmith.plan import check_fits

    try:
        check_fits(recipe, source, encoded.train, encoded.validation, echo)
    except TunesmithError:
        raise
    except Exception as exc:  # noqa: BLE001 - an estimate, not a gate we can trust blindly
        echo(f"plan: skipped ({type(exc).__name__}: {exc})")


class RankStopped(TunesmithError):
    """A rank other than 0 stops because rank 0 did (rank 0 has printed why)."""

    silent = True


def _quiet(text: str) -> None:
    """Ranks other than 0 print nothing: rank 0 speaks for the run."""


def prepare_stage(recipe: Recipe, method, stage: RunDir, shown: RunDir, echo: Callable[[str], None]):
    """Everything before training, written into `stage`: the resolved recipe, the rows (read, formatted,
    rejected with reasons), the data checks, and the rows the run trains and validates on (RUN/data/)."""
    artifacts.atomic_write(stage.recipe, recipe.to_yaml())
    data = prepare_data(recipe.data, recipe.train.seed, method.record_types)
    source = resolve_model(recipe.model.name, recipe.model.cache_dir)
    tokenizer = load_tokenizer(source)
    encoded = (method.encode or encode_rows)(data, tokenizer, recipe)
    write_rejects(data.rejects + encoded.rejects, stage.rejects)
    echo(data_summary(data.counts(), len(encoded.rejects), stats(encoded.train), recipe, shown,
                      own_tokens=method.models_line is None))
    check_reject_share(data, recipe.data.max_reject_fraction, encoded.rejects)
    check_enough_rows(recipe, data, encoded)
    if recipe.data.check.enabled:
        check_gate(data, recipe, stage, echo, shown)
    hashes = {load.path: file_sha256(load.path) for load in data.loads}
    if recipe.data.class_weights not in (None, "auto"):
        hashes[recipe.data.class_weights] = file_sha256(recipe.data.class_weights)
    write_snapshot(stage.root, data, hashes)
    return data, encoded, source, tokenizer


MIN_TRAIN_ROWS = 2


def check_enough_rows(recipe: Recipe, data, encoded: EncodedData) -> None:
    """Stop when formatting left too few rows to train on, or none to validate on where validation was asked for."""
    from tunesmith.errors import DataError

    if len(encoded.train) < MIN_TRAIN_ROWS:
        raise DataError(f"{recipe.data.train}: {len(encoded.train)} training row(s) left after reading and "
                        f"formatting ({len(data.train)} read as usable, {len(encoded.rejects)} with nothing left to "
                        f"train on); a run needs at least {MIN_TRAIN_ROWS}",
                        "see rejects.jsonl for why rows were rejected; add rows or raise train.max_seq_len")
    asked = recipe.data.validation is not None or recipe.data.validation_fraction > 0
    if asked and not encoded.validation:
        where = (f"`data.validation` ({recipe.data.validation})" if recipe.data.validation else
                 f"`data.validation_fraction` = {recipe.data.validation_fraction} of {len(data.train) + len(data.validation)} rows")
        raise DataError(f"{where} leaves no validation rows to measure the run on",
                        "give more rows or a data.validation file, or set data.validation_fraction=0 to train "
                        "without validation")


def recipe_inputs(recipe: Recipe, recipe_path: str | Path | None) -> list[str]:
    """Every file or folder the recipe reads (its fields marked as paths, except output.dir): the run folder may
    neither be, contain nor lie inside one."""
    from tunesmith.schema import path_keys

    paths: list[Any] = [recipe_path]
    for section in (recipe.model, recipe.data, recipe.method):
        for name, mark in path_keys(type(section)).items():
            value = getattr(section, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item not in mark.words and Path(item).exists():
                    paths.append(item)
    return [str(p) for p in paths if isinstance(p, (str, Path)) and p]


def check_target(target: Path, overwrite: bool, inputs: list[str]) -> None:
    """Refuse an output.dir that is an input (or holds or lies inside one), a file, or a folder not ours to
    replace; an existing run is replaced only with output.overwrite, and only after the data checks pass."""
    for item in inputs:
        if artifacts.related(target, item):
            raise RunError(f"`output.dir` {target}: the run folder would be, contain or lie inside "
                           f"{Path(item).resolve()}, which this run reads",
                           "give output.dir a folder of its own, e.g. runs/NAME")
    if target.exists() and not target.is_dir():
        raise RunError(f"`output.dir` {target}: is a file, not a folder", "give output.dir a new folder")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise RunError(f"{target}: run folder already exists",
                       "pass output.overwrite=true to replace it, --resume to continue it, or output.dir=another/folder")
    if not artifacts.is_run_folder(target):
        raise RunError(f"`output.overwrite`: {target} is not a tunesmith run folder (no manifest.json or "
                       f"{artifacts.RUN_MARKER} from tunesmith), so it is not replaced",
                       "give output.dir a new folder; tunesmith only replaces folders it made")


def place_run(stage: RunDir, target: Path) -> RunDir:
    """Move the checked stage into place (replacing the run there, which `check_target` allowed)."""
    artifacts.place_dir(stage.root, target, replace=True)
    return RunDir(target)


def keep_failed_stage(stage: RunDir, target: Path, exc: BaseException) -> None:
    """A stage that failed its data checks is kept as TARGET.failed (rejects and the data check, to read);
    otherwise removed. The error's message then names the kept folder."""
    useful = stage.rejects.exists() and isinstance(exc, TunesmithError)
    if not useful:
        shutil.rmtree(stage.root, ignore_errors=True)
        return
    failed = target.with_name(target.name + ".failed")
    if failed.exists() and not artifacts.is_run_folder(failed):
        shutil.rmtree(stage.root, ignore_errors=True)
        return
    artifacts.place_dir(stage.root, failed, replace=True)
    exc.message = exc.message.replace(str(stage.root), str(failed))
    exc.hint = ((exc.hint or "") + f"; what the data check read is kept in {failed}/ (rejects.jsonl"
                + (", data_check.html" if (failed / "data_check.html").exists() else "") + ")").lstrip("; ")
    exc.args = (exc.message,)


def reopen_run(recipe: Recipe) -> RunDir:
    """The run folder to resume: the same recipe, and input files unchanged since the run read them."""
    from tunesmith.data.snapshot import check_unchanged

    run = RunDir(Path(recipe.output.dir))
    if not run.recipe.exists():
        raise RunError(f"{run.root}: nothing to resume (no recipe.yaml)", "run without --resume to start")
    before, now = resumable(run.recipe.read_text()), resumable(recipe.to_yaml())
    if before != now:
        raise RunError(f"{run.root}: the recipe differs from the one this run started with: "
                       f"{recipe_changes(before, now)}",
                       f"resume with the same recipe and overrides (see {run.recipe})")
    recorded = recorded_hashes(run.root)
    check_unchanged(recorded, list(recorded), "--resume")
    return run


def resumable(recipe_yaml: str) -> str:
    """A resolved recipe as resume compares it: the number of processes and machines may change (the Trainer
    reloads DDP and ZeRO checkpoints at another world size); a run from before `distributed` existed had none."""
    import yaml

    from tunesmith.recipe import DistributedSection

    raw = yaml.safe_load(recipe_yaml)
    section = {**DistributedSection().model_dump(mode="json"), **(raw.get("distributed") or {})}
    raw["distributed"] = {k: v for k, v in section.items() if k not in ("nproc", "nnodes")}
    return yaml.safe_dump(raw, sort_keys=False)


def check_gate(data, recipe: Recipe, run: RunDir, echo: Callable[[str], None], shown: RunDir | None = None) -> None:
    """Check the training data (duplicates; leakage into a validation file) and stop on what the recipe forbids."""
    from tunesmith.data.check import CheckOptions, gate

    c = recipe.data.check
    options = CheckOptions.for_recipe(recipe.data)
    against = data.loads[1:] if data.validation_source == "file" else None  # a split of ours can't leak
    report = gate(data.loads[:1], against, options, run.root)
    dup = report["duplicates"]
    line = (f"data check: {dup['duplicate_rows']} duplicate training rows ({dup['duplicate_fraction']:.1%}, "
            f"limit {c.max_duplicate_fraction:.1%})")
    if "leakage" in report:
        line += f"; {report['leakage']['train_rows']} rows leak into the validation file"
    warnings = [p["message"] for p in report["problems"] if p["severity"] == "warning"]
    echo(line + (f"; {len(warnings)} warnings" if warnings else "") +
         f" (report: {(shown or run).root / 'data_check.html'})")


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

    with artifacts.staged_dir(run.tokenizer, replace=True) as stage:
        tokenizer.save_pretrained(stage)
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
                 run: RunDir, own_tokens: bool = True) -> str:
    """The data lines printed before training (`own_tokens` false: the run's models read the texts each their own
    way, so the recipe's tokenizer counts nothing)."""
    lines = [f"data ({counts['kind']}):"]
    for path, c in counts["files"].items():
        reasons = ", ".join(f"{k} ×{v}" for k, v in c["reasons"].items())
        lines.append(f"  {path}: {c['read']} rows read, {c['used']} used, {c['rejected']} rejected"
                     + (f" ({reasons})" if reasons else ""))
    lines.append(f"  train {counts['train_rows']} rows · validation {counts['validation_rows']} rows "
                 f"({'from file' if counts['validation_source'] == 'file' else 'held out from train'})")
    if not own_tokens:
        lines.append("  tokens: each model reads the texts with its own tokenizer, template and max_seq_len")
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
    method = REGISTRY.get(manifest["method"])
    if method is not None and method.summary_rows:
        rows.extend(method.summary_rows(losses))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _threads() -> str:
    """The compute threads of this process against the cores it may run on (torchrun shares the cores out)."""
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{torch.get_num_threads()} threads on {cores} cores"
