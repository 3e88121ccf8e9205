"""The loop back: what was served, with users' feedback, becomes the next fine-tune's rows, and the retrained run
is measured against the run in service before it replaces it.

    from_log(LOG, RUN)         requests with an upvote or a correction -> rows in RUN's training format, through
                               the data check (duplicates against RUN's training rows and each other, leakage into
                               RUN's validation rows); every request with feedback that is not used is a reject
    retrain(RUN, ADD)          RUN's recipe on RUN's training rows + ADD -> a new run folder, then the new run
                               against RUN on RUN's held-out rows, paired, as `tunesmith eval NEW --against RUN`
                               does -> PROMOTE or KEEP, written to NEW/promotion.json

Both read only run folders and the request log; never the files a run was first trained on. A promoted adapter
goes into service without a restart: POST /v1/load_lora_adapter {"lora_name": NAME, "lora_path": NEW} to the
running `tunesmith serve`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.records import RowRejected, convert, record_text
from tunesmith.errors import DataError, RunError, TunesmithError

INCLUDE = ("up", "correction")  # which feedback makes a row
ROW_KINDS = ("chat", "instruction", "classification")  # the run data kinds a served answer can become
DATA_FOLDER_SUFFIX = "-data"  # retrain's training and validation files live in NEW_RUN-data/ beside the run
MARKER = ".tunesmith-retrain"  # in that folder: tunesmith made it, a later retrain to the same run may replace it
NO_CONTENT = ("no logged content: the server ran without --log-content, so the request's prompt and answer were not "
              "kept")


# ----------------------------------------------------------------------------------------------- from-log


@dataclass
class FromLog:
    """What `from_log` made: rows in the run's training format, each request id, and the rejects with reasons."""

    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0  # requests in the log
    with_feedback: int = 0  # of those, with feedback

    def counts(self) -> dict[str, Any]:
        """Requests, those with feedback, rows written, and rejects per reason (up to its first colon)."""
        return {"requests": self.requests, "with_feedback": self.with_feedback, "rows": len(self.rows),
                "rejected": len(self.rejects),
                "reasons": dict(Counter(r["reason"].split(":")[0] for r in self.rejects).most_common())}


def from_log(log: str | Path, run_path: str | Path, include: tuple[str, ...] = INCLUDE) -> FromLog:
    """Logged requests whose latest feedback is an upvote or a correction (as `include` allows), as rows in the
    run's training format, screened by the data check against the run's own rows (RUN/data/)."""
    from tunesmith.artifacts import open_run
    from tunesmith.data.snapshot import read_snapshot
    from tunesmith.serve.requestlog import read_feedback, read_requests

    unknown = sorted(set(include) - set(INCLUDE))
    if unknown or not include:
        raise TunesmithError(f"--include {','.join(include)}: choose from {', '.join(INCLUDE)}",
                             "e.g. --include up,correction (the default)")
    requests = {r["id"]: r for r in read_requests(log)}
    latest = {f["request_id"]: f for f in read_feedback(log)}  # oldest first: the latest feedback decides
    run = open_run(run_path)
    snap = read_snapshot(run.root)
    if snap.kind not in ROW_KINDS:
        raise DataError(f"{run.root}: trains on {snap.kind} rows; `data from-log` writes {', '.join(ROW_KINDS)} rows",
                        "turn served answers into rows for a run that trains on chat, instruction or "
                        "classification rows")
    data = run.read_recipe().get("data") or {}
    out = FromLog(snap.kind, requests=len(requests), with_feedback=len(latest))
    candidates: list[tuple[str, dict[str, Any]]] = []
    for request_id, feedback in latest.items():
        try:
            rows = feedback_rows(requests.get(request_id), feedback, include, snap.kind, snap.labels,
                                 data.get("system_prompt"))
        except RowRejected as exc:
            out.rejects.append(log_reject(log, request_id, str(exc), None))
            continue
        candidates += [(request_id, row) for row in rows]
    threshold = (data.get("check") or {}).get("near_threshold") or 0.8
    kept, screened = screen(candidates, snap, threshold)
    out.rows = [{**row, "request_id": rid} for rid, row in kept]
    out.rejects += [log_reject(log, rid, reason, row) for rid, row, reason in screened]
    return out


def log_reject(log: str | Path, request_id: str, reason: str, row: dict[str, Any] | None) -> dict[str, Any]:
    """A rejects-file entry for a logged request: the log, the request id, why, and the row it would have made."""
    return {"file": str(log), "request_id": request_id, "reason": reason, "row": row}


