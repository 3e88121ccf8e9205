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
    recipe_case("padding-free-number", "train:\n  padding_free: 1\n", "`train.padding_free`: 1 is not true, false or auto"),
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

def labelled(tmp: Path, name: str = "train.jsonl") -> str:
    """LABELLED written to tmp/name; its path."""
    return str(write_jsonl(tmp / name, LABELLED))


def made(tmp: Path, *files: str, folders: tuple[str, ...] = ()) -> Path:
    """Files (with a line of text) and folders created under tmp; returns tmp."""
    for folder in folders:
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    for name in files:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text("mine\n", encoding="utf-8")
    return tmp


def placeholder_run(tmp: Path, name: str = "run") -> str:
    """A run folder with a manifest and placeholder files: commands that must refuse before loading get this far."""
    base = made(tmp, "base/config.json") / "base"
    run = made(tmp, f"{name}/adapter/adapter_config.json", f"{name}/adapter/adapter_model.safetensors",
               f"{name}/tokenizer/tokenizer_config.json") / name
    (run / "manifest.json").write_text(json.dumps({"tunesmith_run": 1, "method": "sft", "saved": "adapter",
                                                   "base_model": {"name": str(base), "resolved": str(base)}}))
    return str(run)


def gguf_run(tmp: Path, config: dict, **manifest) -> str:
    """placeholder_run with a readable base config.json (`config`) and `manifest` keys changed."""
    run = Path(placeholder_run(tmp))
    (tmp / "base" / "config.json").write_text(json.dumps(config))
    data = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**data, **manifest}))
    return str(run)


HELD: list = []  # sockets kept listening while a case runs


