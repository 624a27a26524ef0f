"""`ablate run` end to end: real Ray, real MLflow (SQLite in a temp dir)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ablate.study import load_study
from ablate.tracking import EPOCH_METRICS, load_curves, load_runs
from ablate.tune.driver import run_study
from tests.conftest import free_port, signal_and_wait, wait_http, write

pytestmark = pytest.mark.slow

SMOKE = """\
name: smoke
dataset: {name: synthetic, image_size: 16, train_size: 240, test_size: 80}
model: {dim: 16, depth: 2, heads: 2, patch_size: 4, window_size: 2}
train: {epochs: 2, batch_size: 32, eval_batch_size: 128, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.2}
factors:
  model.mixer: [attention, mlp, conv, dual, pool, identity]
seeds: [0]
resources: {cpus_per_trial: 1, max_concurrent: 2}
failures: {max_retries: 1}
"""

FINAL = ("val_acc", "best_val_acc", "test_acc", "params", "gmacs", "throughput_img_s",
         "latency_ms", "train_img_s", "train_time_s", "peak_mem_mb", "train_time_alone_s")



def runs_of(uri: str, name: str):
    df = load_runs(name, uri)
    return df


def test_smoke_study_all_mixers_then_idempotent(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study(write(tmp_path / "smoke.yaml", SMOKE))
    summary = run_study(study, uri)
    assert summary.finished == 6 and summary.failed == 0
    df = runs_of(uri, "smoke")
    assert len(df) == 6
    assert set(df["trial_id"]) == {t.trial_id for t in study.trials}
    assert set(df["status"]) == {"finished"}
    assert set(df["factor.model.mixer"]) == {"attention", "mlp", "conv", "dual", "pool",
                                             "identity"}
    for m in FINAL:
        assert df[m].notna().all(), m
        assert (df[m] >= 0).all(), m
    assert (df["params"] > 0).all() and (df["gmacs"] > 0).all()
    # identity mixing has no token-mixing weights: fewest parameters of all six
    assert df.loc[df["params"].idxmin(), "factor.model.mixer"] == "identity"
    curves = load_curves("smoke", uri)
    for m in EPOCH_METRICS:
        sub = curves[curves["metric"] == m]
        assert sorted(sub.groupby("run_id")["step"].apply(list).iloc[0]) == [1, 2], m
    # tags and params the dashboard and users rely on
    c = MlflowClient(uri)
    run = c.get_run(df["run_id"].iloc[0])
    for tag in ("ablate.study", "ablate.trial_id", "ablate.status", "ablate.git_revision",
                "factor.model.mixer"):
        assert tag in run.data.tags
    assert run.data.params["model.dim"] == "16"
    # status and dry-run see the finished study; running it again adds no run
    from typer.testing import CliRunner

    from ablate.cli import app

    cli = CliRunner()
    st = cli.invoke(app, ["status", str(tmp_path / "smoke.yaml"), "--tracking-uri", uri,
                          "--json"])
    assert st.exit_code == 0, st.output
    info = json.loads(st.stdout)
    assert info["counts"]["finished"] == 6 and info["counts"]["pending"] == 0
    assert info["best"]["val_acc"] == pytest.approx(df["val_acc"].max())
    dry = cli.invoke(app, ["run", str(tmp_path / "smoke.yaml"), "--tracking-uri", uri,
                           "--dry-run"])
    assert dry.exit_code == 0 and "0 to run, 6 skipped" in dry.output
    assert dry.output.count("  skip  ") == 6
    again = run_study(study, uri)
    assert again.skipped == 6 and again.finished == 0
    assert len(runs_of(uri, "smoke")) == 6


def test_adding_a_seed_runs_only_new_trials(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]", "[mlp, identity]")
    s1 = load_study(write(tmp_path / "s1.yaml", one))
    run_study(s1, uri)
    first = set(runs_of(uri, "smoke")["run_id"])
    assert len(first) == 2
    s2 = load_study(write(tmp_path / "s2.yaml", one.replace("seeds: [0]", "seeds: [0, 1]")))
    summary = run_study(s2, uri)
    assert summary.skipped == 2 and summary.finished == 2
    df = runs_of(uri, "smoke")
    assert len(df) == 4 and first <= set(df["run_id"])
    assert sorted(df["seed"]) == [0, 0, 1, 1]
    assert df["trial_id"].is_unique


def test_failing_trial_is_retried_recorded_and_does_not_stop_the_study(ray_session, tmp_path,
                                                                       monkeypatch, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]",
                         "[mlp, identity, pool]")
    study = load_study(write(tmp_path / "f.yaml", text))
    by_mixer = {t.factors["model.mixer"]: t.trial_id for t in study.trials}
    fault = tmp_path / "faults.json"
    # mlp fails once then succeeds on its retry; identity fails on every attempt
    fault.write_text(json.dumps({by_mixer["mlp"]: {"epoch": 1, "times": 1},
                                 by_mixer["identity"]: {"epoch": 2, "times": 99}}))
    monkeypatch.setenv("ABLATE_FAULT_FILE", str(fault))
    monkeypatch.delenv("TUNE_PRINT_ALL_TRIAL_ERRORS", raising=False)
    with caplog.at_level("ERROR", logger="ray.tune"):
        summary = run_study(study, uri)
    assert summary.finished == 2 and summary.failed == 1
    # each attempt's traceback is the run's artifact (below), not 30 lines on the console
    assert not [r for r in caplog.records if "Trial task failed" in r.getMessage()
                or "Trials did not complete" in r.getMessage()]
    df = runs_of(uri, "smoke").set_index("factor.model.mixer")
    assert df.loc["mlp", "status"] == "finished"
    assert df.loc["pool", "status"] == "finished"
    assert df.loc["identity", "status"] == "failed"
    assert "injected fault at epoch 2" in df.loc["identity", "error"]
    c = MlflowClient(uri)
    fail_run = c.get_run(df.loc["identity", "run_id"])
    assert fail_run.info.status == "FAILED"
    assert fail_run.data.tags["ablate.attempts"] == "2"  # max_retries: 1 -> two attempts
    arts = {a.path for a in c.list_artifacts(df.loc["identity", "run_id"])}
    assert {"error_attempt1.txt", "error_attempt2.txt", "trial_config.yaml"} <= arts
    text = Path(c.download_artifacts(df.loc["identity", "run_id"], "error_attempt2.txt",
                                     str(tmp_path))).read_text()
    assert "RuntimeError: injected fault" in text
    mlp_run = c.get_run(df.loc["mlp", "run_id"])
    assert mlp_run.data.tags["ablate.attempts"] == "2"
    assert "error_attempt1.txt" in {a.path for a in c.list_artifacts(mlp_run.info.run_id)}
    # a re-run retries only the failed trial
    monkeypatch.delenv("ABLATE_FAULT_FILE")
    again = run_study(study, uri)
    assert again.skipped == 2 and again.finished == 1


def test_diverging_trial_fails_with_reason(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]", "[mlp]").replace(
        "epochs: 2,", "epochs: 2, lr: 1.0e+12, grad_clip: null,").replace(
        "max_retries: 1", "max_retries: 0")
    study = load_study(write(tmp_path / "d.yaml", text))
    summary = run_study(study, uri)
    assert summary.failed == 1
    df = runs_of(uri, "smoke")
    assert df["status"].tolist() == ["failed"]
    assert df["error"].iloc[0].startswith("diverged at epoch ")


def test_dry_run_on_a_new_store_creates_nothing(tmp_path):
    from typer.testing import CliRunner

    from ablate.cli import app

    path = write(tmp_path / "smoke.yaml", SMOKE)
    res = CliRunner().invoke(app, ["run", str(path), "--tracking-uri",
                                   f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", "--dry-run"])
    assert res.exit_code == 0 and "6 to run, 0 skipped" in res.output
    assert res.output.count("  run   ") == 6
    assert not (tmp_path / "new").exists()



def test_mlflow_server_sees_runs(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]", "[conv]")
    run_study(load_study(write(tmp_path / "m.yaml", text)), uri)
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", proc)
        c = MlflowClient(base)
        exp = c.get_experiment_by_name("smoke")
        # the trial's run (the experiment also holds the architecture's profile run)
        runs = c.search_runs([exp.experiment_id], "tags.`ablate.phase` = 'final'")
        assert len(runs) == 1
        assert len(c.search_runs([exp.experiment_id], "tags.`ablate.phase` = 'profile'")) == 1
        r = runs[0]
        assert r.data.tags["factor.model.mixer"] == "conv"
        assert r.data.params["model.mixer"] == "conv"
        hist = c.get_metric_history(r.info.run_id, "val_acc")
        assert [h.step for h in hist] == [1, 2]
        assert r.data.metrics["test_acc"] >= 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ctrl_c_marks_running_trials_killed_and_rerun_resumes(tmp_path):
    import signal

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # epochs enough that neither trial can finish before the signal: at 60 the identity trial
    # (about 50 ms an epoch here) once finished while the other actor was still starting
    text = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]", "[mlp, identity]"
                         ).replace("epochs: 2,", "epochs: 5000,")
    path = write(tmp_path / "k.yaml", text)
    exe = Path(sys.executable).with_name("ablate")
    proc = subprocess.Popen([str(exe), "run", str(path), "--tracking-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while True:  # wait until both trials have logged an epoch
            df = load_runs("smoke", uri) if (tmp_path / "mlflow.db").exists() else None
            if df is not None and len(df) == 2 and "val_acc" in df and df["val_acc"].notna().all():
                break
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        output = signal_and_wait(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    df = load_runs("smoke", uri)
    assert sorted(df["status"]) == ["killed", "killed"]
    c = MlflowClient(uri)
    assert {c.get_run(r).info.status for r in df["run_id"]} == {"KILLED"}
    # the next run picks the killed trials up (short epochs this time: a new config, so
    # instead check the plan of the same study)
    from ablate.tune.driver import plan_run

    todo, skipped = plan_run(load_study(path), uri)
    assert len(todo) == 2 and not skipped


def test_sql_fast_path_matches_mlflow_client(ray_session, tmp_path):
    """load_runs reads database stores with SQL; it must equal MLflow's own client view."""
    from ablate.tracking import _load_runs_client, _load_runs_sql

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]", "[mlp, pool]")
    run_study(load_study(write(tmp_path / "q.yaml", text)), uri)
    fast, slow = _load_runs_sql("smoke", uri, True), _load_runs_client("smoke", uri, True)
    # both read every phase: the 2 trials' runs and the 2 architectures' profile runs
    assert sorted(fast["phase"]) == ["final", "final", "profile", "profile"]
    assert sorted(fast.columns) == sorted(slow.columns)
    fast = fast.sort_values("run_id", ignore_index=True)[sorted(fast.columns)]
    slow = slow.sort_values("run_id", ignore_index=True)[sorted(slow.columns)]
    import pandas as pd

    # a tag a run lacks (a profile run has no cell id) is missing either way: None or NaN
    fast, slow = (d.astype(object).where(d.notna(), None) for d in (fast, slow))

    pd.testing.assert_frame_equal(fast, slow, check_dtype=False, check_like=True)
    from ablate.tracking.runs import _load_curves_client, _load_curves_sql

    ids = list(fast["run_id"])
    key = ["run_id", "metric", "step", "ts"]
    cf = _load_curves_sql(uri, ids, EPOCH_METRICS).sort_values(key, ignore_index=True)
    cs = _load_curves_client(uri, ids, EPOCH_METRICS).sort_values(key, ignore_index=True)
    assert len(cf) >= 2 * 2 * 4  # 2 runs x 2 epochs x several metrics
    pd.testing.assert_frame_equal(cf, cs, check_dtype=False)


