"""Plotly figure builders: `info -> Figure`, no Streamlit, no I/O (tested directly)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ablate.analysis import OFF

SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "hexagon",
           "triangle-down", "pentagon"]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


def _label(col: str) -> str:
    return col.split(".")[-1]


def _config_text(row: pd.Series, factors: list[str]) -> str:
    parts = [f"{_label(f)}={row[f]}" for f in factors]
    ci = ("" if pd.isna(row["ci_low"]) else f" [{row['ci_low']:.4f}, {row['ci_high']:.4f}]")
    runs = ", ".join(r[:8] for r in row.get("run_ids", []) or [])
    return (" ".join(parts) + f"<br>mean {row['mean']:.4f}{ci} (n={row['n']})"
            + (f"<br>runs: {runs}" if runs else ""))


def frontier_figure(agg: pd.DataFrame, front: pd.DataFrame, cost: str, metric: str,
                    color: str | None, symbol: str | None, log_x: bool = False) -> go.Figure:
    """One marker per configuration (seed mean, CI error bars), the frontier as a line."""
    fig = go.Figure()
    factors = [c for c in agg.columns if c.startswith("factor.")]
    groups = [(None, agg)] if color is None else list(agg.groupby(color, sort=True))
    sym_levels = sorted(agg[symbol].astype(str).unique()) if symbol else []
    for gi, (level, g) in enumerate(groups):
        symbols = ([SYMBOLS[sym_levels.index(str(v)) % len(SYMBOLS)] for v in g[symbol]]
                   if symbol else "circle")
        err = (g["ci_high"] - g["mean"]).fillna(0)
        fig.add_trace(go.Scatter(
            x=g[cost], y=g["mean"], mode="markers",
            name=f"{_label(color)}={level}" if color else "configurations",
            marker=dict(size=11, symbol=symbols, color=COLORS[gi % len(COLORS)],
                        line=dict(width=1, color="white")),
            error_y=dict(type="data", array=err.tolist(), visible=True, thickness=1),
            text=[_config_text(r, factors) for _, r in g.iterrows()],
            hovertemplate="%{text}<br>" + _label(cost) + "=%{x}<extra></extra>",
        ))
    if not front.empty:
        fig.add_trace(go.Scatter(x=front[cost], y=front["mean"], mode="lines",
                                 name="Pareto frontier", line=dict(color="black", dash="dash",
                                                                    shape="hv"),
                                 hoverinfo="skip"))
    title = f"{_label(metric)} vs {cost}" + (f" (symbol: {_label(symbol)})" if symbol else "")
    fig.update_layout(title=title, xaxis_title=cost, yaxis_title=f"{metric} (seed mean, 95% CI)",
                      legend_title_text="", template="plotly_white", height=520)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def effects_figure(effects: dict[str, pd.DataFrame], metric: str) -> go.Figure:
    """Main effect of each factor: level means with CI, one subplot column per factor."""
    from plotly.subplots import make_subplots

    names = list(effects)
    fig = make_subplots(rows=1, cols=max(1, len(names)), shared_yaxes=True,
                        subplot_titles=[_label(n) for n in names])
    for i, name in enumerate(names, start=1):
        t = effects[name]
        fig.add_trace(go.Scatter(
            x=[str(v) for v in t["level"]], y=t["mean"], mode="markers+lines", name=_label(name),
            error_y=dict(type="data", array=(t["ci_high"] - t["mean"]).fillna(0).tolist()),
            showlegend=False), row=1, col=i)
    fig.update_layout(title=f"main effects on {metric} (mean over other factors, 95% CI)",
                      template="plotly_white", height=420)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    return fig


def interaction_figure(table: pd.DataFrame, f1: str, f2: str, metric: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=table.to_numpy(), x=[str(c) for c in table.columns],
                               y=[str(i) for i in table.index], colorscale="Viridis",
                               texttemplate="%{z:.3f}", colorbar=dict(title=metric)))
    fig.update_layout(title=f"{metric}: {_label(f1)} x {_label(f2)}", xaxis_title=_label(f2),
                      yaxis_title=_label(f1), template="plotly_white", height=420)
    return fig


def scaling_figure(curves: pd.DataFrame, metric: str, fraction: str, group: str) -> go.Figure:
    fig = go.Figure()
    for gi, (level, g) in enumerate(curves.groupby(group, sort=True)):
        g = g.sort_values(fraction)
        fig.add_trace(go.Scatter(
            x=g[fraction], y=g["mean"], mode="lines+markers", name=str(level),
            line=dict(color=COLORS[gi % len(COLORS)]),
            error_y=dict(type="data", array=(g["ci_high"] - g["mean"]).fillna(0).tolist())))
    fig.update_layout(title=f"data scaling: {metric} vs training-data fraction",
                      xaxis_title="dataset.fraction", yaxis_title=metric,
                      legend_title_text=_label(group), template="plotly_white", height=420)
    fig.update_xaxes(type="log")
    return fig


def curves_figure(curves: pd.DataFrame, runs: pd.DataFrame, metric: str, group: str | None
                  ) -> go.Figure:
    """Per-epoch `metric` of each run, coloured by the level of `group`."""
    fig = go.Figure()
    sub = curves[curves["metric"] == metric]
    levels: list[str] = []
    for rid, g in sub.groupby("run_id", sort=False):
        row = runs[runs["run_id"] == rid]
        if row.empty:
            continue
        level = OFF if group is None or pd.isna(row[group].iloc[0]) else str(row[group].iloc[0])
        if level not in levels:
            levels.append(level)
        g = g.sort_values("step")
        shown = {t.legendgroup for t in fig.data}
        fig.add_trace(go.Scatter(x=g["step"], y=g["value"], mode="lines",
                                 name=f"{_label(group)}={level}" if group else level,
                                 legendgroup=level, showlegend=level not in shown,
                                 line=dict(color=COLORS[levels.index(level) % len(COLORS)]),
                                 hovertext=row["run_name"].iloc[0]))
    fig.update_layout(title=f"{metric} per epoch", xaxis_title="epoch", yaxis_title=metric,
                      template="plotly_white", height=420)
    return fig