def held_port() -> str:
    """A loopback port something already listens on."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    HELD.append(sock)
    return str(sock.getsockname()[1])


def export_case(id: str, out: Callable[[Path], str], expect: tuple[str, ...], *extra: str) -> Case:
    return Case(id, lambda t: ["export", placeholder_run(t), "--merge", "--out", out(t), *extra], expect)


CLI_CASES: list[Case] = [
    Case("init-exists", lambda t: (t.joinpath("r.yaml").write_text("x: 1\n"), ["init", str(t / "r.yaml")])[1],
         ("r.yaml", "already exists")),
    # numbers: counts and sizes below their minimum, non-finite floats, ports out of range
    Case("balance-per-class-negative", lambda t: ["data", "balance", labelled(t), "--strategy", "down",
                                                  "--per-class", "-3", "--out", "o.jsonl"],
         ("argument --per-class: '-3' is not a whole number ≥ 1",)),
    Case("synth-max-new-tokens-negative", lambda t: ["data", "synth", "--seeds", labelled(t), "-n", "2", "--out",
                                                     "o.jsonl", "--max-new-tokens", "-1"],
         ("argument --max-new-tokens: '-1'",)),
    Case("synth-rows-zero", lambda t: ["data", "synth", "--seeds", labelled(t), "-n", "0", "--out", "o.jsonl"],
         ("argument -n/--rows: '0'",)),
    Case("synth-timeout-nan", lambda t: ["data", "synth", "--seeds", labelled(t), "-n", "2", "--out", "o.jsonl",
                                         "--timeout", "nan"],
         ("argument --timeout: 'nan' is not a finite number > 0",)),
    Case("augment-copies-zero", lambda t: ["data", "augment", labelled(t), "--copies", "0", "--out", "o.jsonl"],
         ("argument --copies: '0'",)),
    Case("generate-max-new-tokens-negative", lambda t: ["generate", "run", "hi", "--max-new-tokens", "-1"],
         ("argument --max-new-tokens: '-1' is not a whole number ≥ 1",)),
    Case("generate-temperature-nan", lambda t: ["generate", "run", "hi", "--temperature", "nan"],
         ("argument --temperature: 'nan' is not a finite number ≥ 0",)),
    Case("chat-temperature-inf", lambda t: ["chat", "run", "--temperature", "inf"], ("argument --temperature: 'inf'",)),
    Case("eval-batch-size-zero", lambda t: ["eval", "run", "--batch-size", "0"], ("argument --batch-size: '0'",)),
    Case("eval-limit-zero", lambda t: ["eval", "run", "--limit", "0"], ("argument --limit: '0'",)),
    Case("compare-max-new-tokens-zero", lambda t: ["compare", "r.yaml", "--methods", "lora", "--max-new-tokens", "0"],
         ("argument --max-new-tokens: '0'",)),
    Case("review-port-out-of-range", lambda t: ["review", "run", "base", "--port", "99999"],
         ("argument --port: '99999' is not a port number from 0 to 65535",)),
    Case("serve-port-out-of-range", lambda t: ["serve", "run", "--port", "99999"],
         ("argument --port: '99999' is not a port number from 0 to 65535",)),
    Case("serve-max-waiting-zero", lambda t: ["serve", "run", "--max-waiting", "0"], ("argument --max-waiting: '0'",)),
    Case("serve-timeout-nan", lambda t: ["serve", "run", "--timeout", "nan"],
         ("argument --timeout: 'nan' is not a finite number > 0",)),
    Case("serve-public-host-without-key", lambda t: ["serve", placeholder_run(t), "--host", "0.0.0.0"],
         ("--host 0.0.0.0: not a loopback address, and no API key", "--api-key-env VAR")),
    Case("serve-api-key-env-unset", lambda t: ["serve", placeholder_run(t), "--host", "0.0.0.0", "--api-key-env",
                                               "TUNESMITH_TEST_NO_SUCH_KEY"],
         ("--api-key-env TUNESMITH_TEST_NO_SUCH_KEY: the environment variable TUNESMITH_TEST_NO_SUCH_KEY is not set",)),
    Case("serve-adapter-without-a-name", lambda t: ["serve", placeholder_run(t), "--adapter", "runs/other"],
         ("--adapter 'runs/other': expected NAME=RUN", "e.g. --adapter support=runs/support-lora")),
    Case("serve-port-in-use", lambda t: ["serve", placeholder_run(t), "--port", held_port()],
         ("can't listen there", "choose another --port")),
    Case("serve-log-is-a-data-file", lambda t: ["serve", placeholder_run(t), "--port", "0", "--log", labelled(t)],
         ("can't be used as a request log",)),
    Case("serve-adapter-name-twice", lambda t: ["serve", placeholder_run(t), "--adapter", "a=x", "--adapter", "a=y"],
         ("--adapter 'a=y': the name 'a' is given twice",)),
    Case("clean-max-tokens-zero", lambda t: ["data", "clean", labelled(t), "--out", "o.jsonl", "--max-tokens", "0"],
         ("argument --max-tokens: '0'",)),
    Case("check-max-len-zero", lambda t: ["data", "check", labelled(t), "--max-len", "0"],
         ("argument --max-len: '0'",)),
    Case("check-threshold-nan", lambda t: ["data", "check", labelled(t), "--threshold", "nan"],
         ("argument --threshold: 'nan' is not a finite number",)),
    Case("predict-top-zero", lambda t: ["predict", "run", "x", "--top", "0"], ("argument --top: '0'",)),
    Case("predict-batch-size-negative", lambda t: ["predict", "run", "x", "--batch-size", "-4"],
         ("argument --batch-size: '-4'",)),
    Case("split-fractions-nan", lambda t: ["data", "split", labelled(t), "--out", "parts", "--fractions",
                                           "nan,0.5,0.5"],
         ("argument --fractions: 'nan' is not a number from 0 to 1",)),
    Case("split-seed-negative", lambda t: ["data", "split", labelled(t), "--out", "parts", "--seed", "-1"],
         ("argument --seed: '-1' is not a whole number ≥ 0",)),
    Case("preview-rows-zero", lambda t: ["data", "preview", "r.yaml", "-n", "0"], ("argument -n/--rows: '0'",)),
    # output paths: the wrong kind of thing, a missing folder, an input (or a folder holding one)
    Case("split-out-is-a-file", lambda t: ["data", "split", labelled(t), "--out", str(made(t, "parts") / "parts")],
         ("--out", "parts: is a file; give a folder")),
    Case("split-out-in-a-missing-folder", lambda t: ["data", "split", labelled(t), "--out", "no/such/parts"],
         ("--out no/such/parts: the folder no/such does not exist",)),
    Case("split-out-holds-the-input", lambda t: ["data", "split", labelled(t), "--out", str(t)],
         ("--out", "the output would be (or contain, or lie inside) the input")),
    Case("check-out-is-a-file", lambda t: ["data", "check", labelled(t), "--out", str(made(t, "rep") / "rep"),
                                           "--no-tokens"], ("--out", "rep: is a file; give a folder")),
    Case("check-out-is-the-input", lambda t: ["data", "check", labelled(t), "--out", "train.jsonl", "--no-tokens"],
         ("--out train.jsonl: the output would be",)),
    Case("balance-out-is-a-folder", lambda t: ["data", "balance", labelled(t), "--strategy", "up", "--out",
                                               str(made(t, folders=("o",)) / "o")], ("--out", "o: is a folder")),
    Case("balance-out-is-the-input", lambda t: ["data", "balance", labelled(t), "--strategy", "weights", "--out",
                                                "train.jsonl"], ("--out train.jsonl: the output would be",)),
    Case("balance-out-without-a-strategy", lambda t: ["data", "balance", labelled(t), "--out", "w.json"],
         ("--out w.json: --strategy report writes nothing",)),
    Case("clean-out-in-a-missing-folder", lambda t: ["data", "clean", labelled(t), "--out", "no/clean.jsonl"],
         ("--out no/clean.jsonl: the folder no does not exist",)),
    Case("clean-out-is-the-recipe", lambda t: ["data", "clean", labelled(t), "--recipe",
                                               str(recipe(t, "data:\n  train: train.jsonl\n")), "--out", "r.yaml"],
         ("--out r.yaml: the output would be (or contain, or lie inside) the input",)),
    Case("clean-out-is-an-against-file", lambda t: ["data", "clean", labelled(t), "--against", labelled(t, "e.jsonl"),
                                                    "--out", "e.jsonl"], ("--out e.jsonl", "e.jsonl")),
    Case("synth-out-is-the-seeds", lambda t: ["data", "synth", "--seeds", labelled(t), "-n", "2", "--out",
                                              "train.jsonl"], ("--out train.jsonl: the output would be",)),
    Case("data-review-export-is-the-review-file", lambda t: ["data", "review", str(made(t, "rev.jsonl") / "rev.jsonl"),
                                                             "--export", "rev.jsonl"],
         ("--export rev.jsonl: the output would be",)),
    Case("augment-out-is-a-folder", lambda t: ["data", "augment", labelled(t), "--out",
                                               str(made(t, folders=("aug",)) / "aug")], ("--out", "aug: is a folder")),
    Case("predict-out-is-the-data", lambda t: ["predict", "run", "--data", labelled(t), "--out", "train.jsonl"],
         ("--out train.jsonl: the output would be",)),
    Case("review-export-is-a-folder", lambda t: ["review", str(made(t, "run/review/base.sqlite") / "run"), "base",
                                                 "--export", str(made(t, folders=("votes",)) / "votes")],
         ("--export", "votes: is a folder")),
    export_case("export-out-is-the-run", lambda t: str(t / "run"), ("--out", "would replace the run"),
                "--overwrite"),
    Case("export-out-holds-the-run", lambda t: ["export", placeholder_run(t, "runs/r"), "--merge", "--out",
                                                str(t / "runs"), "--overwrite"], ("--out", "would replace the run")),
    export_case("export-out-is-the-base-model", lambda t: str(t / "base"), ("--out", "the input"), "--overwrite"),
    export_case("export-out-not-an-export", lambda t: str(made(t, "mine/notes.txt") / "mine"),
                ("--out", "not a folder tunesmith exported (no tunesmith_export.json)"), "--overwrite"),
    export_case("export-out-exists", lambda t: str(made(t, "mine/notes.txt") / "mine"), ("--out", "already exists")),
    export_case("export-out-is-a-file", lambda t: str(made(t, "model.bin") / "model.bin"), ("--out", "is a file")),
    Case("export-format-unknown", lambda t: ["export", placeholder_run(t), "--format", "onnx", "--out", str(t / "o")],
         ("--format", "invalid choice: 'onnx'")),
    Case("export-dtype-unknown", lambda t: ["export", placeholder_run(t), "--format", "gguf", "--dtype", "q4_k",
                                            "--out", str(t / "o")], ("--dtype", "invalid choice: 'q4_k'")),
    export_case("export-dtype-with-merged", lambda t: str(t / "o"), ("--dtype f16: only for --format gguf or ollama",),
                "--dtype", "f16"),
    Case("export-merge-and-gguf", lambda t: ["export", placeholder_run(t), "--merge", "--format", "gguf", "--out",
                                             str(t / "o")], ("--merge and --format gguf",)),
    Case("export-no-format", lambda t: ["export", placeholder_run(t), "--out", str(t / "o")],
         ("--format merged|gguf|ollama",)),
    Case("export-gguf-not-llama", lambda t: ["export", gguf_run(t, {"model_type": "gpt2"}), "--format", "gguf",
                                             "--out", str(t / "o")],
         ("config.json", "the model is `gpt2`", "Llama-architecture models only", "--format merged")),
    Case("export-gguf-base-config-unreadable", lambda t: ["export", placeholder_run(t), "--format", "ollama",
                                                          "--out", str(t / "o")],
         ("config.json: can't read the base model's config",)),
    Case("export-gguf-classifier", lambda t: ["export", gguf_run(t, {"model_type": "llama"}, method="classify"),
                                              "--format", "gguf", "--out", str(t / "o")],
         ("`method: classify` made a classifier", "--format gguf writes a causal language model")),
    Case("export-gguf-qlora", lambda t: ["export", gguf_run(t, {"model_type": "llama"}, adapter="qlora"),
                                         "--format", "gguf", "--out", str(t / "o")],
         ("can't merge a `qlora` adapter",)),
    Case("init-folder-with-force", lambda t: ["init", str(made(t, folders=("configs",)) / "configs"), "--force"],
         ("configs: is a folder; `init` writes a recipe file",)),
    Case("init-under-a-file", lambda t: ["init", str(made(t, "notes") / "notes" / "r.yaml")],
         ("can't make the folder",)),
    # ~user paths, empty texts
    Case("unknown-user-in-a-data-path", lambda t: ["data", "check", "~nosuchuser-ts/train.jsonl"],
         ("argument data: '~nosuchuser-ts/train.jsonl': can't expand '~nosuchuser-ts' (no such user)",)),
    Case("unknown-user-in-out", lambda t: ["data", "split", labelled(t), "--out", "~nosuchuser-ts/parts"],
         ("argument --out:", "no such user")),
    Case("unknown-user-in-a-recipe-path", lambda t: ["validate", "~nosuchuser-ts/r.yaml"],
         ("argument recipe:", "no such user")),
    Case("predict-only-empty-texts", lambda t: ["predict", placeholder_run(t), "", "   "],
         ("text 1: rejected — empty field", "text 2: rejected", "2 texts given, 0 to label, 2 rejected",
          "error: no text to label")),
    # the loop back: data from-log and retrain
    Case("from-log-no-such-log", lambda t: ["data", "from-log", "nolog.sqlite", "--run", placeholder_run(t), "--out",
                                            "new.jsonl"], ("nolog.sqlite: no such request log",)),
    Case("from-log-log-not-sqlite", lambda t: ["data", "from-log", str(made(t, "log.sqlite") / "log.sqlite"), "--run",
                                               placeholder_run(t), "--out", "new.jsonl"],
         ("log.sqlite: not a SQLite request log",)),
    Case("from-log-include-unknown", lambda t: ["data", "from-log", empty_request_log(t), "--run", placeholder_run(t),
                                                "--out", "new.jsonl", "--include", "up,sideways"],
         ("--include up,sideways: choose from up, correction",)),
    Case("from-log-out-not-jsonl", lambda t: ["data", "from-log", empty_request_log(t), "--run", placeholder_run(t),
                                              "--out", "new.csv"], ("--out new.csv: from-log writes JSON lines",)),
    Case("from-log-run-without-rows", lambda t: ["data", "from-log", empty_request_log(t), "--run",
                                                 placeholder_run(t), "--out", "new.jsonl"],
         ("data.json: missing",)),
    Case("retrain-override-of-its-data", lambda t: ["retrain", placeholder_run(t), "data.train=x.jsonl", "--add",
                                                    "new.jsonl"], ("override 'data.train=x.jsonl'", "retrain decides")),
    Case("retrain-not-a-run", lambda t: ["retrain", "norun", "--add", "new.jsonl"], ("norun: no such run folder",)),
    Case("retrain-run-without-rows", lambda t: ["retrain", placeholder_run(t), "--add", "new.jsonl"],
         ("data.json: missing",)),
    Case("retrain-limit-zero", lambda t: ["retrain", "run", "--add", "new.jsonl", "--limit", "0"],
         ("argument --limit: '0'",)),
    # monitor: the log, the run it is compared with, and its options
    Case("monitor-no-such-log", lambda t: ["monitor", "nolog.sqlite"], ("nolog.sqlite: no such request log",)),
    Case("monitor-neither-log-nor-parity", lambda t: ["monitor"], ("give the request log",)),
    Case("monitor-parity-without-run", lambda t: ["monitor", "--parity", "http://127.0.0.1:9/v1"],
         ("--parity needs --run",)),
    Case("monitor-log-not-sqlite", lambda t: ["monitor", str(made(t, "log.sqlite") / "log.sqlite")],
         ("log.sqlite: not a SQLite request log",)),
    Case("monitor-log-is-a-folder", lambda t: ["monitor", str(made(t, folders=("logs",)) / "logs")],
         ("logs: not a file",)),
    Case("monitor-empty-log", lambda t: ["monitor", empty_request_log(t)], ("requests.sqlite: no requests logged",)),
    Case("monitor-nothing-since", lambda t: ["monitor", request_log(t), "--since", "2099-01-01T00:00"],
         ("no requests logged since the --since time", "earlier --since")),
    Case("monitor-since-not-iso", lambda t: ["monitor", "requests.sqlite", "--since", "yesterday"],
         ("argument --since: 'yesterday' is not an ISO 8601 time",)),
    Case("monitor-window-zero", lambda t: ["monitor", "requests.sqlite", "--window", "0"],
         ("argument --window: '0'",)),
    Case("monitor-no-such-run", lambda t: ["monitor", request_log(t), "--run", "norun"],
         ("norun: no such run folder",)),
    Case("monitor-run-without-rows", lambda t: ["monitor", request_log(t), "--run", placeholder_run(t)],
         ("data.json: missing",)),
    Case("monitor-run-rows-damaged", lambda t: ["monitor", request_log(t), "--run", damaged_rows_run(t)],
         ("train.jsonl, line 1: not a record this run wrote",)),
    Case("monitor-out-is-the-log", lambda t: ["monitor", request_log(t), "--out", "requests.sqlite"],
         ("--out requests.sqlite: the output would be",)),
    Case("plan-gpus-zero", lambda t: ["plan", "r.yaml", "--gpus", "0"], ("argument --gpus: '0' is not a whole",)),
    Case("plan-device-unknown", lambda t: ["plan", "r.yaml", "--device", "tpu"],
         ("argument --device: invalid choice: 'tpu'",)),
    Case("plan-memory-nan", lambda t: ["plan", "r.yaml", "--memory", "nan"], ("argument --memory: 'nan'",)),
    Case("plan-recipe-missing", lambda t: ["plan", "missing.yaml"], ("recipe file not found: missing.yaml",)),
    Case("plan-gpus-with-device-cpu", lambda t: ["plan", str(recipe(t, "data:\n  train: train.jsonl\n")), "--gpus",
                                                 "2", "--device", "cpu"],
         ("--gpus 2 with --device cpu: GPUs are for --device cuda",)),
]


def request_log(tmp: Path) -> str:
    """A request log with one answered request."""
    from tunesmith.serve.requestlog import RequestLog

    with RequestLog(tmp / "requests.sqlite") as log:
        log.record({"id": "chatcmpl-1", "time": 1_780_000_000.0, "status": 200, "e2e_s": 0.5, "input_chars": 12})
    return str(tmp / "requests.sqlite")


def damaged_rows_run(tmp: Path) -> str:
    """A run folder whose RUN/data/train.jsonl is not what a run writes."""
    run = Path(placeholder_run(tmp))
    made(run, "data/train.jsonl", "data/validation.jsonl")
    (run / "data" / "data.json").write_text(json.dumps({"kind": "classification", "labels": ["a"], "hashes": {}}))
    return str(run)


def empty_request_log(tmp: Path) -> str:
    """A request log `tunesmith serve` made, with no requests yet."""
    from tunesmith.serve.requestlog import RequestLog

    RequestLog(tmp / "requests.sqlite").close()
    return str(tmp / "requests.sqlite")


# ----------------------------------------------------------------------------------------------- data files

BIG = "word " * 30_000  # 150,000 characters: over Python's default CSV field limit (131,072)
DEEP = '{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": "pos"}'


def data_file(tmp: Path, name: str, lines: list[str | bytes]) -> str:
    """`lines` (text or raw bytes), one per line, written to tmp/name; its name."""
    (tmp / name).write_bytes(b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines))
    return name


def labelled_csv(tmp: Path, name: str, line: int | None = None, cell: str | bytes = "") -> str:
    """LABELLED as CSV (header on line 1, row i on line i + 2); with `line`, that line's text cell is `cell`."""
    rows: list[str | bytes] = ["text,label"] + [f"{r['text']},{r['label']}" for r in LABELLED]
    if line is not None:
        rows[line - 1] = cell + (b",pos" if isinstance(cell, bytes) else ",pos")
    return data_file(tmp, name, rows)


