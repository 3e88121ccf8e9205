"""`tunesmith eval RUN`: the tuned model against the base model, few-shot prompting and other runs, on the same rows.

Read top to bottom: the rows (by default the split the run held out), the leakage guard (rows that match the
run's training rows are excluded), each system's predictions (label scoring for classification, batched greedy
generation otherwise, token log-likelihood for plain text), the metrics, paired-bootstrap differences, per-example
wins and losses, the forgetting check, and the files under RUN/eval/NAME/.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from tunesmith import artifacts
from tunesmith.artifacts import open_run
from tunesmith.data.snapshot import Snapshot, check_unchanged, has_snapshot, read_snapshot
from tunesmith.data.format import prompt_messages
from tunesmith.data.records import Record, load_records, record_text
from tunesmith.errors import DataError, RunError
from tunesmith.methods import scores_replies

TASKS = {"classification": "classification", "chat": "generation", "instruction": "generation", "text": "lm",
         "preference": "preference"}
PRIMARY = {"classification": "accuracy", "generation": "rougeL", "lm": "perplexity", "preference": "pairwise_accuracy"}
GENERAL = Path(__file__).parent / "general"


@dataclass
class EvalOptions:
    """What to evaluate and how."""

    data: str | None = None  # a data file; default: the rows the run held out
    against: tuple[str, ...] = ("base", "fewshot")  # base, fewshot, or other run folders
    limit: int | None = None
    shots: int = 4  # in-context examples for the few-shot baseline
    max_new_tokens: int = 128
    batch_size: int = 16
    include_leaked: bool = False
    forgetting: bool = True
    forgetting_threshold: float = 0.10  # warn when the tuned model loses more than this (relative) on the general set
    n_resamples: int = 1000
    seed: int = 0
    name: str | None = None  # folder under RUN/eval/ (default: the data file's stem, or 'heldout')
    reward_model: str | None = None  # a reward-model run: score every system's answers, win rates, KL to base


@dataclass
class EvalRows:
    """The rows every system answers, what was excluded, and where they came from."""

    kind: str
    rows: list[Record]
    source: str
    excluded: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] | None = None
    train: list[Record] = field(default_factory=list)
    system_prompt: str | None = None


def evaluate_run(run_path: str | Path, options: EvalOptions | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate a run folder; write RUN/eval/NAME/{results.json, examples.jsonl, regressions.jsonl}; return results."""
    options = options or EvalOptions()
    started = time.time()
    run = open_run(run_path)
    rows = eval_rows(run, options)
    is_reward = scores_replies(run.read_manifest())
    task = TASKS[rows.kind] if rows.kind != "preference" or is_reward else "generation"  # a policy answers prompts
    if is_reward and task != "preference":
        raise DataError(f"{rows.source}: a reward-model run scores preference rows, not {rows.kind} rows",
                        "evaluate it on a preference file (pairwise accuracy); `tunesmith score RUN --prompt … "
                        "--response …` scores single replies")
    echo(f"evaluating {run.root} on {len(rows.rows)} rows of {rows.source} ({rows.kind}; "
         f"{len(rows.excluded)} excluded as leaked from training)")
    classifier = classifier_predict(run)
    if classifier is not None and task != "classification":
        raise DataError(f"{run.root}: a classifier run can only be evaluated on classification rows")
    if task == "preference":
        systems = reward_specs(run, options, echo)
    else:
        systems = system_specs(run, options, encoder=classifier is not None and not _has_lm_head(run), task=task)
    per_example: dict[str, list[dict[str, Any]]] = {}
    outputs: dict[str, list[Any]] = {}
    for name, spec in systems.items():
        t = time.time()
        # a classifier run (this one, or one named in --against) answers through its own head
        predict = None if spec.base else classifier if name == "tuned" else classifier_predict(open_run(spec.path))
        if task == "preference":
            outputs[name], per_example[name] = run_reward(spec, rows, options)
        elif predict is not None:
            outputs[name], per_example[name] = run_classifier(predict, spec, rows, options)
        else:
            outputs[name], per_example[name] = run_system(spec, systems, rows, task, options)
        echo(f"  {name}: {len(rows.rows)} rows in {time.time() - t:.1f} s")
    results = summarize(rows, task, per_example, outputs, options)
    if options.reward_model:
        results["alignment"] = reward_check(systems, rows, task, outputs, per_example, options, echo)
    if options.forgetting and task not in ("lm", "preference") and classifier is None:
        results["forgetting"] = forgetting_check(systems, options, echo)
    results["seconds"] = round(time.time() - started, 1)
    out = run.root / "eval" / (options.name or (Path(options.data).stem if options.data else "heldout"))
    write_outputs(out, rows, task, per_example, outputs, results)
    results["folder"] = str(out)
    return results


