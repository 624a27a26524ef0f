"""Exploration views, computed (pure): parallel coordinates of the factors against the
metric, and the metric against one numeric param with seed CIs. Plotting is in ablate.plots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ablate.analysis.seeds import aggregate, factor_columns, label, numeric, order_levels


def parallel_dims(df: pd.DataFrame, metric: str, factors: Sequence[str] | None = None
                  ) -> tuple[list[dict[str, Any]], list[float]]:
    """(dimensions, colour) of a parallel-coordinates plot: one line per configuration (seed
    means). A factor whose levels are all numbers is a numeric axis; any other is an
    ordered categorical axis (codes 0..k-1 with the level names as ticks). The metric is
    the last axis and the colour."""
    factors = list(factor_columns(df) if factors is None else factors)
    agg = aggregate(df, metric, factors, extra=())
    dims: list[dict[str, Any]] = []
    for f in factors:
        levels = [label(v) for v in agg[f]]
        nums = [numeric(lv) for lv in levels]
        name = f.removeprefix("factor.")
        if all(x is not None for x in nums):
            dims.append({"label": name, "values": [float(x) for x in nums]})
        else:
            order = order_levels(set(levels))
            code = {lv: i for i, lv in enumerate(order)}
            dims.append({"label": name, "values": [code[lv] for lv in levels],
                         "tickvals": list(range(len(order))), "ticktext": order})
    means = [float(x) for x in agg["mean"]]
    dims.append({"label": metric, "values": means})
    return dims, means


def numeric_params(df: pd.DataFrame) -> list[str]:
    """Factor columns whose levels (where set) are all numbers: candidates for an x axis."""
    out = []
    for f in factor_columns(df):
        vals = [label(v) for v in df[f].dropna()]
        if vals and all(numeric(v) is not None for v in vals) and len(set(vals)) > 1:
            out.append(f)
    return out


def metric_vs_param(df: pd.DataFrame, metric: str, param: str) -> pd.DataFrame:
    """`metric` against the numeric factor `param`: one row per configuration (its seed mean
    and 95% CI over seeds, as `aggregate`) with `x` the param's level; configurations whose
    level is not a number (off) are left out. Sorted by x."""
    cells = aggregate(df, metric, factor_columns(df), extra=())
    if cells.empty or param not in cells:
        return cells.assign(x=pd.Series(dtype=float))
    x = cells[param].map(lambda v: numeric(label(v)))
    return cells.assign(x=x)[x.notna()].sort_values("x", kind="stable", ignore_index=True)