def labelled_jsonl(tmp: Path, name: str, line: int | None = None, raw: str | bytes = "") -> str:
    """LABELLED as JSONL; with `line`, that line is `raw` instead."""
    rows: list[str | bytes] = [json.dumps(r) for r in LABELLED]
    if line is not None:
        rows[line - 1] = raw
    return data_file(tmp, name, rows)


def typed_parquet(tmp: Path, name: str = "typed.parquet") -> str:
    """LABELLED plus timestamp (with time zone), date, decimal and binary columns, as Parquet."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(LABELLED)
    pq.write_table(pa.table({
        "text": [r["text"] for r in LABELLED], "label": [r["label"] for r in LABELLED],
        "at": pa.array([datetime.datetime(2024, 5, 1, 9, 30, i, 250 * i, tzinfo=datetime.timezone.utc)
                        for i in range(n)], pa.timestamp("us", tz="UTC")),
        "day": pa.array([datetime.date(2024, 5, 1 + i) for i in range(n)], pa.date32()),
        "price": pa.array([decimal.Decimal(i) / 4 for i in range(n)], pa.decimal128(8, 2)),
        "blob": pa.array([bytes([i, 255 - i]) for i in range(n)], pa.binary()),
    }), tmp / name)
    return name


def review_file(tmp: Path, second: str | bytes) -> str:
    """A review file (as `data synth` writes) whose line 2 is `second`."""
    row = {"text": "a fine row", "label": "pos", "_review": {"status": "pending", "reviewed": False,
                                                             "kind": "classification", "checks": []}}
    return data_file(tmp, "review.jsonl", [json.dumps(row), second])


def on_recipe(command: str, build_data: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    """`tunesmith COMMAND r.yaml` on a recipe whose data.train is the file `build_data` writes."""
    def build(tmp: Path) -> list[str]:
        (tmp / "r.yaml").write_text(f"data:\n  train: {build_data(tmp)}\n", encoding="utf-8")
        return [*command.split(), "r.yaml"]
    return build


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def rejects_are(path: str, expected: list[tuple[int, str]]) -> Callable[[Path], None]:
    """An `extra` check: the rejects file at tmp/path holds exactly these (line, reason) pairs."""
    def check(tmp: Path) -> None:
        assert [(r["line"], r["reason"]) for r in read_json_lines(tmp / path)] == expected
    return check


def report_rows(read: int, used: int, rejected: int) -> Callable[[Path], None]:
    """An `extra` check: data check's report (in tmp/c) counts these rows, and every row is accounted for."""
    def check(tmp: Path) -> None:
        rows = json.loads((tmp / "c" / "report.json").read_text())["rows"]
        assert (rows["read"], rows["used"], rows["rejected"]) == (read, used, rejected) and read == used + rejected
    return check