# ----------------------------------------------------------------------------------------------- rows


def eval_rows(run, options: EvalOptions) -> EvalRows:
    """The evaluation rows: `options.data`, or the rows the run held out (read from RUN/data/, never from the
    recipe's files); minus rows that match the run's training rows."""
    recipe = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) if run.recipe.exists() else {}
    data_section = (recipe or {}).get("data") or {}
    snap = run_data(run)
    if options.data:
        check_unchanged(snap.hashes, [options.data], "eval --data")
        answers = ("chat", "instruction", "preference")  # a generator answers the prompts of any of these
        load = load_records(options.data, "auto" if snap.kind in answers else snap.kind,
                            data_section.get("columns") or {}, snap.labels)
        rows, source = load.records, options.data
        if load.rejects:
            raise DataError(f"{options.data}: {len(load.rejects)} rows can't be read as {snap.kind} rows "
                            f"(first: line {load.rejects[0]['line']}: {load.rejects[0]['reason']})",
                            "fix or remove them; `tunesmith data check` lists them all")
    else:
        rows = snap.validation
        source = f"the run's held-out rows ({'validation file' if snap.validation_source == 'file' else 'split'})"
        if not rows:
            raise DataError(f"{run.root}: the run held out no rows", "give --data FILE")
    if options.limit:
        rows = rows[:options.limit]
    threshold = ((data_section.get("check") or {}).get("near_threshold")) or 0.8
    kept, excluded = leakage_guard(rows, snap.train, threshold)
    if options.include_leaked:  # keep them, but still report them
        kept = rows
    if not kept:
        raise DataError(f"{source}: every row matches a training row", "evaluate on data the run did not train on")
    return EvalRows(kept[0].kind, kept, source, excluded, snap.labels, snap.train, data_section.get("system_prompt"))


def run_data(run):
    """The rows the run recorded (RUN/data/). A run trained before tunesmith kept them is read the old way — its
    recipe's files, re-split — and only when those files still have the hashes its manifest recorded."""
    if has_snapshot(run.root):
        return read_snapshot(run.root)
    from tunesmith.data import prepare_data
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(run.recipe, check_files=False)
    recorded = (run.read_manifest().get("data") or {}).get("hashes") or {}
    check_unchanged(recorded, list(recorded), f"reading the held-out rows of {run.root}")
    data = prepare_data(recipe.data, recipe.train.seed)
    return Snapshot(data.kind, data.train, data.validation, data.labels, data.validation_source, recorded)


def leakage_guard(rows: list[Record], train: list[Record], threshold: float) -> tuple[list[Record], list[dict]]:
    """Split rows into those that don't match any training row (by prompt) and those that do (with the match)."""
    from tunesmith.data.dedup import cross_matches

    matches = cross_matches([record_text(r.kind, r.data, "prompt") for r in rows],
                            [record_text(r.kind, r.data, "prompt") for r in train], threshold=threshold)
    hit: dict[int, Any] = {}
    for m in matches:
        hit.setdefault(m.a, m)
    excluded = [{"file": rows[i].source, "line": rows[i].line, "train_file": train[m.b].source,
                 "train_line": train[m.b].line, "similarity": round(m.similarity, 3), "exact": m.exact}
                for i, m in sorted(hit.items())]
    return [r for i, r in enumerate(rows) if i not in hit], excluded


