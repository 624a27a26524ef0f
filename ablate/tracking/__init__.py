"""MLflow: tracking URIs, one experiment per study, one run per trial, runs <-> DataFrame.

`store` opens stores and writes runs (`Tracker`), `writer` is the one writer a study's driver
hands its events to, `runs` reads runs and curves back for status, analysis and the dashboard.
"""

from __future__ import annotations

from ablate.tracking.runs import (
    _load_runs_client,
    _load_runs_sql,
    change_token,
    list_studies,
    load_curves,
    load_runs,
    study_summary,
)
from ablate.tracking.store import (
    DONE,
    EPOCH_METRICS,
    FINAL_METRICS,
    PACKAGE_ROOT,
    Tracker,
    artifact_root,
    client,
    default_store_dir,
    default_tracking_uri,
    done_trial_ids,
    flatten,
    git_revision,
    resolve_tracking_uri,
    sqlite_store_exists,
    store_lock,
)
from ablate.tracking.writer import RunWriter

__all__ = [
    "DONE", "EPOCH_METRICS", "FINAL_METRICS", "PACKAGE_ROOT", "RunWriter", "Tracker",
    "_load_runs_client", "_load_runs_sql", "artifact_root", "change_token", "client",
    "default_store_dir", "default_tracking_uri", "done_trial_ids", "flatten", "git_revision",
    "list_studies", "load_curves", "load_runs", "resolve_tracking_uri", "sqlite_store_exists",
    "store_lock", "study_summary",
]
