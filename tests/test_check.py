"""The data quality gate: check finds exactly the planted problems, clean fixes exactly those rows, split and
balance are deterministic, stratified and leak-free, and training stops on leakage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunesmith.data.check import CheckOptions, check_data, load_files
from tunesmith.data.clean import CleanOptions, clean_file, write_clean
from tunesmith.data.records import load_records, record_text

# Twenty distinct reviews; rows below are planted against them.
CLEAN = [
    "The soundtrack carries every scene with a warmth the script never quite earns on its own.",
    "A slow first hour gives way to a finale that had the whole audience holding its breath.",
    "Wooden dialogue and a plot full of holes make this a chore to sit through.",
    "Her performance as the exhausted night-shift nurse is the best thing in the film.",
    "I laughed twice in ninety minutes, and one of those was at the wrong moment.",
    "Gorgeous mountain photography cannot hide how little happens in the story.",
    "The director trusts children in the audience to follow a genuinely complicated mystery.",
    "Every twist was telegraphed twenty minutes ahead, which drains any tension from it.",
    "An affectionate portrait of a small-town bakery and the family that keeps it open.",
    "The editing is so frantic that the fight scenes become impossible to follow.",
    "Quiet, patient and deeply moving, this documentary stayed with me for days.",
    "Two charming leads are wasted on a romance with no reason to exist.",
    "The villain gets the sharpest lines and steals every scene he walks into.",
    "It runs forty minutes too long and repeats its single joke until it is dust.",
    "A clever heist plot with a cast that clearly had fun making it together.",
    "The sequel forgets everything that made the original feel fresh and surprising.",
    "Stunning costumes, a lush score, and a story that earns its emotional ending.",
    "Nobody in this movie behaves like a human being under any circumstances at all.",
    "A bold, strange science-fiction puzzle that rewards a second viewing at home.",
    "The cheap green-screen effects pull you out of the adventure again and again.",
]
LABELS = ["pos", "pos", "neg", "pos", "neg", "neg", "pos", "neg", "pos", "neg",
          "pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg"]
DISCLAIMER = "This review first appeared in our weekly community film newsletter."


def planted_rows() -> list:
    """20 clean rows + one row per problem kind; line numbers are the list index + 1."""
    rows = [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)]
    rows += [
        {"text": "  the SOUNDTRACK carries every scene with a warmth the script never quite earns on its own. ",
         "label": "pos"},                                                                       # 21 exact dup of 1
        {"text": "A slow first hour gives way to a finale that had the entire audience holding its breath.",
         "label": "pos"},                                                                       # 22 near dup of 2
        {"text": CLEAN[2], "label": "pos"},                                                     # 23 conflict with 3
        {"text": "The caf\u00c3\u00a9 scenes are charming and the lead\u00e2\u20ac\u2122s timing is perfect.",
         "label": "pos"},                                                                       # 24 mojibake
        {"text": "<p>A tense courtroom drama with <b>real</b> stakes &amp; real people.</p>", "label": "pos"},  # 25
        {"text": "The final reel\u0007 drags badly and the ending\u200b feels unfinished.", "label": "neg"},  # 26
        {"text": "Loved it, write to me at jane.doe@example.com for the full list.", "label": "pos"},       # 27
        {"text": "Terrible sound mix; call the cinema on +44 20 7946 0958 to complain.", "label": "neg"},   # 28
        {"text": "I paid with card 4111 1111 1111 1111 and the film was not worth it.", "label": "neg"},   # 29
        {"text": "Refunds go to GB82 WEST 1234 5698 7654 32 according to the studio.", "label": "neg"},   # 30
        {"text": "The stream kept buffering from server 192.168.10.45 all evening long.", "label": "neg"},  # 31
        {"text": "Posting my key AKIAIOSFODNN7EXAMPLE here by mistake, great movie though.", "label": "pos"},  # 32
        {"text": "   ", "label": "pos"},                                                        # 33 empty
        '{"text": "broken json", "label": ',                                                    # 34 malformed
        {"text": "Meh.", "label": "neg"},                                                       # 35 too short
        {"text": f"A warm family comedy about a dog who runs a bakery. {DISCLAIMER}", "label": "pos"},   # 36
        {"text": f"An icy thriller set aboard a research station at the pole. {DISCLAIMER}", "label": "pos"},  # 37
        {"text": f"A sprawling war epic that never finds its centre of gravity. {DISCLAIMER}", "label": "neg"},  # 38
    ]
    return rows


EVAL = [
    {"text": CLEAN[4], "label": "neg"},                                                          # leaks row 5 exactly
    {"text": "Every twist was telegraphed twenty minutes ahead, which drains all tension from it.",
     "label": "neg"},                                                                           # leaks row 8 nearly
    {"text": "A perfectly pleasant film that I will have forgotten by next Tuesday afternoon.", "label": "neg"},
]


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "train.jsonl", planted_rows()), write_jsonl(tmp_path / "eval.jsonl", EVAL)


def test_check_finds_exactly_the_planted_problems(planted, tokenizer):
    train, evaluation = planted
    lengths = sorted(len(tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}], tokenize=False),
        add_special_tokens=False)["input_ids"]) for r in planted_rows() if not isinstance(r, str) and r["text"].strip())
    max_len = lengths[len(lengths) // 2]
    report = check_data(load_files([train]), load_files([evaluation]),
                        CheckOptions(tokenizer=tokenizer, max_len=max_len))
    rows = report["rows"]
    assert (rows["read"], rows["used"], rows["rejected"]) == (38, 36, 2)
    assert rows["reasons"] == {"empty field": 1, "malformed JSON": 1}
    dup = report["duplicates"]
    # row 21 repeats row 1; row 23 repeats row 3's text (with another label); row 22 nearly repeats row 2
    assert (dup["exact_groups"], dup["exact_rows"], dup["near_clusters"], dup["near_rows"]) == (2, 2, 1, 1)
    lines = sorted([r["line"] for r in c["rows"]] for c in dup["clusters"])
    assert lines == [[1, 21], [2, 22], [3, 23]]
    assert dup["duplicate_fraction"] == round(3 / 36, 4)
    leak = report["leakage"]
    assert (leak["pairs"], leak["exact_pairs"], leak["train_rows"], leak["eval_rows"]) == (2, 1, 2, 2)
    assert sorted((m["train"]["line"], m["eval"]["line"], m["exact"]) for m in leak["examples"]) == [
        (5, 1, True), (8, 2, False)]
    length = report["length"]
    assert (length["empty_rows"], length["too_short"]) == (1, 1)
    assert length["short_examples"][0]["line"] == 35
    assert (length["tokens"]["n"], length["tokens"]["min"], length["tokens"]["max"]) == (36, lengths[0], lengths[-1])
    assert length["too_long"] == sum(1 for n in lengths if n > max_len) > 0
    assert sum(b["rows"] for b in length["token_histogram"]) == 36
    labels = report["labels"]
    assert labels["counts"] == {"pos": 19, "neg": 17}
    assert labels["imbalance_ratio"] == round(19 / 17, 3)
    assert labels["conflicts"] == 1 and labels["conflict_rows"] == 2
    assert set(labels["conflict_examples"][0]["labels"]) == {"neg", "pos"}
    q = report["quality"]
    assert [(k, q[k]["rows"]) for k in ("mojibake", "markup", "control_chars")] == [
        ("mojibake", 1), ("markup", 1), ("control_chars", 1)]
    assert [e["line"] for e in q["mojibake"]["examples"]] == [24]
    assert [e["line"] for e in q["markup"]["examples"]] == [25]
    assert [e["line"] for e in q["control_chars"]["examples"]] == [26]
    assert q["boilerplate"] == [{"line": DISCLAIMER, "rows": 3}]
    pii = report["pii"]
    assert {k: (v["rows"], [e["line"] for e in v["examples"]]) for k, v in pii.items()} == {
        "email": (1, [27]), "phone": (1, [28]), "card": (1, [29]), "iban": (1, [30]), "ip": (1, [31]),
        "secret": (1, [32])}
    assert "jane.doe@example.com" not in json.dumps(report)  # examples are masked
    assert pii["card"]["examples"][0]["match"].endswith("1111")
    severities = Counter((p["check"], p["severity"]) for p in report["problems"])
    assert severities[("duplicates", "error")] == 1  # 8.3% is above the 5% default
    assert severities[("leakage", "error")] == 1


def test_check_length_distribution_is_exact_on_known_rows(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(["word"] * n) + f" {n}"} for n in (1, 3, 5, 7)])
    report = check_data(load_files([path]), options=CheckOptions(min_words=3))
    assert report["length"]["words"] == {"n": 4, "min": 2, "mean": 5.0, "p50": 6, "p90": 8, "p99": 8, "max": 8}
    assert report["length"]["too_short"] == 1
    assert "tokens" not in report["length"]


def test_check_excludes_marked_copies_from_duplicates(tmp_path):
    rows = [{"text": t, "label": lab} for t, lab in zip(CLEAN[:4], LABELS[:4])]
    rows.append({"text": CLEAN[0], "label": "pos", "upsampled": {"from": "x:1"}})
    report = check_data(load_files([write_jsonl(tmp_path / "t.jsonl", rows)]))
    assert report["duplicates"]["duplicate_rows"] == 0
    assert report["duplicates"]["marked_copies_skipped"] == 1


def test_clean_fixes_and_removes_exactly_the_planted_rows(planted, tmp_path):
    train, evaluation = planted
    options = CleanOptions(strip_markup=True, pii="redact", min_words=2)
    result = clean_file(train, options, against=[load_records(evaluation, "classification")])
    removed = {r["line"]: r["reason"].split(":")[0] for r in result.rejects}
    assert removed == {33: "empty field", 34: "malformed JSON", 3: "conflicting labels",
                       23: "conflicting labels", 21: "duplicate", 22: "duplicate", 5: "leakage", 8: "leakage",
                       35: "too short"}
    dup = next(r for r in result.rejects if r["line"] == 22)
    assert dup["duplicate_of"] == {"file": str(train), "line": 2}
    assert next(r for r in result.rejects if r["line"] == 5)["leaks_into"] == {"file": str(evaluation), "line": 1}
    kept = {i + 1: row for i, row in enumerate(planted_rows()) if not isinstance(row, str)}
    texts = [row["text"] for row in result.kept]
    assert len(texts) == 38 - 9
    assert "The café scenes are charming and the lead’s timing is perfect." in texts
    assert "A tense courtroom drama with real stakes & real people." in texts
    assert "The final reel drags badly and the ending feels unfinished." in texts
    assert "Loved it, write to me at [EMAIL] for the full list." in texts
    assert "I paid with card [CARD] and the film was not worth it." in texts
    assert "Terrible sound mix; call the cinema on [PHONE] to complain." in texts
    assert kept[9]["text"] in texts and kept[1]["text"] in texts  # untouched rows are kept verbatim
    # rows 21 (spaces at the ends), 25 (after its tags) and 33 (blank) had their whitespace normalised
    assert result.fixed == Counter({"fix_unicode": 1, "strip_markup": 1, "remove_control_chars": 1,
                                    "redact_pii": 6, "normalize_whitespace": 3})
    # nothing is lost: every input row is kept or has a reason
    assert len(result.kept) + len(result.rejects) == result.read == 38


def test_cleaning_a_cleaned_file_changes_nothing(planted, tmp_path):
    train, evaluation = planted
    options = CleanOptions(strip_markup=True, pii="redact", min_words=2)
    against = [load_records(evaluation, "classification")]
    paths = write_clean(clean_file(train, options, against=against), tmp_path / "clean.jsonl")
    again = clean_file(paths["cleaned"], options, against=against)
    assert again.rejects == [] and sum(again.fixed.values()) == 0
    assert again.kept == [json.loads(line) for line in paths["cleaned"].read_text().splitlines()]
    assert paths["rejects"].name == "clean.rejects.jsonl"
    summary = json.loads(paths["summary"].read_text())
    assert (summary["read"], summary["kept"], summary["removed"]) == (38, 29, 9)


def test_clean_majority_resolves_conflicts_and_pii_drop(tmp_path):
    rows = [{"text": CLEAN[0], "label": "pos"}, {"text": CLEAN[0], "label": "pos"}, {"text": CLEAN[0], "label": "neg"},
            {"text": CLEAN[1], "label": "pos"}, {"text": "Mail me: a.b@example.org now please", "label": "neg"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    result = clean_file(path, CleanOptions(conflicts="majority", pii="drop"))
    assert [(r["line"], r["reason"]) for r in result.rejects] == [
        (2, "duplicate: exact duplicate of line 1"),
        (3, "conflicting labels: minority label (pos ×2, neg ×1)"),
        (5, "personal data: email")]
    assert result.kept == [rows[0], rows[3]]


# ----------------------------------------------------------------------------------------------- split


def _split_rows(n_per_label: dict[str, int], seed: int = 0) -> list[dict]:
    """Rows of random words (no two alike), n per label."""
    import random

    rng, rows = random.Random(seed), []
    for label, n in n_per_label.items():
        for _ in range(n):
            words = ("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
                     for _ in range(8))
            rows.append({"text": " ".join(words), "label": label})
    return rows


def test_split_is_deterministic_stratified_and_keeps_near_duplicates_together(tmp_path):
    from tunesmith.data.dedup import cross_matches
    from tunesmith.data.split import split_records

    rows = [{"text": t, "label": lab} for t, lab in zip(CLEAN, LABELS)] * 1
    rows += [{"text": t.replace("the", "that"), "label": lab} for t, lab in zip(CLEAN[:10], LABELS[:10])]
    records = load_records(write_jsonl(tmp_path / "t.jsonl", rows)).records
    fractions = {"train": 0.6, "validation": 0.2, "test": 0.2}
    parts = split_records(records, fractions, seed=5)
    again = split_records(list(reversed(records)), fractions, seed=5)
    assert {k: sorted(r.line for r in v) for k, v in parts.items()} == \
        {k: sorted(r.line for r in v) for k, v in again.items()}
    assert sum(len(v) for v in parts.values()) == 30
    names = list(parts)
    for a in names:
        for b in names:
            if a < b:
                texts_a = [record_text(r.kind, r.data) for r in parts[a]]
                texts_b = [record_text(r.kind, r.data) for r in parts[b]]
                assert cross_matches(texts_a, texts_b) == [], (a, b)
    assert split_records(records, fractions, seed=6) != parts


def test_split_stratifies_labels_exactly_on_distinct_rows(tmp_path):
    from tunesmith.data.split import split_records

    records = load_records(write_jsonl(tmp_path / "t.jsonl", _split_rows({"a": 50, "b": 20, "c": 10}))).records
    parts = split_records(records, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=1)
    counts = {k: Counter(r.data["label"] for r in v) for k, v in parts.items()}
    assert counts == {"train": Counter(a=40, b=16, c=8), "validation": Counter(a=5, b=2, c=1),
                      "test": Counter(a=5, b=2, c=1)}
    assert [r.line for r in parts["test"]] == sorted(r.line for r in parts["test"])


def test_split_keeps_augmented_rows_with_their_origin(tmp_path):
    from tunesmith.data.split import split_records

    rows = _split_rows({"a": 10, "b": 10})
    path = tmp_path / "t.jsonl"
    variants = _split_rows({"x": 20}, seed=1)
    rows += [{"text": variants[i]["text"], "label": rows[i]["label"],
              "augmented": {"from": f"{path}:{i + 1}", "how": "paraphrase"}} for i in range(20)]
    records = load_records(write_jsonl(path, rows)).records
    parts = split_records(records, {"train": 0.5, "validation": 0.5}, seed=3)
    side = {r.line: name for name, rs in parts.items() for r in rs}
    assert all(side[21 + i] == side[1 + i] for i in range(20))
    assert len(parts["validation"]) == 20


# ----------------------------------------------------------------------------------------------- balance


def test_balance_counts_weights_and_resampling(tmp_path):
    from tunesmith.data import balance

    records = load_records(write_jsonl(tmp_path / "t.jsonl", _split_rows({"a": 6, "b": 3, "c": 1}))).records
    info = balance.imbalance(records)
    assert info["counts"] == {"a": 6, "b": 3, "c": 1} and info["imbalance_ratio"] == 6.0
    weights = balance.class_weights(records)
    assert weights == {"a": round(10 / 18, 6), "b": round(10 / 9, 6), "c": round(10 / 3, 6)}
    assert sum(weights[r.data["label"]] for r in records) == pytest.approx(10, abs=1e-4)
    down = balance.downsample(records, seed=0)
    assert Counter(r.data["label"] for r in down) == Counter(a=1, b=1, c=1)
    assert balance.downsample(records, seed=0) == down
    extra = balance.upsample(records, seed=0)
    assert Counter(r["label"] for r in extra) == Counter(b=3, c=5)
    assert all(r["upsampled"]["from"].endswith(":10") for r in extra if r["label"] == "c")
    b_sources = Counter(r["upsampled"]["from"] for r in extra if r["label"] == "b")
    assert sorted(b_sources.values()) == [1, 1, 1]  # each original copied once before any twice


def test_class_weights_file_must_cover_every_label(tmp_path):
    from tunesmith.data.balance import load_class_weights
    from tunesmith.errors import DataError

    records = load_records(write_jsonl(tmp_path / "t.jsonl", _split_rows({"a": 2, "b": 1}))).records
    (tmp_path / "w.json").write_text(json.dumps({"weights": {"a": 1.0}}))
    with pytest.raises(DataError, match="no weight for labels b"):
        load_class_weights(str(tmp_path / "w.json"), records)
    assert load_class_weights("auto", records) == {"a": 0.75, "b": 1.5}
    (tmp_path / "w.json").write_bytes(b'{"weights": {"a": 1.0, "b\xe9": 2.0}}')
    with pytest.raises(DataError, match=r"w\.json: line 1, column 26 is not UTF-8 \(byte 0xe9"):
        load_class_weights(str(tmp_path / "w.json"), records)
    (tmp_path / "w.json").write_text('{"weights":\n {"a": 1.0,}}')
    with pytest.raises(DataError, match=r"can't read class weights \(malformed JSON: .* at line 2, column 12\)"):
        load_class_weights(str(tmp_path / "w.json"), records)


def test_weighted_loss_is_the_row_weighted_token_mean(tiny_model_dir):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.common import trained_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 11, 12, -100, -100]])
    weights = torch.tensor([0.5, 3.0])
    loss, *_ = trained_token_loss(model, {"input_ids": ids, "labels": labels, "weights": weights})
    logits = model(input_ids=ids).logits[:, :-1].float()
    per = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="none").view(2, 4)
    mask = labels[:, 1:] != -100
    expected = ((per * mask) * weights[:, None]).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------- data check = train gate

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]


class ReachedTraining(Exception):
    """Raised in place of training: the data passed every gate before it."""


def training_refuses(recipe_path: Path, monkeypatch) -> str | None:
    """Run `tunesmith train`'s own data stage on the recipe: the DataError message that stops it, or None."""
    import dataclasses

    from tunesmith.errors import DataError
    from tunesmith.methods import REGISTRY
    from tunesmith.recipe import load_recipe
    from tunesmith.train import train_run

    recipe = load_recipe(recipe_path)

    def reached(_job):
        raise ReachedTraining

    monkeypatch.setitem(REGISTRY, recipe.method.name, dataclasses.replace(REGISTRY[recipe.method.name], train=reached))
    try:
        train_run(recipe, echo=lambda _line: None)
    except DataError as exc:
        return exc.message
    except ReachedTraining:
        return None
    raise AssertionError("train_run neither trained nor stopped")


