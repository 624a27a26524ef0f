"""Where ablate keeps what it can make again: decoded datasets, the empty MLflow store."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """ABLATE_CACHE, else ~/.cache/ablate."""
    return Path(os.environ.get("ABLATE_CACHE") or Path.home() / ".cache" / "ablate").expanduser()
