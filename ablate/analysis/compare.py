"""Two cells side by side: the difference of their seed means with a 95% Welch t interval
(each seed's final metric is one observation; the two cells' variances are not assumed
equal), and their costs. Pure: runs DataFrames in, numbers out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ablate.analysis.seeds import (
    COST_METRICS,
    cell_keys,
    factor_columns,
    label,
    short,
    timing_apart,
)


def difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """mean(a) - mean(b) with a Welch t confidence interval and two-sided p-value; the
    Welch-Satterthwaite degrees of freedom. With fewer than 2 values on a side, or no spread
    on both, the interval is NaN (no claim from one seed)."""
    x = np.asarray([v for v in a if v == v], dtype=float)
    y = np.asarray([v for v in b if v == v], dtype=float)
    out: dict[str, Any] = {"diff": float("nan"), "ci_low": float("nan"),
                           "ci_high": float("nan"), "se": float("nan"), "df": float("nan"),
                           "p": float("nan"), "n_a": len(x), "n_b": len(y),
                           "method": "Welch t interval over seeds"}
    if len(x) == 0 or len(y) == 0:
        return out
    out["diff"] = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return out
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    if se == 0:
        return out
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * se
    out.update(ci_low=out["diff"] - half, ci_high=out["diff"] + half, se=se, df=float(df),
               p=float(2 * stats.t.sf(abs(out["diff"]) / se, df)))
    return out


def cells(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per cell of finished runs with `metric` (seeds grouped by `cell_id`): key,
    label (its factor levels; a cell id prefix where an edited study left two cells with the
    same levels), n, mean, run_ids. Best mean first."""
    cols = ["key", "label", "n", "mean", "run_ids"]
    if df.empty or metric not in df:
        return pd.DataFrame(columns=cols)
    d = df[df[metric].notna()]
    if "status" in d:
        d = d[d["status"] == "finished"]
    if d.empty:
        return pd.DataFrame(columns=cols)
    factors = factor_columns(d)
    d = d.assign(_key=cell_keys(d, factors).to_numpy())
    g = d.groupby("_key", sort=False)
    first = g[factors].first() if factors else pd.DataFrame(index=g.size().index)
    text = pd.Series([", ".join(f"{short(f)}={label(r[f])}" for f in factors) or "all"
                      for _, r in first.iterrows()], index=first.index)
    dup = text.duplicated(keep=False)
    text[dup] = text[dup] + " (cell " + text.index[dup].astype(str).str[:8] + ")"
    out = pd.DataFrame({"key": first.index, "label": text.to_numpy(), "n": g.size().to_numpy(),
                        "mean": g[metric].mean().to_numpy(),
                        "run_ids": (g["run_id"].agg(list) if "run_id" in d
                                    else pd.Series([[]] * len(first))).to_numpy()})
    for f in factors:
        out[f] = first[f].map(label).to_numpy()
    return out.sort_values("mean", ascending=False, kind="stable", ignore_index=True)


def _runs_of(df: pd.DataFrame, key: str, metric: str) -> pd.DataFrame:
    d = df[df[metric].notna()]
    if "status" in d:
        d = d[d["status"] == "finished"]
    return d[cell_keys(d, factor_columns(d)).to_numpy() == key]


def _setting(runs: pd.DataFrame, name: str) -> set[str]:
    """The values one side's runs logged for a training setting (`train.precision`: what
    `auto` resolved to, else what was asked); empty where none logged it."""
    cols = ([f"params.{name}_resolved"] if name == "train.precision" else []) + [f"params.{name}"]
    vals: pd.Series = pd.Series(None, index=runs.index, dtype=object)
    for c in cols:
        if c in runs:
            v = runs[c].astype(object)
            vals = vals.fillna(v.where(v.notna() & (v != "auto")))
    if name == "train.budget" and "params.train.epochs" in runs:
        vals = vals.fillna("epochs")  # runs from before train.budget trained by epochs
    return {str(v) for v in vals.dropna()}


# the settings the dashboard loads for every run (tracking.ALWAYS_PARAMS) that change what a
# cell's number means: a difference across them is also theirs
SETTINGS = ("train.precision", "train.epochs", "train.budget")


def settings_differ(ra: pd.DataFrame, rb: pd.DataFrame) -> list[dict[str, str]]:
    """The training settings the two sides ran with where they differ (unless both sides have
    it as a factor, which differing_factors lists): {"setting", "a", "b"} each, the values
    '/'-joined."""
    out = []
    for name in SETTINGS:
        if f"factor.{name}" in ra and f"factor.{name}" in rb:
            continue  # a factor of both: listed among the differing factors
        a, b = _setting(ra, name), _setting(rb, name)
        if a and b and a != b:
            out.append({"setting": name, "a": "/".join(sorted(a)), "b": "/".join(sorted(b))})
    return out


def compare(df_a: pd.DataFrame, key_a: str, df_b: pd.DataFrame, key_b: str, metric: str,
            costs: Sequence[str] = COST_METRICS) -> dict[str, Any]:
    """Cell `key_a` of runs `df_a` against cell `key_b` of `df_b` (the same study's runs, or
    two studies'): each side's seed values, the difference a - b with its Welch 95% CI, the
    factors both sides have and where their levels differ, the training settings they differ
    in (precision, epochs, budget: `settings_differ`), and each cost's mean per side
    with the ratio b / a (none where a timing cost comes from profiles that are not
    comparable: `timing_apart`)."""
    ra, rb = _runs_of(df_a, key_a, metric), _runs_of(df_b, key_b, metric)
    shared = [f for f in factor_columns(ra) if f in rb]
    differ = [f for f in shared if set(ra[f].map(label)) != set(rb[f].map(label))]
    rows, apart_costs = [], []
    for c in costs:
        if c in ra and c in rb and (ra[c].notna().any() or rb[c].notna().any()):
            ma, mb = float(ra[c].mean()), float(rb[c].mean())
            apart = timing_apart(pd.concat([ra, rb]), c)
            if apart:
                apart_costs.append(c)
            rows.append({"cost": c, "a": ma, "b": mb,
                         "b / a": mb / ma if ma and math.isfinite(ma) and not apart
                         else float("nan")})
    return {"a": ra[metric].astype(float).tolist(), "b": rb[metric].astype(float).tolist(),
            "run_ids_a": ra["run_id"].tolist() if "run_id" in ra else [],
            "run_ids_b": rb["run_id"].tolist() if "run_id" in rb else [],
            "difference": difference(ra[metric], rb[metric]),
            "shared_factors": shared, "differing_factors": differ,
            "settings_differ": settings_differ(ra, rb),
            "costs": pd.DataFrame(rows, columns=["cost", "a", "b", "b / a"]),
            "costs_apart": apart_costs}  # timing costs whose profiles are not comparable
