"""Planted effects: runs generated with known effects and seed noise; the analysis must
recover them within its CIs and call the verdict right, in balanced, unbalanced and
union-of-grids designs, and never conclude from one seed."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ablate import analysis
from ablate.errors import AnalysisError

MIXERS = ["attention", "mlp", "conv", "identity"]
# sum-to-zero effects, so the planted sums of squares have a closed form
ALPHA = {"attention": 0.06, "mlp": 0.02, "conv": -0.02, "identity": -0.06}   # mixer
BETA = {2: 0.015, 8: -0.015}                                                  # patch size
DELTA = {0.25: -0.02, 1.0: 0.02}                                              # data fraction
GAMMA = {("attention", 0.25): -0.015, ("attention", 1.0): 0.015,              # mixer x data
         ("identity", 0.25): 0.015, ("identity", 1.0): -0.015}
SIGMA = 0.01


def planted(seeds: int = 3, rng_seed: int = 0, alpha=ALPHA, grid: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(rng_seed)
    rows = []
    for m, p, f in itertools.product(alpha, BETA, DELTA):
        for s in range(seeds):
            y = 0.6 + alpha[m] + BETA[p] + DELTA[f] + GAMMA.get((m, f), 0.0) + \
                SIGMA * rng.standard_normal()
            rows.append({"run_id": f"{m}-{p}-{f}-{s}", "cell_id": f"{m}-{p}-{f}", "grid": grid,
                         "status": "finished", "seed": s, "factor.model.mixer": m,
                         "factor.model.patch_size": p, "factor.dataset.fraction": f,
                         "test_acc": y, "gmacs": {"attention": 4.0, "mlp": 3.0, "conv": 2.0,
                                                  "identity": 1.0}[m] / p})
    return pd.DataFrame(rows)


def planted_shares(n: int) -> dict[str, float]:
    """Expected share of each term: (SS of the planted effect + df * sigma^2) over
    (planted total SS + (n - 1) * sigma^2), for the balanced 4 x 2 x 2 design of n runs."""
    ss = {"model.mixer": n / 4 * sum(v ** 2 for v in ALPHA.values()),
          "model.patch_size": n / 2 * sum(v ** 2 for v in BETA.values()),
          "dataset.fraction": n / 2 * sum(v ** 2 for v in DELTA.values()),
          "model.mixer x dataset.fraction": n / 8 * 4 * 0.015 ** 2}
    df = {"model.mixer": 3, "model.patch_size": 1, "dataset.fraction": 1,
          "model.mixer x dataset.fraction": 3}
    total = sum(ss.values()) + (n - 1) * SIGMA ** 2
    return {k: (ss[k] + df[k] * SIGMA ** 2) / total for k in ss}


def terms(fit: analysis.GridFit) -> dict[str, analysis.TermStats]:
    return {analysis.term_name(t): s for t, s in fit.terms.items()}


def test_balanced_design_recovers_planted_shares_and_calls_it():
    df = planted(seeds=3)
    a = analysis.analyse(df, "test_acc")
    (fit,) = a.fits
    assert fit.design.balanced and fit.n_boot >= 1000
    got = terms(fit)
    for name, share in planted_shares(len(df)).items():
        lo, hi = got[name].share_ci
        assert lo <= share <= hi, (name, share, got[name].share_ci)
    # no planted patch x data interaction: a tiny share, not significant
    assert got["model.patch_size x dataset.fraction"].p_value > 0.01
    # marginal means' differences cover the planted ones
    for x, y in itertools.combinations(MIXERS, 2):
        d = analysis.pair(fit, "factor.model.mixer", x, y)
        assert d["ci_low"] <= ALPHA[x] - ALPHA[y] <= d["ci_high"]
    attention, patches, data, inter = a.verdict
    assert attention.startswith("Attention: the token mixer") and "inconclusive" not in attention
    assert "mixer=attention beats mixer=mlp" in attention
    assert patches.startswith("Patches:") and "patch_size=2 beats patch_size=8" in patches
    assert data.startswith("Data:") and "fraction=1 beats fraction=0.25" in data
    assert "model.mixer x dataset.fraction" in inter and "depends on" in inter
    # per doubling of data (0.25 -> 1 is two doublings): attention gains (0.04 + 0.03) / 2,
    # identity (0.04 - 0.03) / 2; their difference is 0.03
    (sc,) = [s for s in a.scaling if s["x"] == "dataset.fraction"]
    lo, hi = sc["slopes"]["attention"]["ci"]
    assert lo <= 0.035 <= hi
    lo, hi = sc["slopes"]["identity"]["ci"]
    assert lo <= 0.005 <= hi
    diff = next(r for r in sc["differences"] if {r["a"], r["b"]} == {"attention", "identity"})
    planted_diff = 0.03 if diff["a"] == "attention" else -0.03
    assert diff["ci"][0] <= planted_diff <= diff["ci"][1] and diff["p_holm"] < 0.05


def test_bootstrap_is_seeded_and_resamples_seeds():
    df = planted(seeds=3)
    a1 = analysis.fit_grid(analysis.designs(df, "test_acc")[0], n_boot=1000, seed=7)
    a2 = analysis.fit_grid(analysis.designs(df, "test_acc")[0], n_boot=1000, seed=7)
    a3 = analysis.fit_grid(analysis.designs(df, "test_acc")[0], n_boot=1000, seed=8)
    t = ("factor.model.mixer",)
    assert a1.terms[t].share_ci == a2.terms[t].share_ci != a3.terms[t].share_ci


def test_unbalanced_design_is_type2_and_says_so():
    df = planted(seeds=3, rng_seed=1)
    rng = np.random.default_rng(3)
    drop = rng.choice(len(df), size=10, replace=False)
    df = df.drop(index=df.index[drop])
    df = df[~((df["factor.model.mixer"] == "mlp") & (df["factor.model.patch_size"] == 8) &
              (df["factor.dataset.fraction"] == 1.0))]  # one cell missing entirely
    a = analysis.analyse(df, "test_acc")
    (fit,) = a.fits
    assert not fit.design.balanced and "unbalanced" in fit.design.note()
    assert "type II" in fit.design.note() and "1 of 16 cells missing" in fit.design.note()
    assert analysis.to_dict(a)["grids"][0]["ss_type"] == "II"
    for x, y in itertools.combinations(MIXERS, 2):
        d = analysis.pair(fit, "factor.model.mixer", x, y)
        assert d["ci_low"] <= ALPHA[x] - ALPHA[y] <= d["ci_high"], (x, y, d)
    # the planted share for this design: statsmodels' own type II ANOVA of the noise-free
    # numbers (not ablate's code), plus the expected noise in each sum of squares
    clean = df.assign(y=[0.6 + ALPHA[m] + BETA[p] + DELTA[f] + GAMMA.get((m, f), 0.0)
                         for m, p, f in zip(df["factor.model.mixer"], df["factor.model.patch_size"],
                                            df["factor.dataset.fraction"], strict=True)])
    clean = clean.rename(columns={"factor.model.mixer": "m", "factor.model.patch_size": "p",
                                  "factor.dataset.fraction": "f"})
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    ref = anova_lm(smf.ols("y ~ C(m) + C(p) + C(f) + C(m):C(p) + C(m):C(f) + C(p):C(f)",
                           clean).fit(), typ=2)
    total = ((clean["y"] - clean["y"].mean()) ** 2).sum() + (len(df) - 1) * SIGMA ** 2
    share = (ref.loc["C(m)", "sum_sq"] + 3 * SIGMA ** 2) / total
    lo, hi = terms(fit)["model.mixer"].share_ci
    assert lo <= share <= hi
    assert "inconclusive" not in a.verdict[0]


def test_type2_sums_of_squares_match_statsmodels_in_an_unbalanced_design():
    """The bootstrap computes type II SS on cell means; on the observed data it must give
    exactly what statsmodels' anova_lm gives on the raw runs."""
    df = planted(seeds=3, rng_seed=2).iloc[5:]
    d = analysis.designs(df, "test_acc")[0]
    table = analysis.anova.anova_table(d)
    ss = analysis.anova.type2_ss(d, d.cells["mean"].to_numpy()[:, None])
    for t, v in ss.items():
        assert v[0] == pytest.approx(table.loc[analysis.term_name(t), "sum_sq"], rel=1e-9)


