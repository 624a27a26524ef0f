"""`ablate report`: the verdict of a study (or of any MLflow experiment) as one self-contained
HTML file (Plotly's JS inlined, opens offline), as Markdown for a paper or a pull request, or
as JSON. Everything is computed before anything is written: an error writes nothing."""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from ablate import __version__, analysis, plots
from ablate.analysis import Analysis, GridFit, short, term_name
from ablate.errors import AblateError, AnalysisError, mask_url

FORMATS = ("html", "md", "json")


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


# ---------------------------------------------------------------- rendering


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def _pval(p: float) -> str:
    return "n/a" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _pct_ci(s: analysis.TermStats) -> str:
    lo, hi = s.share_ci
    ci = "" if not math.isfinite(lo) else f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{100 * s.share:.1f}%{ci}"


def anova_rows(f: GridFit) -> list[list[str]]:
    return [[term_name(t), _pct_ci(s), f"{s.omega2:.2f}" if math.isfinite(s.omega2) else "n/a",
             f"{s.df:g}", _fmt(s.f, 3), _pval(s.p_value)] for t, s in f.terms.items()]


ANOVA_HEAD = ["term", "share of variance [95% CI]", "partial omega^2", "df", "F", "p"]
EMM_HEAD = ["level", "mean", "95% CI", "runs"]
PAIR_HEAD = ["a", "b", "a - b", "95% CI (Bonferroni)", "p (Holm)"]


def emm_rows(f: GridFit, key: str) -> list[list[str]]:
    return [[str(r.level), f"{r.mean:.4f}", f"[{r.ci_low:.4f}, {r.ci_high:.4f}]", str(r.n)]
            for r in f.emms[key].itertuples()]


def pair_rows(f: GridFit, key: str) -> list[list[str]]:
    return [[r.a, r.b, f"{r.diff:+.4f}", f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
             _pval(r.p_holm)] for r in f.pairwise[key].itertuples()]


def _counts_line(a: Analysis) -> str:
    parts = ", ".join(f"{v} {k}" for k, v in sorted(a.counts.items(), key=lambda kv: -kv[1]))
    return (f"{a.n_runs} runs ({parts}); {a.n_used} finished runs with {a.metric} analysed. "
            "Only finished runs enter an average: pruned runs stopped early, failed, killed, "
            "running and outdated ones have no final number.")


def _cost_rows(a: Analysis) -> tuple[list[str], list[list[str]]] | None:
    c = a.cost
    if not c:
        return None
    levels = list(c["budget"])
    head = ["mixer \\ under the cost of", *[f"{b} ({c['budget'][b]:.3g} {c['cost']})"
                                           for b in levels]]
    rows = [[m, *[_fmt(c["best"][m][b]) for b in levels]] for m in levels]
    return head, rows


def to_markdown(a: Analysis, prov: dict[str, Any]) -> str:
    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *["| " + " | ".join(r) + " |" for r in rows], ""]

    name = prov.get("study") or prov.get("experiment")
    out = [f"## Verdict: {name} ({a.metric})", ""]
    out += [f"- {s}" for s in a.verdict] + ["", _counts_line(a), ""]
    for f in a.fits:
        d = f.design
        out += [f"### Grid {d.index}: {', '.join(short(k) for k in d.keys)}", "",
                f"{d.n_runs} runs in {len(d.cells)} cells; {d.note()}." +
                (f" Held fixed: {', '.join(f'{short(k)}={v}' for k, v in d.fixed.items())}."
                 if d.fixed else ""), ""]
        out += table(ANOVA_HEAD, anova_rows(f))
        for k in d.keys:
            out += [f"**{short(k)}**: marginal means and pairwise differences", ""]
            out += table(EMM_HEAD, emm_rows(f, k)) + table(PAIR_HEAD, pair_rows(f, k))
    cost = _cost_rows(a)
    if cost:
        out += ["### Best accuracy under each mixer's cost", ""] + table(*cost)
    out += ["### Provenance", ""] + [f"- {k}: {v}" for k, v in prov.items()] + [""]
    return "\n".join(out)


def to_json(a: Analysis, prov: dict[str, Any]) -> str:
    return json.dumps({**analysis.to_dict(a), "provenance": prov}, indent=2, default=str)


def shares_frame(a: Analysis) -> pd.DataFrame:
    """Every term's share of the variance with its CI, all grids."""
    return pd.DataFrame([{"term": term_name(t), "share": s.share, "ci_low": s.share_ci[0],
                          "ci_high": s.share_ci[1], "grid": f.design.index}
                         for f in a.fits for t, s in f.terms.items()])


def scaling_figures(a: Analysis) -> list[tuple[str, Any]]:
    """The metric against data fraction and patch size (log2 axes), one curve per mixer."""
    figs = []
    for key in (analysis.FRACTION, analysis.PATCH):
        for f in a.fits:
            t = f.tables.get((analysis.MIXER, key))
            t = f.tables.get((key, analysis.MIXER)) if t is None else t
            if t is not None:
                curve = t.assign(**{key: t[key].map(analysis.numeric)})
                figs.append((f"{short(key)} scaling, grid {f.design.index}",
                             plots.scaling_figure(curve, a.metric, key, analysis.MIXER)))
    return figs


def figures(a: Analysis) -> list[tuple[str, Any]]:
    """(title, Plotly figure) for the HTML report, in reading order."""
    figs: list[tuple[str, Any]] = [
        ("Share of the variance", plots.shares_figure(shares_frame(a), a.metric))]
    for f in a.fits:
        title = f"Marginal means, grid {f.design.index}"
        figs.append((title, plots.effects_figure({k: f.emms[k] for k in f.design.keys},
                                                 a.metric)))
    inter = [(f, t, s) for f in a.fits for t, s in f.interactions.items()]
    if inter:
        f, t, _ = max(inter, key=lambda x: x[2].share if math.isfinite(x[2].share) else -1)
        x, g = (t[1], t[0]) if analysis.numeric(f.design.levels[t[1]][0]) is not None else t
        figs.append((f"Largest interaction: {term_name(t)}",
                     plots.interaction_figure(f.tables[t], x, g, a.metric)))
    figs += scaling_figures(a)
    if "gmacs" in a.frontiers:
        agg = analysis.aggregate(a.runs, a.metric)
        agg = agg[agg["gmacs"].notna()]
        cols = analysis.factor_columns(agg)
        color = analysis.MIXER if analysis.MIXER in cols else (cols[0] if cols else None)
        symbol = analysis.PATCH if analysis.PATCH in cols else None
        figs.append(("Accuracy vs cost", plots.frontier_figure(
            agg, analysis.frontier(agg, "gmacs"), "gmacs", a.metric, color, symbol, True)))
    return figs


def to_html(a: Analysis, prov: dict[str, Any]) -> str:
    from plotly.offline import get_plotlyjs

    esc = html.escape

    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    name = prov.get("study") or prov.get("experiment")
    parts = [f"<h1>ablate report: {esc(str(name))}</h1>",
             f"<p class='meta'>metric <b>{esc(a.metric)}</b>: "
             f"{esc(analysis.METRIC_HELP.get(a.metric, ''))}</p>",
             "<h2>Verdict</h2><ul class='verdict'>" +
             "".join(f"<li>{esc(s)}</li>" for s in a.verdict) + "</ul>",
             f"<p>{esc(_counts_line(a))}</p>"]
    if len(a.excluded):
        ex = a.excluded
        rows = [[str(r.get("run_name") or r.get("run_id")), str(r["reason"])]
                for r in ex.head(50).to_dict("records")]
        parts.append("<details><summary>runs left out of the averages</summary>" +
                     table(["run", "reason"], rows) + "</details>")
    for f in a.fits:
        d = f.design
        parts.append(f"<h2>Grid {d.index}: {esc(', '.join(short(k) for k in d.keys))}</h2>"
                     f"<p>{d.n_runs} runs in {len(d.cells)} cells; {esc(d.note())}.</p>")
        parts.append(table(ANOVA_HEAD, anova_rows(f)))
        for k in d.keys:
            parts.append(f"<h3>{esc(short(k))}</h3>" + table(EMM_HEAD, emm_rows(f, k)) +
                         table(PAIR_HEAD, pair_rows(f, k)))
    cost = _cost_rows(a)
    if cost:
        parts.append("<h2>Best accuracy under each mixer's cost</h2>" + table(*cost))
    parts.append("<h2>Figures</h2>")
    for title, fig in figures(a):
        parts.append(f"<h3>{esc(title)}</h3>" +
                     fig.to_html(full_html=False, include_plotlyjs=False))
    parts.append("<h2>Provenance</h2>" + table(["", ""], [[k, str(v)] for k, v in prov.items()]))
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
             "padding:0 1em}table{border-collapse:collapse;margin:.5em 0 1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             ".verdict li{margin:.4em 0}.meta{color:#555}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>ablate report: {esc(str(name))}</title><style>{style}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")


def render(a: Analysis, prov: dict[str, Any], fmt: str) -> str:
    if fmt not in FORMATS:
        raise AblateError(f"--format {fmt}: unknown; use html, md or json")
    return {"html": to_html, "md": to_markdown, "json": to_json}[fmt](a, prov)


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
                sets: Sequence[str] = ()) -> str:
    """What `ablate run` prints when a study is done: the verdict (the sentences of `ablate
    report --format md`), the cell table, and where the report and dashboard are. With one
    seed it says why there is no verdict instead of guessing."""
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
    again = "".join(f" --set {x}" for x in sets if not x.startswith("resources."))
    lines += ["", f"Full report: ablate report {path}{again}   |   dashboard: ablate dashboard"]
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
