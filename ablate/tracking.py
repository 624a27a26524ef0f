"""MLflow: tracking URIs, one experiment per study, one run per trial, runs <-> DataFrame.

All writes of a study go through one `Tracker` in the driver process (one writer: safe on
SQLite). Reading helpers (`load_runs`, `load_curves`) serve `ablate status`, the analysis
and the dashboard.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from ablate.errors import TrackingError

STATUSES = ("finished", "pruned", "running", "failed", "killed")
DONE = ("finished", "pruned")  # a trial in one of these is never run again
FINAL_METRICS = ("val_acc", "best_val_acc", "test_acc", "test_loss", "params", "gmacs",
                 "throughput_img_s", "latency_ms", "train_img_s", "train_time_s",
                 "peak_mem_mb", "train_images")
EPOCH_METRICS = ("train_loss", "val_loss", "val_acc", "lr", "epoch_time_s")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def default_store_dir() -> Path:
    """`mlruns/` of this checkout (an editable install), else `./mlruns` made absolute."""
    here = PACKAGE_ROOT / "mlruns"
    return here if here.is_dir() else (Path.cwd() / "mlruns").resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def resolve_tracking_uri(cli_uri: str | None = None, study_uri: str | None = None) -> str:
    """--tracking-uri, then ABLATE_TRACKING_URI, then the study's tracking.uri, then default.
    Relative SQLite paths and bare folders are made absolute (Ray changes trials' cwd)."""
    uri = cli_uri or os.environ.get("ABLATE_TRACKING_URI") or study_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            uri = f"sqlite:///{path.resolve()}"
    elif "://" not in uri:
        uri = f"sqlite:///{Path(uri).resolve() / 'mlflow.db'}"
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (`<store>/artifacts`); servers serve their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def sqlite_store_exists(uri: str) -> bool:
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).exists()


