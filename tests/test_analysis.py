"""Analysis functions on hand-checkable data."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from ablate import analysis, plots

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def demo() -> pd.DataFrame:
    rows = []
    vals = {("attention", 0.5): [0.50, 0.52, 0.54], ("attention", 1.0): [0.80, 0.80, 0.80],
            ("conv", 0.5): [0.55, 0.55, 0.55], ("conv", 1.0): [0.70, 0.72, 0.74]}
    for (mixer, frac), accs in vals.items():
        for seed, a in enumerate(accs):
            rows.append({"run_id": f"{mixer}-{frac}-{seed}", "factor.model.mixer": mixer,
                         "factor.dataset.fraction": frac, "seed": seed, "val_acc": a,
                         "gmacs": 2.0 if mixer == "attention" else 1.0,
                         "throughput_img_s": 100.0 if mixer == "attention" else 300.0})
    return pd.DataFrame(rows)


def test_aggregate_mean_std_ci():
    agg = analysis.aggregate(demo(), "val_acc").set_index(["factor.model.mixer",
                                                           "factor.dataset.fraction"])
    r = agg.loc[("attention", 0.5)]
    assert r["mean"] == pytest.approx(0.52) and r["std"] == pytest.approx(0.02)
    assert r["n"] == 3
    half = T_975_2 * 0.02 / math.sqrt(3)
    assert r["ci_low"] == pytest.approx(0.52 - half) and r["ci_high"] == pytest.approx(0.52 + half)
    assert agg.loc[("conv", 1.0), "mean"] == pytest.approx(0.72)
    assert agg.loc[("conv", 1.0), "gmacs"] == 1.0
    assert len(agg.loc[("conv", 1.0), "run_ids"]) == 3


def test_single_seed_has_no_interval_and_off_levels_group():
    df = pd.DataFrame({"run_id": ["a", "b"], "factor.model.tokens": [None, 8],
                       "val_acc": [0.3, 0.4]})
    agg = analysis.aggregate(df, "val_acc")
    assert set(agg["factor.model.tokens"]) == {"off", 8}
    assert agg["ci_low"].isna().all() and (agg["n"] == 1).all()


def test_frontier_lower_and_higher_is_better():
    agg = analysis.aggregate(demo(), "val_acc")
    f = analysis.frontier(agg, "gmacs")
    got = list(zip(f["factor.model.mixer"], f["factor.dataset.fraction"], strict=True))
    assert got == [("conv", 1.0), ("attention", 1.0)]
    f2 = analysis.frontier(agg, "throughput_img_s")  # higher throughput is better
    assert list(f2["factor.model.mixer"]) == ["conv", "attention"]


def pareto_front_bruteforce(cost, acc, lower_cost_is_better: bool = True) -> list[int]:
    """O(n^2) reference: i is on the front unless some j is as good in both, better in one."""
    c = np.asarray(cost, dtype=float) * (1 if lower_cost_is_better else -1)
    a = np.asarray(acc, dtype=float)
    out = []
    for i in range(len(c)):
        if not (np.isfinite(c[i]) and np.isfinite(a[i])):
            continue
        dominated = any(
            c[j] <= c[i] and a[j] >= a[i] and (c[j] < c[i] or a[j] > a[i])
            for j in range(len(c)) if j != i and np.isfinite(c[j]) and np.isfinite(a[j]))
        if not dominated:
            out.append(i)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_pareto_matches_bruteforce_with_ties_and_duplicates(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    cost = rng.integers(0, 8, n).astype(float)  # few values: many ties
    acc = rng.integers(0, 8, n).astype(float)
    if n > 3:
        cost[1], acc[1] = cost[0], acc[0]  # an exact duplicate
        cost[2] = np.nan
    for lower in (True, False):
        fast = sorted(analysis.pareto_front(cost, acc, lower))
        slow = sorted(pareto_front_bruteforce(cost, acc, lower))
        assert fast == slow


def test_main_effects_and_sizes():
    eff = analysis.main_effects(demo(), "val_acc")
    mixer = eff["factor.model.mixer"].set_index("level")
    # balanced 2x2: marginal means are the plain means of the cell means
    assert mixer.loc["attention", "mean"] == pytest.approx((0.52 + 0.80) / 2)
    assert mixer.loc["conv", "mean"] == pytest.approx((0.55 + 0.72) / 2)
    frac = eff["factor.dataset.fraction"].set_index("level")
    assert frac.loc["0.5", "mean"] == pytest.approx(0.535)
    assert frac.loc["1", "n"] == 6 and frac.loc["1", "x"] == 1.0
    # the CI is over seeds (residual of the 2x2 model), so it is narrower than the spread of
    # the two configurations the level averages over
    assert frac.loc["1", "ci_high"] - frac.loc["1", "ci_low"] < 0.08
    sizes = analysis.effect_sizes(eff)
    assert sizes["factor"].tolist() == ["factor.dataset.fraction", "factor.model.mixer"]
    assert sizes["range"].iloc[0] == pytest.approx(0.76 - 0.535)


def test_aggregate_groups_seeds_by_cell_id_not_by_factor_levels():
    """An edited study (say, a new lr) has new cell ids at the same factor levels: its runs
    are another configuration, not extra seeds of the old one."""
    df = demo()
    df["cell_id"] = df["factor.model.mixer"] + df["factor.dataset.fraction"].astype(str)
    old = df[df["factor.model.mixer"] == "conv"].assign(cell_id=lambda d: d["cell_id"] + "-old",
                                                        val_acc=0.1)
    agg = analysis.aggregate(pd.concat([df, old]), "val_acc")
    assert len(agg) == 6 and (agg["n"] == 3).all()
    assert sorted(agg["mean"].round(6))[:2] == [0.1, 0.1]


def test_main_effects_do_not_average_a_union_of_grids():
    """Grid 0: mixer x fraction; grid 1: conv's kernel sizes. A union analysed as one table
    averaged conv over every kernel size; per grid, conv's marginal mean is the conv of grid
    0 (its default kernel), whatever the other kernels score."""
    rows = []
    for (mixer, frac), accs in {("attention", 0.5): [0.5, 0.52], ("attention", 1.0): [0.8, 0.8],
                                ("conv", 0.5): [0.55, 0.55], ("conv", 1.0): [0.7, 0.72]}.items():
        for seed, a in enumerate(accs):
            rows.append({"grid": 0, "factor.model.mixer": mixer, "factor.dataset.fraction": frac,
                         "factor.model.kernel_size": 7 if mixer == "conv" else None,
                         "seed": seed, "val_acc": a, "status": "finished"})
    for k in (3, 5):
        for frac in (0.5, 1.0):
            for seed in (0, 1):
                rows.append({"grid": 1, "factor.model.mixer": "conv",
                             "factor.dataset.fraction": frac, "factor.model.kernel_size": k,
                             "seed": seed, "val_acc": 0.1, "status": "finished"})
    df = pd.DataFrame(rows)
    grids = [{"model.mixer": ["attention", "conv"], "dataset.fraction": [0.5, 1.0]},
             {"model.mixer": ["conv"], "model.kernel_size": [3, 5, 7],
              "dataset.fraction": [0.5, 1.0]}]
    for g in (grids, None):  # with the study's grids, and inferred from the runs' grid tag
        eff = analysis.main_effects(df, "val_acc", grids=g)
        mixer = eff["factor.model.mixer"].set_index("level")
        assert mixer.loc["conv", "mean"] == pytest.approx((0.55 + 0.71) / 2)
        kernel = eff["factor.model.kernel_size"].set_index("level")
        assert list(kernel.index) == ["3", "5", "7"]  # the grid-0 conv runs are kernel 7
        assert kernel.loc["7", "mean"] == pytest.approx((0.55 + 0.71) / 2)
        assert kernel.loc["3", "mean"] == pytest.approx(0.1)


def test_interaction_and_scaling():
    t = analysis.interaction(demo(), "val_acc", "factor.model.mixer", "factor.dataset.fraction")
    assert t.loc["conv", "1"] == pytest.approx(0.72) and t.loc["attention", "0.5"] == \
        pytest.approx(0.52)
    sc = analysis.scaling_curves(demo(), "val_acc")
    conv = sc[sc["factor.model.mixer"] == "conv"].set_index("factor.dataset.fraction")
    assert conv.loc[0.5, "mean"] == pytest.approx(0.55) and conv.loc[1.0, "mean"] == \
        pytest.approx(0.72)


def test_figures_carry_the_computed_points():
    df = demo()
    agg = analysis.aggregate(df, "val_acc")
    front = analysis.frontier(agg, "gmacs")
    fig = plots.frontier_figure(agg, front, "gmacs", "val_acc", "factor.model.mixer",
                                "factor.dataset.fraction", log_x=True)
    points = {(x, round(y, 6)) for tr in fig.data if tr.mode == "markers"
              for x, y in zip(tr.x, tr.y, strict=True)}
    assert points == {(2.0, 0.52), (2.0, 0.8), (1.0, 0.55), (1.0, 0.72)}
    line = [tr for tr in fig.data if tr.name == "Pareto frontier"][0]
    assert list(line.x) == [1.0, 2.0] and [round(v, 6) for v in line.y] == [0.72, 0.8]
    assert fig.layout.xaxis.type == "log"
    conv = [tr for tr in fig.data if tr.name == "mixer=conv"][0]
    half = T_975_2 * 0.02 / math.sqrt(3)
    assert sorted(round(v, 6) for v in conv.error_y.array) == [0.0, round(half, 6)]
    eff = plots.effects_figure(analysis.main_effects(df, "val_acc"), "val_acc")
    assert len(eff.data) == 2 and {tr.mode for tr in eff.data} == {"markers"}
    frac = [tr for tr in eff.data if tr.name == "fraction"][0]
    assert list(frac.x) == [-1.0, 0.0]  # log2 positions of 0.5 and 1
    # one colour per level, the same in every figure
    mixer = [tr for tr in eff.data if tr.name == "mixer"][0]
    assert list(mixer.marker.color) == [plots.MIXER_COLORS["attention"],
                                        plots.MIXER_COLORS["conv"]]
    assert conv.marker.color == plots.MIXER_COLORS["conv"]
    fit = analysis.fit_grid(analysis.designs(df, "val_acc")[0], n_boot=0)
    table = fit.tables[("factor.model.mixer", "factor.dataset.fraction")]
    ix = plots.interaction_figure(table, "factor.dataset.fraction", "factor.model.mixer",
                                  "val_acc")
    att = [tr for tr in ix.data if tr.name == "mixer=attention"][0]
    assert np.allclose(att.y, [0.52, 0.80]) and att.line.color == plots.MIXER_COLORS["attention"]
    sc = plots.scaling_figure(analysis.scaling_curves(df, "val_acc"), "val_acc",
                              "factor.dataset.fraction", "factor.model.mixer")
    assert {tr.name for tr in sc.data} == {"attention", "conv"}
    assert [tr.line.color for tr in sc.data] == [plots.MIXER_COLORS["attention"],
                                                 plots.MIXER_COLORS["conv"]]
    shares = pd.DataFrame({"term": ["mixer", "fraction"], "share": [0.6, 0.3],
                           "ci_low": [0.5, 0.2], "ci_high": [0.7, 0.4], "grid": [0, 0]})
    sh = plots.shares_figure(shares, "val_acc")
    assert list(sh.data[0].y) == pytest.approx([60.0, 30.0])
    # the builders skip Plotly's validation (plots._figure): what they build must pass it
    # unchanged (every property name valid, no value coerced), in the house template
    import plotly.graph_objects as go
    import plotly.io as pio

    white = json.loads(json.dumps(pio.templates["plotly_white"].to_plotly_json()))
    for f in (fig, eff, ix, sc, sh):
        as_built = json.loads(f.to_json())
        assert json.loads(go.Figure(as_built).to_json()) == as_built
        assert as_built["layout"]["template"] == white
