"""Parameter importance. For an Optuna search: Optuna's own evaluators, fANOVA (a random
forest's functional ANOVA: the share of the objective's variance each parameter explains over
the search space) and PED-ANOVA (how much the distribution of a parameter among the top 10%
trials differs from its distribution among all trials), through
`optuna.importance.get_param_importances`. For a grid: the analysis's variance shares (type
II SS / total SS, bootstrap CIs over seeds). Pure: takes an Optuna study object or an
Analysis, opens nothing."""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd

from ablate.analysis.anova import term_name
from ablate.analysis.seeds import short

EVALUATORS = ("fanova", "ped_anova")
COLUMNS = ["param", "importance", "evaluator", "rank"]


def _evaluator(name: str, seed: int) -> Any:
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if name == "fanova":
        return FanovaImportanceEvaluator(seed=seed)
    if name == "ped_anova":
        return PedAnovaImportanceEvaluator()
    raise ValueError(f"importance evaluator {name!r}: use one of {', '.join(EVALUATORS)}")


FEW_TRIALS = 50


def optuna_importance(study: Any, objective: int = 0, evaluators: tuple[str, ...] = EVALUATORS,
                      seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """(importances, notes) of the parameters of an Optuna study for its objective number
    `objective`, one row per (evaluator, param): normalised importance (sums to 1 per
    evaluator) and rank (1 = most important). Only COMPLETE trials count. An evaluator that
    cannot run (too few trials, one distinct value) gives a note instead of rows."""
    from optuna.importance import get_param_importances
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return pd.DataFrame(columns=COLUMNS), [
            f"{len(complete)} complete trial(s): importance needs at least 2"]
    maximize = study.directions[objective] == StudyDirection.MAXIMIZE
    multi = len(study.directions) > 1
    rows, notes = [], []
    for name in evaluators:
        # PED-ANOVA reads a given target as lower-is-better: a maximised objective is negated
        # (fANOVA is a variance decomposition: the sign does not matter to it).
        target = None if not multi else (
            (lambda t: -t.values[objective]) if maximize else (lambda t: t.values[objective]))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                imp = get_param_importances(study, evaluator=_evaluator(name, seed),
                                            target=target, normalize=True)
        except (RuntimeError, ValueError, ZeroDivisionError) as e:
            notes.append(f"{name}: {str(e).splitlines()[0][:200]}")
            continue
        notes += [f"{name}: {str(w.message).splitlines()[0][:200]}" for w in caught
                  if not issubclass(w.category, (DeprecationWarning, FutureWarning))
                  and "experimental" not in str(w.message)
                  and "multiplying the output by -1" not in str(w.message)]  # done above
        order = sorted(imp.items(), key=lambda kv: -kv[1])
        rows += [{"param": p, "importance": float(v), "evaluator": name, "rank": i + 1}
                 for i, (p, v) in enumerate(order)]
    if len(complete) < FEW_TRIALS:
        notes.append(f"only {len(complete)} complete trials: importances from fewer than "
                     f"{FEW_TRIALS} are rough (PED-ANOVA's top 10% is then a handful of trials)")
    return pd.DataFrame(rows, columns=COLUMNS), notes


def grid_importance(a: Any) -> pd.DataFrame:
    """The variance shares of a grid study's analysis (an `Analysis`): one row per term of
    every grid (and per pooled view), largest share first within a grid."""
    rows = [{"term": term_name(t), "share": s.share, "ci_low": s.share_ci[0],
             "ci_high": s.share_ci[1], "p_value": s.p_value, "grid": str(f.design.index)}
            for f in a.fits for t, s in f.terms.items()]
    for key, p in getattr(a, "pooled", {}).items():
        s = p.fit.main[key]
        rows.append({"term": short(key), "share": s.share, "ci_low": s.share_ci[0],
                     "ci_high": s.share_ci[1], "p_value": s.p_value,
                     "grid": "pooled " + "+".join(map(str, p.grids))})
    df = pd.DataFrame(rows, columns=["term", "share", "ci_low", "ci_high", "p_value", "grid"])
    return df.sort_values(["grid", "share"], ascending=[True, False], ignore_index=True)
