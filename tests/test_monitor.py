"""`tunesmith monitor`: traffic numbers from a planted log, and drift on real data — SST-2 validation reviews served
to a run trained on SST-2 rows is no drift; BANKING77 questions served to it is drift, each test with its p-value.

The run folder is what a run keeps of its data (RUN/data/ via write_snapshot); the classifier whose predictions
are logged is a logistic regression on the same MiniLM embeddings, fitted on the run's training rows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tunesmith import monitor as m
from tunesmith.cli import main
from tunesmith.data import PreparedData
from tunesmith.data.records import Record
from tunesmith.data.snapshot import write_snapshot
from tunesmith.serve.requestlog import RequestLog

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
T0 = 1_780_000_000.0  # 2026-05-28


def dataset(name: str, split: str, n: int) -> list[dict]:
    with open(DATASETS / name / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def make_run(folder: Path, rows: list[dict], kind: str = "classification") -> Path:
    """A run folder with what `tunesmith train` keeps of its data (RUN/data/) and a manifest."""
    folder.mkdir()
    records = [Record(kind, {"text": r["text"], "label": r["label"]} if kind == "classification"
                      else {"text": r["text"]}, "train.jsonl", i + 1) for i, r in enumerate(rows)]
    labels = sorted({r["label"] for r in rows}) if kind == "classification" else None
    write_snapshot(folder, PreparedData(kind, records[:-40], records[-40:], [], labels, "split"), {})
    (folder / "manifest.json").write_text(json.dumps({"tunesmith_run": 1, "method": "features"}))
    return folder


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    """An SST-2 run (360 training rows) and a classifier fitted on its rows' MiniLM embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = dataset("sst2", "train", 400)
    run = make_run(tmp_path_factory.mktemp("sst2") / "run", rows)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    clf.fit(m.embed_texts([r["text"] for r in rows[:-40]]), [r["label"] for r in rows[:-40]])
    return run, clf


def serve_log(path: Path, run: Path, texts: list[str], clf=None, content: bool = True) -> Path:
    """A request log of classify requests, one text each, 9 s apart, with the classifier's predictions."""
    probs = clf.predict_proba(m.embed_texts(texts)) if clf is not None else None
    with RequestLog(path, log_content=content) as log:
        for i, text in enumerate(texts):
            row = {"id": f"clf-{i}", "time": T0 + 9 * i, "endpoint": "classify", "model": "run", "run": str(run),
                   "status": 200, "queue_s": 0.001, "e2e_s": 0.01 * (1 + i % 10), "prompt_tokens": 20,
                   "input_chars": len(text), "prompt": [text]}
            if probs is not None:
                best = int(probs[i].argmax())
                row["prediction"] = [{"label": str(clf.classes_[best]), "probability": float(probs[i][best])}]
            log.record(row)
    return path


def test_sst2_validation_served_to_an_sst2_run_is_no_drift(sst2_run, tmp_path):
    run, clf = sst2_run
    texts = [r["text"] for r in dataset("sst2", "validation", 200)]
    report = m.monitor(serve_log(tmp_path / "requests.sqlite", run, texts, clf), run)
    d = report["drift"]
    assert d["train_rows"] == 360 and d["answered"] == 200 and d["content_logged"]
    assert d["length"]["psi"] < m.PSI_BANDS[0] and d["length"]["p_value"] > 0.05
    assert d["embedding"]["n_train"] == d["embedding"]["n_served"] == 200
    assert d["embedding"]["p_value"] > 0.05
    assert d["labels"]["n"] == 200 and d["labels"]["p_value"] > 0.05 and d["labels"]["df"] == 1
    assert d["labels"]["low_confidence"] < m.LOW_CONFIDENCE_SHARE
    assert report["verdict"] == {"verdict": "no drift", "reasons": [], "notes": []}


