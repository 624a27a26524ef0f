"""Reading a database store (SQLite, PostgreSQL) with SQL: only the rows and columns a page
needs, a few queries per study, instead of MLflow's client building every run's full object
(all params, all tags) one by one. `runs` falls back to the client for tracking servers, file
stores and MySQL (whose reserved word `key`, MLflow's column name, these queries do not
quote, and which no test here runs); both paths give the same frames (tests/test_tune.py,
tests/test_scale.py, tests/test_postgres.py)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

# the tags load_runs turns into columns; the others (mlflow.*, ablate.driver, ...) stay unread
PROVENANCE_TAGS = {"ablate.hostname": "hostname", "ablate.git_revision": "git_revision",
                   "ablate.study_file_hash": "study_file_hash",
                   # the machine and code behind a run's timing costs (its profile's)
                   "ablate.profile_identity": "profile_identity"}
RUN_TAGS = ("ablate.trial_id", "ablate.cell_id", "ablate.grid", "ablate.status", "ablate.seed",
            "ablate.phase", "ablate.error", *PROVENANCE_TAGS)
TAG_PREFIXES = ("factor.", "optuna.")
_ENGINES: dict[str, Any] = {}
_ENGINES_LOCK = threading.Lock()


def is_database(uri: str) -> bool:
    """A store these queries read: SQLite or PostgreSQL (tested on both); not MySQL."""
    return uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql")


def engine(uri: str):
    """One pooled engine per store; for a SQLite file, per file: a store deleted and created
    again under the same path (`rm -rf mlruns`, a new run) gets a new engine, where the
    pooled connections would keep reading the deleted file (and every cache keyed by its
    change token would keep hitting) until the dashboard restarts."""
    import sqlalchemy as sa

    ident = None
    if uri.startswith("sqlite"):
        db = sa.engine.make_url(uri).database
        with contextlib.suppress(OSError, TypeError):
            st = os.stat(db)  # type: ignore[arg-type]
            ident = (st.st_dev, st.st_ino)
    with _ENGINES_LOCK:  # the dashboard's script threads: one engine per file, the old disposed
        held = _ENGINES.get(uri)
        if held is None or held[1] != ident:
            if held is not None:
                held[0].dispose()
            _ENGINES[uri] = held = (sa.create_engine(uri), ident)
        return held[0]


def read(uri: str, fn: Callable[[Any], Any]) -> Any:
    """fn(connection); a store without MLflow's tables yet (a new file, an empty database)
    gets them from MLflow's client first (it creates and migrates the schema under the store
    lock), then fn runs again. Reading never needs the client otherwise."""

    import sqlalchemy as sa

    from ablate.tracking.store import client

    try:
        with engine(uri).connect() as con:
            return fn(con)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy, pandas and each driver raise their own
        if not any(s in str(e).lower() for s in ("no such table", "does not exist",
                                                 "doesn't exist")):
            if isinstance(e, sa.exc.OperationalError):  # cannot connect: the client's error
                client(uri)                             # names the URI, password masked
            raise

    client(uri)
    with engine(uri).connect() as con:
        return fn(con)


def _in(name: str, values: Sequence[str]) -> tuple[str, dict[str, str]]:
    """` IN (:name0, :name1, ...)` and its bound values."""
    binds = {f"{name}{i}": v for i, v in enumerate(values)}
    return "(" + ", ".join(f":{k}" for k in binds) + ")", binds


def _frame(con, sql: str, params: dict[str, Any]) -> pd.DataFrame:
    """The rows of `sql` (named :params) through the driver's own cursor: SQLAlchemy's row
    objects and pandas' read_sql cost a third of the read for 100,000 tag and metric rows."""
    if con.dialect.paramstyle in ("pyformat", "format"):  # psycopg: %(name)s
        sql = re.sub(r":(\w+)", r"%(\1)s", sql)
    cur = con.connection.driver_connection.cursor()
    try:
        cur.execute(sql, params)
        names = [d[0] for d in cur.description]
        return pd.DataFrame.from_records(cur.fetchall(), columns=names)
    finally:
        cur.close()


def _experiment_id(con, study: str) -> Any:
    import sqlalchemy as sa

    row = con.execute(sa.text("SELECT experiment_id FROM experiments WHERE name = :n AND "
                              "lifecycle_stage = 'active'"), {"n": study}).fetchone()
    return None if row is None else row[0]


