"""The run report: one self-contained page whose charts, tables and examples show exactly the run folder's numbers."""

from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tunesmith.errors import RunError
from tunesmith.report import CHART, nice_ticks, render_report, tick_labels, write_report

TRAIN_ROWS = [  # step, loss, learning rate
    (10, 2.0, 2e-4), (20, 1.6, 1.6e-4), (30, 1.3, 1.2e-4), (40, 1.1, 0.8e-4), (50, 1.0, 0.4e-4)]
EVAL_ROWS = [(20, 1.5), (40, 1.2)]
# input, gold, tuned, base, fewshot predictions: tuned is right on rows 0, 1, 3, 4; base on 1, 2, 5; fewshot on 1
EXAMPLES = [
    ("a warm, funny film", "pos", "pos", "neg", "neg"),
    ("<b>& rude</b> and loud", "neg", "neg", "neg", "neg"),
    ("a dull plot", "neg", "pos", "neg", "pos"),
    ("loved every minute", "pos", "pos", "neg", "neg"),
    ("boring and long", "neg", "neg", "pos", "pos"),
    ("fine, i guess", "pos", "neg", "pos", "neg"),
]
SYSTEMS = ("tuned", "base", "fewshot")


def classification_results() -> dict:
    def per_class(p: float) -> dict:
        return {"neg": {"precision": p, "recall": p, "f1": p, "support": 3},
                "pos": {"precision": p, "recall": p, "f1": p, "support": 3}}

    def diff(metric, versus, d, low, high, p):
        return {"metric": metric, "system": "tuned", "versus": versus, "diff": d, "ci_low": low, "ci_high": high,
                "p_value": p, "n": 6}

    return {
        "task": "classification", "kind": "classification", "data": "heldout", "rows": 6, "excluded_leaked": 1,
        "excluded": [{"file": "reviews.jsonl", "line": 7, "train_file": "train.jsonl", "train_line": 3,
                      "similarity": 1.0, "exact": True}],
        "systems": list(SYSTEMS), "primary_metric": "accuracy",
        "metrics": {
            "tuned": {"accuracy": 4 / 6, "macro_f1": 2 / 3, "per_class": per_class(2 / 3), "n": 6,
                      "confusion": {"labels": ["neg", "pos"], "columns": ["neg", "pos"], "matrix": [[2, 1], [1, 2]]}},
            "base": {"accuracy": 0.5, "macro_f1": 0.4667, "per_class": per_class(0.5), "n": 6,
                     "confusion": {"labels": ["neg", "pos"], "columns": ["neg", "pos"], "matrix": [[2, 1], [2, 1]]}},
            "fewshot": {"accuracy": 1 / 6, "macro_f1": 0.1667, "per_class": per_class(1 / 6), "n": 6,
                        "confusion": {"labels": ["neg", "pos"], "matrix": [[1, 2], [3, 0]]}},
        },
        "differences": [diff("accuracy", "base", 1 / 6, -1 / 3, 2 / 3, 0.62),
                        diff("accuracy", "fewshot", 0.5, 1 / 6, 5 / 6, 0.03),
                        diff("macro_f1", "base", 0.2, -0.3, 0.7, 0.55)],
        "wins_losses": {"base": {"wins": 3, "losses": 2, "ties": 1, "n": 6},
                        "fewshot": {"wins": 3, "losses": 0, "ties": 3, "n": 6}},
        "forgetting": {"qa_rows": 20, "text_rows": 10, "tuned": {"qa_accuracy": 0.5, "perplexity": 14.2},
                       "base": {"qa_accuracy": 0.75, "perplexity": 12.0}, "qa_accuracy_drop": 0.25,
                       "perplexity_rise": 0.1833, "threshold": 0.1, "warning": True},
        "regressions": 2,
    }