# ----------------------------------------------------------------------------------------------- systems


@dataclass
class SystemSpec:
    """How to get one system's answers: which weights, and whether prompts carry in-context examples."""

    name: str
    path: str
    base: bool = False
    shots: int = 0
    loaded: Any = None
    examples: Callable[[list[Record]], list[list[Record]]] | None = None  # each row's own shots (a fewshot run)


def system_specs(run, options: EvalOptions, encoder: bool = False, task: str = "") -> dict[str, SystemSpec]:
    """tuned first, then each comparison in the order given (base and fewshot need a language-model base)."""
    specs = {"tuned": tuned_spec(run)}
    for item in options.against:
        if encoder and item in ("base", "fewshot"):
            continue  # an encoder base (e.g. minilm) can't answer prompts
        if task == "lm" and item == "fewshot":
            continue  # plain text has no prompts to put examples in front of: it would be the base again
        if item == "base":
            specs["base"] = SystemSpec("base", str(run.root), base=True)
        elif item == "fewshot":
            specs["fewshot"] = SystemSpec("fewshot", str(run.root), base=True, shots=options.shots)
        else:
            other = open_run(item)
            name = other.root.name if other.root.name not in specs else str(other.root)
            specs[name] = SystemSpec(name, str(other.root))
    return specs


def tuned_spec(run) -> SystemSpec:
    """The run's own system; for a run that prompts instead of training (method: fewshot), its base model with the
    shots the run picks for each row."""
    from tunesmith.methods import REGISTRY

    method = REGISTRY.get(run.read_manifest().get("method", ""))
    if method is None or method.prompting is None:
        return SystemSpec("tuned", str(run.root))
    return SystemSpec("tuned", str(run.root), base=True, examples=method.prompting(run.root).for_rows)


def load_system(spec: SystemSpec, specs: dict[str, SystemSpec] | None = None):
    """Load (once) the weights a system needs; base and fewshot share one copy."""
    from tunesmith.generate import load_run
    from tunesmith.model import pick_precision

    if spec.loaded is None:
        twin = next((s for s in (specs or {}).values() if s.loaded is not None and s.path == spec.path
                     and s.base == spec.base), None)
        if twin is not None:
            spec.loaded = twin.loaded
        else:
            import torch

            spec.loaded = load_run(spec.path, base=spec.base)
            spec.loaded.model = merged_for_inference(spec.loaded.model)
            if pick_precision("auto") == "bf16":
                spec.loaded.model = spec.loaded.model.to(torch.bfloat16)
    return spec.loaded


def merged_for_inference(model):
    """A LoRA-style adapter merged into its base (in fp32, exact): generation then runs at the base model's speed.

    Unmerged, peft's per-layer adapter calls made greedy decoding ~3x slower per token here. Prompt-learning
    adapters (prefix, prompt) can't be merged and are returned as they are.
    """
    configs = getattr(model, "peft_config", None)
    if not configs or any(c.is_prompt_learning for c in configs.values()):
        return model
    return model.merge_and_unload()


def run_system(spec: SystemSpec, systems: dict[str, SystemSpec], rows: EvalRows, task: str,
               options: EvalOptions) -> tuple[list[Any], list[dict[str, Any]]]:
    """One system's prediction for every row and its per-example scores."""
    from tqdm.auto import tqdm

    from tunesmith.evaluation.metrics import example_scores
    from tunesmith.evaluation.scoring import generate_sorted, score_labels, text_nll

    loaded = load_system(spec, systems)
    if task == "lm":
        nll = text_nll(loaded, [r.data["text"] for r in rows.rows], batch_size=options.batch_size)
        return [n for n in nll], [{"nll": s, "tokens": n} for s, n in nll]
    prompts = shot_prompts(spec, rows, options.seed)
    bar = tqdm(total=len(prompts), desc=spec.name, unit="row", leave=False)
    if task == "classification":
        scores = score_labels(loaded, prompts, rows.labels, batch_size=options.batch_size,
                              progress=lambda n: bar.update(n / len(rows.labels)))
        preds = [max(s, key=s.get) for s in scores]
        per = [{**example_scores("classification", p, [r.data["label"]]), "gold": r.data["label"], "pred": p}
               for p, r in zip(preds, rows.rows)]
    else:
        preds = generate_sorted(loaded, prompts, options.max_new_tokens, options.batch_size, progress=bar.update)
        per = [example_scores("generation", p, references(r)) for p, r in zip(preds, rows.rows)]
    bar.close()
    return preds, per


