"""`ablate report`: the verdict of a study (or of any MLflow experiment) as one self-contained
HTML file (Plotly's JS inlined, opens offline), as Markdown for a paper or a pull request, or
as JSON. Everything is computed before anything is written: an error writes nothing."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from ablate import __version__, analysis
from ablate.analysis import Analysis, short
from ablate.errors import AblateError, AnalysisError, mask_url
from ablate.render import (  # noqa: F401 - re-exported: the dashboard renders through here
    FORMATS,
    figures,
    render,
    scaling_figures,
    shares_frame,
    to_html,
    to_json,
    to_markdown,
)


@dataclass
class Source:
    """What to analyse: the runs, the study's grids (None: infer from the runs) and where
    they came from."""

    name: str
    runs: pd.DataFrame
    grids: list[dict[str, list[Any]]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _provenance(runs: pd.DataFrame, uri: str, **extra: Any) -> dict[str, Any]:
    from ablate.tracking import git_revision

    def distinct(col: str) -> list[str]:
        return sorted({str(v) for v in runs[col].dropna()}) if col in runs else []

    return {**extra, "tracking_uri": uri, "report_git_revision": git_revision(),
            "runs_git_revisions": distinct("git_revision"), "hosts": distinct("hostname"),
            "ablate_version": __version__, "torch_version": _version("torch"),
            "statsmodels_version": _version("statsmodels"),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def study_source(path: Path, tracking_uri: str | None = None, sets: Sequence[str] = ()
                 ) -> Source:
    """A study's runs; runs of cells the study file no longer has (it was edited) are kept
    out of the analysis as 'outdated' and counted."""
    from ablate.study import load_study
    from ablate.tracking import load_runs, resolve_tracking_uri

    s = load_study(path, sets)
    uri = resolve_tracking_uri(tracking_uri, s.spec.tracking.uri)
    runs = load_runs(s.experiment, uri, params=False)
    if runs.empty:
        raise AnalysisError(f"{path}: study '{s.spec.name}' has no runs in {mask_url(uri)}: "
                            "run it "
                            f"first (`ablate run {path}`) or pass --tracking-uri")
    extra: dict[str, Any] = {}
    if s.spec.search.method == "grid" and "cell_id" in runs:
        cells = {t.cell_id for t in s.trials}
        if s.spec.tune is not None:
            tuned = tuned_values(s, load_runs(s.experiment, uri, params=True))
            cells = tuned_cells(s, tuned)
            extra["tuned"] = tuned
        runs = runs.copy()
        runs.loc[~runs["cell_id"].isin(cells), "status"] = "outdated"
    grids = s.spec.grids() if s.spec.search.method == "grid" else None
    res = s.spec.resources
    gpus = getattr(res, "gpus_per_trial", 0) or 0
    device = f"cuda ({gpus} GPU per trial)" if gpus else "cpu"
    return Source(s.spec.name, runs, grids, _provenance(
        runs, uri, study=s.spec.name, study_file=str(path), study_file_hash=s.file_hash,
        devices=device, **extra))


def tuned_values(s: Any, runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The tuned values of each level of a tuned study, read from its final runs' params
    (the newest run of the level; every final run of a level carries the same values)."""
    from ablate.tracking.runs import _num
    from ablate.tuning import level_label

    per, keys = s.spec.tune.per, list(s.spec.tune.space)
    out: dict[str, dict[str, Any]] = {}
    for _, r in runs.iterrows():  # newest first
        if not all(f"params.{k}" in r and r[f"params.{k}"] == r[f"params.{k}"] for k in keys):
            continue
        label = level_label({k: r.get(f"factor.{k}") for k in per})
        out.setdefault(label, {k: _num(r[f"params.{k}"]) for k in keys})
    return out


