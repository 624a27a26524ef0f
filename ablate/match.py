"""Equal compute (`model.match`): for every cell, the `dim` or `depth` whose cost is closest
to a target, so cells compare at equal GMACs or parameters rather than at equal hyperparameters.

Costs come from `cost.count_gmacs` / `cost.count_params` on models built on the meta device
(shapes only, no weights), cached per model, so a large study matches in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ablate.spec import DatasetSpec, MatchSpec, ModelSpec, StudySpec

MAX_DIM = 4096
MAX_DEPTH = 96
DEFAULT_CLASSES = {"synthetic": 10, "cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class Matched:
    """What matching chose for a cell: `field` = `value`, with achieved `cost` of `key`."""

    field: str
    value: int
    key: str
    cost: float
    target: float

    def as_dict(self) -> dict[str, Any]:
        return {self.field: self.value, self.key: self.cost}


def data_shape(ds: DatasetSpec) -> tuple[int, int, int] | str:
    """(image size, channels, classes) the models of `ds` see, or why it is unknown here."""
    size = ds.known_image_size()
    if size is None:
        return (f"dataset.image_size: {ds.name} images have no known size before they are "
                "read, and model.match counts cost at that size: set dataset.image_size")
    classes = DEFAULT_CLASSES.get(ds.name)
    if ds.name in ("synthetic", "imagefolder"):
        classes = ds.num_classes or classes
    if classes is None:
        return ("dataset.num_classes: model.match counts the classifier head, so it needs the "
                f"class count of the {ds.name} dataset: set dataset.num_classes")
    return size, ds.channels or 3, classes


@lru_cache(maxsize=4096)
def _cost(args_json: str, shape: tuple[int, int, int]) -> tuple[int, float]:
    import torch

    from ablate.cost import count_gmacs, count_params
    from ablate.models import create_model

    size, chans, classes = shape
    with torch.device("meta"):
        model = create_model("backbone", image_size=size, in_chans=chans, num_classes=classes,
                             **json.loads(args_json))
    return count_params(model), count_gmacs(model, size, chans)


def cost(ms: ModelSpec, shape: tuple[int, int, int]) -> dict[str, float]:
    """{'params', 'gmacs'} of the backbone `ms` for images of `shape` (no weights allocated)."""
    args = ms.model_dump(mode="json", exclude={"arch", "match"}, exclude_none=True)
    params, gmacs = _cost(json.dumps(args, sort_keys=True), shape)
    return {"params": float(params), "gmacs": gmacs}


def candidates(ms: ModelSpec, by: str) -> list[int]:
    """The values `by` may take: dims that are multiples of 8 x heads (heads from the model's
    rule when unset) for mixers with heads, of 8 otherwise; depths even for paired mixers."""
    from ablate.archs import BACKBONE_DEFAULTS, default_heads
    from ablate.archs import MIXER_TRAITS as MIXERS

    cls = MIXERS[ms.mixer or BACKBONE_DEFAULTS["mixer"]]
    if by == "depth":
        return list(range(2 if cls.pairs else 1, MAX_DEPTH + 1, 2 if cls.pairs else 1))
    if "heads" not in cls.uses:
        return list(range(8, MAX_DIM + 1, 8))
    return [d for d in range(8, MAX_DIM + 1, 8) if d % (8 * (ms.heads or default_heads(d))) == 0]


def _nearest(xs: list[int], f: Callable[[int], float], target: float) -> int:
    """Index of the x whose cost f(index) is nearest to `target`. Cost is quadratic in dim
    and affine in depth, so three exact counts predict every candidate; exact counts then
    walk from the prediction to the nearest (a few models counted instead of hundreds)."""
    n = len(xs)
    probes = sorted({0, n // 16, n // 8})  # small models count fastest; the fit is exact
    if len(probes) < 3:
        return min(range(n), key=lambda j: abs(f(j) - target))
    coeffs = np.polyfit([xs[j] for j in probes], [f(j) for j in probes], 2)
    i = int(np.argmin(np.abs(np.polyval(coeffs, np.asarray(xs, dtype=float)) - target)))
    while True:
        near = min((j for j in (i - 1, i, i + 1) if 0 <= j < n),
                   key=lambda j: abs(f(j) - target))
        if near == i:
            return i
        i = near


def match_cell(ds: DatasetSpec, ms: ModelSpec,
               check: Any = None) -> tuple[ModelSpec, Matched] | str:
    """`ms` with its `match.by` field set to the candidate whose cost is closest to the
    target, or the reason no candidate is within tolerance. `check(ms) -> [reasons]` drops
    candidates that cannot run (a TokenLearner position past a shallow depth, ...)."""
    m = ms.match
    if m is None or m.target() is None:
        return "model.match: give exactly one cost key to match: gmacs or params"
    key, target = m.target()
    shape = data_shape(ds)
    if isinstance(shape, str):
        return shape
    options = [ms.model_copy(update={m.by: v}) for v in candidates(ms, m.by)]
    if check is not None:
        options = [o for o in options if not check(o)]
    if not options:
        return "; ".join(check(ms)) if check and check(ms) else (
            f"model.match: no {m.by} lets this cell run")
    best = options[_nearest([getattr(o, m.by) for o in options],
                            lambda i: cost(options[i], shape)[key], target)]
    got = cost(best, shape)[key]
    if abs(got - target) > m.tolerance * target:
        return (f"model.match: cannot reach {key} {target:g} within {m.tolerance:.0%} by "
                f"{m.by}: the nearest reachable is {got:.4g} ({m.by}={getattr(best, m.by)}); "
                "change the target, the tolerance or the field matched")
    return best, Matched(m.by, int(getattr(best, m.by)), key, got, target)


def match_problems(spec: StudySpec) -> list[tuple[str, str]]:
    """Problems of `model.match` (in the model section or as factor levels) that do not
    depend on the cell: no or two cost keys, a target <= 0, `by` also a factor or fixed."""
    found: list[tuple[str, MatchSpec]] = []
    base = spec.model.match
    if base is not None:
        found.append(("model.match", base))
    for gi, grid in enumerate(spec.grids()):
        gpath = f"factors[{gi}]" if isinstance(spec.factors, list) else "factors"
        for k, levels in grid.items():
            if k != "model.match" and not k.startswith("model.match."):
                continue
            for i, level in enumerate(levels):
                if k == "model.match":
                    if isinstance(level, dict):
                        found.append((f"{gpath}.{k}[{i}]", MatchSpec.model_validate(level)))
                    continue
                inner = k.split(".")[2]
                values = {**(base.model_dump() if base else {}), inner: level}
                found.append((f"{gpath}.{k}[{i}]", MatchSpec.model_validate(values)))
    problems: list[tuple[str, str]] = []
    for path, m in found:
        if m.target() is None:
            problems.append((path, "give exactly one cost key to match: gmacs or params"))
            continue
        key, target = m.target()
        if target <= 0:
            problems.append((f"{path}.{key}" if path.endswith("match") else path,
                             f"target must be > 0 (got {target:g})"))
    for by in sorted({m.by for _, m in found}):
        if getattr(spec.model, by) is not None:
            problems.append((f"model.{by}", f"is fixed at {getattr(spec.model, by)} but "
                                            f"model.match picks {by} per cell: remove one"))
        for gi, grid in enumerate(spec.grids()):
            if f"model.{by}" in grid:
                gpath = f"factors[{gi}]" if isinstance(spec.factors, list) else "factors"
                problems.append((f"{gpath}.model.{by}", f"is a factor but model.match picks "
                                                        f"{by} per cell: match by the other "
                                                        "field or drop the factor"))
    return problems
