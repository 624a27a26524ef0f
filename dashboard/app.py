"""Source-checkout entry point: `streamlit run dashboard/app.py` runs the packaged app,
ablate/dashboard/app.py (what `ablate dashboard` runs), afresh on every rerun."""

import runpy

runpy.run_module("ablate.dashboard.app", run_name="__main__")
