"""The verdict: one analysis of a study's runs (every grid's ANOVA, scaling slopes, cost) and
one sentence per question: attention (the token mixer), patches (patch size, token count),
data (the training-data fraction), then the largest interaction. A sentence says
"inconclusive" unless at least 2 seeds exist and its decisive difference's CI excludes 0."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ablate.analysis.anova import N_BOOT, GridFit, TermStats, fit_grid, pair, term_name
from ablate.analysis.design import designs
from ablate.analysis.pool import Pooled, Refusal, pooled_views
from ablate.analysis.scaling import FRACTION, MIXER, PATCH, cost_table, slopes
from ablate.analysis.seeds import (
    ALONE,
    COST_METRICS,
    aggregate,
    cell_keys,
    factor_columns,
    frontier,
    holm,
    join_labels,
    labels,
    newest_cells,
    short,
    split_status,
    status_counts,
    timing_apart,
    timing_sentences,
    unpriced_sentences,
)
from ablate.errors import AnalysisError

TOKENS = "factor.model.tokens"
QUESTIONS = (("Attention", (MIXER,)), ("Patches", (PATCH, TOKENS)), ("Data", (FRACTION,)))
NAMES = {MIXER: "the token mixer", PATCH: "the patch size", TOKENS: "the token count",
         FRACTION: "the training-data fraction"}
# training time: the estimate from the profile (the trials' batch and threads, alone on the
# node) where every configuration has one, beside the measured time (with whatever trained
# next to each trial)
FRONTIER_COSTS = ("gmacs", "params", "train_time_alone_s", "train_time_s")
# the precision a run trained at: what its profile resolved `auto` to, else what was asked
PRECISION_PARAMS = ("params.train.precision_resolved", "params.train.precision")
SHOWN = 4  # configurations named per precision in the precision sentence


@dataclass
class Analysis:
    metric: str
    n_runs: int
    counts: dict[str, int]
    excluded: pd.DataFrame
    fits: list[GridFit]
    scaling: list[dict] = field(default_factory=list)
    cost: dict | None = None
    frontiers: dict[str, pd.DataFrame] = field(default_factory=dict)
    verdict: list[str] = field(default_factory=list)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the finished runs analysed
    pooled: dict[str, Pooled] = field(default_factory=dict)   # factor -> its pooled view
    pool_refused: list[Refusal] = field(default_factory=list)

    @property
    def n_used(self) -> int:
        """Runs analysed: a run two grids share (a trial of both) counts once."""
        return len(set().union(*(f.design.data.index for f in self.fits)))


def analyse(df: pd.DataFrame, metric: str, grids: list[dict[str, list[Any]]] | None = None,
            n_boot: int = N_BOOT, seed: int = 0) -> Analysis:
    """Everything `ablate report` and the Verdict tab show, from a runs DataFrame
    (`tracking.load_runs`). Raises AnalysisError when there is nothing to analyse.
    BLAS runs on one thread here: the matrices are small (cells x coefficients), and on a
    busy 2-core machine OpenBLAS's threads spin against each other (25 s instead of 2 s for
    a 5,000-run study, measured with benchmarks/bench_dashboard.py)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _analyse(df, metric, grids, n_boot, seed)


