"""ablate: ablation studies of vision architectures (attention, patches or data?).

The Python API: `ablate.load_study`, `ablate.run`, `ablate.load_runs`, `ablate.report` and
the analysis functions (`ablate.analyse`, `ablate.aggregate`, `ablate.frontier`, ...).
Everything is imported on first use, so `import ablate` stays light (no torch, Ray, MLflow).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it (imported on first access)
_API = {
    "load_study": "ablate.api", "run": "ablate.api", "load_runs": "ablate.api",
    **{name: "ablate.analysis" for name in (
        "analyse", "aggregate", "frontier", "pareto_front", "main_effects", "effect_sizes",
        "interaction", "scaling_curves", "cost_table", "status_counts", "split_status",
        "sentences", "to_dict", "Analysis", "parallel_dims", "metric_vs_param")},
}

__all__ = ["__version__", "report", *_API]


def __getattr__(name: str) -> Any:
    if name == "report":  # the module is callable: ablate.report(...) == report.report(...)
        return importlib.import_module("ablate.report")
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ablate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
