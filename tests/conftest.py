"""Shared fixtures: the SmolLM2 tokenizer and a tiny random Llama saved as a local model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (converted once from the bundled GGUF into the tunesmith cache)."""
    from tunesmith.model import ModelSource, default_model_dir, load_tokenizer

    return load_tokenizer(ModelSource(default_model_dir()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, hidden-32 random Llama with the SmolLM2 tokenizer, saved like any local HF model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written as-is) as lines of a file."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
            fh.write("\n")
    return path


@pytest.fixture
def chat_rows() -> list[dict]:
    """Twenty short, distinct chats."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]


def epoch_padding(recipe) -> int:
    """Padding tokens in one epoch of the run's own training dataloader (counted at train begin; train_run runs)."""
    from transformers import TrainerCallback

    from tunesmith.train import train_run

    seen = {}

    class Count(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            batches = list(train_dataloader)
            seen["padding"] = sum(b["input_ids"].numel() - int(b["attention_mask"].sum()) for b in batches)

    train_run(recipe, callbacks=[Count()], echo=lambda s: None)
    return seen["padding"]
