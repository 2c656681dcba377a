"""Plan page: a budget and a method give an allocation; per-group sliders edit it with live predictions.

Once the sliders rest for a second, a background worker measures their plan on the sweep's data
(`state.live_measurement`): measured cards appear under the predicted ones, and every plan
measured shows on the Pareto chart. No slider waits for it. "Refine by measuring" runs `prunecore.refine`
on the current plan in a background worker (`state.refine_job`), and "Use the refined plan" loads its result.

Each slider moves its group's sparsity one unit a step (one `round_to` multiple): a 4-head group
in quarters, every position a kept count, which shows beside it. Edits are never thrown away
unasked: a lock pins a group's current kept count, and the method re-allocates the unlocked
groups only when the user presses "Re-allocate unlocked groups", or by itself when the budget,
method or sweep changes and no unlocked slider was edited (`state.sync_sliders`).

Under Latency, "Measure latency tables" builds a latency model of the model on this machine
(`prunecore.latency`, its tables kept in the run store): from then on the cards predict the
sliders' latency too, and the budget may be in milliseconds.
"""

import math

import streamlit as st

import prunecore as pc
from dashboard import charts, state
from prunecore.allocate import get_method
from prunecore.evaluate import get_metric
from prunecore.latency import get_runtime, list_runtimes

SCROLL_PX = 500  # the sliders and the per-group chart scroll inside this height, under the cards

state.page("Plan")
ws = state.workspace()
frame = state.curves(ws)
problem = state.problem(ws, frame)
names = list(problem.cost.groups)
sizes = {n: ws.graph[n].size for n in names}

panel = st.expander("Latency", icon=":material/timer:")
l1, l2, l3 = panel.columns([3, 1, 2], vertical_alignment="bottom")
l1.selectbox("Runtime", list_runtimes(usable=True), key=state.LATENCY_RUNTIME, format_func=lambda r: f"{r}: "
             f"{get_runtime(r).description}", help="What runs the model whose latency is predicted.")  # fmt: skip
l2.number_input("Batch size", min_value=1, max_value=4096, step=1, key=state.LATENCY_BATCH)
if l3.button("Measure latency tables", key=state.MEASURE_LATENCY,
             help="Times each prunable layer alone at a few widths, then the whole model at a few plans, on this "
                  "machine, and fits the layer tables to the whole-model timings. The run store keeps both, so "
                  "measuring again for this model, runtime and batch size reads them at once."):  # fmt: skip
    state.measure_latency(ws, problem.round_to)
lm = state.latency(ws, problem.round_to)
problem = state.with_latency_model(problem, lm)
if lm is None:
    panel.caption("Measure latency tables to see the sliders' predicted latency and to budget in milliseconds.")
else:
    about = charts.latency_note(lm.dense_ms, runtime=lm.runtime, batch=lm.batch, machine=lm.machine, error=lm.error,
                                timings=len(lm.calibration))  # fmt: skip
    panel.caption(about)
    if (lm.runtime, lm.batch) != (st.session_state[state.LATENCY_RUNTIME], st.session_state[state.LATENCY_BATCH]):
        panel.caption(f"Predicting with {lm.runtime} at batch size {lm.batch}: press Measure latency tables to "
                      "predict with the runtime and batch size chosen above.")  # fmt: skip
    panel.dataframe(charts.calibration_rows(lm.calibration), hide_index=True, key="latency_calibration",
                    column_config={"error": st.column_config.NumberColumn(format="percent")})  # fmt: skip

c1, c2, c3, c4 = st.columns([2, 3, 2, 2], vertical_alignment="bottom")
c1.radio("Budget on", state.budget_kinds(lm), format_func=lambda k: state.BUDGET_LABELS[k], key=state.BUDGET_KIND,
         horizontal=True)  # fmt: skip
