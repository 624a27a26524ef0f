"""Ray Tune driver: the grid and the Optuna search through one `_fit`, resources, schedulers,
resume. A trial whose id already has a finished run is never run again."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
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
from ablate.tracking.lease import DRIVER_TAG, StudyLease, reconcile  # noqa: E402
from ablate.tune.callback import StudyCallback  # noqa: E402
from ablate.tune.progress import Progress  # noqa: E402
from ablate.tune.raystart import (  # noqa: E402
    _init_ray,
    _rearm_python_signal_handlers,
    _signals_held,
    _sigterm_stops_like_ctrl_c,
    _take_held,
    check_address,
    check_fits,
    quiet_trial_errors,
)
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
    terminated: bool = False  # stopped by SIGTERM (exit 143) rather than Ctrl-C (130)


def data_root(study: Study) -> str | None:
    """The data root made absolute in the driver (relative to where `ablate run` was called)."""
    if study.spec.dataset.name == "synthetic":
        return None
    from ablate.data import resolve_root
    from ablate.sources import check_root

    datasets = [t.dataset for t in study.trials] or [study.spec.dataset]
    roots = {str(resolve_root(d)) for d in datasets}
    if len(roots) > 1:
        raise AblateError(f"{study.path}: dataset.root: a study reads one dataset root, "
                          f"found {sorted(roots)}")
    if not roots:
        return None
    root = roots.pop()
    check_root(datasets[0], Path(root))
    return root


def plan_run(study: Study, tracking_uri: str) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(to run, skipped): trials whose id has a finished run in the study's experiment are
    skipped. Creates nothing: a store that does not exist yet has nothing to skip."""
    done = done_trial_ids(tracking_uri, study.experiment)
    return ([t for t in study.trials if t.trial_id not in done],
            [t for t in study.trials if t.trial_id in done])


def _concurrency(res, total: dict[str, float] | None = None) -> int:
    """resources.max_concurrent, else as many trials as the cluster Ray runs on holds at once
    (`total`: default `ray.cluster_resources()`), by CPUs and, for GPU trials, GPUs: a laptop
    driving a GPU cluster is not throttled to its own cores."""
    if res.max_concurrent:
        return res.max_concurrent
    if total is None:
        import ray

        total = (ray.cluster_resources() if ray.is_initialized()
                 else {"CPU": float(os.cpu_count() or 1)})
    # a small tolerance: in floats 1 // 0.2 is 4.0, where Ray packs 5 trials of 0.2 GPU
    fits = [total.get("CPU", 0.0) / res.cpus_per_trial + 1e-9]
    if res.gpus_per_trial:
        fits.append(total.get("GPU", 0.0) / res.gpus_per_trial + 1e-9)
    return max(1, int(min(fits)))


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
    """What every Tune trial of the study needs besides its cell: data root and resources.
    A grid adds `arch` (each trial's profile), a search `arch_keys` (each architecture's);
    a search trial whose architecture was not profiled up front profiles itself."""
    res = study.spec.resources
    return {"root": data_root(study), "cpus": res.cpus_per_trial, "gpus": res.gpus_per_trial,
            "fault_file": os.environ.get("ABLATE_FAULT_FILE"), "profile": study.profile,
            "self_profile": study.spec.search.method == "optuna"}


def _dirname(trial) -> str:
    cell = trial.config.get("cell")
    return f"{cell[0]['trial_id']}_{trial.trial_id}" if cell else trial.trial_id


@contextlib.contextmanager
def _held(study: Study, uri: str, console: Console, force_unlock: bool = False
          ) -> Iterator[Tracker]:
    """Open (or create) the study's experiment and hold its lease for the whole run: a second
    driver of the same study exits 2 at once. Runs a dead driver left RUNNING are marked
    killed first (with the lease held, nobody else can be running them)."""
    tags = {"ablate.study_file_hash": study.file_hash, "ablate.study_file": str(study.path),
            "mlflow.note.content": study.spec.description or study.spec.name}
    if study.sets:
        tags["ablate.set"] = " ".join(study.sets)
    tracker = Tracker(uri, study.experiment, tags)
    with StudyLease(tracker.client, tracker.experiment_id, study.spec.name,
                    force_unlock) as lease:
        tracker.run_tags[DRIVER_TAG] = lease.id
        stale = reconcile(tracker, lease)
        if stale:
            console.print(f"{study.spec.name}: marked {stale} run(s) of a driver that died "
                          "killed; their trials run again", highlight=False)
        yield tracker


