"""Seed-level basics: which runs may be averaged, level labels and their order, one row per
configuration (seeds grouped by `ablate.cell_id`), Pareto frontiers. Pure: no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

HIGHER_IS_BETTER = {"throughput_img_s", "train_img_s", "val_acc", "best_val_acc", "test_acc"}
COST_METRICS = ("gmacs", "params", "throughput_img_s", "latency_ms", "train_time_alone_s",
                "train_time_s", "train_img_s", "peak_mem_mb")
# What each accuracy metric means, so that a user picks the right one.
METRIC_HELP = {
    "test_acc": "accuracy on the held-out test split at the end of training: report a "
                "finished study with it",
    "val_acc": "accuracy on the validation split at the end of training: use it for "
               "anything that selects (a search, a frontier you act on)",
    "best_val_acc": "the best validation accuracy over epochs (a max over epochs, biased "
                    "upwards): a training diagnostic, not a result",
}
OFF = "off"
FINISHED = "finished"
# Known levels first, in the order of the question; anything else alphabetically.
KNOWN_ORDER = ("attention", "mlp", "conv", "dual", "pool", "identity")


def factor_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("factor.")]


def short(col: str) -> str:
    """`factor.model.mixer` -> `model.mixer`."""
    return col.removeprefix("factor.")


def label(v: Any) -> str:
    """One string per level: None/NaN -> 'off', 4 and 4.0 -> '4', 0.25 -> '0.25'."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return OFF
    if isinstance(v, bool | np.bool_):
        return str(bool(v)).lower()
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return f"{float(v):g}"
    return str(v)


def labels(s: pd.Series) -> pd.Series:
    """`label` over a column, computed once per distinct value (5,000 runs have few)."""
    obj = s.astype(object)
    out = obj.map({v: label(v) for v in pd.unique(obj)}).astype(object)
    miss = out.isna()  # NaN keys (each NaN its own object) miss the dict; labels are never NaN
    if miss.any():
        out[miss] = obj[miss].map(label)
    return out


def numeric(level: str) -> float | None:
    try:
        return float(level)
    except ValueError:
        return None


def order_levels(levels: Iterable[str]) -> list[str]:
    """'off' first, then numbers ascending, then known mixers in order, then the rest."""
    def key(s: str) -> tuple:
        if s == OFF:
            return (0, 0.0, "")
        x = numeric(s)
        if x is not None:
            return (1, x, "")
        if s in KNOWN_ORDER:
            return (2, float(KNOWN_ORDER.index(s)), "")
        return (3, 0.0, s)
    return sorted(set(levels), key=key)


def split_status(df: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs that may be averaged, runs left out with a `reason`). Only finished final-phase
    runs with a finite `metric` aggregate: pruned runs stopped early, failed/killed/running
    ones have no final number; they are counted and listed, never averaged."""
    status = df["status"] if "status" in df else pd.Series(FINISHED, index=df.index)
    has = df[metric].notna() & np.isfinite(pd.to_numeric(df[metric], errors="coerce")) \
        if metric in df else pd.Series(False, index=df.index)
    # tuning and profiling runs are not results: only the final phase is averaged
    phase = (df["phase"].fillna("final") if "phase" in df
             else pd.Series("final", index=df.index))
    ok = (status == FINISHED) & has & (phase == "final")
    out = df[~ok].copy()
    out["reason"] = np.where(phase[~ok] != "final", "phase " + phase[~ok].astype(str),
                             np.where(status[~ok] != FINISHED, status[~ok].astype(str),
                                      f"finished without {metric}"))
    return df[ok], out


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    if df.empty or "status" not in df:
        return {FINISHED: len(df)}
    return {str(k): int(v) for k, v in df["status"].value_counts().items()}


def t_halfwidth(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean; NaN when n < 2."""
    if n < 2 or not np.isfinite(std):
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values: statsmodels' multipletests(p, method="holm")[1] step for step
    (same floats), without the gc.collect() it runs on every call (0.4 s each in a process
    that holds torch and a 5,000-run study)."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    adj = np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1))
    adj[adj > 1] = 1
    out = np.empty_like(adj)
    out[order] = adj
    return out


def join_labels(lab: pd.DataFrame) -> pd.Series:
    """One string per row joining its level labels (vectorised: 5,000 runs in milliseconds)."""
    if lab.shape[1] == 0:
        return pd.Series("", index=lab.index)
    cols = [lab[c].astype(str) for c in lab.columns]
    return cols[0].str.cat(cols[1:], sep="|") if len(cols) > 1 else cols[0]


