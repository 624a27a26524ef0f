"""Scaling slopes and cost: how much a mixer gains per doubling of data (or per halving of
the patch), whether two mixers' slopes differ, and the best accuracy each mixer reaches
under another mixer's cost. Pure: no I/O."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats

from ablate.analysis.design import Design
from ablate.analysis.seeds import (
    HIGHER_IS_BETTER,
    aggregate,
    factor_columns,
    label,
    numeric,
)
from ablate.analysis.seeds import holm as holm_adjust

MIXER = "factor.model.mixer"
FRACTION = "factor.dataset.fraction"
PATCH = "factor.model.patch_size"
# x for each scaling question: log2 of the fraction (per doubling of data), minus log2 of
# the patch size (per halving of the patch, i.e. per 4x more tokens).
SCALES = {FRACTION: ("doubling of data", 1.0), PATCH: ("halving of the patch", -1.0)}


def slopes(d: Design, x_key: str, group: str | None = MIXER, level: float = 0.95
           ) -> dict | None:
    """Per level of `group`: the slope of the metric against sign * log2(x) with a CI, from
    one OLS over the grid's runs (group intercepts and slopes, the other factors as
    categorical main effects); every pair's slope difference with a Holm p-value and a
    Bonferroni CI. None when the grid lacks `x_key` or its levels are not positive numbers."""
    if x_key not in d.keys:
        return None
    xs = {lv: numeric(lv) for lv in d.levels[x_key]}
    if any(v is None or v <= 0 for v in xs.values()):
        return None
    what, sign = SCALES.get(x_key, (f"doubling of {x_key.removeprefix('factor.')}", 1.0))
    data = d.data
    x = sign * np.log2(data[x_key].map(xs).to_numpy(dtype=float))
    groups = d.levels[group] if group in d.keys else [None]
    cols, names = [], []
    for g in groups:
        ind = (data[group] == g).to_numpy(float) if g is not None else np.ones(len(data))
        cols += [ind, ind * x]
        names += [f"b0[{g}]", f"slope[{g}]"]
    for k in d.keys:
        if k in (x_key, group):
            continue
        for lv in d.levels[k][1:]:
            cols.append((data[k] == lv).to_numpy(float))
            names.append(f"{k}[{lv}]")
    xmat = np.column_stack(cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sm.OLS(data["_y"].to_numpy(), xmat).fit(method="qr" if d.complete else "pinv")
    beta, cov, df = np.asarray(res.params), np.asarray(res.cov_params()), float(res.df_resid)
    tq = stats.t.ppf(0.5 + level / 2, df) if df > 0 else math.nan
    ok = estimable(xmat)
    per, lost = {}, []
    for g in groups:
        i = names.index(f"slope[{g}]")
        name = label(g) if g is not None else "all"
        if not ok(_unit(len(beta), i)):  # e.g. a mixer finished at one fraction only: the
            lost.append(name)  # pseudo-inverse would report 0 with a zero-width interval
            continue
        se = math.sqrt(max(cov[i, i], 0.0))
        per[name] = {"slope": float(beta[i]),
                     "ci": [float(beta[i] - tq * se), float(beta[i] + tq * se)]}
    diffs = []
    # groups that also differ in another factor: a slope difference would be of both
    mixed = d.confounded.get(group, []) if group in d.keys else []
    pairs = list(itertools.combinations(groups, 2)) if group in d.keys and not mixed else []
    for a, b in pairs:
        v = np.zeros(len(beta))
        v[names.index(f"slope[{a}]")], v[names.index(f"slope[{b}]")] = 1.0, -1.0
        if not ok(v):
            continue
        est, se = float(v @ beta), math.sqrt(max(float(v @ cov @ v), 0.0))
        p = 2 * stats.t.sf(abs(est / se), df) if df > 0 and se > 0 else math.nan
        diffs.append({"a": a, "b": b, "diff": est, "se": se, "p": p})
    if diffs:
        ps = np.array([r["p"] for r in diffs])
        holm = holm_adjust(ps) if np.isfinite(ps).all() else ps
        tb = stats.t.ppf(1 - (1 - level) / (2 * len(diffs)), df) if df > 0 else math.nan
        for r, h in zip(diffs, holm, strict=True):
            half = tb * r.pop("se")
            r.update(p_holm=float(h), ci=[r["diff"] - half, r["diff"] + half])
    return {"grid": d.index, "x": x_key.removeprefix("factor."), "per": what,
            "group": group.removeprefix("factor.") if group in d.keys else None,
            "slopes": per, "differences": diffs, "not_estimable": lost,
            "group_confounded": mixed}


def _unit(n: int, i: int) -> np.ndarray:
    v = np.zeros(n)
    v[i] = 1.0
    return v


def estimable(xmat: np.ndarray, tol: float = 1e-8):
    """A test of whether the linear combination v @ beta of an OLS on `xmat` is estimable
    (v in the row space of the design): where it is not, a pseudo-inverse fit still returns a
    number for it, one of infinitely many that fit equally well, with a meaningless interval."""
    proj = np.linalg.pinv(xmat) @ xmat

    def ok(v: np.ndarray) -> bool:
        return bool(np.linalg.norm(v - proj @ v) <= tol * max(1.0, np.linalg.norm(v)))

    return ok


def cost_table(runs: pd.DataFrame, metric: str, cost: str = "gmacs", group: str = MIXER
               ) -> dict | None:
    """For each level B of `group`: its budget, the cost of B's most accurate configuration;
    for each level A: the best seed-mean `metric` among A's configurations within B's budget
    (None when A has none that cheap). Lower cost is better unless `cost` says otherwise."""
    if cost not in runs or group not in runs or runs[cost].isna().all():
        return None
    agg = aggregate(runs, metric, factor_columns(runs), extra=(cost,))
    agg = agg[agg[cost].notna()]
    if agg.empty:
        return None
    lower = cost not in HIGHER_IS_BETTER
    levels = list(dict.fromkeys(agg[group].map(label)))
    agg = agg.assign(_g=agg[group].map(label))
    budgets = {b: float(agg[agg["_g"] == b].sort_values("mean").iloc[-1][cost]) for b in levels}
    best: dict[str, dict[str, float | None]] = {}
    for a in levels:
        mine = agg[agg["_g"] == a]
        best[a] = {}
        for b, budget in budgets.items():
            ok = mine[mine[cost] <= budget] if lower else mine[mine[cost] >= budget]
            best[a][b] = float(ok["mean"].max()) if len(ok) else None
    return {"cost": cost, "group": group.removeprefix("factor."), "budget": budgets,
            "best": best}
