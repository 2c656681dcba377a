"""prunecore dashboard: `streamlit run dashboard/app.py`, from any folder.

It listens on 127.0.0.1 only: `dashboard/.streamlit/config.toml`, next to this file, says so, and
Streamlit (>= 1.46) reads that script-level config wherever it is started from. Serving other
machines takes `--server.address ADDRESS`; every page then warns, and the Factory box (which runs
code on this machine) stays off unless PRUNECORE_DASHBOARD_REMOTE=1 (`state.factory_allowed`).

This file only builds the navigation; each page is a short script in `dashboard/pages/` that starts
with `state.page(title)` (session defaults, the shared sidebar, the title). The sidebar is drawn again
as the page loads things and once it is done, so it names the model, data and run the page has just
loaded, not those of the previous run.
"""

import os

import streamlit as st

from dashboard import state

st.set_page_config(page_title="prunecore", layout="wide")
warning = state.exposure_warning(st.get_option("server.address"), os.environ)
if warning:
    st.warning(warning, icon=":material/public:")
pages = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/sensitivity.py", title="Sensitivity", icon=":material/show_chart:"),
    st.Page("pages/plan.py", title="Plan", icon=":material/tune:"),
    st.Page("pages/validate.py", title="Validate", icon=":material/fact_check:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
st.navigation(pages).run()
state.sidebar()  # what the page left loaded (pages also redraw it as they load: see state.sidebar)