def write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def minimal_run(root: Path, train_rows=TRAIN_ROWS, eval_rows=EVAL_ROWS) -> Path:
    root.mkdir()
    manifest = {"tunesmith_run": 1, "method": "sft", "saved": "adapter",
                "base_model": {"name": "default", "resolved": "SmolLM2-135M-Instruct (bundled)"},
                "training": {"steps": 50, "trained_tokens": 40000, "trained_tokens_per_second": 1234.5678,
                             "trainable_params": 12345, "total_params": 1_000_000, "stopped_early": False,
                             "kept": {"step": 40, "metric": "loss", "value": 1.23456}},
                "losses": {"train_before": 2.0, "train_after": 1.0, "validation_before": 1.6,
                           "validation_after": 1.23456},
                "timings": {"data_seconds": 1.0, "train_seconds": 95.25, "total_seconds": 130.0}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer/tokenizer_config.json"):
        (root / name).parent.mkdir(exist_ok=True)  # what a finished run saved (open_run checks it is there)
        (root / name).write_text("{}")
    rows = [{"step": s, "epoch": s / 40, "loss": loss, "grad_norm": 0.5, "learning_rate": lr,
             "mean_token_accuracy": 0.8} for s, loss, lr in train_rows]
    rows += [{"step": s, "epoch": s / 40, "eval_loss": loss} for s, loss in eval_rows]
    rows += [{"step": 50, "train_sample_loss": 0.2}, {"step": 50, "train_loss": 1.4, "train_runtime": 95.0},
             {"step": 50, "eval_loss": 1.23456, "kept_from_step": 40}]  # kept weights re-measured: not a point
    write_lines(root / "metrics.jsonl", rows)
    return root


@pytest.fixture
def run(tmp_path) -> Path:
    root = minimal_run(tmp_path / "run")
    (root / "recipe.yaml").write_text("model:\n  name: default\nmethod:\n  name: sft\n  adapter: lora\n")
    folder = root / "eval" / "heldout"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(classification_results()))
    examples = []
    for text, gold, *preds in EXAMPLES:
        item = {"file": "reviews.jsonl", "line": len(examples) + 1, "input": text, "label": gold}
        for system, pred in zip(SYSTEMS, preds):
            item[system] = {"output": pred, "accuracy": float(pred == gold), "gold": gold, "pred": pred}
        examples.append(item)
    write_lines(folder / "examples.jsonl", examples)
    (root / "data_check.json").write_text(json.dumps({"problems": [
        {"severity": "warning", "check": "duplicates", "message": "2 exact duplicate rows <in train>"}]}))
    (root / "data_check.html").write_text("<html></html>")
    return root


@pytest.fixture
def page(run) -> str:
    return write_report(run).read_text(encoding="utf-8")


def polyline(page: str, series: str) -> list[tuple[float, float]]:
    points = re.search(rf"<polyline data-series='{series}'[^>]* points='([^']*)'", page).group(1)
    return [tuple(float(v) for v in p.split(",")) for p in points.split()]


def table_rows(fragment: str) -> list[list[str]]:
    """The text of each row's cells (tags removed)."""
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", fragment, re.S)]


def test_report_is_written_into_the_run_folder_and_fetches_nothing(run):
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page == render_report(run)
    for banned in ("http://", "https://", "<script", "src=", "url(", "@import"):
        assert banned not in page
    assert re.findall(r"<section id='([^']+)'>", page) == ["summary", "curves", "eval-heldout", "data-check", "recipe"]


def test_header_shows_method_timings_and_loss_before_and_after(page):
    header = dict((r[0], r[1]) for r in table_rows(page.split("<section id='curves'>")[0]) if len(r) == 2)
    assert header["method"] == "sft"
    assert header["adapter"] == "lora (saved adapter/)"
    assert header["base model"] == "SmolLM2-135M-Instruct (bundled)"
    assert header["steps"] == "50"
    assert header["kept"] == "the weights of step 40 (best validation loss, 1.2346), not the last"
    assert header["train time"] == "95.2 s"
    assert header["trained tokens/s"] == "1,234.6"
    assert header["trainable params"] == "12,345 of 1,000,000 (1.23%)"
    assert header["train loss"] == "2.000 → 1.000"
    assert header["validation loss"] == "1.600 → 1.235"
    assert header["finished"].endswith("UTC (run took 2 min 10 s)")


def test_loss_chart_has_one_point_per_logged_row_placed_by_the_axis_scales(page):
    left, right = CHART["left"], CHART["width"] - CHART["right"]
    top, bottom = CHART["top"], CHART["height"] - CHART["bottom"]
    # x: steps 10..50 over left..right; y: losses 1.0..2.0 (train and validation together) over bottom..top
    train = polyline(page, "train_loss")
    assert len(train) == 5
    assert train[0] == (left, top) == (64.0, 16.0)
    assert train[-1] == (right, bottom) == (624.0, 216.0)
    assert train[2] == (344.0, pytest.approx(bottom - 0.3 * (bottom - top), abs=0.05))
    assert polyline(page, "eval_loss") == [(204.0, 116.0), (484.0, 176.0)]
    rates = polyline(page, "learning_rate")
    assert len(rates) == 5 and rates[0] == (64.0, 16.0) and rates[-1] == (624.0, 216.0)
    loss_svg = re.search(r"<svg [^>]*data-chart='loss'.*?</svg>", page, re.S).group(0)
    assert loss_svg.count("<circle") == 7
    assert re.findall(r"text-anchor='end'>([\d.]+)</text>", loss_svg) == ["1.0", "1.2", "1.4", "1.6", "1.8", "2.0"]
    assert ">30</text>" in loss_svg


