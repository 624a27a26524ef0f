"""Parameter importance: Optuna's fANOVA and PED-ANOVA on a real Optuna study in a real RDB
storage (a SQLite file), with one planted important parameter; a grid's variance shares."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd

from ablate import analysis
from ablate.analysis.importance import grid_importance, optuna_importance
from ablate.search import open_storage


def _objective(trial: optuna.Trial) -> tuple[float, float] | float:
    lr = trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)        # the planted one
    wd = trial.suggest_float("train.weight_decay", 0.0, 0.1)
    mixer = trial.suggest_categorical("model.mixer", ["attention", "conv"])
    # accuracy peaks at lr = 1e-2 and falls off steeply; weight decay and mixer barely matter
    noise = np.random.default_rng(trial.number).normal(0, 0.002)
    return (0.9 - 0.1 * (math.log10(lr) + 2) ** 2 + 0.01 * wd
            + (0.003 if mixer == "attention" else 0.0) + noise)


def _study(tmp_path, name: str, directions: list[str]) -> optuna.Study:
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(study_name=name, storage=storage, directions=directions,
                             sampler=optuna.samplers.RandomSampler(seed=0))
    if len(directions) == 1:
        st.optimize(_objective, n_trials=60)
    else:  # second objective: cost, which nothing here drives
        st.optimize(lambda t: (_objective(t), 1.0 + 0.01 * t.number), n_trials=60)
    return optuna.load_study(study_name=name, storage=open_storage(
        f"sqlite:///{tmp_path / 'optuna.db'}"))


def test_planted_param_ranks_first_for_fanova_and_ped_anova(tmp_path):
    st = _study(tmp_path, "search-abc", ["maximize"])
    imp, notes = optuna_importance(st)
    assert notes == []
    assert set(imp["evaluator"]) == {"fanova", "ped_anova"}
    for ev, t in imp.groupby("evaluator"):
        top = t.sort_values("rank").iloc[0]
        assert top["param"] == "train.lr", (ev, t)
        assert set(t["param"]) == {"train.lr", "train.weight_decay", "model.mixer"}
        assert abs(t["importance"].sum() - 1) < 1e-6
    fan = imp[imp["evaluator"] == "fanova"].set_index("param")["importance"]
    assert fan["train.lr"] > 0.5


def test_multi_objective_search_reads_one_objective(tmp_path):
    st = _study(tmp_path, "search-multi", ["maximize", "minimize"])
    imp, notes = optuna_importance(st, objective=0)
    assert notes == []
    for _, t in imp.groupby("evaluator"):
        assert t.sort_values("rank")["param"].iloc[0] == "train.lr"


def test_too_few_trials_is_a_note_not_an_error(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    st = optuna.create_study(study_name="one", storage=storage, direction="maximize")
    st.optimize(_objective, n_trials=1)
    imp, notes = optuna_importance(st)
    assert imp.empty and "at least 2" in notes[0]


def test_grid_importance_is_the_variance_shares():
    rng = np.random.default_rng(0)
    rows = [{"factor.model.mixer": m, "factor.dataset.fraction": f, "status": "finished",
             "seed": s, "test_acc": 0.6 + (0.1 if m == "attention" else 0) + 0.01 * f
             + 0.005 * rng.standard_normal()}
            for m in ("attention", "conv") for f in (0.5, 1.0) for s in range(3)]
    a = analysis.analyse(pd.DataFrame(rows), "test_acc", n_boot=200)
    g = grid_importance(a)
    assert g["term"].iloc[0] == "model.mixer"
    fit = a.fits[0]
    for t, s in fit.terms.items():
        row = g[g["term"] == analysis.term_name(t)].iloc[0]
        assert row["share"] == s.share and (row["ci_low"], row["ci_high"]) == s.share_ci


def _split_objective(trial: optuna.Trial) -> tuple[float, float]:
    """Objective 0: lr decides the bad trials (a cliff), weight decay orders the good ones;
    objective 1 (a cost): driven only by the mixer."""
    lr = trial.suggest_float("train.lr", 0.0, 1.0)
    wd = trial.suggest_float("train.weight_decay", 0.0, 1.0)
    mixer = trial.suggest_categorical("model.mixer", ["attention", "conv"])
    acc = -10.0 if lr < 0.2 else wd
    return acc, (5.0 if mixer == "attention" else 1.0) + 0.01 * lr


def test_ped_anova_reads_the_top_trials_and_the_chosen_objective(tmp_path):
    """PED-ANOVA looks at what sets the best trials apart (weight decay), fANOVA at the
    variance (the lr cliff): a sign error in the maximised target, or an ignored `objective`,
    changes these rankings."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(study_name="split", storage=storage,
                             directions=["maximize", "minimize"],
                             sampler=optuna.samplers.RandomSampler(seed=1))
    st.optimize(_split_objective, n_trials=120)
    imp, _ = optuna_importance(st, objective=0)
    top = imp[imp["rank"] == 1].set_index("evaluator")["param"]
    assert top["ped_anova"] == "train.weight_decay"
    assert top["fanova"] == "train.lr"
    cost, _ = optuna_importance(st, objective=1)  # the mixer makes nearly all its variance
    assert cost[(cost["rank"] == 1) & (cost["evaluator"] == "fanova")]["param"].tolist() \
        == ["model.mixer"]


def test_few_trials_are_flagged_as_rough(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(study_name="few", storage=storage, direction="maximize",
                             sampler=optuna.samplers.RandomSampler(seed=0))
    st.optimize(_objective, n_trials=12)
    _, notes = optuna_importance(st)
    assert any("rough" in n and "12 complete trials" in n for n in notes), notes