def classifier_predict(run):
    """The method's `predict` when the run is a classifier (classify, features), else None."""
    from tunesmith.methods import REGISTRY

    method = REGISTRY.get(run.read_manifest().get("method", ""))
    return method.predict if method is not None else None


def _has_lm_head(run) -> bool:
    from tunesmith.model import resolve_model
    from transformers import AutoConfig

    base = run.read_manifest()["base_model"]
    config = AutoConfig.from_pretrained(resolve_model(base["name"], base.get("cache_dir")).path)
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


def run_classifier(predict, spec: SystemSpec, rows: EvalRows, options: EvalOptions):
    """A classifier run's predictions (its own head or linear classifier) and per-example scores."""
    from tunesmith.evaluation.metrics import example_scores

    probs = predict(spec.path, [r.data["text"] for r in rows.rows], batch_size=options.batch_size)
    preds = [max(p, key=p.get) for p in probs]
    per = [{**example_scores("classification", p, [r.data["label"]]), "gold": r.data["label"], "pred": p}
           for p, r in zip(preds, rows.rows)]
    return preds, per


def reward_specs(run, options: EvalOptions, echo: Callable[[str], None]) -> dict[str, SystemSpec]:
    """The reward model under evaluation and any other reward-model runs named in `--against`."""
    specs = {"tuned": SystemSpec("tuned", str(run.root))}
    for item in options.against:
        if item in ("base", "fewshot"):
            continue  # a base model has no reward head: nothing to compare on preference pairs
        other = open_run(item)
        if not scores_replies(other.read_manifest()):
            echo(f"  skipping {item}: not a reward-model run")
            continue
        name = other.root.name if other.root.name not in specs else str(other.root)
        specs[name] = SystemSpec(name, str(other.root))
    return specs


def run_reward(spec: SystemSpec, rows: EvalRows, options: EvalOptions):
    """A reward model's scores of each pair's chosen and rejected reply, and the per-pair rows."""
    from tqdm.auto import tqdm

    from tunesmith.evaluation.metrics import pair_rows
    from tunesmith.methods.reward import score_pairs

    with tqdm(total=2 * len(rows.rows), desc="scoring pairs", unit="reply", leave=False) as bar:
        chosen, rejected = score_pairs(spec.path, rows.rows, rows.system_prompt, options.batch_size, bar.update)
    per = pair_rows(chosen, rejected)
    return [(c, r) for c, r in zip(chosen, rejected)], per


def with_shots(record: Record, train: list[Record], shots: int, seed: int,
               system_prompt: str | None = None) -> list[dict[str, str]]:
    """The prompt for a row, preceded by `shots` solved examples from the training rows (seeded, per row)."""
    from tunesmith.methods.fewshot import random_shots, shot_messages, with_context

    prompt = prompt_messages(record, system_prompt)
    if not shots or not train:
        return prompt
    return with_context(prompt, shot_messages(random_shots(record, train, shots, seed)))


def shot_prompts(spec: SystemSpec, rows: EvalRows, seed: int) -> list[list[dict[str, str]]]:
    """Each row's prompt for a system: after the shots it picks itself (a fewshot run), or `spec.shots` random ones."""
    if spec.examples is None:
        return [with_shots(r, rows.train, spec.shots, seed, rows.system_prompt) for r in rows.rows]
    from tunesmith.methods.fewshot import shot_messages, with_context

    return [with_context(prompt_messages(r, rows.system_prompt), shot_messages(examples))
            for r, examples in zip(rows.rows, spec.examples(rows.rows))]


