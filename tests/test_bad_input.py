"""Bad input, table-driven: every case exits with its documented code (2 unless said), prints no traceback, names
the file / field / option at fault, and leaves every file that was there before byte-for-byte unchanged.

Each table holds cases of one cause; a case builds its files in a fresh folder and returns the command line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import write_jsonl
from tunesmith.cli import main

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
LABELLED = [{"text": f"review number {i} was {'great' if i % 2 else 'awful'}", "label": "pos" if i % 2 else "neg"}
            for i in range(24)]


@dataclass
class Case:
    """One bad input: `build(tmp)` writes what it needs into `tmp` and returns the command line."""

    id: str
    build: Callable[[Path], list[str]]
    expect: tuple[str, ...] = ()  # substrings of stderr (the message names what is wrong and where)
    code: int = 2
    unchanged: bool = True  # every file present before the command is byte-identical after it
    extra: Callable[[Path], None] | None = field(default=None)  # further assertions on the folder afterwards


def recipe(tmp: Path, text: str, rows: list | None = None, name: str = "r.yaml") -> Path:
    """A recipe file `text` beside train.jsonl (CHATS unless `rows`)."""
    write_jsonl(tmp / "train.jsonl", CHATS if rows is None else rows)
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(case: Case, tmp: Path, capsys) -> str:
    """Run the case in-process; assert code, no traceback, the expected words, and untouched inputs."""
    argv = case.build(tmp)
    before = snapshot(tmp)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.code, f"exit {code}, expected {case.code}\nstdout: {out}\nstderr: {err}"
    for text in case.expect:
        assert text in err, f"{text!r} not in stderr:\n{err}"
    if case.unchanged:
        after = snapshot(tmp)
        changed = [p for p, digest in before.items() if after.get(p) != digest]
        assert not changed, f"input files changed or removed: {changed}"
        assert not [p for p in after if p.endswith(".tmp")], "a temporary file was left behind"
    if case.extra:
        case.extra(tmp)
    return err


# ----------------------------------------------------------------------------------------------- recipes

def recipe_case(id: str, body: str, *expect: str, command: str = "validate", overrides: tuple = ()) -> Case:
    """`tunesmith COMMAND r.yaml [overrides]` on a recipe of `data.train: train.jsonl` plus `body`; stderr names
    r.yaml and `expect`."""
    text = "data:\n  train: train.jsonl\n" + body
    return Case(id, lambda t: [command, str(recipe(t, text)), *overrides], ("r.yaml", *expect))


RECIPE_CASES: list[Case] = [
    Case("scheduler-typo", lambda t: ["validate", str(recipe(t, "data:\n  train: train.jsonl\ntrain:\n"
                                                             "  scheduler: cosin\n"))],
         ("r.yaml", "`train.scheduler`", "did you mean 'cosine'")),
    recipe_case("learning-rate-inf", "train:\n  learning_rate: .inf\n", "`train.learning_rate`: inf is not a finite"),
    recipe_case("learning-rate-inf-train", "train:\n  learning_rate: .inf\n", "`train.learning_rate`: inf is not a "
                "finite number", command="train"),
    recipe_case("epochs-inf", "train:\n  epochs: .inf\n", "`train.epochs`: inf is not a finite number"),
    recipe_case("epochs-huge", "train:\n  epochs: 1.0e+300\n", "`train.epochs`", "must be <= 10000"),
    recipe_case("learning-rate-nan", "train:\n  learning_rate: .nan\n", "`train.learning_rate`: nan is not a finite"),
    recipe_case("fraction-nan", "  validation_fraction: .nan\n", "`data.validation_fraction`: nan is not a finite"),
    recipe_case("nan-override", "", "`train.warmup_ratio`: nan is not a finite number",
                overrides=("train.warmup_ratio=.nan",)),
    recipe_case("batch-size-true", "train:\n  batch_size: true\n", "`train.batch_size`: true is not a whole number"),
    recipe_case("padding-free-number", "train:\n  padding_free: 1\n", "`train.padding_free`: 1 is not true or false"),
    recipe_case("seed-negative", "train:\n  seed: -1\n", "`train.seed`: -1 is out of range", ">= 0"),
    recipe_case("seed-too-big", "train:\n  seed: 4294967296\n", "`train.seed`", "< 4294967296"),
    recipe_case("max-seq-len-huge", "train:\n  max_seq_len: 100000000000000000000\n", "`train.max_seq_len`",
                "<= 1048576"),
    recipe_case("duplicate-key", "train:\n  epochs: 1\n  epochs: 2\n", "`train.epochs`: given twice, at lines 4 "
                "and 5"),
    recipe_case("duplicate-section", "data:\n  train: train.jsonl\n", "`data`: given twice, at lines 1 and 3"),
    recipe_case("method-name-list", "method:\n  name: [sft]\n", "`method.name`: ['sft'] is not a method name",
                "did you mean 'sft'"),
    recipe_case("method-name-mapping", "method:\n  name: {a: 1}\n", "`method.name`: {'a': 1} is not a method name"),
    recipe_case("method-list", "method: [sft]\n", "`method`: must be a mapping"),
    recipe_case("model-name-number", "model:\n  name: 3\n", "`model.name`: 3 is not text"),
    recipe_case("path-unknown-user", "  validation: ~nosuchuser/val.jsonl\n", "`data.validation`",
                "can't expand '~nosuchuser' (no such user)"),
    recipe_case("run-path-unknown-user", "method:\n  name: reward\n  start_from: ~nosuchuser/run\n",
                "`method.start_from`", "can't expand '~nosuchuser'"),
    recipe_case("override-unknown-user", "", "`output.dir`", "can't expand '~nosuchuser'",
                overrides=("output.dir=~nosuchuser/run",)),
    recipe_case("empty-path", "  validation: ''\n", "`data.validation`: is empty"),
    Case("recipe-too-deep", lambda t: ["validate", str(recipe(t, "data: " + "[" * 50_000))],
         ("r.yaml", "nested too deeply")),
]


# ----------------------------------------------------------------------------------------------- command line

CLI_CASES: list[Case] = [
    Case("init-exists", lambda t: (t.joinpath("r.yaml").write_text("x: 1\n"), ["init", str(t / "r.yaml")])[1],
         ("r.yaml", "already exists")),
]


# ----------------------------------------------------------------------------------------------- data files

DATA_CASES: list[Case] = []


# ----------------------------------------------------------------------------------------------- run folders

RUN_CASES: list[Case] = [
    Case("eval-not-a-run", lambda t: (t.joinpath("notrun").mkdir(), ["eval", str(t / "notrun")])[1],
         ("notrun", "manifest.json")),
]


ALL = RECIPE_CASES + CLI_CASES + DATA_CASES + RUN_CASES


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_case(case, tmp_path, capsys)


def test_case_ids_are_unique():
    ids = [c.id for c in ALL]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
