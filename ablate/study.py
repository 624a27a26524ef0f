"""Study files: YAML -> validated, frozen `StudySpec` -> the list of `TrialSpec`s to run.

Everything a user can get wrong is found here, before anything runs or any file is written,
and reported as `file: dotted.path: message` lines (one `StudyError` carrying all of them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ablate.cells import (
    Cell,
    check_cell,
    check_validation_split,
    fmt_level,
    merge_cell,
    resolved_model,
)
from ablate.errors import StudyError
from ablate.match import Matched, match_cell, match_problems
from ablate.overrides import apply_sets, label
from ablate.search import check_search
from ablate.spec import (  # noqa: F401 - re-exported: the schema's public home is ablate.study
    NOT_A_FACTOR,
    SECTION_MODELS,
    DatasetSpec,
    FailuresSpec,
    ModelSpec,
    ResourcesSpec,
    SchedulerSpec,
    SearchSpec,
    Strict,
    StudySpec,
    TrackingSpec,
    TrainSpec,
    did_you_mean,
    drop_scope,
    set_field,
    split_key,
)
from ablate.studyfile import (  # noqa: F401 - re-exported: ablate.study is the public entry
    MAX_STUDY_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    _expand_tree,
    expand_vars,
    read_study_file,
)
from ablate.tuning import check_tune, level_label, level_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialSpec:
    """One cell of the study x one seed, fully resolved. `cell_id` hashes the same resolved
    config without the seed: the seeds of one configuration share it, and nothing else does.
    `grid` is the index of the factor grid the trial came from (0 for a single grid)."""

    trial_id: str
    cell_id: str
    seed: int
    grid: int
    dataset: DatasetSpec
    model: ModelSpec
    train: TrainSpec
    factors: dict[str, Any]
    config: dict[str, Any] = field(repr=False)  # the resolved config the id hashes
    matched: Matched | None = field(default=None, repr=False, compare=False)  # model.match

    @classmethod
    def build(cls, ds: DatasetSpec, ms: ModelSpec, ts: TrainSpec, seed: int, grid: int,
              keys: list[str], matched: Matched | None = None) -> TrialSpec:
        """Resolve the config, hash it into the trial and cell ids, read the factor levels."""
        return cls.build_seeds(ds, ms, ts, [seed], grid, keys, matched)[0]

    @classmethod
    def build_seeds(cls, ds: DatasetSpec, ms: ModelSpec, ts: TrainSpec, seeds: Sequence[int],
                    grid: int, keys: list[str], matched: Matched | None = None
                    ) -> list[TrialSpec]:
        """`build` for each seed of one cell: the config resolved, the cell id hashed and the
        factor levels read once (a 5,000-trial study file loads in a fraction of the time)."""
        base = resolved_config(ds, ms, ts, 0)
        cid = cell_id(base)
        levels = {k: _level(base, (ds, ms, ts), k) for k in keys}
        parts = {k: _json(v) for k, v in base.items() if k != "seed"}  # dumped once per cell
        out = []
        for seed in seeds:
            config = {**base, "seed": seed}
            out.append(cls(_hash({**parts, "seed": _json(seed)}), cid, seed, grid, ds, ms, ts,
                           dict(levels), config, matched))
        return out

    @property
    def run_name(self) -> str:
        parts = [f"{k.split('.', 1)[1]}={fmt_level(v)}" for k, v in self.factors.items()]
        return " ".join([*parts, f"seed={self.seed}"])

    @property
    def cell_name(self) -> str:
        """The run name without its seed: names the configuration all seeds share."""
        return " ".join(self.run_name.split(" ")[:-1]) or self.run_name

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "cell_id": self.cell_id, "seed": self.seed,
                "grid": self.grid, "factors": self.factors,
                "dataset": self.dataset.model_dump(mode="json"),
                "model": self.model.model_dump(mode="json"),
                "train": self.train.model_dump(mode="json")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        ds, ms, ts = (DatasetSpec.model_validate(d["dataset"]),
                      ModelSpec.model_validate(d["model"]), TrainSpec.model_validate(d["train"]))
        config = resolved_config(ds, ms, ts, d["seed"])
        return cls(d["trial_id"], d["cell_id"], d["seed"], d["grid"], ds, ms, ts,
                   dict(d["factors"]), config)


@dataclass(frozen=True)
class Study:
    spec: StudySpec
    path: Path
    file_hash: str
    trials: list[TrialSpec]
    factor_keys: list[str]
    warnings: list[str] = field(default_factory=list)  # `file: path: message` lines
    sets: tuple[str, ...] = ()  # the `--set KEY=VALUE` overrides applied to the file
    profile: bool = True  # False: trials skip the cost profile (a smoke run)
    reprofile: bool = False  # True: measure every architecture again (`ablate run --reprofile`)

    @property
    def experiment(self) -> str:
        return self.spec.tracking.experiment or self.spec.name


# ---------------------------------------------------------------- environment variables



def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _pydantic_problems(err: ValidationError, prefix: str, model: type[BaseModel]
                       ) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("list[str,list[any]]",
                                                     "dict[str,list[any]]"))
        path = _loc(loc)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))
        elif e["type"] == "missing":
            msg = "is required"
        elif "input" in e and e["type"] not in ("extra_forbidden",):
            msg = f"{msg} (got {e['input']!r})"
        problems.append((path, msg))
    return problems


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    cur: Any = model
    for part in loc:
        f = getattr(cur, "model_fields", {}).get(part)
        if f is None:
            return []
        cur = f.annotation
    return list(getattr(cur, "model_fields", {}))


def _canon(level: Any) -> str:
    return json.dumps(level, sort_keys=True, default=str)


def _check_factors(spec: StudySpec, problems: list[tuple[str, str]]) -> None:
    grids = spec.grids()
    for gi, grid in enumerate(grids):
        gpath = f"factors[{gi}]" if isinstance(spec.factors, list) else "factors"
        if isinstance(spec.factors, list) and not grid:
            problems.append((gpath, "empty factor grid: remove it or give it factors"))
        for key, levels in grid.items():
            path = f"{gpath}.{key}"
            where = split_key(key)
            if isinstance(where, str):
                problems.append((path, where))
                continue
            section, name = where
            if key in NOT_A_FACTOR and len(levels) > 1:
                problems.append((path, f"cannot be a factor: {NOT_A_FACTOR[key]}"))
                continue
            if not levels:
                problems.append((path, "has no levels: list at least one value"))
                continue
            seen: set[str] = set()
            for i, level in enumerate(levels):
                c = _canon(level)
                if c in seen:
                    problems.append((f"{path}[{i}]", f"duplicate level {level!r}: "
                                                     "list each level once"))
                seen.add(c)
                base = getattr(spec, section).model_dump()
                set_field(base, name, level)
                try:
                    SECTION_MODELS[section].model_validate(base)
                except ValidationError as e:
                    for _p, msg in _pydantic_problems(e, "", SECTION_MODELS[section]):
                        problems.append((f"{path}[{i}]", msg))


def resolved_config(ds: DatasetSpec, ms: ModelSpec, ts: TrainSpec, seed: int) -> dict[str, Any]:
    """The fully resolved config a trial id hashes: model defaults filled in, and what the
    model ignores blanked (None)."""
    model = resolved_model(ms)
    dataset = ds.model_dump(mode="json")
    train = ts.model_dump(mode="json")
    if not train["compile"]:  # only then: the ids of studies without it stay as they were
        del train["compile"]
    drop_scope(train, train["precision"] == "auto")
    return {"dataset": dataset, "model": model, "train": train, "seed": seed}


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _hash(parts: dict[str, str]) -> str:
    """The hash of the object whose top-level values are these dumps: the same text as
    `_json` of the whole (sorted keys, compact), so each part can be dumped once and reused."""
    blob = "{" + ",".join(f"{_json(k)}:{parts[k]}" for k in sorted(parts)) + "}"
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def trial_id(config: dict[str, Any]) -> str:
    """Short stable hash of a resolved config: key order and YAML formatting do not matter."""
    return _hash({k: _json(v) for k, v in config.items()})


def cell_id(config: dict[str, Any]) -> str:
    """The trial id of the config without its seed: what every seed of a cell shares."""
    return trial_id({k: v for k, v in config.items() if k != "seed"})


def _apply(base: dict[str, dict[str, Any]], overrides: dict[str, Any]
           ) -> tuple[DatasetSpec, ModelSpec, TrainSpec]:
    """Validated sections: `base` (section -> field values) with dotted `overrides`."""
    sections = {s: dict(base[s]) for s in SECTION_MODELS}
    for k, v in overrides.items():
        s, _, n = k.partition(".")
        set_field(sections[s], n, v)
    return (DatasetSpec.model_validate(sections["dataset"]),
            ModelSpec.model_validate(sections["model"]),
            TrainSpec.model_validate(sections["train"]))


def _expand_trials(spec: StudySpec, problems: list[tuple[str, str]],
                   warnings: list[tuple[str, str]]) -> tuple[list[TrialSpec], list[str]]:
    grids = spec.grids()
    keys: list[str] = []
    for g in grids:
        keys += [k for k in g if k not in keys]
    trials: list[TrialSpec] = []
    cells: dict[str, Cell] = {}
    base = {s: getattr(spec, s).model_dump() for s in SECTION_MODELS}
    for gi, grid in enumerate(grids):
        where = "factors" + (f"[{gi}]" if isinstance(spec.factors, list) else "")
        for combo in itertools.product(*grid.values()):
            levels = dict(zip(grid, combo, strict=True))
            ds, ms, ts = _apply(base, levels)
            text = ", ".join(f"{k}={fmt_level(v)}" for k, v in levels.items())
            label = f"{where} {{{text}}}" if text else where
            ms, matched, reasons = _checked(ds, ms, grid)
            for r in reasons:
                path, _, msg = r.partition(": ")
                problems.append((label, f"{path}: {msg}") if text else (path, msg))
            if reasons:
                continue
            built = TrialSpec.build_seeds(ds, ms, ts, spec.seeds, gi, keys, matched)
            if merge_cell(cells, Cell(label, gi, levels, built[0]), problems, warnings):
                trials += built
    return trials, keys


_MATCHED: dict[tuple, Any] = {}


def _checked(ds: DatasetSpec, ms: ModelSpec, keys: Iterable[str]
             ) -> tuple[ModelSpec, Matched | None, list[str]]:
    """The cell's model with model.match resolved (its dim or depth chosen among those that
    can run), what matching chose, and the reasons the cell cannot run (empty when it can)."""
    keys = list(keys)
    if ms.match is None:
        return ms, None, check_cell(ds, ms, keys)
    if ms.arch != "backbone":
        return ms, None, [f"model.match: works on the backbone's dim and depth, not on "
                          f"model.arch '{ms.arch}': match in a factor grid of backbone cells"]
    # cells that differ only outside the model (data fraction, lr, seed) match alike: once
    memo = (ms.model_dump_json(), ds.known_image_size(), ds.name, ds.channels, ds.num_classes,
            tuple(keys))
    if memo not in _MATCHED:
        _MATCHED[memo] = match_cell(ds, ms, lambda o: check_cell(ds, o, keys))
    out = _MATCHED[memo]
    if isinstance(out, str):
        return ms, None, [out]
    return out[0], out[1], []


def _level(config: dict[str, Any], objs: tuple[Strict, ...], key: str) -> Any:
    section, name = key.split(".", 1)
    node: Any = config[section]
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        return node
    obj: Any = objs[list(SECTION_MODELS).index(section)]
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj


def validate_study(raw: dict[str, Any], file: str, file_hash: str = "") -> Study:
    """Validate a parsed study mapping; raises StudyError with every problem found."""
    problems: list[tuple[str, str]] = []
    expanded = _expand_tree(raw, "", problems, keep={"dataset.root"})
    try:
        spec = StudySpec.model_validate(expanded)
    except ValidationError as e:
        problems += _pydantic_problems(e, "", StudySpec)
        raise StudyError(file, problems) from None
    if not spec.seeds:
        problems.append(("seeds", "is empty: list at least one seed, e.g. [0]"))
    dup = sorted({s for s in spec.seeds if spec.seeds.count(s) > 1})
    if dup:
        problems.append(("seeds", f"duplicate seeds {dup}: list each seed once"))
    uses_fp16 = spec.train.precision == "fp16" or any(
        "fp16" in grid.get("train.precision", []) for grid in spec.grids())
    if uses_fp16 and spec.resources.gpus_per_trial == 0:
        problems.append(("train.precision", "fp16 needs a GPU (resources.gpus_per_trial > 0); "
                                            "use bf16 or fp32 on the CPU"))
    if spec.resources.gpus_per_trial > 1:
        problems.append(("resources.gpus_per_trial", f"is {spec.resources.gpus_per_trial:g}, but "
                         "a trial trains on one GPU (no data parallelism): use at most 1 (a "
                         "fraction packs several trials on one GPU)"))
    problems += check_tune(spec)
    if spec.search.method == "optuna":
        problems += check_search(spec)
        if not problems:
            problems += match_problems(spec)
        if problems:
            raise StudyError(file, problems)
        return Study(spec, Path(file).resolve(), file_hash, [], list(spec.search.space))
    _check_factors(spec, problems)
    check_validation_split(spec, problems)
    if not problems:
        problems += match_problems(spec)
    if problems:
        raise StudyError(file, problems)
    warnings: list[tuple[str, str]] = []
    trials, keys = _expand_trials(spec, problems, warnings)
    if spec.tune is not None and not problems:
        for values in tune_levels(spec, trials).values():
            sections = {s: getattr(level_spec(spec, values, ""), s).model_dump()
                        for s in SECTION_MODELS}
            try:
                trials_for(sections, {}, spec.tune.seeds, list(values))
            except ValueError as e:
                problems.append(("tune", f"level {level_label(values)} cannot be tuned on the "
                                         f"study's base values: {e}"))
    if problems:
        raise StudyError(file, problems)
    lines = StudyError(file, warnings).lines() if warnings else []
    for line in lines:
        log.warning(line)
    return Study(spec, Path(file).resolve(), file_hash, trials, keys, lines)


def load_study(path: str | Path, sets: Sequence[str] = ()) -> Study:
    """Read, validate and expand a study file, with `--set KEY=VALUE` overrides applied to it
    before validation (checked like the file). Writes nothing."""
    raw, digest = read_study_file(path)
    if not sets:
        return validate_study(raw, str(path), digest)
    name = label(str(path), sets)
    s = validate_study(apply_sets(raw, sets, name), name, digest)
    return replace(s, path=Path(path).resolve(), sets=tuple(sets))


def cells_per_factor(study: Study) -> dict[str, dict[str, int]]:
    """Number of trials at each level of each factor."""
    out: dict[str, dict[str, int]] = {}
    for key in study.factor_keys:
        counts: dict[str, int] = {}
        for t in study.trials:
            lv = fmt_level(t.factors.get(key))
            counts[lv] = counts.get(lv, 0) + 1
        out[key] = counts
    return out


def trials_for(base: dict[str, dict[str, Any]], overrides: dict[str, Any], seeds: list[int],
               keys: list[str]) -> list[TrialSpec]:
    """The per-seed trials of one sampled configuration (an Optuna search's suggestion):
    `base` sections updated with dotted `overrides`. Raises ValueError for a cell that
    cannot run."""
    ds, ms, ts = _apply(base, overrides)
    ms, matched, reasons = _checked(ds, ms, overrides)
    if reasons:
        raise ValueError("; ".join(reasons))
    return TrialSpec.build_seeds(ds, ms, ts, seeds, 0, keys, matched)


def tune_levels(spec: StudySpec, trials: list[TrialSpec]) -> dict[str, dict[str, Any]]:
    """The tuning levels of a study, by label: each distinct combination of the trials'
    `tune.per` factor values (one level, `all`, when `per` is empty)."""
    per = spec.tune.per if spec.tune else []
    out: dict[str, dict[str, Any]] = {}
    for t in trials:
        values = {k: t.factors.get(k) for k in per}
        out.setdefault(level_label(values), values)
    return out


def with_tuned(trial: TrialSpec, values: dict[str, Any], keys: list[str]) -> TrialSpec:
    """`trial` with tuned values (dotted keys) applied: a new resolved config and trial id."""
    base = {"dataset": trial.dataset.model_dump(), "model": trial.model.model_dump(),
            "train": trial.train.model_dump()}
    ds, ms, ts = _apply(base, values)
    ms, matched, reasons = _checked(ds, ms, keys)
    if reasons:
        raise ValueError("; ".join(reasons))
    return TrialSpec.build(ds, ms, ts, trial.seed, trial.grid, keys, matched)
