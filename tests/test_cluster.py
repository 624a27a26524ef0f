"""Beyond one machine: docker/ checked statically (no Docker engine here), and a real
two-node Ray cluster on this machine's loopback addresses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from ablate.tracking import load_runs
from tests.conftest import ROOT, descendants, free_port, signal_and_wait, stop_tree, write

DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_parses_and_declares_the_stack():
    c = compose()
    assert set(c["services"]) == {"postgres", "mlflow", "ray-head", "ray-worker", "dashboard"}
    for name, svc in c["services"].items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        assert svc["healthcheck"]["test"], name
    for name, svc in c["services"].items():
        build = svc.get("build")
        if build:
            ctx = (DOCKER / build["context"]).resolve()
            assert ctx.is_dir(), name
            assert (ctx / build["dockerfile"]).is_file(), name
    named = set(c.get("volumes", {}))
    for name, svc in c["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith((".", "/")):
                assert (DOCKER / src).exists(), f"{name}: {src} missing"
            else:
                assert src in named, f"{name}: volume {src} not declared"
    assert "pgdata" in " ".join(c["services"]["postgres"]["volumes"])
    assert "mlartifacts" in " ".join(c["services"]["mlflow"]["volumes"])


def test_only_ui_ports_are_published_on_loopback_by_default():
    c = compose()
    published = {n: s["ports"] for n, s in c["services"].items() if s.get("ports")}
    assert set(published) == {"mlflow", "ray-head", "dashboard"}
    for name, ports in published.items():
        for p in ports:
            assert p.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, p)
    targets = {p.rsplit(":", 1)[1] for ports in published.values() for p in ports}
    assert targets == {"5000", "8265", "8501"}


def test_workers_scale_and_reserve_gpus_only_with_the_gpu_overlay():
    w = compose()["services"]["ray-worker"]
    # a GPU reservation in the base file stops `compose up` on a host without NVIDIA's
    # runtime (docker/smoke.sh runs the base file on a CPU host)
    assert "deploy" not in w
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]["ray-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "container_name" not in w  # a fixed name would break --scale
    assert "ray-head:6379" in w["command"]


def test_mlflow_uses_postgres_and_credentials_come_from_env():
    c = compose()
    mlflow = c["services"]["mlflow"]
    # the password never on a command line (ps shows those): MLflow reads it from its env
    assert "POSTGRES_PASSWORD" not in mlflow["command"] and "postgresql" not in mlflow["command"]
    assert "${POSTGRES_PASSWORD" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert '"*"' not in mlflow["command"] and "--allowed-hosts" in mlflow["command"]
    # the Ray token only where Ray runs
    for name, svc in c["services"].items():
        assert ("RAY_AUTH_TOKEN" in (svc.get("environment") or {})) == name.startswith("ray-")
    # the placeholders of .env.example are refused at start
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert "change-me*" in entry and "exit 2" in entry
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.startswith(("POSTGRES_PASSWORD=", "RAY_AUTH_TOKEN=")):
            assert line.split("=", 1)[1].startswith("change-me")
    assert c["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = (DOCKER / ".env.example").read_text()
    defined = set(re.findall(r"^#?\s*([A-Z_]+)=", example, flags=re.M))
    assert required and required <= defined
    assert ".env" in (ROOT / ".gitignore").read_text()


def test_dockerfile_non_root_cuda_arg_no_secrets():
    df = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=", df, flags=re.M)
    assert re.search(r"^FROM \$\{BASE\}", df, flags=re.M)
    users = re.findall(r"^USER (\S+)", df, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"(PASSWORD|TOKEN|SECRET)\s*=", df)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", df, flags=re.M):
        for item in src.split():
            assert (ROOT / item).exists(), item


# ---------------------------------------------------------------- a real two-node cluster

RAY = Path(sys.executable).with_name("ray")
ABLATE = Path(sys.executable).with_name("ablate")
STUDY = """\
name: cluster
dataset: {{name: synthetic, image_size: 16, train_size: {n}, test_size: 80}}
model: {{dim: 16, depth: 2, heads: 2, patch_size: 4, window_size: 2}}
train: {{epochs: {epochs}, batch_size: 32, eval_batch_size: 128, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.2}}
factors:
  model.mixer: [mlp, identity, pool, conv]
