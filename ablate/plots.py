"""Plotly figure builders: `info -> Figure`, no Streamlit, no I/O (tested directly)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from ablate.analysis import KNOWN_ORDER, OFF, label, numeric, order_levels

SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "hexagon",
           "triangle-down", "pentagon"]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


# One colour per level, the same in every figure of the app and the report: the mixers have
# fixed colours; any other level takes the palette's colours in level order.
MIXER_COLORS = dict(zip(KNOWN_ORDER, COLORS, strict=False))
OTHER_COLORS = ["#17becf", "#bcbd22", "#7f7f7f", "#e377c2", "#8c564b", "#393b79", "#637939",
                "#8c6d31", "#843c39", "#7b4173"]


def level_colors(levels: list[str]) -> dict[str, str]:
    """Colour of each level label: mixers their own, other levels OTHER_COLORS in order."""
    out, i = {}, 0
    for lv in order_levels(str(v) for v in levels):
        if lv in MIXER_COLORS:
            out[lv] = MIXER_COLORS[lv]
        else:
            out[lv] = OTHER_COLORS[i % len(OTHER_COLORS)]
            i += 1
    return out


_TEMPLATE: dict = {}


def _figure(traces: list[dict], layout: dict) -> go.Figure:
    """A figure from plain dicts (nested titles, no `xaxis_title` shorthands), built without
    Plotly's per-property validation: the report's nine figures took 0.6 s to validate,
    half of it copying the template into each. tests/test_analysis.py checks that every
    builder's output passes validation unchanged."""
    if not _TEMPLATE:
        import plotly.io as pio

        _TEMPLATE.update(pio.templates["plotly_white"].to_plotly_json())
    return go.Figure(data=traces, layout={**layout, "template": _TEMPLATE}, _validate=False)


def _title(text: str) -> dict:
    return {"title": {"text": text}}


def _bars(hi: pd.Series, lo: pd.Series | None = None) -> dict:
    """Asymmetric (or, without lo, symmetric) error bars from the CI half-widths."""
    if lo is None:
        return dict(type="data", array=hi.fillna(0).tolist())
    return dict(type="data", symmetric=False, array=hi.fillna(0).tolist(),
                arrayminus=lo.fillna(0).tolist())


def _label(col: str) -> str:
    return col.split(".")[-1]


def _config_text(row: dict, factors: list[str]) -> str:
    parts = [f"{_label(f)}={row[f]}" for f in factors]
    ci = ("" if pd.isna(row["ci_low"]) else f" [{row['ci_low']:.4f}, {row['ci_high']:.4f}]")
    runs = ", ".join(r[:8] for r in row.get("run_ids", []) or [])
    return (" ".join(parts) + f"<br>mean {row['mean']:.4f}{ci} (n={row['n']})"
            + (f"<br>runs: {runs}" if runs else ""))


def _config_texts(g: pd.DataFrame, factors: list[str]) -> list[str]:
    """_config_text of every row, from plain column values (not iterrows: 1,000
    configurations in milliseconds)."""
    cols = [c for c in (*factors, "ci_low", "ci_high", "mean", "n", "run_ids") if c in g]
    return [_config_text(dict(zip(cols, vals, strict=True)), factors)
            for vals in zip(*(g[c].tolist() for c in cols), strict=True)]