def _remove_dead_drivers_dirs(storage: Path, study: str) -> None:
    """Trial folders `<study>-<time>-<pid>` left by a driver that was SIGKILLed."""
    import shutil

    from ablate.tracking.lease import _pid_alive

    for d in storage.glob(f"{study}-*-*"):
        pid = d.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def trial_storage() -> Path:
    """Ray's trial folders: a private per-user directory (mode 0700), not a shared /tmp path."""
    path = Path(tempfile.gettempdir()) / f"ablate-ray-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise AblateError(f"{path}: Ray trial directory belongs to another user; set TMPDIR "
                          "to a directory of your own")
    path.chmod(0o700)
    return path


def _fit(study: Study, tracker: Tracker, address: str | None, verbose: bool, console: Console,
         progress: Progress, param_space: dict[str, Any], tune_kwargs: dict[str, Any],
         optuna_study: str | None = None, keep_trial_dirs: bool = False,
         tags: dict[str, str] | None = None) -> bool:
    """Run a Tuner with ablate's settings and the study's one writer; returns whether the run
    was interrupted. Open runs are marked killed and Ray is shut down (if we started
    it) whatever happens."""
    import shutil

    from ray import tune

    spec = study.spec
    res = spec.resources
    started_ray = _init_ray(address, verbose)
    concurrency = _concurrency(res)  # from the cluster Ray now runs on
    _rearm_python_signal_handlers()
    from ablate.tune.profiling import lookup_for

    ctx = param_space["context"]
    callback = StudyCallback(RunWriter(tracker, study), progress, console, concurrency,
                             optuna_study, tags, ctx.get("arch"), lookup_for(ctx))
    storage = trial_storage()
    _remove_dead_drivers_dirs(storage, spec.name)
    name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
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
                name=name,
                storage_path=str(storage), verbose=2 if verbose else 0, log_to_file=True,
                failure_config=tune.FailureConfig(max_failures=spec.failures.max_retries),
                callbacks=[callback], progress_reporter=None))
        with quiet_trial_errors(verbose):
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
    interrupted = interrupted or progress.ended < progress.total
    if not keep_trial_dirs:  # ablate resumes from MLflow, never from Ray's folders
        shutil.rmtree(storage / name, ignore_errors=True)
    return interrupted


def run_study(study: Study, tracking_uri: str | None = None, address: str | None = None,
              verbose: bool = False, console: Console | None = None,
              force_unlock: bool = False, keep_trial_dirs: bool = False) -> RunSummary:
    """Run every trial of a study that has no finished run yet (grid), or an Optuna search
    until `search.n_trials` trials are complete. One driver per study at a time."""
    console = console or Console(soft_wrap=True)
    uri = resolve_tracking_uri(tracking_uri, study.spec.tracking.uri)
    check_address(address)  # before the store is touched
    data_root(study)  # a missing or unreadable dataset: one error now, not every trial failing
    if study.spec.search.method == "optuna":
        from ablate.tune.profiling import check_alone_objective

        check_alone_objective(study)
        search.open_storage(study.spec.search.storage)  # unreachable: say so, create nothing
    with _sigterm_stops_like_ctrl_c() as got:
        started = False
        try:
            started = _start_beside_new_store(study, uri, address, verbose)
            with _held(study, uri, console, force_unlock) as tracker:
                if study.spec.tune is not None:  # inside the lease: one driver tunes
                    from ablate.tune.tuning import run_tuned

                    summary = run_tuned(study, tracker, address, verbose, console,
                                        keep_trial_dirs)
                else:
                    run = _run_search if study.spec.search.method == "optuna" else _run_grid
                    summary = run(study, tracker, address, verbose, console, keep_trial_dirs)
        except KeyboardInterrupt:  # before or after Tune's own Ctrl-C handling
            summary = RunSummary(len(study.trials), 0, 0, 0, 0, uri, interrupted=True)
        finally:
            if started:
                import ray

                ray.shutdown()
    summary.terminated = got["term"]
    return summary


