"""The dashboard's Compare tab: two cells (of this study, or one of another study with a
common factor) side by side: their per-epoch curves, their costs and the difference of the
metric with a 95% Welch t interval over seeds. Numbers from ablate.analysis.compare."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from ablate import plots
from ablate.analysis import short
from ablate.analysis.compare import cells, compare

NO_CI = "n/a (needs 2+ seeds each)"


def _ci(lo: float, hi: float) -> str:
    return NO_CI if lo != lo else f"[{lo:+.4f}, {hi:+.4f}]"


def _side(col, name: str, study: str, studies: list[str], df: pd.DataFrame, metric: str,
          load_runs: Callable[[str], pd.DataFrame], default: int
          ) -> tuple[str, pd.DataFrame, pd.DataFrame, str | None]:
    """(study, its runs, its cells, the picked cell key) for one side of the comparison."""
    which = col.selectbox(f"study {name}", studies, index=studies.index(study),
                          key=f"cmp_study_{name.lower()}")
    runs = df if which == study else load_runs(which)
    table = cells(runs, metric)
    if table.empty:
        col.info(f"`{which}` has no finished runs with {metric}.")
        return which, runs, table, None
    keys = dict(zip(table["label"], table["key"], strict=True))  # labels are unique
    pick = col.selectbox(f"cell {name}", list(keys), index=min(default, len(keys) - 1),
                         key=f"cmp_{name.lower()}")
    return which, runs, table, keys[pick]


def compare_tab(study: str, metric: str, df: pd.DataFrame, studies: list[str],
                load_runs: Callable[[str], pd.DataFrame],
                load_curves: Callable[[str, tuple[str, ...]], pd.DataFrame]) -> None:
    """`df`: this study's runs under the sidebar's filters; `load_runs(study)` and
    `load_curves(study, run_ids)` read (cached) from the store."""
    if st.session_state.get("_cmp_for") != study:  # the sidebar's study changed: follow it
        for k in ("cmp_study_a", "cmp_study_b", "cmp_a", "cmp_b"):
            st.session_state.pop(k, None)
        st.session_state["_cmp_for"] = study
    c1, c2 = st.columns(2)
    sa, runs_a, cells_a, key_a = _side(c1, "A", study, studies, df, metric, load_runs, 0)
    sb, runs_b, cells_b, key_b = _side(c2, "B", study, studies, df, metric, load_runs, 1)
    if key_a is None or key_b is None:
        return
    if sa == sb and key_a == key_b:
        st.info("A and B are the same cell: pick two different cells (a cell compared with "
                "itself is not two independent samples).")
        return
    out = compare(runs_a, key_a, runs_b, key_b, metric)
    la = cells_a.set_index("key").loc[key_a, "label"]
    lb = cells_b.set_index("key").loc[key_b, "label"]
    name_a = f"A: {la}" if sa == sb else f"A: {sa} / {la}"
    name_b = f"B: {lb}" if sa == sb else f"B: {sb} / {lb}"
    if sa != sb and not out["shared_factors"]:
        st.warning(f"`{sa}` and `{sb}` share no factor: the cells differ in everything, "
                   "the difference below says which is better, not why.")
    d = out["difference"]
    rows = []
    for name, vals in ((name_a, out["a"]), (name_b, out["b"])):
        s = pd.Series(vals, dtype=float)
        rows.append({"cell": name, "seeds": len(s), "mean": s.mean(),
                     "values": ", ".join(f"{v:.4f}" for v in s)})
    rows.append({"cell": "A - B", "seeds": None, "mean": d["diff"],
                 "values": f"95% CI {_ci(d['ci_low'], d['ci_high'])}"})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="compare_table")
    sig = ("the CI excludes 0" if d["ci_low"] == d["ci_low"] and
           (d["ci_low"] > 0 or d["ci_high"] < 0) else "inconclusive: the CI includes 0"
           if d["ci_low"] == d["ci_low"] else
           "inconclusive: fewer than 2 seeds on a side" if min(len(out["a"]), len(out["b"])) < 2
           else "inconclusive: no spread between seeds on either side, so no interval")
    p = "" if d["p"] != d["p"] else f", p = {d['p']:.3g}, df = {d['df']:.1f}"
    st.caption(f"A - B = {d['diff']:+.4f} {metric}, 95% CI {_ci(d['ci_low'], d['ci_high'])} "
               f"({d['method']}: each seed's final {metric} is one observation, variances "
               f"not assumed equal{p}); {sig}.")
    if out["differing_factors"]:
        st.caption("They differ in " + ", ".join(short(f) for f in out["differing_factors"]))
    if out["settings_differ"]:
        st.warning("A and B also trained with different settings: " + "; ".join(
            f"{r['setting']} {r['a']} (A) vs {r['b']} (B)" for r in out["settings_differ"])
            + ". A - B includes their effect, not only the factors'.")
    if not out["costs"].empty:
        st.dataframe(out["costs"], hide_index=True, key="compare_costs")
        apart = out["costs_apart"]
        if apart:
            st.caption(f"No b / a for {', '.join(apart)}: these runs' profiles are not "
                       "comparable (measured on other machines, torch, CPUs or cost code, or "
                       "an older ablate's profile timed with the whole node's threads).")
    # one colour per level: the cells take their level's colour on the first factor they
    # differ in (attention is the same colour here as on the frontier and the effects)
    colors = {}
    if out["differing_factors"]:
        f = out["differing_factors"][0]
        lv = [cells_a.set_index("key").loc[key_a, f], cells_b.set_index("key").loc[key_b, f]]
        pal = plots.level_colors([str(v) for v in lv])
        colors = {name_a: pal[str(lv[0])], name_b: pal[str(lv[1])]}
    which = st.selectbox("curve", ["val_acc", "train_loss"], key="cmp_curve")
    curves = {name_a: load_curves(sa, tuple(out["run_ids_a"])),
              name_b: load_curves(sb, tuple(out["run_ids_b"]))}
    if all(c.empty for c in curves.values()):
        st.info("No per-epoch metrics logged for these runs.")
        return
    st.plotly_chart(plots.compare_curves_figure(curves, colors, which), width="stretch",
                    key="compare_chart")
