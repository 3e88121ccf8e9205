"""tunesmith plan: parameter counts, the memory terms, the per-device split, verdicts and fixes, check_fits, the
CLI and the probe — numbers asserted on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import write_jsonl
from tunesmith.errors import RunError
from tunesmith.recipe import parse_recipe

GB = 1024**3
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}? " + "Tell me more. " * (i % 5)},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " + "Indeed. " * (i % 7)}]}
         for i in range(24)]


def make(tmp_path, model_dir, method=None, rows=CHATS, distributed=None, **train):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    return parse_recipe({"model": {"name": str(model_dir)}, "distributed": distributed or {},
                         "data": {"train": str(data), "validation_fraction": 0.0, "check": {"enabled": False}},
                         "method": {"name": "sft", "adapter": "lora", **(method or {})},
                         "train": {"batch_size": 4, "max_seq_len": 64, "precision": "fp32", "seed": 3, **train},
                         "output": {"dir": str(tmp_path / "run")}})


def plan_of(recipe, **kw):
    from tunesmith.plan import build_plan

    return build_plan(recipe, memory_bytes=kw.pop("memory_bytes", 64 * GB), device=kw.pop("device", "cpu"), **kw)


def term(plan, name):
    return next(t for t in plan.terms if t.name == name).bytes


def real_counts(recipe, model_dir):
    """(trainable, total) of the real tiny model wrapped as the method wraps it."""
    from tunesmith.methods.adapters import apply_adapter, load_base_for
    from tunesmith.methods.common import count_parameters
    from tunesmith.model import ModelSource

    params = recipe.method
    model = apply_adapter(load_base_for(params.adapter, params, ModelSource(model_dir)), params)
    return count_parameters(model)


@pytest.mark.parametrize("adapter", ["lora", "full", "ia3", "freeze"])
def test_parameter_counts_equal_the_real_wrapped_model(tmp_path, tiny_model_dir, adapter):
    recipe = make(tmp_path, tiny_model_dir, {"adapter": adapter})
    plan = plan_of(recipe)
    trainable, total = real_counts(recipe, tiny_model_dir)
    assert plan.trainable == trainable and plan.total == total
    assert term(plan, "gradients") == 4 * trainable and term(plan, "AdamW states") == 8 * trainable
    if adapter == "lora":  # r=16 on every linear layer: (in + out) × 16 per layer
        assert 0 < trainable < total / 10


def test_weights_are_fp32_and_qlora_stores_linear_layers_in_four_bits(tmp_path, tiny_model_dir):
    lora = plan_of(make(tmp_path, tiny_model_dir))
    qlora = plan_of(make(tmp_path, tiny_model_dir, {"adapter": "qlora"}))
    m = lora.model
    assert term(lora, "weights") == 4 * lora.total
    assert m.linear == 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64)  # 2 layers: q,o 32x32; k,v 32x16; MLP 3x32x64
    per_linear = (term(qlora, "weights") - 4 * (qlora.total - m.linear)) / m.linear
    assert per_linear == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-3)  # NF4 + double-quantized constants
    assert qlora.trainable == lora.trainable  # the same LoRA on a 4-bit base


def test_zero3_over_two_devices_halves_weights_gradients_and_optimizer(tmp_path, tiny_model_dir):
    from tunesmith.methods.sft import METHOD as SFT
    from tunesmith.plan import estimate

    recipe = make(tmp_path, tiny_model_dir, {"adapter": "full"})
    plan = plan_of(recipe)
    rows = __import__("tunesmith.plan", fromlist=["encoded_rows"]).encoded_rows(recipe)[1]
    one = {t.name: t for t in plan.terms}
    zero3 = dataclasses.replace(plan.settings, strategy="deepspeed", zero_stage=3, world_size=2)
    two = {t.name: t for t in estimate(plan.model, zero3, SFT.shape, rows, recipe.method, "cpu")[0]}
    for name in ("weights", "gradients", "AdamW states"):
        assert two[name].bytes == one[name].bytes // 2
    assert two["activations"].bytes == one["activations"].bytes  # each device still runs its own batch
    zero2 = {t.name: t for t in estimate(plan.model, dataclasses.replace(zero3, zero_stage=2), SFT.shape, rows,
                                         recipe.method, "cpu")[0]}
    assert zero2["weights"].bytes == one["weights"].bytes and zero2["gradients"].bytes == one["gradients"].bytes // 2
    offload = dataclasses.replace(zero3, offload="optimizer")
    moved = {t.name: t for t in estimate(plan.model, offload, SFT.shape, rows, recipe.method, "cpu")[0]}
    assert moved["AdamW states"].host and not moved["weights"].host


def test_processes_on_one_cpu_share_its_memory_and_ddp_adds_gradient_buckets(tmp_path, tiny_model_dir):
    one = plan_of(make(tmp_path, tiny_model_dir))
    two = plan_of(make(tmp_path, tiny_model_dir, distributed={"nproc": 2}))
    assert two.settings.strategy == "ddp" and two.capacity == one.capacity // 2 and two.global_batch == 8
    assert term(two, "DDP gradient buckets") == term(two, "gradients") == 4 * two.trainable
    assert two.peak == one.peak + 4 * two.trainable  # the buckets stay resident
    assert two.steps == 3  # 24 rows / (4 per device × 2 devices)


def test_activations_grow_with_tokens_and_checkpointing_keeps_one_value_per_layer_and_token(tmp_path,
                                                                                            tiny_model_dir):
    short = plan_of(make(tmp_path, tiny_model_dir, batch_size=2))
    long = plan_of(make(tmp_path, tiny_model_dir, batch_size=4))
    gc = plan_of(make(tmp_path, tiny_model_dir, batch_size=4, gradient_checkpointing=True))
    assert term(long, "activations") == pytest.approx(2 * term(short, "activations") * long.longest / short.longest,
                                                      rel=1e-6)
    assert term(gc, "activations") == long.other_activations < 0.7 * term(long, "activations")  # 2 layers: 1 kept
    assert gc.other_activations == term(long, "activations")
    assert "with gradient checkpointing" in next(t.note for t in gc.terms if t.name == "activations")


def test_steps_are_the_trainers_steps(tmp_path, tiny_model_dir):
    from tunesmith.train import train_run

    recipe = make(tmp_path, tiny_model_dir, batch_size=3, gradient_accumulation=2, epochs=2)
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"loss_before": False,
                                                                             "loss_rows": 2})})
    plan = plan_of(recipe)
    manifest = train_run(recipe, echo=lambda s: None)
    assert plan.steps == manifest["training"]["steps"] == 8  # 24 rows / 3 = 8 batches / 2 = 4 per epoch


def test_a_plan_that_will_not_fit_lists_fixes_whose_first_fits(tmp_path, tiny_model_dir):
    recipe = make(tmp_path, tiny_model_dir, batch_size=16, max_seq_len=128)
    plan = plan_of(recipe)
    small = plan.peak + plan.runtime - plan.peak // 4  # a device a quarter of the step short
    tight = plan_of(recipe, memory_bytes=small)
    assert tight.verdict == "will not fit" and tight.fixes
    first = tight.fixes[0]
    assert first.verdict in ("fits", "tight") and first.peak < plan.peak
    assert first.what.startswith("train.batch_size=") and "gradient_accumulation=" in first.what
    assert all(f.peak < plan.peak for f in tight.fixes)
    assert {f.what.split("=")[0] for f in tight.fixes} <= {"train.batch_size", "train.gradient_checkpointing",
                                                         "method.adapter", "train.max_seq_len"}
    assert plan_of(recipe, memory_bytes=int((plan.peak + plan.runtime) / 0.9)).verdict == "tight"
    assert plan.verdict == "fits"


def test_check_fits_prints_one_line_and_refuses_with_the_fix(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith import plan as planning

    recipe = make(tmp_path, tiny_model_dir, batch_size=16, max_seq_len=128)
    source, rows, val = planning.encoded_rows(recipe)
    lines = []
    fits = planning.check_fits(recipe, source, rows, val, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("plan: peak ") and lines[0].split(": ")[-1].startswith("fits")
    monkeypatch.setattr(planning, "_total_ram", lambda: fits.peak + fits.runtime - fits.peak // 4)
    with pytest.raises(RunError) as caught:
        planning.check_fits(recipe, source, rows, val, echo=lines.append)
    message = str(caught.value)
    assert "will not fit" in message and "the biggest term is" in message
    assert "cheapest fix: train.batch_size=" in message and "--force" in message


def test_preference_rows_run_as_two_sequences(tmp_path, tiny_model_dir):
    from tunesmith.plan import longest_batch, row_sequences

    rows = [{"prompt": f"Question {i}?", "chosen": "A good answer " * (1 + i % 3), "rejected": "No."}
            for i in range(12)]
    recipe = make(tmp_path, tiny_model_dir, {"name": "dpo", "adapter": "lora"}, rows=rows, batch_size=2)
    from tunesmith.plan import encoded_rows

    _, encoded, _ = encoded_rows(recipe)
    (a, start_a), (b, start_b) = row_sequences(encoded[0])
    assert a + b == len(encoded[0].input_ids) and a > b and start_a == start_b > 0
    assert longest_batch(encoded, 2, 64).sequences == 4
    plan = plan_of(recipe)
    assert "reference model" in [t.name for t in plan.terms] and term(plan, "reference model") == 0  # adapter off


def test_trls_fused_head_is_the_backward_of_one_tile(tmp_path, tiny_model_dir):
    """dpo's log-probabilities come from TRL's fused LM head: on the CPU the backward of one tile of (up to) 4,096
    positions × 32,768 vocabulary entries holds the fp32 tile buffer, 7 fp32 copies and a bool mask = 33 bytes per
    tile element (torch.profiler, dpo lora b2 s256: 8 × 124.5 MB + a bool at the step's peak; plan.py)."""
    from tunesmith.plan import fused_head_term
    from tunesmith.plan_inputs import Batch

    rows = [{"prompt": f"Question {i}?", "chosen": "A good answer " * (1 + i % 3), "rejected": "No."}
            for i in range(12)]
    plan = plan_of(make(tmp_path, tiny_model_dir, {"name": "dpo", "adapter": "lora"}, rows=rows, batch_size=2))
    m = plan.model
    assert m.vocab == 49152  # the SmolLM2 tokenizer: a 32,768-wide tile and a 16,384-wide one
    # batch 2 → 4 sequences (chosen, rejected) of at most 64 tokens: 4 × 63 = 252 scored positions (every position
    # on the CPU) → 252 × 32,768 × 33 = 272,498,688 bytes
    assert fused_head_term(m, Batch(4, 64, 20), "cpu", False).bytes == 272_498_688
    assert fused_head_term(m, Batch(8, 64, 20), "cpu", False).bytes == 2 * 272_498_688  # doubles with the batch
    assert fused_head_term(m, Batch(4, 127, 20), "cpu", False).bytes == 2 * 272_498_688  # and with the length
    # past 4,096 positions the tile stops growing: 4,096 × 32,768 × 33
    assert fused_head_term(m, Batch(64, 129, 20), "cpu", False).bytes == 4096 * 32768 * 33
    # bf16 autocast: the buffer is bf16 (2 bytes), the backward's copies stay fp32: 252 × 32,768 × 31
    assert fused_head_term(m, Batch(4, 64, 20), "cpu", True).bytes == 252 * 32768 * 31
    # CUDA (Triton kernels, in place): only the labelled positions, the buffer alone: 4 × 20 × 32,768 × 2 (bf16)
    assert fused_head_term(m, Batch(4, 64, 20), "cuda", True).bytes == 80 * 32768 * 2
    assert term(plan, "logits") == fused_head_term(m, Batch(plan.sequences, plan.longest, 1), "cpu", False).bytes


def run_cli(argv, capsys):
    from tunesmith.cli import main

    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_table(tmp_path, tiny_model_dir, capsys):
    recipe = tmp_path / "r.yaml"
    write_jsonl(tmp_path / "train.jsonl", CHATS)
    recipe.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: train.jsonl}}\nmethod: sft\n"
                      "train: {batch_size: 4, max_seq_len: 64, precision: fp32}\n")
    code, out, _ = run_cli(["plan", str(recipe), "train.batch_size=2", "--device", "cpu"], capsys)
    assert code == 0
    for words in ("parameters", "trainable", "weights", "gradients", "AdamW states", "activations", "logits",
                  "peak (step)", "verdict: FITS", "2 per device × 1 accumulation"):
        assert words in out, words
    code, out, _ = run_cli(["plan", str(recipe), "--device", "cpu", "--memory", "0.01"], capsys)
    assert code == 1 and "verdict: WILL NOT FIT" in out and "fixes, cheapest first:" in out
    code, out, _ = run_cli(["plan", str(recipe), "--device", "cuda", "--gpus", "2"], capsys)
    assert code == 0 and "world size 2" in out and "80 GB assumed" in out or "NVIDIA" in out
    code, _, err = run_cli(["plan", str(recipe), "--gpus", "0"], capsys)
    assert code == 2 and "--gpus" in err
    code, _, err = run_cli(["plan", str(recipe), "--device", "tpu"], capsys)
    assert code == 2 and "invalid choice: 'tpu'" in err
    code, _, err = run_cli(["plan", str(recipe), "--gpus", "2", "--device", "cpu"], capsys)
    assert code == 2 and "--gpus 2 with --device cpu" in err


