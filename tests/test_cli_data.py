"""`tunesmith data check | clean | split | balance | synth | review | augment` on the command line, and the gate
`tunesmith train` runs first."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import write_jsonl
from test_check import CLEAN, EVAL, LABELS, planted_rows
from test_synth import FakeOpenAI
from tunesmith.cli import main
from tunesmith.data.records import load_records


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", planted_rows()), write_jsonl(tmp_path / "eval.jsonl", EVAL)


def test_data_check_writes_both_reports_and_exits_1_on_leakage(files, tmp_path, capsys):
    train, evaluation = files
    out = tmp_path / "report"
    assert main(["data", "check", str(train), "--against", str(evaluation), "--out", str(out), "--no-tokens"]) == 1
    printed = capsys.readouterr().out
    assert "leakage: 2 training rows match 2 of 3 evaluation rows (1 exact pairs, 1 near)" in printed
    assert "duplicates (near = Jaccard ≥ 0.8): 2 exact rows in 2 groups, 1 near rows in 1 clusters" in printed
    assert "personal data: email 1 rows, phone 1 rows, card 1 rows, iban 1 rows, ip 1 rows, secret 1 rows" in printed
    assert "verdict: ✗ `tunesmith train` would stop at 2 gate(s):\n  ✗ data.max_reject_fraction: " in printed
    assert "  ✗ data.check: the data check found problems that stop training:" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["leakage"]["pairs"] == 2 and report["duplicates"]["duplicate_rows"] == 3
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page.split("<pre>")[0]
    assert "Train/evaluation leakage" in page and DISCLAIMER_SNIPPET in page


DISCLAIMER_SNIPPET = "This review first appeared in our weekly community film newsletter."


def test_data_check_passes_clean_data_with_exit_0(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)])
    assert main(["data", "check", str(path), "--out", str(tmp_path / "r"), "--no-tokens"]) == 0
    assert "verdict: ✓ `tunesmith train` would pass its data gates" in capsys.readouterr().out


def test_data_check_with_column_mapping_and_bad_flags(tmp_path, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", [{"document": f"Document number {i} is about {w}.", "summary": w}
                                              for i, w in enumerate(["cats", "dogs", "owls"])])
    assert main(["data", "check", str(path), "--column", "instruction=document", "--column", "output=summary",
                 "--out", str(tmp_path / "r"), "--no-tokens"]) == 0
    assert "record type: instruction · 3 rows read, 3 used, 0 rejected" in capsys.readouterr().out
    assert main(["data", "check", str(path), "--column", "instruction", "--no-tokens"]) == 2
    assert "--column 'instruction': write it as FIELD=COLUMN" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "absent.jsonl"), "--no-tokens"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_data_clean_cli_writes_cleaned_rejects_and_summary(files, tmp_path, capsys):
    train, evaluation = files
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(train), "--out", str(out), "--against", str(evaluation), "--strip-markup",
                 "--pii", "redact", "--min-words", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{train}: 38 rows read, 29 kept, 9 removed" in printed
    assert "removed — duplicate: 2" in printed and "removed — leakage: 2" in printed
    assert "fixed — redact pii: 6 rows" in printed
    rejects = [json.loads(x) for x in (tmp_path / "clean.rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [3, 5, 8, 21, 22, 23, 33, 34, 35]
    assert main(["data", "clean", str(train), "--out", str(train)]) == 2
    err = capsys.readouterr().err
    assert f"--out {train}: the output would be (or contain, or lie inside) the input {train}" in err


def test_data_split_cli_writes_stratified_files(tmp_path, capsys):
    from test_check import _split_rows

    path = write_jsonl(tmp_path / "t.jsonl", _split_rows({"a": 30, "b": 10}))
    assert main(["data", "split", str(path), "--out", str(tmp_path / "parts"), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "train: 32 rows (a 24, b 8)" in printed and "validation: 4 rows (a 3, b 1)" in printed
    test_rows = load_records(tmp_path / "parts" / "test.jsonl").records
    assert Counter(r.data["label"] for r in test_rows) == Counter(a=3, b=1)
    assert main(["data", "split", str(path), "--out", str(tmp_path / "p2"), "--fractions", "0.5,0.6"]) == 2
    assert "need one distinct name per fraction" in capsys.readouterr().err


def test_data_balance_cli_weights_then_training_reads_them(tmp_path, capsys):
    from test_check import _split_rows

    path = write_jsonl(tmp_path / "t.jsonl", _split_rows({"a": 6, "b": 2}))
    assert main(["data", "balance", str(path)]) == 0
    assert "8 rows, 2 labels, imbalance 3.0:1" in capsys.readouterr().out
    weights = tmp_path / "w.json"
    assert main(["data", "balance", str(path), "--strategy", "weights", "--out", str(weights)]) == 0
    assert json.loads(weights.read_text())["weights"] == {"a": round(8 / 12, 6), "b": 2.0}
    assert main(["data", "balance", str(path), "--strategy", "up", "--out", str(tmp_path / "up.jsonl")]) == 0
    assert "wrote 12 rows" in capsys.readouterr().out
    up = load_records(tmp_path / "up.jsonl").records
    assert Counter(r.data["label"] for r in up) == Counter(a=6, b=6)
    assert sum(1 for r in up if r.marker() == "upsampled") == 4
    assert main(["data", "balance", str(path), "--strategy", "down"]) == 2


def test_synth_review_export_and_only_accepted_rows_train(tmp_path, capsys, monkeypatch):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
        {"instruction": "Name a planet.", "input": "", "output": "Mars is a planet in our solar system."}])
    server = FakeOpenAI()
    try:
        server.script = [
            json.dumps({"instruction": "Name an ocean.", "input": "", "output": "The Pacific is the largest ocean."}),
            json.dumps({"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."}),
            "not json at all",
            json.dumps({"instruction": "Name a metal.", "input": "", "output": "Copper is a metal that conducts."}),
        ]
        review = tmp_path / "review.jsonl"
        code = main(["data", "synth", "--seeds", str(seeds), "-n", "2", "--out", str(review), "--teacher-url",
                     server.base_url, "--teacher-model", "fake-teacher", "--max-attempts", "4"])
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert code == 0
    printed = capsys.readouterr().out
    assert "4 replies, 2 passed every check, 2 failed one" in printed
    # before review nothing trains: every row of the review file is rejected by the loader
    loaded = load_records(review)
    assert loaded.records == [] and Counter(r["reason"] for r in loaded.rejects) == Counter(
        {"not accepted in review: pending": 2, "not accepted in review: rejected": 2})
    answers = iter(["a", "r", "q"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    monkeypatch.delenv("EDITOR", raising=False)
    assert main(["data", "review", str(review)]) == 0
    loaded = load_records(review)
    assert [r.data["instruction"] for r in loaded.records] == ["Name an ocean."]
    assert loaded.records[0].marker() == "synthetic"
    assert main(["data", "review", str(review), "--export", str(tmp_path / "accepted.jsonl")]) == 0
    exported = [json.loads(x) for x in (tmp_path / "accepted.jsonl").read_text().splitlines()]
    assert exported == [{"instruction": "Name an ocean.", "input": "", "output": "The Pacific is the largest ocean.",
                         "synthetic": True}]


def test_augment_noise_cli_marks_every_variant(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t, "label": lab} for t, lab in zip(CLEAN[:5], LABELS[:5])])
    out = tmp_path / "aug.jsonl"
    assert main(["data", "augment", str(path), "--copies", "2", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 10 and all(r["augmented"]["how"] == "noise" for r in rows)
    assert [r["label"] for r in rows] == [lab for lab in LABELS[:5] for _ in range(2)]
    assert all(r["text"] not in CLEAN for r in rows)
    assert main(["data", "augment", str(path), "--how", "paraphrase", "--teacher-url", "http://127.0.0.1:9/v1",
                 "--out", str(out)]) == 2
    assert "--teacher-url needs --teacher-model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- outputs


def test_staged_files_land_whole_or_not_at_all(tmp_path):
    from tunesmith.artifacts import staged_files
    from tunesmith.errors import TunesmithError

    folder = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_files(folder) as stage:
            (stage / "a.jsonl").write_text("1\n")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []  # no folder, no staging left
    with staged_files(folder) as stage:
        (stage / "a.jsonl").write_text("1\n")
    assert [p.name for p in folder.iterdir()] == ["a.jsonl"]
    (folder / "mine.txt").write_text("keep")
    with staged_files(folder) as stage:
        (stage / "a.jsonl").write_text("2\n")
        (stage / "b.jsonl").write_text("3\n")
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"a.jsonl": "2\n", "b.jsonl": "3\n",
                                                                  "mine.txt": "keep"}
    with pytest.raises(TunesmithError, match=f"{folder / 'mine.txt'}: writing it would replace the input "):
        with staged_files(folder, protect=[folder / "mine.txt"]) as stage:
            (stage / "a.jsonl").write_text("4\n")
            (stage / "mine.txt").write_text("lost")
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"a.jsonl": "2\n", "b.jsonl": "3\n",
                                                                  "mine.txt": "keep"}


def test_a_write_that_fails_leaves_no_output_and_no_temporary(tmp_path, monkeypatch, capsys):
    import tunesmith.data.check as check

    path = write_jsonl(tmp_path / "ok.jsonl", [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)])

    def half_written(report, folder, stem="report"):
        (folder / f"{stem}.json").write_text("{half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(check, "write_report", half_written)
    out = tmp_path / "reports"
    with pytest.raises(OSError):
        main(["data", "check", str(path), "--out", str(out), "--no-tokens"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.jsonl"]  # no folder, no staging, no .tmp
    out.mkdir()
    (out / "report.json").write_text("earlier\n")
    with pytest.raises(OSError):
        main(["data", "check", str(path), "--out", str(out), "--no-tokens"])
    assert [p.name for p in out.iterdir()] == ["report.json"] and (out / "report.json").read_text() == "earlier\n"


def test_data_check_adds_its_report_to_an_existing_folder(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)])
    out = tmp_path / "reports"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert main(["data", "check", str(path), "--out", str(out), "--no-tokens"]) == 0
    assert f"wrote {out / 'report.json'}" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert {"notes.md", "report.html", "report.json"} <= set(names) and not [n for n in names if n.startswith(".")]
    assert (out / "notes.md").read_text() == "mine"
    assert json.loads((out / "report.json").read_text())["rows"]["used"] == len(CLEAN)


def test_balance_out_goes_with_a_strategy_that_writes(tmp_path, capsys):
    from test_check import _split_rows

    path = write_jsonl(tmp_path / "t.jsonl", _split_rows({"a": 6, "b": 2}))
    assert main(["data", "balance", str(path), "--out", str(tmp_path / "w.json")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (f"error: --out {tmp_path / 'w.json'}: --strategy report "
                                                       "writes nothing")
    assert main(["data", "balance", str(path), "--strategy", "down"]) == 2
    assert "error: --strategy down writes a file: give --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


# ----------------------------------------------------------------------------------------------- the gate


def _recipe(tmp_path, tiny_model_dir, extra: str = "") -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name: {tiny_model_dir}}}\ndata:\n  train: train.jsonl\n  validation: eval.jsonl\n"
                    f"{extra}train: {{max_steps: 1, batch_size: 4, max_seq_len: 64}}\neval: {{loss_before: false}}\n"
                    f"output: {{dir: {tmp_path / 'run'}}}\n")
    return str(path)


def test_train_stops_on_leakage_unless_the_recipe_allows_it(tmp_path, tiny_model_dir, capsys):
    rows = [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", [rows[3], {"text": "An unrelated but pleasant evening out.", "label": "pos"}])
    assert main(["train", _recipe(tmp_path, tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "the data check found problems that stop training:" in err
    assert "1 training rows also appear in the evaluation data (1 exact, 0 near" in err
    assert "data.check.leakage=warn" in err
    report = json.loads((tmp_path / "run.failed" / "data_check.json").read_text())  # kept to read, out of the way
    assert report["leakage"]["examples"][0]["train"]["line"] == 4
    assert not (tmp_path / "run").exists()
    assert main(["train", _recipe(tmp_path, tiny_model_dir), "data.check.leakage=warn"]) == 0
    out = capsys.readouterr().out
    assert "data check: 0 duplicate training rows (0.0%, limit 5.0%); 1 rows leak into the validation file" in out
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_train_stops_on_duplicates_above_the_limit(tmp_path, tiny_model_dir, capsys):
    rows = [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)]
    write_jsonl(tmp_path / "train.jsonl", rows + rows[:2])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "An unrelated but pleasant evening out.", "label": "pos"}])
    assert main(["train", _recipe(tmp_path, tiny_model_dir)]) == 2
    assert "2 duplicate rows (9.1%; limit 5.0%)" in capsys.readouterr().err
    assert main(["train", _recipe(tmp_path, tiny_model_dir, "  check: {max_duplicate_fraction: 0.1}\n"),
                 "output.overwrite=true"]) == 0


def test_class_weights_reach_the_training_loss(tmp_path, tiny_model_dir):
    from test_check import _split_rows

    rows = _split_rows({"a": 6, "b": 2})
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", _split_rows({"a": 1, "b": 1}, seed=9))
    losses = {}
    for weights in ("null", "auto"):
        run = tmp_path / f"run-{weights}"
        assert main(["train", _recipe(tmp_path, tiny_model_dir), f"data.class_weights={weights}",
                     f"output.dir={run}", "train.batch_size=8", "train.max_seq_len=256"]) == 0
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        losses[weights] = first["loss"]
    assert losses["auto"] != pytest.approx(losses["null"], rel=1e-3)


def test_bad_threshold_flag_is_reported_with_its_range(files, capsys):
    train, _ = files
    assert main(["data", "check", str(train), "--threshold", "1.5", "--no-tokens"]) == 2
    assert "--threshold 1.5: must be between 0.5 and 1.0" in capsys.readouterr().err