def test_ticks_are_round_numbers_inside_the_range_labelled_alike():
    assert nice_ticks(1.0, 2.0) == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
    assert [label for _, label in tick_labels(nice_ticks(1.0, 2.0))] == ["1.0", "1.2", "1.4", "1.6", "1.8", "2.0"]
    assert nice_ticks(10, 50) == [10, 20, 30, 40, 50]
    assert [label for _, label in tick_labels(nice_ticks(0, 12345))] == ["0", "2500", "5000", "7500", "10000"]
    assert [label for _, label in tick_labels(nice_ticks(3e-5, 2.1e-4))] == ["5.0e-05", "1.0e-04", "1.5e-04",
                                                                             "2.0e-04"]


def test_metric_table_shows_each_system_as_a_column(page):
    section = page.split("<section id='eval-heldout'>")[1]
    rows = table_rows(section.split("</table>")[0])
    assert rows[0] == ["metric", "tuned", "base", "fewshot"]
    assert rows[1] == ["accuracy", "66.7%", "50.0%", "16.7%"]
    assert rows[2] == ["macro_f1", "66.7%", "46.7%", "16.7%"]
    assert rows[3] == ["n", "6", "6", "6"]


def test_difference_chart_shows_each_interval_around_zero(page):
    svg = re.search(r"<svg [^>]*data-metric='accuracy'.*?</svg>", page, re.S).group(0)
    versus_base = re.search(r"<g data-diff='tuned-vs-base'>(.*?)</g>", svg, re.S).group(1)
    assert "+16.7 pt [-33.3 pt, +66.7 pt], p = 0.620, n = 6" in versus_base
    ci = re.search(r"<line class='ci' stroke='([^']+)'[^>]* x1='([\d.]+)' x2='([\d.]+)'", versus_base)
    # scale: ±(5/6 · 1.1) over 190..510; the interval -1/3..2/3 straddles 0 at 350 (grey: not significant)
    reach = 5 / 6 * 1.1
    assert float(ci.group(2)) == pytest.approx(190 + (-1 / 3 + reach) / (2 * reach) * 320, abs=0.05)
    assert float(ci.group(3)) == pytest.approx(190 + (2 / 3 + reach) / (2 * reach) * 320, abs=0.05)
    assert float(ci.group(2)) < 350 < float(ci.group(3)) and ci.group(1) == "#6b6b6b"
    versus_fewshot = re.search(r"<g data-diff='tuned-vs-fewshot'>(.*?)</g>", svg, re.S).group(1)
    assert "+50.0 pt [+16.7 pt, +83.3 pt], p = 0.030, n = 6" in versus_fewshot
    assert "stroke='#3a9a5b'" in versus_fewshot  # the whole interval above 0: green
    assert "+20.0 pt [-30.0 pt, +70.0 pt], p = 0.550" in page  # macro_f1 gets its own chart


def test_wins_losses_confusion_and_per_class_tables(page):
    wins = re.search(r"<h3>Per-example wins.*?</table>", page, re.S).group(0)
    assert [r[:4] for r in table_rows(wins)] == [["tuned vs", "wins", "ties", "losses"], ["base", "3", "1", "2"],
                                                 ["fewshot", "3", "3", "0"]]
    for system, matrix in (("tuned", [[2, 1], [1, 2]]), ("base", [[2, 1], [2, 1]])):
        table = re.search(rf"<table data-confusion='{system}'>(.*?)</table>", page, re.S).group(1)
        rows = table_rows(table)
        assert rows[0] == ["gold \\ predicted", "neg", "pos"]
        assert [[int(c) for c in r[1:]] for r in rows[1:]] == matrix
    assert "data-confusion='fewshot'" not in page  # tuned and base only
    per_class = re.search(r"<h3>Per-class.*?</table>", page, re.S).group(0)
    assert table_rows(per_class)[2] == ["neg", "3", *["66.7%"] * 3, *["50.0%"] * 3, *["16.7%"] * 3]


def test_best_and_worst_examples_in_order_with_every_answer_escaped(page):
    def inputs(title: str) -> list[str]:
        table = re.search(rf"<h3>{title} examples.*?</table>", page, re.S).group(0)
        return re.findall(r"<tr class='example'><td><pre>(.*?)</pre>", table, re.S)

    # tuned right everywhere but rows 2 and 5; ties go to the larger margin over base and fewshot
    assert inputs("Best") == ["a warm, funny film", "loved every minute", "boring and long"]
    assert inputs("Worst") == ["a dull plot", "fine, i guess", "&lt;b&gt;&amp; rude&lt;/b&gt; and loud"]
    assert "<b>& rude" not in page
    assert "2 exact duplicate rows &lt;in train&gt;" in page


