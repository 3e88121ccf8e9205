"""`tunesmith compare` on a tiny random Llama: the table's parameter counts, weight sizes and intervals against
independent computations, a failing arm next to finished ones, reuse of finished arms, and bad input (exit 2)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import write_jsonl
from test_check import CLEAN, LABELS
from tunesmith.cli import main
from tunesmith.methods.classify import ClassifyParams
from tunesmith.compare import Arm, CompareOptions, arm_method_section, parse_arms, run_arm
from tunesmith.compare_table import bootstrap_interval, paired_difference, score
from tunesmith.methods.sft import SFTParams

VALIDATION = ["A warm and funny film about two sisters on a long road trip.",
              "Dull, loud and far too long for such a thin story.",
              "The best animated feature of the year, full of small delights.",
              "I checked my watch every ten minutes during this whole mess.",
              "Sharp writing and a fearless lead make this a real treat.",
              "A lazy remake that adds nothing but louder explosions.",
              "Tender, honest and beautifully acted from start to finish.",
              "The plot collapses under its own silly twists by the end."]
RECIPE = """\
model:
  name: {model}
data:
  train: train.jsonl
  validation: validation.jsonl
method:
  name: sft
  adapter: lora
  lora: {{r: 4}}
train:
  learning_rate: 1.0e-3
  batch_size: 4
  max_steps: 2
  max_seq_len: 64
  log_every: 1
  seed: 7
eval:
  loss_rows: 8
