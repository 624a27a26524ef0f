"""The dashboard's Importance tab. An Optuna search (runs tagged `optuna.study_name`): Optuna's
own evaluators, fANOVA and PED-ANOVA, read from the search's Optuna storage. A grid: the
analysis's variance shares with their bootstrap CIs. Numbers from ablate.analysis.importance."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from ablate import plots, search
from ablate.analysis import Analysis
from ablate.analysis.importance import grid_importance, optuna_importance
from ablate.errors import AblateError, mask_url

STUDY_TAG = "optuna.study_name"


def default_storage(uri: str) -> str:
    """Where the search's trials are: ABLATE_OPTUNA_STORAGE, else an optuna.db beside a
    SQLite tracking store (ablate's default layout keeps both in one folder), else the
    default search storage."""
    if os.environ.get("ABLATE_OPTUNA_STORAGE"):
        return os.environ["ABLATE_OPTUNA_STORAGE"]
    if uri.startswith("sqlite:///"):
        beside = Path(uri[len("sqlite:///"):]).parent / "optuna.db"
        if beside.exists():
            return f"sqlite:///{beside}"
    return search.default_storage_url()


@st.cache_data(ttl=60, show_spinner="computing importances (fANOVA, PED-ANOVA)")
def importances(url: str, name: str, objective: int) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(importances, notes, objective directions) of Optuna study `name` in storage `url`."""
    import optuna

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise AblateError(f"no Optuna storage at {mask_url(url)} (looking creates none): "
                          "give the study's search.storage URL")
    storage = search.open_storage(url)
    try:
        st_ = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise AblateError(f"no Optuna study '{name}' in {mask_url(url)}: point the "
                          "storage field (or ABLATE_OPTUNA_STORAGE) at the study's "
                          "search.storage") from None
    directions = [d.name.lower() for d in st_.directions]
    if st_.metric_names:  # ablate names them after search.objectives
        directions = [f"{m}: {d}" for m, d in zip(st_.metric_names, directions, strict=True)]
    imp, notes = optuna_importance(st_, objective=min(objective, len(directions) - 1))
    return imp, notes, directions


def importance_tab(df: pd.DataFrame, a: Analysis | str, uri: str) -> None:
    names = (sorted({str(v) for v in df[STUDY_TAG].dropna()}) if STUDY_TAG in df else [])
    if names:
        _search(names, uri)
    else:
        _grid(a)


def _search(names: list[str], uri: str) -> None:
    c1, c2, c3 = st.columns([2, 3, 1])
    name = c1.selectbox("Optuna study", names, key="imp_study")
    url = c2.text_input("Optuna storage", value=default_storage(uri), key="imp_storage",
                        help="The study's search.storage (SQLAlchemy URL).")
    objective = int(c3.number_input("objective", min_value=0, value=0, step=1,
                                    key="imp_objective"))
    try:
        imp, notes, directions = importances(url, name, objective)
    except AblateError as e:
        st.warning(str(e))
        return
    for n in notes:
        st.caption(f"Note: {n}")
    if imp.empty:
        return
    st.plotly_chart(plots.importance_figure(imp), width="stretch", key="importance_chart")
    table = imp.pivot(index="param", columns="evaluator", values="importance")
    table = table.sort_values(table.columns[0], ascending=False).reset_index()
    st.dataframe(table, hide_index=True, key="importance_table")
    st.caption(f"Objective {min(objective, len(directions) - 1)}: "
               f"{directions[min(objective, len(directions) - 1)]} (of {', '.join(directions)}), "
               "complete trials only. fANOVA: share of the objective's variance each "
               "parameter explains (a random forest's functional ANOVA). PED-ANOVA: how far "
               "a parameter's distribution among the top 10% of trials is from its "
               "distribution among all trials. Both from optuna.importance.")


def _grid(a: Analysis | str) -> None:
    if isinstance(a, str):
        st.info(f"No importance: {a}")
        return
    g = grid_importance(a)
    st.plotly_chart(plots.shares_figure(g, a.metric),
                    width="stretch", key="importance_chart")
    st.dataframe(g, hide_index=True, key="importance_table")
    st.caption("A grid's importance is its variance shares: each term's type II sum of "
               "squares over the total, with bootstrap 95% CIs over seeds (the Verdict tab's "
               "numbers). Runs of an Optuna search (`search:`) get fANOVA and PED-ANOVA here.")