def cell_keys(df: pd.DataFrame, factors: Sequence[str]) -> pd.Series:
    """The configuration a run belongs to: its `cell_id` (the resolved config without the
    seed), else (runs ablate did not create) its factor levels."""
    if "cell_id" in df and df["cell_id"].notna().all():
        return df["cell_id"].astype(object)
    by_levels = join_labels(pd.DataFrame({f: labels(df[f]) for f in factors}, index=df.index))
    if "cell_id" in df:
        return df["cell_id"].astype(object).where(df["cell_id"].notna(), "cfg:" + by_levels)
    return "cfg:" + by_levels


def newest_cells(df: pd.DataFrame, factors: Sequence[str] | None = None
                 ) -> tuple[pd.DataFrame, int]:
    """(the runs of each configuration's newest cell id, how many runs were left out): two
    cell ids with the same factor levels mean the study file was edited (say, its lr) and
    run again; the older configuration's runs are neither extra seeds nor a configuration of
    their own beside the new one, under the same label (the grids' models keep the newest
    alone: design._build). Newest: the latest start_time among a cell id's runs."""
    if df.empty or "cell_id" not in df or df["cell_id"].isna().all():
        return df, 0
    factors = list(factor_columns(df) if factors is None else factors)
    if not factors:
        return df, 0
    levels = join_labels(pd.DataFrame({f: labels(df[f]) for f in factors}, index=df.index))
    cid = cell_keys(df, factors)
    t = df["start_time"] if "start_time" in df else pd.Series(0, index=df.index)
    newest = (pd.DataFrame({"k": levels, "c": cid, "t": t}).groupby(["k", "c"])["t"].max()
              .reset_index().sort_values("t", kind="stable", na_position="first")
              .groupby("k")["c"].last())  # an unknown start time: not the newest
    keep = cid == levels.map(newest)
    return df[keep], int((~keep).sum())


def aggregate(df: pd.DataFrame, metric: str, factors: Sequence[str] | None = None,
              extra: Sequence[str] = COST_METRICS) -> pd.DataFrame:
    """One row per configuration (seeds grouped by `cell_id`): its factor levels, mean, std,
    n and 95% CI of `metric` over seeds, the mean of each `extra` metric, the run ids.
    n = 1 gives NaN CI bounds. Aggregates what it is given: pass finished runs only."""
    factors = list(factor_columns(df) if factors is None else factors)
    cols = [*factors, "mean", "std", "n", "ci_low", "ci_high", "run_ids",
            *[e for e in extra if e in df]]
    if df.empty or metric not in df:
        return pd.DataFrame(columns=cols)
    d = df[df[metric].notna()].reset_index(drop=True)
    if d.empty:
        return pd.DataFrame(columns=cols)
    d["_cell"] = cell_keys(d, factors)
    for f in factors:
        d[f] = d[f].astype(object).where(d[f].notna(), OFF)
    g = d.groupby("_cell", sort=False)
    out = g[factors].first() if factors else pd.DataFrame(index=g.size().index)
    vals = g[metric]
    out["mean"] = vals.mean()
    out["std"] = vals.std(ddof=1)
    out["n"] = vals.size()
    # t_halfwidth's quantile once per distinct seed count, not once per configuration
    ppf = {n: stats.t.ppf(0.975, n - 1) for n in out["n"].unique() if n >= 2}
    half = [float(ppf[n] * s / math.sqrt(n)) if n >= 2 and np.isfinite(s) else float("nan")
            for s, n in zip(out["std"], out["n"], strict=True)]
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    out["run_ids"] = (g["run_id"].agg(list) if "run_id" in d
                      else pd.Series([[]] * len(out), index=out.index))
    for e in extra:
        if e in d:
            out[e] = g[e].mean()
    if factors:
        keys = pd.DataFrame({f: out[f].map(label) for f in factors})
        order = [{lv: i for i, lv in enumerate(order_levels(keys[f]))} for f in factors]
        rank = pd.DataFrame({f: keys[f].map(o) for f, o in zip(factors, order, strict=True)})
        out = out.loc[rank.sort_values(factors, kind="stable").index]
    return out.reset_index(drop=True)[cols]


def pareto_front(cost: Sequence[float], acc: Sequence[float], lower_cost_is_better: bool = True
                 ) -> list[int]:
    """Indices of the non-dominated points, by increasing cost (or decreasing, if higher cost
    is better). p dominates q when p is no worse in both and better in one; identical points
    do not dominate each other. O(n log n): one sort and a sweep."""
    c = np.asarray(cost, dtype=float)
    a = np.asarray(acc, dtype=float)
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(a))
    if not lower_cost_is_better:
        c = -c
    order = ok[np.lexsort((-a[ok], c[ok]))]  # cost ascending, then accuracy descending
    front: list[int] = []
    best = -np.inf
    last: tuple[float, float] | None = None
    for i in order:
        if a[i] > best:
            front.append(int(i))
            best, last = a[i], (c[i], a[i])
        elif last is not None and (c[i], a[i]) == last:
            front.append(int(i))  # an exact duplicate of a frontier point
    return front