"""
ARMS = "lora,full,classify:ia3,dora"
BROKEN = "dora:method.dora.target_modules=[no_such_layer]"  # valid recipe; peft refuses it when the arm trains


def call(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("compare")
    write_jsonl(folder / "train.jsonl", [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)])
    write_jsonl(folder / "validation.jsonl", [{"text": t, "label": "pos" if i % 2 == 0 else "neg"}
                                              for i, t in enumerate(VALIDATION)])
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(model=tiny_model_dir))
    return path


@pytest.fixture(scope="module")
def compared(recipe):
    out = recipe.parent / "out"
    code, stdout, stderr = call("compare", str(recipe), "--methods", ARMS, "--arm-set", BROKEN, "--out", str(out),
                                "--batch-size", "4")
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out,
            "result": json.loads((out / "compare.json").read_text())}


def rows_by_name(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["arms"]}


# ----------------------------------------------------------------------------------------------- the table


def test_trainable_parameters_and_weight_sizes_match_the_models(compared, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    rows = rows_by_name(compared["result"])
    assert list(rows) == ["zero-shot", "lora", "full", "classify:ia3", "dora"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7
    layers = model.model.layers
    lora = sum(4 * (m.in_features + m.out_features) for m in linears)  # r=4: A is r×in, B is out×r
    full = sum(p.numel() for p in model.parameters())
    ia3 = sum(l.self_attn.k_proj.out_features + l.self_attn.v_proj.out_features + l.mlp.down_proj.in_features
              for l in layers)  # peft's Llama choice: scale k and v outputs, the down projection's input
    head = model.config.hidden_size * 2  # the classify arm's new 2-label head, trained in full
    assert (rows["lora"]["trainable_params"], rows["full"]["trainable_params"],
            rows["classify:ia3"]["trainable_params"]) == (lora, full, ia3 + head) == (4096, 1591456, 256)
    assert rows["lora"]["total_params"] == full + lora and rows["full"]["total_params"] == full
    for name in ("lora", "full", "classify:ia3"):
        row = rows[name]
        assert row["trainable_percent"] == pytest.approx(100 * row["trainable_params"] / row["total_params"])
        run = Path(row["run"])
        files = [run / "adapter" / "adapter_model.safetensors"] if name != "full" else \
            list((run / "model").glob("*.safetensors"))
        assert files and row["weights_bytes"] == sum(f.stat().st_size for f in files)
        manifest = json.loads((run / "manifest.json").read_text())
        assert row["steps"] == manifest["training"]["steps"] == 2
        assert row["seconds_per_step"] == pytest.approx(manifest["timings"]["train_seconds"] / 2)
        assert row["total_seconds"] == manifest["timings"]["total_seconds"]
        assert 100e6 < row["peak_rss_bytes"] < 16e9  # the arm's process: torch and a tiny model
    assert rows["full"]["weights_bytes"] > 4 * full * 0.99  # fp32 weights, tied embedding saved once
    lines = compared["stdout"].splitlines()
    assert any(line.startswith("lora ") and "4,096" in line and "0.26%" in line for line in lines)


def test_each_metric_lies_in_its_interval_and_matches_the_examples(compared):
    rows = rows_by_name(compared["result"])
    assert all(rows[n]["status"] == "ok" for n in ("lora", "full", "classify:ia3")), compared["stdout"]
    assert compared["result"]["metric"] == "accuracy" and compared["result"]["rows"] == 8
    base_examples = None
    for name in ("lora", "full", "classify:ia3"):
        examples = [json.loads(x) for x in
                    (Path(rows[name]["run"]) / "eval" / "compare" / "examples.jsonl").read_text().splitlines()]
        if "base" in examples[0]:
            base_examples = examples
        m = rows[name]["metric"]
        assert m["value"] == pytest.approx(np.mean([e["tuned"]["accuracy"] for e in examples])) and m["n"] == 8
        assert m["ci_low"] <= m["value"] <= m["ci_high"] and 0 <= m["ci_low"] and m["ci_high"] <= 1
        d = rows[name]["vs_zero_shot"]
        assert d["diff"] == pytest.approx(m["value"] - rows["zero-shot"]["metric"]["value"])
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert base_examples is not None  # the zero-shot row was answered alongside the first arm
    zero = rows["zero-shot"]["metric"]
    assert zero["value"] == pytest.approx(np.mean([e["base"]["accuracy"] for e in base_examples]))
    assert zero["ci_low"] <= zero["value"] <= zero["ci_high"]


def test_a_failing_arm_is_reported_and_the_others_finish(compared):
    rows = rows_by_name(compared["result"])
    errors = {n: r.get("error") for n, r in rows.items()}
    assert [n for n, r in rows.items() if r["status"] == "ok"] == ["zero-shot", "lora", "full", "classify:ia3"], errors
    assert compared["code"] == 1 and "1 arm failed: dora" in compared["stderr"]
    dora = rows["dora"]
    assert dora["status"] == "failed" and dora["stage"] == "train" and "no_such_layer" in dora["error"]
    assert "metric" not in dora and "error: method.dora" in Path(dora["log"]).read_text()
    failed_line = next(line for line in compared["stdout"].splitlines() if line.startswith("dora "))
    assert "FAILED in training: method.dora: peft can't apply it" in failed_line


def test_the_markdown_holds_the_command_and_every_arm(compared):
    md = (compared["out"] / "compare.md").read_text()
    assert f"--methods {ARMS} --arm-set '{BROKEN}'" in md and "CPU cores" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| arm | trainable params | % | weights | peak RSS | s/step | total | accuracy %")
    assert [line.split(" | ")[0][2:] for line in table[1:]] == ["zero-shot", "lora", "full", "classify:ia3", "dora"]
    assert "- `dora`: sft · dora (r=4, alpha=32.0, dropout=0.05, target_modules=['no_such_layer'])" in md


def test_a_table_without_zero_shot_has_no_column_for_it(compared):
    """An encoder (MiniLM) can't answer prompts: no arm has a difference to zero-shot, and the column goes."""
    import copy

    from tunesmith.compare_table import markdown, table_text

    result = copy.deepcopy(compared["result"])
    result["arms"] = [r for r in result["arms"] if r["name"] != "zero-shot"]
    for row in result["arms"]:
        row.pop("vs_zero_shot", None)
    md, text = markdown(result), table_text(result)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| total | accuracy % [95% CI] |") and "zero-shot" not in md
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[1:])
    assert "vs zero-shot" not in text and "vs zero-shot" in table_text(compared["result"])


def test_finished_arms_are_reused_not_retrained(compared, recipe):
    out = compared["out"]
    stamps = {n: (out / n / "manifest.json").stat().st_mtime_ns for n in ("lora", "full", "classify-ia3")}
    code, stdout, _ = call("compare", str(recipe), "--methods", "lora,full,classify:ia3", "--out", str(out),
                           "--batch-size", "4")
    assert code == 0 and stdout.count("and its evaluation (same recipe") == 3
    again = rows_by_name(json.loads((out / "compare.json").read_text()))
    before = rows_by_name(compared["result"])
    for name in ("lora", "full", "classify:ia3"):
        assert again[name]["metric"] == before[name]["metric"]
        assert again[name]["peak_rss_bytes"] == before[name]["peak_rss_bytes"]
    # a new --limit re-evaluates a reused run without training it again
    code, stdout, _ = call("compare", str(recipe), "--methods", "lora", "--out", str(out), "--limit", "4",
                           "--batch-size", "4")
    assert code == 0 and "lora: reusing the finished run" in stdout
    result = json.loads((out / "compare.json").read_text())
    assert result["rows"] == 4 and rows_by_name(result)["lora"]["metric"]["n"] == 4
    assert rows_by_name(result)["lora"]["peak_rss_bytes"] == before["lora"]["peak_rss_bytes"]
    assert {n: (out / n / "manifest.json").stat().st_mtime_ns for n in stamps} == stamps
    # a changed recipe retrains, and says which keys changed
    code, stdout, _ = call("compare", str(recipe), "--methods", "lora", "--out", str(out), "--limit", "4",
                           "--batch-size", "4", "--set", "train.max_steps=1")
    assert code == 0 and "lora: training" in stdout
    assert "(replaces the run there; its recipe differs: train.max_steps 2 -> 1)" in stdout
    assert json.loads((out / "lora" / "manifest.json").read_text())["training"]["steps"] == 1


