"""ablate dashboard: accuracy-vs-cost frontiers and factor effects of a study.

Widgets only: data comes from ablate.tracking, numbers from ablate.analysis, figures from
ablate.plots. Launched by `ablate dashboard` (the tracking URI arrives in
ABLATE_TRACKING_URI).
"""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from ablate import analysis, plots, report, tracking
from ablate.analysis.seeds import AS_TRAINED, TIMED, profile_identities, timed_mixed
from ablate.dashboard.compare import compare_tab
from ablate.dashboard.data import ACC_METRICS, TTL_S, curves, frontier, runs, studies, token
from ablate.dashboard.importance import importance_tab
from ablate.errors import AblateError, mask_url

st.set_page_config(page_title="ablate", layout="wide")


def _short(f: str | None) -> str:
    return "none" if f is None else f.removeprefix("factor.")


def sidebar(uri: str) -> tuple[str | None, str, pd.DataFrame]:
    st.sidebar.title("ablate")
    st.sidebar.caption(f"tracking: `{mask_url(uri)}`")
    try:
        summary = studies(uri)
    except AblateError as e:
        st.error(str(e))
        st.stop()
    names = summary["name"].tolist()
    if not names:
        st.info(f"No studies in `{mask_url(uri)}` yet. Run one first: "
                "`ablate run studies/quickstart.yaml`"
                " (or point the dashboard at another store with `--tracking-uri`).")
        st.stop()
    wanted = st.query_params.get("study")  # links can name a study: /?study=quickstart
    index = names.index(wanted) if wanted in names else 0
    counts = dict(zip(names, summary["runs"], strict=True))
    active = dict(zip(names, summary["running"], strict=True))
    study = st.sidebar.selectbox("study", names, index=index, key="study",
                                 format_func=lambda n: _picked(n, counts[n], active[n]))
    if st.session_state.get("_filters_for") != study:  # a new study: its own default filters
        for k in [k for k in st.session_state if k == "status" or str(k).startswith("filter.")]:
            del st.session_state[k]
        st.session_state["_filters_for"] = study
    metric = st.sidebar.selectbox("accuracy metric", ACC_METRICS, key="metric",
                                  help="; ".join(f"{k}: {v}" for k, v in
                                                 analysis.METRIC_HELP.items()))
    st.sidebar.caption(analysis.METRIC_HELP.get(metric, ""))
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
    # only finished runs enter an average by default: pruned runs stopped early
    default = [s for s in statuses if s == analysis.FINISHED] or statuses
    chosen = st.sidebar.multiselect("status", statuses, default=default, key="status")
    keep = df["status"].isin(chosen)
    for f in analysis.factor_columns(df):
        levels = sorted(df[f].astype(object).where(df[f].notna(), analysis.OFF).astype(str)
                        .unique())
        pick = st.sidebar.multiselect(f.removeprefix("factor."), levels, default=levels,
                                      key=f"filter.{f}")
        keep &= df[f].astype(object).where(df[f].notna(), analysis.OFF).astype(str).isin(pick)
    return study, metric, df[keep]


def _picked(name: str, n: object, running: object) -> str:
    """`quickstart (18 runs, 2 running)`; a tracking server's list has no counts."""
    if n is None or n != n:
        return name
    return f"{name} ({int(n):,} runs" + (f", {int(running)} running)" if running else ")")


@st.fragment(run_every=10)
def _watch(study: str, uri: str) -> None:
    """Ask the store every 10 s whether the study's runs changed (its change token: one small
    query); rerun the page when they did (the run caches are keyed by the token)."""
    sig = token(study, uri)
    if st.session_state.get("_sig") not in (None, sig):
        st.session_state["_sig"] = sig
        st.rerun(scope="app")
    st.session_state["_sig"] = sig


