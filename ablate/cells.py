"""Grid cells: what a cell's model resolves to, and why a cell may not run or may not run
what its factors say (a factor the model ignores, a kernel a mixer cannot take, two cells
that are one trial). Below `study`, which expands the grids and reports these problems."""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ablate.archs import (
    BACKBONE_DEFAULTS,
    REFERENCE_NAMES,
    TOKEN_FIELDS,
    default_heads,
    resolve_args,
)
from ablate.archs import MIXER_TRAITS as MIXERS
from ablate.spec import DatasetSpec, ModelSpec, StudySpec, did_you_mean

if TYPE_CHECKING:
    from ablate.study import TrialSpec


def yaml_level(v: Any) -> str:
    """A level as the study file writes it."""
    return "null" if v is None else json.dumps(v) if isinstance(v, bool) else str(v)


def fmt_level(v: Any) -> str:
    if v is None:
        return "off"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def check_validation_split(spec: StudySpec, problems: list[tuple[str, str]]) -> None:
    """val_fraction 0 leaves val_acc undefined: only on explicit request, and only when no
    scheduler or search objective selects on a validation metric."""
    zeros = ["dataset.val_fraction"] if spec.dataset.val_fraction == 0 else []
    for gi, grid in enumerate(spec.grids()):
        gpath = f"factors[{gi}]" if isinstance(spec.factors, list) else "factors"
        zeros += [f"{gpath}.dataset.val_fraction[{i}]"
                  for i, v in enumerate(grid.get("dataset.val_fraction", [])) if v == 0]
    if not zeros:
        return
    needs = []
    if spec.scheduler.name != "fifo" and spec.scheduler.metric.startswith("val"):
        needs.append(f"scheduler.metric {spec.scheduler.metric}")
    if spec.search.method == "optuna":
        needs += [f"search objective {k}" for k in spec.search.objectives if k.startswith("val")]
    for path in zeros:
        if not spec.dataset.allow_no_val:
            problems.append((path, "0 leaves no validation split, so val_acc and best_val_acc "
                                   "are undefined: use a fraction such as 0.1, or set "
                                   "dataset.allow_no_val: true if no metric needs validation"))
        elif needs:
            problems.append((path, f"0 leaves no validation split, but {', '.join(needs)} "
                                   "selects on it: use a fraction such as 0.1"))


@functools.cache
def _timm_models() -> frozenset[str]:
    """timm's model names (importing timm, and torch: only a study that names a timm model)."""
    import timm

    return frozenset(timm.list_models())