def _start_beside_new_store(study: Study, uri: str, address: str | None, verbose: bool
                            ) -> bool:
    """A new SQLite store: create it (importing MLflow, 1 to 4 s of Python, and copying the
    empty store) in a thread while Ray starts (mostly waiting on its processes), and warm the
    profile worker; returns whether Ray was started here. A new store has no finished trial
    to skip, so the run needs Ray whatever follows. An existing store opens in about a
    second: Ray starts after the lease and the plan, as before, and not at all when nothing
    is left to run."""
    if sqlite_store_exists(uri):
        return False
    import threading

    from ablate.tracking.store import client

    def create() -> None:
        with contextlib.suppress(Exception):  # _held opens it again and says what is wrong
            client(uri)

    thread = threading.Thread(target=create, name="ablate-new-store", daemon=True)
    thread.start()
    started = False
    try:
        started = _init_ray(address, verbose)
        _rearm_python_signal_handlers()
        if started:
            from ablate.tune.profiling import warm_profile_worker

            warm_profile_worker(study)
    except BaseException:  # Ctrl-C among them: the caller never learns that Ray started
        if started:
            import ray

            ray.shutdown()
        raise
    finally:
        with _signals_held() as late:  # a signal now would leave the store half migrated
            thread.join()
            if late and started:
                import ray

                ray.shutdown()
    if late:
        _take_held(late)
    return started


def _run_grid(study: Study, tracker: Tracker, address: str | None, verbose: bool,
              console: Console, keep_trial_dirs: bool) -> RunSummary:
    uri = tracker.uri
    todo, skipped = plan_run(study, uri)
    if not todo:
        console.print(f"{study.spec.name}: all {len(study.trials)} trials already finished; "
                      "nothing to run", highlight=False)
        return RunSummary(len(study.trials), len(skipped), 0, 0, 0, uri)
    from ray import tune

    from ablate.tune.order import start_order
    from ablate.tune.profiling import profile_trials

    context = _context(study)
    progress = Progress(total=len(todo), skipped=len(skipped))
    console.print(f"{study.spec.name}: {len(todo)} trials to run, {len(skipped)} already "
                  f"finished (tracking: {mask_url(uri)})", highlight=False)
    started = _init_ray(address, verbose)
    try:  # profiles first, each alone on its node; then the trials
        _rearm_python_signal_handlers()
        check_fits(study, address, console)
        context["arch"] = profile_trials(study, todo, tracker, console, context["root"],
                                         finished=skipped)
        todo = start_order(study, todo, context["arch"])  # longest first: slots end together
        interrupted = _fit(
            study, tracker, address, verbose, console, progress,
            {"context": context, "cell": tune.grid_search([[t.to_dict()] for t in todo])},
            dict(scheduler=_scheduler(study.spec, max(t.train.epochs for t in todo))),
            keep_trial_dirs=keep_trial_dirs)
    finally:
        if started:
            import ray

            ray.shutdown()
    return RunSummary(len(study.trials), len(skipped), progress.done, progress.pruned,
                      progress.failed, uri, interrupted)


def _finished_metrics(study: Study, uri: str, phase: str = "final"
                      ) -> dict[str, dict[str, float]]:
    """Final metrics of the study's finished runs of `phase`, by trial id (a search reuses
    them)."""
    if not sqlite_store_exists(uri):
        return {}
    df = load_runs(study.experiment, uri, params=False, phase=phase)
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
    if ost.metric_names is None:  # so that importance views can say which metric is which
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ost.set_metric_names(list(spec.search.objectives))
    return storage, name, ost