def gate_files(tmp: Path, case: str) -> tuple[list[dict], list[dict] | None, str]:
    """(training rows, validation rows or None, extra recipe lines) for each gate case."""
    rows, val, extra = [dict(r) for r in CHATS], None, ""
    if case.startswith("malformed"):
        rows = rows[:20] + ['{"messages": [', "not json", '{"messages": "x"}', "[1]"]  # 4 of 24 rejected
        extra = "  max_reject_fraction: 0.2\n" if case.endswith("allowed") else ""
    elif case.startswith("duplicates"):
        rows = rows[:20] + [dict(r) for r in rows[:4]]  # 4 exact copies: 4 of 24 duplicate
        extra = "  check: {enabled: false}\n" if case.endswith("allowed") else ""
    elif case.startswith("leakage"):
        val = [dict(r) for r in rows[:2]] + [{"messages": [{"role": "user", "content": "Unrelated question?"},
                                                            {"role": "assistant", "content": "Unrelated answer."}]}]
        extra = "  check: {leakage: warn}\n" if case.endswith("allowed") else ""
    return rows, val, extra


GATE_CASES = {  # case -> the gate that stops training (None: it passes)
    "clean": None, "malformed": "data.max_reject_fraction", "malformed-allowed": None,
    "duplicates": "data.check", "duplicates-allowed": None, "leakage": "data.check", "leakage-allowed": None,
}