def feedback_rows(request: dict[str, Any] | None, feedback: dict[str, Any], include: tuple[str, ...], kind: str,
                  labels: list[str] | None, system_prompt: str | None) -> list[dict[str, Any]]:
    """The rows one request with its latest feedback makes (several for a classify request of several texts), or
    RowRejected with the reason."""
    if request is None:
        raise RowRejected("unknown request: the feedback names a request the log does not hold")
    correction = feedback.get("correction")
    chosen = "correction" if correction not in (None, "") else "up" if feedback.get("rating") == "up" else None
    if chosen is None:
        raise RowRejected("not used: downvoted without a correction")
    if chosen not in include:
        raise RowRejected(f"not used: {'a correction' if chosen == 'correction' else 'an upvote'}, and --include "
                          f"is {','.join(include)}")
    if (request.get("status") or 0) >= 400:
        raise RowRejected(f"failed request: status {request['status']} ({request.get('error_code')})")
    if request.get("endpoint") == "classify":
        return classify_rows(request, correction if chosen == "correction" else None, kind, labels)
    if request.get("endpoint") == "completions":
        raise RowRejected("not a conversation: a completions request continues raw text without the run's chat "
                          "template; only chat.completions and classify requests make rows")
    if request.get("endpoint") != "chat.completions":
        raise RowRejected(f"no answer to learn from: a {request.get('endpoint')} request")
    if request.get("prompt") is None or (chosen == "up" and request.get("answer") is None):
        raise RowRejected(NO_CONTENT)
    answer = correction if chosen == "correction" else request["answer"]
    messages = served_messages(request["prompt"], system_prompt)
    return [answer_row(messages, answer, kind, labels)]


def served_messages(prompt: Any, system_prompt: str | None) -> list[dict[str, Any]]:
    """The conversation a chat request asked about, as sent (a leading system message equal to the run's own
    `data.system_prompt` left out: training rows hold it that way)."""
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise RowRejected("not a conversation: the logged prompt is not a list of chat messages")
    if prompt and prompt[0].get("role") == "system" and system_prompt and prompt[0].get("content") == system_prompt:
        prompt = prompt[1:]
    return [dict(m) for m in prompt]


def answer_row(messages: list[dict[str, Any]], answer: str, kind: str, labels: list[str] | None) -> dict[str, Any]:
    """The served conversation with `answer` as the assistant's turn, in the run's kind (`convert` checks it)."""
    if kind == "chat":
        return convert({"messages": [*messages, {"role": "assistant", "content": answer}]}, "chat", {})
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise RowRejected(f"not one question: a {kind} row is one user message and its answer; the request held "
                          f"{len(messages)} messages ({', '.join(str(m.get('role')) for m in messages)})")
    question = messages[0].get("content")
    if kind == "instruction":
        return convert({"instruction": question, "input": "", "output": answer}, "instruction", {})
    return labelled({"text": question, "label": answer.strip()}, labels)


def classify_rows(request: dict[str, Any], correction: str | None, kind: str,
                  labels: list[str] | None) -> list[dict[str, Any]]:
    """A classify request's texts with the labels served (an upvote) or the labels a correction gives: one label
    for one text, or a JSON list with one label per text."""
    if kind != "classification":
        raise RowRejected(f"wrong kind: a classify request can't be a {kind} row")
    texts = request.get("prompt")
    if texts is None:
        raise RowRejected(NO_CONTENT)
    texts = [texts] if isinstance(texts, str) else texts
    if correction is None:
        served = request.get("prediction") or []
        given = [p.get("label") if isinstance(p, dict) else None for p in served]
    else:
        given = correction_labels(correction, len(texts))
    if len(given) != len(texts):
        raise RowRejected(f"labels don't match the texts: {len(texts)} texts, {len(given)} labels")
    return [labelled({"text": t, "label": label}, labels) for t, label in zip(texts, given)]


def correction_labels(correction: str, n: int) -> list[Any]:
    """The labels a classify correction gives: the text itself for one input, or a JSON list for several."""
    try:
        value = json.loads(correction)
    except ValueError:
        value = None
    if isinstance(value, list):
        return value
    if n != 1:
        raise RowRejected(f"correction for {n} texts: give a JSON list of {n} labels, one per text")
    return [correction.strip()]


