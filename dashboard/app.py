"""ablate dashboard: accuracy-vs-cost frontiers and factor effects of a study.

Widgets only: data comes from ablate.tracking, numbers from ablate.analysis, figures from
ablate.plots. Launched by `ablate dashboard` (the tracking URI arrives in
ABLATE_TRACKING_URI).
"""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from ablate import analysis, plots, tracking
from ablate.errors import AblateError

ACC_METRICS = ["val_acc", "best_val_acc", "test_acc"]
TTL_S = 30

st.set_page_config(page_title="ablate", layout="wide")


def _short(f: str | None) -> str:
    return "none" if f is None else f.removeprefix("factor.")


@st.cache_data(ttl=TTL_S, show_spinner=False)
def studies(uri: str) -> list[str]:
    return tracking.list_studies(uri)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs(study: str, uri: str) -> pd.DataFrame:
    return tracking.load_runs(study, uri, params=False)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def curves(study: str, uri: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    return tracking.load_curves(study, uri, list(run_ids), metrics=("val_acc", "train_loss"))


def sidebar(uri: str) -> tuple[str | None, str, pd.DataFrame]:
    st.sidebar.title("ablate")
    st.sidebar.caption(f"tracking: `{uri}`")
    try:
        names = studies(uri)
    except AblateError as e:
        st.error(str(e))
        st.stop()
    if not names:
        st.info(f"No studies in `{uri}` yet. Run one first: `ablate run studies/quickstart.yaml`"
                " (or point the dashboard at another store with `--tracking-uri`).")
        st.stop()
    wanted = st.query_params.get("study")  # links can name a study: /?study=quickstart
    index = names.index(wanted) if wanted in names else 0
    study = st.sidebar.selectbox("study", names, index=index, key="study")
    metric = st.sidebar.selectbox("accuracy metric", ACC_METRICS, key="metric")
    df = runs(study, uri)
    if st.sidebar.button("refresh", key="refresh"):
        st.cache_data.clear()
        st.rerun()
    running = int((df["status"] == "running").sum()) if not df.empty else 0
    auto = st.sidebar.toggle("auto-refresh (10 s)", value=running > 0, key="auto",
                             help="On by default while trials are running.")
    if auto:
        _watch(study, uri)
    if df.empty:
        return study, metric, df
    statuses = sorted(df["status"].dropna().unique())
    default = [s for s in statuses if s in ("finished", "pruned")] or statuses
    chosen = st.sidebar.multiselect("status", statuses, default=default, key="status")
    keep = df["status"].isin(chosen)
    for f in analysis.factor_columns(df):
        levels = sorted(df[f].astype(object).where(df[f].notna(), analysis.OFF).astype(str)
                        .unique())
        pick = st.sidebar.multiselect(f.removeprefix("factor."), levels, default=levels,
                                      key=f"filter.{f}")
        keep &= df[f].astype(object).where(df[f].notna(), analysis.OFF).astype(str).isin(pick)
    return study, metric, df[keep]


@st.fragment(run_every=10)
def _watch(study: str, uri: str) -> None:
    """Re-read the store every 10 s; rerun the page when runs changed."""
    fresh = tracking.load_runs(study, uri, params=False)
    sig = (len(fresh), tuple(sorted(fresh["status"])) if not fresh.empty else (),
           float(fresh.get("val_acc", pd.Series(dtype=float)).fillna(-1).sum()))
    if st.session_state.get("_sig") not in (None, sig):
        st.cache_data.clear()
        st.session_state["_sig"] = sig
        st.rerun(scope="app")
    st.session_state["_sig"] = sig


def frontier_tab(df: pd.DataFrame, metric: str, factors: list[str]) -> None:
    costs = [c for c in analysis.COST_METRICS if c in df and df[c].notna().any()]
    if not costs:
        st.warning("These runs have no cost metrics (gmacs, params, throughput_img_s, ...): "
                   "they were logged without a cost profile.")
        return
    c1, c2, c3, c4 = st.columns(4)
    cost = c1.selectbox("cost (x)", costs, key="cost")
    opts = [None, *factors]
    color = c2.selectbox("colour by", opts, key="color", format_func=_short,
                         index=opts.index("factor.model.mixer")
                         if "factor.model.mixer" in opts else 0)
    symbol = c3.selectbox("symbol by", opts, key="symbol", format_func=_short,
                          index=opts.index("factor.model.patch_size")
                          if "factor.model.patch_size" in opts else 0)
    log_x = c4.toggle("log x", value=cost in ("gmacs", "params"), key="logx")
    agg = analysis.aggregate(df, metric, factors)
    agg = agg[agg[cost].notna()] if cost in agg else agg
    front = analysis.frontier(agg, cost)
    st.plotly_chart(plots.frontier_figure(agg, front, cost, metric, color, symbol, log_x),
                    width="stretch", key="frontier_chart")
    st.caption(f"{len(agg)} configurations (seed means; error bars: 95% Student-t CI, none for "
               f"n = 1); {len(front)} on the Pareto frontier "
               f"({'higher' if cost in analysis.HIGHER_IS_BETTER else 'lower'} {cost} is "
               "better).")
    show = front.drop(columns=["run_ids"]).rename(columns=lambda c: c.removeprefix("factor."))
    st.dataframe(show, hide_index=True, key="frontier_table")


def effects_tab(df: pd.DataFrame, metric: str, factors: list[str]) -> None:
    if not factors:
        st.info("This study has no factors: nothing to compare.")
        return
    effects = analysis.main_effects(df, metric, factors)
    st.plotly_chart(plots.effects_figure(effects, metric), width="stretch", key="effects_chart")
    sizes = analysis.effect_sizes(effects)
    st.dataframe(sizes.assign(factor=sizes["factor"].str.removeprefix("factor.")),
                 hide_index=True, key="effect_sizes")
    if len(factors) >= 2:
        c1, c2 = st.columns(2)
        f1 = c1.selectbox("interaction: rows", factors, key="ix1",
                          format_func=_short)
        rest = [f for f in factors if f != f1]
        f2 = c2.selectbox("interaction: columns", rest, key="ix2",
                          format_func=_short)
        table = analysis.interaction(df, metric, f1, f2)
        st.plotly_chart(plots.interaction_figure(table, f1, f2, metric), width="stretch",
                        key="interaction_chart")
    frac = "factor.dataset.fraction"
    if frac in factors:
        group = "factor.model.mixer" if "factor.model.mixer" in factors else next(
            f for f in factors if f != frac) if len(factors) > 1 else None
        if group:
            sc = analysis.scaling_curves(df, metric, frac, group)
            st.plotly_chart(plots.scaling_figure(sc, metric, frac, group), width="stretch",
                            key="scaling_chart")
    else:
        st.caption("No data-scaling curves: dataset.fraction is not a factor of this study.")


def curves_tab(df: pd.DataFrame, study: str, uri: str, factors: list[str]) -> None:
    c1, c2 = st.columns(2)
    which = c1.selectbox("metric", ["val_acc", "train_loss"], key="curve_metric")
    group = c2.selectbox("group by", factors or [None], key="curve_group",
                         format_func=_short)
    ids = tuple(df["run_id"].head(200))
    cv = curves(study, uri, ids)
    if cv.empty:
        st.info("No per-epoch metrics logged yet for these runs.")
        return
    st.plotly_chart(plots.curves_figure(cv, df, which, group), width="stretch",
                    key="curves_chart")


def runs_tab(df: pd.DataFrame, study: str) -> None:
    cols = ["run_name", "status", "seed", *analysis.factor_columns(df),
            *[m for m in [*ACC_METRICS, *analysis.COST_METRICS] if m in df], "error", "run_id"]
    table = df[[c for c in cols if c in df]].rename(columns=lambda c: c.removeprefix("factor."))
    st.dataframe(table, hide_index=True, key="runs_table")
    st.download_button("download CSV", table.to_csv(index=False).encode(),
                       file_name=f"{study}_runs.csv", mime="text/csv", key="csv")


def main() -> None:
    uri = tracking.resolve_tracking_uri(os.environ.get("ABLATE_TRACKING_URI"))
    study, metric, df = sidebar(uri)
    st.title(f"{study}")
    if df.empty:
        st.info(f"Study `{study}` has no runs with the chosen filters. Start it with "
                f"`ablate run <study file>`, or widen the status and factor filters.")
        return
    all_runs = runs(study, uri)
    n_failed = int((all_runs["status"] == "failed").sum())
    if not df["status"].isin(["finished", "pruned"]).any():
        first = all_runs.loc[all_runs["status"] == "failed", "error"].head(1)
        st.warning(f"No finished runs in `{study}` yet ({len(all_runs)} runs: {n_failed} "
                   "failed). " + (f"First error: `{first.iloc[0]}`" if len(first) else ""))
    elif n_failed:
        st.caption(f"{n_failed} failed runs are hidden from the plots (see the Runs tab).")
    factors = analysis.factor_columns(df)
    missing = [m for m in (metric,) if m not in df or df[m].isna().all()]
    tabs = st.tabs(["Frontier", "Effects", "Curves", "Runs"])
    with tabs[0]:
        if missing:
            st.warning(f"No run here has `{metric}` yet: runs that finish log it; pick "
                       "another metric or wait for trials to finish.")
        else:
            frontier_tab(df, metric, factors)
    with tabs[1]:
        if not missing:
            effects_tab(df, metric, factors)
        else:
            st.warning(f"No run here has `{metric}` yet.")
    with tabs[2]:
        curves_tab(df, study, uri, factors)
    with tabs[3]:
        runs_tab(df, study)


main()