def sampler_seed(name: str, n_told: int) -> int:
    """The sampler's seed for a (re)start of a search: a resumed search must not replay the
    random start-up suggestions of the first run, yet a run stays reproducible."""
    digest = hashlib.sha256(f"{name}:{n_told}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _run_search(study: Study, tracker: Tracker, address: str | None, verbose: bool,
                console: Console, keep_trial_dirs: bool,
                tags: dict[str, str] | None = None) -> RunSummary:
    """An Optuna search through Ray Tune: continues until `n_trials` trials are complete.
    `tags` go on every run (a tuning phase's), whose earlier runs it reuses."""
    import optuna
    from optuna.trial import TrialState

    from ablate.tune.searcher import OptunaAskTell

    spec = study.spec
    uri = tracker.uri
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
    # Tune wraps it in a ConcurrencyLimiter of max_concurrent_trials, sized once Ray is up
    searcher = OptunaAskTell(sampled, search.distributions(spec), spec.search.objectives)
    sections = {s: getattr(spec, s).model_dump(mode="json") for s in ("dataset", "model", "train")}
    space = {"context": context,
             "search": {"sections": sections, "seeds": list(spec.seeds),
                        "keys": list(search.full_space(spec)),
                        "done": _finished_metrics(study, uri, (tags or {}).get(
                            "ablate.phase", "final"))}}
    progress = Progress(total=remaining, skipped=n_done)
    started = _init_ray(address, verbose)
    try:  # the architectures it can sample profiled first, each alone on its node
        _rearm_python_signal_handlers()
        check_fits(study, address, console)
        context.update(_search_profiles(study, tracker, console, context["root"]))
        interrupted = _fit(
            study, tracker, address, verbose, console, progress, space,
            dict(search_alg=searcher, scheduler=_scheduler(spec, spec.train.epochs),
                 num_samples=remaining), optuna_study=name, keep_trial_dirs=keep_trial_dirs,
            tags=tags)
    finally:
        if started:
            import ray

            ray.shutdown()
    _print_pareto(console, storage, name, spec)
    return RunSummary(spec.search.n_trials, n_done, progress.done, progress.pruned,
                      progress.failed, uri, interrupted)


def _search_profiles(study: Study, tracker: Tracker, console: Console, root: str | None
                     ) -> dict[str, Any]:
    """Context for a search's trials: the profiles of every architecture it can sample, by
    key (measured alone on a node now, or reused), when those are few enough to enumerate."""
    from ablate.tune.profiling import SEARCH_ARCH_CAP, device_type_of, profile_trials
    from ablate.tune.profiling import search_architectures as archs_of

    if not study.profile:
        return {}
    archs = archs_of(study)
    if archs is None:
        console.print(f"{study.spec.name}: the search's architecture dimensions (model.*, the "
                      "input, train.batch_size) are continuous or have more than "
                      f"{SEARCH_ARCH_CAP} combinations, so each trial measures its own costs, "
                      "beside other trials (timing metrics include contention; use categorical "
                      "dimensions for profiles taken alone)", highlight=False)
        return {}
    by_trial = profile_trials(study, archs, tracker, console, root)
    by_key = {i["trial_key"]: {k: v for k, v in i.items() if k != "trial_key"}
              for i in by_trial.values()}
    return {"arch_keys": by_key, "device_type": device_type_of(study)}


def _print_pareto(console: Console, storage, name: str, spec) -> None:
    best = search.pareto_set(storage, name)
    objs = list(spec.search.objectives)
    title = "Pareto set" if len(objs) > 1 else "best trial"
    console.print(f"{title} ({', '.join(f'{k}: {v}' for k, v in spec.search.objectives.items())}"
                  f", seed means):", highlight=False)
    for b in best:
        vals = ", ".join(f"{k}={v:.4g}" for k, v in zip(objs, b["values"], strict=True))
        console.print(f"  #{b['number']}: {vals}  {b['params']}", highlight=False)
