"""The dashboard as several users meet it, in a real browser: sessions at once, closed tabs, Cancel, locks, own models.

One server for the module, with a quick sweep whose worker waits after every batch
(`PRUNECORE_JOBS_TEST_DELAY`), so each test can act while a sweep is mid-way. Tests that need a
sweep of their own use their own image limit (Model page), which makes their own job key; the
Plan-page test reuses whichever sweep of the default settings exists, or runs it.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import torchvision

from browser import FAST, choose, drag_to_end, go, new_page, no_exception, serve, settle, skip_without_browser
from browser import click_until, slider_text, slider_thumb, slider_value, type_number

skip_without_browser()

from browser import chromium  # noqa: E402
from playwright.sync_api import Page, expect  # noqa: E402

from prunecore import jobs  # noqa: E402

LIMIT = "Use at most N images or text blocks (0: all)"
DELAY_S = "1"  # per batch: a quick sweep of resnet20 stays running for half a minute


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store") / "runs.db"


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    env = {"PRUNECORE_STORE": str(store), "PRUNECORE_DASHBOARD_DEFAULTS": json.dumps(FAST),
           jobs.DELAY_ENV: DELAY_S}  # fmt: skip
    with serve(env, tmp_path_factory.mktemp("log") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def _progress(page: Page):
    return page.locator('[data-testid="stProgress"]')


def _batches_done(page: Page) -> int:
    """How many batches the progress bar on the page says are done."""
    found = re.search(r"([\d,]+) of [\d,]+ batches", _progress(page).inner_text())
    return int(found.group(1).replace(",", "")) if found else 0


def _start_sweep(page: Page) -> None:
    """On the Sensitivity page: press Run sweep and wait until the worker reports a batch done."""
    click_until(page, "Run sweep", lambda: expect(page.get_by_role("button", name="Cancel")).to_be_visible(
        timeout=60_000))
    expect(_progress(page)).to_contain_text(re.compile(r"[1-9][\d,]* of [\d,]+ batches"))


def _curves_shown(page: Page) -> None:
    """Wait until the sweep is done and the page shows its curves (the panel reruns the page)."""
    expect(page.get_by_text(re.compile(r"Run [0-9a-f]+: \d+ groups"))).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
    settle(page)


def test_one_session_sweeps_while_another_changes_the_model_and_neither_errs(server, browser):
    sweeping = new_page(browser, server)
    go(sweeping, "Sensitivity")
    _start_sweep(sweeping)

    other = new_page(browser, server)  # meanwhile a second user loads and traces another model
    choose(other, "Sample", "vit")
    expect(other.locator('[data-testid="stSidebar"]')).to_contain_text("sample:vit")
    go(other, "Sensitivity")
    expect(other.get_by_role("button", name="Run sweep")).to_be_visible()  # vit has its own job, not started
    no_exception(other)
    no_exception(sweeping)

    _curves_shown(sweeping)
    no_exception(sweeping)
    expect(sweeping.locator('[data-testid="stSidebar"]')).to_contain_text("sample:resnet20")
    go(other, "Model")
    no_exception(other)
    expect(other.locator('[data-testid="stSidebar"]')).to_contain_text("sample:vit")


def test_a_sweep_goes_on_when_its_tab_closes_and_a_new_tab_follows_it(server, browser, store):
    first = new_page(browser, server)
    type_number(first, LIMIT, 48)  # settings of this test's own: a job of its own
    go(first, "Sensitivity")
    _start_sweep(first)
    done_when_closed = _batches_done(first)
    key = next(j.key for j in jobs.list_jobs(store) if jobs.read_job(j.key, store).limit == 48)
    first.close()

    later = jobs.status(key, store)
    for _ in range(240):  # the worker goes on without any tab
        if later.done > done_when_closed or later.state not in jobs.ACTIVE:
            break
        time.sleep(0.5)
        later = jobs.status(key, store)
    assert later.done > done_when_closed, later

    reopened = new_page(browser, server)
    type_number(reopened, LIMIT, 48)  # the same settings find the same job: no Run button, its progress
    go(reopened, "Sensitivity")
    if jobs.status(key, store).state in jobs.ACTIVE:
        expect(reopened.get_by_role("button", name="Cancel")).to_be_visible()
        assert _batches_done(reopened) >= later.done
    _curves_shown(reopened)
    assert jobs.status(key, store).state == "done"
    no_exception(reopened)


def test_cancel_stops_the_sweep_and_resume_finishes_it(server, browser, store):
    page = new_page(browser, server)
    type_number(page, LIMIT, 32)
    go(page, "Sensitivity")
    _start_sweep(page)
    click_until(page, "Cancel", lambda: expect(_progress(page)).to_contain_text("cancelled", timeout=60_000))
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
    stopped = _batches_done(page)
    page.wait_for_timeout(3000)  # a cancelled worker does nothing more
    assert _batches_done(page) == stopped
    no_exception(page)

    click_until(page, "Resume", lambda: expect(page.get_by_role("button", name="Cancel").or_(
        page.get_by_text(re.compile(r"Run [0-9a-f]+: \d+ groups")))).to_be_visible(timeout=60_000))
    _curves_shown(page)
    no_exception(page)


def test_a_lock_keeps_its_value_and_edits_survive_a_new_budget(server, browser):
    page = new_page(browser, server)
    go(page, "Plan")
    run, cards = page.get_by_role("button", name="Run sweep"), page.get_by_text("FLOPs kept").first
    expect(run.or_(cards)).to_be_visible()  # the sweep of these settings is done already, or not yet run
    if run.is_visible():
        run.click()
    expect(cards).to_be_visible()
    settle(page)

    locked, edited = "layer3.0.conv1", "layer2.0.conv1"
    thumb = slider_thumb(page, locked)
    thumb.focus()
    thumb.press("ArrowLeft")  # one unit denser than the method's value: an edit
    settle(page)
    pinned = slider_value(page, locked)
    _lock(page, locked).click()
    settle(page)
    drag_to_end(page, slider_thumb(page, edited))  # far past what any curve-driven method picks
    moved = slider_value(page, edited)
    assert moved > 0.9

    budget = page.locator('[data-testid="stSlider"]').filter(has_text="Keep this fraction").get_by_role("slider")
    budget.focus()
    budget.press("ArrowLeft")  # a new budget: edits stay, and the page says how to apply it
    settle(page)
    expect(page.get_by_text("edited group(s) keep your values")).to_be_visible()
    assert (slider_value(page, locked), slider_value(page, edited)) == (pinned, moved)

    click_until(page, "Re-allocate unlocked groups",
                lambda: expect(slider_text(page, edited)).not_to_have_text(f"{moved:.3f}", timeout=30_000))
    settle(page)
    assert slider_value(page, locked) == pinned  # the lock held
    assert slider_value(page, edited) <= 0.6 + 1e-9  # the method moved the unlocked edit (curves end at 0.6)
    no_exception(page)


def test_a_slider_move_is_measured_in_the_background_and_the_page_stays_responsive(server, browser):
    page = new_page(browser, server)
    go(page, "Plan")
    run, cards = page.get_by_role("button", name="Run sweep"), page.get_by_text("FLOPs kept").first
    expect(run.or_(cards)).to_be_visible()
    if run.is_visible():
        run.click()
    expect(cards).to_be_visible()
    page.get_by_text("Measure in the background").click()  # the tests' defaults turn it off
    settle(page)

    thumb = slider_thumb(page, "layer2.1.conv1")
    thumb.focus()
    thumb.press("ArrowRight")
    expect(page.get_by_text(re.compile("Measuring this plan"))).to_be_visible()
    flops = page.locator('[data-testid="stMetric"]').filter(has_text="FLOPs kept").first
    before = flops.locator('[data-testid="stMetricValue"]').inner_text()
    other = slider_thumb(page, "layer3.1.conv1")  # meanwhile the sliders answer at once
    other.focus()
    other.press("ArrowRight")
    expect(flops).not_to_contain_text(before, timeout=30_000)
    measured = page.locator('[data-testid="stMetric"]').filter(has_text="Measured accuracy")
    expect(measured).to_be_visible()  # the worker measured the plan the sliders rest on
    expect(measured).to_contain_text("vs predicted")
    no_exception(page)


def _lock(page: Page, group: str):
    """The lock checkbox in `group`'s slider row (the innermost row of columns holding its slider)."""
    slider = page.locator('[data-testid="stSlider"]').filter(has_text=group)
    row = page.locator('[data-testid="stHorizontalBlock"]').filter(has=slider).last
    return row.locator('[data-testid="stCheckbox"]')