def _num_map(s: pd.Series, convert: Callable[[Any], Any]) -> pd.Series:
    """s.map(convert), converting each distinct value once (factor levels repeat)."""
    return s.map({v: convert(v) for v in s.dropna().unique()})


def _none_for_missing(s: pd.Series) -> pd.Series:
    """None (not NaN) where a value is missing, as the client's rows have it; numbers keep
    their dtype when none is."""
    return s.astype(object).where(s.notna(), None) if s.isna().any() else s


def load_runs(study: str, uri: str, params: bool | Sequence[str], metrics: Sequence[str] | None,
              always_params: Sequence[str], num: Callable[[Any], Any]) -> pd.DataFrame:
    """The frame `runs.load_runs` documents, in four queries: runs, the tags it reads, the
    params asked for, the latest value of the metrics asked for (None: all)."""

    def fetch(con):
        exp = _experiment_id(con, study)
        if exp is None:
            return None
        q: dict[str, Any] = {"e": exp}
        runs = _frame(con, "SELECT run_uuid, name, status, start_time, end_time FROM runs "
                      "WHERE experiment_id = :e AND lifecycle_stage = 'active'", q)
        sub = "SELECT run_uuid FROM runs WHERE experiment_id = :e AND lifecycle_stage = 'active'"
        keys, kq = _in("t", RUN_TAGS)
        pre = " OR ".join(f"substr(key, 1, {len(p)}) = '{p}'" for p in TAG_PREFIXES)
        tags = _frame(con, f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({sub}) "
                           f"AND (key IN {keys} OR {pre})", {**q, **kq})
        mq, only = {}, ""
        if metrics is not None:
            keys, mq = _in("m", list(metrics) or [""])
            only = f" AND key IN {keys}"
        mets = _frame(con, f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE "
                           f"run_uuid IN ({sub}){only}", {**q, **mq})
        pq, only = {}, ""
        if params is not True:
            keys, pq = _in("p", [*always_params, *([] if params is False else params)])
            only = f" AND key IN {keys}"
        pars = _frame(con, f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN "
                           f"({sub}){only}", {**q, **pq})
        return runs, tags, mets, pars

    got = read(uri, fetch)
    if got is None or got[0].empty:
        return pd.DataFrame()
    runs, tags, mets, pars = got
    idx = pd.Index(runs["run_uuid"], name="run_uuid")
    end = pd.to_numeric(runs["end_time"]).astype(float)
    df = pd.DataFrame({
        "run_id": runs["run_uuid"].to_numpy(), "run_name": runs["name"].to_numpy(),
        "start_time": pd.to_datetime(pd.to_numeric(runs["start_time"]), unit="ms").to_numpy(),
        "end_time": pd.to_datetime(end.where(end > 0), unit="ms").to_numpy(),
    }, index=idx)
    t = (tags.pivot(index="run_uuid", columns="key", values="value").reindex(idx)
         if not tags.empty else pd.DataFrame(index=idx))

    def tag(k: str) -> pd.Series:
        """A tag's column; None where a run lacks it (as MLflow's client gives it)."""
        if k not in t:
            return pd.Series([None] * len(idx), index=idx, dtype=object)
        return t[k].astype(object).where(t[k].notna(), None)

    df["trial_id"] = tag("ablate.trial_id")
    df["cell_id"] = tag("ablate.cell_id")
    df["grid"] = _none_for_missing(_num_map(tag("ablate.grid"), num))
    df["status"] = tag("ablate.status").fillna(runs.set_index("run_uuid")["status"].str.lower())
    df["seed"] = _none_for_missing(_num_map(tag("ablate.seed"), num))
    df["error"] = tag("ablate.error").fillna("")
    df["phase"] = tag("ablate.phase").fillna("final")
    for k, col in PROVENANCE_TAGS.items():
        df[col] = tag(k)
    cols: dict[str, pd.Series] = {}
    for k in t.columns:
        if k.startswith("factor."):
            cols[k] = _num_map(t[k], lambda v: None if v == "off" else num(v))
        elif k.startswith("optuna."):
            cols[k] = _num_map(t[k], num)
    if not pars.empty:
        p = pars.pivot(index="run_uuid", columns="key", values="value").reindex(idx)
        for k in p.columns:
            cols[f"params.{k}"] = p[k]
    if not mets.empty:
        mets["value"] = mets["value"].astype(float).where(~mets["is_nan"].astype(bool))
        m = mets.pivot(index="run_uuid", columns="key", values="value").reindex(idx)
        for k in m.columns:
            cols[k] = m[k].astype(float)
    df = pd.concat([df, pd.DataFrame(cols, index=idx)], axis=1)
    return df.sort_values("start_time", ascending=False).reset_index(drop=True)


