"""`ablate run STUDY --smoke`: every cell of a study for one epoch on a tiny class-balanced
subset, into a throwaway store, to find the broken cell before a long run spends hours on
the rest."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from ablate.study import Study, load_study
from ablate.tracking import load_runs
from ablate.tune.driver import RunSummary, run_study

SMOKE_TRAIN = 256  # training images (class-balanced: dataset.max_train is a stratified cap)
SMOKE_TEST = 128
SMOKE_SEARCH_TRIALS = 2


@dataclass
class SmokeResult:
    total: int  # trials the smoke run had to run
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (cell, status, why)
    summary: RunSummary | None = None
    study: Study | None = None


def smoke_sets(study: Study, store: Path) -> list[str]:
    """The overrides that make a study a smoke run: one epoch, one seed, a tiny subset, no
    retries; an Optuna search runs a couple of trials in a throwaway storage."""
    sets = ["train.epochs=1", "train.budget=epochs", f"dataset.max_train={SMOKE_TRAIN}",
            f"dataset.max_test={SMOKE_TEST}", "failures.max_retries=0",
            f"seeds=[{study.spec.seeds[0] if study.spec.seeds else 0}]", "tracking.uri=null"]
    storage = f"search.storage=sqlite:///{store / 'optuna.db'}"
    if study.spec.search.method == "optuna":
        sets += [f"search.n_trials={SMOKE_SEARCH_TRIALS}", storage]
    if getattr(study.spec, "tune", None) is not None:  # a tuning phase: one trial per level
        sets += ["tune.n_trials=1", "tune.epochs=1", f"tune.seeds=[{study.spec.tune.seeds[0]}]",
                 storage]
    return list(dict.fromkeys(sets))


def run_smoke(path: str | Path, sets: Sequence[str] = (), address: str | None = None,
              verbose: bool = False, console: Console | None = None,
              keep_store: bool = False) -> SmokeResult:
    """Run the smoke version of a study in a store under the system temp dir (removed after
    unless `keep_store`); returns the cells that did not finish and why."""
    console = console or Console(soft_wrap=True)
    base = load_study(path, sets)
    store = Path(tempfile.mkdtemp(prefix="ablate-smoke-"))
    try:
        study = replace(load_study(path, [*sets, *smoke_sets(base, store)]), profile=False)
        uri = f"sqlite:///{store / 'mlflow.db'}"
        console.print(f"{study.spec.name}: smoke run, 1 epoch on {SMOKE_TRAIN} train / "
                      f"{SMOKE_TEST} test images, no profile, store {store}"
                      + ("" if keep_store else " (removed after)"), highlight=False)
        summary = run_study(study, uri, address, verbose, console)
        runs = load_runs(study.experiment, uri, params=False)
        return SmokeResult(len(study.trials) or SMOKE_SEARCH_TRIALS,
                           _failures(study, runs), summary, study)
    finally:
        if not keep_store:
            shutil.rmtree(store, ignore_errors=True)


def _failures(study: Study, runs) -> list[tuple[str, str, str]]:
    """(cell, status, why) of every trial that did not finish (a grid trial with no run at
    all is 'not run')."""
    out = []
    if study.spec.search.method == "grid":
        by_id = {} if runs.empty else {r["trial_id"]: r for _, r in runs.iterrows()}
        for t in study.trials:
            r = by_id.get(t.trial_id)
            if r is None:
                out.append((t.cell_name, "not run", "the run stopped before this cell"))
            elif r["status"] != "finished":
                out.append((t.cell_name, str(r["status"]), str(r.get("error") or "")))
        return out
    if not runs.empty:
        for _, r in runs[~runs["status"].isin(["finished", "pruned"])].iterrows():
            out.append((str(r["run_name"]), str(r["status"]), str(r.get("error") or "")))
    return out