def _analyse(df: pd.DataFrame, metric: str, grids: list[dict[str, list[Any]]] | None,
             n_boot: int, seed: int) -> Analysis:
    if df.empty:
        raise AnalysisError("no runs: run the study first (`ablate run STUDY.yaml`)")
    if "status" in df and not (df["status"] == "finished").any():
        raise AnalysisError(f"no finished runs ({status_counts(df)}): wait for trials to "
                            "finish or `ablate run` the study again")
    if metric not in df or df[metric].isna().all():
        meta = ("seed", "grid", "factor.", "params.", "optuna.")
        have = sorted(c for c in df.select_dtypes("number").columns
                      if not c.startswith(meta) and df[c].notna().any())
        raise AnalysisError(f"metric {metric!r}: no run has it; pick one of "
                            f"{', '.join(have) or 'none'} with --metric")
    ok, excluded = split_status(df, metric)
    if ok.empty:
        raise AnalysisError(f"no finished runs with {metric} ({status_counts(df)}): wait for "
                            "trials to finish or `ablate run` the study again")
    fits = [fit_grid(d, n_boot, seed) for d in designs(ok, metric, grids) if d.keys]
    if not fits:
        raise AnalysisError("every factor has one level among the finished runs: nothing to "
                            "compare; add levels to `factors` (or --factor with 2+ values)")
    a = Analysis(metric, len(df), status_counts(df), excluded, fits,
                 runs=newest_cells(ok)[0])  # what the costs and frontiers show, as the fits
    a.pooled, a.pool_refused = pooled_views(ok, fits, metric, n_boot, seed)
    for f in fits:
        for key in (FRACTION, PATCH):
            s = slopes(f.design, key)
            if s is not None:
                a.scaling.append(s)
    for p in a.pooled.values():
        p.scaling = [s for key in (FRACTION, PATCH)
                     if (s := slopes(p.fit.design, key)) is not None]
    a.cost = cost_table(a.runs, metric)
    agg = aggregate(a.runs, metric, factor_columns(a.runs))
    alone = (ALONE in agg and len(agg) > 0 and bool(agg[ALONE].notna().all())
             and not timing_apart(a.runs, ALONE))
    for c in FRONTIER_COSTS:
        if c == ALONE and not alone:
            continue
        if c in agg and agg[c].notna().any():
            a.frontiers[c] = frontier(agg[agg[c].notna()], c).drop(columns="run_ids")
    a.verdict = sentences(a) + unpriced_sentences(agg, factor_columns(a.runs))
    return a


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return "p n/a" if not math.isfinite(p) else ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")


def amount(x: float, metric: str, signed: bool = False) -> str:
    """A difference in the metric's units: accuracies in percentage points."""
    if not math.isfinite(x):
        return "n/a"
    if metric.endswith("acc"):
        return f"{100 * x:+.2f} points" if signed else f"{100 * abs(x):.2f} points"
    return f"{x:+.4g}" if signed else f"{abs(x):.4g}"


def _ci(lo: float, hi: float, metric: str) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[no CI]"
    s = 100 if metric.endswith("acc") else 1
    return f"[{s * lo:+.2f}, {s * hi:+.2f}]"


def fit_for(fits: list[GridFit], key: str) -> GridFit | None:
    """The grid that varies `key` over the most levels (the first such grid on a tie)."""
    cands = [f for f in fits if key in f.design.keys]
    return max(cands, key=lambda f: (len(f.design.levels[key]), -f.design.index), default=None)


def decisive(fit: GridFit, key: str) -> tuple[str, str]:
    """The comparison that answers the question: attention vs the best other mixer; the
    most vs the least data; the smallest vs the largest patch; else best vs runner-up."""
    em = fit.emms[key].sort_values("mean", ascending=False)
    levels = fit.design.levels[key]
    if key == MIXER and "attention" in levels:
        return "attention", str(em[em["level"] != "attention"]["level"].iloc[0])
    if key == FRACTION:
        return levels[-1], levels[0]
    if key == PATCH:
        return levels[0], levels[-1]
    return str(em["level"].iloc[0]), str(em["level"].iloc[1])


def _share(t: TermStats, seeds: int) -> str:
    ci = "" if seeds < 2 else f" [95% CI {_pct(t.share_ci[0])} to {_pct(t.share_ci[1])}]"
    return f"{_pct(t.share)} of the variance{ci} ({_p(t.p_value)}, partial omega^2 " \
           f"{t.omega2:.2f})"