seeds: [0]
resources: {{cpus_per_trial: 1, max_concurrent: 2}}
failures: {{max_retries: 3}}
"""



def _head(port: int, temp: str, env: dict[str, str], *extra: str) -> subprocess.Popen:
    """`ray start --head --block` on 127.0.0.2 with 1 CPU (and `extra`), in `temp`."""
    return subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.2", "--port",
         str(port), "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
         "--temp-dir", temp, *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_nodes(port: int, env: dict[str, str], n: int, head: subprocess.Popen) -> None:
    deadline = time.time() + 90
    while True:  # wait for the nodes to join
        probe = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.2:{port}', "
             "logging_level='ERROR', log_to_driver=False); "
             "print(len([n for n in ray.nodes() if n['Alive']]))"],
            env=env, capture_output=True, text=True)
        if probe.stdout.strip().endswith(str(n)):
            return
        assert time.time() < deadline and head.poll() is None, probe.stderr
        time.sleep(1)


@pytest.fixture
def two_nodes(tmp_path):
    """A head (127.0.0.2) and a worker (127.0.0.3) started by this test with `--block`, in
    their own temp dir, and stopped by the PIDs it started (a host-wide stop command would
    also stop other users' Ray processes)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rt")  # short: Ray's socket paths have a length limit
    head = _head(port, temp, env)
    worker = None
    try:
        worker = subprocess.Popen(
            [str(RAY), "start", "--address", f"127.0.0.2:{port}", "--node-ip-address",
             "127.0.0.3", "--num-cpus", "1", "--block", "--disable-usage-stats"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_nodes(port, env, 2, head)
        yield {"address": f"127.0.0.2:{port}", "env": env, "worker": worker}
    finally:
        for proc in (worker, head):
            if proc is not None:  # Ray's daemons linger 30 s on SIGTERM; ours may be killed
                stop_tree(proc.pid, timeout=5)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.cluster
def test_trials_run_on_both_nodes(two_nodes, tmp_path):
    path = write(tmp_path / "c.yaml", STUDY.format(epochs=2, n=240))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run([str(ABLATE), "run", str(path), "--address", two_nodes["address"],
                          "--tracking-uri", uri], env=two_nodes["env"], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    df = load_runs("cluster", uri)
    assert len(df) == 4 and set(df["status"]) == {"finished"}
    runs_tags = df.set_index("run_id")
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    nodes = {c.get_run(r).data.tags.get("ablate.node_ip") for r in runs_tags.index}
    assert nodes == {"127.0.0.2", "127.0.0.3"}
    # a trial neither 1-CPU node can hold: on this joined cluster a warning (an autoscaler may
    # add a node), naming the most CPUs a node has, not an error
    big = write(tmp_path / "big.yaml", STUDY.format(epochs=1, n=240).replace(
        "cpus_per_trial: 1", "cpus_per_trial: 2"))
    addr = two_nodes["address"]
    code = ("import sys, ray; from rich.console import Console; "
            "from ablate.study import load_study; from ablate.tune.raystart import check_fits; "
            f"ray.init(address='{addr}', logging_level='ERROR', log_to_driver=False); "
            f"check_fits(load_study(sys.argv[1]), '{addr}', Console(soft_wrap=True))")
    warn = subprocess.run([sys.executable, "-c", code, str(big)], env=two_nodes["env"],
                          capture_output=True, text=True, timeout=120)
    assert warn.returncode == 0, warn.stderr
    assert warn.stdout.strip() == (
        f"{big}: warning: resources.cpus_per_trial is 2 per trial but no Ray node has more "
        "than 1 CPUs; the trials wait until the cluster adds such a node (an autoscaler), or "
        "set cpus_per_trial: 1 or less"), warn.stdout


@pytest.mark.cluster
def test_worker_node_lost_mid_study_trials_retry_elsewhere(two_nodes, tmp_path):
    path = write(tmp_path / "c.yaml", STUDY.format(epochs=40, n=1500))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen([str(ABLATE), "run", str(path), "--address", two_nodes["address"],
                             "--tracking-uri", uri], env=two_nodes["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    from mlflow import MlflowClient

    try:
        deadline = time.time() + 240
        while True:  # wait until a trial runs on the worker node, then stop that node
            on_worker = False
            if (tmp_path / "mlflow.db").exists():
                df = load_runs("cluster", uri)
                if not df.empty:
                    c = MlflowClient(uri)
                    on_worker = any(c.get_run(r).data.tags.get("ablate.node_ip") == "127.0.0.3"
                                    and s == "running"
                                    for r, s in zip(df["run_id"], df["status"], strict=True))
            if on_worker:
                break
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        # the node crashes: its raylet and every worker process on it die at once
        node = two_nodes["worker"]
        for pid in descendants(node.pid) | {node.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    df = load_runs("cluster", uri)
    assert len(df) == 4, out
    assert set(df["status"]) == {"finished"} and df["trial_id"].is_unique
    c = MlflowClient(uri)
    attempts = [int(c.get_run(r).data.tags["ablate.attempts"]) for r in df["run_id"]]
    assert max(attempts) >= 2, out  # the lost node's trial was retried ...
    nodes = {c.get_run(r).data.tags.get("ablate.node_ip") for r in df["run_id"]}
    assert "127.0.0.2" in nodes  # ... and finished on the node that was left


@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS", "auto"])
def test_a_ray_client_address_is_refused_in_one_line_before_the_store_is_touched(via, tmp_path):
    """Through Ray Client (ray://) Tune would run the experiment on the cluster with copies of
    the MLflow callback and the searcher that do not carry the study's store: refused, exit 2,
    naming where the address came from and the fix, with no tracking store created; also
    when `--address auto` would read it from RAY_ADDRESS (as ray.init does)."""
    path = write(tmp_path / "c.yaml", STUDY.format(epochs=1, n=80))
    db = tmp_path / "m.db"
    addr = "ray://127.0.0.1:10001"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [str(ABLATE), "run", str(path), "--tracking-uri", f"sqlite:///{db}"]
    if via == "--address":
        args += ["--address", addr]
    else:
        env["RAY_ADDRESS"] = addr
        args += ["--address", "auto"] if via == "auto" else []
    res = subprocess.run(args, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    named = "--address" if via == "--address" else "RAY_ADDRESS"
    assert len(lines) == 1 and f"{named} {addr}" in lines[0] and "--address auto" in lines[0]
    assert ("(what --address auto reads)" in lines[0]) == (via == "auto")
    assert "Traceback" not in res.stderr and not db.exists()


def test_entrypoint_refuses_placeholder_secrets_and_runs_the_command():
    entry = DOCKER / "entrypoint.sh"
    env = {"PATH": os.environ["PATH"], "POSTGRES_PASSWORD": "change-me"}
    bad = subprocess.run(["sh", str(entry), "echo", "started"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "POSTGRES_PASSWORD is still the placeholder" in bad.stderr
    assert "started" not in bad.stdout
    env["POSTGRES_PASSWORD"] = "s3cret-from-env"
    ok = subprocess.run(["sh", str(entry), "echo", "started"], env=env, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "started"


def test_image_gets_the_git_revision_as_a_build_argument():
    df = (DOCKER / "Dockerfile").read_text()
    assert "ARG GIT_REVISION" in df and "ABLATE_GIT_REVISION=${GIT_REVISION}" in df
    assert compose()["x-ablate"]["build"]["args"]["GIT_REVISION"].startswith("${GIT_REVISION")
    code = ("import os; os.environ['ABLATE_GIT_REVISION'] = 'abc123'; "
            "import ablate.tracking.store as s; s.PACKAGE_ROOT = __import__('pathlib').Path('/'); "
            "print(s.git_revision())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "abc123", out.stderr


GPU_STUDY = """\
name: gpu
dataset: {name: synthetic, image_size: 16, num_classes: 4, train_size: 128, test_size: 64}
model: {dim: 32, depth: 1, heads: 2, patch_size: 4}
train: {epochs: 1, batch_size: 32, profile_seconds: 0.05}
factors:
  model.mixer: [mlp, conv]
seeds: [0]
resources: {cpus_per_trial: 1, gpus_per_trial: 0.5, max_concurrent: 2}
"""


@pytest.mark.cluster
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_gpu_study_on_a_node_whose_gpu_torch_cannot_use_stops_instead_of_using_the_cpu(
        tmp_path):
    """A node that declares a GPU to Ray (`--num-gpus 1`) where torch sees no CUDA device (a
    broken driver; here a CPU machine): a GPU study used to profile and train on the CPU
    and store it all as a GPU study's. The profile now stops the run in one line (exit 2)
    before any trial; without a profile (--smoke) every trial fails, naming the cause."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rt")
    head = _head(port, temp, env, "--num-gpus", "1")
    try:
        _wait_nodes(port, env, 1, head)
        path = write(tmp_path / "g.yaml", GPU_STUDY)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        addr = ["--address", f"127.0.0.2:{port}"]
        res = subprocess.run([str(ABLATE), "run", str(path), *addr, "--tracking-uri", uri],
                             env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=300)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{path}: resources.gpus_per_trial"), \
            res.stderr
        assert "sees no CUDA device" in lines[0] and "gpus_per_trial: 0" in lines[0]
        assert load_runs("gpu", uri).empty  # no trial ran, on the CPU or anywhere
        smoke = subprocess.run([str(ABLATE), "run", str(path), "--smoke", *addr], env=env,
                               capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=300)
        assert smoke.returncode == 1, smoke.stdout + smoke.stderr
        failed = [ln for ln in smoke.stdout.splitlines() if ln.startswith("failed mixer=")]
        assert len(failed) == 2 and all("NoCudaDevice: resources.gpus_per_trial is 0.5" in ln
                                        for ln in failed), smoke.stdout
        assert "2 of 2 cells failed" in smoke.stdout
        # a trial this joined cluster cannot hold now (2 CPUs beside the GPU share; the node
        # has 1): a warning naming the field, not an error (an autoscaler may add a node),
        # and the trials wait for one until stopped
        wait = subprocess.Popen([str(ABLATE), "run", str(path), "--smoke", *addr, "--set",
                                 "resources.cpus_per_trial=2"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        seen = []
        for line in wait.stdout:  # until the warning (pytest-timeout bounds a silent run)
            seen.append(line)
            if "warning:" in line:
                break
        time.sleep(3)
        assert wait.poll() is None, "".join(seen)  # still waiting for a node
        rest = signal_and_wait(wait, signal.SIGINT)
        assert wait.returncode == 130, "".join(seen) + rest
        assert seen[-1].startswith(f"{path}: warning: resources.cpus_per_trial is 2 per trial "
                                   "but the Ray node has 1 CPUs; the trials wait until"), seen
        assert "set cpus_per_trial: 1 or less" in seen[-1]
    finally:
        stop_tree(head.pid, timeout=5)
        shutil.rmtree(temp, ignore_errors=True)