def test_an_ensemble_arm_pools_the_classifier_arms_after_they_train(recipe):
    """`ensemble` named first still trains last, over the comparison's classifier arms; its row's answers are the
    arg-max of the mean of those arms' own probabilities. With fewer than two classifier arms: exit 2."""
    from tunesmith.methods import classify, features

    out = recipe.parent / "out-ensemble"
    code, stdout, stderr = call("compare", str(recipe), "--methods", "ensemble,classify:ia3,features", "--out",
                                str(out), "--batch-size", "4")
    assert code == 0, stderr
    assert stdout.index("[3/3] ensemble: training") > stdout.index("[2/3] features: training")
    rows = rows_by_name(json.loads((out / "compare.json").read_text()))
    assert [n for n, r in rows.items() if r["status"] == "ok"] == ["zero-shot", "ensemble", "classify:ia3", "features"]
    assert rows["ensemble"]["trainable_params"] == 0
    members = [str((out / "classify-ia3").resolve()), str((out / "features").resolve())]
    assert yaml.safe_load((out / "ensemble" / "recipe.yaml").read_text())["method"]["members"] == members
    examples = [json.loads(x) for x in (out / "ensemble" / "eval" / "compare" / "examples.jsonl").read_text()
                .splitlines()]
    texts = [e["input"] for e in examples]
    pooled = [{k: (a[k] + b[k]) / 2 for k in a} for a, b in zip(classify.predict(members[0], texts),
                                                               features.predict(members[1], texts))]
    from tunesmith.methods import ensemble

    got = ensemble.predict(out / "ensemble", texts)
    assert np.allclose([[p[k] for k in sorted(p)] for p in got], [[p[k] for k in sorted(p)] for p in pooled], atol=1e-6)
    assert [e["tuned"]["pred"] for e in examples] == [max(p, key=p.get) for p in pooled]
    assert rows["ensemble"]["metric"]["value"] == pytest.approx(np.mean([e["tuned"]["accuracy"] for e in examples]))

    assert main(["compare", str(recipe), "--methods", "features,ensemble", "--out", str(out / "never")]) == 2
    assert not (out / "never").exists()


# ----------------------------------------------------------------------------------------------- bad input