def test_union_of_grids_analysed_grid_by_grid():
    mixers = planted(seeds=2, rng_seed=4)
    rng = np.random.default_rng(5)
    kernels = {3: -0.1, 5: 0.0, 9: 0.1}  # a large kernel effect, only among conv runs
    rows = []
    for k, eff in kernels.items():
        for p, f in itertools.product(BETA, DELTA):
            for s in range(2):
                rows.append({"run_id": f"k{k}-{p}-{f}-{s}", "cell_id": f"k{k}-{p}-{f}",
                             "grid": 1, "status": "finished", "seed": s,
                             "factor.model.mixer": "conv", "factor.model.kernel_size": k,
                             "factor.model.patch_size": p, "factor.dataset.fraction": f,
                             "test_acc": 0.6 + ALPHA["conv"] + eff + BETA[p] + DELTA[f]
                             + SIGMA * rng.standard_normal()})
    mixers["factor.model.kernel_size"] = np.where(mixers["factor.model.mixer"] == "conv", 7,
                                                  None)
    df = pd.concat([mixers, pd.DataFrame(rows)], ignore_index=True)
    grids = [{"model.mixer": MIXERS, "model.patch_size": [2, 8], "dataset.fraction": [0.25, 1]},
             {"model.mixer": ["conv"], "model.kernel_size": [3, 5, 7, 9],
              "model.patch_size": [2, 8], "dataset.fraction": [0.25, 1]}]
    a = analysis.analyse(df, "test_acc", grids=grids)
    g0, g1 = a.fits
    assert g0.design.keys == ["factor.model.mixer", "factor.model.patch_size",
                              "factor.dataset.fraction"]
    assert g1.design.levels["factor.model.kernel_size"] == ["3", "5", "7", "9"]
    assert g1.design.balanced  # grid 0's conv runs are its kernel-7 cells
    for x, y in itertools.combinations(MIXERS, 2):  # kernel runs do not leak into grid 0
        d = analysis.pair(g0, "factor.model.mixer", x, y)
        assert d["ci_low"] <= ALPHA[x] - ALPHA[y] <= d["ci_high"]
    d = analysis.pair(g1, "factor.model.kernel_size", "9", "3")
    assert d["ci_low"] <= 0.2 <= d["ci_high"]
    assert "grid 0" in a.verdict[0] and "inconclusive" not in a.verdict[0]
    assert len(analysis.to_dict(a)["grids"]) == 2


