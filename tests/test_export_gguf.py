"""`tunesmith export --format gguf|ollama`: a tiny LoRA run of the random Llama written as GGUF, read back by
transformers with the run's logits (per dtype), planted faults caught by the parity gate, the Ollama Modelfile."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]
SYSTEM = "You answer sums."


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A LoRA chat run of the tiny Llama that answers with varied words, trained with a system prompt."""
    from test_train import make_recipe

    from tunesmith.train import train_run

    tmp = tmp_path_factory.mktemp("gguf")
    train_run(make_recipe(tmp, tiny_model_dir, CHATS, name="run", learning_rate=2e-2, max_steps=15,
                          data={"system_prompt": SYSTEM}), echo=lambda s: None)
    return tmp / "run"


def run_logits(loaded, ids):
    import torch

    with torch.inference_mode():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-4), ("f16", 0.25), ("q8_0", 3.0)])
def test_gguf_reads_back_with_the_runs_logits(run, tmp_path, dtype, atol, capsys):
    from tunesmith.generate import load_run, prompt_ids
    from tunesmith.serve.parity import TOLERANCES, load_gguf, parity_prompts

    assert atol == TOLERANCES[dtype].max_logit_diff or dtype == "f32"
    out = tmp_path / "gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"parity (gguf, {dtype}): PASS" in printed and "model.gguf" in printed
    report = json.loads((out / "parity.json").read_text())
    assert report["ok"] and report["dtype"] == dtype and all(p["template_same"] for p in report["prompts"])
    reference, exported = load_run(run), load_gguf(out)
    ids = prompt_ids(reference, parity_prompts(run)[0])
    diff = (run_logits(reference, ids) - run_logits(exported, ids)).abs().max().item()
    assert diff <= atol
    assert exported.tokenizer.chat_template == reference.tokenizer.chat_template
    assert json.loads((out / "tunesmith_export.json").read_text())["format"] == "gguf"


def test_gguf_metadata_matches_llama_cpps_own_file(run, tmp_path):
    """Tensor names, tokenizer arrays and special ids as in the bundled GGUF llama.cpp's converter wrote."""
    import gguf

    from tunesmith.export_gguf import export_gguf
    from tunesmith.model import default_gguf

    out, _ = export_gguf(run, tmp_path / "g", "gguf", "f32", echo=lambda s: None)
    mine, theirs = gguf.GGUFReader(out / "model.gguf"), gguf.GGUFReader(default_gguf())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token"):
        assert mine.fields[key].contents() == theirs.fields[key].contents(), key
    names = {t.name for t in mine.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied embeddings, as llama.cpp writes them
    assert mine.fields["llama.block_count"].contents() == 2 and mine.fields["general.file_type"].contents() == 0


def test_no_qk_permutation_fails_the_gate(run, tmp_path, monkeypatch, capsys):
    import tunesmith.export_gguf as eg

    monkeypatch.setattr(eg, "permute_qk", lambda w, n_head, n_kv=None: w)
    out = tmp_path / "gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not answer like the run" in err and "logit difference" in err
    assert not out.exists() and (tmp_path / "gguf.failed" / "model.gguf").exists()
    report = json.loads((tmp_path / "gguf.failed" / "parity.json").read_text())
    assert not report["ok"] and any("logit difference" in f for f in report["failures"])
    assert main(["export", str(run), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 2  # again:
    assert not (tmp_path / "gguf.failed-2").exists()  # its own earlier failure is replaced


def test_template_left_out_fails_the_gate(run, tmp_path, monkeypatch, capsys):
    import tunesmith.export_gguf as eg

    monkeypatch.setattr(eg, "template_fields", lambda template: {})
    (tmp_path / "gguf.failed").mkdir()
    (tmp_path / "gguf.failed" / "mine.txt").write_text("not tunesmith's")
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 2
    assert "chat template" in capsys.readouterr().err
    assert (tmp_path / "gguf.failed" / "mine.txt").read_text() == "not tunesmith's"  # never replaced
    report = json.loads((tmp_path / "gguf.failed-2" / "parity.json").read_text())
    assert not report["ok"] and not any(p["template_same"] for p in report["prompts"])
    assert any("chat template" in f for f in report["failures"])


def test_ollama_modelfile_renders_the_runs_prompt(run, tmp_path, capsys):
    from tunesmith.export_gguf_ollama import read_modelfile, render_go
    from tunesmith.generate import load_run, prompt_text

    out = tmp_path / "ollama"
    assert main(["export", str(run), "--format", "ollama", "--dtype", "q8_0", "--out", str(out)]) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert f'SYSTEM """{SYSTEM}"""' in text
    spec = read_modelfile(text)
    assert spec["stops"] == ["<|im_end|>"]
    reference = load_run(run)
    turns = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": "And {{ 3 }} plus 3?"}]
    with_system = [{"role": "system", "content": SYSTEM}, *turns]
    assert render_go(spec["template"], turns, spec["system"]) == prompt_text(reference, with_system)
    assert render_go(spec["template"], turns) == prompt_text(reference, turns)  # the template's default system
    assert json.loads((out / "parity.json").read_text())["ok"]


def test_merge_still_works_and_writes_parity_json(run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 0
    assert "parity (merged, f32): PASS" in capsys.readouterr().out
    assert json.loads((out / "parity.json").read_text())["logits"]["max_abs_logit_diff"] < 1e-4


def test_go_template_renderer_and_untranslatable_templates():
    from tunesmith.errors import RunError
    from tunesmith.export_gguf_ollama import ollama_template, render_go

    go = '{{- range .Messages }}[{{ .Role }}] {{ .Content }}\n{{ end }}{{ if .System }}S={{ .System }}{{ end }}'
    assert render_go(go, [{"role": "user", "content": "hi"}]) == "[user] hi\n"
    with pytest.raises(RunError, match="can't be translated to an Ollama TEMPLATE"):
        ollama_template(lambda m: "".join(f"### {x['role']}: {x['content']}\n" for x in m) + "### assistant:")


@pytest.mark.integration
def test_ollama_q8_0_export_of_a_default_model_run_passes_its_gate(tmp_path):
    """A few LoRA steps on the real SmolLM2-135M, exported for Ollama in q8_0: the gate passes within q8_0's
    stated tolerance, the GGUF is about a quarter of the fp32 weights."""
    from pathlib import Path

    from tunesmith.export_gguf import export_gguf
    from tunesmith.recipe import load_recipe
    from tunesmith.serve.parity import TOLERANCES
    from tunesmith.train import train_run

    demo = Path(__file__).parent.parent / "examples" / "meeting-json"
    recipe = load_recipe(demo / "recipe.yaml", [
        f"output.dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=2", "train.max_seq_len=128",
        "train.eval_every=null", "train.save_every=null", f"data.validation={demo / 'heldout.jsonl'}",
        "eval.loss_rows=2"])
    train_run(recipe, echo=lambda s: None)
    out, report = export_gguf(tmp_path / "run", tmp_path / "ollama", "ollama", "q8_0", echo=lambda s: None)
    assert report["ok"], report["failures"]
    assert report["logits"]["max_abs_logit_diff"] <= TOLERANCES["q8_0"].max_logit_diff
    assert all(p["template_same"] and p["tokens_same"] for p in report["prompts"])
    assert 100e6 < (out / "model.gguf").stat().st_size < 200e6  # 135M parameters in 8.5 bits
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()