def factor_clause(fit: GridFit, key: str, metric: str, grid_note: str) -> tuple[str, bool]:
    """'<name> explains S% of the variance [CI]; A beats B by X [CI]' and whether it holds."""
    seeds = fit.design.typical_seeds
    conf = fit.design.confounded.get(key)
    if conf:  # the model's split of the effect between them is arbitrary: no numbers
        return (f"{NAMES.get(key, short(key))} ({short(key)}{grid_note}) is not identified: "
                f"in the finished runs it changes together with "
                f"{' and '.join(short(c) for c in conf)}, so its effect cannot be told from "
                "theirs"), False
    t = fit.main[key]
    a, b = decisive(fit, key)
    d = pair(fit, key, a, b)
    k = short(key).split(".")[-1]
    verb = "beats" if d["diff"] > 0 else "trails"
    text = (f"{NAMES.get(key, short(key))} ({short(key)}{grid_note}) explains "
            f"{_share(t, seeds)}; {k}={a} {verb} {k}={b} by {amount(d['diff'], metric)} "
            f"{_ci(d['ci_low'], d['ci_high'], metric)}")
    if seeds >= 2 and math.isfinite(d["p_holm"]):
        text += f", Holm {_p(d['p_holm'])}"
    holds = seeds >= 2 and (d["ci_low"] > 0 or d["ci_high"] < 0)
    return text, holds


def choose(a: Analysis, key: str) -> tuple[GridFit | None, str]:
    """The fit the verdict reads `key` from: its pooled view where that has more information
    (see ablate.analysis.pool), else the grid that varies it most; and how to name it."""
    p = a.pooled.get(key)
    if p is not None and p.used:
        return p.fit, f", {p.note}"
    f = fit_for(a.fits, key)
    return f, (f", grid {f.design.index}" if f is not None and len(a.fits) > 1 else "")


def slope_clause(a: Analysis, key: str, grid: int) -> str:
    pool = a.pooled.get(key)
    scaling = pool.scaling if grid < 0 and pool is not None else a.scaling
    s = next((s for s in scaling if s["grid"] == grid and s["x"] == short(key)), None)
    if s is None:
        return ""
    m = a.metric
    parts = [f"{g} gains {amount(v['slope'], m, signed=True)} {_ci(*v['ci'], m)}"
             for g, v in s["slopes"].items()]
    lost = s.get("not_estimable") or []
    if lost:  # not zero: unknown from the runs that finished
        parts.append(f"no slope for {', '.join(lost)} (not estimable from its finished runs: "
                     f"fewer than two levels of {s['x']}, or confounded with another factor)")
    text = "per " + s["per"] + ": " + ", ".join(parts)
    if s.get("group_confounded"):
        text += (f" (the {s['group']} levels also differ in "
                 f"{' and '.join(short(c) for c in s['group_confounded'])}: their slopes are "
                 "not compared)")
    elif s["differences"]:
        big = max(s["differences"], key=lambda r: abs(r["diff"]))
        text += (f"; slope difference {big['a']} - {big['b']}: "
                 f"{amount(big['diff'], m, signed=True)} {_ci(*big['ci'], m)}, "
                 f"Holm {_p(big['p_holm'])}")
    return text


def _question(a: Analysis, title: str, keys: tuple[str, ...]) -> str:
    present = [(k, *choose(a, k)) for k in keys]
    present = [(k, f, note) for k, f, note in present if f is not None]
    if not present:
        aliased = [(k, f.design.aliased[k]) for k in keys for f in a.fits
                   if k in f.design.aliased]
        if aliased:
            k, det = aliased[0]
            return (f"{title}: not identified: {short(k)} changes only together with "
                    f"{' and '.join(short(c) for c in det)} in the finished runs (no run varies "
                    "it alone), so its effect cannot be told from theirs.")
        names = " and ".join(short(k) for k in keys)
        return f"{title}: not tested: {names} {'is' if len(keys) == 1 else 'are'} not a " \
               "factor of this study."
    clauses, holds, seeds = [], [], min(f.design.typical_seeds for _, f, _ in present)
    for k, f, note in present:
        text, ok = factor_clause(f, k, a.metric, note)
        sc = slope_clause(a, k, f.design.index) if k in (FRACTION, PATCH) else ""
        clauses.append(text + (f"; {sc}" if sc else ""))
        holds.append(ok)
    body = "; ".join(clauses)
    if seeds < 2:
        return (f"{title}: inconclusive: {seeds} seed per cell (a claim needs at least 2 seeds); "
                f"{body}.")
    if pruned_clause(a):
        return f"{title}: inconclusive: {pruned_clause(a)}; {body}."
    if not any(holds):
        if all(k in f.design.confounded for k, f, _ in present):
            return f"{title}: inconclusive: {body}."
        return f"{title}: inconclusive: the decisive difference's CI includes 0; {body}."
    return f"{title}: {body}."


