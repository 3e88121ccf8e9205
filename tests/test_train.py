"""SFT on a tiny random Llama: parameters change, resume reproduces, the run folder reloads with plain libraries."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import epoch_padding, write_jsonl
from tunesmith.artifacts import read_metrics
from tunesmith.errors import DataError
from tunesmith.recipe import parse_recipe
from tunesmith.train import train_run


def make_recipe(tmp_path, model_dir, rows, name="run", **train):
    data = write_jsonl(tmp_path / "train.jsonl", rows) if not (tmp_path / "train.jsonl").exists() \
        else tmp_path / "train.jsonl"
    method = train.pop("method", {})
    data_extra = train.pop("data", {})
    eval_extra = train.pop("eval", {})
    settings = {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 64, "log_every": 1,
                "seed": 7, **train}
    raw = {"model": {"name": str(model_dir)},
           "data": {"train": str(data), "validation_fraction": 0.2, **data_extra},
           "method": {"name": "sft", **method},
           "train": settings, "eval": {"loss_rows": 8, **eval_extra},
           "output": {"dir": str(tmp_path / name)}}
    return parse_recipe(raw)


def snapshots(seen: dict):
    """A callback that records the parameters before and after training, which are trainable, and the model."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kw):
        seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["model"] = model

    return callback(on_train_begin=on_train_begin, on_train_end=on_train_end)


def callback(**hooks):
    from transformers import TrainerCallback

    return type("Hook", (TrainerCallback,), hooks)()


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_a_step_changes_every_trainable_parameter_and_no_frozen_one(tmp_path, tiny_model_dir, chat_rows, adapter):
    seen = {}

    recipe = make_recipe(tmp_path, tiny_model_dir, chat_rows, method={"adapter": adapter})
    manifest = train_run(recipe, callbacks=[snapshots(seen)], echo=lambda s: None)
    trainable = seen["trainable"]
    assert trainable and manifest["training"]["steps"] == 2
    if adapter == "lora":
        assert all("lora_" in n for n in trainable)
        assert len(trainable) == 2 * 2 * 7  # 2 layers × 7 linear modules × (A, B)
    else:
        assert trainable == set(seen["before"])
    unchanged = [n for n in trainable if torch.equal(seen["before"][n], seen["after"][n])]
    assert unchanged == []
    changed_frozen = [n for n in seen["before"] if n not in trainable
                      and not torch.equal(seen["before"][n], seen["after"][n])]
    assert changed_frozen == []
    assert manifest["training"]["trainable_params"] == sum(seen["before"][n].numel() for n in trainable)