def references(record: Record) -> list[str]:
    """The reference answers of a row: its answer, plus any `references` list the row carries."""
    if record.kind == "instruction":
        main = record.data["output"]
    elif record.kind == "preference":
        main = record.data["chosen"].strip()
    else:
        main = [m for m in record.data["messages"] if m["role"] == "assistant"][-1]["content"]
    extra = (record.raw or {}).get("references")
    refs = [main] + [x for x in extra if isinstance(x, str) and x != main] if isinstance(extra, list) else [main]
    return refs


# ----------------------------------------------------------------------------------------------- results


def summarize(rows: EvalRows, task: str, per_example: dict[str, list[dict]], outputs: dict[str, list],
              options: EvalOptions) -> dict[str, Any]:
    """Corpus metrics per system, paired-bootstrap differences of tuned against each other system, wins/losses."""
    from tunesmith.evaluation import metrics as m
    from tunesmith.evaluation.bootstrap import compare_systems, mean_interval, wins_losses

    results: dict[str, Any] = {"task": task, "kind": rows.kind, "data": rows.source, "rows": len(rows.rows),
                               "excluded_leaked": len(rows.excluded), "excluded": rows.excluded[:50],
                               "systems": list(per_example), "primary_metric": PRIMARY[task], "metrics": {}}
    for name, per in per_example.items():
        if task == "classification":
            results["metrics"][name] = m.classification_metrics([p["gold"] for p in per], [p["pred"] for p in per],
                                                                rows.labels)
        elif task == "generation":
            results["metrics"][name] = m.generation_metrics(outputs[name], [references(r) for r in rows.rows])
        elif task == "preference":
            results["metrics"][name] = m.pairwise_accuracy([p["chosen_score"] for p in per],
                                                           [p["rejected_score"] for p in per])
            interval = mean_interval([p["pairwise_accuracy"] for p in per], options.n_resamples, options.seed)
            results["metrics"][name]["pairwise_accuracy_ci"] = [interval["ci_low"], interval["ci_high"]]
        else:
            results["metrics"][name] = m.perplexity([p["nll"] for p in per], [p["tokens"] for p in per])
    if task != "lm" and len(per_example) > 1:
        results["differences"] = compare_systems(per_example, task, "tuned", n_resamples=options.n_resamples,
                                                 seed=options.seed, labels=rows.labels)
        results["wins_losses"] = {other: wins_losses(per_example["tuned"], per_example[other], PRIMARY[task])
                                  for other in per_example if other != "tuned"}
    return results


def reward_check(systems: dict[str, SystemSpec], rows: EvalRows, task: str, outputs: dict[str, list],
                 per_example: dict[str, list[dict]], options: EvalOptions, echo: Callable[[str], None]) -> dict:
    """Every system's answers scored by the reward model, tuned's win rates, and tuned's KL to its base."""
    from tunesmith.evaluation.alignment import alignment_metrics, kl_to_base

    if task != "generation":
        raise DataError(f"--reward-model scores generated answers; {rows.source} holds {rows.kind} rows",
                        "evaluate on prompts the policy answers: chat, instruction or preference rows")
    t = time.time()
    prompts = [prompt_messages(r, rows.system_prompt) for r in rows.rows]
    kl = None
    tuned = systems["tuned"]
    if not tuned.base:  # a run that trained weights; a prompting run (fewshot) is its base
        base = systems.get("base") or SystemSpec("base", tuned.path, base=True)
        kl = kl_to_base(load_system(tuned, systems), load_system(base, systems), prompts, outputs["tuned"],
                        options.batch_size)
    tok = load_system(tuned, systems).tokenizer
    found = alignment_metrics(options.reward_model, prompts, outputs, per_example, kl, options.n_resamples,
                              options.seed, options.batch_size,
                              count_tokens=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]))
    echo(f"  reward model: {len(outputs)} systems scored in {time.time() - t:.1f} s")
    return found


