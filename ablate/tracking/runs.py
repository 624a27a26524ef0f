"""Reading a study's runs back: one row per run (`load_runs`), per-epoch curves
(`load_curves`), the studies in a store (`study_summary`) and a cheap token that changes when
a study's runs do (`change_token`). Serves `ablate status`, the analysis and the dashboard.
Database stores are read with SQL (`sqlread`), only the columns asked for; a tracking server
or a file store through MLflow's client, in pages and bulk calls, never one call per run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ablate.tracking import sqlread
from ablate.tracking.sqlread import PROVENANCE_TAGS, RUN_TAGS, TAG_PREFIXES
from ablate.tracking.store import (
    EPOCH_METRICS,
    _search_all,
    client,
    default_tracking_uri,
    sqlite_store_exists,
)

__all__ = ["ALWAYS_PARAMS", "PROVENANCE_TAGS", "RUN_TAGS", "TAG_PREFIXES", "change_token",
           "list_studies", "load_curves", "load_runs", "study_summary"]
# params every load returns, params=False included: what the verdict must state (the budget,
# the precision each run trained at)
ALWAYS_PARAMS = ("train.budget", "train.epochs", "train.precision", "train.precision_resolved")
BULK_RUNS = 100  # run ids per bulk metric-history call (MLflow's server allows 100)
BULK_STEPS = 2500  # points per run and metric a bulk call returns (the server's maximum)


def study_summary(uri: str) -> pd.DataFrame:
    """The studies (experiments but MLflow's 'Default') of a store, last updated first:
    name, runs (those its pages show: the final phase), running, last_update (ms). One
    grouped query on a database store; a study whose driver died counts no run as running
    (its pages show them killed: `without_orphans`). A server lists names only (runs and
    running are left empty: counting would read every run)."""
    from ablate.tracking.lease import holder_alive, parse_lease

    cols = ["name", "runs", "running", "last_update"]
    if not sqlite_store_exists(uri):
        return pd.DataFrame(columns=cols)
    if sqlread.is_database(uri):
        df = sqlread.study_summary(uri)
        dead = [not holder_alive(parse_lease(v)) for v in df.pop("lease")]
        df.loc[dead, "running"] = 0
        return df
    exps = client(uri).search_experiments(order_by=["last_update_time DESC"])
    return pd.DataFrame([(e.name, None, None, e.last_update_time) for e in exps
                         if e.name != "Default"], columns=cols)


def list_studies(uri: str) -> list[str]:
    """Names of the experiments in a store that hold ablate runs (newest first)."""
    return study_summary(uri)["name"].tolist()


def change_token(study: str, uri: str, ttl_s: float = 30.0) -> tuple:
    """Changes when the study's runs change (a run added, ended, deleted, an epoch logged):
    cache keys of the dashboard. A database store answers with one small query; a server
    gets a token that changes every `ttl_s` seconds."""
    if sqlread.is_database(uri) and sqlite_store_exists(uri):
        return sqlread.change_token(uri, study)
    return sqlread.time_token(ttl_s)


def load_runs(study: str, uri: str | None = None, params: bool | Sequence[str] = True,
              phase: str | None = "final", metrics: Sequence[str] | None = None
              ) -> pd.DataFrame:
    """One row per run: run_id, trial_id, cell_id (seeds of one configuration share it), grid
    (index of the factor grid), status, seed, factor.<key> columns (typed where numeric),
    params.<key>, metrics (latest value), start/end time. Empty frame if no such study.
    `params`: True all, False only ALWAYS_PARAMS, or a list of keys (plus ALWAYS_PARAMS);
    `metrics`: None all, or a list of keys. Only runs of `phase` (`final`: the grid's, what
    analysis uses; `tune`: a tuning phase's; None: all), with a `phase` column. Database
    stores are read with four SQL queries; a tracking server through MLflow's client."""
    uri = uri or default_tracking_uri()
    if not sqlite_store_exists(uri):
        return pd.DataFrame()
    if sqlread.is_database(uri):
        df = _load_runs_sql(study, uri, params, metrics)
    else:
        df = _load_runs_client(study, uri, params, metrics)
    if df.empty or phase is None:
        return df
    df = df[df["phase"] == phase].reset_index(drop=True)
    # params only other phases' runs have (a profile's own config) are not columns here
    empty = [c for c in df.columns if c.startswith("params.") and df[c].isna().all()
             and c[len("params."):] not in ALWAYS_PARAMS]
    return df.drop(columns=empty)


def _load_runs_client(study: str, uri: str, params: bool | Sequence[str] = True,
                      metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """load_runs through MLflow's client (any tracking URI, a server included): search_runs
    in pages of 5,000 runs, then the same selection of params and metrics as the SQL path."""
    keep = None if params is True else {*ALWAYS_PARAMS, *([] if params is False else params)}
    c = client(uri)
    exp = c.get_experiment_by_name(study)
    if exp is None:
        return pd.DataFrame()
    rows = []
    for r in _search_all(c, [exp.experiment_id]):
        tags = r.data.tags
        row: dict[str, Any] = {
            "run_id": r.info.run_id, "run_name": r.info.run_name,
            "trial_id": tags.get("ablate.trial_id"),
            "cell_id": tags.get("ablate.cell_id"),
            "grid": _num(tags.get("ablate.grid")),
            "status": tags.get("ablate.status", r.info.status.lower()),
            "seed": _num(tags.get("ablate.seed")),
            "phase": tags.get("ablate.phase") or "final",
            "error": tags.get("ablate.error", ""),
            **{col: tags.get(tag) for tag, col in PROVENANCE_TAGS.items()},
            "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
            "end_time": pd.to_datetime(r.info.end_time, unit="ms") if r.info.end_time else None,
        }
        for k, v in tags.items():
            if k.startswith("factor."):
                row[k] = None if v == "off" else _num(v)
            elif k.startswith("optuna."):
                row[k] = _num(v)
        for k, v in r.data.params.items():
            if keep is None or k in keep:
                row[f"params.{k}"] = v
        row.update(r.data.metrics if metrics is None else
                   {k: v for k, v in r.data.metrics.items() if k in metrics})
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("start_time", ascending=False, ignore_index=True) if rows else df


def _load_runs_sql(study: str, uri: str, params: bool | Sequence[str] = True,
                   metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """load_runs with SQL (database stores): see ablate.tracking.sqlread."""
    return sqlread.load_runs(study, uri, params, metrics, ALWAYS_PARAMS, _num)


def load_curves(study: str, uri: str | None = None, run_ids: list[str] | None = None,
                metrics: tuple[str, ...] = EPOCH_METRICS) -> pd.DataFrame:
    """Per-epoch metrics: columns run_id, metric, step, value (last value per step). A
    database store is read with one SQL query per 500 runs; a server with one bulk call per
    100 runs and metric (up to 2,500 points per run and metric); never one call per run."""
    uri = uri or default_tracking_uri()
    if not sqlite_store_exists(uri):
        return pd.DataFrame(columns=["run_id", "metric", "step", "value"])
    if run_ids is None:
        df = load_runs(study, uri, params=False, metrics=())
        run_ids = [] if df.empty else df["run_id"].tolist()
    if sqlread.is_database(uri):
        df = _load_curves_sql(uri, run_ids, metrics)
    else:
        df = _load_curves_client(uri, run_ids, metrics)
    if df.empty:
        return df.drop(columns="ts")
    df = df.sort_values("ts", kind="stable").groupby(["run_id", "metric", "step"],
                                                     as_index=False).last()
    return df.drop(columns="ts")


def _load_curves_client(uri: str, run_ids: list[str], metrics: tuple[str, ...]
                        ) -> pd.DataFrame:
    """Through MLflow: a tracking server's bulk metric-history endpoint (GetMetricHistory-
    BulkInterval, 100 runs a call), or the store's own bulk read (a file store)."""
    from mlflow.protos.service_pb2 import GetMetricHistoryBulkInterval
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.proto_json_utils import message_to_json

    store = client(uri)._tracking_client.store
    rows = []
    for m in metrics:
        for i in range(0, len(run_ids), BULK_RUNS):
            ids = run_ids[i:i + BULK_RUNS]
            if isinstance(store, RestStore):
                req = message_to_json(GetMetricHistoryBulkInterval(
                    run_ids=ids, metric_key=m, max_results=BULK_STEPS))
                got = store._call_endpoint(GetMetricHistoryBulkInterval, req).metrics
            else:
                got = store.get_metric_history_bulk_interval(ids, m, BULK_STEPS, None, None)
            rows += [(h.run_id, m, h.step, h.value, h.timestamp) for h in got]
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "ts"])


def _load_curves_sql(uri: str, run_ids: list[str], metrics: tuple[str, ...]) -> pd.DataFrame:
    return sqlread.curves(uri, run_ids, metrics)


def _num(v: str | None) -> Any:
    if v is None:
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
