"""One grid's linear model: the metric on its factors (categorical, main effects and every
estimable two-factor interaction). The ANOVA table comes from statsmodels (`ols` formula +
`anova_lm`, type II); shares of variance get a seeded bootstrap CI that resamples seeds
within cells; estimated marginal means and Holm-corrected pairwise differences come from the
same model's coefficients and covariance (statsmodels OLS)."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.anova import anova_lm

from ablate.analysis.design import Design
from ablate.analysis.seeds import holm as holm_adjust

N_BOOT = 1000
Term = tuple[str, ...]  # (key,) for a main effect, (key1, key2) for an interaction


def term_name(term: Term) -> str:
    return " x ".join(t.removeprefix("factor.") for t in term)


@dataclass
class TermStats:
    term: Term
    df: float
    ss: float
    share: float
    share_ci: tuple[float, float]
    omega2: float
    f: float
    p_value: float


@dataclass
class GridFit:
    """Everything the report says about one grid."""

    design: Design
    terms: dict[Term, TermStats]
    ss_total: float
    resid_df: float
    mse: float
    emms: dict[str, pd.DataFrame]          # key -> level, mean, ci_low, ci_high, n
    pairwise: dict[str, pd.DataFrame]      # key -> a, b, diff, ci_low, ci_high, p, p_holm
    tables: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)  # 2-way EMMs
    n_boot: int = 0

    @property
    def main(self) -> dict[str, TermStats]:
        return {t[0]: s for t, s in self.terms.items() if len(t) == 1}

    @property
    def interactions(self) -> dict[Term, TermStats]:
        return {t: s for t, s in self.terms.items() if len(t) == 2}


def terms_of(d: Design) -> list[Term]:
    return [(k,) for k in d.keys] + list(d.interactions)


def design_matrix(rows: pd.DataFrame, d: Design) -> tuple[np.ndarray, dict[Term, slice]]:
    """Treatment-coded columns for `rows` (level labels per key): intercept, one column per
    non-reference level, products for the interactions. Works for any rows, so the same
    coding serves the fit, the bootstrap and the marginal means."""
    cols = [np.ones(len(rows))]
    slices: dict[Term, slice] = {}
    dummies: dict[str, np.ndarray] = {}
    for k in d.keys:
        lv = d.levels[k]
        v = rows[k].to_numpy()
        dummies[k] = np.stack([(v == x).astype(float) for x in lv[1:]], axis=1)
    at = 1
    for t in terms_of(d):
        if len(t) == 1:
            block = dummies[t[0]]
        else:
            a, b = dummies[t[0]], dummies[t[1]]
            block = (a[:, :, None] * b[:, None, :]).reshape(len(rows), -1)
        cols.append(block)
        slices[t] = slice(at, at + block.shape[1])
        at += block.shape[1]
    return np.column_stack(cols), slices


def _columns_without(slices: dict[Term, slice], drop: set[Term]) -> np.ndarray:
    idx = [0] + [i for t, s in slices.items() if t not in drop for i in range(s.start, s.stop)]
    return np.asarray(idx)


def _basis(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column space of `a`: QR when `a` has full column rank (fast),
    else the SVD's (rank-revealing, for grids with missing cells)."""
    q, r = np.linalg.qr(a)
    d = np.abs(np.diag(r))
    if d.size and d.min() > d.max() * max(a.shape) * np.finfo(float).eps * 100:
        return q
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    tol = s.max() * max(a.shape) * np.finfo(float).eps if s.size else 0.0
    return u[:, s > tol]


def type2_ss(d: Design, means: np.ndarray) -> dict[Term, np.ndarray]:
    """Type II sums of squares of every term for one or many vectors of cell means (C x B).
    The model's columns are constant within a cell, so its fitted values depend only on the
    cell means weighted by seed counts: the bootstrap needs no refit on the raw runs."""
    x, slices = design_matrix(d.cells, d)
    w = np.sqrt(d.cells["n"].to_numpy(dtype=float))[:, None]
    wy = w * means
    base = (wy ** 2).sum(axis=0)
    cache: dict[frozenset, np.ndarray] = {}

    def rss(drop: set[Term]) -> np.ndarray:
        key = frozenset(drop)
        if key not in cache:
            q = _basis(w * x[:, _columns_without(slices, drop)])
            cache[key] = base - ((q.T @ wy) ** 2).sum(axis=0)
        return cache[key]

    out = {}
    terms = terms_of(d)
    for t in terms:
        containing = {u for u in terms if u != t and set(t) < set(u)}
        out[t] = rss(containing | {t}) - rss(containing)
    return out