if st.session_state[state.BUDGET_KIND] == "latency":
    c2.number_input("Latency at most (ms)", min_value=state.LATENCY_MIN_MS, step=state.latency_step(lm.dense_ms),
                    format="%.4g", key=state.LATENCY_MS,
                    help=f"Predicted milliseconds per forward pass at batch size {lm.batch} on {lm.runtime}; the "
                         f"dense model: {charts.format_ms(lm.dense_ms)}."
                         + (f" Allocation keeps widths to multiples of {lm.align}, which {lm.runtime} runs on its "
                            "fast path." if lm.align > 1 else ""))  # fmt: skip
else:
    c2.slider("Keep this fraction", 0.05, 1.0, step=0.05, key=state.BUDGET_VALUE)
methods = [m for m in pc.list_methods() if problem.curves or not get_method(m).needs_curves]
c3.selectbox("Method", methods, key=state.METHOD)
reallocate = c4.button("Re-allocate unlocked groups", key="reallocate",
                       help="Apply the method to every unlocked group; locked groups keep their kept counts. "
                            "Until you press it, your edits stay.")  # fmt: skip
budget = state.chosen_budget()
method = st.session_state[state.METHOD]
limits, allocating, exclude = state.statable_limits(ws), problem, []
if limits is not None:  # a transformers model: offer plans its config can state
    st.toggle("Only what transformers can load", key=state.STATABLE,
              help="Allocate one head count and one MLP width for every layer (and, where the config derives the "
                   "head size from the width, the width with the heads), keeping the groups the config cannot "
                   "size dense, so that the Export page can save the pruned model for transformers' "
                   "from_pretrained. Sliders you edit afterwards may leave that.")  # fmt: skip
    if st.session_state[state.STATABLE]:
        allocating, exclude = limits.constrain(problem)
        kept_dense = sorted(set(limits.keep.values()))
        st.caption(f"{len(limits.ties)} set(s) of groups move together; {len(limits.keep)} group(s) stay dense"
                   + (": " + "; ".join(kept_dense) if kept_dense else "") + ".")  # fmt: skip
reference, note = state.sync_sliders(allocating, budget, method, frame.attrs.get("run_id", ""), reallocate, exclude)
if note:
    st.info(note)
current = state.slider_kept(problem)
sparsities = {n: state.sparsity_of(k, sizes[n]) for n, k in current.items()}

# live numbers: pure arithmetic on the precomputed problem, no model pass
report = problem.report(sparsities, budget)
params, flops, predicted = report.params, report.flops, report.predicted
dense_params, dense_flops = report.dense_params, report.dense_flops
st.session_state[state.EDITED_PLAN] = problem.plan(sparsities, pc.Allocation(method, budget, problem.metric))
lead = 2 if report.latency_ms is None else 3  # the cost cards before the metrics' cards, in both rows
cards = st.columns(lead + len(problem.dense))
cards[0].metric("FLOPs kept", f"{flops / dense_flops:.1%}", help=f"{flops:,} of {dense_flops:,} MACs per example")
cards[1].metric("Params kept", f"{params / dense_params:.1%}", help=f"{params:,} of {dense_params:,}")
if report.latency_ms is not None:
    value, fraction = charts.latency_card(report.latency_ms, report.dense_latency_ms)
    cards[2].metric("Predicted latency", value, delta=fraction, delta_color="off", delta_arrow="off", help=about)
for card, (name, dense) in zip(cards[lead:], problem.dense.items()):
    value = predicted.get(name, math.nan)
    change = None if math.isnan(value - dense) else value - dense
    card.metric(f"Predicted {name}", charts.format_metric(name, value),
                delta=None if change is None else charts.format_delta(name, change), delta_description="vs dense",
                delta_color=("off" if not change else "normal" if get_metric(name).higher_is_better else "inverse"),
                help=state.metric_help(name))  # fmt: skip
