"""The dashboard's data: what each page reads from the store, cached until the store changes.
Kept apart from the widgets (app.py) so that benchmarks/bench_dashboard.py times this code.

Every cache key holds the study's change token (`tracking.change_token`: one small query on
a database store), so a rerun after a run was added, ended or logged an epoch reads afresh,
and any other rerun is served from memory. A tracking server's token turns every TTL_S."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ablate import analysis, tracking
from ablate.tracking.sqlread import time_token

ACC_METRICS = ["val_acc", "best_val_acc", "test_acc"]
TTL_S = 30
# The run columns the pages read: final metrics and costs, not the per-epoch keys. A tab that
# needs another metric adds it here (load_runs reads only these from the store).
RUN_METRICS = tuple(dict.fromkeys([*ACC_METRICS, *analysis.COST_METRICS,
                                   *tracking.FINAL_METRICS]))
CURVE_METRICS = ("val_acc", "train_loss")


@st.cache_data(ttl=10, show_spinner=False)
def studies(uri: str) -> pd.DataFrame:
    """The study picker's list: name, runs, running (one grouped query on a database)."""
    return tracking.study_summary(uri)


def token(study: str, uri: str) -> tuple:
    """The study's change token; while runs are RUNNING it also turns every TTL_S, so that a
    driver that died (its runs shown killed, `without_orphans`) shows without a new write."""
    tok = tracking.change_token(study, uri, TTL_S)
    if tok[0] == "sql" and len(tok) > 4 and tok[4]:
        tok += time_token(TTL_S)
    return tok


def runs(study: str, uri: str) -> pd.DataFrame:
    """The study's runs (final metrics, the params the verdict states: budget and precision;
    no other params)."""
    return _runs(study, uri, token(study, uri))


@st.cache_data(show_spinner=False, max_entries=16)
def _runs(study: str, uri: str, tok: tuple) -> pd.DataFrame:
    from ablate.tracking.lease import without_orphans

    return without_orphans(tracking.load_runs(study, uri, params=False, metrics=RUN_METRICS),
                           uri, study)


def curves(study: str, uri: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    """Per-epoch val_acc and train_loss of these runs (one query per 500 runs)."""
    return _curves(study, uri, run_ids, token(study, uri))


@st.cache_data(show_spinner=False, max_entries=16)
def _curves(study: str, uri: str, run_ids: tuple[str, ...], tok: tuple) -> pd.DataFrame:
    return tracking.load_curves(study, uri, list(run_ids), metrics=CURVE_METRICS)


@st.cache_resource(show_spinner=False, max_entries=32)
def frontier(df: pd.DataFrame, metric: str, factors: tuple[str, ...], cost: str,
             color: str | None, symbol: str | None, log_x: bool):
    """(configurations, frontier, figure) of these runs: seed means, the Pareto frontier and
    its Plotly figure, built once per (runs, choices). A resource cache: the same objects come
    back (no copy of a 1,000-point figure on every rerun); callers do not modify them."""
    from ablate import plots

    agg = analysis.aggregate(df, metric, list(factors))
    agg = agg[agg[cost].notna()] if cost in agg else agg
    front = analysis.frontier(agg, cost)
    return agg, front, plots.frontier_figure(agg, front, cost, metric, color, symbol, log_x)
