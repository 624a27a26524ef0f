"""Cost profiles: measured once per architecture key, alone on a node, before a study's trials.

A trial that measured its own speed beside other trials would mix the architecture's cost with
the contention of whatever ran next to it, and the seeds of one architecture would measure the
same thing several times. So the driver, before it launches Ray Tune, runs one Ray task per
architecture key not yet in the store; each task holds a whole node (all its CPUs, and the
whole GPU for GPU studies) and is pinned to one node, so every profile of a study is taken on
the same hardware with nothing beside it. Each profile is an MLflow run tagged
`ablate.phase=profile` and `ablate.arch_key`, with the device name, torch version, thread
count and a digest of the code that builds and times models (`code_fingerprint`); a later run
(of any study in the store) with the same key on the same device, torch, threads and code
reuses it, unless `--reprofile`. Its metrics are then logged on every trial of the key; the
same task runs the `auto` probe.

An Optuna search samples its architectures as it goes, so the driver enumerates the ones it
can sample (`search_architectures`: every combination of the model and input dimensions and
of the training batch, the rest of the space held at the study's values) and profiles them
the same way before the search; each trial then finds its profile by architecture key
(`keyed`). Only a space whose architecture dimensions are continuous, or have more than
`SEARCH_ARCH_CAP` combinations, leaves its trials to measure their own costs beside each
other (the driver says so); so do the trials of a key whose compiled profile failed (on a
node where torch.compile cannot build). Any other failure of a profile stops the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from ablate.errors import (
    AblateError,
    CompileError,
    ModelError,
    NoCudaDevice,
    ProfileFailed,
    ProfileOutOfMemory,
    out_of_memory,
)
from ablate.study import Study, TrialSpec, trials_for
from ablate.tracking import Tracker
from ablate.tune.precision_plan import plan_for_run, study_scope
from ablate.tune.profile_store import (  # noqa: F401 - a profile's identity, reuse and record
    IDENTITY_TAGS,
    KEY_TAG,
    PHASE,
    PROFILE_GPU,
    PROFILE_IDENTITY_TAG,
    PROFILE_METHOD,
    code_fingerprint,
    identity,
    identity_label,
    log_profile,
    reusable_profiles,
    stored_profiles,
)

RESOLVED = ("precision", "channels_last")  # logged as train.<name>_resolved on trials
SEARCH_ARCH_CAP = 64  # most architectures a search's profile phase measures up front
# the search dimensions `arch_config` depends on (the rest do not change a profile)
ARCH_DIMS = ("model.", "dataset.name", "dataset.root", "dataset.image_size", "dataset.channels",
             "dataset.num_classes", "train.precision", "train.channels_last",
             "train.profile_batch_size", "train.batch_size", "train.compile",
             "train.grad_clip", "train.profile_seconds")


def search_architectures(study: Study, cap: int = SEARCH_ARCH_CAP) -> list[TrialSpec] | None:
    """One trial per configuration of an Optuna search's architecture dimensions (the other
    dimensions at the study's values; combinations that cannot run left out), or None when one
    of them (a model or input dimension, the training batch) is continuous or they have more
    than `cap` combinations."""
    import optuna.distributions as od

    from ablate import search

    spec = study.spec
    dists = search.distributions(spec)
    dims = ARCH_DIMS
    levels: dict[str, list[Any]] = {}
    for key, dist in dists.items():
        if not key.startswith(dims):
            continue
        if key == "train.grad_clip":  # its cost is whether it clips, whatever the norm
            # (`arch_config`): one value per clipping state sampled, continuous or not
            vals = list(getattr(dist, "choices", [getattr(dist, "high", None)]))
            levels[key] = ([None] if None in vals else []) + [v for v in vals if v is not None][:1]
        elif isinstance(dist, od.CategoricalDistribution):
            levels[key] = list(dist.choices)
        elif isinstance(dist, od.IntDistribution) and (dist.high - dist.low) // dist.step < cap:
            levels[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            return None
    if (n := len(list(itertools.product(*levels.values())))) > cap:
        return None
    sections = {s: getattr(spec, s).model_dump(mode="json") for s in ("dataset", "model", "train")}
    keys = list(search.full_space(spec))
    out = []
    for combo in itertools.product(*levels.values()) if n else [()]:
        try:
            out += trials_for(sections, dict(zip(levels, combo, strict=True)), spec.seeds[:1],
                              keys)
        except ValueError:  # a combination that cannot run: the search's trial fails too
            continue
    return out


def check_alone_objective(study: Study) -> None:
    """A search that optimizes `train_time_alone_s` needs every architecture it samples
    profiled up front: without, no trial has the metric and Optuna would mark each one FAIL."""
    if "train_time_alone_s" not in study.spec.search.objectives or not study.profile:
        return
    if search_architectures(study) is None:
        raise AblateError(
            f"{study.path}: search.objectives.train_time_alone_s needs a profile of every "
            "architecture the search samples, and its architecture dimensions (model.*, the "
            "input, train.batch_size, train.profile_*) are continuous or have more than "
            f"{SEARCH_ARCH_CAP} combinations; make them categorical (at most "
            f"{SEARCH_ARCH_CAP} architectures) or optimize train_time_s")


def keyed(by_key: dict[str, dict[str, Any]], trial: TrialSpec, shape: tuple[int, int, int],
          device_type: str, cpus: float) -> dict[str, Any] | None:
    """The profile of `trial`'s architecture key among `by_key`, as `profile_trials` gives it
    by trial id (`cpus`: resources.cpus_per_trial); None when it was not profiled."""
    key = arch_key(arch_config(trial, shape, device_type, cpus))
    # the entry's own arch_key where it has one (the study's precision: another key's profile)
    return {"arch_key": key, **by_key[key]} if key in by_key else None


def lookup_for(context: dict[str, Any]) -> Callable[[TrialSpec], dict[str, Any] | None] | None:
    """trial -> its profile, for a search whose architectures were profiled up front
    (`context["arch_keys"]`); None otherwise."""
    by_key = context.get("arch_keys")
    if not by_key:
        return None
    shapes: dict[str, tuple[int, int, int]] = {}

    def lookup(trial: TrialSpec) -> dict[str, Any] | None:
        ds = trial.dataset.model_dump_json()
        if ds not in shapes:
            shapes[ds] = data_shape(trial.dataset, context.get("root"))
        return keyed(by_key, trial, shapes[ds], context["device_type"], context["cpus"])

    return lookup


def device_type_of(study: Study) -> str:
    return "cuda" if study.spec.resources.gpus_per_trial > 0 else "cpu"


def data_shape(ds: Any, root: str | None) -> tuple[int, int, int]:
    """(image size, channels, classes) a trial's model sees. Known from the study file for
    synthetic and CIFAR data; an image folder is read (decoded once into the on-disk cache,
    which the trials then load)."""
    if ds.name == "synthetic":
        return ds.image_size or 32, ds.channels or 3, ds.num_classes or 10
    if ds.name in ("cifar10", "cifar100"):
        return ds.image_size or 32, ds.channels or 3, 10 if ds.name == "cifar10" else 100
    from ablate.data import load_source

    src = load_source(ds, Path(root) if root else None)
    return (ds.image_size or int(src.train_x.shape[-1]), ds.channels or int(src.train_x.shape[1]),
            len(src.classes))


def trial_threads(cpus: float) -> int:
    """The torch threads a CPU trial trains with: its resources.cpus_per_trial, at least 1."""
    return max(1, int(cpus))


def arch_config(trial: TrialSpec, shape: tuple[int, int, int], device_type: str,
                cpus: float) -> dict[str, Any]:
    """What a profile depends on: the resolved model, the input and output shapes, the
    precision and memory layout asked for, the device type, the profile's batch size (its
    throughput) and timing budget (`profile_seconds`: a study asking for longer timings does
    not take briefer ones), the training batch size (its training speed and memory, and the
    `auto` probe) and, on CPU, the threads a trial trains with (resources.cpus_per_trial);
    with `train.compile`, that the model is timed compiled; with `train.grad_clip`, that its
    training step clips (a pass over every gradient, whatever the norm: not the norm)."""
    t = trial.train
    out = {"model": {k: v for k, v in trial.config["model"].items() if k != "match"},
           "image_size": shape[0], "channels": shape[1], "num_classes": shape[2],
           "precision": t.precision, "channels_last": t.channels_last,
           "device_type": device_type, "profile_batch_size": t.profile_batch_size,
           "profile_seconds": t.profile_seconds, "train_batch_size": t.batch_size}
    if device_type == "cpu":  # a model's speed changes with the threads, unevenly by model
        out["train_threads"] = trial_threads(cpus)
    if t.compile:  # a compiled model's speed is not the eager model's (either way)
        out["compile"] = True
    if t.grad_clip is not None:  # the training step clips every gradient: more work
        out["grad_clip"] = True
    return out


def arch_key(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def measure(trial: dict[str, Any], shape: tuple[int, int, int], device_type: str,
            threads: int, train_threads: int | None = None,
            fault_file: str | None = None) -> dict[str, Any]:
    """One architecture's profile (run inside a Ray task that holds the whole node): the
    auto probe where asked, then params, GMACs and the timed metrics at the chosen setting.
    Throughput and latency are timed with the node's `threads`, at the profile batch; the
    training step (`train_img_s`, `peak_mem_mb`, and the auto probe, which decides how the
    trials train) as a trial takes it: at `train.batch_size` and, on CPU, with the threads
    the trials train with (`train_threads`), still alone on the node, so that a trial's
    `train_time_alone_s` is its own setting's time without the contention. `fault_file`: the
    test hook of ablate.tune.trainable.take_fault, under the key "profile"."""
    import torch

    from ablate.cost import candidates_for, probe_settings, profile
    from ablate.train import DTYPES, build_model, is_auto, require_cuda
    from ablate.tune.trainable import take_fault

    if take_fault(fault_file, "profile", 1):
        raise RuntimeError("injected fault in a cost profile (ABLATE_FAULT_FILE)")
    start = int(time.time() * 1000)
    torch.set_num_threads(threads)
    if device_type == "cuda":
        require_cuda(PROFILE_GPU)
    device = torch.device(device_type)
    spec = TrialSpec.from_dict(trial)
    cfg = spec.train
    model = build_model(spec, *shape)
    choice, speeds, used = (cfg.precision, cfg.channels_last), {}, None
    if is_auto(cfg):
        cands = candidates_for(cfg.precision, cfg.channels_last, device)
        # at the training batch: the probe decides how the trials train, and the gap between
        # layouts changes with the batch (64 vs 128 flipped close calls on a CPU)
        if device.type == "cpu" and train_threads:
            torch.set_num_threads(train_threads)
        used = torch.get_num_threads()
        try:
            with _out_of_memory_at("train.batch_size", cfg.batch_size):
                choice, speeds = probe_settings(model, shape[0], shape[1], shape[2],
                                                cfg.batch_size, device, cands,
                                                min_seconds=cfg.profile_seconds,
                                                grad_clip=cfg.grad_clip)
        finally:
            torch.set_num_threads(threads)
    precision, channels_last = choice
    dtype = DTYPES["fp32" if precision == "fp16" and device.type != "cuda" else precision]
    with _out_of_memory_at("train.profile_batch_size", cfg.profile_batch_size,
                           cfg.batch_size):
        p = profile(model, shape[0], in_chans=shape[1], num_classes=shape[2],
                    batch_size=cfg.profile_batch_size, device=device, dtype=dtype,
                    channels_last=bool(channels_last), min_seconds=cfg.profile_seconds,
                    warmup=3, compile_=cfg.compile, train_batch_size=cfg.batch_size,
                    train_threads=train_threads if device.type == "cpu" else None,
                    grad_clip=cfg.grad_clip)
    return {"metrics": {**p.metrics(), "profile_batch_size": float(p.batch_size),
                        "profile_train_batch_size": float(p.train_batch_size)},
            "precision": precision, "channels_last": bool(channels_last),
            "probe": {f"probe_img_s.{k.replace('/', '_')}": v for k, v in speeds.items()},
            "probe_threads": used,  # what the probe timed with (None: no probe)
            "train_threads": p.train_threads if device.type == "cpu" else None,
            "start_ms": start, "end_ms": int(time.time() * 1000),
            **identity(device_type, threads)}


@contextlib.contextmanager
def _out_of_memory_at(field: str, batch: int, train_batch: int | None = None
                      ) -> Iterator[None]:
    """Out of memory inside is ProfileOutOfMemory naming the setting whose batch did not fit
    (the driver's one line names it as the fix): `field`, or train.batch_size where the
    profile's training step (timed at `train_batch`) ran out."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only out of memory is replaced
        if out_of_memory(e) is None:
            raise
        if train_batch is not None and getattr(e, "in_training_step", False):
            raise ProfileOutOfMemory("train.batch_size", train_batch) from None
        raise ProfileOutOfMemory(field, batch) from None


def _import_profile_code() -> None:
    """What a profile imports (torch, the models, the cost code), run where profiles run;
    and torch._dynamo, which the first AdamW or FlopCounterMode imports (1.6 to 3 s). Only a
    head start: an import that fails here fails again, and is reported, in the profile."""
    with contextlib.suppress(Exception):
        import torch._dynamo  # noqa: F401

        import ablate.cost  # noqa: F401
        import ablate.train  # noqa: F401


def warm_profile_worker(study: Study) -> None:
    """Submit, without waiting, a task that holds the profile node (as a profile does) and
    imports what profiles need into the worker they will reuse: started as soon as Ray is up,
    the imports overlap what the driver does before its first profile (importing MLflow,
    opening the store) instead of delaying that profile. Nothing runs beside it, and no profile can
    start before it ends."""
    if not study.profile:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    device_type = device_type_of(study)
    try:
        node, cpus = _profile_node(device_type)
        ray.remote(num_cpus=cpus, num_gpus=1 if device_type == "cuda" else 0, max_retries=0,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                   )(_import_profile_code).remote()
    except Exception:  # no node to profile on (profile_trials says so), or Ray refused: the
        return  # profiles import what they need themselves


def _profile_node(device_type: str, path: Any = "") -> tuple[str, int]:
    """(node id, CPUs) of the node profiles run on: the largest alive node (with a GPU for
    a GPU study). Every profile of a study runs there, one at a time."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")
             and (device_type != "cuda" or n["Resources"].get("GPU", 0) >= 1)]
    if not nodes:
        raise AblateError(f"{path}: resources.gpus_per_trial > 0 but no Ray node has a whole "
                          "GPU to profile on; add a GPU node or set gpus_per_trial: 0")
    best = max(nodes, key=lambda n: n["Resources"].get("CPU", 0))
    return best["NodeID"], max(1, int(best["Resources"].get("CPU", 1)))


def profile_trials(study: Study, trials: list[TrialSpec], tracker: Tracker, console: Console,
                   root: str | None, finished: list[TrialSpec] = ()
                   ) -> dict[str, dict[str, Any]]:
    """Each trial's profile by trial id ({"metrics", "precision", "channels_last", "arch_key",
    "run_id"}): reused from the store or measured now, one whole-node Ray task per missing
    architecture key. Ray must be running. Nothing when the study is run without profiles;
    no entry for the trials of a key whose compiled profile failed (CompileError: those
    trials fail the same way, or, in a search, measure their own costs)."""
    if not study.profile or not trials:
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    device_type = device_type_of(study)
    shapes: dict[str, tuple[int, int, int]] = {}
    keys: dict[str, tuple[dict[str, Any], TrialSpec]] = {}
    by_trial: dict[str, str] = {}
    for t in trials:
        ds = t.dataset.model_dump_json()
        if ds not in shapes:
            shapes[ds] = data_shape(t.dataset, root)
        config = arch_config(t, shapes[ds], device_type, study.spec.resources.cpus_per_trial)
        key = arch_key(config)
        keys.setdefault(key, (config, t))
        by_trial[t.trial_id] = key
    node, cpus = _profile_node(device_type, study.path)
    opts = dict(num_cpus=cpus, num_gpus=1 if device_type == "cuda" else 0, max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    try:
        ident = _wait(ray.remote(**opts)(identity).remote(device_type, cpus))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NoCudaDevice):  # before any profile or trial runs on a CPU
            raise AblateError(f"{study.path}: {e.cause}") from None
        raise
    stale: set[str] = set()
    found = reusable_profiles(study, tracker, ident, set(keys), stale)
    missing = [k for k in keys if k not in found]
    stale &= set(missing)
    console.print(f"{study.spec.name}: {len(keys)} architecture(s); profiling {len(missing)} "
                  f"alone on {ident['device_name']} ({cpus} CPUs, torch "
                  f"{ident['torch_version']}), {len(keys) - len(missing)} from the store"
                  + (f" ({len(stale)} stored profile(s) were measured by other model or cost "
                     "code, so not reused)" if stale else ""),
                  highlight=False)
    measure_keys(study, missing, keys, found, tracker, console, ident, opts, device_type, cpus)
    plan = plan_for_run(study, trials, list(finished), tracker, keys, by_trial, found,
                           shapes, ident, console, root)
    if plan:  # the architectures whose own pick was another precision: profiled at the study's
        fixed = {fk: (config, t) for fk, config, t in plan.values()}
        found.update(reusable_profiles(study, tracker, ident, set(fixed) - set(found)))
        again = [fk for fk in fixed if fk not in found]
        if again:
            console.print(f"{study.spec.name}: profiling {len(again)} architecture(s) again at "
                          "the study's precision", highlight=False)
        measure_keys(study, again, fixed, found, tracker, console, ident, opts, device_type,
                     cpus, then="its trials train at their own pick of precision, with its "
                                "profile (the verdict names the mix)")
    out = {}
    for t in trials:
        key = by_trial[t.trial_id]
        # the profile at the study's precision, for the trials that asked for one (a key
        # whose compile failed at it keeps its own pick)
        use = plan[key][0] if key in plan and study_scope(t) and plan[key][0] in found else key
        if use in found:
            info = {k: v for k, v in found[use].items() if k != "probe"}
            # arch_key: the profile the trial carries; trial_key: what `keyed` looks it up by
            out[t.trial_id] = {**info, "arch_key": use, "trial_key": key,
                               "identity": identity_label(ident)}
    return out


def measure_keys(study: Study, missing: list[str], keys: dict[str, tuple[dict[str, Any],
                 TrialSpec]], found: dict[str, dict[str, Any]], tracker: Tracker,
                 console: Console, ident: dict[str, Any], opts: dict[str, Any],
                 device_type: str, cpus: int, then: str | None = None) -> None:
    """Measure the profile of each of `missing` (one whole-node task at a time), log it and
    add it to `found`; a key whose compile failed is left out (said on the console, with
    `then`: what its trials do instead)."""
    import ray

    task = ray.remote(**opts)(measure)
    fault_file = os.environ.get("ABLATE_FAULT_FILE")  # the tests' hook, as the trials'
    for key in missing:  # one at a time: each task holds the whole node
        config, t = keys[key]
        try:
            res = _wait(task.remote(t.to_dict(), (config["image_size"], config["channels"],
                                                  config["num_classes"]), device_type, cpus,
                                    config.get("train_threads"), fault_file))
        except ray.exceptions.RayError as e:  # the task's own error, or Ray's (a dead node)
            # a failed compile is the trials' own failure too (each fails in one line, the
            # study goes on); a bug or a dead node stops the run: no trial without its costs
            cause = getattr(e, "cause", None)
            if isinstance(e, ray.exceptions.OutOfMemoryError) \
                    or isinstance(cause, ProfileOutOfMemory) or out_of_memory(cause or e):
                raise AblateError(_oom_message(study.path, t, e, ident)) from None
            if isinstance(cause, ModelError):  # the study file's: one line, exit 2
                raise AblateError(f"{study.path}: {cause}") from None
            if not isinstance(cause, CompileError):
                why = ("a search's trials would measure their own costs, beside other trials"
                       if study.spec.search.method == "optuna" else
                       "grid trials would finish without their cost metrics")
                raise ProfileFailed(
                    f"{study.path}: the cost profile of {t.cell_name} failed on "
                    f"{ident['device_name']} ({_cause(e)}); the run stops before the trials "
                    f"this profile is for ({why}): fix the cause and run again, the profiles "
                    "already taken are kept") from e
            instead = then or ("its trials measure their own costs, beside other trials"
                               if study.spec.search.method == "optuna" else
                               "its trials run without cost metrics")
            console.print(f"{study.spec.name}: profile of {t.cell_name} failed "
                          f"({_cause(e)}); {instead}", highlight=False, markup=False)
            continue
        rid = log_profile(tracker, study, key, config, res, t.cell_name)
        found[key] = {"metrics": res["metrics"], "precision": res["precision"],
                      "channels_last": res["channels_last"], "run_id": rid,
                      "probe": res["probe"]}


def _oom_message(path: Path, t: TrialSpec, e: BaseException, ident: dict[str, Any]) -> str:
    """One line for a profile out of memory: the setting whose batch did not fit and the fix;
    where Ray's memory monitor killed the task (host memory, phase unknown), every batch it
    ran at; before any batch, the model itself."""
    import ray

    cause = getattr(e, "cause", None)
    what = f"the cost profile of {t.cell_name} ran out of"
    if isinstance(cause, ProfileOutOfMemory):
        return (f"{path}: {cause.field}: {what} memory on {ident['device_name']} at batch "
                f"{cause.batch}; lower {cause.field}")
    if isinstance(e, ray.exceptions.OutOfMemoryError):  # the training step's batch, or the
        fields = ["train.batch_size", "train.profile_batch_size"]  # throughput's
        return (f"{path}: {' / '.join(fields)}: {what} the node's host memory (Ray's memory "
                f"monitor stopped it); lower {' or '.join(fields)}")
    return (f"{path}: model: {what} host memory building the model (before any batch); "
            f"make the model smaller")


def _cause(e: BaseException) -> str:
    """The first line of what failed inside a Ray task (its own exception, not Ray's
    wrapper and traceback)."""
    inner = getattr(e, "cause", None) or e
    first = (str(inner).strip().splitlines() or [type(inner).__name__])[0][:300]
    return f"{type(inner).__name__}: {first}"


def _wait(ref) -> Any:
    """ray.get that Ctrl-C and SIGTERM can interrupt (a blocking ray.get does not return to
    Python until the task ends); the task is cancelled then."""
    import ray

    try:
        while not ray.wait([ref], timeout=0.5)[0]:
            pass
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise
    return ray.get(ref)


def trial_params(info: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(tags, params) a trial's run gets from its profile."""
    tags = {KEY_TAG: info["arch_key"], "ablate.profile_run_id": info["run_id"]}
    if info.get("identity"):  # the machine and code its timing costs were measured with
        tags[PROFILE_IDENTITY_TAG] = info["identity"]
    return tags, {f"train.{k}_resolved": str(info[k]) for k in RESOLVED}

