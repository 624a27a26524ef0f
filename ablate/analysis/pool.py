"""Pooled views: a factor that several grids vary, analysed over the runs of those grids
together, but only where the other factors match.

Definition. For a factor F varied (2+ levels) by grids S, the *other factors* are every
factor column but F, except F's attributes: columns that are a function of F in the runs
of S and vary with it inside a grid (ConvMixer's kernel size is 'off' for every other mixer:
it describes a level of the mixer, it is not a second factor; a fraction that each grid holds
at its own value is a setting, and must match). A grid's *configurations* are the distinct
tuples of the other factors among its runs. The pool keeps, from each grid of S, the runs whose
configuration every grid of S has (the intersection); so F's levels from different grids
are only ever compared at the same levels of everything else. Where no configuration is
common (one grid holds `model.tokens` at off, another varies it over 8 and 16; one grid has
only conv, another no conv), the pool is refused and the reason names the factors.

The pooled runs are one unbalanced design: F and the other factors that still vary among
them, categorical, main effects and every estimable two-factor interaction, type II sums of
squares (grids rarely contribute equal cells and seeds); a run that several grids share
counts once. The largest set of grids that pools wins (most runs on a tie). A pool whose
runs all lie in one grid adds nothing and is dropped. The verdict uses a pool when it has
more levels of F than the single grid it would use otherwise, or as many levels and more
runs, and says so."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pandas as pd

from ablate.analysis.anova import GridFit, fit_grid
from ablate.analysis.design import _build, _varying_keys, attribute_of
from ablate.analysis.seeds import factor_columns, labels, short


@dataclass
class Pooled:
    """F analysed over the runs of several grids where their other factors match."""

    factor: str
    grids: list[int]
    fit: GridFit
    where: dict[str, list[str]]   # other factors restricted to their common levels
    used: bool = False            # the verdict's choice for F
    why: str = ""                 # why it is (or is not) used
    scaling: list[dict] = field(default_factory=list)  # slopes over the pooled runs

    @property
    def n_runs(self) -> int:
        return self.fit.design.n_runs

    @property
    def note(self) -> str:
        grids = "+".join(str(g) for g in self.grids)
        at = "; ".join(f"{short(k)} in {{{', '.join(v)}}}" if len(v) > 1 else
                       f"{short(k)}={v[0]}" for k, v in self.where.items())
        return f"pooled over grids {grids}" + (f", at {at}" if at else "")


@dataclass
class Refusal:
    factor: str
    grids: list[int]
    reason: str


def _attributes(lab: pd.DataFrame, key: str, cols: list[str], rows: dict[int, pd.Index]
                ) -> set[str]:
    """Columns that are a function of `key` in these runs and vary with it inside a grid:
    attributes of its levels, not other factors. A column each grid holds at its own value
    (fraction 1 in one grid, 0.25 in another with no level of `key` in common) is a function
    of `key` in the union too, but it is a setting of the grids that must match."""
    return {c for c in cols if lab[c].nunique() > 1
            and lab.groupby(key)[c].nunique().max() <= 1
            and any(lab.loc[r, c].nunique() > 1 for r in rows.values())}


def _mismatch(lab: pd.DataFrame, rows: dict[int, pd.Index], others: list[str]) -> str:
    """Which other factors keep the grids apart, for the refusal message."""
    parts = []
    for c in others:
        sets = {g: set(lab.loc[r, c]) for g, r in rows.items()}
        if not set.intersection(*sets.values()):
            parts.append(f"{short(c)} (" + "; ".join(
                f"grid {g}: {', '.join(sorted(v))}" for g, v in sets.items()) + ")")
    if parts:
        return "the other factors do not match: " + ", ".join(parts)
    return ("no configuration of " + ", ".join(short(c) for c in others) +
            " is common to these grids")


def _try(df: pd.DataFrame, lab: pd.DataFrame, key: str, group: list[GridFit], metric: str
         ) -> tuple[object, dict[str, list[str]] | None, str]:
    """(Design or None, where, reason) for pooling `key` over the grids of `group`."""
    rows = {f.design.index: f.design.data.index for f in group}
    union = pd.Index(sorted(set().union(*rows.values())))
    cols = [c for c in lab.columns if c != key]
    attrs = _attributes(lab.loc[union], key, cols, rows)
    others = [c for c in cols if c not in attrs]
    conf = {g: pd.Series(list(map(tuple, lab.loc[r, others].to_numpy())), index=r)
            for g, r in rows.items()}
    common = set.intersection(*(set(s) for s in conf.values()))
    if not common:
        return None, None, _mismatch(lab, rows, others)
    keep = pd.Index(sorted({i for s in conf.values() for i in s.index[s.isin(common)]}))
    for g, r in rows.items():
        if keep.isin(r).all():
            return None, None, f"every pooled run is in grid {g}: nothing to add to it"
    sub = lab.loc[keep, [key, *others]]
    keys, _ = _varying_keys(sub)  # a pooled design is checked for confounding by rank
    if key not in keys:
        keys = [key, *[k for k in keys if sub.groupby(key)[k].nunique().max() > 1]]
    keys = [key, *[k for k in keys if k != key]]
    fixed = {c: sub[c].iloc[0] for c in others if sub[c].nunique() == 1}
    where = {}
    for i, c in enumerate(others):
        mine = sorted({t[i] for t in common})
        if len(mine) < lab.loc[union, c].nunique():
            where[c] = mine
    d = _build(-1, df.loc[keep], lab.loc[keep], keys, metric, fixed)
    if d is None or key not in d.keys:
        return None, None, f"{short(key)} has one level where the other factors match"
    # an "attribute" that is another factor changing with `key` (the patch size on each
    # grid's finished diagonal): `key` is confounded with it in the pooled runs too
    for c in sorted(attrs):
        if not attribute_of(c, set(sub[c]) if c in sub else set(lab.loc[keep, c]), [key]):
            d.confounded.setdefault(key, []).append(c)
    return d, where, ""


def pooled_views(df: pd.DataFrame, fits: list[GridFit], metric: str, n_boot: int = 0,
                 seed: int = 0) -> tuple[dict[str, Pooled], list[Refusal]]:
    """Per factor varied by 2+ grids: its pooled view (see the module's doc), and the pools
    refused with their reason. `df` holds the finished runs the grids were built from."""
    cols = factor_columns(df)
    lab = pd.DataFrame({c: labels(df[c]) for c in cols}, index=df.index)
    out: dict[str, Pooled] = {}
    refused: list[Refusal] = []
    keys = list(dict.fromkeys(k for f in fits for k in f.design.keys))
    for key in keys:
        grids = [f for f in fits if key in f.design.keys]
        if len(grids) < 2:
            continue
        best = None
        for size in range(len(grids), 1, -1):
            for group in itertools.combinations(grids, size):
                d, where, why = _try(df, lab, key, list(group), metric)
                idx = [f.design.index for f in group]
                if d is None:
                    refused.append(Refusal(short(key), idx, why))
                elif best is None or d.n_runs > best[0].n_runs:
                    best = (d, where, idx)
            if best is not None:
                break
        if best is None:
            continue
        d, where, idx = best
        p = Pooled(key, idx, fit_grid(d, n_boot, seed), where)
        single = max((f for f in grids), key=lambda f: (len(f.design.levels[key]),
                                                         -f.design.index))
        n_lv, s_lv = len(d.levels[key]), len(single.design.levels[key])
        p.used = n_lv > s_lv or (n_lv == s_lv and d.n_runs > single.design.n_runs)
        p.why = (f"{n_lv} levels of {short(key)} and {d.n_runs} runs, against "
                 f"{s_lv} levels and {single.design.n_runs} runs in grid "
                 f"{single.design.index}")
        out[key] = p
    return out, refused
