"""MLflow stores: tracking URIs, opening a store safely, one experiment per study, one run per
trial (`Tracker`). Every write of a study goes through one writer in the driver
(`ablate.tracking.writer`), so a SQLite store sees one writing process."""

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

from ablate.errors import TrackingError, mask_url

DONE = ("finished", "pruned")  # a trial in one of these is never run again
FINAL_METRICS = ("val_acc", "best_val_acc", "test_acc", "test_loss", "params", "gmacs",
                 "throughput_img_s", "latency_ms", "train_img_s", "train_time_s",
                 "peak_mem_mb", "train_images", "train_steps", "train_images_seen",
                 "train_time_alone_s",
                 # the batch its profile timed training at: on the trials of an ablate whose
                 # profiles time it as the trials train (their batch and threads), absent on
                 # older ones, whose train_time_alone_s is not comparable (analysis.verdict)
                 "profile_train_batch_size")
# what a cost profile adds besides the FINAL_METRICS it fills (timing spreads, its batch)
PROFILE_METRICS = ("throughput_img_s_iqr", "latency_ms_iqr", "train_img_s_iqr",
                   "profile_batch_size", "compile_s")
EPOCH_METRICS = ("epoch", "train_loss", "val_loss", "val_acc", "lr", "epoch_time_s")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


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
            return os.environ.get("ABLATE_GIT_REVISION") or "unknown"  # an image: no .git
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=5)
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ABLATE_GIT_REVISION") or "unknown"


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
    _reachable(uri)
    for attempt in range(5):
        try:
            if uri.startswith("sqlite:///"):  # as MLflow would: so that the lock can be taken
                Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            with store_lock(uri):
                _from_template(uri)
                c = MlflowClient(tracking_uri=uri)
                c.search_experiments(max_results=1)
                use_wal(uri)
            return c
        except Exception as e:  # noqa: BLE001 - every backend raises its own kind
            # a second process creating the same new SQLite store races on its schema
            racing = ("already exists", "migration", "database is locked", "no such table")
            if any(r in str(e) for r in racing) and attempt < 4:
                time.sleep(1.0)
                continue
            raise _cannot_open(uri, e) from None
    raise AssertionError("unreachable")


def _cannot_open(uri: str, e: BaseException) -> TrackingError:
    msg = str(e).splitlines()[0][:300]
    return TrackingError(f"tracking uri {mask_url(uri)}: cannot open the MLflow store "
                         f"({mask_url(msg)}); "
                         "check --tracking-uri / ABLATE_TRACKING_URI / tracking.uri")


# connect-timeout arguments of the database drivers MLflow's SQL store takes
_CONNECT_TIMEOUT = {"postgresql": {"connect_timeout": 10}, "mysql": {"connect_timeout": 10}}


def _reachable(uri: str) -> None:
    """One plain connection to a database server before MLflow's client opens it: MLflow
    retries a refused connection for about 100 s, so a wrong host or port would stall
    every command that long before its one-line error."""
    dialect = uri.split(":", 1)[0].split("+", 1)[0]
    if dialect not in _CONNECT_TIMEOUT:
        return
    import sqlalchemy as sa

    try:
        eng = sa.create_engine(uri, poolclass=sa.pool.NullPool,
                               connect_args=_CONNECT_TIMEOUT[dialect])
    except ModuleNotFoundError:  # no driver here: MLflow's client says what to install
        return
    try:
        with eng.connect():
            pass
    except sa.exc.OperationalError as e:  # refused, timed out, bad password, no database
        raise _cannot_open(uri, e.orig if e.orig is not None else e) from None
    finally:
        eng.dispose()


def _template_path() -> Path:
    """Where the empty store of this MLflow and SQLAlchemy version is kept."""
    import mlflow
    import sqlalchemy

    from ablate.cache import cache_dir

    return cache_dir() / f"mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}-empty.db"