def test_probe_measures_steps_and_memory_near_the_estimate(tmp_path, tiny_model_dir):
    import trl  # noqa: F401 - imported before the probe's baseline, as in a session that trained before

    from tunesmith.plan_probe import probe

    rows = [{"messages": [{"role": "user", "content": "Hi " * 3},
                          {"role": "assistant", "content": "word " * (50 + i)}]} for i in range(12)]
    recipe = make(tmp_path, tiny_model_dir, rows=rows, batch_size=8, max_seq_len=96)
    plan = plan_of(recipe)
    result = probe(recipe, plan=plan, echo=lambda s: None)
    assert len(result.step_seconds) == 3 and all(s > 0 for s in result.step_seconds)
    assert result.seconds_per_step == min(result.step_seconds[1:])
    assert result.eval_seconds_per_batch is not None and result.eval_seconds_per_batch > 0
    assert 0.5 * plan.peak < result.peak_bytes < 2.0 * plan.peak  # logits dominate this tiny model's step
    assert result.finish_seconds == pytest.approx(plan.steps * result.seconds_per_step
                                                  + result.evaluations * result.eval_seconds_per_batch)
    assert result.finish_low_seconds == pytest.approx(result.finish_seconds * result.typical_scale)
    assert not (tmp_path / "run").exists()  # the probe wrote nothing into the run folder


def test_a_loop_without_step_callbacks_is_timed_by_its_metrics_rows(tmp_path):
    """ppo's own loop calls only on_train_begin/on_train_end; the clock times its steps by when each step's row
    appears in metrics.jsonl, so the first step's one-time costs stay out of the later steps."""
    import json
    import time

    from tunesmith.plan_probe import step_clock

    rows = tmp_path / "metrics.jsonl"
    clock = step_clock(rows)
    clock.on_train_begin(None, None, None)
    for step, seconds in enumerate((0.6, 0.2, 0.2), start=1):  # a slow first step, then two quick ones
        time.sleep(seconds)
        with open(rows, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "reward": 0.5}) + "\n")
    clock.on_train_end(None, None, None)  # at once after the last row: it is still seen
    first, *later = clock.step_seconds(3)
    assert first == pytest.approx(0.6, abs=0.1) and later == pytest.approx([0.2, 0.2], abs=0.1)
    assert step_clock().step_seconds(3) == []  # nothing seen, nothing made up