def test_banking77_served_to_an_sst2_run_is_drift_with_each_p_value(sst2_run, tmp_path):
    run, clf = sst2_run
    texts = [r["text"] for r in dataset("banking77", "validation", 200)]
    report = m.monitor(serve_log(tmp_path / "requests.sqlite", run, texts, clf), run)
    d, v = report["drift"], report["verdict"]
    assert d["length"]["psi"] > m.PSI_BANDS[1] and d["length"]["p_value"] < 1e-6
    assert d["embedding"]["p_value"] == pytest.approx(1 / (1 + m.PERMUTATIONS))  # no shuffle came close
    assert d["embedding"]["mmd2"] > 0.05
    assert d["labels"]["p_value"] < 1e-3
    assert v["verdict"] == "retrain recommended"
    assert [r.split(":")[0] for r in v["reasons"]] == ["input lengths", "input meaning (minilm embeddings)",
                                                       "predicted labels differ from the training labels"]
    text = m.format_summary(report)
    assert "verdict: RETRAIN RECOMMENDED" in text
    assert f"p = {d['labels']['p_value']:.2e}" in text  # the reasons carry the numbers
    assert "permutation p = 0.0020" in text


def test_without_content_lengths_come_from_input_chars_and_the_embedding_test_says_why(sst2_run, tmp_path):
    run, _ = sst2_run
    texts = [r["text"] for r in dataset("banking77", "validation", 60)]
    report = m.monitor(serve_log(tmp_path / "requests.sqlite", run, texts, content=False), run)
    d = report["drift"]
    assert not d["content_logged"] and not d["length"]["per_text"]
    assert d["length"]["n_served"] == 60 and d["length"]["psi"] > m.PSI_BANDS[1]
    assert "--log-content" in d["embedding"]["skipped"]
    assert "0 logged predictions" in d["labels"]["skipped"]
    assert report["verdict"]["verdict"] == "retrain recommended"
    assert any("--log-content" in n for n in report["verdict"]["notes"])


def traffic_log(path: Path) -> Path:
    """100 requests over 10 minutes: 90 answered (e2e 0.1..0.9 s, 10 output tokens), 6 rate-limited, 4 invalid."""
    with RequestLog(path) as log:
        for i in range(100):
            row = {"id": f"chatcmpl-{i}", "time": T0 + 6 * i, "endpoint": "chat.completions", "model": "<b>m</b>",
                   "status": 200, "finish_reason": "stop", "e2e_s": 0.1 * (1 + i % 9), "ttft_s": 0.05,
                   "queue_s": 0.0, "completion_tokens": 10, "input_chars": 40}
            if i % 10 == 9:
                row.update(status=429 if i < 60 else 400, finish_reason=None, e2e_s=None, ttft_s=None,
                           completion_tokens=None, error_code="rate_limit_exceeded" if i < 60 else "invalid_request")
            log.record(row)
    return path


def test_traffic_counts_errors_latency_and_windows(tmp_path):
    report = m.monitor(traffic_log(tmp_path / "requests.sqlite"))
    t = report["traffic"]
    assert t["requests"] == 100 and t["errors"] == 10 and t["error_rate"] == 0.1
    assert t["by_status"] == {200: 90, 400: 4, 429: 6}
    assert t["by_code"] == {"rate_limit_exceeded": {"count": 6, "rate": 0.06},
                            "invalid_request": {"count": 4, "rate": 0.04}}
    assert t["latency"]["e2e_s"]["n"] == 90 and t["latency"]["e2e_s"]["p50"] == pytest.approx(0.5)
    assert t["latency"]["ttft_s"]["p99"] == pytest.approx(0.05)
    assert t["tokens_per_s"] == pytest.approx(900 / 594)
    assert t["window_min"] == 1 and len(t["windows"]) == 10
    assert [w["requests"] for w in t["windows"]] == [10] * 10
    assert [w["errors"] for w in t["windows"]] == [1] * 10
    assert t["windows"][0]["tokens_per_s"] == pytest.approx(90 / 60)
    assert t["windows"][-1]["seconds"] == pytest.approx(54)  # the log ends 54 s into its last window
    assert t["windows"][-1]["tokens_per_s"] == pytest.approx(90 / 54)
    assert report["drift"] is None and report["verdict"]["verdict"] == "drift not checked"
    assert m.monitor(tmp_path / "requests.sqlite", since=T0 + 300)["traffic"]["requests"] == 50
    five = m.monitor(tmp_path / "requests.sqlite", window_min=5)["traffic"]["windows"]
    assert [w["seconds"] for w in five] == [300, pytest.approx(294)]
    assert five[1]["requests_per_s"] == pytest.approx(50 / 294)