def check_cell(ds: DatasetSpec, ms: ModelSpec, factor_keys: Iterable[str] = ()) -> list[str]:
    """Reasons a (dataset, model) cell cannot run, or would not run what its factors say
    (`factor_keys`: the dotted keys the study varies in this cell); empty when it can."""

    reasons = [r for k in factor_keys if (r := ignored_factor(ms, k))]
    if ms.arch != "backbone":
        if ms.arch not in REFERENCE_NAMES and not ms.arch.startswith("timm:"):
            reasons.append(f"model.arch: unknown architecture {ms.arch!r}; use backbone, "
                           f"timm:<name> or one of {', '.join(REFERENCE_NAMES)}")
        elif ms.arch.startswith("timm:") and (name := ms.arch[5:]) not in _timm_models():
            close = difflib.get_close_matches(name, _timm_models(), n=1, cutoff=0.6)
            reasons.append(f"model.arch: timm has no model {name!r}; "
                           + (f"did you mean 'timm:{close[0]}'?" if close
                              else "see timm.list_models()"))
        return reasons
    mixer = ms.mixer or BACKBONE_DEFAULTS["mixer"]
    if mixer not in MIXERS:
        return [f"model.mixer: unknown mixer {mixer!r}"
                + did_you_mean(mixer, list(MIXERS)).replace("known keys", "choose one of")]
    cls = MIXERS[mixer]
    patch = ms.patch_size or BACKBONE_DEFAULTS["patch_size"]
    size = ds.known_image_size()
    depth = ms.depth or BACKBONE_DEFAULTS["depth"]
    dim = ms.dim or BACKBONE_DEFAULTS["dim"]
    heads = ms.heads or default_heads(dim)
    if size is not None and size % patch:
        reasons.append(f"model.patch_size: {patch} does not divide the image size {size}")
    if ms.kernel_size is not None and "kernel_size" not in cls.uses and not any(
            k == "model.kernel_size" for k in factor_keys):
        with_kernel = ", ".join(k for k, c in MIXERS.items() if "kernel_size" in c.uses)
        reasons.append(f"model.kernel_size: is set but mixer '{mixer}' has no kernel: give "
                       f"kernel sizes only to {with_kernel} (use a list of factor grids)")
    if cls.pairs and depth % 2:
        reasons.append(f"model.depth: mixer '{mixer}' runs blocks in pairs, depth {depth} must "
                       "be even")
    if "heads" in cls.uses and dim % heads:
        reasons.append(f"model.heads: dim {dim} is not divisible by heads {heads}")
    kernel = ms.kernel_size or cls.default_kernel
    if "kernel_size" in cls.uses and kernel is not None and cls.kernel_problem(kernel):
        reasons.append(f"model.kernel_size: mixer '{mixer}': {cls.kernel_problem(kernel)}")
    at = ms.token_learner_at if ms.token_learner_at is not None else depth // 2
    if (ms.pos_embed or cls.default_pos_embed) == "cpe":
        if not cls.mixes:
            reasons.append(f"model.pos_embed: cpe is a convolution across patches, which mixer "
                           f"'{mixer}' (no token mixing) must not have: use learned or none")
        if ms.tokens is not None and at < depth:
            reasons.append("model.pos_embed: cpe needs the patch grid before every block, and "
                           "the TokenLearner removes it: use learned or none with tokens")
    if ms.tokens is not None:
        if at > depth:
            reasons.append(f"model.token_learner_at: {at} is past the last block ({depth})")
        if ms.token_fuser and at == depth:
            reasons.append(f"model.token_fuser: no block follows the TokenLearner at {at} = "
                           "depth, so the fuser would fuse nothing: lower token_learner_at")
        if size is not None and size % patch == 0 and ms.tokens > (size // patch) ** 2:
            reasons.append(f"model.tokens: {ms.tokens} TokenLearner tokens exceed the "
                           f"{(size // patch) ** 2} patches of a {size}px image at patch "
                           f"size {patch}")
        if cls.needs_grid and at < depth:
            reasons.append(f"model.tokens: TokenLearner removes the patch grid that mixer "
                           f"'{mixer}' needs after it; use tokens with "
                           + ", ".join(k for k, c in MIXERS.items() if not c.needs_grid))
    elif ms.token_learner_at is not None or ms.token_fuser:
        reasons.append("model.token_learner_at/token_fuser are set but model.tokens is not")
    return reasons


def ignored_factor(ms: ModelSpec, key: str) -> str | None:
    """Why the factor `key` has no effect on this cell's model, or None when it has one."""

    section, _, name = key.partition(".")
    if section != "model" or name == "arch" or getattr(ms, name, None) is None:
        return None
    if ms.arch != "backbone":
        return (f"model.{name}: is a factor but model.arch '{ms.arch}' ignores it (only the "
                f"backbone takes it): vary it in a factor grid of its own with the backbone")
    resolved = resolved_model(ms)
    if resolved.get(name) is not None:
        return None
    if name in TOKEN_FIELDS:
        return (f"model.{name}: is a factor but model.tokens is not set, so there is no "
                "TokenLearner to take it: set model.tokens in the same factor grid")
    mixer = resolved["mixer"]
    users = ", ".join(k for k, c in MIXERS.items() if name in c.uses)
    return (f"model.{name}: is a factor but mixer '{mixer}' does not use it: give {name} only "
            f"to {users} (use a list of factor grids)")


def resolved_model(ms: ModelSpec) -> dict[str, Any]:
    """The model part of a resolved config: the backbone's arguments as it resolves them
    (defaults filled in, ignored ones None); only the name for any other architecture."""
    if ms.arch != "backbone":
        return {"arch": ms.arch}
    model = ms.model_dump(mode="json")
    match = model.pop("match")
    args = resolve_args(**{k: v for k, v in model.items() if k != "arch"})
    out = {"arch": ms.arch, **{k: args[k] for k in model if k != "arch"}}
    if match is not None:  # only then: the ids of studies without it stay as they were
        out["match"] = match
    return out


@dataclass(frozen=True)
class Cell:
    """One grid cell as written (`levels`) and the first of its trials."""

    label: str
    grid: int
    levels: dict[str, Any]
    trial: TrialSpec


def merge_cell(cells: dict[str, Cell], cell: Cell, problems: list[tuple[str, str]],
               warnings: list[tuple[str, str]]) -> bool:
    """Record `cell`; False when an earlier cell is the same trial. Same trial with different
    factor labels is an error (a factor the model ignores); a level that resolves to another
    level of the same grid (such as null and the model default) is merged with a warning;
    overlapping grids merge silently (their union is the study)."""
    prev = cells.setdefault(cell.trial.cell_id, cell)
    if prev is cell:
        return True
    differ = [k for k in cell.trial.factors if cell.trial.factors[k] != prev.trial.factors.get(k)]
    if differ:
        problems.append((f"{prev.label} and {cell.label}",
                         f"are the same trial although {', '.join(differ)} differ: the model "
                         "ignores it; remove it from one of the cells"))
    elif prev.grid == cell.grid:
        for k, v in cell.levels.items():
            if prev.levels.get(k) != v:
                both = fmt_level(cell.trial.factors.get(k))
                warnings.append((cell.label, f"{k}={yaml_level(v)} is the same model as "
                                 f"{k}={yaml_level(prev.levels.get(k))} (both resolve to {both}): "
                                 "merged, run once"))
    return False
