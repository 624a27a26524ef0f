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
    yield


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


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