def test_resume_after_a_kill_gives_the_same_losses(tmp_path, tiny_model_dir, chat_rows):
    straight = make_recipe(tmp_path, tiny_model_dir, chat_rows, name="straight", max_steps=6, save_every=2)
    train_run(straight, echo=lambda s: None)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:  # checkpoint-2 exists; step 3 is done but not saved, as in a real kill
            raise KeyboardInterrupt

    killed = make_recipe(tmp_path, tiny_model_dir, chat_rows, name="killed", max_steps=6, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_run(killed, callbacks=[callback(on_step_end=on_step_end)], echo=lambda s: None)
    manifest = train_run(killed, resume=True, echo=lambda s: None)

    def losses(name):
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r}

    a, b = losses("straight"), losses("killed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    assert manifest["training"]["resumed"] is True and manifest["training"]["steps"] == 6
    straight_m = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert abs(manifest["losses"]["validation_after"] - straight_m["losses"]["validation_after"]) < 1e-4


def probe_logits(model, tokenizer):
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # callbacks may run inside the trainer's autocast
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_run_folder_contents_and_plain_library_reload(tmp_path, tiny_model_dir, chat_rows, tokenizer, adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    captured = {}

    def on_train_end(self, args, state, control, model=None, **kw):
        captured["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    recipe = make_recipe(tmp_path, tiny_model_dir, chat_rows, method={"adapter": adapter}, save_every=1,
                         save_total_limit=1)
    manifest = train_run(recipe, callbacks=[callback(on_train_end=on_train_end)], echo=lambda s: None)
    run = tmp_path / "run"
    weights = "adapter" if adapter == "lora" else "model"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [".tunesmith-run", "recipe.yaml", "manifest.json", weights, "tokenizer", "generation_config.json",
         "metrics.jsonl", "tensorboard", "checkpoints", "rejects.jsonl", "data_check.json", "data_check.html", "data"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no staging folder left beside it
    kept = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (run / "data" / "validation.jsonl").read_text().splitlines()]
    assert len(kept) + len(held) == len(chat_rows) and len(held) == manifest["data"]["validation_rows"] > 0
    assert sorted(r["line"] for r in kept + held) == list(range(1, len(chat_rows) + 1))
    assert all(r["data"] == {"messages": chat_rows[r["line"] - 1]["messages"]} for r in kept + held)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2"]
    if adapter == "lora":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapter").iterdir()}
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    else:
        assert {"config.json", "model.safetensors"} <= {p.name for p in (run / "model").iterdir()}
        model = AutoModelForCausalLM.from_pretrained(run / "model")
    reloaded = dict(model.named_parameters())
    assert set(reloaded) == set(captured["params"])
    assert all(torch.equal(reloaded[n], p) for n, p in captured["params"].items())
    from tunesmith.generate import load_run

    assert torch.equal(probe_logits(model, tokenizer), probe_logits(load_run(run).model, tokenizer))

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert tok.chat_template == tokenizer.chat_template
    gen = json.loads((run / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (gen["eos_token_id"] if isinstance(
        gen["eos_token_id"], list) else [gen["eos_token_id"]])
    assert manifest["data"]["train_rows"] == 16 and manifest["data"]["validation_rows"] == 4
    assert manifest["data"]["hashes"][str(tmp_path / "train.jsonl")] and manifest["seed"] == 7
    assert manifest["versions"]["torch"].startswith("2.") and manifest["precision"] in ("bf16", "fp32")
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 100
    assert (run / "recipe.yaml").read_text() == recipe.to_yaml()


def test_export_merge_matches_the_adapter(tmp_path, tiny_model_dir, chat_rows, tokenizer):
    from transformers import AutoModelForCausalLM

    from tunesmith.generate import export_merged, load_run

    train_run(make_recipe(tmp_path, tiny_model_dir, chat_rows), echo=lambda s: None)
    tuned = probe_logits(load_run(tmp_path / "run").model, tokenizer)
    base = probe_logits(load_run(tmp_path / "run", base=True).model, tokenizer)
    out = export_merged(tmp_path / "run", tmp_path / "merged")
    merged = probe_logits(AutoModelForCausalLM.from_pretrained(out), tokenizer)
    assert torch.allclose(merged, tuned, atol=1e-4)
    assert not torch.allclose(base, tuned, atol=1e-4)  # the adapter did something


def test_generate_and_chat_use_the_run(tmp_path, tiny_model_dir, chat_rows):
    from tunesmith.generate import chat_loop, conversations_from_prompts, generate, load_run

    train_run(make_recipe(tmp_path, tiny_model_dir, chat_rows), echo=lambda s: None)
    loaded = load_run(tmp_path / "run")
    answers = generate(loaded, conversations_from_prompts(["What is 2 plus 2?", "Hi"]), max_new_tokens=5)
    alone = generate(loaded, conversations_from_prompts(["Hi"]), max_new_tokens=5)
    assert len(answers) == 2 and answers[1] == alone[0]  # left padding does not change an answer
    inputs = iter(["hello", "/reset", "again", "/exit"])
    out = []
    turns = chat_loop(loaded, read=lambda prompt: next(inputs), write=out.append, max_new_tokens=3)
    assert turns == 2 and "(history cleared)" in out and sum(line.startswith("model> ") for line in out) == 2


def test_early_stopping_stops_after_patience(tmp_path, tiny_model_dir, chat_rows):
    recipe = make_recipe(tmp_path, tiny_model_dir, chat_rows, max_steps=10, eval_every=1,
                         early_stopping_patience=2, learning_rate=1e-12)
    manifest = train_run(recipe, echo=lambda s: None)
    # the evaluation before training is the baseline: steps 1 and 2 don't beat it, so training stops at step 2
    assert manifest["training"]["stopped_early"] is True and manifest["training"]["steps"] == 2


def wreck_after(step: int, seen: dict):
    """A callback that adds large noise to the trainable weights at the end of `step` (later evaluations get worse)
    and records, at each evaluation during training, the validation loss and the trainable weights."""

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == step:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p) * 3)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        if state.global_step and "eval_loss" in (metrics or {}) and state.global_step not in seen:
            seen[state.global_step] = (metrics["eval_loss"], {n: p.detach().clone() for n, p in
                                                              model.named_parameters() if p.requires_grad})

    return callback(on_step_end=on_step_end, on_evaluate=on_evaluate)


def saved_full_model(run):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(run / "model").named_parameters())


def test_keep_best_saves_the_weights_of_the_best_evaluation_not_the_last(tmp_path, tiny_model_dir, chat_rows):
    seen = {}
    recipe = make_recipe(tmp_path, tiny_model_dir, chat_rows, method={"adapter": "full"}, max_steps=6, eval_every=1,
                         keep_best=True)
    manifest = train_run(recipe, callbacks=[wreck_after(3, seen)], echo=lambda s: None)
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    best = min(seen, key=lambda step: seen[step][0])
    assert best <= 3 and seen[best][0] < min(seen[s][0] for s in (4, 5, 6)) - 1.0
    assert manifest["training"]["steps"] == 6
    assert manifest["training"]["kept"] == {"step": best, "metric": "loss", "value": pytest.approx(seen[best][0])}
    assert manifest["losses"]["validation_after"] == pytest.approx(seen[best][0], abs=1e-5)
    saved = saved_full_model(tmp_path / "run")
    assert all(torch.equal(saved[n], w) for n, w in seen[best][1].items())
    assert not torch.equal(saved["model.norm.weight"], seen[6][1]["model.norm.weight"])
    # metrics.jsonl: one evaluation per step, then the kept weights' re-measurement, marked as such
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals if "kept_from_step" not in r] == [0, 1, 2, 3, 4, 5, 6, 6]
    kept = [r for r in evals if "kept_from_step" in r]
    assert [(r["step"], r["kept_from_step"]) for r in kept] == [(6, best)]
    assert kept[0]["eval_loss"] == pytest.approx(seen[best][0], abs=1e-5)


