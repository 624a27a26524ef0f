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