def pruned_clause(a: Analysis) -> str:
    """Why no claim holds where a scheduler (ASHA) pruned runs: the finished seeds of a
    configuration are those that survived its early-epoch cut, the better ones, and the cut
    took more seeds from some configurations than from others, so the means compare survivors,
    not configurations (the pruned runs are left out of every mean, as they must be: their
    numbers are of fewer epochs). Empty where nothing was pruned."""
    ex = a.excluded
    n = int((ex["reason"] == "pruned").sum()) if "reason" in ex else 0  # final phase only
    if not n:
        return ""
    return (f"{n} run(s) were pruned by the scheduler (ASHA), so each configuration's mean is of "
            "the seeds that survived its early cut (biased upward, unevenly); for a verdict, "
            "run the study again without it into a new experiment (--set scheduler.name=fifo "
            "--set tracking.experiment=NEW_NAME: pruned trials count as done in this one)")


def interaction_sentence(a: Analysis) -> str:
    # an interaction of a factor that is not identified is as confounded as the factor
    every = [(f, t) for f in a.fits for t in f.interactions.values()]
    inter = [(f, t) for f, t in every if not set(t.term) & set(f.design.confounded)]
    if not inter:
        if every:
            return "Interactions: none identified (each involves a factor that changes " \
                   "together with another in the finished runs)."
        return "Interactions: none estimable (fewer than two factors in every grid, or " \
               "missing cells)."
    i = max(range(len(inter)),
            key=lambda j: inter[j][1].share if math.isfinite(inter[j][1].share) else -1)
    f, t = inter[i]
    seeds = f.design.typical_seeds
    grid = f" in grid {f.design.index}" if len(a.fits) > 1 else ""
    x, y = (short(k) for k in t.term)
    text = f"Largest interaction: {x} x {y}{grid}, {_share(t, seeds)}"
    if seeds < 2:
        return text + ": inconclusive with 1 seed."
    if pruned_clause(a):
        return text + f": inconclusive: {pruned_clause(a)}."
    # the largest of k interactions is picked after looking: its p-value is Holm-adjusted over
    # all of them (a bootstrap share of a sum of squares is never below 0, so its interval
    # cannot serve as the test)
    ps = np.array([u.p_value if math.isfinite(u.p_value) else 1.0 for _, u in inter])
    p_holm = float(holm(ps)[i])
    held = f" (Holm over {len(inter)} interactions: {_p(p_holm)})" if len(inter) > 1 else ""
    return text + held + (f": the effect of {x} depends on {y}." if p_holm < 0.05 else
                          ": not distinguishable from seed noise.")


def sentences(a: Analysis) -> list[str]:
    """The verdict: one sentence per question (or per factor for a study that asks none of
    the three), then the largest interaction."""
    asked = any(fit_for(a.fits, k) for _, keys in QUESTIONS for k in keys)
    if asked:
        out = [_question(a, title, keys) for title, keys in QUESTIONS]
    else:
        keys = list(dict.fromkeys(k for f in a.fits for k in f.design.keys))
        order = sorted(keys, key=lambda k: -fit_for(a.fits, k).main[k].share)
        out = [_question(a, short(k), (k,)) for k in order]
    out.append(interaction_sentence(a))
    budget = budget_sentence(a)
    if budget:
        out.append(budget)
    precision = precision_sentence(a)
    if precision:
        out.append(precision)
    return out + timing_sentences(a.runs)


