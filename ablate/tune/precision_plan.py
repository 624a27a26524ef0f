"""`train.precision: auto` for a whole study: one precision for every architecture.

Each architecture's probe times training at every supported precision (and layout). Left to
itself, each architecture would train at its own fastest precision, and a study comparing
mixers would then compare them at different numerics (bf16 for five mixers, fp32 for
attention, on one CPU measured). With `train.precision_scope: study` (the default) the driver
instead picks the one precision that makes the study's training fastest in total, from the
same probes: the sum, over the study's trials, of each trial's share of training (epochs x
data fraction x training-set size, the last left out where an image folder's is not known
before it is read) over its architecture's probed speed at that precision (at the faster layout
there, since the layout does not change what the model computes), keeping fp32 unless another
precision is at least 5% faster in total. Every architecture then trains at that precision;
the ones whose own pick differed are profiled again at it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ablate.study import Study, TrialSpec

if TYPE_CHECKING:
    from rich.console import Console

PROBE_PREFIX = "probe_img_s."
# fp32 stays unless another precision trains the study at least 5% faster by the probes:
# a close call between probes a few percent apart would otherwise flip with the machine's noise
KEEP_FP32 = 1.05


def probe_speeds(probe: dict[str, float]) -> dict[str, tuple[float, bool]]:
    """precision -> (its probed training img/s at the faster layout, that layout is
    channels_last), from a profile's `probe_img_s.<precision>_<layout>` metrics."""
    out: dict[str, tuple[float, bool]] = {}
    for name, speed in probe.items():
        if not name.startswith(PROBE_PREFIX) or not speed or speed <= 0:
            continue
        precision, _, layout = name[len(PROBE_PREFIX):].partition("_")
        if layout not in ("contiguous", "channels_last"):
            continue
        if precision not in out or speed > out[precision][0]:
            out[precision] = (float(speed), layout == "channels_last")
    return out


def trial_weight(trial: Any) -> float:
    """A trial's share of training: its epochs, times its data fraction where the budget is
    epochs over the trial's own subset (with `budget: steps` every fraction trains as long)."""
    t = trial.train
    return float(t.epochs) * (trial.dataset.fraction if t.budget == "epochs" else 1.0)


CIFAR_TRAIN = 50_000  # the training images of CIFAR-10 and CIFAR-100 before any split


def train_images(trial: Any, unknown: float | None = None) -> float | None:
    """About how many images a trial trains on: its epochs x data fraction (`trial_weight`)
    x its training set's size where the study file tells it (synthetic, CIFAR, `max_train`);
    an image folder's size is not known before it is read: `unknown` stands in for it."""
    ds = trial.dataset
    size = {"synthetic": ds.train_size, "cifar10": CIFAR_TRAIN, "cifar100": CIFAR_TRAIN}.get(
        ds.name)
    if ds.max_train is not None:
        size = min(size, ds.max_train) if size else ds.max_train
    size = size or unknown
    return None if size is None else trial_weight(trial) * float(size)


def study_precision(weights: dict[str, float], probes: dict[str, dict[str, float]]
                    ) -> tuple[str, dict[str, float]] | None:
    """(the precision, the study's relative training time at each precision every
    architecture was probed at: sum of weight / probed img/s), for architecture keys with
    their summed trial `weights` and their probe metrics; None when no precision was probed
    for all of them (or there are none)."""
    speeds = {k: probe_speeds(probes.get(k) or {}) for k in weights}
    if not speeds or not all(speeds.values()):
        return None
    common = set.intersection(*(set(s) for s in speeds.values()))
    if not common:
        return None
    total = {p: sum(weights[k] / speeds[k][p][0] for k in weights) for p in sorted(common)}
    best = min(total, key=lambda p: total[p])
    if "fp32" in total and total["fp32"] <= total[best] * KEEP_FP32:
        best = "fp32"  # the reference numerics, unless another is clearly faster
    return best, total


def describe(study_name: str, precision: str, total: dict[str, float],
             own: dict[str, list[str]], why: str = "") -> str:
    """One line for the console: the precision chosen, its estimated gain over the others,
    and which architectures would have picked another alone."""
    others = ", ".join(f"{total[p] / total[precision]:.2f}x as fast as {p}"
                       for p in total if p != precision)
    line = (f"{study_name}: train.precision: auto -> {precision} for every architecture of the "
            f"study (train.precision_scope: study; {why}by the probes, training "
            f"{others or 'at the only precision probed'})")
    differ = {p: names for p, names in own.items() if p != precision}
    if differ:
        line += "; alone, " + "; ".join(
            f"{_names(names)} would have picked {p}" for p, names in sorted(differ.items()))
    return line


def _names(names: list[str], most: int = 4) -> str:
    names = sorted(set(names))
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])} and {len(names) - most} more"


def study_scope(t: TrialSpec) -> bool:
    """The trial asks for one precision for the whole study (train.precision_scope)."""
    return t.train.precision == "auto" and t.train.precision_scope == "study"


def trained_precisions(tracker: Any, experiment: str, trial_ids: set[str]) -> set[str]:
    """The precisions the finished or pruned runs of these trials (in the study's
    experiment) trained at: a resumed study goes on at the precision it started with. Read
    as the report reads a study (on a database store, four SQL queries, no metrics)."""
    from ablate.tracking import load_runs

    if not trial_ids:
        return set()
    runs = load_runs(experiment, tracker.uri, params=False, metrics=[])
    col = "params.train.precision_resolved"
    if runs.empty or col not in runs:
        return set()
    done = runs[runs["trial_id"].isin(trial_ids) & runs["status"].isin(["finished", "pruned"])]
    return set(done[col].dropna())