def _template_revision(path: Path) -> str | None:
    """The schema revision of a sound SQLite file, else None (missing, damaged, not MLflow's)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as con:  # escaped: '#', '?', '%'
            if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                return None
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    return rows[0][0] if len(rows) == 1 else None


_template_failed = False  # making the template failed in this process: not tried again


def _schema_template() -> Path:
    """An empty SQLite store at MLflow's newest schema revision, made once per machine and
    version: MLflow's migrations take 3 to 4 s of Python for every new store (each test, each
    study into a new file). Made by MLflow's own table set-up (what it runs on a new file),
    so it has no experiment: MLflow adds its default experiment (with the new store's own
    artifact location and time) when it opens a copy, as for a new file. A template that is
    damaged or not at MLflow's newest revision is made again."""
    import uuid

    import sqlalchemy as sa
    from mlflow.store.db import utils as db_utils

    head = db_utils._get_latest_schema_revision()
    path = _template_path()
    if _template_revision(path) == head:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:  # an unwritable cache fails here, at once, not in MLflow's connection retries
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        engine = sa.create_engine(sa.engine.URL.create("sqlite", database=str(tmp)),
                                  poolclass=sa.pool.NullPool)  # a path with '?' stays one
        try:
            db_utils._initialize_tables(engine)
        finally:
            engine.dispose()
        if _template_revision(tmp) != head:
            raise RuntimeError(f"{tmp}: not at MLflow's schema revision {head}")
        os.replace(tmp, path)  # another process making it at once is as good
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _from_template(uri: str) -> None:
    """A SQLite store that does not exist yet starts as a copy of the schema template (under
    the store's lock); where the template cannot be made or copied (an unwritable cache, a
    file system without hard links, another MLflow), MLflow migrates the new file itself, as
    before; where the template cannot be made, this process does not try it again."""
    global _template_failed
    if _template_failed or not uri.startswith("sqlite:///"):
        return
    import shutil
    import uuid

    db = Path(uri[len("sqlite:///"):])
    if db.exists() or not db.parent.is_dir():
        return
    try:
        template = _schema_template()
    except Exception:  # noqa: BLE001 - no template here: MLflow creates the stores
        _template_failed = True
        return
    tmp = db.with_name(f".{db.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(template, tmp)
        os.link(tmp, db)  # never over a store that appeared meanwhile (another program's)
    except Exception:  # noqa: BLE001 - this copy failed (a full disk, no hard links, the
        pass  # store made meanwhile): MLflow creates or opens the store
    finally:
        tmp.unlink(missing_ok=True)


def use_wal(uri: str) -> None:
    """Put a SQLite store in write-ahead-log mode (it persists in the file): readers (the
    dashboard, `ablate status`) then never block the study's writer, nor it them."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as con:
            con.execute("PRAGMA journal_mode=WAL")


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
        self.run_tags: dict[str, str] = {}  # added to every run this tracker starts

    def done_trial_ids(self) -> set[str]:
        return _done_trial_ids(self.client, self.experiment_id)

    def start_run(self, trial: Any, study: Any, extra_tags: dict[str, str] | None = None,
                  extra_params: dict[str, str] | None = None) -> str:
        from mlflow.entities import RunTag

        tags = {"ablate.study": study.spec.name, "ablate.trial_id": trial.trial_id,
                "ablate.cell_id": trial.cell_id, "ablate.grid": str(trial.grid),
                "ablate.phase": "final", "ablate.status": "running",
                "ablate.git_revision": git_revision(),
                "ablate.study_file_hash": study.file_hash, "ablate.seed": str(trial.seed),
                "ablate.attempts": "1"}
        for k, v in trial.factors.items():
            tags[f"factor.{k}"] = "off" if v is None else str(v)
        tags.update(self.run_tags)
        tags.update(extra_tags or {})
        run = self.client.create_run(self.experiment_id, run_name=trial.run_name, tags=tags)
        rid = run.info.run_id
        self.log_params(rid, {**flatten(trial.config), **(extra_params or {})})
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

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """In batches of 100 (MLflow's limit per call), each value cut to MLflow's 6,000
        characters."""
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[i:i + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def end_run(self, run_id: str, status: str) -> None:
        """status: finished, pruned, failed or killed; MLflow's own status follows."""
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


def _done_trial_ids(c, experiment_id: str) -> set[str]:
    """Trial ids with a finished or pruned run of the grid (phase final) in the experiment:
    a tuning run never stands in for a final one."""
    return {r.data.tags["ablate.trial_id"] for r in _search_all(c, [experiment_id])
            if "ablate.trial_id" in r.data.tags and r.data.tags.get("ablate.status") in DONE
            and r.data.tags.get("ablate.phase", "final") == "final"}


def done_trial_ids(uri: str, experiment: str) -> set[str]:
    """Trial ids already done in a study's experiment; creates nothing (a store or experiment
    that does not exist yet has none)."""
    if not sqlite_store_exists(uri):
        return set()
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    return set() if exp is None else _done_trial_ids(c, exp.experiment_id)
