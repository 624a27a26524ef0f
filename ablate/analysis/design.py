"""A study's runs split into its factor grids, each a (possibly incomplete) full factorial.

`patches_vs_attention` is a union of three grids: analysing the union as one table would
average conv over four kernel sizes and the other mixers over none. Each grid is analysed on
its own: its runs are those whose grid factors take the grid's levels and whose other
factor columns take the values they take in the grid (a conv run of the kernel-size grid at
the default kernel is the same trial as the mixer grid's conv run, and belongs to both).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ablate.analysis.seeds import (
    OFF,
    factor_columns,
    join_labels,
    label,
    labels,
    order_levels,
)
from ablate.archs import MIXER_FIELDS

MIXER_KEY = "factor.model.mixer"


@dataclass
class Design:
    """One grid's finished runs, ready for a linear model.

    `data` holds the runs (one row each) with `_y` (the metric) and `_cell` (index into
    `cells`); `cells` one row per cell: the key levels, `n` (seeds), `mean`, `ssw` (sum of
    squares within the cell)."""

    index: int
    keys: list[str]
    levels: dict[str, list[str]]
    data: pd.DataFrame
    cells: pd.DataFrame
    fixed: dict[str, str] = field(default_factory=dict)
    interactions: list[tuple[str, str]] = field(default_factory=list)
    dropped_interactions: list[tuple[str, str]] = field(default_factory=list)
    superseded: int = 0
    # key -> the factors it changes together with in the finished runs (wholly or in part):
    # its effect cannot be told from theirs, whatever numbers the model gives it
    confounded: dict[str, list[str]] = field(default_factory=dict)
    # factor columns left out as functions of the keys though no level of theirs is 'off':
    # not attributes of a key (as kernel size 'off' is of the mixer) but confounded with it
    aliased: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return len(self.data)

    @property
    def full_cells(self) -> int:
        return int(np.prod([len(v) for v in self.levels.values()])) if self.keys else 1

    @property
    def complete(self) -> bool:
        return len(self.cells) == self.full_cells

    @property
    def balanced(self) -> bool:
        """Every cell of the full factorial present, with the same number of seeds."""
        return self.complete and self.cells["n"].nunique() == 1

    @property
    def seeds(self) -> tuple[int, int]:
        return int(self.cells["n"].min()), int(self.cells["n"].max())

    @property
    def typical_seeds(self) -> int:
        """Seeds in the median cell: a verdict needs at least 2 (a few cells that lost a
        seed do not void it; a study run with one seed never gets one)."""
        return int(self.cells["n"].median())

    def note(self) -> str:
        if self.balanced:
            return (f"balanced: {len(self.cells)} cells x {self.seeds[0]} seeds "
                    "(type II sums of squares, equal to type I here)")
        lo, hi = self.seeds
        why = []
        if not self.complete:
            why.append(f"{self.full_cells - len(self.cells)} of {self.full_cells} cells missing")
        if lo != hi:
            why.append(f"{lo} to {hi} seeds per cell")
        return "unbalanced (" + ", ".join(why) + "): type II sums of squares"


def _determinant(lab: pd.DataFrame, col: str, keys: list[str]) -> list[str]:
    """The smallest set of `keys` (one key, else all) of which `col` is a function in `lab`."""
    for k in keys:
        if lab.groupby(k)[col].nunique().max() <= 1:
            return [k]
    return list(keys)


def _varying_keys(lab: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """(factor columns that vary in a grid's own runs, minus those that are functions of the
    others; the dropped ones with no 'off' level, each with the keys it is a function of).
    Kernel size 'off' for every mixer but conv is the mixer, not a factor; a patch size that
    changes only together with the mixer (a zipped design, or the crossed cells that did not
    finish) is confounded with it."""
    varying = [c for c in lab.columns if lab[c].nunique() > 1]
    keys = list(varying)
    # Try to drop first: columns with an 'off' level (a parameter only some levels of
    # another factor have), then those with fewer levels, then later columns.
    order = sorted(varying, key=lambda c: (OFF not in set(lab[c]), lab[c].nunique(),
                                           -varying.index(c)))
    dropped = []
    for c in order:
        rest = [k for k in keys if k != c]
        if rest and lab.groupby(rest)[c].nunique().max() <= 1 \
                and len(lab[rest].drop_duplicates()) > 1:
            keys = rest
            dropped.append(c)
    kept = [k for k in varying if k in keys]
    aliased = {}
    for c in dropped:
        det = _determinant(lab, c, kept)
        if not attribute_of(c, set(lab[c]), det):
            aliased[c] = det
    return kept, aliased


def attribute_of(col: str, values: set[str], det: list[str]) -> bool:
    """Whether `col`, a function of the keys `det` in some runs, is an attribute of their
    levels rather than a factor confounded with them: a parameter some levels do not have
    ('off' among its values), or a mixer-specific one (archs.MIXER_FIELDS: conv's kernel 9
    beside pool's window 3, with no mixer that has none in the runs) of the mixer."""
    if OFF in values:
        return True
    field_ = col.removeprefix("factor.model.")
    return col.startswith("factor.model.") and field_ in MIXER_FIELDS and MIXER_KEY in det


def _confounded(data: pd.DataFrame, keys: list[str], levels: dict[str, list[str]]
                ) -> dict[str, list[str]]:
    """Keys whose main effect the finished runs cannot estimate apart from the others' (the
    rank a key's dummies add to the main-effects model falls short of its levels - 1), each
    with the keys it is confounded with: those beside which alone it already falls short,
    else all the others."""
    def dummies(k: str) -> np.ndarray:
        cols = [(data[k] == lv).to_numpy(float) for lv in levels[k][1:]]
        return np.column_stack(cols) if cols else np.zeros((len(data), 0))

    def short_of(k: str, others: list[str]) -> bool:
        base = [np.ones((len(data), 1)), *(dummies(o) for o in others)]
        r0 = np.linalg.matrix_rank(np.column_stack(base))
        r1 = np.linalg.matrix_rank(np.column_stack([*base, dummies(k)]))
        return r1 - r0 < len(levels[k]) - 1

    out = {}
    for k in keys:
        others = [o for o in keys if o != k]
        if others and short_of(k, others):
            out[k] = [o for o in others if short_of(k, [o])] or others
    return out


def _select(lab: pd.DataFrame, own: pd.Index, keys: list[str],
            allowed: dict[str, set[str]] | None) -> tuple[pd.Series, dict[str, str]]:
    """Rows of the grid: keys within their levels, every other factor column as in the
    grid's own runs (a constant, or the value its determining key gives it)."""
    mask = pd.Series(True, index=lab.index)
    for k, ok in (allowed or {}).items():
        mask &= lab[k].isin(ok)
    mine = lab.loc[own]
    fixed: dict[str, str] = {}
    for c in lab.columns:
        if c in keys:
            continue
        vals = set(mine[c])
        if len(vals) == 1:
            fixed[c] = next(iter(vals))
            mask &= lab[c] == fixed[c]
            continue
        det = _determinant(mine, c, keys)
        pairs = set(map(tuple, mine[[*det, c]].to_numpy()))
        mask &= pd.Series([tuple(r) in pairs for r in lab[[*det, c]].to_numpy()],
                          index=lab.index)
    return mask, fixed


def _build(index: int, sub: pd.DataFrame, lab: pd.DataFrame, keys: list[str], y: str,
           fixed: dict[str, str]) -> Design | None:
    keys = [k for k in keys if lab[k].nunique() > 1]
    superseded = 0
    key_lab = join_labels(lab[keys])
    if "cell_id" in sub and sub["cell_id"].notna().any() and keys:
        # Two cell ids with the same levels: the study was edited (say, its lr). Keep the
        # newest configuration's runs; older ones are not extra seeds.
        cid = sub["cell_id"].astype(object).where(sub["cell_id"].notna(), "cfg:" + key_lab)
        t = sub["start_time"] if "start_time" in sub else pd.Series(0, index=sub.index)
        newest = (pd.DataFrame({"k": key_lab, "c": cid, "t": t}).groupby(["k", "c"])["t"]
                  .max().reset_index().sort_values("t", na_position="first")
                  .groupby("k")["c"].last())  # an unknown start time: not the newest
        keep = cid == key_lab.map(newest)
        superseded = int((~keep).sum())
        sub, lab, key_lab = sub[keep], lab[keep], key_lab[keep]
    if sub.empty:
        return None
    levels = {k: order_levels(lab[k]) for k in keys}
    data = pd.DataFrame({"_y": sub[y].astype(float)}, index=sub.index)
    for k in keys:
        data[k] = lab[k]
    for c in ("run_id", "run_name", "seed", "status", "cell_id"):
        if c in sub:
            data[c] = sub[c]
    codes, uniq = pd.factorize(key_lab)
    data["_cell"] = codes
    g = data.groupby("_cell")["_y"]
    cells = pd.DataFrame({"n": g.size(), "mean": g.mean()})
    cells["ssw"] = ((data["_y"] - g.transform("mean")) ** 2).groupby(data["_cell"]).sum()
    first = data.groupby("_cell")[keys].first() if keys else pd.DataFrame(index=cells.index)
    cells = pd.concat([first, cells], axis=1).sort_index()
    inter, dropped = [], []
    for a, b in itertools.combinations(keys, 2):
        full = len(levels[a]) * len(levels[b])
        (inter if len(cells[[a, b]].drop_duplicates()) == full else dropped).append((a, b))
    n_main = 1 + sum(len(v) - 1 for v in levels.values())
    n_inter = sum((len(levels[a]) - 1) * (len(levels[b]) - 1) for a, b in inter)
    if len(data) - n_main - n_inter <= 0:  # no residual left to test against (one seed)
        dropped, inter = dropped + inter, []
    return Design(index, keys, levels, data, cells, fixed, inter, dropped, superseded,
                  _confounded(cells, keys, levels))


def designs(df: pd.DataFrame, metric: str, grids: list[dict[str, list[Any]]] | None = None
            ) -> list[Design]:
    """The grids of finished runs `df` (see `split_status`). `grids` are the study's factor
    grids (`StudySpec.grids()`, keys without `factor.`); without them the runs' `grid`
    column splits them, and factors are the columns that vary within a grid."""
    cols = factor_columns(df)
    if df.empty:
        return []
    lab = pd.DataFrame({c: labels(df[c]) for c in cols}, index=df.index)
    out: list[Design] = []
    has_grid = "grid" in df and df["grid"].notna().any()
    if grids:
        for gi, grid in enumerate(grids):
            own = df.index[df["grid"] == gi] if has_grid else df.index
            if len(own) == 0:
                continue
            spec = {f"factor.{k}": {label(v) for v in lv} for k, lv in grid.items()
                    if f"factor.{k}" in lab}
            keys = [k for k, v in spec.items() if len(v) > 1]
            mask, fixed = _select(lab, own, keys, spec)
            d = _build(gi, df[mask], lab[mask], keys, metric, fixed)
            if d is not None:
                out.append(d)
        return out
    groups = sorted(df["grid"].dropna().unique()) if has_grid else [None]
    for gi in groups:
        own = df.index[df["grid"] == gi] if gi is not None else df.index
        keys, aliased = _varying_keys(lab.loc[own])
        mask, fixed = _select(lab, own, keys, None)
        d = _build(int(gi) if gi is not None else 0, df[mask], lab[mask], keys, metric, fixed)
        if d is not None:
            d.aliased = aliased
            for c, det in aliased.items():
                for k in det:
                    d.confounded.setdefault(k, []).append(c)
            out.append(d)
    return out