def plan_study_precision(study: Study, trials: list[TrialSpec],
                         keys: dict[str, tuple[dict[str, Any], TrialSpec]],
                         by_trial: dict[str, str], found: dict[str, dict[str, Any]],
                         console: Console, trained: set[str] = frozenset()
                         ) -> dict[str, tuple[str, dict[str, Any], TrialSpec]]:
    """`train.precision: auto` with `precision_scope: study`: the one precision of the
    trials that ask for it (`study_precision` over all of `trials`, the finished ones of a
    resumed study included; the one precision its finished trials `trained` at, where they
    share one), said on the console; returns, for each of their architecture keys whose own
    pick was another precision, (key, config, trial) of its profile at the study's precision
    and its faster layout there."""
    from ablate.tune.profiling import arch_config, arch_key

    scoped = [t for t in trials if study_scope(t) and by_trial[t.trial_id] in found]
    # each trial's images to train on where the study file tells every one's training-set
    # size (keys on data of different sizes then weigh as they train); else its epochs x
    # data fraction (an image folder's size is unknown before it is read)
    images = {t.trial_id: train_images(t) for t in scoped}
    known = all(n is not None for n in images.values())
    weights: dict[str, float] = {}
    for t in scoped:
        key = by_trial[t.trial_id]
        weights[key] = weights.get(key, 0.0) + (images[t.trial_id] if known
                                                 else trial_weight(t))
    if not weights:
        return {}
    probes = {k: found[k].get("probe") or {} for k in weights}
    chosen = study_precision(weights, probes)
    if chosen is None:
        console.print(f"{study.spec.name}: train.precision: auto: no precision was probed for "
                      "every architecture (profiles from before the probe was stored?), so "
                      "each trains at its own pick; --reprofile probes them again",
                      highlight=False, markup=False)
        return {}
    precision, total = chosen
    why = ""
    if len(trained) == 1 and next(iter(trained)) in total:
        precision = next(iter(trained))
        why = "the precision its finished trials trained at; "
    elif len(trained) == 1:
        console.print(f"{study.spec.name}: its finished trials trained at "
                      f"{next(iter(trained))}, which this device's probes did not time; the "
                      f"rest train at {precision} (the verdict names the mix)",
                      highlight=False, markup=False)
    elif len(trained) > 1:
        console.print(f"{study.spec.name}: its finished trials trained at "
                      f"{' and '.join(sorted(trained))} (per architecture, or on other "
                      "hardware); the verdict names the mix: run the study under a new name "
                      "to compare at one precision", highlight=False, markup=False)
    own: dict[str, list[str]] = {}
    plan = {}
    for key in weights:
        config, t = keys[key]
        own.setdefault(found[key]["precision"], []).append(_label(t))
        if found[key]["precision"] == precision:
            continue
        layout = (probe_speeds(probes[key])[precision][1] if t.train.channels_last == "auto"
                  else t.train.channels_last)
        d = t.to_dict()
        d["train"] = {**d["train"], "precision": precision, "channels_last": layout}
        ft = TrialSpec.from_dict(d)
        shape = (config["image_size"], config["channels"], config["num_classes"])
        fconfig = arch_config(ft, shape, config["device_type"],
                              study.spec.resources.cpus_per_trial)
        plan[key] = (arch_key(fconfig), fconfig, ft)
    if len(total) > 1 or plan:
        console.print(describe(study.spec.name, precision, total, own, why), highlight=False,
                      markup=False)
    return plan


def plan_for_run(study: Study, trials: list[TrialSpec], finished: list[TrialSpec],
                 tracker: Any, keys: dict[str, tuple[dict[str, Any], TrialSpec]],
                 by_trial: dict[str, str], found: dict[str, dict[str, Any]],
                 shapes: dict[str, tuple[int, int, int]], ident: dict[str, Any],
                 console: Console, root: str | None
                 ) -> dict[str, tuple[str, dict[str, Any], TrialSpec]]:
    """The study-wide precision plan (`plan_study_precision`) over the trials to run and
    a resumed study's `finished` ones (their architectures' probes read from the store), at
    the precision the finished ones trained at where they share one; only the keys of the
    trials to run are returned."""
    from ablate.tune.profile_store import stored_profiles
    from ablate.tune.profiling import arch_config, arch_key, data_shape, device_type_of

    finished = [t for t in finished if study_scope(t)]
    if not any(study_scope(t) for t in trials):
        return {}
    done_keys: dict[str, tuple[dict[str, Any], TrialSpec]] = {}
    every = dict(by_trial)
    for t in finished:
        ds = t.dataset.model_dump_json()
        if ds not in shapes:
            shapes[ds] = data_shape(t.dataset, root)
        config = arch_config(t, shapes[ds], device_type_of(study),
                          study.spec.resources.cpus_per_trial)
        every[t.trial_id] = key = arch_key(config)
        if key not in keys:
            done_keys.setdefault(key, (config, t))
    more = set(done_keys) - set(found)  # only their probes are needed: not measured again
    known = {**found, **(stored_profiles(tracker, ident, more) if more else {})}
    trained = trained_precisions(tracker, study.experiment, {t.trial_id for t in finished})
    plan = plan_study_precision(study, [*trials, *finished], {**done_keys, **keys}, every,
                             known, console, trained)
    return {k: v for k, v in plan.items() if k in keys}


def _label(t: TrialSpec) -> str:
    """An architecture's name on the console: its model factors' levels, else its cell."""
    levels = [f"{k.removeprefix('model.')} {v}" for k, v in t.factors.items()
              if k.startswith("model.")]
    return ", ".join(levels) if levels else t.cell_name