run_id = frame.attrs.get("run_id", "")
points = st.session_state.setdefault(state.LIVE_POINTS, {})
row = st.columns(lead + len(problem.dense))
row[0].toggle("Measure in the background", key=state.LIVE_ON,
              help="Once the sliders rest for a second, a background worker applies their plan, re-estimates "
                   "BatchNorm as the sweep did and measures it on the sweep's data; no slider waits.")  # fmt: skip
measured = None
if st.session_state[state.LIVE_ON]:
    job, measure_key = state.live_job(ws, st.session_state[state.EDITED_PLAN], problem.dense)
    with row[1]:
        measured = state.live_measurement(job, measure_key)  # None until the worker has measured these sliders
if measured is not None:
    points[measure_key] = (ws.spec, run_id, params, flops, dict(measured.metrics))
    row[1].caption(f"Measured: this plan applied, BatchNorm re-estimated on {measured.bn_recalibration} batches, "
                   f"on the sweep's data ({measured.data}).")  # fmt: skip
    for card, name in zip(row[lead:], problem.dense):
        value, guess = measured.metrics.get(name, math.nan), predicted.get(name, math.nan)
        gap = None if math.isnan(value - guess) else value - guess
        card.metric(f"Measured {name}", charts.format_metric(name, value),
                    delta=None if gap is None else charts.format_delta(name, gap), delta_description="vs predicted",
                    delta_color="off" if not gap else "normal" if get_metric(name).higher_is_better else "inverse",
                    help=f"{state.metric_help(name)} Measured in a background worker; the prediction above adds "
                         "up each group's own curve.")  # fmt: skip
if report.band:
    st.caption(f"Predicted by the predictor fitted on {report.predicted_by.plans} plans measured after the sweep, "
               "which knows that damage compounds; about 90 % of plans measure inside: " + ", ".join(
                   f"{m} {charts.format_metric(m, b.low)} to {charts.format_metric(m, b.high)}"
                   for m, b in report.band.items()) + ".")  # fmt: skip
elif report.predicted_by is not None:
    st.caption("Predicted by adding up each group's own curve, which is optimistic where a plan cuts many groups "
               "deeply: set Calibration plans in the sweep settings (Sensitivity page) to fit a predictor that "
               "knows damage compounds, or watch the measured cards.")  # fmt: skip
if report.over_budget:
    st.warning(f"The edited plan is over the budget ({budget}).")
with st.expander("Refine by measuring", icon=":material/science:"):
    st.number_input("Measured moves", min_value=5, max_value=500, step=5, key=state.REFINE_STEPS,
                    help="Each move is one plan measured in the background (about as long as the measured card "
                         "takes).")  # fmt: skip
    if not problem.curves:
        st.caption("Refinement moves the budget between swept groups: it needs the sensitivity curves.")
    elif budget.kind == "latency":
        st.caption("Refinement keeps a FLOPs or params budget: choose one above to refine this plan.")
    elif report.over_budget:
        st.caption("Refinement keeps the plan within its budget: bring the plan within it first.")
    else:
        st.caption("Predictions are least reliable where plans cut deep, so this measures instead: moves that shift "
                   "a slice of the budget between groups, each kept when the measured loss on the sweep's data "
                   "improves. Locked groups stay. It chooses on the sweep's data: check the result on other "
                   "data (Validate page).")  # fmt: skip
        locked = [n for n in names if st.session_state.get(state.lock_key(n))]
        refine_job, refine_key = state.refine_job(ws, st.session_state[state.EDITED_PLAN], run_id, locked,
                                                  allocating.ties)  # fmt: skip
        refined = state.refine_panel(refine_job, refine_key, state.job_status(refine_key))
        if refined is not None:
            changes = ", ".join(f"{m} {charts.format_metric(m, refined.start[m])} → "
                                f"{charts.format_metric(m, refined.metrics[m])}"
                                for m in refined.metrics if m in refined.start)  # fmt: skip
            st.markdown(f"**{refined.moves} of {len(refined.trials)} measured moves kept**: {changes} (measured on "
                        "the sweep's data).")  # fmt: skip
            st.button("Use the refined plan", key=state.USE_REFINED, type="primary", on_click=state.load_sliders,
                      args=(refined.plan,), disabled=not refined.moves,
                      help="Puts the refined plan's kept counts on the sliders, unlocked.")  # fmt: skip
