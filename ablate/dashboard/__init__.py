"""The Streamlit dashboard (`app.py`), shipped inside the package so `ablate dashboard` works
from a wheel. Nothing imports it: Streamlit runs `app.py` as a script. The only place
Streamlit is used."""
