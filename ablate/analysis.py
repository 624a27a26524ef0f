"""Pure analysis of a study's runs: seed aggregation with confidence intervals, Pareto
frontiers, main effects, interactions and data-scaling curves. No I/O, no plotting."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

HIGHER_IS_BETTER = {"throughput_img_s", "train_img_s", "val_acc", "best_val_acc", "test_acc"}
COST_METRICS = ("gmacs", "params", "throughput_img_s", "latency_ms", "train_time_s",
                "train_img_s", "peak_mem_mb")
OFF = "off"


def factor_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("factor.")]


def _t_halfwidth(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean; NaN when n < 2."""
    if n < 2 or not np.isfinite(std):
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def _config_keys(df: pd.DataFrame, factors: Sequence[str]) -> pd.DataFrame:
    """Factor columns with None/NaN spelled 'off' so that groupby keeps them."""
    keyed = df.copy()
    for f in factors:
        keyed[f] = keyed[f].astype(object).where(keyed[f].notna(), OFF)
    return keyed


def aggregate(df: pd.DataFrame, metric: str, factors: Sequence[str] | None = None,
              extra: Sequence[str] = COST_METRICS) -> pd.DataFrame:
    """One row per configuration (factor levels): mean, std, n and 95% CI of `metric` over
    seeds, the mean of each `extra` metric, and the run ids. n = 1 gives NaN CI bounds."""
    factors = list(factor_columns(df) if factors is None else factors)
    cols = [*factors, "mean", "std", "n", "ci_low", "ci_high", "run_ids",
            *[e for e in extra if e in df]]
    if df.empty or metric not in df:
        return pd.DataFrame(columns=cols)
    d = _config_keys(df[df[metric].notna()], factors)
    rows = []
    groups = d.groupby(factors, sort=True, dropna=False) if factors else [((), d)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        vals = g[metric].to_numpy(dtype=float)
        n = len(vals)
        mean = float(vals.mean())
        std = float(vals.std(ddof=1)) if n > 1 else float("nan")
        h = _t_halfwidth(std, n)
        row = dict(zip(factors, key, strict=True))
        row.update(mean=mean, std=std, n=n, ci_low=mean - h, ci_high=mean + h,
                   run_ids=list(g["run_id"]) if "run_id" in g else [])
        for e in extra:
            if e in g:
                row[e] = float(g[e].mean())
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def pareto_front(cost: Sequence[float], acc: Sequence[float], lower_cost_is_better: bool = True
                 ) -> list[int]:
    """Indices of the non-dominated points, by increasing cost (or decreasing, if higher cost
    is better). p dominates q when p is no worse in both and better in one; identical points
    do not dominate each other. O(n log n): one sort and a sweep."""
    c = np.asarray(cost, dtype=float)
    a = np.asarray(acc, dtype=float)
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(a))
    if not lower_cost_is_better:
        c = -c
    order = ok[np.lexsort((-a[ok], c[ok]))]  # cost ascending, then accuracy descending
    front: list[int] = []
    best = -np.inf
    last: tuple[float, float] | None = None
    for i in order:
        if a[i] > best:
            front.append(int(i))
            best, last = a[i], (c[i], a[i])
        elif last is not None and (c[i], a[i]) == last:
            front.append(int(i))  # an exact duplicate of a frontier point
    return front


def frontier(agg: pd.DataFrame, cost: str, acc: str = "mean") -> pd.DataFrame:
    """The rows of an aggregate table on the (cost, accuracy) Pareto frontier, in cost order."""
    if agg.empty or cost not in agg:
        return agg.iloc[0:0]
    idx = pareto_front(agg[cost].to_numpy(), agg[acc].to_numpy(),
                       lower_cost_is_better=cost not in HIGHER_IS_BETTER)
    return agg.iloc[idx]


def main_effects(df: pd.DataFrame, metric: str, factors: Sequence[str] | None = None
                 ) -> dict[str, pd.DataFrame]:
    """Per factor: mean `metric` at each level, averaged over configurations of the other
    factors (each configuration first averaged over seeds), with a 95% CI over them."""
    factors = list(factor_columns(df) if factors is None else factors)
    agg = aggregate(df, metric, factors, extra=())
    out = {}
    for f in factors:
        rows = []
        for level, g in agg.groupby(f, sort=True):
            vals = g["mean"].to_numpy(dtype=float)
            n = len(vals)
            m = float(vals.mean())
            std = float(vals.std(ddof=1)) if n > 1 else float("nan")
            h = _t_halfwidth(std, n)
            rows.append({"level": level, "mean": m, "std": std, "n": n, "ci_low": m - h,
                         "ci_high": m + h})
        out[f] = pd.DataFrame(rows)
    return out


def effect_sizes(effects: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """How much each factor moves the metric: the range of its level means, largest first."""
    rows = [{"factor": f, "range": float(t["mean"].max() - t["mean"].min()) if len(t) else 0.0,
             "levels": len(t)} for f, t in effects.items()]
    return pd.DataFrame(rows, columns=["factor", "range", "levels"]).sort_values(
        "range", ascending=False, ignore_index=True)


def interaction(df: pd.DataFrame, metric: str, f1: str, f2: str) -> pd.DataFrame:
    """Mean `metric` for each (f1 level, f2 level), averaged over seeds and other factors:
    rows are f1's levels, columns f2's."""
    agg = aggregate(df, metric, [c for c in factor_columns(df)], extra=())
    if agg.empty:
        return pd.DataFrame()
    return agg.pivot_table(index=f1, columns=f2, values="mean", aggfunc="mean")


def scaling_curves(df: pd.DataFrame, metric: str, fraction: str = "factor.dataset.fraction",
                   group: str = "factor.model.mixer") -> pd.DataFrame:
    """Accuracy against the training-data fraction, one curve per `group` level, each point
    averaged over the other factors' configurations (CI over them)."""
    if fraction not in df or group not in df:
        return pd.DataFrame(columns=[group, fraction, "mean", "ci_low", "ci_high", "n"])
    agg = aggregate(df, metric, factor_columns(df), extra=())
    rows = []
    for (g, f), sub in agg.groupby([group, fraction], sort=True):
        vals = sub["mean"].to_numpy(dtype=float)
        n = len(vals)
        m = float(vals.mean())
        h = _t_halfwidth(float(vals.std(ddof=1)) if n > 1 else float("nan"), n)
        rows.append({group: g, fraction: float(f), "mean": m, "ci_low": m - h,
                     "ci_high": m + h, "n": n})
    return pd.DataFrame(rows)
