"""Reading a study's runs back: one row per run (`load_runs`), per-epoch curves
(`load_curves`), the studies in a store. Serves `ablate status`, the analysis and the dashboard."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ablate.tracking.store import (
    EPOCH_METRICS,
    _search_all,
    client,
    default_tracking_uri,
    sqlite_store_exists,
)

# Tags read back as plain columns: where and from what each run came (report provenance).
PROVENANCE_TAGS = {"ablate.hostname": "hostname", "ablate.git_revision": "git_revision",
                   "ablate.study_file_hash": "study_file_hash"}
# params every load returns, params=False included: what the verdict must state (the budget)
ALWAYS_PARAMS = ("train.budget", "train.epochs")


def list_studies(uri: str) -> list[str]:
    """Names of the experiments in a store that hold ablate runs (newest first)."""
    if not sqlite_store_exists(uri):
        return []
    c = client(uri)
    exps = c.search_experiments(order_by=["last_update_time DESC"])
    return [e.name for e in exps if e.name != "Default"]


def load_runs(study: str, uri: str | None = None, params: bool = True,
              phase: str | None = "final") -> pd.DataFrame:
    """One row per run: run_id, trial_id, cell_id (seeds of one configuration share it), grid
    (index of the factor grid), status, seed, factor.<key> columns (typed where
    numeric), params.<key> (unless params=False), final metrics, start/end time. Empty frame
    if no such study. Only runs of `phase` (`final`: the grid's, what analysis uses; `tune`: a
    tuning phase's; None: all), with a `phase` column. Database stores are read with three
    SQL queries (what a 5,000-run dashboard needs); a tracking server through MLflow's
    client."""
    uri = uri or default_tracking_uri()
    if not sqlite_store_exists(uri):
        return pd.DataFrame()
    if _is_database(uri):
        client(uri)  # creates/migrates the schema (under the store lock) if needed
        df = _load_runs_sql(study, uri, params)
    else:
        df = _load_runs_client(study, uri, params)
    if df.empty or phase is None:
        return df
    return df[df["phase"] == phase].reset_index(drop=True)


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
            if params or k in ALWAYS_PARAMS:
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
        only = "" if params else " AND key IN (" + ", ".join(
            f"'{k}'" for k in ALWAYS_PARAMS) + ")"
        pars = pd.read_sql(sa.text(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN "
                                   f"({sub}){only}"), con, params=q)
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
    df["cell_id"] = t.get("ablate.cell_id", pd.Series(dtype=object)).reindex(df.index)
    df["grid"] = t.get("ablate.grid", pd.Series(dtype=object)).reindex(df.index).map(_num)
    mlflow_status = runs.set_index("run_uuid")["status"].str.lower()
    df["status"] = t.get("ablate.status", pd.Series(dtype=object)).reindex(df.index)
    df["status"] = df["status"].fillna(mlflow_status)
    df["seed"] = t.get("ablate.seed", pd.Series(dtype=object)).reindex(df.index).map(_num)
    df["error"] = t.get("ablate.error", pd.Series(dtype=object)).reindex(df.index).fillna("")
    df["phase"] = t.get("ablate.phase", pd.Series(dtype=object)).reindex(df.index).fillna("final")
    for tag, col in PROVENANCE_TAGS.items():
        df[col] = t.get(tag, pd.Series(dtype=object)).reindex(df.index)
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


def _is_database(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql")


def load_curves(study: str, uri: str | None = None, run_ids: list[str] | None = None,
                metrics: tuple[str, ...] = EPOCH_METRICS) -> pd.DataFrame:
    """Per-epoch metrics: columns run_id, metric, step, value (last value per step). A
    database store is read with one SQL query per 500 runs, not one call per run and metric."""
    uri = uri or default_tracking_uri()
    if not sqlite_store_exists(uri):
        return pd.DataFrame(columns=["run_id", "metric", "step", "value"])
    if run_ids is None:
        df = load_runs(study, uri, params=False)
        run_ids = [] if df.empty else df["run_id"].tolist()
    if _is_database(uri):
        client(uri)  # creates/migrates the schema (under the store lock) if needed
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
    c = client(uri)
    rows = [(rid, m, h.step, h.value, h.timestamp) for rid in run_ids for m in metrics
            for h in c.get_metric_history(rid, m)]
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "ts"])


def _load_curves_sql(uri: str, run_ids: list[str], metrics: tuple[str, ...]) -> pd.DataFrame:
    import sqlalchemy as sa

    parts = []
    with _engine(uri).connect() as con:
        for i in range(0, len(run_ids), 500):
            q = sa.text("SELECT run_uuid AS run_id, key AS metric, step, value, timestamp AS ts "
                        "FROM metrics WHERE run_uuid IN :ids AND key IN :keys").bindparams(
                sa.bindparam("ids", expanding=True), sa.bindparam("keys", expanding=True))
            parts.append(pd.read_sql(q, con, params={"ids": run_ids[i:i + 500],
                                                     "keys": list(metrics)}))
    cols = ["run_id", "metric", "step", "value", "ts"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def _num(v: str | None) -> Any:
    if v is None:
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