def labelled(value: dict[str, Any], labels: list[str] | None) -> dict[str, Any]:
    """A classification row, checked: text and label are text, and the label is one the run knows."""
    row = convert(value, "classification", {})
    if labels is not None and row["label"] not in labels:
        raise RowRejected(f"label not in the run's labels: {row['label']!r} (allowed: {', '.join(labels)})")
    return row


def screen(candidates: list[tuple[str, dict[str, Any]]], snap,
           threshold: float) -> tuple[list[tuple[str, dict]], list[tuple[str, dict, str]]]:
    """The data check on new rows: leakage into the run's validation rows (by prompt), then exact and near
    duplicates of its training rows, then of earlier new rows. Returns the kept rows and (id, row, reason)."""
    from tunesmith.data.dedup import cross_matches, find_duplicates

    kind = snap.kind
    reasons: dict[int, str] = {}
    prompts = [record_text(kind, row, "prompt") for _, row in candidates]
    for m in cross_matches(prompts, [record_text(kind, r.data, "prompt") for r in snap.validation], threshold):
        hit = snap.validation[m.b]
        reasons.setdefault(m.a, f"leakage: appears {how(m.exact, m.similarity)} in the run's validation rows at "
                                f"{hit.source}:{hit.line}")
    texts = [record_text(kind, row) for _, row in candidates]
    for m in cross_matches(texts, [record_text(kind, r.data) for r in snap.train], threshold):
        hit = snap.train[m.b]
        reasons.setdefault(m.a, f"duplicate: {how(m.exact, m.similarity)} a training row of the run at "
                                f"{hit.source}:{hit.line}")
    live = [i for i in range(len(candidates)) if i not in reasons]
    found = find_duplicates([texts[i] for i in live], threshold=threshold)
    for member, first in found.duplicate_of().items():
        sim = found.similarity.get((first, member), 1.0)
        exact = any(member in g and first in g for g in found.exact_groups)
        reasons[live[member]] = (f"duplicate: {how(exact, sim)} the row of request {candidates[live[first]][0]}")
    kept = [item for i, item in enumerate(candidates) if i not in reasons]
    return kept, [(candidates[i][0], candidates[i][1], reason) for i, reason in sorted(reasons.items())]


def how(exact: bool, similarity: float) -> str:
    """'exactly' or 'nearly (similarity 0.91)' — how a row matches another."""
    return "exactly" if exact else f"nearly (similarity {similarity:.2f})"


def write_from_log(found: FromLog, out: Path, protect: list[str | Path]) -> Path:
    """Write the rows to `out` and the rejects to OUT.rejects.jsonl, together or not at all; return the rejects
    path."""
    from tunesmith.artifacts import staged_files
    from tunesmith.data.readers import write_rows

    rejects = rejects_path(out)
    with staged_files(out.parent, protect=protect) as stage:
        write_rows(found.rows, stage / out.name)
        write_rows(found.rejects, stage / rejects.name)
    return rejects


def rejects_path(out: Path) -> Path:
    """OUT.rejects.jsonl beside OUT (as `data clean` names its rejects)."""
    return out.with_name(out.with_suffix("").name + ".rejects.jsonl")


def from_log_text(found: FromLog, out: Path) -> str:
    """The summary `data from-log` prints."""
    c = found.counts()
    lines = [f"{c['requests']} requests logged, {c['with_feedback']} with feedback: {c['rows']} {found.kind} rows "
             f"written, {c['rejected']} rejected"]
    lines += [f"  rejected — {reason}: {n}" for reason, n in c["reasons"].items()]
    lines.append(f"wrote {out} and {rejects_path(out)} (each rejected request with its reason)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- retrain


@dataclass
class RetrainOptions:
    """How `retrain` trains and compares (the comparison's settings are `tunesmith eval`'s)."""

    out: str | None = None  # the new run folder (default RUN-retrain-N beside RUN)
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE recipe overrides (not the data keys)
    limit: int | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    n_resamples: int = 1000
    seed: int = 0


FIXED_KEYS = ("data.train", "data.validation", "data.format", "data.columns", "output.dir")


def retrain(run_path: str | Path, add: str | Path, options: RetrainOptions | None = None,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the run's recipe on its training rows plus the rows of `add` into a new run folder, evaluate the new
    run against the run on its held-out rows, and write NEW/promotion.json; return the verdict."""
    from tunesmith.artifacts import open_run
    from tunesmith.data.snapshot import read_snapshot

    options = options or RetrainOptions()
    check_overrides(options.overrides)
    current = open_run(run_path)
    snap = read_snapshot(current.root)
    check_retrainable(current.root, snap)
    added = read_added(add, snap)
    target = Path(options.out) if options.out else next_run_name(current.root)
    files = {"train": data_folder(target) / "train.jsonl", "validation": data_folder(target) / "validation.jsonl"}
    recipe = retrain_recipe(current, snap, files, target, options.overrides)
    from tunesmith.train import check_target, train_run

    check_target(target, recipe.output.overwrite, [str(current.root), str(add)])  # before anything is written
    write_inputs(target, snap, added, protect=[current.root, add])
    echo(f"retraining {current.root} on {len(snap.train)} + {len(added)} rows into {target}")
    train_run(recipe, echo=echo)
    return promotion(current.root, target, files["validation"], len(added), options, echo)


def check_overrides(overrides: list[str]) -> None:
    """Refuse overrides of what retrain decides itself: the data files, their reading, and the run folder."""
    fixed = [o for o in overrides if o.partition("=")[0].strip() in FIXED_KEYS]
    if fixed:
        raise TunesmithError(f"override {fixed[0]!r}: retrain decides {', '.join(FIXED_KEYS)} itself (the run's rows "
                             "plus --add, the run's held-out rows, a new folder)",
                             "leave that override out; give the new run folder with --out")


def check_retrainable(root: Path, snap) -> None:
    """Refuse, before anything is written, a run that held out no rows to compare on, and plain-text runs (their
    perplexity has no paired per-row score)."""
    if not snap.validation:
        raise DataError(f"{root}: the run held out no rows, so a retrained run can't be compared with it",
                        "train the run with data.validation or data.validation_fraction above 0 first")
    if snap.kind == "text":
        raise DataError(f"{root}: trains on plain text; retrain compares runs paired, row by row, and perplexity "
                        "has no per-row verdict", "train on the combined text with `tunesmith train` and compare "
                                                  "the runs with `tunesmith eval`")


def read_added(add: str | Path, snap) -> list:
    """The records of `add`, read as the run's kind with its labels; every row must read (a bad row names its
    line)."""
    from tunesmith.data.records import load_records

    load = load_records(add, snap.kind, {}, snap.labels if snap.kind == "classification" else None)
    if load.rejects:
        first = load.rejects[0]
        raise DataError(f"{add}: {len(load.rejects)} of {load.rows_read} rows can't be read as {snap.kind} rows "
                        f"(first: line {first['line']}: {first['reason']})",
                        "fix or remove them; write the file with `tunesmith data from-log LOG --run RUN`")
    if not load.records:
        raise DataError(f"{add}: no rows to add", "give a file with at least one row")
    return load.records


def next_run_name(root: Path) -> Path:
    """RUN-retrain-N beside RUN: the first N for which neither the run folder nor its data folder exists."""
    n = 1
    while True:
        path = root.with_name(f"{root.name}-retrain-{n}")
        if not path.exists() and not data_folder(path).exists():
            return path
        n += 1


def data_folder(target: Path) -> Path:
    """Where retrain writes the new run's training and validation files: NEW_RUN-data/ beside it."""
    return target.with_name(target.name + DATA_FOLDER_SUFFIX)


def write_inputs(target: Path, snap, added: list, protect: list[str | Path]) -> None:
    """NEW_RUN-data/train.jsonl (the run's training rows, then the added rows) and validation.jsonl (the run's
    held-out rows), as canonical rows, written whole; an earlier folder is replaced only when retrain made it."""
    from tunesmith.artifacts import related, staged_dir
    from tunesmith.data.readers import write_rows

    folder = data_folder(target)
    hit = next((p for p in protect if related(folder, p) or related(target, p)), None)
    if hit is not None:
        raise TunesmithError(f"--out {target}: the new run (or {folder}) would be, contain or lie inside {hit}",
                             "give --out a folder of its own, e.g. runs/NAME-retrain")
    if folder.exists() and not (folder / MARKER).is_file():
        raise TunesmithError(f"{folder}: exists and retrain did not make it, so it is not replaced",
                             "move it away, or give --out another new run folder")
    with staged_dir(folder, replace=True) as stage:
        (stage / MARKER).write_text("made by tunesmith retrain: the training and validation rows of "
                                    f"{target.name}\n")
        write_rows([r.data for r in [*snap.train, *added]], stage / "train.jsonl")
        write_rows([r.data for r in snap.validation], stage / "validation.jsonl")


def retrain_recipe(current, snap, files: dict[str, Path], target: Path, overrides: list[str]):
    """The run's resolved recipe with the user's overrides, reading the combined files, writing `target`."""
    from tunesmith.recipe import load_recipe

    fixed = [f"data.train={json.dumps(str(files['train'].resolve()))}",
             f"data.validation={json.dumps(str(files['validation'].resolve()))}",
             f"data.format={snap.kind}", "data.columns={}", f"output.dir={json.dumps(str(target.resolve()))}"]
    return load_recipe(current.recipe, [*overrides, *fixed], check_files=False)  # the files are written next


def promotion(current: Path, new: Path, validation: Path, added: int, options: RetrainOptions,
              echo: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate `new` against `current` on the held-out rows, as `tunesmith eval NEW --data VALIDATION --against
    CURRENT` does; decide, print and write NEW/promotion.json."""
    from tunesmith.artifacts import RunDir, write_json
    from tunesmith.evaluation.runner import EvalOptions, evaluate_run

    results = evaluate_run(new, EvalOptions(data=str(validation), against=(str(current),), limit=options.limit,
                                            max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                                            forgetting=False, n_resamples=options.n_resamples, seed=options.seed,
                                            name="promotion"), echo=echo)
    verdict = decide(results, current, new, added)
    verdict["adapter"] = RunDir(new).read_manifest().get("saved") == "adapter"
    write_json(new / "promotion.json", verdict)
    echo(verdict_text(verdict))
    return verdict


def decide(results: dict[str, Any], current: Path, new: Path, added: int) -> dict[str, Any]:
    """PROMOTE when the new run is better on the primary metric and the 95% interval of the paired difference
    excludes a loss (its low end is at least 0); KEEP otherwise, with the reason."""
    primary = results["primary_metric"]
    diff = next((d for d in results.get("differences", []) if d["metric"] == primary), None)
    if diff is None:
        raise RunError(f"{new}: the evaluation gave no paired difference on {primary}",
                       f"compare the runs with `tunesmith eval {new} --against {current}`")
    gain, low, high = diff["diff"], diff["ci_low"], diff["ci_high"]
    numbers = (f"{primary} {diff['system_score']:.4f} vs {diff['versus_score']:.4f}, difference {gain:+.4f} "
               f"(95% interval [{low:+.4f}, {high:+.4f}], p={diff['p_value']:.3g}, {diff['n']} paired rows)")
    if gain > 0 and low >= 0:
        verdict, reason = "PROMOTE", f"the new run is better and the interval excludes a loss: {numbers}"
    elif gain > 0:
        verdict, reason = "KEEP", f"the new run is better, but the interval includes a loss: {numbers}"
    else:
        verdict, reason = "KEEP", f"the new run is {'no better' if gain == 0 else 'worse'}: {numbers}"
    return {"verdict": verdict, "reason": reason, "current": str(current), "new": str(new), "added_rows": added,
            "primary_metric": primary, "new_score": diff["system_score"], "current_score": diff["versus_score"],
            "diff": gain, "ci_low": low, "ci_high": high, "p_value": diff["p_value"], "rows": diff["n"],
            "excluded_leaked": results.get("excluded_leaked", 0), "metrics": results.get("metrics", {}),
            "differences": results.get("differences", []), "eval": results.get("folder")}


def verdict_text(verdict: dict[str, Any]) -> str:
    """PROMOTE or KEEP with the reason, and how to put a promoted adapter into service."""
    lines = [f"{verdict['verdict']}: {verdict['reason']}", f"wrote {Path(verdict['new']) / 'promotion.json'}"]
    if verdict["verdict"] == "PROMOTE" and not verdict.get("adapter"):
        lines.append(f"to serve it: restart `tunesmith serve {verdict['new']}` (a full model, not an adapter)")
    elif verdict["verdict"] == "PROMOTE":
        name = Path(verdict["new"]).name
        lines.append(f"to serve it without a restart: curl -X POST http://127.0.0.1:8000/v1/load_lora_adapter "
                     f"-H 'Content-Type: application/json' -d '{{\"lora_name\": \"{name}\", \"lora_path\": "
                     f"\"{Path(verdict['new']).resolve()}\"}}'")
    return "\n".join(lines)