def split_total(folder: Path, rows: int) -> None:
    """Every row landed in exactly one part (rejects.jsonl aside)."""
    assert sum(len(read_json_lines(p)) for p in folder.iterdir() if p.name != "rejects.jsonl") == rows


def clean_kept_big_cell(tmp: Path) -> None:
    rows = read_json_lines(tmp / "clean.jsonl")
    assert len(rows) == 24 and rows[11] == {"text": BIG.strip(), "label": "pos"}
    assert json.loads((tmp / "clean.summary.json").read_text())["read"] == 24


def parquet_round_trip(tmp: Path, written: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    original = pq.read_table(tmp / "typed.parquet")
    back = pa.concat_tables([pq.read_table(tmp / name) for name in written]).sort_by("price")
    assert back.schema == original.schema and back.equals(original.sort_by("price"))


def parquet_as_iso_jsonl(tmp: Path) -> None:
    first = read_json_lines(tmp / "clean.jsonl")[1]
    assert first == {"text": LABELLED[1]["text"], "label": "pos", "at": "2024-05-01T09:30:01.000250+00:00",
                     "day": "2024-05-02", "price": "0.25", "blob": "Af4="}


NESTED = "nested too deeply: 100001 levels of arrays/objects, more than 100"
NOT_UTF8 = ("not UTF-8", "re-encode the file as UTF-8", "iconv")
MALFORMED_4_OF_24 = ['{"text": "cut off', "not json", '{"text": 7, "label": "pos"}', "[1]"]

DATA_CASES: list[Case] = [
    # a CSV cell over 128 KiB is read whole, and every row is counted
    Case("data-check-csv-cell-over-128k", lambda t: ["data", "check", labelled_csv(t, "big.csv", 13, BIG),
                                                     "--no-tokens", "--out", "c"],
         code=0, extra=report_rows(24, 24, 0)),
    Case("data-clean-csv-cell-over-128k", lambda t: ["data", "clean", labelled_csv(t, "big.csv", 13, BIG),
                                                     "--out", "clean.jsonl"], code=0, extra=clean_kept_big_cell),
    Case("data-split-csv-cell-over-128k", lambda t: ["data", "split", labelled_csv(t, "big.csv", 13, BIG),
                                                     "--out", "parts"], code=0,
         extra=lambda t: split_total(t / "parts", 24)),
    # a CSV quote that never closes: the line it opened on, not rows vanishing into one cell
    *[Case(f"data-{cmd}-csv-unclosed-quote",
           lambda t, cmd=cmd: ["data", cmd, labelled_csv(t, "open.csv", 5, '"never closed'), *args],
           ("open.csv: line 5: a quote opens here and is never closed", "lines 5–25"))
      for cmd, args in (("check", ["--no-tokens"]), ("clean", ["--out", "x.jsonl"]), ("split", ["--out", "x"]))],
    Case("data-preview-csv-unclosed-quote", on_recipe("data preview", lambda t: labelled_csv(
        t, "open.csv", 5, '"never closed')), ("open.csv: line 5: a quote opens here and is never closed",)),
    # JSON nested 100,000 deep: that row is rejected with its reason, the rest are counted and used (1 of 24 is
    # under data.max_reject_fraction, so data check passes as train would)
    Case("data-check-jsonl-nested-100000", lambda t: ["data", "check", labelled_jsonl(t, "deep.jsonl", 13, DEEP),
                                                      "--no-tokens", "--out", "c"],
         code=0, extra=lambda t: (rejects_are("c/rejects.jsonl", [(13, NESTED)])(t), report_rows(24, 23, 1)(t))),
    Case("data-clean-jsonl-nested-100000", lambda t: ["data", "clean", labelled_jsonl(t, "deep.jsonl", 13, DEEP),
                                                      "--out", "clean.jsonl"],
         code=0, extra=rejects_are("clean.rejects.jsonl", [(13, NESTED)])),
    Case("data-split-jsonl-nested-100000", lambda t: ["data", "split", labelled_jsonl(t, "deep.jsonl", 13, DEEP),
                                                      "--out", "parts"],
         code=0, extra=rejects_are("parts/rejects.jsonl", [(13, NESTED)])),
    Case("data-check-json-array-nested-100000",
         lambda t: ["data", "check", data_file(t, "deep.json", ["[", *[json.dumps(r) + "," for r in LABELLED],
                                                                DEEP, "]"]), "--no-tokens", "--out", "c"],
         code=0, extra=lambda t: (rejects_are("c/rejects.jsonl", [(26, NESTED)])(t), report_rows(25, 24, 1)(t))),
    # Parquet timestamp, date, decimal and binary columns: exact in Parquet, ISO text in JSONL
    Case("data-clean-parquet-timestamps", lambda t: ["data", "clean", typed_parquet(t), "--out", "clean.parquet"],
         code=0, extra=lambda t: parquet_round_trip(t, ["clean.parquet"])),
    Case("data-clean-parquet-timestamps-to-jsonl", lambda t: ["data", "clean", typed_parquet(t), "--out",
                                                              "clean.jsonl"], code=0, extra=parquet_as_iso_jsonl),
    Case("data-split-parquet-timestamps", lambda t: ["data", "split", typed_parquet(t), "--out", "parts"], code=0,
         extra=lambda t: parquet_round_trip(t, ["parts/train.parquet", "parts/validation.parquet",
                                                "parts/test.parquet"])),
    # a file that is not UTF-8: the file, line, column and byte offset, and how to re-encode it
    Case("data-check-not-utf8-jsonl", lambda t: ["data", "check", labelled_jsonl(
        t, "latin.jsonl", 3, b'{"text": "caf\xe9", "label": "pos"}'), "--no-tokens"],
         ("latin.jsonl: line 3, column 14 is not UTF-8 (byte 0xe9 at byte offset 121 of the file)", *NOT_UTF8)),
    Case("data-clean-not-utf8-csv", lambda t: ["data", "clean", labelled_csv(t, "latin.csv", 4, b"caf\xe9"),
                                               "--out", "x.jsonl"],
         ("latin.csv: line 4, column 4 is not UTF-8", *NOT_UTF8)),
    Case("data-split-not-utf8-csv", lambda t: ["data", "split", labelled_csv(t, "latin.csv", 4, b"caf\xe9"),
                                               "--out", "x"], ("latin.csv: line 4, column 4 is not UTF-8",)),
    Case("data-review-not-utf8", lambda t: ["data", "review", review_file(t, b'{"text": "caf\xe9"}'),
                                            "--accept-passing"],
         ("review.jsonl: line 2, column 14 is not UTF-8", *NOT_UTF8)),
    Case("data-preview-not-utf8", on_recipe("data preview", lambda t: labelled_jsonl(
        t, "latin.jsonl", 3, b'{"text": "caf\xe9", "label": "pos"}')), ("latin.jsonl: line 3, column 14",)),
    Case("data-check-utf16-csv", lambda t: ((t / "u16.csv").write_bytes("text,label\nhi there,pos\n".encode("utf-16")),
                                            ["data", "check", "u16.csv", "--no-tokens"])[1],
         ("u16.csv: is UTF-16 text", "iconv -f utf-16 -t utf-8")),
    Case("data-review-nested-100000", lambda t: ["data", "review", review_file(t, DEEP), "--accept-passing"],
         ("review.jsonl:2: " + NESTED,)),
    # files with no rows, or not the shape of rows
    Case("data-check-empty-file", lambda t: ["data", "check", data_file(t, "empty.jsonl", []), "--no-tokens"],
         ("empty.jsonl: no rows (the file is empty)",)),
    Case("data-split-header-only-csv", lambda t: ["data", "split", data_file(t, "head.csv", ["text,label"]),
                                                  "--out", "x"], ("head.csv: only a header (line 1), no rows",)),
    Case("data-check-csv-column-twice", lambda t: ["data", "check", data_file(t, "twice.csv", ["text,text", "a,b"]),
                                                   "--no-tokens"], ("twice.csv: line 1 (the header)", "'text' twice")),
    Case("data-check-json-one-object", lambda t: ["data", "check", data_file(
        t, "one.json", ["{", f'  "rows": {json.dumps(LABELLED)}', "}"]), "--no-tokens"],
         ("one.json: one JSON object over several lines", "the list under 'rows'")),
    Case("data-check-json-array", lambda t: ["data", "check", data_file(t, "rows.json", [json.dumps(LABELLED)]),
                                             "--no-tokens", "--out", "c"], code=0, extra=report_rows(24, 24, 0)),
    Case("data-check-csv-byte-order-mark", lambda t: ["data", "check", data_file(
        t, "bom.csv", [b"\xef\xbb\xbftext,label", *[f"{r['text']},{r['label']}" for r in LABELLED]]),
        "--no-tokens", "--out", "c"], code=0, extra=report_rows(24, 24, 0)),
    Case("data-check-folder-not-datasets", lambda t: ["data", "check", str(made(t, folders=("plain",)) / "plain"),
                                                      "--no-tokens"], ("plain: a folder, but not one saved by",)),
    Case("data-check-damaged-datasets-folder", lambda t: ((t / "ds").mkdir(), (t / "ds" / "state.json").write_text(
        "{broken"), ["data", "check", "ds", "--no-tokens"])[2], ("ds: not a readable saved `datasets` folder",)),
    # data check stops where train stops: 4 malformed rows in 24 (the reject share), listed with their lines
    Case("data-check-4-malformed-of-24", lambda t: ["data", "check", data_file(
        t, "bad.jsonl", [json.dumps(r) for r in LABELLED[:20]] + MALFORMED_4_OF_24), "--no-tokens", "--out", "c"],
         code=1, extra=rejects_are("c/rejects.jsonl", [
             (21, "malformed JSON: Unterminated string starting at column 10"),
             (22, "malformed JSON: Expecting value at column 1"),
             (23, "wrong type: field 'text' must be text, got int"), (24, "not a JSON object: got list")])),
]


# ----------------------------------------------------------------------------------------------- run folders

def damaged_run(tmp: Path, manifest: str) -> Path:
    """A folder that looks like a run whose manifest.json holds `manifest`."""
    run = tmp / "run"
    run.mkdir()
    (run / "manifest.json").write_text(manifest)
    return run


RUN_CASES: list[Case] = [
    Case("eval-not-a-run", lambda t: (t.joinpath("notrun").mkdir(), ["eval", str(t / "notrun")])[1],
         ("notrun", "manifest.json")),
    Case("train-overwrite-the-recipes-folder",
         lambda t: ["train", str(recipe(t, "data:\n  train: train.jsonl\noutput:\n  dir: .\n  overwrite: true\n"))],
         ("output.dir", "would be, contain or lie inside")),
    Case("train-overwrite-a-folder-not-ours",
         lambda t: (t.joinpath("mine").mkdir(), t.joinpath("mine", "notes.txt").write_text("x"),
                    ["train", str(recipe(t, "data:\n  train: train.jsonl\noutput:\n  dir: mine\n  overwrite: true\n"))])[2],
         ("mine", "not a tunesmith run folder")),
    Case("train-output-dir-is-a-file",
         lambda t: (t.joinpath("out").write_text("x"),
                    ["train", str(recipe(t, "data:\n  train: train.jsonl\noutput:\n  dir: out\n"))])[1],
         ("output.dir", "is a file")),
    Case("train-max-seq-len-leaves-nothing-to-train",
         lambda t: ["train", str(recipe(t, "data:\n  train: train.jsonl\ntrain:\n  max_seq_len: 9\n"))],
         ("train.jsonl", "24 of 24 rows rejected", "no trained tokens left")),
    Case("eval-manifest-cut-short", lambda t: ["eval", str(damaged_run(t, '{"tunesmith_run": 1, "meth'))],
         ("manifest.json", "damaged")),
    Case("predict-manifest-not-ours", lambda t: ["predict", str(damaged_run(t, "[1, 2]")), "hello"],
         ("manifest.json", "not a tunesmith manifest")),
]


# ----------------------------------------------------------------------------------------------- distributed

DISTRIBUTED_CASES: list[Case] = [
    recipe_case("distributed-strategy-typo", "distributed:\n  strategy: dpp\n", "`distributed.strategy`",
                "did you mean 'ddp'"),
    recipe_case("distributed-none-on-2", "distributed:\n  strategy: none\n  nproc: 2\n",
                "`distributed.strategy`: none runs one process, but nproc x nnodes = 2"),
    recipe_case("distributed-nproc-0", "distributed:\n  nproc: 0\n", "`distributed.nproc`", ">= 1"),
    recipe_case("distributed-nnodes-text", "distributed:\n  nnodes: two\n", "`distributed.nnodes`",
                "not a whole number"),
    recipe_case("distributed-zero-stage-1", "distributed:\n  strategy: deepspeed\n  zero_stage: 1\n",
                "`distributed.zero_stage`"),
    recipe_case("distributed-timeout-1s", "distributed:\n  timeout_s: 1\n", "`distributed.timeout_s`", ">= 10"),
    recipe_case("distributed-offload-with-ddp", "distributed:\n  nproc: 2\n  offload: optimizer\n",
                "`distributed.offload`: optimizer needs strategy deepspeed or fsdp"),
    recipe_case("distributed-offload-parameters-zero2",
                "distributed:\n  strategy: deepspeed\n  offload: parameters\n",
                "`distributed.offload`: parameters needs ZeRO stage 3"),
    recipe_case("distributed-fsdp-offload-optimizer", "distributed:\n  strategy: fsdp\n  offload: optimizer\n",
                "fsdp offloads parameters with their optimizer states"),
    recipe_case("distributed-fsdp-unknown-key", "distributed:\n  strategy: fsdp\n  fsdp:\n    reshard: true\n",
                "`distributed.fsdp.reshard`"),
    recipe_case("distributed-method-without-strategies", "method: fewshot\ndistributed:\n  nproc: 2\n",
                "`distributed.strategy`: ddp can't train `method: fewshot`"),
    recipe_case("distributed-qlora-deepspeed", "method:\n  name: sft\n  adapter: qlora\n"
                "distributed:\n  strategy: deepspeed\n", "can't shard qlora's 4-bit weights"),
    recipe_case("distributed-keep-best-zero3", "train:\n  eval_every: 2\n  keep_best: true\n"
                "distributed:\n  strategy: deepspeed\n  zero_stage: 3\n", "`train.keep_best`",
                "each rank holds only its shard"),
    # what this machine (no GPU) can't run: refused before anything loads, by validate and by train
    recipe_case("distributed-fsdp-on-cpu", "distributed:\n  strategy: fsdp\n  nproc: 2\n",
                "fsdp needs GPUs", "would silently run DDP instead"),
    recipe_case("distributed-fsdp-on-cpu-train", "distributed:\n  strategy: fsdp\n  nproc: 2\n",
                "fsdp needs GPUs", command="train"),
    recipe_case("distributed-deepspeed-offload-on-cpu",
                "distributed:\n  strategy: deepspeed\n  zero_stage: 3\n  offload: parameters\n",
                "`distributed.offload`: parameters on a CPU-only machine moves nothing", command="train"),
    Case("train-nproc-0", lambda t: ["train", str(recipe(t, "data:\n  train: train.jsonl\n")), "--nproc", "0"],
         ("--nproc", "a whole number ≥ 1")),
    recipe_case("train-nnodes-2", "distributed:\n  nnodes: 2\n", "distributed.nnodes = 2: `train` starts "
                "processes on this machine only", "tunesmith launch RECIPE --print", command="train"),
    Case("launch-node-rank-too-big", lambda t: ["launch", str(recipe(t, "data:\n  train: train.jsonl\n")),
                                                "--nnodes", "2", "--node-rank", "2", "--master", "h:1"],
         ("--node-rank 2: there are 2 machine(s), numbered 0 to 1",)),
    Case("launch-master-port-bad", lambda t: ["launch", str(recipe(t, "data:\n  train: train.jsonl\n")),
                                              "--nnodes", "2", "--master", "node0:99999"],
         ("--master 'node0:99999': not HOST or HOST:PORT",)),
    Case("launch-print-master-no-host", lambda t: ["launch", str(recipe(t, "data:\n  train: train.jsonl\n")),
                                                   "--print", "--nnodes", "2", "--master", ":29500"],
         ("--master ':29500': not HOST or HOST:PORT",)),
    Case("launch-without-master", lambda t: ["launch", str(recipe(t, "data:\n  train: train.jsonl\n")),
                                             "--nnodes", "2"],
         ("--master: a run over several machines needs node 0's address",)),
    Case("launch-nnodes-0", lambda t: ["launch", str(recipe(t, "data:\n  train: train.jsonl\n")), "--print",
                                       "--nnodes", "0"], ("--nnodes", "a whole number ≥ 1")),
]

# ----------------------------------------------------------------------------------------------- tune

TUNE_RECIPE = "data:\n  train: train.jsonl\nmethod:\n  name: sft\n  adapter: lora\n"


def tune_case(id: str, space: str, *expect: str, flags: tuple = (), recipe_text: str = TUNE_RECIPE) -> Case:
    """`tunesmith tune r.yaml --space s.yaml --trials 2 FLAGS` with the space file `space`; stderr holds `expect`."""

    def build(t: Path) -> list[str]:
        (t / "s.yaml").write_text(space, encoding="utf-8")
        return ["tune", str(recipe(t, recipe_text)), "--space", str(t / "s.yaml"), "--trials", "2", *flags]

    return Case(id, build, expect, extra=lambda t: _no_tune_folder(t))


def _no_tune_folder(tmp: Path) -> None:
    assert not list(tmp.glob("runs/*-tune")), "a refused search left a study folder"


LR = "train.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}\n"
TUNE_CASES: list[Case] = [
    tune_case("tune-space-unknown-key", "train.learning_rte: {log_uniform: [1.0e-5, 1.0e-3]}\n",
              "`train.learning_rte`", "did you mean `train.learning_rate`"),
    tune_case("tune-space-impossible-range", "train.learning_rate: {uniform: [0.1, 0.01]}\n",
              "`train.learning_rate`: uniform [0.1, 0.01] is an impossible range"),
    tune_case("tune-space-log-through-zero", "train.weight_decay: {log_uniform: [0.0, 0.1]}\n",
              "`train.weight_decay`: log_uniform [0.0, 0.1] needs low > 0"),
    tune_case("tune-space-int-fractions", "train.batch_size: {int: [1.5, 8]}\n", "needs whole numbers"),
    tune_case("tune-space-out-of-recipe-range", "train.warmup_ratio: {uniform: [0.0, 1.5]}\n",
              "`train.warmup_ratio` = 1.5", "`train.warmup_ratio`"),
    tune_case("tune-space-unread-adapter-key", "method.prefix.num_virtual_tokens: [10, 20]\n",
              "`method.prefix.num_virtual_tokens`: not read", "the recipe's adapter is lora"),
    tune_case("tune-space-epochs-beside-max-steps", "train.epochs: {int: [1, 3]}\n",
              "`train.epochs`: not read — train.max_steps is set",
              recipe_text=TUNE_RECIPE + "train:\n  max_steps: 4\n"),
    tune_case("tune-space-key-of-another-method", "method.shots: [2, 4]\n", "`method.shots`"),
    tune_case("tune-space-not-searchable", "train.seed: [1, 2]\n", "`train.seed`: not searchable"),
    tune_case("tune-space-bad-condition", LR + "method.lora.r: {choice: [4, 8], when: {method.adapter: [dora]}}\n",
              "`method.lora.r`: its condition names `method.adapter`, which is not a key of this space"),
    tune_case("tune-space-not-a-range", "train.learning_rate: 0.001\n", "`train.learning_rate`: 0.001 is not a "
              "search range"),
    tune_case("tune-space-every-problem", "train.learning_rte: {log_uniform: [1.0e-5, 1.0e-3]}\n"
              "train.weight_decay: {uniform: [0.2, 0.1]}\nmethod.prefix.num_virtual_tokens: [10, 20]\n",
              "3 problems", "`train.learning_rte`", "impossible range", "`method.prefix.num_virtual_tokens`: not read"),
    tune_case("tune-space-empty", "", "the space must be a mapping"),
    tune_case("tune-space-bad-yaml", "train.learning_rate: [1, 2\n", "s.yaml", "not valid YAML"),
    Case("tune-space-missing", lambda t: ["tune", str(recipe(t, TUNE_RECIPE)), "--space", "nope.yaml",
                                          "--trials", "2"], ("space file not found: nope.yaml",)),
    tune_case("tune-grid-of-a-range", LR, "--sampler grid needs a list of values", flags=("--sampler", "grid")),
    tune_case("tune-trials-0", LR, "--trials", "a whole number ≥ 1", flags=("--trials", "0")),
    tune_case("tune-timeout-words", LR, "--timeout", "'soon' is not a time", flags=("--timeout", "soon")),
    tune_case("tune-timeout-0", LR, "--timeout", "'0s' is not a time > 0", flags=("--timeout", "0s")),
    tune_case("tune-metric-unknown", LR, "--metric", "invalid choice: 'accuracy'", flags=("--metric", "accuracy")),
    tune_case("tune-metric-accuracy-for-sft", LR, "--metric validation.accuracy: method sft measures no accuracy",
              flags=("--metric", "validation.accuracy")),
    tune_case("tune-direction-unknown", LR, "--direction", "invalid choice: 'up'", flags=("--direction", "up")),
    tune_case("tune-direction-picks-worst", LR, "--direction max with --metric validation.loss: that would pick "
              "the worst trial", flags=("--direction", "max")),
    tune_case("tune-storage-not-a-url", LR, "--storage 'study.db': give a database URL",
              flags=("--storage", "study.db")),
    tune_case("tune-seeds-0", LR, "--seeds", "a whole number ≥ 1", flags=("--seeds", "0")),
    tune_case("tune-enqueue-unknown-key", LR, "--enqueue 'train.epochs=2': 'train.epochs' is not a key of the space",
              flags=("--enqueue", "train.epochs=2")),
    tune_case("tune-no-validation-rows", LR, "`data.validation_fraction`: 0 leaves no rows",
              recipe_text=TUNE_RECIPE.replace("data:\n  train: train.jsonl\n",
                                              "data:\n  train: train.jsonl\n  validation_fraction: 0\n")),
]


ALL = RECIPE_CASES + CLI_CASES + DATA_CASES + RUN_CASES + DISTRIBUTED_CASES + TUNE_CASES


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_case(case, tmp_path, capsys)


def test_case_ids_are_unique():
    ids = [c.id for c in ALL]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
