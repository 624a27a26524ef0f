"""Optuna search: validation of the `search` section, the space as Optuna distributions, the
storage and the resumable study name. Ray-free; the runner drives it through Tune."""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ablate.errors import AblateError, mask_url
from ablate.spec import (
    NESTED,
    NOT_A_FACTOR,
    SECTION_MODELS,
    did_you_mean,
    drop_scope,
    set_field,
    split_key,
)

if TYPE_CHECKING:  # pragma: no cover
    from ablate.spec import StudySpec

OBJECTIVE_METRICS = ("val_acc", "best_val_acc", "params", "gmacs", "throughput_img_s",
                     "latency_ms", "train_img_s", "peak_mem_mb", "train_time_alone_s",
                     "train_time_s")


def _field_kind(section: str, name: str) -> str:
    """'int', 'float' or 'other' for a dotted field, from its pydantic annotation."""
    outer, _, inner = name.partition(".")
    model = NESTED[section, outer] if inner else SECTION_MODELS[section]
    ann = str(model.model_fields[inner or name].annotation)
    if "int" in ann.lower() and "float" not in ann.lower():
        return "int"
    if "float" in ann.lower():
        return "float"
    return "other"


def full_space(spec: StudySpec) -> dict[str, Any]:
    """The search space: `search.space` plus `factors` as categorical dimensions."""
    space = dict(spec.search.space)
    if isinstance(spec.factors, dict):
        for k, levels in spec.factors.items():
            space.setdefault(k, list(levels))
    return space


def check_search(spec: StudySpec) -> list[tuple[str, str]]:
    """Every problem of an Optuna `search` section, as (dotted path, message)."""
    problems: list[tuple[str, str]] = []
    s = spec.search
    objs = s.objectives
    if not objs:
        problems.append(("search.objectives", "is empty: e.g. {val_acc: max}"))
    for m in objs:
        if m == "test_acc":
            problems.append((f"search.objectives.{m}", "optimizing on the test set leaks it "
                                                       "into model selection: use val_acc"))
        elif m not in OBJECTIVE_METRICS:
            problems.append((f"search.objectives.{m}", "unknown metric"
                             + did_you_mean(m, list(OBJECTIVE_METRICS))))
    if isinstance(spec.factors, list):
        problems.append(("factors", "an Optuna search takes one factor mapping (its levels "
                                    "become categorical dimensions), not a list of grids"))
    space = full_space(spec)
    if not space:
        problems.append(("search.space", "is empty: give at least one dimension, e.g. "
                                         "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}"))
    has_categorical = False
    for key, dim in space.items():
        path = f"search.space.{key}"
        where = split_key(key)
        if isinstance(where, str):
            problems.append((path, f"unknown dotted key: {where}"))
            continue
        section, name = where
        if key in NOT_A_FACTOR:
            problems.append((path, f"cannot be a search dimension: {NOT_A_FACTOR[key]}"))
            continue
        if key == "train.precision_scope":  # a profile is looked up by architecture, not scope
            problems.append((path, "is the study's choice, not a dimension: set "
                                   "train.precision_scope once (study or architecture)"))
            continue
        if isinstance(dim, list):
            has_categorical = True
            if not dim:
                problems.append((path, "empty categorical: list at least one value"))
            for i, v in enumerate(dim):
                base = getattr(spec, section).model_dump()
                set_field(base, name, v)
                try:
                    SECTION_MODELS[section].model_validate(base)
                except ValidationError as e:
                    problems.append((f"{path}[{i}]", e.errors()[0]["msg"]))
            continue
        if not isinstance(dim, dict) or not {"low", "high"} <= set(dim) or set(dim) - {
                "low", "high", "log", "step"}:
            problems.append((path, "a dimension is a list (categorical) or {low, high, "
                                   "log?, step?}"))
            continue
        low, high, log, step = dim["low"], dim["high"], dim.get("log", False), dim.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in (low, high)):
            problems.append((path, "low and high must be numbers"))
            continue
        kind = _field_kind(section, name)
        if kind == "other":
            problems.append((path, f"{key} is not numeric: give a list of values"))
            continue
        if low > high:
            problems.append((path, f"low {low} > high {high}: swap them"))
        if log and low <= 0:
            problems.append((path, f"log scale needs low > 0 (got {low})"))
        if log and step is not None:
            problems.append((path, "log and step cannot be combined (Optuna): drop one"))
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            problems.append((path, f"{key} is an integer: low and high must be integers"))
        if step is not None:
            if not isinstance(step, (int, float)) or step <= 0:
                problems.append((path, "step must be a positive number"))
            elif kind == "int" and not float(step).is_integer():
                problems.append((path, f"{key} is an integer: step must be an integer"))
            else:
                n = (high - low) / step
                if not math.isclose(n, round(n), abs_tol=1e-9):
                    problems.append((path, f"step {step} does not fit between low {low} and "
                                           f"high {high} ((high - low) / step = {n:g})"))
    if s.sampler == "cmaes":
        if has_categorical:
            problems.append(("search.sampler", "cmaes cannot sample categorical dimensions: "
                                               "use tpe"))
        if len(objs) > 1:
            problems.append(("search.sampler", "cmaes is single-objective: use nsga2 or tpe"))
    if len(objs) > 1 and spec.scheduler.name == "asha":
        problems.append(("scheduler.name", "ASHA prunes on one metric and cannot serve a "
                                           "multi-objective search: use fifo"))
    if spec.scheduler.name == "asha" and len(objs) == 1:
        (metric, mode), = objs.items()
        if spec.scheduler.metric != metric or spec.scheduler.mode != mode:
            problems.append(("scheduler.metric", f"ASHA prunes on {spec.scheduler.metric} "
                                                 f"({spec.scheduler.mode}) but the search "
                                                 f"optimizes {metric} ({mode}): make them "
                                                 "the same"))
    return problems