def tuned_cells(s: Any, tuned: dict[str, dict[str, Any]]) -> set[str]:
    """The cell ids of a tuned study's grid under the tuned values (what its runs carry)."""
    from ablate.study import with_tuned
    from ablate.tuning import level_label

    cells = set()
    for t in s.trials:
        values = tuned.get(level_label({k: t.factors.get(k) for k in s.spec.tune.per}))
        if values is not None:
            cells.add(with_tuned(t, values, s.factor_keys).cell_id)
    return cells


def experiment_source(experiment: str, factors: list[str], seed_key: str | None = None,
                      tracking_uri: str | None = None) -> Source:
    """Any MLflow experiment (a sweep another tool logged): its params `factors` become the
    factors, `seed_key` (default: a `seed` param if any) the seed; configurations are the
    distinct factor levels."""
    from ablate.tracking import load_runs, resolve_tracking_uri
    from ablate.tracking.runs import _num

    uri = resolve_tracking_uri(tracking_uri)
    runs = load_runs(experiment, uri, params=True)
    if runs.empty:
        raise AnalysisError(f"--experiment {experiment!r}: no such experiment (or no runs) in "
                            f"{mask_url(uri)}; check the name or pass --tracking-uri")
    if not factors:
        raise AnalysisError("--factor: name at least one run param to compare, e.g. "
                            "--factor model.mixer")
    have = sorted(c.removeprefix("params.") for c in runs if c.startswith("params."))
    out = runs.drop(columns=[c for c in runs if c.startswith("factor.")] +
                    [c for c in ("grid", "cell_id") if c in runs])
    for f in factors:
        if f"params.{f}" not in runs:
            raise AnalysisError(f"--factor {f}: no run of '{experiment}' has this param; "
                                f"params: {', '.join(have) or 'none'}")
        out[f"factor.{f}"] = runs[f"params.{f}"].map(lambda v: None if v is None or v != v
                                                     else _num(v))
    key = seed_key or ("seed" if "params.seed" in runs else None)
    if seed_key and f"params.{seed_key}" not in runs:
        raise AnalysisError(f"--seed-key {seed_key}: no run of '{experiment}' has this param")
    if key:
        out["seed"] = runs[f"params.{key}"]
    return Source(experiment, out, None, _provenance(
        out, uri, experiment=experiment, factors=factors, seed_key=key))


def analyse_source(src: Source, metric: str, n_boot: int = analysis.N_BOOT) -> Analysis:
    """The analysis, with the errors a user can fix; a --factor with one level among the
    finished runs of a foreign experiment is named."""
    if src.grids is None and "experiment" in src.provenance and metric in src.runs:
        ok, _ = analysis.split_status(src.runs, metric)
        for f in src.provenance["factors"]:
            levels = sorted({analysis.label(v) for v in ok[f"factor.{f}"]})
            if len(levels) == 1:
                raise AnalysisError(f"--factor {f}: one level ({levels[0]}) among the finished "
                                    f"runs with {metric}: nothing to compare; drop it")
    return analysis.analyse(src.runs, metric, src.grids, n_boot=n_boot)


def make_report(src: Source, metric: str, fmt: str, output: Path | None
                ) -> tuple[Path | None, str]:
    """Analyse and render; write `output` (html defaults to report-<name>.html; md and json
    go to stdout when no output is given: the caller prints the text). Writes only after
    everything succeeded."""
    if fmt not in FORMATS:
        raise AblateError(f"--format {fmt}: unknown; use html, md or json")
    text = render(analyse_source(src, metric), src.provenance, fmt)
    path = output or (Path(f"report-{src.name}.html") if fmt == "html" else None)
    if path is not None:
        _write(path, text)
    return path, text


