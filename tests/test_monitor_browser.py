"""The monitor page in a real browser (Debian's headless Chromium driven by playwright): no console errors, the
charts drawn, the verdict shown, nothing fetched. Set TUNESMITH_SKIP_BROWSER=1 to skip on a machine without one."""

from __future__ import annotations

import os

import pytest

from test_monitor import T0, dataset, make_run, traffic_log
from test_review_browser import browser  # noqa: F401  (the headless Chromium fixture)
from tunesmith import monitor as m
from tunesmith.serve.requestlog import RequestLog

pytestmark = pytest.mark.skipif(os.environ.get("TUNESMITH_SKIP_BROWSER") == "1",
                                reason="TUNESMITH_SKIP_BROWSER=1: no browser on this machine")


def test_monitor_page_draws_its_charts_without_errors(browser, tmp_path):  # noqa: F811
    run = make_run(tmp_path / "run", dataset("sst2", "train", 200))
    log = traffic_log(tmp_path / "requests.sqlite")
    with RequestLog(log) as extra:  # classify requests with predictions, for the label chart
        for i in range(40):
            extra.record({"id": f"clf-{i}", "time": T0 + 600 + i, "endpoint": "classify", "model": "<b>m</b>",
                          "status": 200, "e2e_s": 0.02, "input_chars": 30 + i,
                          "prediction": [{"label": "negative" if i % 4 else "positive", "probability": 0.55}]})
    report = m.monitor(log, run)
    page_path = m.write_html(report, tmp_path / "monitor.html")

    page = browser.new_page(viewport={"width": 1100, "height": 1800})
    errors, requests = [], []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(page_path.as_uri())
    assert errors == []
    assert requests == [page_path.as_uri()]  # nothing else fetched: the page is offline
    charts = page.locator("svg[data-chart]")
    assert charts.count() == 6  # latency, tokens/s, requests/s, error share, input length, predicted labels
    names = [charts.nth(i).get_attribute("data-chart") for i in range(charts.count())]
    assert names == ["latency (s)", "output tokens/s", "requests/s", "error share", "input length",
                     "predicted labels"]
    assert page.locator("polyline").count() >= 6 and page.locator("rect").count() == 2 * (10 + 2)
    box = charts.first.bounding_box()
    assert box["width"] == 640 and box["height"] == 260  # laid out at its size, not collapsed
    assert page.locator("#verdict b").inner_text() == "retrain recommended"  # 90% low-confidence predictions
    assert "probability < 0.6" in page.locator("#verdict").inner_text()
    assert "<b>m</b>" in page.locator("body").inner_text()  # the model name shown as text, not markup
    page.screenshot(path=str(tmp_path / "monitor.png"), full_page=True)
    if os.environ.get("TUNESMITH_SCREENSHOT_DIR"):
        page.screenshot(path=os.path.join(os.environ["TUNESMITH_SCREENSHOT_DIR"], "monitor.png"), full_page=True)
    page.close()