def test_same_study_twice_gives_identical_results(ray_session, tmp_path):
    """Seeds cover everything (weights' init included), even on reused trial actors."""
    text = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]", "[mlp, conv, pool]")
    study = load_study(write(tmp_path / "r.yaml", text))
    a_uri, b_uri = (f"sqlite:///{tmp_path / n}" for n in ("a.db", "b.db"))
    run_study(study, a_uri)
    run_study(study, b_uri)
    cols = ["val_acc", "test_acc", "test_loss", "best_val_acc"]
    a = runs_of(a_uri, "smoke").set_index("trial_id").sort_index()[cols]
    b = runs_of(b_uri, "smoke").set_index("trial_id").sort_index()[cols]
    assert a.equals(b)


def test_edited_base_config_gives_two_cells_not_two_seeds(ray_session, tmp_path):
    """Same factors and seed, a different train.lr: two configurations, so two cells."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = SMOKE.replace("[attention, mlp, conv, dual, pool, identity]", "[mlp]")
    run_study(load_study(write(tmp_path / "a.yaml", one)), uri)
    edited = one.replace("warmup_epochs: 0.2}", "warmup_epochs: 0.2, lr: 0.003}")
    assert edited != one
    s2 = load_study(write(tmp_path / "b.yaml", edited))
    run_study(s2, uri)
    df = runs_of(uri, "smoke")
    assert len(df) == 2 and set(df["factor.model.mixer"]) == {"mlp"}
    assert df["cell_id"].nunique() == 2, "runs of an edited study must not merge as seeds"
    assert set(df["cell_id"]) >= {s2.trials[0].cell_id}
    assert set(df["grid"]) == {0}


def test_cell_id_is_shared_by_seeds_and_nothing_else(tmp_path):
    text = SMOKE.replace("seeds: [0]", "seeds: [0, 1, 2]")
    study = load_study(write(tmp_path / "c.yaml", text))
    by_cell: dict[str, set] = {}
    for t in study.trials:
        by_cell.setdefault(t.cell_id, set()).add((t.factors["model.mixer"], t.seed))
    assert len(by_cell) == 6
    for members in by_cell.values():
        assert len({m for m, _ in members}) == 1 and {s for _, s in members} == {0, 1, 2}


def test_store_is_wal_and_a_reader_never_breaks_the_writer(ray_session, tmp_path):
    """The dashboard reads while a study writes: with the SQLite store in WAL mode, neither
    side sees 'database is locked' and every run is complete afterwards."""
    import sqlite3
    import threading

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    study = load_study(write(tmp_path / "w.yaml", SMOKE.replace(
        "[attention, mlp, conv, dual, pool, identity]", "[mlp, conv, pool, identity]")))
    errors: list[BaseException] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            if db.exists():
                try:
                    load_runs("smoke", uri)
                    reads += 1
                except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                    errors.append(e)
            time.sleep(0.05)

    t = threading.Thread(target=reader)
    t.start()
    try:
        summary = run_study(study, uri)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert reads > 10
    assert summary.finished == 4
    df = load_runs("smoke", uri)
    assert len(df) == 4 and set(df["status"]) == {"finished"} and df["test_acc"].notna().all()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("resources,field,fix", [
    ("{cpus_per_trial: 3, max_concurrent: 2}", "cpus_per_trial is 3 per trial but the Ray node "
     "has 2 CPUs", "cpus_per_trial: 2 or less"),
    ("{cpus_per_trial: 1, gpus_per_trial: 0.25}", "gpus_per_trial is 0.25 per trial but no Ray "
     "node has a GPU", "gpus_per_trial: 0 to train on CPUs"),
    # a tuning study with precision auto: its levels' precision is profiled first
    ("{cpus_per_trial: 3}\ntune: {per: [model.mixer], space: {train.lr: {low: 1.0e-3, "
     "high: 1.0e-2}}, n_trials: 1, epochs: 1}\nsearch: {storage: STORAGE}",
     "cpus_per_trial is 3 per trial but the Ray node has 2 CPUs", "cpus_per_trial: 2 or less")])
def test_a_trial_no_node_can_hold_stops_the_run_in_one_line_instead_of_waiting_for_ever(
        ray_session, tmp_path, resources, field, fix):
    """More CPUs per trial than any node has, or a GPU where no node has one (a laptop, or
    a GPU study's smoke run on one): Tune queued the trials for ever, the run printing
    nothing; it stops before profiles or trials, naming the file, the field and the fix."""
    from ablate.errors import AblateError

    text = SMOKE.replace("resources: {cpus_per_trial: 1, max_concurrent: 2}",
                         f"resources: {resources}").replace(
        "STORAGE", f'"sqlite:///{tmp_path / "optuna.db"}"')
    if "tune:" in text:
        text = text.replace("profile_seconds: 0.02,", "profile_seconds: 0.02, precision: auto,")
    path = write(tmp_path / "big.yaml", text)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(AblateError) as err:
        run_study(load_study(path), uri)
    msg = str(err.value)
    assert msg.startswith(f"{path}: resources.{field}, so no trial could ever start"), msg
    assert fix in msg and "\n" not in msg
    assert runs_of(uri, "smoke").empty  # nothing profiled, nothing trained
    assert not (tmp_path / "optuna.db").exists()  # no tuning level's search began
    client = MlflowClient(uri)
    assert not [r for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id])]
