"""manifest.json keeps the command line, with the values of anything that looks like a secret masked."""

from __future__ import annotations

import sys

import pytest

from tunesmith.artifacts import machine, mask_secrets

MASKED = [  # command line as typed -> as stored
    (["--token", "abc123"], ["--token", "***"]),
    (["--api-key=xyz", "--api_key", "xyz"], ["--api-key=***", "--api_key", "***"]),
    (["--hf-token=hf_x"], ["--hf-token=***"]),
    (["--password", "p w", "--secret", "s3"], ["--password", "***", "--secret", "***"]),
    (["HF_TOKEN=abc", "OPENAI_API_KEY=def", "model.key=ghi", "key=jkl"], ["HF_TOKEN=***", "OPENAI_API_KEY=***",
                                                                          "model.key=***", "key=***"]),
    (["--header", "Authorization: Bearer abc.def"], ["--header", "Authorization: ***"]),
    (["X-Api-Key: 123"], ["X-Api-Key: ***"]),
    (["https://bob:hunter2@example.org/d.jsonl?token=t1&x=1"], ["https://bob:***@example.org/d.jsonl?token=***&x=1"]),
    (["hf_abcdefghijklmnopqrstuvwxyz12"], ["***"]),  # a bare token of a well-known shape
    (["--token", "--debug"], ["--token", "--debug"]),  # a flag after it is not its value
]
KEPT = [  # nothing secret here: stored as typed
    ["train", "r.yaml", "--max-new-tokens", "5", "--tokenizer", "tok/", "train.learning_rate=1e-4"],
    ["model.pad_token=<pad>", "model.eos_token=</s>", "data.train=/data/keys.jsonl", "--limit", "3"],
]


@pytest.mark.parametrize("typed, stored", MASKED, ids=[" ".join(t)[:30] for t, _ in MASKED])
def test_secret_values_are_masked(typed, stored):
    assert mask_secrets(["tunesmith", *typed]) == ["tunesmith", *stored]


@pytest.mark.parametrize("typed", KEPT, ids=["counts-and-paths", "special-tokens"])
def test_ordinary_arguments_are_kept_as_typed(typed):
    assert mask_secrets(typed) == typed


def test_the_manifest_machine_block_stores_the_masked_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tunesmith", "train", "r.yaml", "model.token=s3cr3t", "--api-key", "k"])
    assert machine()["argv"] == ["tunesmith", "train", "r.yaml", "model.token=***", "--api-key", "***"]
    assert sys.argv[3] == "model.token=s3cr3t"  # the process's own argv is left alone
