"""The tuning phase of `ablate run` (`tune:` in the study file): one Optuna search per level
of `tune.per`, then the grid with every trial taking its level's best values.

Runs inside the driver's study lease. Resumable: a level whose Optuna study has `n_trials`
done trials is not searched again, and the grid skips trials that already finished.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console

from ablate.errors import AblateError
from ablate.study import Study, tune_levels, with_tuned
from ablate.tracking import Tracker
from ablate.tune.driver import RunSummary, _run_grid, _run_search, open_search_study
from ablate.tune.raystart import _init_ray, check_fits
from ablate.tuning import LEVEL_TAG, PHASE_TAG, level_label, level_spec


def level_study(study: Study, values: dict[str, Any], precision: str | None = None) -> Study:
    """The derived Optuna-search study of one tuning level (same file, same experiment), at
    the study's one `precision` where `auto` decided it for the whole study."""
    spec = level_spec(study.spec, values, study.experiment)
    if precision:
        spec = spec.model_copy(update={"train": spec.train.model_copy(
            update={"precision": precision})})
    return Study(spec, study.path, study.file_hash, [], list(spec.search.space),
                 profile=study.profile, reprofile=study.reprofile)


def study_precision_for_tuning(study: Study, tracker: Tracker, console: Console) -> str | None:
    """`train.precision: auto` at one precision for the study (precision_scope: study),
    decided before the tuning levels from the grid's architectures (profiled now, or found in
    the store, as the grid will find them): each level holds a part of the architectures
    (with `per: [model.mixer]`, one), and deciding per level would tune hyperparameters at
    other numerics than the grid trains at. None where it does not apply."""
    from ablate.tune.driver import _context
    from ablate.tune.precision_plan import study_scope
    from ablate.tune.profiling import profile_trials

    wide = [t for t in study.trials if study_scope(t)]
    if not study.profile or not wide:
        return None
    by_trial = profile_trials(study, wide, tracker, console, _context(study)["root"])
    chosen = {by_trial[t.trial_id]["precision"] for t in wide if t.trial_id in by_trial}
    return chosen.pop() if len(chosen) == 1 else None


def best_values(study: Study, precision: str | None = None) -> dict[str, dict[str, Any]]:
    """Each level's best sampled values (its Optuna study's best trial), by level label;
    raises AblateError for a level whose search has no complete trial."""
    out = {}
    for label, values in tune_levels(study.spec, study.trials).items():
        _, name, ost = open_search_study(level_study(study, values, precision).spec)
        if not any(t.state.name == "COMPLETE" for t in ost.trials):
            raise AblateError(f"{study.path}: tune: level {label} has no complete tuning trial "
                              f"(Optuna study {name}): see its failed runs, fix the cause and "
                              "run again")
        out[label] = dict(ost.best_trial.params)
    return out


def tuned_study(study: Study, best: dict[str, dict[str, Any]]) -> Study:
    """The study's grid with every trial's tuned values applied (new trial ids)."""
    per = study.spec.tune.per if study.spec.tune else []
    trials = []
    for t in study.trials:
        label = level_label({k: t.factors.get(k) for k in per})
        try:
            trials.append(with_tuned(t, best[label], study.factor_keys))
        except ValueError as e:
            raise AblateError(f"{study.path}: tune: the tuned values {best[label]} of level "
                              f"{label} do not run in {t.run_name}: {e}") from None
    return dataclasses.replace(study, trials=trials)


def run_tuned(study: Study, tracker: Tracker, address: str | None, verbose: bool,
              console: Console, keep_trial_dirs: bool) -> RunSummary:
    """Tune every level (runs tagged phase `tune` and their level), then run the tuned grid
    (phase `final`). One Ray session for both."""
    started = _init_ray(address, verbose)
    try:
        check_fits(study, address)  # before the precision's profiles (a search warns)
        precision = study_precision_for_tuning(study, tracker, console)
        for label, values in tune_levels(study.spec, study.trials).items():
            console.print(f"{study.spec.name}: tuning level {label}", highlight=False)
            tags = {PHASE_TAG: "tune", LEVEL_TAG: label, "ablate.study": study.spec.name}
            summary = _run_search(level_study(study, values, precision), tracker, address,
                                  verbose, console, keep_trial_dirs, tags)
            if summary.interrupted:
                return dataclasses.replace(summary, total=len(study.trials), skipped=0,
                                           finished=0, pruned=0, failed=0)
        best = best_values(study, precision)
        for label, values in best.items():
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in values.items())
            console.print(f"tuned {label}: {shown}", highlight=False)
        return _run_grid(tuned_study(study, best), tracker, address, verbose, console,
                         keep_trial_dirs)
    finally:
        if started:
            import ray

            ray.shutdown()
