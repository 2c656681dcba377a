"""prunecore dashboard: `streamlit run dashboard/app.py`, from any folder.

It listens on 127.0.0.1 only: `dashboard/.streamlit/config.toml`, next to this file, says so, and
Streamlit (>= 1.46) reads that script-level config wherever it is started from. Serving other
machines takes `--server.address ADDRESS`; every page then warns, and the Factory box (which runs
code on this machine) stays off unless PRUNECORE_DASHBOARD_REMOTE=1 (`state.factory_allowed`).

This file only builds the navigation; each page is a short script in `dashboard/views/` that starts
with `state.page(title)` (session defaults, the shared sidebar, the title). The folder is not called
`pages/`: Streamlit would list that folder's files as a navigation of their own ("app", "export", ...)
in every new tab until the first script run replaced it. The sidebar is drawn again
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
    st.Page("views/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("views/sensitivity.py", title="Sensitivity", icon=":material/show_chart:"),
    st.Page("views/plan.py", title="Plan", icon=":material/tune:"),
    st.Page("views/validate.py", title="Validate", icon=":material/fact_check:"),
    st.Page("views/recover.py", title="Recover", icon=":material/healing:"),
    st.Page("views/export.py", title="Export", icon=":material/download:"),
]
st.navigation(pages).run()
state.sidebar()  # what the page left loaded (pages also redraw it as they load: see state.sidebar)
