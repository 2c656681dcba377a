"""Plan page: a budget and a method give an allocation; per-group sliders edit it with live predictions."""

import streamlit as st

import prunecore as pc
from dashboard import charts, state
from prunecore.evaluate import get_metric

state.page("Plan")
ws = state.workspace()
frame = state.curves(ws)
problem = state.problem(ws, frame)
names = list(problem.cost.groups)

c1, c2, c3 = st.columns(3)
c1.radio("Budget on", ["flops", "params"], key=state.BUDGET_KIND, horizontal=True)
c2.slider("Keep this fraction", 0.05, 1.0, step=0.05, key=state.BUDGET_VALUE)
methods = [m for m in pc.list_methods() if problem.curves or m in ("uniform", "global")]
c3.selectbox("Method", methods, key=state.METHOD)
budget = pc.Budget(**{st.session_state[state.BUDGET_KIND]: st.session_state[state.BUDGET_VALUE]})
locked = {n: st.session_state[state.sparsity_key(n)] for n in names if st.session_state.get(state.lock_key(n))}

method = st.session_state[state.METHOD]
key = (ws.spec, frame.attrs.get("run_id", ""), str(budget), method, tuple(sorted(locked.items())))
reset = st.button("Reset sliders to the method", key="reset")
loaded = st.session_state.pop(state.LOADED, None)
if loaded is not None:  # an uploaded plan: its values stay until the budget or method changes
    st.session_state[state.ALLOCATED] = {"key": key, "sparsities": loaded}
allocated = st.session_state.get(state.ALLOCATED)
if reset or allocated is None or allocated["key"] != key:
    with state.user_errors():
        plan = pc.solve(problem, budget, method, locked=locked)
    st.session_state[state.ALLOCATED] = {"key": key, "sparsities": plan.sparsities}
    for name, s in plan.sparsities.items():
        st.session_state[state.sparsity_key(name)] = s  # exact: rounding could change a large group's kept count
reference = st.session_state[state.ALLOCATED]["sparsities"]
for name in names:
    st.session_state.setdefault(state.sparsity_key(name), 0.0)
current = {n: st.session_state[state.sparsity_key(n)] for n in names}

# live numbers: pure arithmetic on the precomputed problem, no model pass
params, flops = problem.price(current)
dense_params, dense_flops = problem.cost.dense
predicted = problem.predict(current)
st.session_state[state.EDITED_PLAN] = problem.plan(current, pc.Allocation(method, budget, problem.metric))
cards = st.columns(2 + len(problem.dense))
cards[0].metric("FLOPs kept", f"{flops / dense_flops:.1%}", help=f"{flops:,} of {dense_flops:,} MACs per example")
cards[1].metric("Params kept", f"{params / dense_params:.1%}", help=f"{params:,} of {dense_params:,}")
for card, (name, dense) in zip(cards[2:], problem.dense.items()):
    value = predicted.get(name)
    card.metric(f"Predicted {name}", "n/a" if value is None else charts.format_metric(name, value),
                delta=None if value is None else f"{value - dense:+.4f} vs dense",
                delta_color="normal" if get_metric(name).higher_is_better else "inverse")  # fmt: skip
budgeted, budgeted_dense = (flops, dense_flops) if budget.kind == "flops" else (params, dense_params)
if budgeted > budget.target(budgeted_dense):
    st.warning(f"The edited plan is over the budget ({budget}).")
beyond = [n for n in problem.curves if current[n] > problem.curves[n].fractions[-1] + 1e-9]
if beyond:
    st.caption(f"{len(beyond)} group(s) beyond their largest measured sparsity ({', '.join(beyond[:5])}"
               f"{', ...' if len(beyond) > 5 else ''}): the prediction holds their last measured value.")  # fmt: skip

left, right = st.columns([3, 2])
with left:
    s1, s2 = st.columns(2)
    search = s1.text_input("Search groups", key=state.SEARCH)
    order = s2.selectbox("Sort by", ["position", "sensitivity", "cost"], key=state.ORDER)
    shown = [n for n in names if search.lower() in n.lower()]
    if order == "sensitivity":
        shown.sort(key=lambda n: -float(problem.damage(n, [problem.kept({n: 0.5})[n]])[0]) if n in problem.curves
                   else 0.0)  # most damaged by half its units first; fmt: skip
    elif order == "cost":
        shown.sort(key=lambda n: -ws.flop_shares.get(n, 0.0))
    for name in shown:
        a, b = st.columns([5, 1])
        a.slider(name, 0.0, 0.99, step=0.01, key=state.sparsity_key(name),
                 help=f"{ws.graph[name].size} units; {ws.flop_shares.get(name, 0):.0%} of FLOPs touch it")  # fmt: skip
        b.checkbox("lock", key=state.lock_key(name), help="keep this value when the method re-allocates")
with right:
    st.plotly_chart(charts.allocation_figure(current, reference, order=names), width="stretch",
                    key="allocation_chart")  # fmt: skip
    if problem.metric:
        with state.user_errors(stop=False):  # the sliders above stay usable without the front
            front = state.pareto(ws.spec, frame.attrs.get("run_id", ""), budget.kind, problem)
            st.plotly_chart(
                charts.pareto_figure(front, problem.metric,
                                     current=(budgeted, predicted.get(problem.metric, float("nan"))),
                                     dense=(budgeted_dense, problem.dense[problem.metric]), cost=budget.kind),
                width="stretch", key="pareto_chart",
            )  # fmt: skip