def test_a_torchvision_architecture_with_ten_classes_takes_uploaded_weights(server, browser, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "my-resnet18-digits.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)

    page = new_page(browser, server)
    page.get_by_text("torchvision architecture").click()
    settle(page)
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(weights))
    settle(page)
    expect(page.get_by_text("my-resnet18-digits.pt").first).to_be_visible()  # 1000 classes by default: refused,
    expect(page.locator('[data-testid="stAlert"]').filter(has_text="my-resnet18-digits.pt")).to_be_visible()

    type_number(page, "Classes (num_classes)", 10)  # ... and named by the upload's own file name
    sidebar = page.locator('[data-testid="stSidebar"]')
    expect(sidebar).to_contain_text("torchvision:resnet18(num_classes=10)")
    expect(sidebar).to_contain_text("Weights uploaded")
    expect(page.locator('[data-testid="stMetric"]').filter(has_text="Channel groups")).to_be_visible()
    expect(page.get_by_text("The sample digits are 1x28x28 images")).to_be_visible()  # they do not fit resnet18
    page.get_by_role("button", name="Use random label-free data").click()
    settle(page)
    expect(page.get_by_text(re.compile(r"^Data: "))).to_be_visible()
    expect(sidebar).to_contain_text("random")
    no_exception(page)