def test_unknown_arms_exit_2_with_the_valid_names(recipe, capsys):
    out = recipe.parent / "never"
    assert main(["compare", str(recipe), "--methods", "lora,bogus,features:lora", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --methods: unknown 'bogus', 'features:lora'" in err
    assert "hint: choose from: lora, qlora, dora, ia3, prefix, prompt, adapter, freeze, full, sft, pretrain, " \
           "classify, features, fewshot" in err and "zero-shot, base" in err and "sft:ADAPTER" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--arm-set", "full:train.learning_rate=-1", "--arm-set", "lora:train.batchsize=2"],
     ["arm full: `train.learning_rate`: -1 is out of range — it must be > 0",
      "arm lora: `train.batchsize`: unknown key (given 2)"]),
    (["--arm-set", "ia3:train.seed=1"], ["--arm-set 'ia3:train.seed=1': 'ia3' is not one of the arms"]),
    (["--set", "output.dir=elsewhere"], ["--set 'output.dir=elsewhere': compare chooses each arm's run folder"]),
    (["--arm-set", "zero-shot:train.seed=1"], ["zero-shot trains nothing"]),
    (["--limit", "0"], ["argument --limit: '0' is not a whole number ≥ 1"]),
])
def test_bad_settings_exit_2_before_anything_trains(recipe, capsys, argv, message):
    out = recipe.parent / "never"
    assert main(["compare", str(recipe), "--methods", "lora,full,zero-shot", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in message), err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- pieces


def test_arms_keep_the_recipes_settings_where_they_apply():
    params = SFTParams(adapter="lora", lora={"r": 8, "alpha": 16}, train_on="all")
    assert arm_method_section(params, "sft", "lora") == {
        "name": "sft", "adapter": "lora", "train_on": "all", "lora": {"r": 8, "alpha": 16.0}}
    # the LoRA family compares at the recipe's rank; other adapters start from their own defaults
    assert arm_method_section(params, "sft", "dora") == {
        "name": "sft", "adapter": "dora", "train_on": "all", "dora": {"r": 8, "alpha": 16.0}}
    assert arm_method_section(params, "sft", "ia3") == {"name": "sft", "adapter": "ia3", "train_on": "all"}
    assert arm_method_section(params, "classify", "lora") == {"name": "classify", "adapter": "lora",
                                                              "lora": {"r": 8, "alpha": 16.0}}
    assert arm_method_section(params, "features", None) == {"name": "features"}
    # a prompt around the text travels between the methods that read labels from text, not to few-shot prompting
    template = "Review: {text}\nSentiment:"
    classify = ClassifyParams(template=template, pooling="model")
    # features reads mean or last, not classify's `model` pooling: that key keeps the features default
    assert arm_method_section(classify, "features", None) == {"name": "features", "template": template}
    assert arm_method_section(classify.model_copy(update={"pooling": "mean"}), "features", None) == {
        "name": "features", "template": template, "pooling": "mean"}
    assert arm_method_section(classify, "classify", "dora") == {"name": "classify", "adapter": "dora",
                                                                "template": template, "pooling": "model"}
    assert arm_method_section(classify, "fewshot", None) == {"name": "fewshot"}
    arms = parse_arms("lora, classify:prompt ,features,base", params)
    assert [(a.name, a.folder, a.method, a.adapter, a.baseline) for a in arms] == [
        ("lora", "lora", "sft", "lora", None), ("classify:prompt", "classify-prompt", "classify", "prompt", None),
        ("features", "features", "features", None, None), ("base", "base", None, None, "base")]


def test_an_arm_killed_without_a_word_is_reported_as_failed(tmp_path, monkeypatch, recipe):
    from tunesmith import compare
    from tunesmith.recipe import load_recipe

    arm = Arm("lora", "sft", "lora", recipe=load_recipe(recipe, [f"output.dir={tmp_path / 'lora'}"]))
    for sub in ("recipes", "logs", "arms"):
        (tmp_path / sub).mkdir()
    monkeypatch.setattr(compare, "_spawn", lambda *a: (-9, 3_000_000_000))  # SIGKILL, e.g. the OOM killer
    lines = []
    record = run_arm(arm, tmp_path, CompareOptions(str(recipe), ["lora"]), ["base"], "[1/1]", lines.append)
    assert record["status"] == "failed" and record["error"] == "killed by SIGKILL (out of memory?)"
    assert record["peak_rss_bytes"] == 3_000_000_000 and record["exit_code"] == -9
    assert lines[-1].startswith("    failed (train): killed by SIGKILL (out of memory?) — log: ")


def test_intervals_are_percentile_bootstraps_of_the_rows():
    ones = [{"accuracy": 1.0}] * 5
    assert score(ones, "classification", 200, 0) == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 5}
    rows = [{"accuracy": float(i % 2)} for i in range(40)]
    s = score(rows, "classification", 2000, 0)
    rng = np.random.default_rng(0)  # by hand: the same draws, the mean of each resample, its 2.5/97.5 percentiles
    means = np.array([0.0, 1.0] * 20)[rng.integers(0, 40, size=(2000, 40))].mean(1)
    assert (s["ci_low"], s["ci_high"]) == tuple(np.quantile(means, [0.025, 0.975]))
    assert paired_difference(rows, rows, "classification", 500, 0) == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    text = [{"nll": 2.0, "tokens": 1}, {"nll": 6.0, "tokens": 3}]  # perplexity pools tokens: exp(8 / 4)
    assert score(text, "lm", 100, 0)["value"] == pytest.approx(math.exp(2.0))
    low, high = bootstrap_interval([[1.0, 3.0]], lambda x: x.mean(-1), 500, 0)
    assert 1.0 <= low <= high <= 3.0


def test_an_arm_process_ends_when_compare_is_killed(tmp_path):
    """`kill` (SIGTERM) of the compare process takes its running arm with it: no training left orphaned."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, time\nfrom tunesmith.compare import tied_popen\n"
              "child = tied_popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=10)
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as fh:  # a zombie (exited, not yet reaped by init) counts as gone
            if fh.read().split(") ")[1].startswith("Z"):
                break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the arm's process outlived compare")