def test_one_seed_is_always_inconclusive():
    a = analysis.analyse(planted(seeds=1), "test_acc")
    assert len(a.verdict) == 4
    for s in a.verdict[:3]:
        assert "inconclusive" in s and "at least 2" in s
    assert "inconclusive" in a.verdict[3]


def test_no_mixer_effect_is_inconclusive_while_data_is_called():
    null = dict.fromkeys(MIXERS, 0.0)
    df = planted(seeds=3, rng_seed=6, alpha=null)
    df["test_acc"] -= [GAMMA.get((m, f), 0.0) for m, f in
                       zip(df["factor.model.mixer"], df["factor.dataset.fraction"], strict=True)]
    a = analysis.analyse(df, "test_acc")
    assert a.verdict[0].startswith("Attention: inconclusive")
    assert "inconclusive" not in a.verdict[2]


def test_two_by_two_anova_matches_a_hand_computation():
    """Balanced 2x2, 2 seeds: SS_A = n b sum (mean_i - grand)^2 etc., by hand."""
    y = {("a1", "b1"): [1.0, 2.0], ("a1", "b2"): [3.0, 5.0], ("a2", "b1"): [4.0, 4.0],
         ("a2", "b2"): [8.0, 9.0]}
    rows = [{"factor.A": a, "factor.B": b, "v": v, "status": "finished"}
            for (a, b), vs in y.items() for v in vs]
    df = pd.DataFrame(rows)
    grand = 36.0 / 8                                                     # 4.5
    a_means, b_means = {"a1": 11 / 4, "a2": 25 / 4}, {"b1": 11 / 4, "b2": 25 / 4}
    ss_a = 4 * sum((m - grand) ** 2 for m in a_means.values())           # 24.5
    ss_b = 4 * sum((m - grand) ** 2 for m in b_means.values())           # 24.5
    cell = {k: sum(v) / 2 for k, v in y.items()}                         # 1.5, 4, 4, 8.5
    ss_ab = 2 * sum((cell[(a, b)] - a_means[a] - b_means[b] + grand) ** 2
                    for a, b in y)                                       # 2.0
    ss_e = sum((v - cell[k]) ** 2 for k, vs in y.items() for v in vs)    # 3.0
    ss_t = sum((v - grand) ** 2 for vs in y.values() for v in vs)        # 54.0
    assert ss_a + ss_b + ss_ab + ss_e == pytest.approx(ss_t)
    fit = analysis.analyse(df, "v").fits[0]
    got = terms(fit)
    mse = ss_e / 4
    for name, ss in (("A", ss_a), ("B", ss_b), ("A x B", ss_ab)):
        assert got[name].ss == pytest.approx(ss)
        assert got[name].share == pytest.approx(ss / ss_t)
        assert got[name].p_value == pytest.approx(stats.f.sf(ss / mse, 1, 4))
        omega = (ss - mse) / (ss + (8 - 1) * mse)
        assert got[name].omega2 == pytest.approx(max(0.0, omega))
    em = fit.emms["factor.A"].set_index("level")
    half = stats.t.ppf(0.975, 4) * np.sqrt(mse / 4)
    assert em.loc["a2", "mean"] == pytest.approx(6.25)
    assert em.loc["a2", "ci_high"] - em.loc["a2", "mean"] == pytest.approx(half)


def test_errors_say_what_to_fix():
    df = planted(seeds=2)
    with pytest.raises(AnalysisError, match="no run has it"):
        analysis.analyse(df, "val_acc")
    with pytest.raises(AnalysisError, match="no finished runs"):
        analysis.analyse(df.assign(status="pruned"), "test_acc")
    one = df[(df["factor.model.mixer"] == "conv") & (df["factor.model.patch_size"] == 2) &
             (df["factor.dataset.fraction"] == 1.0)]
    with pytest.raises(AnalysisError, match="one level"):
        analysis.analyse(one, "test_acc")


