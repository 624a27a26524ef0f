"""The Python API behind `import ablate`: what the CLI does, as functions a notebook calls.
Heavy modules (Ray, MLflow, statsmodels) are imported only when a function needs them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console

    from ablate.study import Study
    from ablate.tune.driver import RunSummary
    from ablate.tune.smoke import SmokeResult


def _is_study_file(x: Any) -> bool:
    return isinstance(x, Path) or (isinstance(x, str) and x.endswith((".yaml", ".yml")))


def load_study(path: str | Path, sets: Sequence[str] = ()) -> Study:
    """A validated, expanded study file (`sets`: `KEY=VALUE` overrides, as `--set`)."""
    from ablate.study import load_study as _load

    return _load(path, sets)


def run(study: Study | str | Path, tracking_uri: str | None = None,
        address: str | None = None, sets: Sequence[str] = (),
        max_concurrent: int | None = None, smoke: bool = False, verbose: bool = False,
        console: Console | None = None, reprofile: bool = False) -> RunSummary | SmokeResult:
    """Run a study (a Study, or a study file with optional `sets`) as `ablate run` does:
    resumable, one writer, the study's lease held. `smoke=True` runs `ablate run --smoke`
    (a study file only) and returns its failures; `reprofile=True` is `--reprofile`."""
    from dataclasses import replace

    from ablate.tune.driver import run_study

    extra = [f"resources.max_concurrent={max_concurrent}"] if max_concurrent else []
    if smoke:
        from ablate.tune.smoke import run_smoke

        if not _is_study_file(study):
            raise TypeError("ablate.run(smoke=True) takes a study file path")
        return run_smoke(study, [*sets, *extra], address, verbose, console)
    if _is_study_file(study):
        s = load_study(study, [*sets, *extra])
    else:
        s = study
        if sets:
            s = load_study(s.path, [*s.sets, *sets, *extra])
        elif max_concurrent:
            res = s.spec.resources.model_copy(update={"max_concurrent": max_concurrent})
            s = replace(s, spec=s.spec.model_copy(update={"resources": res}))
    if reprofile:
        s = replace(s, reprofile=True)
    return run_study(s, tracking_uri, address, verbose, console)


def load_runs(study_or_experiment: Study | str | Path, uri: str | None = None,
              params: bool = True) -> pd.DataFrame:
    """One row per run of a study (a Study or a study file: its experiment and tracking.uri)
    or of any MLflow experiment by name; `uri` as --tracking-uri."""
    from ablate.tracking import load_runs as _load_runs
    from ablate.tracking import resolve_tracking_uri

    x = study_or_experiment
    if _is_study_file(x):
        x = load_study(x)
    if isinstance(x, str):
        return _load_runs(x, resolve_tracking_uri(uri), params)
    return _load_runs(x.experiment, resolve_tracking_uri(uri, x.spec.tracking.uri), params)