def frontier_figure(agg: pd.DataFrame, front: pd.DataFrame, cost: str, metric: str,
                    color: str | None, symbol: str | None, log_x: bool = False) -> go.Figure:
    """One marker per configuration (seed mean, CI error bars), the frontier as a line."""
    traces = []
    factors = [c for c in agg.columns if c.startswith("factor.")]
    keyed = agg.assign(_c=agg[color].map(label)) if color else agg
    groups = [(None, agg)] if color is None else [
        (lv, keyed[keyed["_c"] == lv]) for lv in order_levels(keyed["_c"])]
    colors = level_colors([lv for lv, _ in groups]) if color else {}
    sym_levels = sorted(agg[symbol].astype(str).unique()) if symbol else []
    for level, g in groups:
        symbols = ([SYMBOLS[sym_levels.index(str(v)) % len(SYMBOLS)] for v in g[symbol]]
                   if symbol else "circle")
        traces.append(dict(
            type="scatter", x=g[cost].to_numpy(float), y=g["mean"].to_numpy(float),
            mode="markers", name=f"{_label(color)}={level}" if color else "configurations",
            marker=dict(size=11, symbol=symbols, color=colors.get(level, COLORS[0]),
                        line=dict(width=1, color="white")),
            error_y={**_bars(g["ci_high"] - g["mean"]), "visible": True, "thickness": 1},
            text=_config_texts(g, factors),
            hovertemplate="%{text}<br>" + _label(cost) + "=%{x}<extra></extra>",
        ))
    if not front.empty:
        traces.append(dict(type="scatter", x=front[cost].to_numpy(float),
                           y=front["mean"].to_numpy(float), mode="lines",
                           name="Pareto frontier",
                           line=dict(color="black", dash="dash", shape="hv"), hoverinfo="skip"))
    title = f"{_label(metric)} vs {cost}" + (f" (symbol: {_label(symbol)})" if symbol else "")
    return _figure(traces, dict(
        _title(title), xaxis={**_title(cost), **({"type": "log"} if log_x else {})},
        yaxis=_title(f"{metric} (seed mean, 95% CI)"), legend=_title(""), height=520))


def _axis(levels: list[str]) -> tuple[list, dict]:
    """x positions of a factor's levels and the axis settings: numeric levels on a log2 axis
    (positions log2(level), ticks labelled with the levels), others categorical."""
    nums = [numeric(v) for v in levels]
    if levels and all(x is not None and x > 0 for x in nums):
        xs = [math.log2(x) for x in nums]
        return xs, dict(tickmode="array", tickvals=xs, ticktext=levels, type="linear")
    return list(levels), dict(type="category", categoryorder="array", categoryarray=levels)


def effects_figure(effects: dict[str, pd.DataFrame], metric: str) -> go.Figure:
    """Main effect of each factor: marginal means as points with 95% CI error bars (no lines
    joining categories), one subplot per factor, numeric factors on log2 axes."""
    from plotly.subplots import make_subplots

    names = list(effects)
    # the subplot grid (axis domains, shared y, titles) from Plotly, the rest as dicts
    layout = make_subplots(rows=1, cols=max(1, len(names)), shared_yaxes=True,
                           subplot_titles=[_label(n) for n in names]).layout.to_plotly_json()
    traces = []
    for i, name in enumerate(names, start=1):
        t = effects[name]
        levels = [str(v) for v in t["level"]]
        xs, axis = _axis(levels)
        colors = level_colors(levels)
        n = "" if i == 1 else str(i)
        traces.append(dict(
            type="scatter", x=xs, y=t["mean"].to_numpy(float), mode="markers",
            name=_label(name), text=levels, marker=dict(size=11,
                                                        color=[colors[v] for v in levels]),
            error_y=_bars(t["ci_high"] - t["mean"], t["mean"] - t["ci_low"]),
            hovertemplate="%{text}: %{y:.4f}<extra></extra>", showlegend=False,
            xaxis=f"x{n}", yaxis=f"y{n}"))
        layout[f"xaxis{n}"] = {**layout.get(f"xaxis{n}", {}), **axis, **_title(
            _label(name) + (" (log2)" if axis["type"] == "linear" else ""))}
    layout["yaxis"] = {**layout.get("yaxis", {}), **_title(metric)}
    return _figure(traces, {**layout, **_title(
        f"marginal means of {metric} (95% CI over seeds)"), "height": 420})