def test_pruned_and_failed_runs_are_counted_never_averaged():
    df = planted(seeds=2)
    df.loc[0, "status"] = "pruned"
    df.loc[0, "test_acc"] = -5.0    # an early-epoch number that would drag the mean
    df.loc[1, "status"] = "failed"
    a = analysis.analyse(df, "test_acc")
    assert a.counts == {"finished": len(df) - 2, "pruned": 1, "failed": 1}
    assert set(a.excluded["reason"]) == {"pruned", "failed"}
    assert a.fits[0].design.data["_y"].min() > 0
    assert analysis.to_dict(a)["n_analysed"] == len(df) - 2


def test_cost_table_best_accuracy_under_each_budget():
    df = planted(seeds=2)
    c = analysis.analyse(df, "test_acc").cost
    assert c["cost"] == "gmacs"
    cells = df.groupby(["factor.model.mixer", "factor.model.patch_size",
                        "factor.dataset.fraction"]).agg(acc=("test_acc", "mean"),
                                                        gmacs=("gmacs", "first"))
    # identity's best cell is patch 2 at full data: 1 / 2 = 0.5 GMACs; within that budget
    # attention only fits at patch 8 (4 / 8 = 0.5): its best there is at full data
    assert c["budget"]["identity"] == pytest.approx(0.5)
    assert c["best"]["attention"]["identity"] == pytest.approx(
        cells.loc[("attention", 8, 1.0), "acc"])
    # under attention's budget (its best cell, 2 GMACs) every mixer reaches its own best
    for m in MIXERS:
        assert c["best"][m]["attention"] == pytest.approx(cells.loc[m, "acc"].max())


def test_budget_is_stated_and_the_data_confound_flagged_only_under_epochs():
    def budget_line(df: pd.DataFrame) -> list[str]:
        return [s for s in analysis.analyse(df, "test_acc", n_boot=50).verdict
                if s.startswith("Budget")]

    epochs = planted().assign(**{"params.train.budget": "epochs", "params.train.epochs": "6"})
    [line] = budget_line(epochs)
    assert "confounded with the number of optimizer steps (use train.budget: steps)" in line
    steps = epochs.assign(**{"params.train.budget": "steps"})
    [line] = budget_line(steps)
    assert "equal training budget" in line and "confounded" not in line
    # runs from before train.budget existed trained by epochs
    [line] = budget_line(epochs.drop(columns="params.train.budget"))
    assert "confounded" in line
    # no data factor: the budget is stated, nothing is confounded
    one_fraction = epochs[epochs["factor.dataset.fraction"] == 1.0].drop(
        columns="factor.dataset.fraction")
    [line] = budget_line(one_fraction)
    assert "confounded" not in line
    assert budget_line(planted()) == []  # runs ablate did not create: budget unknown


def test_runs_trained_at_different_precisions_are_named_in_the_verdict():
    def precision_line(df: pd.DataFrame) -> list[str]:
        return [s for s in analysis.analyse(df, "test_acc", n_boot=50).verdict
                if s.startswith("Precision")]

    df = planted()
    # `auto` resolved per architecture: attention in fp32, the other mixers in bf16
    attention = df["factor.model.mixer"] == "attention"
    mixed = df.assign(**{"params.train.precision": "auto",
                         "params.train.precision_resolved": np.where(attention, "fp32", "bf16")})
    [line] = precision_line(mixed)
    assert "fp32 (model.mixer attention)" in line
    assert "bf16 (model.mixer conv, identity, mlp)" in line
    assert "include the precision's effect" in line
    # one precision everywhere, asked or resolved: nothing to say
    assert precision_line(mixed.assign(**{"params.train.precision_resolved": "bf16"})) == []
    assert precision_line(df.assign(**{"params.train.precision": "fp32"})) == []
    assert precision_line(df) == []  # runs ablate did not create: unknown
    # runs without a resolved precision (no profile) count what they asked for, not `auto`
    asked = mixed.assign(**{"params.train.precision": np.where(attention, "fp32", "auto"),
                            "params.train.precision_resolved": np.where(attention, None, "bf16")})
    [line] = precision_line(asked)
    assert "fp32 (model.mixer attention)" in line and "unknown" not in line
    unresolved = mixed.assign(**{"params.train.precision_resolved":
                                 np.where(df["factor.model.mixer"] == "mlp", None,
                                          mixed["params.train.precision_resolved"])})
    [line] = precision_line(unresolved)
    assert "bf16 (model.mixer conv, identity)" in line
    assert f"{int((df['factor.model.mixer'] == 'mlp').sum())} run(s) unknown" in line
    # one known precision beside runs that asked for `auto` and never recorded its choice:
    # they may have trained otherwise, and the verdict says so
    n_mlp = int((df["factor.model.mixer"] == "mlp").sum())
    silent = mixed.assign(**{"params.train.precision_resolved":
                             np.where(df["factor.model.mixer"] == "mlp", None, "bf16")})
    [line] = precision_line(silent)
    assert f"{n_mlp} run(s) asked for train.precision: auto" in line
    assert "the rest trained at bf16" in line
    # a precision that is itself a factor is the question, not a confound
    factor = mixed.assign(**{"factor.train.precision": mixed["params.train.precision_resolved"]})
    assert precision_line(factor) == []
    # a search's sampled continuous value is a level per configuration: it decides nothing,
    # and the mixer is still the factor named (whatever the column order)
    from types import SimpleNamespace

    from ablate.analysis.verdict import precision_sentence

    lr = mixed["cell_id"].map({c: 1e-3 * (i + 1) for i, c in enumerate(mixed["cell_id"].unique())})
    sampled = pd.concat([lr.rename("factor.a.lr"), mixed], axis=1)
    line = precision_sentence(SimpleNamespace(runs=sampled))
    assert "fp32 (model.mixer attention)" in line and "lr" not in line


