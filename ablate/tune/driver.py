"""Ray Tune driver: the grid and the Optuna search through one `_fit`, resources, schedulers,
resume. A trial whose id already has a finished run is never run again."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ray's new console output prints a banner even at verbose=0; ablate prints its own progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

from rich.console import Console  # noqa: E402

from ablate import search  # noqa: E402
from ablate.errors import AblateError, mask_url  # noqa: E402
from ablate.study import Study, TrialSpec  # noqa: E402
from ablate.tracking import (  # noqa: E402
    FINAL_METRICS,
    RunWriter,
    Tracker,
    done_trial_ids,
    load_runs,
    resolve_tracking_uri,
    sqlite_store_exists,
)
from ablate.tune.callback import StudyCallback  # noqa: E402
from ablate.tune.progress import Progress  # noqa: E402
from ablate.tune.trainable import trainable  # noqa: E402


@dataclass
class RunSummary:
    total: int
    skipped: int
    finished: int
    pruned: int
    failed: int
    tracking_uri: str
    interrupted: bool = False


def data_root(study: Study) -> str | None:
    """The data root made absolute in the driver (relative to where `ablate run` was called)."""
    if study.spec.dataset.name == "synthetic":
        return None
    from ablate.data import resolve_root

    datasets = [t.dataset for t in study.trials] or [study.spec.dataset]
    roots = {str(resolve_root(d)) for d in datasets}
    if len(roots) > 1:
        raise AblateError(f"{study.path}: dataset.root: a study reads one dataset root, "
                          f"found {sorted(roots)}")
    return roots.pop() if roots else None


def plan_run(study: Study, tracking_uri: str) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(to run, skipped): trials whose id has a finished run in the study's experiment are
    skipped. Creates nothing: a store that does not exist yet has nothing to skip."""
    done = done_trial_ids(tracking_uri, study.experiment)
    return ([t for t in study.trials if t.trial_id not in done],
            [t for t in study.trials if t.trial_id in done])


def _init_ray(address: str | None, verbose: bool) -> bool:
    """Start or join Ray; returns True if this call started it (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose,
                                  logging_level=logging.INFO if verbose else logging.ERROR,
                                  configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise AblateError(f"--address {address}: cannot reach the Ray cluster ({e}); check the "
                          "address (ray://host:10001 or host:6379) and that it is running"
                          ) from None
    return True


def _concurrency(res) -> int:
    """resources.max_concurrent, else as many trials as the CPUs hold."""
    return res.max_concurrent or max(1, int((os.cpu_count() or 1) // res.cpus_per_trial))


def _scheduler(spec, max_t: int):
    """ASHA fed by the per-epoch reports, or None for FIFO."""
    sched = spec.scheduler
    if sched.name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", metric=sched.metric, mode=sched.mode,
                         max_t=max_t, grace_period=sched.grace_period,
                         reduction_factor=sched.reduction_factor)


def _context(study: Study) -> dict[str, Any]:
    """What every Tune trial of the study needs besides its cell: data root and resources."""
    res = study.spec.resources
    return {"root": data_root(study), "cpus": res.cpus_per_trial, "gpus": res.gpus_per_trial,
            "fault_file": os.environ.get("ABLATE_FAULT_FILE")}


def _dirname(trial) -> str:
    cell = trial.config.get("cell")
    return f"{cell[0]['trial_id']}_{trial.trial_id}" if cell else trial.trial_id


def _open_store_and_ray(study: Study, uri: str, address: str | None, verbose: bool
                        ) -> tuple[Tracker, bool]:
    """Open (or create) the tracking store while Ray starts: the two overlap."""
    tags = {"ablate.study_file_hash": study.file_hash, "ablate.study_file": str(study.path),
            "mlflow.note.content": study.spec.description or study.spec.name}
    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(Tracker, uri, study.experiment, tags)
        started_ray = _init_ray(address, verbose)
        try:
            return opening.result(), started_ray
        except BaseException:
            if started_ray:
                import ray

                ray.shutdown()
            raise


def _fit(study: Study, uri: str, address: str | None, verbose: bool, console: Console,
         progress: Progress, param_space: dict[str, Any], tune_kwargs: dict[str, Any],
         optuna_study: str | None = None) -> bool:
    """Run a Tuner with ablate's settings and the study's one writer; returns whether the run
    was interrupted. Open runs are marked killed and Ray is shut down (if we started it)
    whatever happens."""
    from ray import tune

    spec = study.spec
    res = spec.resources
    concurrency = _concurrency(res)
    tracker, started_ray = _open_store_and_ray(study, uri, address, verbose)
    callback = StudyCallback(RunWriter(tracker, study), progress, console, concurrency,
                             optuna_study)
    storage = Path(tempfile.gettempdir()) / "ablate-ray"
    storage.mkdir(parents=True, exist_ok=True)
    interrupted = False
    live = console.is_terminal and not verbose
    status = console.status(progress.line(concurrency)) if live else None
    try:
        if status is not None:
            status.start()
            callback.status = status
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": res.cpus_per_trial,
                                            "gpu": res.gpus_per_trial}),
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True,
                                        trial_dirname_creator=_dirname,
                                        trial_name_creator=_dirname, **tune_kwargs),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(storage), verbose=2 if verbose else 0, log_to_file=True,
                failure_config=tune.FailureConfig(max_failures=spec.failures.max_retries),
                callbacks=[callback], progress_reporter=None))
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if status is not None:
            status.stop()
            callback.status = None
        callback.close()
        if started_ray:
            import ray

            ray.shutdown()
    console.print(f"{spec.name}: {progress.line(concurrency)}", highlight=False)
    # Tune stops gracefully on Ctrl-C and returns: unfinished trials mean we were interrupted
    return interrupted or progress.ended < progress.total


def run_study(study: Study, tracking_uri: str | None = None, address: str | None = None,
              verbose: bool = False, console: Console | None = None) -> RunSummary:
    """Run every trial of a study that has no finished run yet (grid), or an Optuna search
    until `search.n_trials` trials are complete."""
    console = console or Console(soft_wrap=True)
    if study.spec.search.method == "optuna":
        return run_search(study, tracking_uri, address, verbose, console)
    uri = resolve_tracking_uri(tracking_uri, study.spec.tracking.uri)
    todo, skipped = plan_run(study, uri)
    if not todo:
        console.print(f"{study.spec.name}: all {len(study.trials)} trials already finished; "
                      "nothing to run", highlight=False)
        return RunSummary(len(study.trials), len(skipped), 0, 0, 0, uri)
    from ray import tune

    context = _context(study)
    progress = Progress(total=len(todo), skipped=len(skipped))
    console.print(f"{study.spec.name}: {len(todo)} trials to run, {len(skipped)} already "
                  f"finished (tracking: {mask_url(uri)})", highlight=False)
    interrupted = _fit(
        study, uri, address, verbose, console, progress,
        {"context": context, "cell": tune.grid_search([[t.to_dict()] for t in todo])},
        dict(scheduler=_scheduler(study.spec, max(t.train.epochs for t in todo))))
    return RunSummary(len(study.trials), len(skipped), progress.done, progress.pruned,
                      progress.failed, uri, interrupted)


def _finished_metrics(study: Study, uri: str) -> dict[str, dict[str, float]]:
    """Final metrics of the study's finished runs, by trial id (a search reuses them)."""
    if not sqlite_store_exists(uri):
        return {}
    df = load_runs(study.experiment, uri, params=False)
    if df.empty:
        return {}
    out = {}
    for _, r in df[df["status"] == "finished"].iterrows():
        out[r["trial_id"]] = {k: float(r[k]) for k in FINAL_METRICS if k in r and r[k] == r[k]}
    return out