def _write(path: Path, text: str) -> None:
    """Write whole or not at all (a reader never sees half a report)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- the end of `ablate run`


def cell_table(runs: pd.DataFrame, metric: str) -> list[str]:
    """Seed means with 95% CIs per cell (seeds grouped by cell_id), best first, as aligned
    text lines. Only finished runs enter a mean."""
    ok, _ = analysis.split_status(runs, metric)
    factors = analysis.factor_columns(ok)
    agg = analysis.aggregate(ok, metric, factors, extra=())
    if agg.empty:
        return []
    agg = agg.sort_values("mean", ascending=False, kind="stable")
    head = [*(short(f) for f in factors), "seeds", metric, "95% CI"]
    rows = [[*(analysis.label(r[f]) for f in factors), str(int(r["n"])), f"{r['mean']:.4f}",
             "n/a (1 seed)" if int(r["n"]) < 2 else
             f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"] for _, r in agg.iterrows()]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
            for line in (head, *rows)]


def run_summary(path: Path, tracking_uri: str | None, metric: str = "test_acc",
                sets: Sequence[str] = (), named_uri: str | None = None) -> str:
    """What `ablate run` prints when a study is done: the verdict (the sentences of `ablate
    report --format md`), the cell table, and where the report and dashboard are. With one
    seed it says why there is no verdict instead of guessing. `named_uri`: the store as given
    on the command line, which the commands it suggests must name too (a study file's or the
    environment's store they find the same way again)."""
    src = study_source(path, tracking_uri, sets)
    lines = []
    seeds = src.runs.groupby("cell_id")["seed"].nunique().max() if "seed" in src.runs else 1
    if seeds < 2:
        lines += [f"No verdict: {seeds} seed per cell; a claim needs at least 2 seeds "
                  "(list more under `seeds:`, then `ablate run` again: it runs only the new "
                  "seeds)."]
    else:
        try:
            a = analyse_source(src, metric)
            lines += [f"Verdict ({metric}):", *[f"- {s}" for s in a.verdict]]
        except AnalysisError as e:
            lines += [f"No verdict: {e}"]
    table = cell_table(src.runs, metric)
    if table:
        lines += ["", f"Seed means per cell ({metric}, finished runs, best first):", *table]
    again = "".join(f" --set {shlex.quote(x)}" for x in sets if not x.startswith("resources."))
    secret = bool(named_uri) and mask_url(named_uri) != named_uri  # a password: not printed
    store = (" --tracking-uri URI" if secret else
             f" --tracking-uri {shlex.quote(named_uri)}" if named_uri else "")
    lines += ["", f"Full report: ablate report {shlex.quote(str(path))}{again}{store}   |   "
                  f"dashboard: ablate dashboard{store}"
                  + ("   (URI: the --tracking-uri you gave; its password is not printed)"
                     if secret else "")]
    return "\n".join(lines)


# ---------------------------------------------------------------- `ablate.report(...)`


def report(study: Any = None, metric: str = "test_acc", fmt: str = "md",
           output: str | Path | None = None, tracking_uri: str | None = None,
           sets: Sequence[str] = (), experiment: str | None = None,
           factors: Sequence[str] = (), seed_key: str | None = None) -> str:
    """`ablate report` as a function: the verdict of a study (a Study or a study file) or of
    any MLflow `experiment` by its param `factors`, as md, json or html text; also written to
    `output` when given. Called as `ablate.report(...)`."""
    if (study is None) == (experiment is None):
        raise AblateError("ablate.report: give a study (file) or experiment=NAME (one)")
    if study is None:
        src = experiment_source(experiment, list(factors), seed_key, tracking_uri)
    elif isinstance(study, (str, Path)):
        src = study_source(Path(study), tracking_uri, sets)
    else:
        src = study_source(study.path, tracking_uri, [*study.sets, *sets])
    if fmt not in FORMATS:
        raise AblateError(f"format {fmt}: unknown; use html, md or json")
    text = render(analyse_source(src, metric), src.provenance, fmt)
    if output is not None:
        _write(Path(output), text)
    return text


class _CallableModule(type(sys)):
    """`ablate.report` is this module once anything imports it (Python binds a submodule to
    its package's attribute), so the module itself calls `report`: `ablate.report(...)`
    works whatever was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
