"""Optuna as a Ray Tune search algorithm, through public APIs only: Ray's `Searcher` base class
and Optuna's ask/tell. Each suggestion carries its Optuna trial number; a trial that ASHA
stopped is told PRUNED (with no value), one that failed FAIL, one that finished COMPLETE with
its objectives (seed means)."""

from __future__ import annotations

import logging
import pickle
from typing import Any

from ray.tune.search import Searcher

log = logging.getLogger(__name__)


class OptunaAskTell(Searcher):
    """Suggests from an Optuna study (`study.ask`) and tells it every outcome."""

    def __init__(self, study, distributions: dict[str, Any], objectives: dict[str, str]) -> None:
        super().__init__(metric=None, mode=None)
        self.study = study
        self.distributions = distributions
        self.objectives = list(objectives)
        self.live: dict[str, Any] = {}  # Tune trial id -> Optuna trial

    def __getstate__(self) -> dict[str, Any]:
        """What pickles of the searcher: Tune's Tuner pickles its config, this searcher with
        it, into the experiment directory for a `Tuner.restore` that ablate never calls (a
        study resumes from its MLflow store and its Optuna storage). The Optuna study and its
        live trials are left out: a sampler need not pickle (Optuna 5.1's NSGAIISampler holds
        a threading lock, and the Tuner failed on it). No copy of the searcher ever runs:
        Ray Client, where Tune would ship it to the cluster, is refused (raystart)."""
        return {**self.__dict__, "study": None, "live": {}}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space is the Optuna distributions; Tune's config only adds constants

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        trial = self.study.ask(self.distributions)
        self.live[trial_id] = trial
        return {**trial.params, "__optuna_number": trial.number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        from optuna.trial import TrialState

        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        values = None
        if error or not result:
            state = TrialState.FAIL
        elif "test_acc" not in result:  # stopped before its last epoch (ASHA)
            state = TrialState.PRUNED
        else:
            state = TrialState.COMPLETE
            values = [result.get(m) for m in self.objectives]
            if any(v is None for v in values):
                state, values = TrialState.FAIL, None
        try:
            self.study.tell(trial, values, state=state)
        except Exception as e:  # noqa: BLE001 - e.g. NaN values: Optuna records FAIL
            log.warning("optuna could not record trial %s: %s", trial.number, e)

    def save(self, checkpoint_path: str) -> None:
        # The Optuna storage is the searcher's state; Tune's checkpoint needs nothing more.
        with open(checkpoint_path, "wb") as f:
            pickle.dump({}, f)

    def restore(self, checkpoint_path: str) -> None:
        pass
