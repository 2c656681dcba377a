"""prunecore dashboard: `streamlit run dashboard/app.py` (binds to 127.0.0.1; see .streamlit/config.toml).

This file only builds the navigation; each page is a short script in `dashboard/pages/` that starts
with `state.page(title)` (session defaults, the shared sidebar, the title).
"""

import streamlit as st

st.set_page_config(page_title="prunecore", layout="wide")
pages = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/sensitivity.py", title="Sensitivity", icon=":material/show_chart:"),
    st.Page("pages/plan.py", title="Plan", icon=":material/tune:"),
    st.Page("pages/validate.py", title="Validate", icon=":material/fact_check:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
st.navigation(pages).run()
