"""The prunecore dashboard: a thin Streamlit shell over the prunecore API (`streamlit run dashboard/app.py`)."""
