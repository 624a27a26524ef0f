from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CIFAR_JPG = SHARED_DATA / "cifar10-jpg.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's ~/.cache; the data cache is shared within a session."""
    cache = tmp_path_factory.getbasetemp() / "ablate-cache"
    monkeypatch.setenv("ABLATE_CACHE", str(cache))
    monkeypatch.delenv("ABLATE_TRACKING_URI", raising=False)
    from ablate.tracking import store  # a test that made the store template fail: not the next

    monkeypatch.setattr(store, "_template_failed", False)
    yield


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def needs_service(available: bool, what: str):
    """Skip a test whose system service is missing, with the reason; but where
    ABLATE_REQUIRE_SERVICES=1 (CI sets it) fail instead, so a failed install is never a
    silent green run."""
    if os.environ.get("ABLATE_REQUIRE_SERVICES") == "1":
        def require(fn):
            import functools

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                if not available:
                    pytest.fail(f"{what} is required (ABLATE_REQUIRE_SERVICES=1) but missing")
                return fn(*args, **kwargs)
            return wrapper
        return require
    return pytest.mark.skipif(not available, reason=f"{what} is missing here")


def needs_cifar():
    return pytest.mark.skipif(not CIFAR_JPG.exists(),
                              reason=f"{CIFAR_JPG} is absent (it lies in ../shared/data beside "
                                     "the project's clone)")


os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, timeout: float = 90.0) -> None:
    """Poll `url` until it answers; fail if `proc` exits or the time runs out."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.time() < deadline and proc.poll() is None, f"{url} did not come up"
            time.sleep(0.5)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def signal_and_wait(proc, sig: int, timeout: float = 120.0) -> str:
    """Send `sig` to a process this test started (by its PID, never a group) and return the
    rest of its output once it exits."""
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=timeout)
    return output or ""


def stop_tree(root: int, timeout: float = 30.0) -> None:
    """Stop a process this test started and everything below it, by PID: SIGTERM, then
    SIGKILL for whatever is left after `timeout`."""
    import signal
    import time

    pids = descendants(root) | {root}
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.5)
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray runtime (2 CPUs) per test module, stopped after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def mlflow_server(backend: str, *extra: str):
    """A real `mlflow server` on a free loopback port in front of `backend` (a generator for
    fixtures: yields its URL, stops it by its PID afterwards)."""
    import subprocess
    import sys

    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", backend, *extra,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, timeout=120)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
