"""PostgreSQL behind a real `mlflow server`, and as Optuna's storage; the server path gives
the same runs, params and metrics as the local SQLite path."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ablate.study import load_study
from ablate.tracking import load_curves, load_runs
from ablate.tune.driver import run_study
from tests.conftest import free_port, needs_service, write
from tests.conftest import mlflow_server as start_mlflow_server

PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = [pytest.mark.postgres]
needs_postgres = needs_service((PG_BIN / "initdb").exists(),
                               "Debian's postgresql (apt-get install -y postgresql; .ci/run "
                               "installs it)")



def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user."""
    if os.geteuid() != 0:
        return cmd
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]


@pytest.fixture(scope="module")
def postgres():
    base = Path(tempfile.mkdtemp(prefix="ablate-pg-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U",
                                 "ablate"]), check=True, capture_output=True)
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l",
                                 str(base / "log"), "-w", "-o",
                                 f"'-p {port} -k {base} -c listen_addresses=127.0.0.1'",
                                 "start"]), check=True, capture_output=True)
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={port} user=ablate dbname=postgres",
                         autocommit=True) as con:
        con.execute("CREATE DATABASE mlflow")
        con.execute("CREATE DATABASE optuna")  # Optuna cannot share MLflow's database
    yield f"postgresql+psycopg://ablate@127.0.0.1:{port}"
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast",
                                 "stop"]), capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres):
    art = Path(tempfile.mkdtemp(prefix="ablate-art-"))
    yield from start_mlflow_server(f"{postgres}/mlflow", "--artifacts-destination", str(art),
                             "--serve-artifacts")
    shutil.rmtree(art, ignore_errors=True)


STUDY = """\
name: pgstudy
dataset: {name: synthetic, image_size: 16, train_size: 240, test_size: 80}
model: {dim: 16, depth: 2, heads: 2, patch_size: 4, window_size: 2}
train: {epochs: 2, batch_size: 32, eval_batch_size: 128, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.2}
factors:
  model.mixer: [mlp, conv]
seeds: [0]
resources: {cpus_per_trial: 1, max_concurrent: 2}
"""
SAME = ("val_acc", "best_val_acc", "test_acc", "test_loss", "params", "gmacs",
        "train_images")


@needs_postgres
def test_server_on_postgres_gives_the_same_runs_as_local(mlflow_server, tmp_path):
    study = load_study(write(tmp_path / "s.yaml", STUDY))
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_study(study, local)
    run_study(study, mlflow_server)
    a = load_runs("pgstudy", local).set_index("trial_id").sort_index()
    b = load_runs("pgstudy", mlflow_server).set_index("trial_id").sort_index()
    assert list(a.index) == list(b.index) and len(a) == 2
    assert set(b["status"]) == {"finished"}
    params = sorted(c for c in a.columns if c.startswith("params."))
    assert params == sorted(c for c in b.columns if c.startswith("params."))
    assert (a[params] == b[params]).all().all()
    for m in SAME:
        assert a[m].tolist() == pytest.approx(b[m].tolist(), rel=1e-6), m
    ca = load_curves("pgstudy", local, list(a["run_id"]), metrics=("train_loss", "val_acc"))
    cb = load_curves("pgstudy", mlflow_server, list(b["run_id"]),
                     metrics=("train_loss", "val_acc"))
    ida = dict(zip(a["run_id"], a.index, strict=True))
    idb = dict(zip(b["run_id"], b.index, strict=True))
    ka = sorted((ida[r], m, s, round(v, 6)) for r, m, s, v in ca.itertuples(index=False))
    kb = sorted((idb[r], m, s, round(v, 6)) for r, m, s, v in cb.itertuples(index=False))
    assert ka == kb
    # artifacts are served by the server
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    arts = {x.path for x in c.list_artifacts(b["run_id"].iloc[0])}
    assert "trial_config.yaml" in arts
    # and running again against the server adds nothing
    again = run_study(study, mlflow_server)
    assert again.skipped == 2 and again.finished == 0


@needs_postgres
def test_optuna_storage_on_postgres(postgres, tmp_path):
    import optuna

    from ablate.search import open_storage, study_name

    text = STUDY.replace("factors:\n  model.mixer: [mlp, conv]\n", f"""search:
  method: optuna
  sampler: random
  n_trials: 3
  objectives: {{val_acc: max}}
  space:
    train.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
    model.mixer: [mlp, conv]
  storage: {postgres}/optuna
""")
    study = load_study(write(tmp_path / "o.yaml", text))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_study(study, uri)
    st = optuna.load_study(study_name=study_name(study.spec),
                           storage=open_storage(f"{postgres}/optuna"))
    done = [t for t in st.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    df = load_runs("pgstudy", uri)
    for t in done:
        runs = df[df["optuna.trial_number"] == t.number]
        assert t.values[0] == pytest.approx(runs["val_acc"].mean())


@needs_postgres
def test_sql_read_of_postgres_equals_the_servers_client_read(postgres, mlflow_server, tmp_path):
    """The SQL fast path on the PostgreSQL database itself gives what MLflow's client gives
    through the server in front of it: runs, the study summary, curves; the token moves."""
    import pandas as pd

    from ablate.tracking import (
        Tracker,
        _load_runs_client,
        _load_runs_sql,
        change_token,
        study_summary,
    )
    from ablate.tracking.runs import _load_curves_client, _load_curves_sql

    study = load_study(write(tmp_path / "s.yaml", STUDY.replace("name: pgstudy",
                                                               "name: pgscale")))
    db = f"{postgres}/mlflow"
    tr = Tracker(mlflow_server, "pgscale")
    before = change_token("pgscale", db)
    for i, t in enumerate(study.trials):
        rid = tr.start_run(t, study)
        tr.log_metrics(rid, {"val_acc": 0.3 + i, "train_loss": 1.0}, step=1)
        tr.log_metrics(rid, {"test_acc": 0.5 + i, "gmacs": 1.0}, step=1)
        tr.end_run(rid, "finished" if i else "failed")
    assert change_token("pgscale", db) != before
    for params, metrics in ((True, None), (False, ["val_acc", "gmacs"])):
        a = _load_runs_sql("pgscale", db, params, metrics)
        b = _load_runs_client("pgscale", mlflow_server, params, metrics)
        assert len(a) == 2 and sorted(a.columns) == sorted(b.columns)
        a = a.sort_values("run_id", ignore_index=True)[sorted(a.columns)]
        b = b.sort_values("run_id", ignore_index=True)[sorted(b.columns)]
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    summary = study_summary(db).set_index("name")
    assert summary.loc["pgscale", "runs"] == 2 and summary.loc["pgscale", "running"] == 0
    assert list(summary.index) == study_summary(mlflow_server)["name"].tolist()
    ids = list(a["run_id"])
    key = ["run_id", "metric", "step", "ts"]
    ca = _load_curves_sql(db, ids, ("val_acc", "train_loss")).sort_values(key, ignore_index=True)
    cb = _load_curves_client(mlflow_server, ids, ("val_acc", "train_loss")).sort_values(
        key, ignore_index=True)
    assert len(ca) == 4
    pd.testing.assert_frame_equal(ca, cb, check_dtype=False)
