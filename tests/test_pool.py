"""Pooled views over a union of grids: planted effects recovered where the other factors
match, pools refused where they do not."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from ablate import analysis, render

MIXER = {"attention": 0.05, "conv": 0.0, "mlp": -0.03}
PER_DOUBLING = 0.03          # planted data effect: 0.03 per doubling of the fraction
SIGMA = 0.005
GRID_A = {"model.mixer": ["attention", "conv"], "dataset.fraction": [0.25, 1.0]}
GRID_B = {"model.mixer": ["attention", "mlp"], "dataset.fraction": [0.5, 1.0]}


def truth(m: str, f: float) -> float:
    return 0.6 + MIXER[m] + PER_DOUBLING * math.log2(f)


def union(grids: list[dict], extra: list[dict] | None = None, seeds: int = 3,
          rng_seed: int = 0) -> pd.DataFrame:
    """One run per trial of the union (a trial two grids share runs once, as ablate does);
    `extra[g]` sets further factor columns for grid g's trials."""
    rng = np.random.default_rng(rng_seed)
    extra = extra or [{} for _ in grids]
    seen, rows = set(), []
    for g, grid in enumerate(grids):
        for m, f in itertools.product(grid["model.mixer"], grid["dataset.fraction"]):
            more = extra[g]
            cell = (m, f, tuple(sorted(more.items())))
            if cell in seen:
                continue
            seen.add(cell)
            for s in range(seeds):
                rows.append({"run_id": f"{cell}-{s}", "cell_id": str(cell), "grid": g,
                             "status": "finished", "seed": s, "factor.model.mixer": m,
                             "factor.dataset.fraction": f, "factor.model.tokens": None,
                             **{f"factor.{k}": v for k, v in more.items()},
                             "test_acc": truth(m, f) + SIGMA * rng.standard_normal()})
    return pd.DataFrame(rows)


def test_pooled_view_recovers_planted_effects_where_the_other_factors_match():
    df = union([GRID_A, GRID_B])
    a = analysis.analyse(df, "test_acc", grids=[GRID_A, GRID_B])
    assert [f.design.index for f in a.fits] == [0, 1] and a.pool_refused == []
    frac = a.pooled["factor.dataset.fraction"]
    # the grids share only mixer=attention: the pool is attention at 3 fractions
    assert frac.grids == [0, 1] and frac.where == {"factor.model.mixer": ["attention"]}
    assert frac.fit.design.levels["factor.dataset.fraction"] == ["0.25", "0.5", "1"]
    assert frac.used and frac.n_runs == 9  # attention @ 1.0 is in both grids: counted once
    assert "unbalanced" not in frac.fit.design.note()
    # one factor left: its marginal means are the plain means of the pooled runs
    att = df[df["factor.model.mixer"] == "attention"]
    means = att.groupby("factor.dataset.fraction")["test_acc"].mean()
    em = frac.fit.emms["factor.dataset.fraction"].set_index("level")
    for f, want in means.items():
        assert em.loc[analysis.label(f), "mean"] == pytest.approx(want)
    for hi, lo in (("1", "0.25"), ("0.5", "0.25"), ("1", "0.5")):
        d = analysis.pair(frac.fit, "factor.dataset.fraction", hi, lo)
        planted = PER_DOUBLING * math.log2(float(hi) / float(lo))
        assert d["ci_low"] <= planted <= d["ci_high"] and d["ci_low"] > 0
    (sc,) = [s for s in frac.scaling if s["x"] == "dataset.fraction"]
    lo, hi = sc["slopes"]["all"]["ci"]
    assert lo <= PER_DOUBLING <= hi
    mixer = a.pooled["factor.model.mixer"]
    assert mixer.where == {"factor.dataset.fraction": ["1"]} and mixer.used
    assert mixer.fit.design.levels["factor.model.mixer"] == ["attention", "mlp", "conv"]
    d = analysis.pair(mixer.fit, "factor.model.mixer", "mlp", "conv")
    assert d["ci_low"] <= MIXER["mlp"] - MIXER["conv"] <= d["ci_high"]
    # the verdict reads both questions from the pools and says so
    attention, _, data, *_ = a.verdict
    assert "pooled over grids 0+1, at dataset.fraction=1" in attention
    assert "pooled over grids 0+1, at model.mixer=attention" in data
    assert "fraction=1 beats fraction=0.25" in data and "inconclusive" not in data
    out = analysis.to_dict(a)["pooled"]["dataset.fraction"]
    assert out["grids"] == [0, 1] and out["n_runs"] == 9 and out["used_in_verdict"]
    assert out["ss_type"] == "II" and set(out["levels"]) == {"0.25", "0.5", "1"}
    for k in ("share", "share_ci", "omega2", "p_value", "pairwise"):
        assert k in out
    md = render.to_markdown(a, {"study": "u"})
    assert "### Pooled view: dataset.fraction (grids 0+1)" in md
    page = render.to_html(a, {"study": "u"})
    assert "Pooled view: model.mixer" in page
    assert "Marginal means, dataset.fraction pooled over grids 0+1" in page