def interaction_figure(table: pd.DataFrame, f1: str, f2: str, metric: str) -> go.Figure:
    """Marginal means of each (f1, f2) pair (long table: f1, f2, mean, ci_low, ci_high): f1
    on x (log2 when numeric), one colour per f2 level; lines only along a numeric f1."""
    traces = []
    l1 = list(dict.fromkeys(str(v) for v in table[f1]))
    l2 = list(dict.fromkeys(str(v) for v in table[f2]))
    xs, axis = _axis(l1)
    pos = dict(zip(l1, xs, strict=True))
    colors = level_colors(l2)
    for lv in l2:
        g = table[table[f2].astype(str) == lv]
        traces.append(dict(
            type="scatter", x=[pos[str(v)] for v in g[f1]], y=g["mean"].to_numpy(float),
            name=f"{_label(f2)}={lv}",
            mode="lines+markers" if axis["type"] == "linear" else "markers",
            marker=dict(size=10, color=colors[lv]), line=dict(color=colors[lv]),
            error_y=_bars(g["ci_high"] - g["mean"], g["mean"] - g["ci_low"])))
    return _figure(traces, dict(
        _title(f"{metric}: {_label(f1)} x {_label(f2)} (marginal means, 95% CI)"),
        xaxis={**_title(_label(f1)), **axis}, yaxis=_title(metric), height=420,
        legend=_title("")))


def scaling_figure(curves: pd.DataFrame, metric: str, fraction: str, group: str) -> go.Figure:
    """The metric against a numeric factor (log2 axis), one coloured curve per group level."""
    traces = []
    levels = list(dict.fromkeys(str(v) for v in curves[group]))
    colors = level_colors(levels)
    for level in levels:
        g = curves[curves[group].astype(str) == level].sort_values(fraction)
        traces.append(dict(
            type="scatter", x=g[fraction].to_numpy(float), y=g["mean"].to_numpy(float),
            mode="lines+markers", name=level, line=dict(color=colors[level]),
            marker=dict(color=colors[level]),
            error_y=_bars(g["ci_high"] - g["mean"], g["mean"] - g["ci_low"])))
    vals = [float(v) for v in sorted(curves[fraction].dropna().unique())] if len(curves) else []
    return _figure(traces, dict(
        _title(f"{metric} vs {_label(fraction)} (marginal means, 95% CI)"),
        xaxis={**_title(f"{fraction.removeprefix('factor.')} (log2 axis)"), "type": "log",
               "tickvals": vals, "ticktext": [f"{v:g}" for v in vals]},
        yaxis=_title(metric), legend=_title(_label(group)), height=420))


def shares_figure(shares: pd.DataFrame, metric: str) -> go.Figure:
    """Share of the variance of each term (rows: term, share, ci_low, ci_high, grid) as bars
    with bootstrap 95% CIs."""
    names = [f"{t}" + (f" (grid {g})" if shares["grid"].nunique() > 1 else "")
             for t, g in zip(shares["term"], shares["grid"], strict=True)]
    return _figure([dict(
        type="bar", x=names, y=(100 * shares["share"]).to_numpy(float),
        marker=dict(color="#4c78a8"),
        error_y=_bars(100 * (shares["ci_high"] - shares["share"]),
                      100 * (shares["share"] - shares["ci_low"])),
        hovertemplate="%{x}: %{y:.1f}%<extra></extra>")], dict(
        _title(f"share of the variance of {metric} (bootstrap 95% CI over seeds)"),
        yaxis=_title("% of total sum of squares"), height=420))


def curves_figure(curves: pd.DataFrame, runs: pd.DataFrame, metric: str, group: str | None
                  ) -> go.Figure:
    """Per-epoch `metric` of each run, coloured by the level of `group`."""
    fig = go.Figure()
    sub = curves[curves["metric"] == metric]
    colors = level_colors(runs[group].map(label).unique().tolist()) if group else {}
    for rid, g in sub.groupby("run_id", sort=False):
        row = runs[runs["run_id"] == rid]
        if row.empty:
            continue
        level = OFF if group is None else label(row[group].iloc[0])
        g = g.sort_values("step")
        shown = {t.legendgroup for t in fig.data}
        fig.add_trace(go.Scatter(x=g["step"], y=g["value"], mode="lines",
                                 name=f"{_label(group)}={level}" if group else level,
                                 legendgroup=level, showlegend=level not in shown,
                                 line=dict(color=colors.get(level, COLORS[0])),
                                 hovertext=row["run_name"].iloc[0]))
    fig.update_layout(title=f"{metric} per epoch", xaxis_title="epoch", yaxis_title=metric,
                      template="plotly_white", height=420)
    return fig