def distributions(spec: StudySpec) -> dict[str, Any]:
    """The space as Optuna distributions, keyed by dotted field name."""
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for key, dim in full_space(spec).items():
        if isinstance(dim, list):
            out[key] = od.CategoricalDistribution(dim)
            continue
        section, name = key.split(".", 1)
        log, step = bool(dim.get("log", False)), dim.get("step")
        if _field_kind(section, name) == "int":
            out[key] = od.IntDistribution(int(dim["low"]), int(dim["high"]), log=log,
                                          step=int(step or 1))
        else:
            out[key] = od.FloatDistribution(float(dim["low"]), float(dim["high"]), log=log,
                                            step=None if step is None else float(step))
    return out


def study_name(spec: StudySpec) -> str:
    """Stable Optuna study name: the study's name + a hash of what defines the search."""
    space = full_space(spec)
    base = {s: getattr(spec, s).model_dump(mode="json") for s in ("dataset", "model", "train")}
    auto = spec.train.precision == "auto" or "auto" in (space.get("train.precision") or [])
    drop_scope(base["train"], auto)  # the names of searches from before the field, kept
    parts = {"space": space, "objectives": spec.search.objectives,
             "sampler": spec.search.sampler, "seeds": spec.seeds, "base": base}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"{spec.name}-{digest[:10]}"


def default_storage_url() -> str:
    from ablate.tracking import default_store_dir

    return f"sqlite:///{default_store_dir() / 'optuna.db'}"


def open_storage(url: str | None):
    """An Optuna RDB storage; raises AblateError naming the URL when it cannot be opened."""
    import optuna

    url = url or default_storage_url()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    from ablate.tracking import store_lock

    try:
        with store_lock(url):  # creating the schema is not safe from two processes at once
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 - any driver error means the same fix
        msg = str(e).splitlines()[0][:300]
        raise AblateError(f"search.storage: cannot open Optuna storage "
                          f"{mask_url(url)} ({mask_url(msg)}); check "
                          "the URL, the server and the driver (e.g. psycopg for "
                          "postgresql://)") from None


def make_sampler(spec: StudySpec, seed: int = 0):
    import optuna

    name = spec.search.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed)


def pareto_set(storage, name: str) -> list[dict[str, Any]]:
    """The Pareto-optimal (multi-objective) or best (single) complete trials of a study."""
    import optuna

    st = optuna.load_study(study_name=name, storage=storage)
    best = st.best_trials if len(st.directions) > 1 else (
        [st.best_trial] if any(t.state.name == "COMPLETE" for t in st.trials) else [])
    return [{"number": t.number, "values": t.values, "params": t.params} for t in best]