def test_percentile_psi_and_chi_square_numbers():
    assert m.percentile([4, 1, 3, 2], 50) == 2.5 and m.percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert m.percentile([], 50) is None
    assert m.psi([0.5, 0.5], [0.5, 0.5]) == 0
    assert m.psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * m.math.log(3))
    stat, p = m.chi_square([30, 70], [50, 50])
    assert stat == pytest.approx(16.0) and p == pytest.approx(6.334e-5, rel=1e-3)
    stat, p = m.homogeneity([50, 50], [50, 50])
    assert stat == 0 and p == 1


def test_mmd_permutation_test_separates_shifted_samples():
    import numpy as np

    rng = np.random.default_rng(1)
    same = m.mmd_test(rng.normal(size=(80, 8)), rng.normal(size=(80, 8)), 200, 0)
    shifted = m.mmd_test(rng.normal(size=(80, 8)), rng.normal(0.7, 1, size=(80, 8)), 200, 0)
    assert same[1] > 0.05 and shifted[1] == pytest.approx(1 / 201) and shifted[0] > same[0]
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    assert m.mmd_test(x, y, 50, 3) == m.mmd_test(x, y, 50, 3)  # seeded


def test_cli_prints_the_summary_and_writes_an_escaped_page(tmp_path, capsys):
    log = traffic_log(tmp_path / "requests.sqlite")
    before = log.read_bytes()
    assert main(["monitor", str(log), "--window", "2"]) == 0
    out = capsys.readouterr().out
    assert "100 requests" in out and "error rate 10.0% (rate_limit_exceeded 6.0%, invalid_request 4.0%)" in out
    assert "verdict: DRIFT NOT CHECKED" in out and f"page: {tmp_path / 'monitor.html'}" in out
    page = (tmp_path / "monitor.html").read_text(encoding="utf-8")
    assert "<b>m</b>" not in page and "&lt;b&gt;m&lt;/b&gt;" in page
    assert page.count("<svg") == 4 and "<script" not in page
    assert log.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor.html", "requests.sqlite"]


def test_run_is_found_beside_its_log(sst2_run, tmp_path):
    import shutil

    run, _ = sst2_run
    copy = tmp_path / "run"
    shutil.copytree(run / "data", copy / "data")
    texts = [r["text"] for r in dataset("sst2", "validation", 30)]
    serve_log(copy / "serve" / "requests.sqlite", copy, texts)
    report = m.monitor(copy / "serve" / "requests.sqlite")
    assert report["drift"]["run"] == str(copy.resolve()) and report["drift"]["answered"] == 30


def test_a_text_run_has_no_label_test(tmp_path):
    run = make_run(tmp_path / "run", dataset("sst2", "train", 100), kind="text")
    with RequestLog(tmp_path / "r.sqlite") as log:
        for i in range(30):
            log.record({"id": f"c-{i}", "time": T0 + i, "status": 200, "input_chars": 90 + i})
    d = m.monitor(tmp_path / "r.sqlite", run)["drift"]
    assert "labels" not in d and d["length"]["n_served"] == 30 and d["train_rows"] == 60


def test_a_log_without_the_requests_table_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(m.TunesmithError, match="without a `requests` table"):
        m.monitor(path)