def forgetting_check(systems: dict[str, SystemSpec], options: EvalOptions,
                     echo: Callable[[str], None]) -> dict[str, Any]:
    """The shipped general-ability set on base and tuned: answer accuracy and text perplexity, and the drop."""
    from tunesmith.evaluation.metrics import perplexity
    from tunesmith.evaluation.scoring import generate_sorted, text_nll

    qa = [json.loads(x) for x in (GENERAL / "qa.jsonl").read_text().splitlines()]
    texts = [json.loads(x)["text"] for x in (GENERAL / "text.jsonl").read_text().splitlines()]
    specs = {"tuned": systems["tuned"], "base": systems.get("base") or SystemSpec("base", systems["tuned"].path, True)}
    out: dict[str, Any] = {"qa_rows": len(qa), "text_rows": len(texts)}
    for name, spec in specs.items():
        loaded = load_system(spec, systems)
        answers = generate_sorted(loaded, [[{"role": "user", "content": q["question"]}] for q in qa], 48,
                                  options.batch_size)
        correct = [answer_contains(a, q["answers"]) for a, q in zip(answers, qa)]
        nll = text_nll(loaded, texts, batch_size=options.batch_size)
        out[name] = {"qa_accuracy": round(sum(correct) / len(qa), 4),
                     **perplexity([s for s, _ in nll], [n for _, n in nll])}
    base, tuned = out["base"], out["tuned"]
    qa_drop = base["qa_accuracy"] - tuned["qa_accuracy"]
    ppl_rise = tuned["perplexity"] / base["perplexity"] - 1
    out["qa_accuracy_drop"] = round(qa_drop, 4)
    out["perplexity_rise"] = round(ppl_rise, 4)
    out["threshold"] = options.forgetting_threshold
    out["warning"] = (qa_drop > options.forgetting_threshold * max(base["qa_accuracy"], 1e-9)
                      or ppl_rise > options.forgetting_threshold)
    return out


def answer_contains(answer: str, accepted: list[str]) -> bool:
    """True when one accepted answer appears in `answer` as whole words (case-insensitive)."""
    import re

    low = answer.lower()
    return any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", low) for a in accepted)


def write_outputs(out: Path, rows: EvalRows, task: str, per_example: dict[str, list[dict]],
                  outputs: dict[str, list], results: dict[str, Any]) -> None:
    """results.json, examples.jsonl (every row: input, references, each system's answer and scores),
    regressions.jsonl (rows where tuned scores below base on the primary metric)."""
    out.mkdir(parents=True, exist_ok=True)
    primary = PRIMARY[task]
    examples = []
    for i, r in enumerate(rows.rows):
        item: dict[str, Any] = {"file": r.source, "line": r.line, "input": record_text(r.kind, r.data, "prompt")}
        if task == "classification":
            item["label"] = r.data["label"]
        elif task == "generation":
            item["references"] = references(r)
        elif task == "preference":
            item.update(chosen=r.data["chosen"], rejected=r.data["rejected"])
        for name in per_example:
            item[name] = {"output": outputs[name][i] if task != "lm" else None, **per_example[name][i]}
        examples.append(item)
    _write_jsonl(out / "examples.jsonl", examples)
    if "base" in per_example and task != "lm":
        regressions = [e for e in examples if e["tuned"][primary] < e["base"][primary]]
        _write_jsonl(out / "regressions.jsonl", regressions)
        results["regressions"] = len(regressions)
    artifacts.write_json(out / "results.json", results)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    artifacts.atomic_write(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def check_run(run_path: str | Path) -> None:
    """RunError unless `run_path` is a finished run folder."""
    run = open_run(run_path)
    if not run.manifest.exists():
        raise RunError(f"{run.root}: no manifest.json — the run did not finish", "train it to the end first")