def test_leakage_forgetting_and_data_check(page):
    assert "1 evaluation rows match training rows" in page
    assert ["reviews.jsonl:7", "train.jsonl:3", "1.0", "exact"] in table_rows(page)
    assert "⚠ Forgetting warning" in page
    assert "QA accuracy drop +25.0 pt; perplexity rise +18.3% (warning above 10% relative)" in page
    assert ["qa_accuracy", "75.0%", "50.0%"] in table_rows(page)
    assert ["perplexity", "12.00", "14.20"] in table_rows(page)
    data_check = page.split("<section id='data-check'>")[1].split("</section>")[0]
    assert "found 1 finding(s)" in data_check and "href='data_check.html'" in data_check
    assert "! duplicates:" in data_check
    assert "adapter: lora" in page  # recipe.yaml, preformatted
    assert "<details><summary>manifest.json</summary>" in page and "&quot;trainable_params&quot;: 12345" in page


def test_a_run_with_only_manifest_and_metrics_renders_without_the_missing_sections(tmp_path):
    root = minimal_run(tmp_path / "bare", train_rows=[(5, 0.75, 1e-4)], eval_rows=[])
    page = render_report(root)
    assert re.findall(r"<section id='([^']+)'>", page) == ["summary", "curves", "recipe"]
    assert "Evaluation" not in page and "Data check" not in page and "recipe.yaml" not in page
    assert polyline(page, "train_loss") == [(344.0, 116.0)]  # one value: both scales widen around it
    assert "eval_loss" not in page


def test_missing_or_unfinished_run_folder_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="no such run folder"):
        render_report(tmp_path / "nowhere")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(RunError, match="no manifest.json"):
        write_report(tmp_path / "unfinished")
    assert not (tmp_path / "unfinished" / "report.html").exists()


def test_broken_results_file_names_the_file(run):
    (run / "eval" / "heldout" / "results.json").write_text("{not json")
    with pytest.raises(RunError, match=r"results\.json: not valid JSON"):
        render_report(run)


def test_generation_eval_draws_length_histograms(tmp_path):
    root = minimal_run(tmp_path / "gen")
    folder = root / "eval" / "scitldr"
    folder.mkdir(parents=True)
    results = {"task": "generation", "rows": 3, "data": "x.jsonl", "systems": ["tuned", "base"],
               "primary_metric": "rougeL", "excluded_leaked": 0,
               "metrics": {"tuned": {"rougeL": 0.42, "bleu": 12.3456}, "base": {"rougeL": 0.2, "bleu": 3.0}}}
    (folder / "results.json").write_text(json.dumps(results))
    outputs = {"tuned": ["one two", "one two three", "a b c d e f g h i"], "base": ["x", "y", "z"]}
    write_lines(folder / "examples.jsonl", [
        {"input": f"q{i}", "references": [f"ref {'w ' * i}"], **{s: {"output": outputs[s][i], "rougeL": 0.1 * i}
                                                                   for s in outputs}} for i in range(3)])
    page = render_report(root)
    counts = re.findall(r"<title>(\w+): (\d+) answers of (\S+) words</title>", page)
    shown = {(name, bucket): int(n) for name, n, bucket in counts}
    assert shown[("tuned", "≤2")] == 1 and shown[("tuned", "≤4")] == 1 and shown[("tuned", "≤16")] == 1
    assert shown[("base", "≤2")] == 3 and shown[("reference", "≤2")] == 2 and shown[("reference", "≤4")] == 1
    assert table_rows(page.split("<section id='eval-scitldr'>")[1].split("</table>")[0])[1:] == [
        ["rougeL", "42.0%", "20.0%"], ["bleu", "12.35", "3.000"]]
    assert "No evaluation row matches a training row" in page
    assert re.findall(r"<h3>Best examples.*?<pre>(q\d)</pre>", page, re.S) == ["q2"]


