"""ablate: ablation studies of vision architectures (attention, patches or data?)."""

from __future__ import annotations

__version__ = "0.1.0"