def test_tuning_phase_runs_never_enter_an_average():
    df = planted()
    tune = df.head(6).assign(phase="tune", test_acc=0.99, run_id=lambda d: d["run_id"] + "-t")
    both = pd.concat([df.assign(phase="final"), tune], ignore_index=True)
    ok, out = analysis.split_status(both, "test_acc")
    assert len(ok) == len(df) and (ok["test_acc"] < 0.99).all()
    assert set(out["reason"]) == {"phase tune"}


def test_an_alone_time_from_an_older_profile_is_never_put_on_one_frontier_with_todays():
    """A study resumed across the upgrade that times a profile's training step as the trials
    train keeps its finished runs, whose train_time_alone_s was timed with the whole node's
    threads at the profile batch (no profile_train_batch_size): mixed with today's runs, the
    alone frontier is not drawn and the verdict says why; all of one kind, it is drawn."""
    df = planted()
    alone = df.assign(train_time_alone_s=df["gmacs"] * 10.0)
    new = alone.assign(profile_train_batch_size=64.0)
    a = analysis.analyse(new, "test_acc", n_boot=50)
    assert "train_time_alone_s" in a.frontiers
    assert not any(s.startswith("Training time alone") for s in a.verdict)
    old = analysis.analyse(alone, "test_acc", n_boot=50)  # all from before: comparable
    assert "train_time_alone_s" in old.frontiers
    attention = df["factor.model.mixer"] == "attention"  # resumed: attention finished before
    mixed = new.assign(profile_train_batch_size=np.where(attention, np.nan, 64.0))
    m = analysis.analyse(mixed, "test_acc", n_boot=50)
    assert "train_time_alone_s" not in m.frontiers and "gmacs" in m.frontiers
    [line] = [s for s in m.verdict if s.startswith("Training time alone")]
    assert f"{int(attention.sum())} of {len(df)} runs" in line and "not comparable" in line
    from ablate.analysis.seeds import timed_mixed

    assert timed_mixed(mixed, "train_img_s") is False  # these runs have no train_img_s


def test_timing_costs_of_profiles_from_two_machines_share_no_frontier_nor_ratio():
    """helper-37: a study resumed on another machine (or torch, CPU count, cost code) keeps
    its finished runs' costs, and the cells' means and the frontiers mixed the two machines'
    timings in silence. Runs name their profile's identity; under two, no timing cost is put
    on a frontier or in a ratio, the verdict says why, and GMACs still are."""
    from ablate.analysis.compare import compare

    df = planted()
    one = df.assign(train_time_alone_s=df["gmacs"] * 10.0, profile_train_batch_size=64.0,
                    throughput_img_s=1000.0 / df["gmacs"],
                    profile_identity="AMD EPYC, torch 2.14.1, 2 CPU(s), profile code a (method 2)")
    a = analysis.analyse(one, "test_acc", n_boot=50)
    assert "train_time_alone_s" in a.frontiers
    assert not any(s.startswith("Timing costs") for s in a.verdict)
    attention = df["factor.model.mixer"] == "attention"  # finished first, on another machine
    two = one.assign(profile_identity=one["profile_identity"].where(
        ~attention, "Intel Xeon, torch 2.14.1, 32 CPU(s), profile code a (method 2)"))
    m = analysis.analyse(two, "test_acc", n_boot=50)
    assert "train_time_alone_s" not in m.frontiers and "gmacs" in m.frontiers
    [line] = [s for s in m.verdict if s.startswith("Timing costs")]
    assert "2 identities" in line and "Intel Xeon" in line and "AMD EPYC" in line
    keys = analysis.cell_keys(two, analysis.factor_columns(two))
    att, other = keys[attention].iloc[0], keys[~attention].iloc[0]
    out = compare(two, att, two, other, "test_acc")
    costs = out["costs"].set_index("cost")["b / a"]
    assert np.isnan(costs["throughput_img_s"]) and np.isfinite(costs["gmacs"])
    assert "throughput_img_s" in out["costs_apart"] and "gmacs" not in out["costs_apart"]
    same = compare(one, att, one, other, "test_acc")
    assert np.isfinite(same["costs"].set_index("cost")["b / a"]["throughput_img_s"])
    assert same["costs_apart"] == []
    # a side without costs (its profile failed) has no ratio, and no false "not comparable"
    bare = one.assign(throughput_img_s=one["throughput_img_s"].where(~attention))
    assert compare(bare, att, bare, other, "test_acc")["costs_apart"] == []