@pytest.mark.parametrize("case, with_recipe", [(c, True) for c in GATE_CASES] +  # a bare file: the recipe defaults
                         [(c, False) for c in GATE_CASES if not c.endswith("allowed")])
def test_data_check_exits_1_exactly_when_training_refuses_the_data(case, with_recipe, tmp_path, monkeypatch, capsys):
    from tunesmith.cli import main

    monkeypatch.chdir(tmp_path)
    rows, val, extra = gate_files(tmp_path, case)
    write_jsonl(tmp_path / "train.jsonl", rows)
    lines = "data:\n  train: train.jsonl\n" + ("  validation: val.jsonl\n" if val else "") + extra
    if val:
        write_jsonl(tmp_path / "val.jsonl", val)
    (tmp_path / "r.yaml").write_text(lines + "output:\n  dir: run\n", encoding="utf-8")

    refused = training_refuses(tmp_path / "r.yaml", monkeypatch)
    argv = ["data", "check", "train.jsonl", "--no-tokens", "--out", "check"]
    argv += ["--recipe", "r.yaml"] if with_recipe else (["--against", "val.jsonl"] if val else [])
    capsys.readouterr()
    code = main(argv)
    printed = capsys.readouterr().out

    expected = GATE_CASES[case]
    assert (refused is not None) == (expected is not None), refused
    assert code == (1 if refused else 0)
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    assert [f["gate"] for f in report["gate"]["failed"]] == ([expected] if expected else [])
    if refused:
        assert f"✗ {expected}: " in printed
        failure = report["gate"]["failed"][0]["message"]
        same = refused.replace(f"{tmp_path}/", "").splitlines()[0]  # train names the recipe's resolved paths
        assert failure.splitlines()[0] == same  # the same words as train's own message
    else:
        assert "verdict: ✓ `tunesmith train` would pass its data gates" in printed


