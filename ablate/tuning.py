"""Equal tuning (`tune`): each level of `tune.per` gets its own Optuna search on val_acc
before the grid runs, and every grid trial takes its level's best values.

A level's search is an ordinary Optuna search (`search.py`) of a derived study spec: the
study's sections with the level's factor values and `tune.epochs`, `tune.space` as the space.
Its name hashes all of that, so a changed `tune` section is a new tuning. Ray-free.
"""

from __future__ import annotations

import re
from typing import Any

from ablate.search import check_search
from ablate.spec import SECTION_MODELS, StudySpec, set_field

PHASE_TAG, LEVEL_TAG = "ablate.phase", "ablate.tune_level"


def level_label(values: dict[str, Any]) -> str:
    """`model.mixer=attention, model.patch_size=4`; `all` when tuning is not per level."""
    return ", ".join(f"{k}={'off' if v is None else v}" for k, v in values.items()) or "all"


def level_spec(spec: StudySpec, values: dict[str, Any], experiment: str) -> StudySpec:
    """The Optuna search spec of one tuning level (`values`: its `tune.per` factor levels)."""
    tune = spec.tune
    assert tune is not None
    sections = {s: getattr(spec, s).model_dump(mode="json") for s in SECTION_MODELS}
    for key, v in values.items():
        section, _, name = key.partition(".")
        set_field(sections[section], name, v)
    if tune.epochs is not None:
        sections["train"]["epochs"] = tune.epochs
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(
        f"{k.split('.')[-1]}_{v}" for k, v in values.items()))
    return StudySpec.model_validate({
        **sections,
        "name": f"{spec.name}-tune" + (f"-{slug}" if slug else ""),
        "seeds": list(tune.seeds),
        "search": {"method": "optuna", "sampler": "tpe", "n_trials": tune.n_trials,
                   "objectives": {"val_acc": "max"}, "space": dict(tune.space),
                   "storage": spec.search.storage},
        "scheduler": spec.scheduler.model_dump(), "resources": spec.resources.model_dump(),
        "failures": spec.failures.model_dump(),
        "tracking": {"uri": spec.tracking.uri, "experiment": experiment},
    })


def check_tune(spec: StudySpec) -> list[tuple[str, str]]:
    """Every problem of a `tune` section, as (dotted path, message)."""
    tune = spec.tune
    if tune is None:
        return []
    problems: list[tuple[str, str]] = []
    if spec.search.method == "optuna":
        problems.append(("tune", "cannot be combined with search.method: optuna (a search "
                                 "already tunes what it samples): drop one"))
    factors = {k for grid in spec.grids() for k in grid}
    for i, key in enumerate(tune.per):
        if key not in factors:
            problems.append((f"tune.per[{i}]", f"{key} is not a factor: tune per factor keys "
                                               f"({', '.join(sorted(factors)) or 'none'})"))
    if len(set(tune.per)) != len(tune.per):
        problems.append(("tune.per", "lists a key twice: list each once"))
    if not tune.space:
        problems.append(("tune.space", "is empty: e.g. train.lr: {low: 3.0e-4, high: 1.0e-2, "
                                       "log: true}"))
    for key in tune.space:
        if key in factors:
            problems.append((f"tune.space.{key}", "is also a factor: a value cannot be both "
                                                  "tuned and varied; drop one"))
        if key in tune.per:
            problems.append((f"tune.space.{key}", "is also in tune.per: drop one"))
    if not tune.seeds or len(set(tune.seeds)) != len(tune.seeds):
        problems.append(("tune.seeds", "list at least one seed, each once, e.g. [0]"))
    if problems:
        return problems
    derived = level_spec(spec.model_copy(update={"factors": {}}), {}, spec.name)
    for path, msg in check_search(derived):
        problems.append((path.replace("search.space", "tune.space", 1), msg))
    return problems
