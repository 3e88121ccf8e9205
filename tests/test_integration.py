"""Integration: the real bundled SmolLM2-135M-Instruct, a few LoRA steps on the demo data, then generation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.recipe import load_recipe
from tunesmith.train import train_run

DEMO = Path(__file__).parent.parent / "examples" / "meeting-json"


@pytest.mark.integration
def test_lora_on_the_default_model_lowers_validation_loss_and_answers(tmp_path):
    from tunesmith.data.format import prompt_messages
    from tunesmith.data.records import load_records
    from tunesmith.generate import generate, load_run

    recipe = load_recipe(DEMO / "recipe.yaml", [
        f"output.dir={tmp_path / 'run'}", "train.max_steps=4", "train.batch_size=4", "train.eval_every=null",
        "train.save_every=null", f"data.validation={DEMO / 'heldout.jsonl'}", "eval.loss_rows=8"])
    manifest = train_run(recipe, echo=lambda s: None)
    losses = manifest["losses"]
    assert manifest["base_model"]["name"] == "default" and manifest["training"]["steps"] == 4
    assert manifest["training"]["total_params"] > 134_000_000
    assert losses["validation_after"] < losses["validation_before"] - 0.1
    assert losses["train_after"] < losses["train_before"]

    record = load_records(DEMO / "heldout.jsonl").records[0]
    tuned = generate(load_run(tmp_path / "run"), [prompt_messages(record)], max_new_tokens=48)[0]
    base = generate(load_run(tmp_path / "run", base=True), [prompt_messages(record)], max_new_tokens=48)[0]
    assert tuned != base and tuned.strip() and base.strip()