def test_keep_best_survives_a_resume(tmp_path, tiny_model_dir, chat_rows):
    """The best weights (step ≤ 3) are on disk when the run dies at step 5; the resumed run still saves them."""
    seen = {}

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5:  # checkpoint-4 exists
            raise KeyboardInterrupt

    recipe = make_recipe(tmp_path, tiny_model_dir, chat_rows, method={"adapter": "full"}, max_steps=6, eval_every=1,
                         keep_best=True, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_run(recipe, callbacks=[wreck_after(3, seen), callback(on_step_end=on_step_end)], echo=lambda s: None)
    best = min(seen, key=lambda step: seen[step][0])
    assert best <= 3
    manifest = train_run(recipe, resume=True, echo=lambda s: None)
    assert manifest["training"]["resumed"] is True and manifest["training"]["kept"]["step"] == best
    saved = saved_full_model(tmp_path / "run")
    assert all(torch.equal(saved[n], w) for n, w in seen[best][1].items())


def test_accuracy_ties_go_to_the_lower_validation_loss():
    """keep_best and early stopping on accuracy: an equal accuracy with a lower loss is better; worse loss is not."""
    from types import SimpleNamespace

    from tunesmith.methods.common import EarlyStopping, KeepBest

    model = torch.nn.Linear(2, 1)
    keep, stop = KeepBest("accuracy"), EarlyStopping(2, "accuracy")
    control = SimpleNamespace(should_training_stop=False)
    evaluations = [(1, 0.90, 0.50), (2, 0.90, 0.40), (3, 0.90, 0.45), (4, 0.85, 0.10)]
    weights = {}
    for step, accuracy, loss in evaluations:
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.detach().clone()
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        metrics = {"eval_accuracy": accuracy, "eval_loss": loss}
        keep.on_evaluate(None, state, control, model=model, metrics=metrics)
        stop.on_evaluate(None, state, control, metrics=metrics)
        assert control.should_training_stop is (step == 4)  # steps 3 and 4 are two without improvement
    assert (keep.step, keep.best, keep.standing) == (2, 0.90, (0.90, -0.40))
    keep.restore(model)
    assert torch.equal(model.weight, weights[2])


def test_bad_rows_are_rejected_and_the_limit_stops_the_run(tmp_path, tiny_model_dir, chat_rows):
    rows = chat_rows + ['{"messages": [', {"messages": [{"role": "robot", "content": "x"}]}]
    recipe = make_recipe(tmp_path, tiny_model_dir, rows, data={"max_reject_fraction": 0.1})
    manifest = train_run(recipe, echo=lambda s: None)
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [(21, "malformed JSON"),
                                                                         (22, "unknown role")]
    assert manifest["data"]["files"][str(tmp_path / "train.jsonl")]["rejected"] == 2
    strict = make_recipe(tmp_path, tiny_model_dir, rows, name="strict", data={"max_reject_fraction": 0.05})
    with pytest.raises(DataError, match="2 of 22 rows rejected") as stopped:
        train_run(strict, echo=lambda s: None)
    assert not (tmp_path / "strict").exists()  # nothing half-made where the run goes: the next train is not refused
    assert str(tmp_path / "strict.failed") in stopped.value.hint
    assert len((tmp_path / "strict.failed" / "rejects.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_rows_with_nothing_left_to_train_are_rejected(tmp_path, tiny_model_dir, chat_rows):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    recipe = make_recipe(tmp_path, tiny_model_dir, chat_rows + [long_prompt], data={"validation_fraction": 0})
    manifest = train_run(recipe, echo=lambda s: None)
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["line"] == 21 and "no trained tokens" in rejects[0]["reason"]
    assert manifest["data"]["formatting_rejects"] == 1 and manifest["training"]["steps"] == 2


def test_padding_free_batches_do_not_leak_across_rows(tiny_model_dir, tokenizer):
    """The padding-free default concatenates rows; each must see only itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False
    a = tokenizer("first row of text", return_tensors="pt")["input_ids"]
    b = tokenizer("a second, different and longer row", return_tensors="pt")["input_ids"]
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions).logits
        alone_b = model(input_ids=b).logits
    assert torch.allclose(together[:, a.shape[1]:], alone_b, atol=1e-5)


def test_trained_position_loss_equals_the_full_logits_loss(tiny_model_dir, tokenizer):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.common import trained_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 1000, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    with torch.no_grad():
        loss, _, count, _ = trained_token_loss(model, {"input_ids": ids, "labels": labels})
        logits = model(input_ids=ids).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
    assert int(count) == int((labels[:, 1:] != -100).sum()) and torch.allclose(loss, expected, atol=1e-5)


def test_fast_dropout_drops_p_and_keeps_the_mean():
    from tunesmith.methods.common import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.05) < 0.002  # 400k elements: 4 standard deviations is ~0.0014
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))
    assert abs(float(y.mean()) - 1.0) < 0.005
    assert torch.equal(drop.eval()(x), x)


def test_group_by_length_reaches_the_sft_trainer(tmp_path, tiny_model_dir):
    """SFT batches with train.group_by_length carry a fraction of random batching's padding (measured 313 against
    2,019 tokens over an epoch of the trainer's own dataloader)."""
    rows = [{"messages": [{"role": "user", "content": "count " + " ".join(str(j) for j in range((7 * i) % 23))},
                          {"role": "assistant", "content": f"done {i}"}]} for i in range(120)]
    padding = {grouped: epoch_padding(make_recipe(
        tmp_path, tiny_model_dir, rows, name=f"grouped-{grouped}", group_by_length=grouped, padding_free=False,
        max_steps=1,
        max_seq_len=128, eval={"loss_before": False}, data={"check": {"enabled": False}})) for grouped in (False, True)}
    assert padding[True] < padding[False] / 3


def test_keep_best_resumes_from_a_best_json_without_a_standing(tmp_path):
    """best.json written before ties were broken by loss holds only the value; a resumed run still reads it."""
    import json as _json

    from safetensors.torch import save_file

    from tunesmith.methods.common import KeepBest

    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "best.json").write_text(_json.dumps({"step": 3, "metric": "accuracy", "value": 0.9}))
    keep = KeepBest("accuracy", tmp_path, resume_step=4)
    assert (keep.step, keep.best, keep.standing) == (3, 0.9, (0.9,))
    assert torch.equal(keep.weights["w"], torch.ones(2))
