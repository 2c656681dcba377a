"""The Plan page predicts latency once its latency tables are measured, and allocates to a budget in milliseconds.

Pure helpers first, then the app (AppTest) on the sample ResNet-20, whose latency model (layer tables
and whole-model calibration, `prunecore.latency`) is measured for real in a few seconds.
"""

from __future__ import annotations

import math

import pytest
from streamlit.testing.v1 import AppTest

import prunecore as pc
from dashboard import charts, state
from dashboard_sweeps import FAST, open_app, run_sweep, store  # noqa: F401 (store: the module's run store)
from prunecore.latency import latency_model


LEVELS = FAST["sweep_levels"]


# -- pure helpers ---------------------------------------------------------------------------------
def test_the_latency_budget_starts_at_70_percent_of_dense_and_steps_by_about_a_hundredth():
    assert state.latency_budget_default(1.2715) == 0.89
    assert state.latency_budget_default(41.2) == 28.8
    assert state.latency_step(1.27) == 0.01 and state.latency_step(41.2) == 0.1 and state.latency_step(0.05) == 1e-4
    assert set(state.BUDGET_LABELS) == set(pc.plan.BUDGET_KINDS)  # every budget kind prunecore knows is offered


# -- the app --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept():
    """The quick sweep of the sample resnet20, done as a job: the Plan page finds its curves."""
    run_sweep(open_app("sensitivity"))


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def latency_card(at: AppTest):
    return next((m for m in at.metric if m.label == "Predicted latency"), None)


def kept(at: AppTest) -> dict[str, int]:
    return {name: len(g.keep) for name, g in at.session_state[state.EDITED_PLAN].groups.items()}


def the_latency_model(at: AppTest):
    """The page's latency model, read again from the run store the page measured it into (no timing)."""
    sample = pc.load_sample("resnet20")
    graph = pc.trace(sample.model, sample.example)
    problem = pc.allocation_problem(at.session_state[state.CURVES][1], graph, sample.model)
    runs = pc.RunStore(state.store_path())
    try:
        return latency_model(sample.model, sample.example, graph, store=runs, round_to=problem.round_to,
                             progress=False)  # fmt: skip
    finally:
        runs.close()


def test_the_plan_page_predicts_latency_and_allocates_to_a_budget_in_milliseconds(swept, monkeypatch):
    builds = []
    real = state.latency_model
    monkeypatch.setattr(state, "latency_model", lambda *a, **k: builds.append(k["runtime"]) or real(*a, **k))
    at = ok(open_app("plan"))
    assert latency_card(at) is None and "latency (ms)" not in at.radio(key=state.BUDGET_KIND).options

    at.button(key=state.MEASURE_LATENCY).click().run()
    ok(at)
    assert builds == ["torch"]
    lm = the_latency_model(at)
    card = latency_card(at)
    assert card.value == charts.format_ms(lm.price(kept(at)))
    assert card.proto.delta == f"{lm.price(kept(at)) / lm.dense_ms * 100:.1f} % of dense"
    assert "median error" in card.proto.help and f"over {len(lm.calibration)} whole-model timings" in card.proto.help
    assert "batch size 1" in card.proto.help and lm.machine in card.proto.help

    group = "layer3.0.conv1"  # a slider move is priced at once
    at.slider(key=state.sparsity_key(group)).set_value(0.5).run()
    ok(at)
    assert latency_card(at).value == charts.format_ms(lm.price(kept(at)))

    at.radio(key=state.BUDGET_KIND).set_value("latency").run()
    assert at.number_input(key=state.LATENCY_MS).value == state.latency_budget_default(lm.dense_ms)
    groups = at.session_state[state.EDITED_PLAN].groups  # each at its largest swept sparsity: the least reachable
    floor = lm.price({n: math.ceil(g.size * (1 - max(LEVELS)) - 1e-9) for n, g in groups.items()})
    assert floor < lm.dense_ms
    budget = round((floor + lm.dense_ms) / 2, 4)  # reachable however loaded the machine was while timing
    at.number_input(key=state.LATENCY_MS).set_value(budget).run()
    at.button(key="reallocate").click().run()  # the edited slider stays until re-allocated
    ok(at)
    plan = at.session_state[state.EDITED_PLAN]
    assert plan.allocation.budget == pc.Budget(latency=budget)
    assert lm.price(kept(at)) <= budget + 1e-9 and not any("over the budget" in w.value for w in at.warning)
    assert latency_card(at).value == charts.format_ms(lm.price(kept(at)))

    at.number_input(key=state.LATENCY_MS).set_value(round(floor / 2, 4)).run()
    assert not at.exception
    assert any("smallest reachable latency" in e.value for e in at.error), [e.value for e in at.error]

    at.button(key=state.MEASURE_LATENCY).click().run()  # the same model, runtime and batch: cached, not rebuilt
    assert builds == ["torch"]
    assert at.number_input(key=state.LATENCY_MS).value == state.latency_budget_default(lm.dense_ms)

    at.session_state[state.LATENCY] = None  # no latency model (another model loaded): back to a FLOPs budget
    at.run()
    ok(at)
    assert at.radio(key=state.BUDGET_KIND).value == "flops" and latency_card(at) is None