def test_configurations_without_cost_metrics_are_named_not_dropped_in_silence():
    """An architecture whose profile failed runs without cost metrics: its cells left every
    frontier and the cost table and nothing said so (helper-37)."""
    df = planted()
    a = analysis.analyse(df, "test_acc", n_boot=50)
    assert not any(s.startswith("Costs:") for s in a.verdict)
    conv = df["factor.model.mixer"] == "conv"
    m = analysis.analyse(df.assign(gmacs=df["gmacs"].where(~conv)), "test_acc", n_boot=50)
    [line] = [s for s in m.verdict if s.startswith("Costs:")]
    assert line.startswith("Costs: 4 of 16 configurations") and "model.mixer=conv" in line
    assert "on no frontier but that of the training time each trial measured" in line
    assert "conv" not in set(m.frontiers["gmacs"]["factor.model.mixer"])


def test_a_slope_the_finished_runs_cannot_estimate_is_named_not_reported_as_zero():
    """pool finished at fraction 1 only: its slope per doubling of data is unknown, not 0
    with a zero-width interval (what a pseudo-inverse fit returns for it), and no slope
    difference is drawn against it. The other mixers' slopes are still estimated."""
    rng = np.random.default_rng(0)
    eff = {"attention": 0.05, "mlp": 0.0, "pool": -0.02}
    rows = []
    for m, f in itertools.product(eff, [0.25, 0.5, 1.0]):
        if m == "pool" and f != 1.0:
            continue  # pool's smaller fractions failed
        for s in range(3):
            rows.append({"run_id": f"{m}{f}{s}", "cell_id": f"{m}{f}", "grid": 0,
                         "status": "finished", "seed": s, "factor.model.mixer": m,
                         "factor.dataset.fraction": f,
                         "test_acc": 0.6 + eff[m] + 0.03 * np.log2(f)
                         + 0.01 * rng.standard_normal()})
    a = analysis.analyse(pd.DataFrame(rows), "test_acc", n_boot=200)
    sc = next(s for s in a.scaling if s["x"] == "dataset.fraction")
    assert set(sc["slopes"]) == {"attention", "mlp"} and sc["not_estimable"] == ["pool"]
    assert [(r["a"], r["b"]) for r in sc["differences"]] == [("attention", "mlp")]
    for g in ("attention", "mlp"):  # planted: 3 points per doubling
        lo, hi = sc["slopes"][g]["ci"]
        assert lo < 0.03 < hi and hi - lo > 0
    data = next(s for s in a.verdict if s.startswith("Data:"))
    assert "no slope for pool" in data and "pool gains" not in data


def test_runs_pruned_by_asha_make_every_claim_inconclusive():
    """ASHA cut the two weaker seeds of mlp and conv: their finished seed is their luckiest,
    and on the survivors mlp beats attention (Holm p < 0.05) although on all seeds attention
    is ahead. No claim may stand on survivors; tuning-phase pruned runs do not count."""
    vals = {"attention": [0.700, 0.705, 0.710], "mlp": [0.640, 0.650, 0.750],
            "conv": [0.630, 0.645, 0.700], "identity": [0.600, 0.610, 0.620]}
    rows = []
    for m, v in vals.items():
        for s, y in enumerate(v):
            rows.append({"run_id": f"{m}{s}", "cell_id": m, "grid": 0, "seed": s,
                         "status": "finished", "factor.model.mixer": m, "test_acc": y})
    full = pd.DataFrame(rows)
    assert full.groupby("factor.model.mixer")["test_acc"].mean().idxmax() == "attention"
    cut = full.copy()
    lost = cut["factor.model.mixer"].isin(["mlp", "conv"]) & (cut["seed"] < 2)
    cut.loc[lost, "status"] = "pruned"
    cut.loc[lost, "test_acc"] = np.nan
    a = analysis.analyse(cut, "test_acc", n_boot=200)
    assert a.verdict[0].startswith("Attention: inconclusive: 4 run(s) were pruned")
    assert "trails mixer=mlp" in a.verdict[0]  # what the survivors alone would claim
    inter = next(s for s in a.verdict if s.startswith(("Largest interaction", "Interactions")))
    assert "the effect of" not in inter
    # pruned runs of a tuning phase are not the grid's: its claims are not touched
    tuned = cut.assign(run_id="t" + cut["run_id"], phase="tune")
    a = analysis.analyse(pd.concat([full.assign(phase="final"), tuned]), "test_acc",
                         n_boot=200)
    assert not any("pruned by the scheduler" in s for s in a.verdict)