MEASURED_NOTE = (" train_time_s is each trial's own clock, beside whatever trained next to it; "
                 "train_time_alone_s (from its profile) ranks architectures without that.")


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
    shown = df[df[metric].notna()]
    if cost in TIMED and len(ids := profile_identities(shown[shown[cost].notna()])) > 1:
        st.warning(f"The runs' {cost} was measured under {len(ids)} profile identities ("
                   + "; ".join(ids) + "): not comparable on one frontier; run the study again "
                   "into a new experiment on one machine to compare.")
    if cost in AS_TRAINED and timed_mixed(shown, cost):
        st.warning(f"Some runs carry a {cost} from an older ablate's profile (training timed "
                   "with the whole node's threads at train.profile_batch_size), the rest at "
                   "their own batch and threads: not comparable on one frontier; run the "
                   "study again into a new experiment to compare.")
    agg, front, fig = frontier(df, metric, tuple(factors), cost, color, symbol, log_x)
    st.plotly_chart(fig, width="stretch", key="frontier_chart")
    st.caption(f"{len(agg)} configurations (seed means; error bars: 95% Student-t CI, none for "
               f"n = 1); {len(front)} on the Pareto frontier "
               f"({'higher' if cost in analysis.HIGHER_IS_BETTER else 'lower'} {cost} is "
               "better)." + (MEASURED_NOTE if cost == "train_time_s" else ""))
    show = front.drop(columns=["run_ids"]).rename(columns=lambda c: c.removeprefix("factor."))
    st.dataframe(show, hide_index=True, key="frontier_table")


@st.cache_data(ttl=TTL_S, show_spinner=False, max_entries=8)
def analysed(df: pd.DataFrame, metric: str) -> analysis.Analysis | str:
    """The verdict's analysis of these runs (finished ones), or the reason there is none."""
    try:
        return analysis.analyse(df, metric)
    except AblateError as e:
        return str(e)


def verdict_tab(a: analysis.Analysis | str, study: str) -> None:
    if isinstance(a, str):
        st.warning(f"No verdict yet: {a}")
        return
    st.markdown("\n".join(f"- {s}" for s in a.verdict))
    st.caption(" ".join(f"Grid {f.design.index}: {f.design.note()}." for f in a.fits) +
               f" Shares: bootstrap 95% CIs over seeds ({a.fits[0].n_boot} resamples).")
    st.plotly_chart(plots.shares_figure(report.shares_frame(a), a.metric), width="stretch",
                    key="shares_chart")
    rows = [pw.assign(grid=f.design.index, factor=analysis.short(k))
            for f in a.fits for k, pw in f.pairwise.items()]
    table = pd.concat(rows, ignore_index=True)[["grid", "factor", "a", "b", "diff", "ci_low",
                                                 "ci_high", "p_holm"]]
    st.caption("Pairwise differences of marginal means (a - b), Bonferroni 95% CIs, Holm p.")
    st.dataframe(table, hide_index=True, key="pairwise_table")
    prov = {"study": study, "tracking_uri": tracking.resolve_tracking_uri(
        os.environ.get("ABLATE_TRACKING_URI")), "source": "dashboard"}
    st.download_button("download report", report.to_html(a, prov).encode(),
                       file_name=f"report-{study}.html", mime="text/html", key="report_html")


def effects_tab(a: analysis.Analysis | str, metric: str) -> None:
    if isinstance(a, str):
        st.info(f"No effects: {a}")
        return
    keys = list(dict.fromkeys(k for f in a.fits for k in f.design.keys))
    effects = {}
    for k in keys:
        f = analysis.fit_for(a.fits, k)
        effects[k] = f.emms[k]
    st.plotly_chart(plots.effects_figure(effects, metric), width="stretch", key="effects_chart")
    sizes = analysis.effect_sizes(effects)
    st.dataframe(sizes.assign(factor=sizes["factor"].str.removeprefix("factor.")),
                 hide_index=True, key="effect_sizes")
    pairs = [(f, t) for f in a.fits for t in f.tables]
    if pairs:
        names = [f"{analysis.term_name(t)} (grid {f.design.index})" for f, t in pairs]
        pick = st.selectbox("interaction", names, key="ix")
        f, t = pairs[names.index(pick)]
        x, g = (t[1], t[0]) if analysis.numeric(f.design.levels[t[1]][0]) is not None else t
        st.plotly_chart(plots.interaction_figure(f.tables[t], x, g, metric), width="stretch",
                        key="interaction_chart")
    scaling = report.scaling_figures(a)
    for i, (_, fig) in enumerate(scaling):
        st.plotly_chart(fig, width="stretch", key=f"scaling_chart_{i}")
    if not scaling:
        st.caption("No scaling curves: no grid crosses model.mixer with dataset.fraction or "
                   "model.patch_size.")


