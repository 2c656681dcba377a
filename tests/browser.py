"""Helpers for the browser tests: the app served by `streamlit run`, headless Chromium, and page actions.

Needs Debian's `chromium` (`.ci/run` installs it) and the `playwright` package. `skip_without_browser()`
skips the calling module without them, unless PRUNECORE_REQUIRE_BROWSER=1 (set by CI) turns the skip
into a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
FAST = {"data_limit": 64, "sweep_levels": [0.3, 0.6], "sweep_bn_batches": 0,  # seconds, not minutes
        "live_measure_on": False, "sweep_calibrate": 0,  # measuring plans only where a test turns it on
        "recover_epochs": 1, "recover_train_limit": 256}  # fine-tuning: one short epoch
WAIT_MS = 300_000  # the first visit loads and traces the model; a sweep job runs on a busy machine


def missing() -> str:
    """Why the browser tests cannot run here; "" when they can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return ""


def skip_without_browser() -> None:
    """Skip the calling test module when Chromium or playwright is missing (fail under PRUNECORE_REQUIRE_BROWSER=1)."""
    reason = missing()
    if reason and os.environ.get("PRUNECORE_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser test required but {reason}")
    if reason:
        pytest.skip(reason, allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`streamlit run dashboard/app.py` on a free loopback port with `env`; yields its URL.

    On exit the server stops, and so does every sweep worker it started (each job's worker leads
    its own process group, which `jobs.list_jobs` names), so no test leaves CPU work behind.
    """
    from prunecore import jobs

    port = _free_port()
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        store = env.get("PRUNECORE_STORE")
        for job in jobs.list_jobs(store) if store else []:
            if job.state in jobs.ACTIVE and job.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.pid, signal.SIGKILL)


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium browser (playwright's sync API), closed on exit."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, url: str):
    """A new tab (a new Streamlit session) on the app's first page, loaded."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    settle(page)
    return page


def go(page, title: str, tries: int = 3) -> None:
    """Navigate inside the app (a page load would start a new session and lose its state).

    A click that lands while the page reruns (a job's panel reruns it when the job ends) can be
    dropped on a busy machine: the title must show within a minute, else the link is clicked again.
    """
    from playwright.sync_api import expect

    link = page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title, exact=True)
    heading = page.locator("h1").filter(has_text=title)
    for attempt in range(tries):
        link.click()
        try:
            expect(heading).to_be_visible(timeout=60_000)
            break
        except AssertionError:
            if attempt == tries - 1:
                raise
    settle(page)


def settle(page) -> None:
    """Wait until the script run finished (Streamlit shows "Running..." meanwhile)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(300)
    expect(page.get_by_role("img", name="Running...")).to_have_count(0)


def no_exception(page) -> None:
    """The page shows no Python exception (Streamlit's traceback box)."""
    from playwright.sync_api import expect

    expect(page.locator('[data-testid="stException"]')).to_have_count(0, timeout=1_000)


def metric(page, label: str) -> str:
    card = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return card.locator('[data-testid="stMetricValue"]').inner_text()


def type_number(page, label: str, value: int) -> None:
    """Type `value` into the number input labelled `label` and submit it (Enter), then wait for the rerun."""
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    settle(page)


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label`."""
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first.click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page)


def slider_thumb(page, group: str):
    """The thumb of the Plan page's slider for `group` (a slider whose label starts with its name)."""
    return page.locator('[data-testid="stSlider"]').filter(has_text=group).first.get_by_role("slider")


def slider_text(page, group: str):
    """The value the slider for `group` shows above its thumb (the Plan page prints sparsities as %.3f)."""
    return page.locator('[data-testid="stSlider"]').filter(has_text=group).first.locator(
        '[data-testid="stSliderThumbValue"]')


def slider_value(page, group: str) -> float:
    return float(slider_text(page, group).inner_text())


def drag_to_end(page, thumb) -> None:
    """Drag a slider's thumb past the end of its track: it stops at its maximum."""
    thumb.scroll_into_view_if_needed()
    box = thumb.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 2000, y, steps=20)
    page.mouse.up()
    settle(page)


def click_until(page, button: str, done, tries: int = 3) -> None:
    """Click `button` until `done` holds: a text to show, or a function that raises AssertionError until then.

    A click that lands while a rerun is still running can be dropped by Streamlit, and clicking the
    button again is harmless.
    """
    from playwright.sync_api import expect

    check = done if callable(done) else lambda: expect(page.get_by_text(done)).to_be_visible(timeout=60_000)
    for attempt in range(tries):
        target = page.get_by_role("button", name=button)
        if attempt == 0 or target.is_visible():  # gone: the click worked, the page is only slow to show it
            target.click()
        try:
            check()
            return
        except AssertionError:
            if attempt == tries - 1:
                raise