def test_the_largest_interaction_is_called_at_a_familywise_five_percent():
    """A 4x3x3 grid with no effect at all, 100 times: the sentence picks the largest of three
    interactions after looking, so an uncorrected p < 0.05 called one in about 16% of the
    studies; Holm over the three keeps it near the nominal 5%."""
    called = 0
    for i in range(100):
        rng = np.random.default_rng(i)
        rows = [{"run_id": f"{m}{p}{f}{s}", "cell_id": f"{m}{p}{f}", "grid": 0,
                 "status": "finished", "seed": s, "factor.model.mixer": m,
                 "factor.model.patch_size": p, "factor.dataset.fraction": f,
                 "test_acc": 0.6 + 0.01 * rng.standard_normal()}
                for m, p, f in itertools.product(["attention", "mlp", "conv", "identity"],
                                                 [2, 4, 8], [0.25, 0.5, 1.0])
                for s in range(3)]
        a = analysis.analyse(pd.DataFrame(rows), "test_acc", n_boot=20)
        inter = next(s for s in a.verdict if s.startswith("Largest interaction"))
        assert "Holm over 3 interactions" in inter
        called += "depends on" in inter
    assert called <= 9


def test_an_edited_studys_older_configuration_is_on_no_frontier_and_in_no_cost_table():
    """The same levels under an older cell id (the study file was edited, say its lr, and run
    again): the models keep the newest configuration's runs, and so do the frontiers and the
    cost table (before, they showed the older, better-scoring runs under the same labels)."""
    rows = []
    for cid, t, bonus in (("old", 0, 0.10), ("new", 1, 0.0)):
        for m, mu, g in (("attention", 0.70, 4.0), ("mlp", 0.66, 3.0)):
            for s in range(3):
                rows.append({"run_id": f"{cid}{m}{s}", "cell_id": f"{cid}-{m}", "grid": 0,
                             "status": "finished", "seed": s, "start_time": t,
                             "factor.model.mixer": m, "test_acc": mu + bonus + 0.005 * (s - 1),
                             "gmacs": g})
    a = analysis.analyse(pd.DataFrame(rows), "test_acc", n_boot=50)
    assert a.fits[0].design.superseded == 6
    front = a.frontiers["gmacs"]
    assert sorted(front["mean"].round(6)) == [0.66, 0.70] and set(front["n"]) == {3}
    assert a.cost["best"]["attention"]["attention"] == pytest.approx(0.70)
    kept, old = analysis.newest_cells(pd.DataFrame(rows))
    assert old == 6 and set(kept["cell_id"]) == {"new-attention", "new-mlp"}


def _mixer_patch(cells: list[tuple[str, int, float]]) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame([{"run_id": f"{m}{p}{s}", "cell_id": f"{m}{p}", "grid": 0,
                          "status": "finished", "seed": s, "factor.model.mixer": m,
                          "factor.model.patch_size": p,
                          "test_acc": mu + 0.01 * rng.standard_normal()}
                         for m, p, mu in cells for s in range(3)])


def test_factors_that_change_together_in_the_finished_runs_are_not_identified():
    """Only (attention, 2) and (mlp, 8) of a mixer x patch grid finished: the 10 points
    between them are the mixer's or the patch's, nobody can say which. With the study's grids
    the model split them arbitrarily (each 'explained 98.3%'); without them (the dashboard)
    the patch size was dropped as a function of the mixer and the mixer got all 10 points.
    One missing cell of the 2x2 leaves both estimable."""
    diagonal = _mixer_patch([("attention", 2, 0.70), ("mlp", 8, 0.60)])
    grids = [{"model.mixer": ["attention", "mlp"], "model.patch_size": [2, 8]}]
    for g in (grids, None):
        a = analysis.analyse(diagonal, "test_acc", g, n_boot=100)
        att = next(s for s in a.verdict if s.startswith("Attention:"))
        patches = next(s for s in a.verdict if s.startswith("Patches:"))
        assert att.startswith("Attention: inconclusive:") and "beats" not in att
        assert "changes together with model.patch_size" in att
        assert "not identified" in patches and "model.mixer" in patches
        assert "beats" not in patches and "explains" not in patches
    a = analysis.analyse(diagonal, "test_acc", grids, n_boot=100)
    assert a.fits[0].design.confounded == {"factor.model.mixer": ["factor.model.patch_size"],
                                           "factor.model.patch_size": ["factor.model.mixer"]}
    three = _mixer_patch([("attention", 2, 0.70), ("attention", 8, 0.65), ("mlp", 2, 0.60)])
    a = analysis.analyse(three, "test_acc", grids, n_boot=100)
    assert a.fits[0].design.confounded == {}
    assert next(s for s in a.verdict if s.startswith("Attention:")).startswith(
        "Attention: the token mixer (model.mixer) explains")


