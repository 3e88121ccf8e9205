"""The last step of `tunesmith tune`: what the search bought, measured once on rows it never saw.

The winner's values and the recipe as written are each trained with the same `--seeds` seeds (train.seed, +1, …) on
the recipe's own data section, into runs/NAME-tune/final/{best,recipe}-seedS/ (normal run folders; a finished one
with the same recipe is reused, so a resumed search does not retrain them). Each is scored by the evaluation runner
(`tunesmith eval RUN --data FILE` terms: the recipe's validation file, or --data) with the leakage guard; per-row
scores are averaged over seeds, and the winner's metric, the recipe's, and their paired difference get 95% bootstrap
intervals (compare_table, as `tunesmith compare` uses them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from tunesmith import artifacts
from tunesmith.artifacts import RunDir

EVAL_NAME = "tune"


def final_comparison(plan, best_values: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """Train and score the winner and the recipe as written; the difference with its 95% interval."""
    from tunesmith.tune import trial_recipe

    if not plan.final_data:
        echo("final comparison skipped: the recipe has no data.validation file, and the split it would carve is "
             "the one the search chose on (give --data FILE with rows the search never saw)")
        return {"skipped": "no validation file (data.validation or --data)"}
    seeds = [plan.recipe.train.seed + i for i in range(plan.options.seeds)]
    folder = plan.folder / "final"
    arms = {"best": best_values, "recipe": {}}
    per_arm: dict[str, list[list[dict]]] = {name: [] for name in arms}
    keys, task, metric, runs = None, None, None, {name: [] for name in arms}
    for name, values in arms.items():
        for seed in seeds:
            out = folder / f"{name}-seed{seed}"
            recipe = trial_recipe(plan, values, out, final=True, seed=seed)
            echo(f"final: {'the winner' if name == 'best' else 'the recipe as written'}, seed {seed} → {out}")
            _train(recipe, out)
            results, examples = _evaluate(out, plan)
            task, metric = results["task"], results["primary_metric"]
            order = [(e["file"], e["line"]) for e in examples]
            if keys is not None and order != keys:
                raise RuntimeError("the final runs were scored on different rows")
            keys = order
            per_arm[name].append([e["tuned"] for e in examples])
            runs[name].append(str(out))
    return _summarize(plan, per_arm, runs, task, metric, len(keys or []), seeds, echo)


def _train(recipe, out: Path) -> None:
    """Train unless a finished run of the same recipe is there."""
    from tunesmith.train import train_run

    run = RunDir(out)
    if run.manifest.exists() and run.recipe.exists() and run.recipe.read_text() == recipe.to_yaml():
        return
    from tunesmith.tune import logged

    out.parent.mkdir(parents=True, exist_ok=True)
    with logged(out.with_name(out.name + ".log")) as echo:
        train_run(recipe, echo=echo)


def _evaluate(out: Path, plan) -> tuple[dict, list[dict]]:
    from tunesmith.evaluation.runner import EvalOptions, evaluate_run

    options = EvalOptions(data=plan.options.data, against=(), forgetting=False, name=EVAL_NAME,
                          seed=plan.options.seed, limit=plan.options.limit, batch_size=plan.options.batch_size)
    from tunesmith.tune import logged

    with logged(out.with_name(out.name + ".eval.log")) as echo:
        results = evaluate_run(out, options, echo=echo)
    examples = [json.loads(x) for x in (Path(results["folder"]) / "examples.jsonl").read_text().splitlines()
                if x.strip()]
    return results, examples


def mean_rows(per_seed: list[list[dict]]) -> list[dict]:
    """Each row's numeric scores averaged over seeds (for accuracy: the share of seeds that got it right)."""
    out = []
    for rows in zip(*per_seed):
        merged = {}
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = sum(r[key] for r in rows) / len(rows)
        out.append(merged)
    return out


def _summarize(plan, per_arm, runs, task, metric, n_rows, seeds, echo) -> dict[str, Any]:
    from tunesmith.compare_table import paired_difference, score

    result: dict[str, Any] = {"data": plan.final_data, "rows": n_rows, "seeds": seeds, "task": task,
                              "metric": metric, "runs": runs}
    best, recipe = mean_rows(per_arm["best"]), mean_rows(per_arm["recipe"])
    try:
        result["best"] = score(best, task, seed=plan.options.seed)
        result["recipe"] = score(recipe, task, seed=plan.options.seed)
        result["difference"] = paired_difference(best, recipe, task, seed=plan.options.seed)
    except KeyError:
        result["note"] = f"no paired interval for task {task}"
        echo(f"final: {result['note']}")
        return result
    d, b, r = result["difference"], result["best"], result["recipe"]
    echo(f"final, on {n_rows} rows of {plan.final_data} (never seen by the search), {len(seeds)} seed(s) each: "
         f"{metric} winner {b['value']:.4f} [{b['ci_low']:.4f}, {b['ci_high']:.4f}] vs recipe as written "
         f"{r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]; difference {d['diff']:+.4f} "
         f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] (paired bootstrap, 95%)")
    artifacts.write_json(plan.folder / "final" / "final.json", result)
    return result