def frontier(agg: pd.DataFrame, cost: str, acc: str = "mean") -> pd.DataFrame:
    """The rows of an aggregate table on the (cost, accuracy) Pareto frontier, in cost order."""
    if agg.empty or cost not in agg:
        return agg.iloc[0:0]
    idx = pareto_front(agg[cost].to_numpy(), agg[acc].to_numpy(),
                       lower_cost_is_better=cost not in HIGHER_IS_BETTER)
    return agg.iloc[idx]


ALONE = "train_time_alone_s"  # a trial's training time estimated from its profile
# on runs whose profile timed training as they train; an older ablate's profile timed it with
# the whole node's threads at the profile batch (up to 1.5x apart between architectures)
TIMED_AS_TRAINED = "profile_train_batch_size"
AS_TRAINED = (ALONE, "train_img_s", "peak_mem_mb")  # the profile metrics that changed then


def timed_mixed(runs: pd.DataFrame, metric: str = ALONE) -> bool:
    """Whether the runs' `metric` (one of AS_TRAINED) mixes an older ablate's profile (it
    timed training with the node's threads at the profile batch) with today's (the trials'
    own batch and threads): a study resumed across the upgrade keeps its finished runs."""
    if metric not in runs:
        return False
    has = runs[metric].notna()
    new = runs[TIMED_AS_TRAINED].notna() if TIMED_AS_TRAINED in runs else has & False
    return bool((has & new).any() and (has & ~new).any())


IDENTITY = "profile_identity"  # the machine and code behind a run's timing costs (its profile)
# the costs a profile times (machine-dependent); GMACs and params are counted, exactly
TIMED = ("throughput_img_s", "latency_ms", "train_img_s", "peak_mem_mb", ALONE)


def profile_identities(runs: pd.DataFrame) -> list[str]:
    """The profile identities (device, torch, CPUs, cost code) the runs' timing costs were
    measured under, the most runs' first; runs that carry none (an older ablate's, a trial
    that measured its own costs) are not counted."""
    if IDENTITY not in runs:
        return []
    return [str(i) for i in runs[IDENTITY].dropna().value_counts().index]


def timing_apart(runs: pd.DataFrame, metric: str) -> bool:
    """Whether the runs' `metric` cannot share one frontier, mean or ratio: a timing cost
    measured under more than one profile identity (a study resumed on another machine, torch
    or CPU count, or after the cost code changed, keeps its finished runs' costs), or one of
    AS_TRAINED mixing an older ablate's profile with today's (`timed_mixed`)."""
    if metric not in TIMED or metric not in runs:
        return False
    has = runs[runs[metric].notna()]
    return len(profile_identities(has)) > 1 or (metric in AS_TRAINED and timed_mixed(runs, metric))


def timing_sentences(runs: pd.DataFrame) -> list[str]:
    """What the verdict says where the runs' timing costs are not comparable."""
    out = []
    ids = profile_identities(runs)
    if len(ids) > 1:
        out.append(f"Timing costs: the runs' profiles were measured under {len(ids)} "
                   f"identities ({'; '.join(ids[:3])}{'; ...' if len(ids) > 3 else ''}), so "
                   "throughput, latency, training speed, memory and training time alone are "
                   "not comparable across the runs and no frontier is drawn against them "
                   "(GMACs and params are counted, exactly; to compare timings, run the study "
                   "again into a new experiment on one machine).")
    if timed_mixed(runs):
        has = runs[ALONE].notna()
        old = int((has & runs[TIMED_AS_TRAINED].isna()).sum())
        out.append(f"Training time alone: {old} of {int(has.sum())} runs carry a "
                   "train_time_alone_s from an older ablate's profile (timed with the whole "
                   "node's threads at train.profile_batch_size), the rest at their own batch "
                   "and threads; the two are not comparable, so no frontier is drawn against "
                   "it (to compare, run the study again into a new experiment).")
    return out


def unpriced_sentences(agg: pd.DataFrame, factors: Sequence[str]) -> list[str]:
    """Where some configurations carry no cost metrics while others do (their architecture's
    profile failed, e.g. compiling, and its trials ran without one): they are in no cost table
    and on no frontier but train_time_s (measured by the trials), and the verdict names them
    rather than leave them out in silence."""
    if "gmacs" not in agg or agg["gmacs"].notna().all() or agg["gmacs"].isna().all():
        return []
    gone = agg[agg["gmacs"].isna()]
    names = [" ".join(f"{short(f)}={label(r[f])}" for f in factors) or "one configuration"
             for _, r in gone.iterrows()]
    return [f"Costs: {len(gone)} of {len(agg)} configurations carry no cost metrics (their "
            "profile failed), so they are in no cost table and on no frontier but that of the "
            "training time each trial measured itself (train_time_s): "
            f"{'; '.join(names[:5])}{'; ...' if len(names) > 5 else ''}."]