def test_a_pooled_view_and_interactions_of_confounded_factors_claim_nothing():
    """Each grid finished only its diagonal ((attention, 2) and mlp or conv at patch 8), and
    only the patch matters (+10 points at 2): pooled over the grids, the mixer is still
    confounded with the patch (it was 'attention beats mlp by 10 points'), and an interaction
    or slope difference of the mixer is the patch's as much."""
    rng = np.random.default_rng(0)
    rows = []
    for g, cells in ((0, [("attention", 2), ("mlp", 8)]), (1, [("attention", 2), ("conv", 8)])):
        for (m, p), f, s in itertools.product(cells, [0.25, 1.0], range(3)):
            rows.append({"run_id": f"{g}{m}{p}{f}{s}", "cell_id": f"{m}{p}{f}", "grid": g,
                         "seed": s, "status": "finished", "factor.model.mixer": m,
                         "factor.model.patch_size": p, "factor.dataset.fraction": f,
                         "test_acc": 0.6 + (0.10 if p == 2 else 0.0) * f
                         + 0.005 * rng.standard_normal()})
    df = pd.DataFrame(rows)
    grids = [{"model.mixer": ["attention", "mlp"], "model.patch_size": [2, 8],
              "dataset.fraction": [0.25, 1.0]},
             {"model.mixer": ["attention", "conv"], "model.patch_size": [2, 8],
              "dataset.fraction": [0.25, 1.0]}]
    for g in (grids, None):
        a = analysis.analyse(df, "test_acc", g, n_boot=50)
        att = next(s for s in a.verdict if s.startswith("Attention:"))
        assert "not identified" in att and "beats" not in att, att
        inter = next(s for s in a.verdict if s.startswith(("Largest", "Interactions")))
        assert inter.startswith("Interactions: none identified"), inter
        data = next(s for s in a.verdict if s.startswith("Data:"))
        assert "slope difference" not in data and "slopes are not compared" in data


def test_a_mixer_specific_parameter_is_an_attribute_not_a_confound():
    """conv at kernel 9 and pool at window 3 (the dashboard filtered to these two mixers: no
    mixer without a kernel, so no 'off' level): the kernel is part of what each mixer level
    is, and conv vs pool is a claim the verdict makes."""
    rng = np.random.default_rng(0)
    rows = [{"run_id": f"{m}{s}", "cell_id": m, "grid": 0, "seed": s, "status": "finished",
             "factor.model.mixer": m, "factor.model.kernel_size": k,
             "test_acc": mu + 0.005 * rng.standard_normal()}
            for m, k, mu in (("conv", 9, 0.72), ("pool", 3, 0.68)) for s in range(3)]
    a = analysis.analyse(pd.DataFrame(rows), "test_acc", None, n_boot=50)
    assert a.fits[0].design.confounded == {} and a.fits[0].design.aliased == {}
    assert "mixer=conv beats mixer=pool" in a.verdict[0]
    # a backbone argument every mixer has (depth) changing with the mixer is a confound
    zipped = pd.DataFrame(rows).rename(columns={"factor.model.kernel_size": "factor.model.depth"})
    a = analysis.analyse(zipped, "test_acc", None, n_boot=50)
    assert "not identified" in a.verdict[0]


def test_the_report_tables_show_no_share_for_a_factor_that_is_not_identified():
    from ablate.render import anova_rows

    grids = [{"model.mixer": ["attention", "mlp"], "model.patch_size": [2, 8]}]
    a = analysis.analyse(_mixer_patch([("attention", 2, 0.70), ("mlp", 8, 0.60)]), "test_acc",
                         grids, n_boot=50)
    rows = {r[0]: r for r in anova_rows(a.fits[0])}
    assert rows["model.mixer"][1] == "not identified (confounded with model.patch_size)"
    assert rows["model.mixer"][5] == ""  # no p
    grid = analysis.to_dict(a)["grids"][0]
    assert grid["factors"]["model.mixer"]["confounded_with"] == ["model.patch_size"]


def test_a_cell_with_an_unknown_start_time_is_not_taken_for_the_newest():
    rows = [{"run_id": f"{c}{s}", "cell_id": c, "status": "finished", "seed": s,
             "start_time": t, "factor.model.mixer": "mlp", "test_acc": 0.5}
            for c, t in (("old", np.nan), ("new", 5.0)) for s in range(2)]
    kept, old = analysis.newest_cells(pd.DataFrame(rows))
    assert set(kept["cell_id"]) == {"new"} and old == 2
