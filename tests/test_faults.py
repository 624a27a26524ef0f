"""Driver faults: SIGKILL, SIGTERM and SIGINT mid-study, and two drivers of one study.

Real `ablate run` processes on a real SQLite MLflow store; signals go to the driver alone
(never a process group), and every process a test starts is stopped by its own PID."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ablate.tracking import load_runs
from ablate.tracking.lease import LEASE_TAG, holder_alive
from ablate.tracking.store import client
from tests.conftest import alive, descendants, signal_and_wait, write

pytestmark = pytest.mark.slow

STUDY = """\
name: faults
dataset: {name: synthetic, image_size: 16, train_size: 240, test_size: 80}
model: {dim: 16, depth: 2, heads: 2, patch_size: 4}
train: {epochs: EPOCHS, batch_size: 32, eval_batch_size: 128, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.2}
factors:
  model.mixer: [mlp, identity, conv, pool]
seeds: [0]
resources: {cpus_per_trial: 1, max_concurrent: 2}
"""
EXE = Path(sys.executable).with_name("ablate")


def start(path: Path, uri: str, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(EXE), "run", str(path), "--tracking-uri", uri, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, cwd=path.parent, **popen)


def lease(uri: str) -> dict | None:
    c = client(uri)  # waits out a store being created by the driver
    exp = c.get_experiment_by_name("faults")
    raw = exp.tags.get(LEASE_TAG) if exp else None
    return json.loads(raw) if raw else None


def wait_for_a_trial_epoch(uri: str, db: Path, proc: subprocess.Popen, timeout=120) -> None:
    """Until a run started by `proc` (the lease holder) has logged an epoch."""
    deadline = time.time() + timeout
    while True:
        held = lease(uri) if db.exists() else None
        if held and held["pid"] == proc.pid:
            c = client(uri)
            exp = c.get_experiment_by_name("faults")
            runs = c.search_runs([exp.experiment_id],
                                 filter_string=f"tags.`ablate.driver` = '{held['id']}'")
            if any("val_acc" in r.data.metrics for r in runs):
                return
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)


def survivors(pids: set[int], timeout: float = 60.0) -> list[int]:
    """Those of `pids` (processes a driver this test started had started) still alive after
    `timeout`; each is then stopped by its PID, so a failing test leaves nothing behind."""
    deadline = time.time() + timeout
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.5)
    left = sorted(p for p in pids if alive(p))
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


def test_a_second_driver_of_the_study_exits_2_naming_the_first(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    path = write(tmp_path / "f.yaml", STUDY.replace("EPOCHS", "60"))
    first = start(path, uri)
    try:
        wait_for_a_trial_epoch(uri, db, first)
        runs_before = len(load_runs("faults", uri))
        second = subprocess.run([str(EXE), "run", str(path), "--tracking-uri", uri],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"host {socket.gethostname()} pid {first.pid}" in second.stderr
        assert "--force-unlock" in second.stderr and "Traceback" not in second.stderr
        holder = lease(uri)["id"]  # every run was started by the first driver, none by it
        c = client(uri)
        runs = c.search_runs([c.get_experiment_by_name("faults").experiment_id])
        assert len(runs) >= runs_before
        assert {r.data.tags.get("ablate.driver") for r in runs} == {holder}
        first.send_signal(signal.SIGTERM)  # what docker stop and batch schedulers send
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, output
    df = load_runs("faults", uri)
    assert set(df["status"]) <= {"killed", "finished"} and "killed" in set(df["status"])
    assert {MlflowClient(uri).get_run(r).info.status for r in df["run_id"]} <= {"KILLED",
                                                                                "FINISHED"}
    assert lease(uri) is None  # released on the way out


def test_random_sigkill_sigterm_sigint_then_the_study_finishes_each_trial_once(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    path = write(tmp_path / "f.yaml", STUDY.replace("EPOCHS", "150"))
    rng = random.Random(int(os.environ.get("ABLATE_FAULT_SEED", "0")))
    ray_of_dead_drivers: set[int] = set()
    drivers: set[int] = set()
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        proc = start(path, uri)
        drivers.add(proc.pid)
        try:
            wait_for_a_trial_epoch(uri, db, proc)
            time.sleep(rng.uniform(0.0, 3.0))  # a random moment while trials train
            ray_of_dead_drivers |= descendants(proc.pid)
            output = signal_and_wait(proc, sig)
        finally:
            if proc.poll() is None:
                proc.kill()
        expected = {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        assert proc.returncode in (expected, 0), output  # 0: it finished first
        if sig == signal.SIGKILL:  # before anyone reconciles: nobody is running them
            st = subprocess.run([str(EXE), "status", str(path), "--tracking-uri", uri, "--json"],
                                capture_output=True, text=True, timeout=120)
            assert json.loads(st.stdout)["counts"]["running"] == 0, st.stdout
    final = start(path, uri)
    drivers.add(final.pid)
    output, _ = final.communicate(timeout=600)
    assert final.returncode == 0, output
    # Ray's trial folders: private to the user, and gone once the drivers stopped
    from ablate.tune.driver import trial_storage

    storage = trial_storage()
    assert storage.stat().st_mode & 0o777 == 0o700
    assert not [p for p in storage.iterdir() if p.name.startswith("faults-")
                and int(p.name.rsplit("-", 1)[1]) in drivers]
    df = load_runs("faults", uri)
    finished = df[df["status"] == "finished"]
    assert sorted(finished["trial_id"].value_counts().tolist()) == [1, 1, 1, 1]
    assert set(df["status"]) <= {"finished", "killed"}
    statuses = {MlflowClient(uri).get_run(r).info.status for r in df["run_id"]}
    assert "RUNNING" not in statuses
    left = survivors(ray_of_dead_drivers)
    assert not left, f"processes of dead drivers still alive a minute later: {left}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_while_ray_starts_beside_a_new_store_leaves_nothing_running(tmp_path, sig):
    """On a new store the driver starts Ray while a thread creates the store: Ctrl-C or
    SIGTERM while ray.init waits for its raylet exits 130 or 143 without a traceback, every
    process Ray started goes (its agents outlived the driver when a signal landed inside
    ray.init), the store is
    whole (MLflow's migrations were not cut off), and the next run of the study finishes on
    it."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    path = write(tmp_path / "f.yaml", STUDY.replace("EPOCHS", "1"))
    proc = start(path, uri)
    ray_pids: set[int] = set()
    try:
        deadline = time.time() + 120
        while not ray_pids:  # the raylet started: ray.init waits for it to register
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no raylet 120 s after the start"
            ray_pids = {p for p in descendants(proc.pid) if "raylet" in _cmdline(p)}
            time.sleep(0.02)
        proc.send_signal(sig)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # the agents start later
            ray_pids |= descendants(proc.pid)
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = survivors(ray_pids)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], output
    assert "Traceback" not in output, output
    assert not left, f"Ray processes of the interrupted driver still alive: {left}"
    import sqlite3  # the thread creating the store was waited for: MLflow's schema is whole

    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    again = start(path, uri)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    assert sorted(load_runs("faults", uri).query("status == 'finished'")["trial_id"]
                  .value_counts().tolist()) == [1, 1, 1, 1]


