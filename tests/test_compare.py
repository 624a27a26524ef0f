"""The compare view's numbers: the difference of two cells' seed means with a Welch 95% CI,
checked against scipy and a hand computation; cells grouped by cell_id; costs side by side."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from ablate.analysis.compare import cells, compare, difference


def test_welch_interval_matches_scipy_and_a_hand_computation():
    a, b = [0.80, 0.81, 0.83], [0.70, 0.72, 0.74, 0.75]
    got = difference(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert got["ci_low"] == pytest.approx(ci.low) and got["ci_high"] == pytest.approx(ci.high)
    assert got["p"] == pytest.approx(ref.pvalue) and got["df"] == pytest.approx(ref.df)
    # by hand: Welch-Satterthwaite
    ma, mb = sum(a) / 3, sum(b) / 4
    va = sum((x - ma) ** 2 for x in a) / 2 / 3
    vb = sum((x - mb) ** 2 for x in b) / 3 / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert got["diff"] == pytest.approx(ma - mb)
    assert got["ci_high"] - got["diff"] == pytest.approx(half)


def test_one_seed_gives_no_interval():
    got = difference([0.8], [0.7, 0.72])
    assert got["diff"] == pytest.approx(0.8 - 0.71) and math.isnan(got["ci_low"])


def _runs() -> pd.DataFrame:
    rows = []
    for m, vals, gm in (("attention", [0.80, 0.82], 2.0), ("conv", [0.70, 0.74], 1.0)):
        for s, v in enumerate(vals):
            rows.append({"run_id": f"{m}{s}", "cell_id": f"c-{m}", "status": "finished",
                         "seed": s, "factor.model.mixer": m, "val_acc": v, "gmacs": gm})
    rows.append({"run_id": "p", "cell_id": "c-conv", "status": "pruned", "seed": 2,
                 "factor.model.mixer": "conv", "val_acc": 0.1, "gmacs": 1.0})
    # an edited study: a second attention cell with the same levels
    rows.append({"run_id": "old", "cell_id": "c-old", "status": "finished", "seed": 0,
                 "factor.model.mixer": "attention", "val_acc": 0.5, "gmacs": 2.0})
    return pd.DataFrame(rows)


def test_cells_group_by_cell_id_and_compare_two():
    df = _runs()
    c = cells(df, "val_acc")
    assert len(c) == 3 and c["n"].tolist() == [2, 2, 1]  # the pruned run is no seed
    assert c["label"].iloc[0] == "model.mixer=attention (cell c-attent)"
    out = compare(df, "c-attention", df, "c-conv", "val_acc")
    assert sorted(out["b"]) == [0.70, 0.74]
    want = stats.ttest_ind([0.80, 0.82], [0.70, 0.74], equal_var=False).confidence_interval()
    assert out["difference"]["ci_low"] == pytest.approx(want.low)
    assert out["differing_factors"] == ["factor.model.mixer"]
    cost = out["costs"].set_index("cost").loc["gmacs"]
    assert cost["a"] == 2.0 and cost["b / a"] == 0.5


def test_no_ratio_of_a_training_cost_timed_by_two_ablates_profiles():
    """A training-step cost (train_img_s, train_time_alone_s, peak_mem_mb) from an older
    ablate's profile (no profile_train_batch_size: the node's threads, the profile batch)
    against today's is no ratio; the same cells all profiled one way are."""
    df = _runs().assign(train_img_s=lambda d: 100.0 / d["gmacs"])
    new = df.assign(profile_train_batch_size=64.0)
    cost = compare(new, "c-attention", new, "c-conv", "val_acc")["costs"].set_index("cost")
    assert cost.loc["train_img_s", "b / a"] == pytest.approx(2.0)
    old_attention = new.assign(profile_train_batch_size=new["profile_train_batch_size"].where(
        new["factor.model.mixer"] == "conv"))
    cost = compare(old_attention, "c-attention", old_attention, "c-conv", "val_acc")["costs"]
    cost = cost.set_index("cost")
    assert math.isnan(cost.loc["train_img_s", "b / a"])
    assert cost.loc["gmacs", "b / a"] == 0.5  # counted, not timed: unchanged


def test_training_settings_the_two_cells_differ_in_are_named():
    """attention trained at fp32 and mlp at bf16 (auto per architecture); the same cell of a
    second study at 30 epochs instead of 10: A - B carries those differences, and compare
    names them (the factors alone say 'mixer' and nothing)."""
    rows = []
    for m, prec, mu in (("attention", "fp32", 0.70), ("mlp", "bf16", 0.66)):
        for s, e in enumerate((-0.005, 0.0, 0.005)):
            rows.append({"run_id": f"{m}{s}", "cell_id": m, "status": "finished", "seed": s,
                         "factor.model.mixer": m, "params.train.precision": "auto",
                         "params.train.precision_resolved": prec, "params.train.epochs": "10",
                         "params.train.budget": "epochs", "test_acc": mu + e})
    a = pd.DataFrame(rows)
    b = a.assign(**{"params.train.epochs": "30", "test_acc": a["test_acc"] + 0.03})
    out = compare(a, "attention", a, "mlp", "test_acc")
    assert out["differing_factors"] == ["factor.model.mixer"]
    assert out["settings_differ"] == [{"setting": "train.precision", "a": "fp32", "b": "bf16"}]
    out = compare(a, "attention", b, "attention", "test_acc")
    assert out["differing_factors"] == []
    assert out["settings_differ"] == [{"setting": "train.epochs", "a": "10", "b": "30"}]
    same = a.assign(**{"params.train.precision_resolved": "fp32"})
    assert compare(same, "attention", same, "mlp", "test_acc")["settings_differ"] == []
    # precision as a factor of the study: a differing factor, not a setting
    fac = same.assign(**{"factor.train.precision": a["params.train.precision_resolved"]})
    out = compare(fac, "attention", fac, "mlp", "test_acc")
    assert out["settings_differ"] == [] and "factor.train.precision" in out["differing_factors"]


def test_a_setting_that_is_a_factor_on_one_side_only_is_still_compared():
    """Study A varies train.precision (this cell at bf16); study B does not (fp32): the
    factor is not shared, so the difference must be named as a setting."""
    base = {"status": "finished", "factor.model.mixer": "mlp", "params.train.epochs": "10"}
    a = pd.DataFrame([{**base, "run_id": f"a{s}", "cell_id": "a", "seed": s,
                       "factor.train.precision": "bf16", "params.train.precision": "bf16",
                       "test_acc": 0.70 + 0.01 * s} for s in range(3)])
    b = pd.DataFrame([{**base, "run_id": f"b{s}", "cell_id": "b", "seed": s,
                       "params.train.precision": "fp32", "test_acc": 0.68 + 0.01 * s}
                      for s in range(3)])
    out = compare(a, "a", b, "b", "test_acc")
    assert out["differing_factors"] == []
    assert out["settings_differ"] == [{"setting": "train.precision", "a": "bf16", "b": "fp32"}]