@lru_cache(maxsize=1)
def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True,
                             text=True, timeout=5)
        rev = out.stdout.strip()
        if out.returncode != 0 or not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=5)
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(uri: str):
    """An MlflowClient for `uri`; raises TrackingError naming the URI if it cannot connect."""
    from mlflow import MlflowClient

    _quiet_mlflow()

    for attempt in range(5):
        try:
            with store_lock(uri):
                c = MlflowClient(tracking_uri=uri)
                c.search_experiments(max_results=1)
            return c
        except Exception as e:  # noqa: BLE001 - every backend raises its own kind
            # a second process creating the same new SQLite store races on its schema
            racing = ("already exists", "migration", "database is locked", "no such table")
            if any(r in str(e) for r in racing) and attempt < 4:
                time.sleep(1.0)
                continue
            msg = str(e).splitlines()[0][:300]
            raise TrackingError(f"tracking uri {uri}: cannot open the MLflow store ({msg}); "
                                "check --tracking-uri / ABLATE_TRACKING_URI / tracking.uri"
                                ) from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialize opening a SQLite store across processes: MLflow creates and migrates the
    schema on first open, and two processes doing it at once corrupt each other's view."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    if not db.parent.is_dir():
        yield
        return
    with open(db.parent / f".{db.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    """Writes one study's runs. Experiment = study name; one run per trial."""

    def __init__(self, uri: str, experiment: str, tags: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.client = client(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = self.client.create_experiment(experiment, artifact_location=artifact_root(uri),
                                                   tags=tags or {})
        else:
            exp_id = exp.experiment_id
            for k, v in (tags or {}).items():
                self.client.set_experiment_tag(exp_id, k, v)
        self.experiment_id = exp_id

    def runs_by_trial(self) -> dict[str, tuple[str, str]]:
        """trial id -> (run id, ablate.status) of its best run (done beats everything)."""
        out: dict[str, tuple[str, str]] = {}
        for r in _search_all(self.client, [self.experiment_id]):
            tid = r.data.tags.get("ablate.trial_id")
            status = r.data.tags.get("ablate.status", "unknown")
            if tid is None:
                continue
            if tid not in out or (status in DONE and out[tid][1] not in DONE):
                out[tid] = (r.info.run_id, status)
        return out

    def done_trial_ids(self) -> set[str]:
        return {t for t, (_, s) in self.runs_by_trial().items() if s in DONE}

    def start_run(self, trial: Any, study: Any, extra_tags: dict[str, str] | None = None) -> str:
        from mlflow.entities import Param, RunTag

        tags = {"ablate.study": study.spec.name, "ablate.trial_id": trial.trial_id,
                "ablate.status": "running", "ablate.git_revision": git_revision(),
                "ablate.study_file_hash": study.file_hash, "ablate.seed": str(trial.seed),
                "ablate.attempts": "1"}
        for k, v in trial.factors.items():
            tags[f"factor.{k}"] = "off" if v is None else str(v)
        tags.update(extra_tags or {})
        run = self.client.create_run(self.experiment_id, run_name=trial.run_name, tags=tags)
        rid = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(trial.config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(rid, params=params[i:i + 100])
        self.client.log_batch(rid, tags=[RunTag("mlflow.runName", trial.run_name)])
        import yaml

        self.client.log_text(rid, yaml.safe_dump({"trial_id": trial.trial_id, **trial.config},
                                                 sort_keys=False), "trial_config.yaml")
        return rid

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def end_run(self, run_id: str, status: str) -> None:
        """status: one of STATUSES; MLflow's own status follows (FINISHED/FAILED/KILLED)."""
        mlflow_status = {"finished": "FINISHED", "pruned": "FINISHED", "failed": "FAILED",
                         "killed": "KILLED"}[status]
        self.client.set_tag(run_id, "ablate.status", status)
        self.client.set_terminated(run_id, mlflow_status)


def _search_all(c, exp_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = c.search_runs(exp_ids, filter_string=filter_string, max_results=5000,
                             page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def list_studies(uri: str) -> list[str]:
    """Names of the experiments in a store that hold ablate runs (newest first)."""
    if not sqlite_store_exists(uri):
        return []
    c = client(uri)
    exps = c.search_experiments(order_by=["last_update_time DESC"])
    return [e.name for e in exps if e.name != "Default"]


def load_runs(study: str, uri: str | None = None, params: bool = True) -> pd.DataFrame:
    """One row per run: run_id, trial_id, status, seed, factor.<key> columns (typed where
    numeric), params.<key> (unless params=False), final metrics, start/end time. Empty frame
    if no such study. Database stores are read with three SQL queries (what a 5,000-run
    dashboard needs); a tracking server through MLflow's client."""
    uri = uri or default_tracking_uri()
    if not sqlite_store_exists(uri):
        return pd.DataFrame()
    if uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql"):
        client(uri)  # creates/migrates the schema (under the store lock) if needed
        return _load_runs_sql(study, uri, params)
    return _load_runs_client(study, uri, params)


def _load_runs_client(study: str, uri: str, params: bool = True) -> pd.DataFrame:
    """load_runs through MLflow's client (any tracking URI, a server included)."""
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
            "status": tags.get("ablate.status", r.info.status.lower()),
            "seed": _num(tags.get("ablate.seed")),
            "error": tags.get("ablate.error", ""),
            "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
            "end_time": pd.to_datetime(r.info.end_time, unit="ms") if r.info.end_time else None,
        }
        for k, v in tags.items():
            if k.startswith("factor."):
                row[k] = None if v == "off" else _num(v)
            elif k.startswith("optuna."):
                row[k] = _num(v)
        if params:
            for k, v in r.data.params.items():
                row[f"params.{k}"] = v
        row.update(r.data.metrics)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("start_time", ascending=False, ignore_index=True) if rows else df


_ENGINES: dict[str, Any] = {}


def _engine(uri: str):
    import sqlalchemy as sa

    if uri not in _ENGINES:
        _ENGINES[uri] = sa.create_engine(uri)
    return _ENGINES[uri]


def _load_runs_sql(study: str, uri: str, params: bool) -> pd.DataFrame:
    import sqlalchemy as sa

    eng = _engine(uri)
    with eng.connect() as con:
        exp = con.execute(sa.text("SELECT experiment_id FROM experiments WHERE name = :n AND "
                                  "lifecycle_stage = 'active'"), {"n": study}).fetchone()
        if exp is None:
            return pd.DataFrame()
        q = {"e": exp[0]}
        runs = pd.read_sql(sa.text(
            "SELECT run_uuid, name, status, start_time, end_time FROM runs WHERE "
            "experiment_id = :e AND lifecycle_stage = 'active'"), con, params=q)
        sub = ("SELECT run_uuid FROM runs WHERE experiment_id = :e AND "
               "lifecycle_stage = 'active'")
        tags = pd.read_sql(sa.text(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN "
                                   f"({sub})"), con, params=q)
        mets = pd.read_sql(sa.text(f"SELECT run_uuid, key, value FROM latest_metrics WHERE "
                                   f"run_uuid IN ({sub})"), con, params=q)
        pars = pd.read_sql(sa.text(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN "
                                   f"({sub})"), con, params=q) if params else None
    if runs.empty:
        return pd.DataFrame()
    df = pd.DataFrame({
        "run_id": runs["run_uuid"], "run_name": runs["name"],
        "start_time": pd.to_datetime(runs["start_time"], unit="ms"),
        "end_time": pd.to_datetime(runs["end_time"], unit="ms"),
    }).set_index("run_id")
    t = tags.pivot(index="run_uuid", columns="key", values="value") if not tags.empty else \
        pd.DataFrame(index=df.index)
    df["trial_id"] = t.get("ablate.trial_id")
    mlflow_status = runs.set_index("run_uuid")["status"].str.lower()
    df["status"] = t.get("ablate.status", pd.Series(dtype=object)).reindex(df.index)
    df["status"] = df["status"].fillna(mlflow_status)
    df["seed"] = t.get("ablate.seed", pd.Series(dtype=object)).reindex(df.index).map(_num)
    df["error"] = t.get("ablate.error", pd.Series(dtype=object)).reindex(df.index).fillna("")
    cols: dict[str, pd.Series] = {}
    for k in t.columns:
        if k.startswith("factor."):
            cols[k] = t[k].reindex(df.index).map(lambda v: None if v in ("off", None) or
                                                  v != v else _num(v))
        elif k.startswith("optuna."):
            cols[k] = t[k].reindex(df.index).map(lambda v: None if v is None or v != v
                                                  else _num(v))
    if pars is not None and not pars.empty:
        p = pars.pivot(index="run_uuid", columns="key", values="value")
        for k in p.columns:
            cols[f"params.{k}"] = p[k].reindex(df.index)
    if not mets.empty:
        m = mets.pivot_table(index="run_uuid", columns="key", values="value", aggfunc="last")
        for k in m.columns:
            cols[k] = m[k].reindex(df.index).astype(float)
    df = pd.concat([df, pd.DataFrame(cols, index=df.index)], axis=1)
    return df.reset_index().sort_values("start_time", ascending=False, ignore_index=True)


def load_curves(study: str, uri: str | None = None, run_ids: list[str] | None = None,
                metrics: tuple[str, ...] = EPOCH_METRICS) -> pd.DataFrame:
    """Per-epoch metrics: columns run_id, metric, step, value (last value per step)."""
    uri = uri or default_tracking_uri()
    if not sqlite_store_exists(uri):
        return pd.DataFrame(columns=["run_id", "metric", "step", "value"])
    c = client(uri)
    if run_ids is None:
        df = load_runs(study, uri)
        run_ids = [] if df.empty else df["run_id"].tolist()
    rows = []
    for rid in run_ids:
        for m in metrics:
            for h in c.get_metric_history(rid, m):
                rows.append((rid, m, h.step, h.value, h.timestamp))
    df = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "ts"])
    if df.empty:
        return df.drop(columns="ts")
    df = df.sort_values("ts").groupby(["run_id", "metric", "step"], as_index=False).last()
    return df.drop(columns="ts")


def _num(v: str | None) -> Any:
    if v is None:
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