def _bootstrap_means(d: Design, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell means (C x B) and within-cell sums of squares (B) of `n_boot` resamples that
    draw each cell's seeds with replacement (deviations from the cell mean scaled so that a
    resample's expected variance equals the sample's: with 3 seeds, plain resampling would
    shrink the noise by a third and bias every share upwards)."""
    rng = np.random.default_rng(seed)
    y = d.data.groupby("_cell")["_y"].apply(lambda v: v.to_numpy()).sort_index()
    means = np.empty((len(y), n_boot))
    ssw = np.zeros(n_boot)
    by_n: dict[int, list[int]] = {}
    for i, v in enumerate(y):
        by_n.setdefault(len(v), []).append(i)
    for n, idx in by_n.items():
        vals = np.stack([y.iloc[i] for i in idx])                  # cells x n
        if n > 1:  # seeds drawn with replacement understate the spread by (n - 1) / n:
            mu = vals.mean(axis=1, keepdims=True)                  # inflate the deviations
            vals = mu + (vals - mu) * np.sqrt(n / (n - 1))         # (modified residuals)
        pick = rng.integers(0, n, size=(n_boot, len(idx), n))
        draws = vals[np.arange(len(idx))[None, :, None], pick]     # B x cells x n
        m = draws.mean(axis=2)
        means[idx, :] = m.T
        ssw += ((draws - m[:, :, None]) ** 2).sum(axis=(1, 2))
    return means, ssw


def fit_method(d: Design) -> str:
    """QR for a complete grid (full rank, much faster than the pseudo-inverse's SVD on
    5,000 runs); the pseudo-inverse when cells are missing."""
    return "qr" if d.complete else "pinv"


def anova_table(d: Design) -> pd.DataFrame:
    """statsmodels' type II ANOVA of the grid (`ols` formula + `anova_lm`), its rows keyed by
    our terms. Factors enter as ordered categoricals, so the first level is the reference."""
    terms = terms_of(d)
    names = [*(term_name(t) for t in terms), "Residual"]
    n_params = 1 + sum(len(v) - 1 for v in d.levels.values())
    if len(d.data) <= n_params:  # saturated: sums of squares but no test
        ss = type2_ss(d, d.cells["mean"].to_numpy()[:, None])
        rows = [[float(ss[t][0]), float(len(d.levels[t[0]]) - 1), np.nan, np.nan]
                for t in terms] + [[0.0, 0.0, np.nan, np.nan]]
        return pd.DataFrame(rows, index=names, columns=["sum_sq", "df", "F", "PR(>F)"])
    alias = {k: f"f{i}" for i, k in enumerate(d.keys)}
    frame = pd.DataFrame({"y": d.data["_y"].to_numpy()})
    for k, a in alias.items():
        frame[a] = pd.Categorical(d.data[k].to_numpy(), categories=d.levels[k])
    rhs = [f"C({alias[k]})" for k in d.keys]
    rhs += [f"C({alias[a]}):C({alias[b]})" for a, b in d.interactions]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.ols("y ~ " + " + ".join(rhs), frame).fit(method=fit_method(d))
        table = anova_lm(fit, typ=2)
    if len(table) != len(terms) + 1:  # pragma: no cover - statsmodels changed its layout
        raise RuntimeError(f"anova_lm returned {list(table.index)} for terms {terms}")
    table.index = names
    return table


def _contrast_rows(d: Design, by: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Estimated marginal means' contrast vectors: the mean design row over the full
    factorial (all other factors' levels weighted equally) for each level of `by`."""
    full = pd.DataFrame(list(itertools.product(*(d.levels[k] for k in d.keys))),
                        columns=d.keys)
    x, _ = design_matrix(full, d)
    groups = full.groupby(by, sort=False).indices
    keys = list(itertools.product(*(d.levels[k] for k in by)))
    rows = np.stack([x[groups[k if len(by) > 1 else k[0]]].mean(axis=0) for k in keys])
    return pd.DataFrame(keys, columns=by), rows