def test_sparse_results_render_what_they_have(tmp_path):
    root = minimal_run(tmp_path / "lm")
    (root / "eval" / "text").mkdir(parents=True)
    (root / "eval" / "text" / "results.json").write_text(json.dumps(
        {"task": "lm", "systems": ["tuned", "base"], "primary_metric": "perplexity",
         "metrics": {"tuned": {"perplexity": 12.3, "nll_per_token": 2.5096, "tokens": 100}}}))
    write_lines(root / "eval" / "text" / "examples.jsonl", [{"input": "x", "tuned": {"output": None, "nll": 3.0}}])
    section = render_report(root).split("<section id='eval-text'>")[1].split("</section>")[0]
    assert table_rows(section) == [["metric", "tuned", "base"], ["perplexity", "12.30", "—"],
                                   ["nll_per_token", "2.510", "—"], ["tokens", "100", "—"]]
    assert "<h3>" not in section  # no differences, examples without scores, no leakage count, no forgetting


def test_review_section_shows_the_win_rate_when_the_review_app_is_present(run, monkeypatch):
    review_app = pytest.importorskip("tunesmith.review_app")
    (run / "review").mkdir()
    (run / "review" / "run-vs-other.sqlite").write_bytes(b"")
    fake = {"systems": ["run", "other"], "items": 10, "items_voted": 8, "votes": 8, "a_wins": 6, "b_wins": 2,
            "ties": 0, "win_rate_a": 0.75, "ci_low": 0.409, "ci_high": 0.929, "by_reviewer": {}}
    monkeypatch.setattr(review_app, "review_results", lambda db: fake)
    page = render_report(run)
    review = page.split("<section id='review'>")[1].split("<section id='data-check'>")[0]
    assert "75.0%" in review and "40.9%" in review and "92.9%" in review
    monkeypatch.setitem(sys.modules, "tunesmith.review_app", None)  # not installed: the section is skipped
    assert "<section id='review'>" not in render_report(run)


HOSTILE = ["x'><img src=x onerror=alert(1)>", '"><svg onload=alert(2)>', "my data", "my-data"]  # eval folder names
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "nav", "a", "section", "table", "tr",
        "th", "td", "p", "b", "pre", "span", "div", "svg", "line", "text", "polyline", "circle", "rect", "g",
        "details", "summary", "ul", "li"}


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, and the text of each <h2>."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h2: list[str] = []
        self._in_h2 = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_h2 = tag == "h2"
        if self._in_h2:
            self.h2.append("")

    def handle_endtag(self, tag):
        self._in_h2 = self._in_h2 and tag != "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2[-1] += data


def test_every_name_is_escaped_so_no_handler_or_tag_gets_in(run):
    """Eval folders named after hostile data files, with hostile system, label and metric names inside: the page
    has only its own tags, no on* attribute, and each name reads back as the text it was."""
    evil = "<b onmouseover=alert(3)>'\""
    results = classification_results()
    results["systems"] = ["tuned", evil]
    results["metrics"] = {"tuned": results["metrics"]["tuned"], evil: results["metrics"]["base"]}
    results["metrics"]["tuned"]["confusion"]["labels"] = [evil, "pos"]
    results["differences"][0]["versus"] = evil
    results["differences"][1]["metric"] = evil
    results["wins_losses"] = {evil: {"wins": 1, "losses": 2, "ties": 3}}
    results["data"] = evil
    results["regressions"] = evil
    for name in HOSTILE:
        folder = run / "eval" / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))
        (folder / "examples.jsonl").write_text(json.dumps({"input": evil, "label": "neg", "tuned": {
            "output": evil, "accuracy": 1.0}, evil: {"output": evil, "accuracy": 0.0}}) + "\n")
    page = write_report(run).read_text(encoding="utf-8")

    parsed = Elements(page)
    assert {tag for tag, _ in parsed.tags} <= TAGS
    handlers = [(tag, a) for tag, attrs in parsed.tags for a in attrs if a.lower().startswith("on")]
    assert handlers == []
    for raw in (*HOSTILE[:2], evil, "<img", "<svg onload", "<b onmouseover"):  # only their escaped forms appear
        assert raw not in page
    titles = [t for t in parsed.h2 if t.startswith("Evaluation: ")]
    assert titles == [f"Evaluation: {n}" for n in sorted(["heldout", *HOSTILE])]
    ids = [attrs["id"] for tag, attrs in parsed.tags if tag == "section"]
    links = [attrs["href"] for tag, attrs in parsed.tags if tag == "a" and attrs["href"].startswith("#")]
    assert links == [f"#{i}" for i in ids] and len(set(ids)) == len(ids)
    assert [i for i in ids if i.startswith("eval-")] == [
        "eval-svg-onload-alert-2", "eval-heldout", "eval-my-data", "eval-my-data-2", "eval-x-img-src-x-onerror-alert-1"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", i) for i in ids)
    systems = [attrs["data-system"] for tag, attrs in parsed.tags if tag == "td" and "data-system" in attrs]
    assert evil in systems  # an attribute value reads back as the name it was