def precision_sentence(a: Analysis) -> str:
    """Where the runs compared trained at different precisions (`train.precision: auto` with
    `precision_scope: architecture` picks the faster per architecture: on a CPU with bf16
    kernels, bf16 for most mixers but fp32 for attention; trials that probed alone, or runs
    of a study resumed after the store lost its probes, can differ too), every difference
    between them also carries the precision's effect: the verdict names which trained at
    which. Nothing when one precision (or unknown), or when the precision is itself a factor
    of the study."""
    runs = a.runs
    if "factor.train.precision" in runs:
        return ""
    trained = pd.Series(None, index=runs.index, dtype=object)
    for col in PRECISION_PARAMS:
        if col in runs:
            asked = runs[col].astype(object)
            trained = trained.fillna(asked.where(asked.notna() & (asked != "auto")))
    known = trained.dropna()
    if known.nunique() == 1 and "params.train.precision" in runs:
        # runs that asked for `auto` and never logged what it resolved to (ablate before it
        # logged that for trials without a profile): they may have trained otherwise
        silent = int(((runs["params.train.precision"] == "auto") & trained.isna()).sum())
        if silent:
            return (f"Precision: {silent} run(s) asked for train.precision: auto and do not "
                    f"record what it resolved to, the rest trained at {known.iloc[0]}; "
                    "differences with those runs may include the precision's effect (run "
                    "them again to record it).")
    if known.nunique() < 2:
        return ""
    lab = pd.DataFrame({f: labels(runs.loc[known.index, f]) for f in factor_columns(runs)})
    varying = [f for f in lab if lab[f].nunique() > 1]
    # name the configurations by the factor that decides the precision, if one does: each of
    # its levels at one precision, and fewer levels than configurations (in a search, every
    # sampled continuous value is a level of its own, and decides nothing)
    n_cfg = cell_keys(runs.loc[known.index], varying).nunique()
    deciding = [f for f in varying if known.groupby(lab[f]).nunique().max() == 1
                and lab[f].nunique() < n_cfg]
    factors = [min(deciding, key=lambda f: lab[f].nunique())] if deciding else varying
    name = "/".join(short(f) for f in factors)
    groups = []
    for p in sorted(set(known)):
        if not factors:  # seeds of one configuration trained at different precisions
            groups.append(f"{p} ({int((known == p).sum())} runs)")
            continue
        cfgs = sorted(set(join_labels(lab.loc[known == p, factors])))
        more = f" and {len(cfgs) - SHOWN} more" if len(cfgs) > SHOWN else ""
        groups.append(f"{p} ({name} {', '.join(c.replace('|', '/') for c in cfgs[:SHOWN])}"
                      f"{more})")
    unknown = len(trained) - len(known)
    return ("Precision: the runs compared trained at different precisions: "
            + "; ".join(groups) + (f"; {unknown} run(s) unknown" if unknown else "")
            + "; differences between them include the precision's effect (to compare at one "
            "precision, set train.precision to fp32 or bf16, or auto with precision_scope: "
            "study, the default, which trains every profiled architecture at one).")


def budget_sentence(a: Analysis) -> str:
    """What training budget the runs had; under `epochs` with the data fraction as a factor,
    the data effect also carries the difference in optimizer steps, and the verdict says so."""
    runs = a.runs
    if "params.train.budget" not in runs and "params.train.epochs" not in runs:
        return ""  # runs ablate did not create: their budget is unknown
    budget = (runs["params.train.budget"].fillna("epochs") if "params.train.budget" in runs
              else pd.Series("epochs", index=runs.index))  # runs from before train.budget
    epochs = (sorted({str(e) for e in runs["params.train.epochs"].dropna()})
              if "params.train.epochs" in runs else [])
    n = f"{'/'.join(epochs)} " if epochs else ""
    fraction_varies = fit_for(a.fits, FRACTION) is not None
    if set(budget) == {"steps"}:
        return (f"Budget: every trial took the optimizer steps of {n}full-data epochs "
                "(train.budget: steps), so data fractions are compared at equal training "
                "budget.")
    text = (f"Budget: {n}epochs over each trial's own training subset (train.budget: "
            f"{'/'.join(sorted(set(budget)))})")
    if fraction_varies:
        return (text + "; data effect confounded with the number of optimizer steps (use "
                "train.budget: steps).")
    return text + "."


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _term_dict(t: TermStats) -> dict[str, Any]:
    return {"share": _num(t.share), "share_ci": [_num(v) for v in t.share_ci],
            "omega2": _num(t.omega2), "p_value": _num(t.p_value), "F": _num(t.f),
            "df": _num(t.df), "ss": _num(t.ss)}