def _estimates(l_mat: np.ndarray, beta: np.ndarray, cov: np.ndarray, df: float, level: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    est = l_mat @ beta
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", l_mat, cov, l_mat), 0.0))
    t = stats.t.ppf(0.5 + level / 2, df) if df > 0 else np.nan
    return est, est - t * se, est + t * se


def fit_grid(d: Design, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> GridFit:
    """The grid's ANOVA (shares with bootstrap CIs, partial omega squared, p-values), its
    marginal means and pairwise differences. `seed` makes the bootstrap reproducible."""
    table = anova_table(d)
    y = d.data["_y"].to_numpy()
    ss_total = float(((y - y.mean()) ** 2).sum())
    resid_df = float(table.loc["Residual", "df"])
    resid_ss = float(table.loc["Residual", "sum_sq"])
    mse = resid_ss / resid_df if resid_df > 0 else float("nan")
    n = len(y)
    boot, boot_tot = None, None
    if n_boot > 0:
        means, ssw = _bootstrap_means(d, n_boot, seed)
        boot = type2_ss(d, means)
        w = d.cells["n"].to_numpy(dtype=float)[:, None]
        grand = (w * means).sum(axis=0) / w.sum()
        boot_tot = ssw + (w * (means - grand) ** 2).sum(axis=0)
    terms: dict[Term, TermStats] = {}
    for t in terms_of(d):
        row = table.loc[term_name(t)]
        ss, dft, f, p = (float(row[c]) for c in ("sum_sq", "df", "F", "PR(>F)"))
        om = ((ss - dft * mse) / (ss + (n - dft) * mse)) if np.isfinite(mse) else float("nan")
        ci = (float("nan"), float("nan"))
        if boot is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                shares = boot[t] / boot_tot
            shares = shares[np.isfinite(shares)]
            if shares.size:
                ci = (float(np.quantile(shares, 0.025)), float(np.quantile(shares, 0.975)))
        terms[t] = TermStats(t, dft, ss, ss / ss_total if ss_total > 0 else float("nan"), ci,
                             max(0.0, om) if np.isfinite(om) else om, f, p)
    # The same model on the cell means weighted by seed counts has the same coefficients
    # (the columns are constant within a cell); its covariance takes the raw runs' residual
    # variance. A fifth of the work with 5 seeds.
    x, _ = design_matrix(d.cells, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sm.WLS(d.cells["mean"].to_numpy(), x, weights=d.cells["n"].to_numpy(float)
                     ).fit(method=fit_method(d))
        beta = np.asarray(res.params)
        cov = np.asarray(res.cov_params(scale=mse)) if np.isfinite(mse) else \
            np.full((len(beta), len(beta)), np.nan)
    df_res = resid_df
    emms, pairwise, tables = {}, {}, {}
    for k in d.keys:
        lv, rows = _contrast_rows(d, [k])
        est, lo, hi = _estimates(rows, beta, cov, df_res, level)
        counts = d.data.groupby(k).size()
        emms[k] = pd.DataFrame({"level": lv[k], "mean": est, "ci_low": lo, "ci_high": hi,
                                "n": [int(counts.get(v, 0)) for v in lv[k]]})
        pairwise[k] = _pairwise(lv[k].tolist(), rows, beta, cov, df_res, level)
    for a, b in itertools.combinations(d.keys, 2):
        if (a, b) in d.interactions:
            lv, rows = _contrast_rows(d, [a, b])
            est, lo, hi = _estimates(rows, beta, cov, df_res, level)
            tables[(a, b)] = lv.assign(mean=est, ci_low=lo, ci_high=hi)
    return GridFit(d, terms, ss_total, resid_df, mse, emms, pairwise, tables, n_boot)


def _pairwise(levels: list[str], rows: np.ndarray, beta: np.ndarray, cov: np.ndarray,
              df: float, level: float) -> pd.DataFrame:
    """Every pair of levels: difference of marginal means, two-sided t p-value, Holm-adjusted
    p-value, and a Bonferroni-adjusted (simultaneous) CI that agrees with Holm's test."""
    pairs = list(itertools.combinations(range(len(levels)), 2))
    cols = ["a", "b", "diff", "ci_low", "ci_high", "p", "p_holm"]
    if not pairs:
        return pd.DataFrame(columns=cols)
    l_mat = np.stack([rows[i] - rows[j] for i, j in pairs])
    est = l_mat @ beta
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", l_mat, cov, l_mat), 0.0))
    if df > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            tval = np.abs(est / se)
        p = np.where(se > 0, 2 * stats.t.sf(tval, df), np.where(est == 0, 1.0, 0.0))
        holm = holm_adjust(p)
        half = stats.t.ppf(1 - (1 - level) / (2 * len(pairs)), df) * se
    else:
        p = holm = half = np.full(len(pairs), np.nan)
    return pd.DataFrame({"a": [levels[i] for i, _ in pairs], "b": [levels[j] for _, j in pairs],
                         "diff": est, "ci_low": est - half, "ci_high": est + half, "p": p,
                         "p_holm": holm}, columns=cols)


def pair(fit: GridFit, key: str, a: str, b: str) -> dict[str, float]:
    """The difference a - b of `key`'s marginal means (either orientation of the table)."""
    t = fit.pairwise[key]
    row = t[(t["a"] == a) & (t["b"] == b)]
    sign = 1.0
    if row.empty:
        row, sign = t[(t["a"] == b) & (t["b"] == a)], -1.0
    r = row.iloc[0]
    lo, hi = sign * r["ci_low"], sign * r["ci_high"]
    return {"diff": sign * float(r["diff"]), "ci_low": float(min(lo, hi)),
            "ci_high": float(max(lo, hi)), "p_holm": float(r["p_holm"])}