def test_data_check_writes_every_rejected_row_with_its_line(tmp_path, capsys):
    from tunesmith.cli import main

    rows, _, _ = gate_files(tmp_path, "malformed")
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["data", "check", str(path), "--no-tokens", "--out", str(tmp_path / "c")]) == 1
    rejects = [json.loads(line) for line in (tmp_path / "c" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [
        (21, "malformed JSON"), (22, "malformed JSON"), (23, "wrong type"), (24, "not a JSON object")]
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert (report["rows"]["read"], report["rows"]["used"], report["rows"]["rejected"]) == (24, 20, 4)


# ----------------------------------------------------------------------------------------------- typed Parquet columns


def typed_parquet(path: Path, rows: list[dict]) -> "object":
    """`rows` plus a timestamp, date, decimal and binary column per row, written as Parquet; returns the table."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(rows)
    table = pa.table({
        "text": [r["text"] for r in rows], "label": [r["label"] for r in rows],
        "at": pa.array([datetime.datetime(2024, 3, 1, 8, 0, i % 60, 1000 * i) for i in range(n)], pa.timestamp("us")),
        "day": pa.array([datetime.date(2024, 3, 1 + i % 28) for i in range(n)], pa.date32()),
        "price": pa.array([decimal.Decimal(i) / 100 for i in range(n)], pa.decimal128(9, 2)),
        "blob": pa.array([bytes([i]) for i in range(n)], pa.binary()),
    })
    pq.write_table(table, path)
    return table


def test_clean_parquet_keeps_timestamp_date_decimal_binary_exact(tmp_path):
    import pyarrow.parquet as pq

    rows = _split_rows({"a": 6, "b": 6})
    rows.append(dict(rows[0]))  # row 13: an exact duplicate of row 1
    table = typed_parquet(tmp_path / "in.parquet", rows)
    result = clean_file(tmp_path / "in.parquet", CleanOptions())
    paths = write_clean(result, tmp_path / "out.parquet")
    assert pq.read_table(paths["cleaned"]).equals(table.slice(0, 12))
    reject = json.loads(paths["rejects"].read_text())
    assert (reject["line"], reject["reason"]) == (13, "duplicate: exact duplicate of line 1")
    assert reject["row"]["at"] == "2024-03-01T08:00:12.012000" and reject["row"]["day"] == "2024-03-13"
    assert reject["row"]["price"] == "0.12" and reject["row"]["blob"] == "DA=="
    paths = write_clean(result, tmp_path / "out.jsonl")
    first = json.loads(paths["cleaned"].read_text().splitlines()[0])
    assert {k: first[k] for k in ("at", "day", "price", "blob")} == {
        "at": "2024-03-01T08:00:00", "day": "2024-03-01", "price": "0.00", "blob": "AA=="}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_split_parquet_writes_parquet_parts_with_the_input_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunesmith.data.split import split_records, write_splits

    table = typed_parquet(tmp_path / "in.parquet", _split_rows({"a": 10, "b": 10}))
    load = load_records(tmp_path / "in.parquet")
    parts = split_records(load.records, {"train": 0.8, "test": 0.2}, seed=0)
    out = tmp_path / "parts"
    out.mkdir()
    paths = write_splits(parts, tmp_path / "in.parquet", out)
    assert {k: p.name for k, p in paths.items()} == {"train": "train.parquet", "test": "test.parquet"}
    back = [pq.read_table(paths[name]) for name in ("train", "test")]
    assert [t.num_rows for t in back] == [16, 4] and all(t.schema == table.schema for t in back)
    merged = pa.concat_tables(back).sort_by("price")
    assert merged.equals(table.sort_by("price"))
