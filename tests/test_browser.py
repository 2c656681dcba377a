"""End to end in a real browser: the app served by `streamlit run`, driven by headless Chromium.

Runs the sweep (a background job) on the Sensitivity page and waits for its curves, goes to the
Plan page, drags a per-group slider with the mouse, sees the predicted numbers change,
downloads the plan JSON from the Export page and validates it with `Plan.from_json`. Needs
Debian's `chromium` (`.ci/run` installs it) and the `playwright` package; without them the test
is skipped, unless PRUNECORE_REQUIRE_BROWSER=1 (set by CI) turns the skip into a failure.
With PRUNECORE_SCREENSHOTS=DIR it also saves a screenshot of every page there, after the
dashboard's default (full) sweep instead of the quick one (`make screenshots`, a few minutes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import prunecore as pc

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
FAST = {"data_limit": 64, "sweep_levels": [0.3, 0.6], "sweep_bn_batches": 0}


def _missing() -> str:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return ""


if _missing():
    if os.environ.get("PRUNECORE_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser test required but {_missing()}")
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

expect.set_options(timeout=300_000)  # the first visit loads and traces the sample model; the sweep job runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`streamlit run dashboard/app.py` on a free local port, with its own run store and a quick sweep."""
    port = _free_port()
    env = {**os.environ, "PRUNECORE_STORE": str(tmp_path_factory.mktemp("store") / "runs.db")}
    if not os.environ.get("PRUNECORE_SCREENSHOTS"):  # screenshots show the dashboard's own (full) sweep
        env["PRUNECORE_DASHBOARD_DEFAULTS"] = json.dumps(FAST)
    log = (tmp_path_factory.mktemp("log") / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"streamlit did not start: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _go(page: Page, title: str) -> None:
    """Navigate inside the app (a page load would start a new session and lose the plan)."""
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
    expect(page.locator("h1").filter(has_text=title)).to_be_visible()
    _settle(page)


def _settle(page: Page) -> None:
    """Wait until the script run finished (Streamlit shows "Running..." meanwhile)."""
    page.wait_for_timeout(300)
    expect(page.get_by_role("img", name="Running...")).to_have_count(0)


def _metric(page: Page, label: str) -> str:
    card = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return card.locator('[data-testid="stMetricValue"]').inner_text()


def _shoot(page: Page, name: str) -> None:
    folder = os.environ.get("PRUNECORE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(1500)  # let plotly finish drawing
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


def test_drag_a_slider_and_download_the_plan(server, page, tmp_path):
    page.goto(server)
    expect(page.get_by_text("Channel groups").first).to_be_visible()
    _settle(page)
    _shoot(page, "1-model")

    _go(page, "Sensitivity")
    page.get_by_role("button", name="Run sweep").click()  # a worker process sweeps; the page follows it
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()  # the page reruns when it is done
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    _settle(page)
    _shoot(page, "2-sensitivity")

    _go(page, "Plan")
    expect(page.get_by_text("FLOPs kept").first).to_be_visible()
    expect(page.locator('[data-testid="stPlotlyChart"]').nth(1)).to_be_visible()  # the last thing drawn
    before = _metric(page, "FLOPs kept")
    _shoot(page, "3-plan")
    slider = page.locator('[data-testid="stSlider"]').filter(has_text="layer3.0.conv1").first
    thumb = slider.get_by_role("slider")
    thumb.scroll_into_view_if_needed()
    box = thumb.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 2000, y, steps=20)  # past the end of the track: the slider stops at its maximum
    page.mouse.up()
    _settle(page)
    expect(page.locator('[data-testid="stMetric"]').filter(has_text="FLOPs kept").first).not_to_contain_text(before)
    after = _metric(page, "FLOPs kept")
    assert float(after.rstrip("%")) < float(before.rstrip("%"))

    _go(page, "Validate")
    page.get_by_role("button", name="Apply and measure").click()
    expect(page.get_by_text("CPU latency")).to_be_visible()
    _settle(page)
    _shoot(page, "4-validate")

    _go(page, "Export")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the plan (JSON)").click()
    path = tmp_path / "plan.json"
    download.value.save_as(path)
    plan = pc.Plan.from_json(path.read_text())
    assert plan.model_name == "sample:resnet20"
    assert plan.groups["layer3.0.conv1"].sparsity > 0.8
    _shoot(page, "5-export")

    uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    bad = tmp_path / "broken.json"
    bad.write_text('{"schema": "prunecore.plan/1", ')
    uploader.set_input_files(str(bad))
    _click_until(page, "Load this plan into the sliders", "not valid JSON")  # an error on the page, the app keeps running
    uploader.set_input_files(str(path))
    _click_until(page, "Load this plan into the sliders", "Loaded plan.json")


def _click_until(page: Page, button: str, text: str, tries: int = 3) -> None:
    """Click `button` until `text` shows: a click that lands while the upload's rerun is still
    running can be dropped by Streamlit, and clicking the load button again is harmless."""
    for attempt in range(tries):
        page.get_by_role("button", name=button).click()
        try:
            expect(page.get_by_text(text)).to_be_visible(timeout=30_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise
