"""Rendering of an analysis (`ablate report`): Markdown, JSON and one self-contained HTML
file (Plotly's JS inlined, opens offline) with the verdict, the ANOVA tables, the pooled
views, the figures (marginal means, interaction, scaling, one frontier per cost metric) and
the provenance. Pure: text in, text out; writing is `ablate.report`'s job."""

from __future__ import annotations

import html
import json
import math
from typing import Any

import pandas as pd

from ablate import analysis, plots
from ablate.analysis import Analysis, GridFit, short, term_name
from ablate.errors import AblateError

FORMATS = ("html", "md", "json")

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
    """One row per term; a term of a factor the finished runs confound with another has no
    share, F or p (the model's split between them is arbitrary): 'not identified'."""
    conf = f.design.confounded
    return [[term_name(t), "not identified (confounded with "
             + ", ".join(sorted({short(c) for k in t for c in conf.get(k, [])})) + ")",
             "", f"{s.df:g}", "", ""] if set(t) & set(conf) else
            [term_name(t), _pct_ci(s), f"{s.omega2:.2f}" if math.isfinite(s.omega2) else "n/a",
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


def pooled_blocks(a: Analysis) -> list[tuple[str, str, list[tuple[list[str], list[list[str]]]]]]:
    """(title, text, tables) of each pooled view (ablate.analysis.pool), then the refusals."""
    out = []
    for key, p in a.pooled.items():
        f, d = p.fit, p.fit.design
        text = (f"{short(key)} {p.note}: {d.n_runs} runs in {len(d.cells)} cells over "
                f"{', '.join(short(k) for k in d.keys)}; {d.note()}. Only runs whose other "
                "factors take levels every pooled grid has are pooled. "
                + ("The verdict uses this view" if p.used else "The verdict uses a single grid")
                + f" ({p.why}).")
        out.append((f"Pooled view: {short(key)} (grids {'+'.join(map(str, p.grids))})", text,
                    [(ANOVA_HEAD, anova_rows(f)), (EMM_HEAD, emm_rows(f, key)),
                     (PAIR_HEAD, pair_rows(f, key))]))
    if a.pool_refused:
        rows = [[r.factor, "+".join(map(str, r.grids)), r.reason] for r in a.pool_refused]
        out.append(("Pools refused", "A factor several grids vary is pooled only where the "
                    "other factors match:", [(["factor", "grids", "why not"], rows)]))
    return out


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
    for title, text, tables in pooled_blocks(a):
        out += [f"### {title}", "", text, ""]
        for head, rows in tables:
            out += table(head, rows)
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
    for key, p in a.pooled.items():
        figs.append((f"Marginal means, {short(key)} {p.note}",
                     plots.effects_figure({key: p.fit.emms[key]}, a.metric)))
    inter = [(f, t, s) for f in a.fits for t, s in f.interactions.items()]
    if inter:
        f, t, _ = max(inter, key=lambda x: x[2].share if math.isfinite(x[2].share) else -1)
        x, g = (t[1], t[0]) if analysis.numeric(f.design.levels[t[1]][0]) is not None else t
        figs.append((f"Largest interaction: {term_name(t)}",
                     plots.interaction_figure(f.tables[t], x, g, a.metric)))
    figs += scaling_figures(a)
    figs += frontier_figures(a)
    return figs


FRONTIER_TITLES = {"gmacs": "compute (GMACs)", "params": "parameters",
                   "train_time_alone_s": "training time alone on the profile node (s)",
                   "train_time_s": "measured training time (s)"}


def frontier_figures(a: Analysis) -> list[tuple[str, Any]]:
    """Accuracy against each cost metric the runs have (GMACs, params, training time alone
    and as measured: `verdict.FRONTIER_COSTS`): seed means, the Pareto frontier; colour = mixer
    level as in every other figure."""
    if not a.frontiers:
        return []
    agg_all = analysis.aggregate(a.runs, a.metric)
    cols = analysis.factor_columns(agg_all)
    color = analysis.MIXER if analysis.MIXER in cols else (cols[0] if cols else None)
    symbol = analysis.PATCH if analysis.PATCH in cols else None
    figs = []
    for cost in a.frontiers:
        agg = agg_all[agg_all[cost].notna()]
        figs.append((f"Accuracy vs {FRONTIER_TITLES.get(cost, cost)}", plots.frontier_figure(
            agg, analysis.frontier(agg, cost), cost, a.metric, color, symbol,
            cost in ("gmacs", "params"))))
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
    for title, text, tables in pooled_blocks(a):
        parts.append(f"<h2>{esc(title)}</h2><p>{esc(text)}</p>" +
                     "".join(table(h, r) for h, r in tables))
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