def test_pool_refused_where_the_other_factors_do_not_match():
    grid_c = {**GRID_B, "model.tokens": [8]}
    df = union([GRID_A, grid_c], extra=[{}, {"model.tokens": 8}])
    a = analysis.analyse(df, "test_acc", grids=[GRID_A, grid_c])
    assert a.pooled == {}
    why = {r.factor: r.reason for r in a.pool_refused}
    assert set(why) == {"dataset.fraction", "model.mixer"}
    assert "other factors do not match: model.tokens (grid 0: off; grid 1: 8)" in \
        why["dataset.fraction"]
    assert "pooled" not in a.verdict[2] and "grid 0" in a.verdict[2]
    refused = analysis.to_dict(a)["pool_refused"]
    assert {r["factor"] for r in refused} == {"dataset.fraction", "model.mixer"}
    assert "Pools refused" in render.to_markdown(a, {"study": "u"})


def test_a_pool_inside_one_grid_adds_nothing():
    """A kernel-size grid meets the mixer grid only at the default kernel: those are the
    mixer grid's own conv runs, so there is nothing to pool (the patches_vs_attention case)."""
    grid_k = {"model.mixer": ["conv"], "model.kernel_size": [3, 7],
              "dataset.fraction": [0.25, 1.0]}
    df = union([GRID_A])
    df["factor.model.kernel_size"] = np.where(df["factor.model.mixer"] == "conv", 7, None)
    k3 = union([{"model.mixer": ["conv"], "dataset.fraction": [0.25, 1.0]}],
               extra=[{"model.kernel_size": 3}], rng_seed=1).assign(grid=1)
    df = pd.concat([df, k3], ignore_index=True)
    a = analysis.analyse(df, "test_acc", grids=[GRID_A, grid_k])
    assert a.pooled == {}
    (r,) = a.pool_refused
    assert r.factor == "dataset.fraction" and "every pooled run is in grid 0" in r.reason


def test_one_frontier_per_cost_metric_in_the_levels_colours():
    from ablate import plots

    df = union([GRID_A, GRID_B])
    cost = {"attention": 4.0, "mlp": 2.0, "conv": 1.0}
    df["gmacs"] = df["factor.model.mixer"].map(cost)
    df["params"] = 1000 * df["gmacs"]
    df["train_time_s"] = 10 * df["gmacs"] * df["factor.dataset.fraction"]
    a = analysis.analyse(df, "test_acc", grids=[GRID_A, GRID_B], n_boot=100)
    figs = render.frontier_figures(a)
    assert [t for t, _ in figs] == ["Accuracy vs compute (GMACs)", "Accuracy vs parameters",
                                    "Accuracy vs measured training time (s)"]
    for _, fig in figs:
        colours = {t.name: t.marker.color for t in fig.data if t.name.startswith("mixer=")}
        assert colours == {f"mixer={m}": plots.MIXER_COLORS[m] for m in MIXER}
    html = render.to_html(a, {"study": "u"})
    assert all(html.count(f"<h3>{t}</h3>") == 1 for t, _ in figs)

    # with a profile's training time alone for every configuration, that frontier comes too,
    # beside the measured one (they can rank architectures differently)
    df["train_time_alone_s"] = 10 * df["params"]
    a = analysis.analyse(df, "test_acc", grids=[GRID_A, GRID_B], n_boot=100)
    assert list(a.frontiers) == ["gmacs", "params", "train_time_alone_s", "train_time_s"]
    assert [t for t, _ in render.frontier_figures(a)][2] == \
        "Accuracy vs training time alone on the profile node (s)"
    # one configuration without a profile: the measured time is the only one all share
    df.loc[df["factor.model.mixer"] == "conv", "train_time_alone_s"] = float("nan")
    a = analysis.analyse(df, "test_acc", grids=[GRID_A, GRID_B], n_boot=100)
    assert list(a.frontiers) == ["gmacs", "params", "train_time_s"]


def test_no_pool_across_grids_whose_fixed_factors_differ():
    """Grids with no mixer in common, each at its own data fraction: the fraction is a
    function of the mixer in their union, yet it is a setting of each grid, not an attribute
    of a mixer level. Pooling would compare attention at fraction 1 with mlp at 0.25."""
    g0 = {"model.mixer": ["attention", "conv"], "dataset.fraction": [1.0]}
    g1 = {"model.mixer": ["mlp", "identity"], "dataset.fraction": [0.25]}
    rng = np.random.default_rng(0)
    rows = [{"run_id": f"{m}-{s}", "cell_id": m, "grid": g, "status": "finished", "seed": s,
             "factor.model.mixer": m, "factor.dataset.fraction": f,
             "test_acc": 0.6 + PER_DOUBLING * math.log2(f) + SIGMA * rng.standard_normal()}
            for g, grid in enumerate([g0, g1]) for m in grid["model.mixer"]
            for f in grid["dataset.fraction"] for s in range(3)]
    a = analysis.analyse(pd.DataFrame(rows), "test_acc", grids=[g0, g1], n_boot=50)
    assert "factor.model.mixer" not in a.pooled
    (r,) = [r for r in a.pool_refused if r.factor == "model.mixer"]
    assert "dataset.fraction (grid 0: 1; grid 1: 0.25)" in r.reason
    assert "pooled" not in a.verdict[0]


def test_runs_two_grids_share_are_counted_once():
    df = union([GRID_A, GRID_B])  # attention at fraction 1 is in both grids
    a = analysis.analyse(df, "test_acc", grids=[GRID_A, GRID_B], n_boot=50)
    assert a.n_used == len(df) == 21
    assert analysis.to_dict(a)["n_analysed"] == len(df)
    assert f"; {len(df)} finished runs with test_acc analysed" in render.to_markdown(a, {})