def _factor_dict(f: GridFit, k: str) -> dict[str, Any]:
    em = f.emms[k]
    conf = f.design.confounded.get(k, [])
    # not identified: its share is the model's arbitrary split with the factors named here
    return {**_term_dict(f.main[k]), "confounded_with": [short(c) for c in conf],
            "levels": {str(r.level): {"mean": _num(r.mean), "ci": [_num(r.ci_low),
                                      _num(r.ci_high)], "n": int(r.n)}
                       for r in em.itertuples()},
            "pairwise": [{"a": r.a, "b": r.b, "diff": _num(r.diff),
                          "ci": [_num(r.ci_low), _num(r.ci_high)], "p": _num(r.p),
                          "p_holm": _num(r.p_holm)} for r in f.pairwise[k].itertuples()]}


def _pooled_dict(p: Pooled) -> dict[str, Any]:
    d = p.fit.design
    return {**_factor_dict(p.fit, p.factor), "grids": p.grids, "n_runs": d.n_runs,
            "n_cells": len(d.cells), "seeds_per_cell": list(d.seeds), "ss_type": "II",
            "design": d.note(), "factors": [short(k) for k in d.keys],
            "where": {short(k): v for k, v in p.where.items()},
            "fixed": {short(k): v for k, v in d.fixed.items()},
            "used_in_verdict": p.used, "why": p.why, "scaling": p.scaling}


def to_dict(a: Analysis) -> dict[str, Any]:
    """The analysis as JSON-ready data (`ablate report --format json`)."""
    grids = []
    for f in a.fits:
        d = f.design
        factors = {short(k): _factor_dict(f, k) for k in d.keys}
        grids.append({
            "index": d.index, "n_runs": d.n_runs, "n_cells": len(d.cells),
            "seeds_per_cell": list(d.seeds), "balanced": d.balanced, "ss_type": "II",
            "design": d.note(), "fixed": {short(k): v for k, v in d.fixed.items()},
            "superseded_runs": d.superseded, "bootstrap_resamples": f.n_boot,
            "residual_df": _num(f.resid_df), "factors": factors,
            "interactions": {term_name(t): _term_dict(s) for t, s in f.interactions.items()},
            "interactions_not_estimable": [term_name(t) for t in d.dropped_interactions],
            "aliased": {short(c): [short(k) for k in det] for c, det in d.aliased.items()}})
    ex = a.excluded
    return {
        "metric": a.metric, "n_runs": a.n_runs, "n_analysed": a.n_used, "counts": a.counts,
        "excluded": [{"run_id": r.get("run_id"), "run_name": r.get("run_name"),
                      "reason": r.get("reason")} for r in ex.to_dict("records")],
        "grids": grids,
        "pooled": {short(k): _pooled_dict(p) for k, p in a.pooled.items()},
        "pool_refused": [{"factor": r.factor, "grids": r.grids, "reason": r.reason}
                         for r in a.pool_refused],
        "scaling": a.scaling, "cost": a.cost,
        "frontiers": {c: [{k.removeprefix("factor."): v for k, v in r.items()}
                          for r in t.to_dict("records")] for c, t in a.frontiers.items()},
        "verdict": a.verdict,
    }


__all__ = ["COST_METRICS", "Analysis", "analyse", "sentences", "to_dict"]