def study_summary(uri: str) -> pd.DataFrame:
    """One grouped query: name, runs, running, last_update (ms), lease (the `ablate.lease`
    tag's JSON, or None) per active experiment but MLflow's 'Default', in MLflow's order (last
    update first). Counted are the runs a study's pages show: its final phase (a grid's or a
    search's trials; not its profiles nor its tuning searches), in one pass over the runs
    table (a join would build an index on experiment_id every time)."""
    import sqlalchemy as sa

    q = sa.text(
        "SELECT e.name AS name, c.n AS runs, c.running AS running, "
        "e.last_update_time AS last_update, l.value AS lease FROM experiments e LEFT JOIN ("
        "SELECT experiment_id, COUNT(*) AS n, "
        "SUM(CASE WHEN status = 'RUNNING' THEN 1 ELSE 0 END) AS running FROM runs "
        "WHERE lifecycle_stage = 'active' AND run_uuid NOT IN (SELECT run_uuid FROM tags "
        "WHERE key = 'ablate.phase' AND value <> 'final') GROUP BY experiment_id) c "
        "ON c.experiment_id = e.experiment_id LEFT JOIN experiment_tags l "
        "ON l.experiment_id = e.experiment_id AND l.key = 'ablate.lease' "
        "WHERE e.lifecycle_stage = 'active' AND e.name <> 'Default' "
        "ORDER BY e.last_update_time DESC, e.experiment_id DESC")
    df = read(uri, lambda con: pd.read_sql(q, con))
    return df.assign(runs=df["runs"].fillna(0).astype(int),
                     running=df["running"].fillna(0).astype(int))


def change_token(uri: str, study: str) -> tuple:
    """What changes when a study's runs do: how many, the newest start and end, how many
    still running (one pass over the runs table), and while some run, their newest metric
    timestamp (an epoch logged; a second query, on the index of latest_metrics)."""
    import sqlalchemy as sa

    exp = ("(SELECT experiment_id FROM experiments WHERE name = :n AND "
           "lifecycle_stage = 'active')")
    q = sa.text("SELECT COUNT(*), MAX(start_time), MAX(end_time), "
                "SUM(CASE WHEN status = 'RUNNING' THEN 1 ELSE 0 END) FROM runs "
                f"WHERE experiment_id = {exp} AND lifecycle_stage = 'active'")
    q_epoch = sa.text("SELECT MAX(timestamp) FROM latest_metrics WHERE run_uuid IN ("
                      f"SELECT run_uuid FROM runs WHERE experiment_id = {exp} AND "
                      "lifecycle_stage = 'active' AND status = 'RUNNING')")

    def fetch(con):
        row = tuple(con.execute(q, {"n": study}).fetchone())
        if row[3]:
            row += tuple(con.execute(q_epoch, {"n": study}).fetchone())
        return row

    return ("sql", *read(uri, fetch))


def time_token(ttl_s: float = 30.0) -> tuple:
    """A change token for stores read through the client: a new one every `ttl_s`."""
    return ("ttl", int(time.time() // ttl_s))


def curves(uri: str, run_ids: list[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per-epoch rows (run_id, metric, step, value, ts) of `run_ids`: one query per 500 runs."""
    import sqlalchemy as sa

    cols = ["run_id", "metric", "step", "value", "ts"]

    def fetch(con):
        # SQLite would walk the primary key by metric name (every run's val_acc in the store)
        # instead of the run_uuid index: `+key` takes the name out of index choice
        key = "+key" if con.dialect.name == "sqlite" else "key"
        q = sa.text("SELECT run_uuid AS run_id, key AS metric, step, value, timestamp AS ts, "
                    f"is_nan FROM metrics WHERE run_uuid IN :ids AND {key} IN :keys").bindparams(
            sa.bindparam("ids", expanding=True), sa.bindparam("keys", expanding=True))
        return [pd.read_sql(q, con, params={"ids": run_ids[i:i + 500], "keys": list(metrics)})
                for i in range(0, len(run_ids), 500)]

    parts = read(uri, fetch) if run_ids and metrics else []
    if not parts:
        return pd.DataFrame(columns=cols)
    df = pd.concat(parts, ignore_index=True)
    df["value"] = df["value"].astype(float).where(~df["is_nan"].astype(bool))
    return df[cols]