def parallel_figure(dims: list[dict], color: list[float], metric: str) -> go.Figure:
    """Parallel coordinates: one line per configuration, coloured by the metric."""
    fig = go.Figure(go.Parcoords(
        line=dict(color=color, colorscale="Viridis", showscale=True,
                  colorbar=dict(title=_label(metric))),
        dimensions=[{k: v for k, v in d.items()} for d in dims]))
    fig.update_layout(height=480, margin=dict(l=60, r=60, t=50, b=30))
    return fig


def metric_vs_param_figure(cells: pd.DataFrame, metric: str, param: str, group: str | None,
                           log_x: bool = False) -> go.Figure:
    """Seed means with 95% CIs against a numeric param, a line per `group` level through the
    mean of its configurations at each x."""
    fig = go.Figure()
    groups = ([(None, cells)] if not group or group not in cells else
              [(lv, cells[cells[group].map(label) == lv])
               for lv in order_levels(set(cells[group].map(label)))])
    colors = level_colors([str(lv) for lv, _ in groups])
    for lv, sub in groups:
        name = "all" if lv is None else str(lv)
        c = colors.get(name, COLORS[0])
        err = (sub["ci_high"] - sub["mean"]).fillna(0)
        fig.add_trace(go.Scatter(x=sub["x"], y=sub["mean"], mode="markers", name=name,
                                 legendgroup=name, marker=dict(color=c),
                                 error_y=dict(type="data", array=err, visible=True)))
        line = sub.groupby("x", sort=True)["mean"].mean()
        fig.add_trace(go.Scatter(x=line.index, y=line.values, mode="lines", showlegend=False,
                                 legendgroup=name, line=dict(color=c)))
    fig.update_layout(xaxis_title=_label(param), yaxis_title=_label(metric), height=440,
                      legend_title=_label(group) if group else None)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def compare_curves_figure(curves: dict[str, pd.DataFrame], colors: dict[str, str], metric: str
                          ) -> go.Figure:
    """Per-epoch `metric` of the runs of each compared cell (name -> long curves table:
    run_id, metric, step, value), one colour per cell."""
    fig = go.Figure()
    for i, (name, cv) in enumerate(curves.items()):
        sub = cv[cv["metric"] == metric] if not cv.empty else cv
        c = colors.get(name, COLORS[i % len(COLORS)])
        for j, (_, g) in enumerate(sub.groupby("run_id", sort=False)):
            g = g.sort_values("step")
            fig.add_trace(go.Scatter(x=g["step"], y=g["value"], mode="lines", name=name,
                                     legendgroup=name, showlegend=j == 0,
                                     line=dict(color=c)))
    fig.update_layout(title=f"{metric} per epoch (one line per seed)", xaxis_title="epoch",
                      yaxis_title=metric, template="plotly_white", height=400,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def importance_figure(imp: pd.DataFrame) -> go.Figure:
    """Parameter importances (rows: param, importance, evaluator) as grouped bars, one colour
    per evaluator, params in the order of the first evaluator's ranking."""
    fig = go.Figure()
    order = list(dict.fromkeys(imp.sort_values(["evaluator", "rank"])["param"]))
    for i, (ev, t) in enumerate(imp.groupby("evaluator", sort=True)):
        t = t.set_index("param").reindex(order)
        fig.add_trace(go.Bar(x=order, y=t["importance"], name=ev,
                             marker_color=COLORS[i % len(COLORS)]))
    fig.update_layout(barmode="group", title="parameter importance (normalised per evaluator)",
                      yaxis_title="importance", template="plotly_white", height=400)
    return fig
