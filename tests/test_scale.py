"""The fast read path of database stores (SQL, only the columns asked for) against MLflow's
own client on the same real store: same runs, same columns, same values; the grouped study
summary, the change token, and the curves through a real tracking server's bulk endpoint."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ablate.study import load_study
from ablate.tracking import (
    Tracker,
    _load_runs_client,
    _load_runs_sql,
    change_token,
    client,
    load_curves,
    study_summary,
)
from ablate.tracking.runs import _load_curves_client, _load_curves_sql
from tests.conftest import mlflow_server, write

STUDY = """\
name: scale
model: {dim: 16, depth: 2, heads: 2, patch_size: 4}
factors:
  model.mixer: [conv, pool]
  model.kernel_size: [null, 5]
seeds: [0, 1]
"""


def fill(uri: str, tmp: Path) -> dict[str, str]:
    """Runs in every state through ablate's Tracker (and MLflow's client for what ablate never
    writes: a NaN metric, a deleted run, a tuning-phase run, Optuna tags)."""
    study = load_study(write(tmp / "scale.yaml", STUDY))
    tr = Tracker(uri, "scale")
    ids = {}
    for i, t in enumerate(study.trials):
        rid = tr.start_run(t, study)
        ids[t.trial_id] = rid
        for epoch in (1, 2, 3):
            tr.log_metrics(rid, {"val_acc": 0.1 * epoch + 0.01 * i, "train_loss": 2.0 / epoch},
                           step=epoch)
        if i == 0:
            continue  # still running: no end time, no final metrics
        if i == 1:
            tr.set_tags(rid, {"ablate.error": "RuntimeError: out of memory"})
            tr.end_run(rid, "failed")
            continue
        tr.log_metrics(rid, {"test_acc": 0.5 + 0.01 * i, "gmacs": 1.0 + i, "params": 100.0 * i},
                       step=3)
        tr.end_run(rid, "pruned" if i == 2 else "finished")
    c = client(uri)
    rids = list(ids.values())
    c.log_metric(rids[3], "odd", float("nan"), step=3)
    c.log_metric(rids[4], "odd", float("inf"), step=3)
    c.set_tag(rids[5], "ablate.phase", "tune")
    c.set_tag(rids[5], "optuna.trial_number", "7")
    c.delete_run(rids[6])
    other = Tracker(uri, "other")
    other.end_run(other.start_run(study.trials[0], study), "finished")
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("scale")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    fill(uri, tmp)
    return uri


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert sorted(a.columns) == sorted(b.columns)
    a = a.sort_values("run_id", ignore_index=True)[sorted(a.columns)]
    b = b.sort_values("run_id", ignore_index=True)[sorted(b.columns)]
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


@pytest.mark.parametrize("params,metrics", [(True, None), (False, None),
                                            (["model.dim"], ["val_acc", "odd"]), (False, [])])
def test_sql_read_equals_the_client_read(store, params, metrics):
    fast = _load_runs_sql("scale", store, params, metrics)
    slow = _load_runs_client("scale", store, params, metrics)
    assert len(fast) == 7  # 8 trials, one deleted
    _same(fast, slow)
    assert set(fast["status"]) == {"running", "failed", "pruned", "finished"}
    assert fast["end_time"].isna().sum() == 1
    # what the verdict states (train.precision_resolved: only runs an auto profile resolved)
    wanted = {"params.train.budget", "params.train.epochs", "params.train.precision"} | (
        {"params.model.dim"} if isinstance(params, list) else set())
    have = {c for c in fast if c.startswith("params.")}
    assert have == wanted if params is not True else have > wanted
    if metrics is not None:
        assert not {"train_loss", "test_acc", "gmacs"} & set(fast.columns)


def test_nan_and_inf_metrics_read_as_mlflow_gives_them(store):
    """MLflow stores NaN as 0 with is_nan set, and inf as the largest float."""
    fast = _load_runs_sql("scale", store, False, ["odd"])["odd"]
    assert fast.isna().sum() == len(fast) - 1  # NaN, or never logged
    assert (fast == 0).sum() == 0 and fast.max() > 1e300
    ids = _load_runs_sql("scale", store, False, [])["run_id"].tolist()
    curves = _load_curves_sql(store, ids, ("odd",))["value"]
    assert len(curves) == 2 and curves.isna().sum() == 1 and curves.max() > 1e300


def test_factor_levels_and_optuna_tags_are_typed(store):
    fast = _load_runs_sql("scale", store, False, None)
    levels = set(fast["factor.model.kernel_size"])  # null: each mixer's own default
    assert 5 in levels and all(isinstance(v, int) for v in levels)
    assert fast["optuna.trial_number"].dropna().tolist() == [7]
    assert (fast["phase"] == "tune").sum() == 1


def test_study_summary_is_the_clients_view(store):
    """The picker counts the runs a study's pages show (the final phase: not its tuning or
    profile runs), and a run RUNNING while no live driver holds the study as not running
    (the pages show it killed); helper-36 found both counted."""
    from ablate.tracking.lease import StudyLease

    summary = study_summary(store)
    c = client(store)
    exps = [e for e in c.search_experiments(order_by=["last_update_time DESC"])
            if e.name != "Default"]
    assert summary["name"].tolist() == [e.name for e in exps]
    for e in exps:
        found = [r for r in c.search_runs([e.experiment_id])
                 if r.data.tags.get("ablate.phase", "final") == "final"]
        row = summary.set_index("name").loc[e.name]
        assert row["runs"] == len(found)
        assert row["running"] == 0  # no driver holds it: its running run is an orphan
    scale = c.get_experiment_by_name("scale")
    assert len(c.search_runs([scale.experiment_id])) == summary.set_index("name").loc[
        "scale", "runs"] + 1  # the tuning-phase run
    with StudyLease(c, scale.experiment_id, "scale"):  # a live driver: it is running
        assert study_summary(store).set_index("name").loc["scale", "running"] == 1
    assert study_summary(store).set_index("name").loc["scale", "running"] == 0


def test_change_token_moves_only_when_runs_change(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study(write(tmp_path / "scale.yaml", STUDY))
    tr = Tracker(uri, "scale")
    rid = tr.start_run(study.trials[0], study)
    tokens = [change_token("scale", uri)]
    tokens.append(change_token("scale", uri))
    assert tokens[0] == tokens[1]
    tr.log_metrics(rid, {"val_acc": 0.3}, step=1)  # an epoch of a running trial
    tokens.append(change_token("scale", uri))
    tr.end_run(rid, "finished")
    tokens.append(change_token("scale", uri))
    tr.start_run(study.trials[1], study)
    tokens.append(change_token("scale", uri))
    assert len(set(tokens[1:])) == 4


def test_a_new_store_file_gets_its_schema_then_reads_empty(tmp_path):
    db = tmp_path / "mlflow.db"
    db.touch()  # exists, no tables yet
    uri = f"sqlite:///{db}"
    assert study_summary(uri).empty
    assert _load_runs_sql("nothing", uri, False, None).empty


@pytest.fixture(scope="module")
def server(store):
    """A real `mlflow server` in front of the same SQLite store."""
    yield from mlflow_server(store)


def test_curves_through_a_server_equal_the_sql_read(store, server):
    ids = _load_runs_sql("scale", store, False, [])["run_id"].tolist()
    metrics = ("val_acc", "train_loss", "odd")
    key = ["run_id", "metric", "step", "ts"]
    fast = _load_curves_sql(store, ids, metrics).sort_values(key, ignore_index=True)
    bulk = _load_curves_client(server, ids, metrics).sort_values(key, ignore_index=True)
    assert len(fast) == 7 * 3 * 2 + 2
    pd.testing.assert_frame_equal(fast, bulk, check_dtype=False)
    a = load_curves("scale", store, ids, metrics)
    b = load_curves("scale", server, ids, metrics)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    _same(_load_runs_sql("scale", store, False, None),
          _load_runs_client("scale", server, False, None))
    assert study_summary(server)["name"].tolist() == study_summary(store)["name"].tolist()


def test_holm_gives_statsmodels_numbers():
    """ablate's Holm adjustment (no gc.collect per call) equals statsmodels' exactly."""
    import numpy as np
    from statsmodels.stats.multitest import multipletests

    from ablate.analysis.seeds import holm

    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 300):
        p = rng.random(n) ** 3
        p[:: max(1, n // 3)] = 1.0  # ties, and values the adjustment clips at 1
        assert np.array_equal(holm(p), multipletests(p, method="holm")[1])
    p = np.array([0.01, np.nan, 0.2])
    assert np.array_equal(holm(p), multipletests(p, method="holm")[1], equal_nan=True)


def test_a_store_file_replaced_under_the_same_path_is_read_anew(tmp_path):
    """The pooled engine kept the first file's connections open, so after `rm -rf mlruns`
    and a new run the dashboard went on reading the deleted store (and its change token
    never moved, so every cache hit) until it restarted (helper-36)."""
    import subprocess
    import sys

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    old = load_study(write(tmp_path / "scale.yaml", STUDY))
    Tracker(uri, "scale").start_run(old.trials[0], old)
    assert study_summary(uri)["name"].tolist() == ["scale"]
    token = change_token("scale", uri)
    for f in tmp_path.glob("mlflow.db*"):  # rm -rf mlruns
        f.unlink()
    write(tmp_path / "fresh.yaml", STUDY.replace("name: scale", "name: fresh"))
    subprocess.run([sys.executable, "-c", (  # the next `ablate run`, into the same path
        "import sys; from ablate.study import load_study; from ablate.tracking import Tracker\n"
        "s = load_study(sys.argv[1]); tr = Tracker(sys.argv[2], 'fresh')\n"
        "for t in s.trials[:3]: tr.start_run(t, s)"), str(tmp_path / "fresh.yaml"), uri],
        check=True)
    assert study_summary(uri)["name"].tolist() == ["fresh"]
    assert len(_load_runs_sql("fresh", uri, False, None)) == 3
    assert change_token("scale", uri) != token


def test_the_sql_fast_path_reads_only_the_databases_it_is_tested_on():
    """SQLite and PostgreSQL (tests/test_postgres.py) take the SQL path; MySQL, where `key`
    (MLflow's column name, unquoted in these queries) is a reserved word, and servers take
    MLflow's client."""
    from ablate.tracking.sqlread import is_database

    assert is_database("sqlite:////tmp/m.db") and is_database("postgresql+psycopg://u@h/db")
    assert not is_database("mysql+pymysql://u@h/db") and not is_database("mysql://u@h/db")
    assert not is_database("http://127.0.0.1:5000") and not is_database("file:///tmp/mlruns")