def explore_tab(df: pd.DataFrame, metric: str, factors: list[str]) -> None:
    """Parallel coordinates of every factor against the metric, and the metric against one
    numeric factor (seed means with 95% CIs per configuration)."""
    fin = df[df["status"] == analysis.FINISHED] if "status" in df else df
    if not factors or fin.empty or metric not in fin:
        st.info("Nothing to explore: no finished runs with factors and this metric.")
        return
    dims, color = analysis.parallel_dims(fin, metric, factors)
    st.plotly_chart(plots.parallel_figure(dims, color, metric), width="stretch",
                    key="parallel_chart")
    st.caption("One line per configuration (seed means); drag along an axis to filter. "
               "Which factor matters, with CIs: the Verdict tab's variance shares.")
    nums = analysis.numeric_params(fin)
    if not nums:
        st.caption("No numeric factor to plot the metric against.")
        return
    c1, c2, c3 = st.columns(3)
    param = c1.selectbox("x: numeric factor", nums, key="mvp_param", format_func=_short)
    others = [None, *[f for f in factors if f != param]]
    group = c2.selectbox("one curve per", others, key="mvp_group", format_func=_short,
                         index=others.index("factor.model.mixer")
                         if "factor.model.mixer" in others else 0)
    log_x = c3.toggle("log x", value=False, key="mvp_logx")
    cells = analysis.metric_vs_param(fin, metric, param)
    st.plotly_chart(plots.metric_vs_param_figure(cells, metric, param, group, log_x),
                    width="stretch", key="mvp_chart")


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
    left_out = all_runs[all_runs["status"] != analysis.FINISHED]["status"].value_counts()
    if not df["status"].isin([analysis.FINISHED]).any():
        first = all_runs.loc[all_runs["status"] == "failed", "error"].head(1)
        st.warning(f"No finished runs in `{study}` yet ({len(all_runs)} runs: {n_failed} "
                   "failed). " + (f"First error: `{first.iloc[0]}`" if len(first) else ""))
    elif len(left_out):
        st.caption(f"{int(left_out.sum())} runs left out of every average ("
                   + ", ".join(f"{v} {k}" for k, v in left_out.items())
                   + "): only finished runs have a final number; see the Runs tab.")
    factors = analysis.factor_columns(df)
    # an edited study's older configuration under the same levels: not on the frontier beside
    # the new one, as the verdict's models leave it out
    fin, old = analysis.newest_cells(df[df["status"] == analysis.FINISHED]
                                     if "status" in df else df, factors)
    if old:
        st.caption(f"{old} finished runs of configurations the study file has since changed "
                   "(the same factor levels under an older cell id) are left out of the "
                   "frontier and the averages; see the Runs tab.")
    missing = [m for m in (metric,) if m not in df or df[m].isna().all()]
    a = analysed(df, metric) if not missing else f"no run here has `{metric}` yet"
    tabs = st.tabs(["Verdict", "Frontier", "Effects", "Explore", "Importance", "Compare",
                    "Curves", "Runs"])
    with tabs[0]:
        verdict_tab(a, study)
    with tabs[1]:
        if missing:
            st.warning(f"No run here has `{metric}` yet: runs that finish log it; pick "
                       "another metric or wait for trials to finish.")
        else:
            frontier_tab(fin, metric, factors)
    with tabs[2]:
        effects_tab(a, metric)
    with tabs[3]:
        explore_tab(fin, metric, factors)
    with tabs[4]:
        importance_tab(df, a, uri)
    with tabs[5]:
        compare_tab(study, metric, df, studies(uri)["name"].tolist(), lambda s: runs(s, uri),
                    lambda s, ids: curves(s, uri, ids))
    with tabs[6]:
        curves_tab(df, study, uri, factors)
    with tabs[7]:
        runs_tab(df, study)

main()