def open_search_study(spec):
    """(storage, Optuna study name, Optuna study) of an Optuna search, created if new, with
    trials left RUNNING by an interrupted run told FAIL (they never finished)."""
    import optuna
    from optuna.trial import TrialState

    storage = search.open_storage(spec.search.storage)
    name = search.study_name(spec)
    directions = ["maximize" if m == "max" else "minimize"
                  for m in spec.search.objectives.values()]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ost = optuna.create_study(study_name=name, storage=storage, directions=directions,
                              load_if_exists=True)
    for t in ost.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ost.tell(t.number, state=TrialState.FAIL)
    return storage, name, ost


def sampler_seed(name: str, n_told: int) -> int:
    """The sampler's seed for a (re)start of a search: a resumed search must not replay the
    random start-up suggestions of the first run, yet a run stays reproducible."""
    digest = hashlib.sha256(f"{name}:{n_told}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def run_search(study: Study, tracking_uri: str | None = None, address: str | None = None,
               verbose: bool = False, console: Console | None = None) -> RunSummary:
    """An Optuna search through Ray Tune: continues until `n_trials` trials are complete."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search import ConcurrencyLimiter

    from ablate.tune.searcher import OptunaAskTell

    console = console or Console(soft_wrap=True)
    spec = study.spec
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    storage, name, ost = open_search_study(spec)
    n_done = len(ost.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                        TrialState.PRUNED)))
    remaining = spec.search.n_trials - n_done
    if remaining <= 0:
        console.print(f"{spec.name}: all {spec.search.n_trials} Optuna trials are done "
                      f"(study {name})", highlight=False)
        _print_pareto(console, storage, name, spec)
        return RunSummary(spec.search.n_trials, n_done, 0, 0, 0, uri)
    context = _context(study)
    console.print(f"{spec.name}: Optuna {spec.search.sampler} search, {remaining} of "
                  f"{spec.search.n_trials} trials to run x {len(spec.seeds)} seeds (study "
                  f"{name}; tracking: {mask_url(uri)})",
                  highlight=False)
    n_told = len(ost.get_trials(deepcopy=False))
    sampled = optuna.load_study(study_name=name, storage=storage,
                                sampler=search.make_sampler(spec, sampler_seed(name, n_told)))
    searcher = ConcurrencyLimiter(
        OptunaAskTell(sampled, search.distributions(spec), spec.search.objectives),
        max_concurrent=_concurrency(spec.resources))
    sections = {s: getattr(spec, s).model_dump(mode="json") for s in ("dataset", "model", "train")}
    space = {"context": context,
             "search": {"sections": sections, "seeds": list(spec.seeds),
                        "keys": list(search.full_space(spec)),
                        "done": _finished_metrics(study, uri)}}
    progress = Progress(total=remaining, skipped=n_done)
    interrupted = _fit(study, uri, address, verbose, console, progress, space,
                       dict(search_alg=searcher, scheduler=_scheduler(spec, spec.train.epochs),
                            num_samples=remaining), optuna_study=name)
    _print_pareto(console, storage, name, spec)
    return RunSummary(spec.search.n_trials, n_done, progress.done, progress.pruned,
                      progress.failed, uri, interrupted)


def _print_pareto(console: Console, storage, name: str, spec) -> None:
    best = search.pareto_set(storage, name)
    objs = list(spec.search.objectives)
    title = "Pareto set" if len(objs) > 1 else "best trial"
    console.print(f"{title} ({', '.join(f'{k}: {v}' for k, v in spec.search.objectives.items())}"
                  f", seed means):", highlight=False)
    for b in best:
        vals = ", ".join(f"{k}={v:.4g}" for k, v in zip(objs, b["values"], strict=True))
        console.print(f"  #{b['number']}: {vals}  {b['params']}", highlight=False)