if report.beyond:
    beyond = ", ".join(report.beyond[:5]) + (", ..." if len(report.beyond) > 5 else "")
    st.caption(f"{len(report.beyond)} group(s) beyond their largest measured sparsity ({beyond}): the prediction "
               "holds their last measured value.")  # fmt: skip

left, right = st.columns([3, 2])
with left:
    s1, s2 = st.columns(2)
    search = s1.text_input("Search groups", key=state.SEARCH)
    order = s2.selectbox("Sort by", ["position", "sensitivity", "cost"], key=state.ORDER)
    shown = [n for n in names if search.lower() in n.lower()]
    if order == "sensitivity":
        shown = problem.by_sensitivity(shown)
    elif order == "cost":
        shown.sort(key=lambda n: -ws.flop_shares.get(n, 0.0))
    with st.container(height=SCROLL_PX, key="sliders"):
        for name in shown:
            size, step = sizes[name], min(problem.round_to, sizes[name])
            a, b, c = st.columns([5, 2, 1.5], vertical_alignment="center")
            share = ws.flop_shares.get(name, 0)
            hint = (f"Sparsity: the fraction of its {size} units removed, one step = {step} unit(s); {share:.0%} "
                    f"of the FLOPs touch it. {state.FLOP_SHARE_HELP}")  # fmt: skip
            key = state.sparsity_key(name)
            if size <= step:
                a.markdown(f"`{name}`: one unit, cannot be pruned")
            elif size % step == 0:
                a.slider(name, 0.0, state.sparsity_of(step, size), step=step / size, format="%.3f", key=key, help=hint)
            else:  # a size that is not a multiple of round_to: uneven steps, each a count it can keep
                options = [state.sparsity_of(k, size) for k in reversed(state.kept_options(size, problem.round_to))]
                a.select_slider(name, options, format_func=lambda s: f"{s:.3f}", key=key, help=hint)
            b.markdown(state.kept_label(current[name], size))
            c.checkbox("lock", key=state.lock_key(name), help="Pin this kept count: re-allocation moves unlocked "
                       "groups only.")  # fmt: skip
with right, st.container(height=SCROLL_PX, key="allocation"):
    st.plotly_chart(charts.allocation_figure(sparsities, {n: state.sparsity_of(k, sizes[n])
                                                          for n, k in reference.items()}, order=names),
                    width="stretch", key="allocation_chart")  # fmt: skip
axis = "params" if budget.kind == "params" else "flops"  # a latency budget's front is drawn against FLOPs
budgeted, budgeted_dense = (flops, dense_flops) if axis == "flops" else (params, dense_params)
if problem.metric:
    with state.user_errors(stop=False):  # the sliders above stay usable without the front
        front = state.pareto(ws.spec, frame.attrs.get("run_id", ""), axis, state.problem_tag(problem), problem)
        st.plotly_chart(
            charts.pareto_figure(front, problem.metric, current=(budgeted, predicted.get(problem.metric, float("nan"))),
                                 dense=(budgeted_dense, problem.dense[problem.metric]), cost=axis,
                                 measured=[(f if axis == "flops" else p, m[problem.metric])
                                           for spec, run, p, f, m in points.values()
                                           if (spec, run) == (ws.spec, run_id) and problem.metric in m]),
            width="stretch", key="pareto_chart",
        )  # fmt: skip
    if budget.kind == "latency":
        st.caption("The front is drawn against FLOPs: its budgets are fractions, and a latency budget is milliseconds.")
