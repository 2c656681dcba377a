"""End to end in a real browser: the app served by `streamlit run`, driven by headless Chromium.

Runs the sweep (a background job) on the Sensitivity page and waits for its curves, goes to the
Plan page, drags a per-group slider with the mouse, sees the predicted numbers change, measures
the plan on Validate, fine-tunes it on Recover (a background job) until the recovered model can be
downloaded, downloads the plan JSON from the Export page and validates it with `Plan.from_json`; then,
in a new session, sweeps the `tinylm` language model on the sample text and drags an MLP slider. Needs
Debian's `chromium` (`.ci/run` installs it) and the `playwright` package; without them the test
is skipped, unless PRUNECORE_REQUIRE_BROWSER=1 (set by CI) turns the skip into a failure.
With PRUNECORE_SCREENSHOTS=DIR it also saves a screenshot of every page there, after the
dashboard's default (full) sweep instead of the quick one (`make screenshots`, a few minutes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import prunecore as pc
from browser import (  # noqa: E402
    FAST, WAIT_MS, choose, click_until, drag_to_end, go, metric, new_page, no_exception, serve, settle,
    skip_without_browser, slider_thumb,
)

skip_without_browser()

from browser import chromium  # noqa: E402
from playwright.sync_api import Page, expect  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free local port, with its own run store and a quick sweep."""
    env = {"PRUNECORE_STORE": str(tmp_path_factory.mktemp("store") / "runs.db")}
    if not os.environ.get("PRUNECORE_SCREENSHOTS"):  # screenshots show the dashboard's own (full) sweep
        env["PRUNECORE_DASHBOARD_DEFAULTS"] = json.dumps(FAST)
    with serve(env, tmp_path_factory.mktemp("log") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def page(server, browser):
    return new_page(browser, server)


def _shoot(page: Page, name: str) -> None:
    folder = os.environ.get("PRUNECORE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(1500)  # let plotly finish drawing
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


def test_drag_a_slider_and_download_the_plan(server, page, tmp_path):
    expect(page.get_by_text("Channel groups").first).to_be_visible()
    _shoot(page, "1-model")

    go(page, "Sensitivity")
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    click_until(page, "Run sweep",  # a worker process sweeps; the page follows it
                lambda: expect(page.get_by_role("button", name="Cancel").or_(chart)).to_be_visible(timeout=60_000))
    expect(chart).to_be_visible()  # the page reruns when it is done
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0, timeout=WAIT_MS)  # calibration, when set
    settle(page)
    _shoot(page, "2-sensitivity")

    go(page, "Plan")
    expect(page.get_by_text("FLOPs kept").first).to_be_visible()
    expect(page.locator('[data-testid="stPlotlyChart"]').nth(1)).to_be_visible()  # the last thing drawn
    before = metric(page, "FLOPs kept")
    if os.environ.get("PRUNECORE_SCREENSHOTS"):  # the dashboard's defaults measure the plan in the background
        expect(page.locator('[data-testid="stMetric"]').filter(has_text="Measured accuracy")).to_be_visible()
        settle(page)
    _shoot(page, "3-plan")
    slider = page.locator('[data-testid="stSlider"]').filter(has_text="layer3.0.conv1").first
    drag_to_end(page, slider.get_by_role("slider"))  # the slider stops at its maximum
    expect(page.locator('[data-testid="stMetric"]').filter(has_text="FLOPs kept").first).not_to_contain_text(before)
    after = metric(page, "FLOPs kept")
    assert float(after.rstrip("%")) < float(before.rstrip("%"))

    go(page, "Validate")
    latency = page.locator('[data-testid="stMetric"]').filter(has_text="CPU latency")  # not the button's help
    click_until(page, "Apply and measure",  # a measurement job: its progress, then the result
                lambda: expect(page.get_by_role("button", name="Cancel").or_(latency)).to_be_visible(timeout=60_000))
    expect(latency).to_be_visible()
    settle(page)
    _shoot(page, "4-validate")

    go(page, "Recover")
    recovered = page.get_by_role("button", name="Download the recovered model (.pt)")
    click_until(page, "Fine-tune",  # a fine-tuning job: its live curve, then the recovered model
                lambda: expect(page.get_by_role("button", name="Cancel").or_(recovered)).to_be_visible(timeout=60_000))
    expect(recovered).to_be_visible()
    settle(page)
    _shoot(page, "5-recover")

    go(page, "Export")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the plan (JSON)").click()
    path = tmp_path / "plan.json"
    download.value.save_as(path)
    plan = pc.Plan.from_json(path.read_text())
    assert plan.model_name == "sample:resnet20"
    assert plan.groups["layer3.0.conv1"].sparsity > 0.8
    expect(page.get_by_role("button", name="Download the recovered model (.pt)")).to_be_visible()
    _shoot(page, "6-export")

    uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    bad = tmp_path / "broken.json"
    bad.write_text('{"schema": "prunecore.plan/1", ')
    uploader.set_input_files(str(bad))
    click_until(page, "Load this plan into the sliders", "not valid JSON")  # an error on the page; the app runs on
    uploader.set_input_files(str(path))
    click_until(page, "Load this plan into the sliders", "Loaded plan.json")



def test_a_language_model_sweeps_and_its_perplexity_moves(server, browser):
    """The tinylm sample: the sample text feeds it, its sweep runs, and an MLP slider moves predicted perplexity."""
    page = new_page(browser, server)  # a new tab: a new session, on the app's defaults
    expect(page.get_by_text("Channel groups").first).to_be_visible()
    choose(page, "Sample", "tinylm")
    expect(page.get_by_text("Data: sample text").first).to_be_visible(timeout=WAIT_MS)

    go(page, "Sensitivity")
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    click_until(page, "Run sweep",
                lambda: expect(page.get_by_role("button", name="Cancel").or_(chart)).to_be_visible(timeout=60_000))
    expect(chart).to_be_visible()
    settle(page)

    go(page, "Plan")
    card = page.locator('[data-testid="stMetric"]').filter(has_text="Predicted perplexity").first
    expect(card).to_be_visible()
    before = metric(page, "Predicted perplexity")
    drag_to_end(page, slider_thumb(page, "model.layers.0.mlp.gate_proj"))  # the most sensitive: dp keeps it
    expect(card).not_to_contain_text(before)
    assert float(metric(page, "Predicted perplexity")) > float(before)
    no_exception(page)
