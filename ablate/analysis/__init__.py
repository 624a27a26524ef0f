"""Pure analysis of a study's runs: seed aggregation (by `ablate.cell_id`), Pareto frontiers,
grid-by-grid linear models (ANOVA, marginal means, pairwise differences), scaling slopes,
cost, and the verdict. No I/O, no plotting; never imports Ray, MLflow or Streamlit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ablate.analysis.anova import N_BOOT, GridFit, TermStats, fit_grid, pair, term_name
from ablate.analysis.design import Design, designs
from ablate.analysis.explore import metric_vs_param, numeric_params, parallel_dims
from ablate.analysis.pool import Pooled, Refusal, pooled_views
from ablate.analysis.scaling import FRACTION, MIXER, PATCH, cost_table, slopes
from ablate.analysis.seeds import (
    COST_METRICS,
    FINISHED,
    HIGHER_IS_BETTER,
    KNOWN_ORDER,
    METRIC_HELP,
    OFF,
    aggregate,
    cell_keys,
    factor_columns,
    frontier,
    label,
    newest_cells,
    numeric,
    order_levels,
    pareto_front,
    short,
    split_status,
    status_counts,
)
from ablate.analysis.verdict import Analysis, analyse, choose, fit_for, sentences, to_dict


def _fits(df: pd.DataFrame, metric: str, grids: list[dict[str, list[Any]]] | None
          ) -> list[GridFit]:
    from threadpoolctl import threadpool_limits

    d = df[df[metric].notna()] if metric in df else df.iloc[0:0]
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: see `analyse`
        return [fit_grid(x, n_boot=0) for x in designs(d, metric, grids) if x.keys]


def main_effects(df: pd.DataFrame, metric: str, factors: Sequence[str] | None = None,
                 grids: list[dict[str, list[Any]]] | None = None) -> dict[str, pd.DataFrame]:
    """Per factor: estimated marginal means per level with 95% CIs over seeds, from the grid
    that varies it most (never an unweighted average over a union of grids). Columns: level,
    x (the level as a number, or NaN), mean, ci_low, ci_high, n (runs), grid."""
    fits = _fits(df, metric, grids)
    keys = factor_columns(df) if factors is None else list(factors)
    out = {}
    for k in keys:
        f = fit_for(fits, k)
        if f is not None:
            em = f.emms[k]
            out[k] = em.assign(x=[numeric(v) for v in em["level"]], grid=f.design.index)[
                ["level", "x", "mean", "ci_low", "ci_high", "n", "grid"]]
    return out


def effect_sizes(effects: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """How much each factor moves the metric: the range of its marginal means, largest first."""
    rows = [{"factor": f, "range": float(t["mean"].max() - t["mean"].min()) if len(t) else 0.0,
             "levels": len(t)} for f, t in effects.items()]
    return pd.DataFrame(rows, columns=["factor", "range", "levels"]).sort_values(
        "range", ascending=False, ignore_index=True)


def interaction(df: pd.DataFrame, metric: str, f1: str, f2: str,
                grids: list[dict[str, list[Any]]] | None = None) -> pd.DataFrame:
    """Marginal means for each (f1 level, f2 level) in a grid that varies both (rows f1,
    columns f2); empty when no grid crosses them."""
    for f in _fits(df, metric, grids):
        for (a, b), t in f.tables.items():
            if {a, b} == {f1, f2}:
                return t.pivot(index=f1, columns=f2, values="mean").reindex(
                    index=f.design.levels[f1], columns=f.design.levels[f2])
    return pd.DataFrame()


def scaling_curves(df: pd.DataFrame, metric: str, fraction: str = FRACTION,
                   group: str = MIXER, grids: list[dict[str, list[Any]]] | None = None
                   ) -> pd.DataFrame:
    """The metric against `fraction`, one curve per `group` level: marginal means with 95%
    CIs over seeds from a grid that varies both."""
    cols = [group, fraction, "mean", "ci_low", "ci_high"]
    for f in _fits(df, metric, grids):
        for (a, b), t in f.tables.items():
            if {a, b} == {fraction, group}:
                t = t[[group, fraction, "mean", "ci_low", "ci_high"]].copy()
                t[fraction] = t[fraction].map(numeric)
                return t.reset_index(drop=True)
    return pd.DataFrame(columns=cols)


__all__ = [
    "COST_METRICS", "FINISHED", "FRACTION", "HIGHER_IS_BETTER", "KNOWN_ORDER", "METRIC_HELP",
    "MIXER",
    "N_BOOT", "OFF", "PATCH", "Analysis", "Pooled", "Refusal", "choose", "pooled_views",
    "Design", "GridFit", "TermStats", "aggregate",
    "analyse", "cell_keys", "cost_table", "designs", "effect_sizes", "factor_columns",
    "fit_for", "fit_grid", "frontier", "interaction", "label", "main_effects", "newest_cells",
    "metric_vs_param", "numeric", "numeric_params", "parallel_dims",
    "order_levels", "pair", "pareto_front", "scaling_curves", "sentences", "short",
    "slopes", "split_status", "status_counts", "term_name", "to_dict",
]