def test_lease_of_a_dead_or_silent_holder_does_not_hold():
    now = time.time()
    here, other = socket.gethostname(), "some-other-host"
    assert holder_alive({"id": "a", "host": here, "pid": os.getpid(), "beat": now})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    assert not holder_alive({"id": "a", "host": here, "pid": int(dead), "beat": now})
    assert holder_alive({"id": "a", "host": other, "pid": 1, "beat": now - 10})
    assert not holder_alive({"id": "a", "host": other, "pid": 1, "beat": now - 3600})


def test_passwords_never_printed(tmp_path):
    """A tracking URI with a password: the error names the URI with the password masked."""
    path = write(tmp_path / "f.yaml", STUDY.replace("EPOCHS", "1"))
    uri = f"postgresql+psycopg://ablate:hunter2secret@127.0.0.1:{_closed_port()}/mlflow"
    for args in (["status", str(path)], ["run", str(path), "--dry-run"]):
        res = subprocess.run([str(EXE), *args, "--tracking-uri", uri], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "hunter2secret" not in res.stdout + res.stderr
        assert "ablate:***@127.0.0.1" in res.stderr
        # refused at once: not MLflow's ~100 s of connection retries first
        assert "will be retried" not in res.stderr, res.stderr


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()  # nothing listens there


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_profile_on_cuda_without_cuda_is_one_line():
    res = subprocess.run([str(EXE), "profile", "--mixer", "mlp", "--dim", "32", "--depth", "1",
                          "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--device cuda: no CUDA device is visible here" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_dashboard_is_the_streamlit_process_so_sigterm_stops_it(tmp_path):
    from tests.conftest import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen([str(EXE), "dashboard", "--tracking-uri",
                             f"sqlite:///{tmp_path / 'm.db'}", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc)
        assert "streamlit" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(
            errors="replace")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with socket.socket() as s:  # nothing serves the port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_force_unlock_takes_a_lease_that_looks_alive(tmp_path):
    """A holder that looks alive (this very process, fresh heartbeat) blocks a driver;
    --force-unlock (force=True) takes the study over."""
    from ablate.tracking import Tracker
    from ablate.tracking.lease import StudyLease, StudyLockedError

    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "faults")
    other = {"id": "someone", "host": socket.gethostname(), "pid": os.getpid(),
             "since": time.time(), "beat": time.time()}
    t.client.set_experiment_tag(t.experiment_id, LEASE_TAG, json.dumps(other))
    with pytest.raises(StudyLockedError, match=f"pid {os.getpid()}.*--force-unlock"):
        StudyLease(t.client, t.experiment_id, "faults")
    with StudyLease(t.client, t.experiment_id, "faults", force=True) as held:
        assert json.loads(t.client.get_experiment(t.experiment_id).tags[LEASE_TAG])["id"] \
            == held.id
    assert LEASE_TAG not in t.client.get_experiment(t.experiment_id).tags


def test_sigterm_stops_a_driver_whose_sigint_is_ignored_while_it_profiles(tmp_path):
    """A job a script starts with `&` inherits SIGINT ignored; SIGTERM was relayed as SIGINT,
    so during the profiles (before Tune installs its own handler) it was lost: the run went
    on to the end and exited 0, and a scheduler would SIGKILL it later (helper-40)."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    slow = STUDY.replace("EPOCHS", "1").replace("profile_seconds: 0.02", "profile_seconds: 8")
    path = write(tmp_path / "f.yaml", slow)
    proc = start(path, uri, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    try:
        for line in proc.stdout:  # the profiles (4 x several seconds) have begun
            lines.append(line)
            if "alone on" in line:
                break
        time.sleep(1.0)
        output = signal_and_wait(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + output
    assert proc.returncode == 143, output
    assert "finished mixer" not in output and "Traceback" not in output
    assert lease(uri) is None
