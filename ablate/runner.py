"""Ray Tune: one trainable per trial, resources, schedulers, retries, resume, progress.

The driver owns the only MLflow writer (a Tune callback); trials report per-epoch metrics
through `tune.report`. A trial whose id already has a finished run is never run again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Ray's new console output prints a banner even at verbose=0; ablate prints its own progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

from ray.tune import Callback  # noqa: E402
from rich.console import Console

from ablate.errors import AblateError
from ablate.study import Study, TrialSpec
from ablate.tracking import DONE, Tracker, resolve_tracking_uri, sqlite_store_exists

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- inside a trial (worker)

def build_trial_model(trial: TrialSpec, image_size: int, channels: int, num_classes: int):
    from ablate.models import create_model

    kwargs = trial.model.model_dump()
    arch = kwargs.pop("arch")
    return create_model(arch, image_size=image_size, in_chans=channels,
                        num_classes=num_classes, **(kwargs if arch == "backbone" else {}))


def _take_fault(fault_file: str | None, trial_id: str, epoch: int) -> bool:
    """Test hook: ABLATE_FAULT_FILE maps trial ids to {"epoch": k, "times": n}; the trial
    raises at epoch k, n times in all (the counter lives in the file, across retries)."""
    if not fault_file or not Path(fault_file).exists():
        return False
    with open(fault_file, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        faults = json.load(f)
        spec = faults.get(trial_id)
        if not spec or spec.get("epoch", 1) != epoch or spec.get("times", 0) <= 0:
            return False
        spec["times"] -= 1
        f.seek(0)
        f.truncate()
        json.dump(faults, f)
    return True


def run_trial(config: dict[str, Any], report) -> dict[str, float]:
    """Everything one trial does: data -> model -> cost profile -> fit. Ray-free."""
    import torch

    from ablate.cost import profile
    from ablate.data import load_dataset
    from ablate.train import DTYPES, fit, pick_device, seed_everything

    trial = TrialSpec.from_dict(config["trial"])
    torch.set_num_threads(max(1, int(config.get("cpus", 1))))
    device = pick_device(config.get("gpus", 0.0))
    root = Path(config["root"]) if config.get("root") else None
    data = load_dataset(trial.dataset, root)
    seed_everything(trial.seed)  # the weights' init too: a reused actor's RNG is not fresh
    model = build_trial_model(trial, data.image_size, data.channels, data.num_classes)
    precision = trial.train.precision
    dtype = DTYPES["fp32" if precision == "fp16" and device.type != "cuda" else precision]
    cost = profile(model, data.image_size, in_chans=data.channels,
                   num_classes=data.num_classes, batch_size=trial.train.profile_batch_size,
                   device=device, dtype=dtype, channels_last=trial.train.channels_last,
                   min_seconds=trial.train.profile_seconds, warmup=2)

    def on_epoch(metrics: dict[str, float]) -> None:
        if _take_fault(config.get("fault_file"), trial.trial_id, int(metrics["epoch"])):
            raise RuntimeError(f"injected fault at epoch {int(metrics['epoch'])} "
                               "(ABLATE_FAULT_FILE)")
        report(metrics)

    return fit(model, data, trial.train, trial.seed, device, on_epoch,
               final_extra={**cost.metrics(), "profile_batch_size": float(cost.batch_size)})


def run_search_trial(config: dict[str, Any], report) -> None:
    """One sampled configuration of an Optuna search: every seed, trained in lock-step, so
    each epoch's report is the seed mean (what ASHA prunes on and Optuna optimizes). Seeds
    whose trial id already finished are not trained again; their stored metrics count."""
    import torch

    from ablate.cost import profile
    from ablate.data import load_dataset
    from ablate.study import trials_for
    from ablate.train import DTYPES, fit_epochs, pick_device, seed_everything

    b = config["base"]
    trials = trials_for(b["sections"], _overrides(config), b["seeds"], b["keys"])
    torch.set_num_threads(max(1, int(b.get("cpus", 1))))
    device = pick_device(b.get("gpus", 0.0))
    done: dict[str, dict[str, float]] = b["done"]
    todo = [t for t in trials if t.trial_id not in done]
    stored = [done[t.trial_id] for t in trials if t.trial_id in done]
    if not todo:  # every seed of this configuration finished before: report, train nothing
        report({**_mean(stored), "epoch": float(trials[0].train.epochs), "per_seed": "{}"})
        return
    t0 = todo[0]
    data = load_dataset(t0.dataset, Path(b["root"]) if b.get("root") else None)
    precision = t0.train.precision
    dtype = DTYPES["fp32" if precision == "fp16" and device.type != "cuda" else precision]
    cost = None
    gens = {}
    for t in todo:
        seed_everything(t.seed)
        model = build_trial_model(t, data.image_size, data.channels, data.num_classes)
        if cost is None:  # the same architecture for every seed: profile it once
            cost = profile(model, data.image_size, in_chans=data.channels,
                           num_classes=data.num_classes, batch_size=t.train.profile_batch_size,
                           device=device, dtype=dtype, channels_last=t.train.channels_last,
                           min_seconds=t.train.profile_seconds, warmup=2)
        gens[t.trial_id] = fit_epochs(model, data, t.train, t.seed, device,
                                      final_extra={**cost.metrics(),
                                                   "profile_batch_size": float(cost.batch_size)})
    for epoch in range(1, t0.train.epochs + 1):
        per = {tid: next(g) for tid, g in gens.items()}
        for tid in per:
            if _take_fault(b.get("fault_file"), tid, epoch):
                raise RuntimeError(f"injected fault at epoch {epoch} (ABLATE_FAULT_FILE)")
        last = epoch == t0.train.epochs
        means = _mean(list(per.values()) + (stored if last else []))
        report({**cost.metrics(), **means, "epoch": float(epoch),
                "per_seed": json.dumps(per)})


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*rows) if rows else set()
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and isinstance(r[k], (int, float))]
        if vals and len(vals) == len(rows):
            out[k] = float(sum(vals) / len(vals))
    return out


def _search_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    run_search_trial(config, tune.report)


def _trainable(config: dict[str, Any]) -> None:
    from ray import tune

    run_trial(config["t"], tune.report)


# ---------------------------------------------------------------- progress

@dataclass
class Progress:
    total: int
    skipped: int
    done: int = 0
    pruned: int = 0
    failed: int = 0
    running: set[str] = field(default_factory=set)
    best: float | None = None
    best_name: str = ""
    started: float = field(default_factory=time.monotonic)
    durations: list[float] = field(default_factory=list)

    def eta_s(self, concurrency: int) -> float | None:
        left = self.total - self.done - self.pruned - self.failed
        if not self.durations or left <= 0:
            return None
        avg = sum(self.durations) / len(self.durations)
        return avg * left / max(1, concurrency)

    def line(self, concurrency: int) -> str:
        eta = self.eta_s(concurrency)
        best = f"best val_acc {self.best:.4f} ({self.best_name})" if self.best is not None else (
            "best -")
        eta_s = f"ETA {eta / 60:.1f} min" if eta is not None else "ETA -"
        return (f"done {self.done + self.pruned}/{self.total} (pruned {self.pruned}) | running "
                f"{len(self.running)} | failed {self.failed} | skipped {self.skipped} | {best} | "
                f"{eta_s} | {time.monotonic() - self.started:.0f}s")


class MlflowWriter(Callback):
    """The only MLflow writer of a study: runs in the driver, so SQLite sees one process."""

    def __init__(self, tracker: Tracker, study: Study, progress: Progress, console: Console,
                 concurrency: int, optuna_study: str | None = None) -> None:
        self.tracker, self.study, self.progress = tracker, study, progress
        self.console, self.concurrency = console, concurrency
        self.optuna_study = optuna_study
        self.by_id = {t.trial_id: t for t in study.trials}
        self.specs: dict[str, list[TrialSpec]] = {}  # Tune trial id -> its ablate trials
        self.runs: dict[str, Future] = {}  # ablate trial id -> future of its mlflow run id
        self.attempts: dict[str, int] = {}
        self.t0: dict[str, float] = {}
        self.open: set[str] = set()
        # One writer thread, in submission order: SQLite still sees one writer, and Tune's
        # event loop never waits on the tracking store (a remote server included).
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-mlflow")
        self.write_errors: list[str] = []
        self.nodes: dict[str, str] = {}
        self.status = None  # a rich Status line while the study runs (terminals only)
        self._shown = 0.0

    def on_step_end(self, iteration, trials, **info):
        """Refresh the live progress line (at most once a second)."""
        if self.status is not None and time.monotonic() - self._shown > 1.0:
            self._shown = time.monotonic()
            self.status.update(self.progress.line(self.concurrency))

    def _write(self, tid: str, fn: Callable[[str], Any]) -> None:
        def op() -> None:
            try:
                fn(self.runs[tid].result())
            except Exception as e:  # noqa: BLE001 - reported at the end, the study goes on
                self.write_errors.append(f"{type(e).__name__}: {e}")

        self.pool.submit(op)

    def flush(self) -> None:
        """Wait for every queued write; report the ones that failed."""
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-mlflow")
        for msg in dict.fromkeys(self.write_errors):
            self.console.print(f"[yellow]warning[/yellow]: a tracking write failed: {msg}",
                               highlight=False)
        self.write_errors.clear()

    def _specs(self, trial) -> list[TrialSpec]:
        """The ablate trials a Tune trial runs: one (grid) or one per seed (search; seeds
        whose trial id already finished are reused, not run)."""
        if trial.trial_id not in self.specs:
            cfg = trial.config
            if "t" in cfg:
                self.specs[trial.trial_id] = [self.by_id[cfg["t"]["trial"]["trial_id"]]]
            else:
                from ablate.study import trials_for

                b = cfg["base"]
                try:
                    specs = trials_for(b["sections"], _overrides(cfg), b["seeds"], b["keys"])
                except ValueError:
                    specs = []
                self.specs[trial.trial_id] = [t for t in specs if t.trial_id not in b["done"]]
        return self.specs[trial.trial_id]

    def _name(self, trial) -> str:
        specs = self._specs(trial)
        if not specs:
            return trial.trial_id
        return " ".join(specs[0].run_name.split(" ")[:-1]) or specs[0].run_name

    def on_trial_start(self, iteration, trials, trial, **info):
        number = trial.config.get("__optuna_number")
        for spec in self._specs(trial):
            tid = spec.trial_id
            if tid in self.runs:
                self.attempts[tid] += 1
                tags = {"ablate.attempts": str(self.attempts[tid]), "ablate.status": "running"}
                self._write(tid, lambda rid, tags=tags: self.tracker.set_tags(rid, tags))
            else:
                extra = ({"optuna.trial_number": str(number),
                          "optuna.study_name": str(self.optuna_study)}
                         if number is not None else None)
                self.runs[tid] = self.pool.submit(self.tracker.start_run, spec, self.study,
                                                  extra)
                self.attempts[tid] = 1
            self.open.add(tid)
        self.t0[trial.trial_id] = time.monotonic()
        self.progress.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from ablate.tracking import FINAL_METRICS

        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        specs = self._specs(trial)
        if "per_seed" in result:
            per = json.loads(result["per_seed"])
        else:
            per = {specs[0].trial_id: result} if specs else {}
        node = result.get("node_ip")
        for tid, res in per.items():
            if tid not in self.runs:
                continue
            if node and self.nodes.get(tid) != node:  # where it ran (and, after a retry, reran)
                self.nodes[tid] = node
                tags = {"ablate.node_ip": str(node),
                        "ablate.hostname": str(result.get("hostname", ""))}
                self._write(tid, lambda rid, tags=tags: self.tracker.set_tags(rid, tags))
            keys = [k for k in ("train_loss", "val_loss", "val_acc", "lr", "epoch_time_s")
                    if k in res]
            per_epoch = {k: res[k] for k in keys}
            self._write(tid, lambda rid, m=per_epoch: self.tracker.log_metrics(rid, m,
                                                                                step=epoch))
            if "test_acc" in res:
                final = {k: res[k] for k in (*FINAL_METRICS, "profile_batch_size")
                         if k in res and k not in keys}
                self._write(tid, lambda rid, m=final: self.tracker.log_metrics(rid, m,
                                                                               step=epoch))
        acc = result.get("val_acc")
        if acc is not None and (self.progress.best is None or acc > self.progress.best):
            self.progress.best, self.progress.best_name = acc, self._name(trial)

    def _error_text(self, trial) -> str:
        err = None
        try:
            err = trial.get_error()
        except Exception:  # noqa: BLE001
            err = None
        if isinstance(err, BaseException):
            return "".join(traceback.format_exception(err))
        if err:
            return str(err)
        path = getattr(trial, "error_file", None)
        if path and Path(path).exists():
            return Path(path).read_text(errors="replace")
        return "unknown error (see the Ray logs)"

    def _log_tail(self, trial) -> str:
        path = getattr(trial, "local_path", None) or getattr(trial, "path", None)
        if not path:
            return ""
        parts = []
        for name in ("stdout", "stderr"):
            f = Path(path) / name
            if f.exists():
                lines = f.read_text(errors="replace").splitlines()[-200:]
                parts.append(f"==> {name} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    def _record_error(self, trial, final: bool) -> None:
        text = self._error_text(trial)
        tail = self._log_tail(trial)
        reason = _reason(text)
        for spec in self._specs(trial):
            tid = spec.trial_id
            if tid not in self.runs:
                continue
            n = self.attempts.get(tid, 1)

            def record(rid: str, n: int = n) -> None:
                self.tracker.log_text(rid, text, f"error_attempt{n}.txt")
                if tail:
                    self.tracker.log_text(rid, tail, f"log_tail_attempt{n}.txt")
                self.tracker.set_tags(rid, {"ablate.error": reason[:500]})
                if final:
                    self.tracker.end_run(rid, "failed")

            self._write(tid, record)
            if final:
                self.open.discard(tid)
        if final:
            self.progress.running.discard(trial.trial_id)
            self.progress.failed += 1
            self.console.print(f"[red]failed[/red] {self._name(trial)}: {reason}",
                               highlight=False)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._record_error(trial, final=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record_error(trial, final=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        status = "finished" if "test_acc" in last else "pruned"
        for spec in self._specs(trial):
            tid = spec.trial_id
            if tid in self.runs:
                self._write(tid, lambda rid: self.tracker.end_run(rid, status))
                self.open.discard(tid)
        self.progress.running.discard(trial.trial_id)
        self.progress.durations.append(time.monotonic() - self.t0.get(trial.trial_id,
                                                                       time.monotonic()))
        if status == "finished":
            self.progress.done += 1
        else:
            self.progress.pruned += 1
        acc = last.get("test_acc")
        acc_s = f"val_acc {last.get('val_acc', float('nan')):.4f}" + (
            f" test_acc {acc:.4f}" if acc is not None else "")
        self.console.print(f"[green]{status}[/green] {self._name(trial)}: {acc_s}  "
                      f"({self.progress.line(self.concurrency)})", highlight=False)

    def mark_killed(self) -> None:
        for tid in list(self.open):
            self._write(tid, lambda rid: self.tracker.end_run(rid, "killed"))
            self.open.discard(tid)
        self.flush()

    def on_experiment_end(self, trials, **info):
        self.mark_killed()

    def __getstate__(self) -> dict:
        # Tune pickles its state for restoring; ablate resumes from MLflow instead.
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The sampled dimensions of a search trial's config (dotted keys)."""
    return {k: v for k, v in config.items() if "." in k}


def _reason(text: str) -> str:
    """The last line of an exception text that says something (type: message)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "diverged at epoch" in ln:
            return ln[ln.index("diverged"):]
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return ln
    return lines[-1] if lines else "unknown error"


# ---------------------------------------------------------------- the driver

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
    """The data root made absolute in the driver (relative to the study file's folder's
    working directory, i.e. where `ablate run` was called)."""
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
    if not sqlite_store_exists(tracking_uri):
        return list(study.trials), []
    from ablate.tracking import client

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(study.experiment)
    if exp is None:
        return list(study.trials), []
    tracker = Tracker.__new__(Tracker)
    tracker.client, tracker.experiment_id, tracker.uri = c, exp.experiment_id, tracking_uri
    done = tracker.done_trial_ids()
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


def run_study(study: Study, tracking_uri: str | None = None, address: str | None = None,
              verbose: bool = False, console: Console | None = None) -> RunSummary:
    """Run every trial of a study that has no finished run yet."""
    console = console or Console(soft_wrap=True)
    if study.spec.search.method == "optuna":
        return run_search(study, tracking_uri, address, verbose, console)
    uri = resolve_tracking_uri(tracking_uri, study.spec.tracking.uri)
    todo, skipped = plan_run(study, uri)
    if not todo:
        console.print(f"{study.spec.name}: all {len(study.trials)} trials already finished; "
                      "nothing to run", highlight=False)
        return RunSummary(len(study.trials), len(skipped), 0, 0, 0, uri)
    root = data_root(study)
    tracker, started_ray = _open_store_and_ray(study, uri, address, verbose)
    res = study.spec.resources
    concurrency = _concurrency(res)
    progress = Progress(total=len(todo), skipped=len(skipped))
    console.print(f"{study.spec.name}: {len(todo)} trials to run, {len(skipped)} already "
                  f"finished (tracking: {uri})", highlight=False)

    from ray import tune

    callback = MlflowWriter(tracker, study, progress, console, concurrency)
    fault_file = os.environ.get("ABLATE_FAULT_FILE")
    configs = [{"trial": t.to_dict(), "root": root, "cpus": res.cpus_per_trial,
                "gpus": res.gpus_per_trial, "fault_file": fault_file} for t in todo]
    trainable = tune.with_resources(_trainable, {"cpu": res.cpus_per_trial,
                                                 "gpu": res.gpus_per_trial})
    interrupted = _fit(
        trainable, {"t": tune.grid_search(configs)},
        dict(scheduler=_scheduler(study.spec, max(t.train.epochs for t in todo)),
             trial_dirname_creator=_dirname, trial_name_creator=_dirname),
        study.spec, callback, started_ray, progress, verbose)
    console.print(f"{study.spec.name}: {progress.line(concurrency)}", highlight=False)
    return RunSummary(len(study.trials), len(skipped), progress.done, progress.pruned,
                      progress.failed, uri, interrupted)


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


def _fit(trainable, param_space: dict, tune_kwargs: dict, spec, callback: MlflowWriter,
         started_ray: bool, progress: Progress, verbose: bool) -> bool:
    """Run a Tuner with ablate's settings; returns whether the run was interrupted. Running
    runs are marked killed and Ray is shut down (if we started it) whatever happens."""
    from ray import tune

    storage = Path(tempfile.gettempdir()) / "ablate-ray"
    storage.mkdir(parents=True, exist_ok=True)
    interrupted = False
    live = callback.console.is_terminal and not verbose
    status = callback.console.status(progress.line(callback.concurrency)) if live else None
    try:
        if status is not None:
            status.start()
            callback.status = status
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=callback.concurrency,
                                        reuse_actors=True, **tune_kwargs),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(storage), verbose=2 if verbose else 0,
                log_to_file=True,
                failure_config=tune.FailureConfig(max_failures=spec.failures.max_retries),
                callbacks=[callback], progress_reporter=None))
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if status is not None:
            status.stop()
            callback.status = None
        callback.mark_killed()
        if started_ray:
            import ray

            ray.shutdown()
    # Tune stops gracefully on Ctrl-C and returns: unfinished trials mean we were interrupted
    return interrupted or (progress.done + progress.pruned + progress.failed < progress.total)


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


def _finished_metrics(study: Study, uri: str) -> dict[str, dict[str, float]]:
    """Final metrics of the study's finished runs, by trial id (a search reuses them)."""
    from ablate.tracking import FINAL_METRICS, load_runs

    if not sqlite_store_exists(uri):
        return {}
    df = load_runs(study.experiment, uri)
    if df.empty:
        return {}
    out = {}
    for _, r in df[df["status"] == "finished"].iterrows():
        out[r["trial_id"]] = {k: float(r[k]) for k in FINAL_METRICS if k in r and r[k] == r[k]}
    return out


def _optuna_searcher(spec, storage, name: str):
    """Ray's OptunaSearch that also tags configs with the Optuna trial number and records
    ASHA-stopped trials as PRUNED (Ray would tell them COMPLETE with a partial value)."""
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    from ablate import search

    objs = spec.search.objectives
    metric = list(objs) if len(objs) > 1 else next(iter(objs))
    mode = list(objs.values()) if len(objs) > 1 else next(iter(objs.values()))

    class AblateOptunaSearch(OptunaSearch):
        def suggest(self, trial_id: str):
            cfg = super().suggest(trial_id)
            if cfg is not None:
                cfg["__optuna_number"] = self._ot_trials[trial_id].number
            return cfg

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            names = self.metric if isinstance(self.metric, list) else [self.metric]
            if error or not result:
                state, val = TrialState.FAIL, None
            elif "test_acc" not in result:
                state, val = TrialState.PRUNED, None
            else:
                state = TrialState.COMPLETE
                vals = [result.get(m) for m in names]
                val = vals if isinstance(self.metric, list) else vals[0]
            try:
                self._ot_study.tell(ot_trial, val, state=state)
            except Exception as e:  # noqa: BLE001 - e.g. NaN values: Optuna records FAIL
                log.warning("optuna could not record trial %s: %s", trial_id, e)
            self._completed_trials.add(trial_id)

    return AblateOptunaSearch(space=search.distributions(spec), metric=metric, mode=mode,
                              sampler=search.make_sampler(spec), storage=storage,
                              study_name=name)


def open_search_study(spec):
    """(storage, Optuna study name, Optuna study) of an Optuna search, created if new, with
    trials left RUNNING by an interrupted run marked FAIL (they never finished)."""
    import optuna
    from optuna.trial import TrialState

    from ablate import search

    storage = search.open_storage(spec.search.storage)
    name = search.study_name(spec)
    directions = ["maximize" if m == "max" else "minimize"
                  for m in spec.search.objectives.values()]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ost = optuna.create_study(study_name=name, storage=storage, directions=directions,
                              load_if_exists=True)
    for t in ost.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return storage, name, ost


def run_search(study: Study, tracking_uri: str | None = None, address: str | None = None,
               verbose: bool = False, console: Console | None = None) -> RunSummary:
    """An Optuna search through Ray Tune: continues until `n_trials` trials are complete."""
    from optuna.trial import TrialState
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from ablate import search

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
    root = data_root(study)
    done = _finished_metrics(study, uri)
    res = spec.resources
    concurrency = _concurrency(res)
    console.print(f"{spec.name}: Optuna {spec.search.sampler} search, {remaining} of "
                  f"{spec.search.n_trials} trials to run x {len(spec.seeds)} seeds (study "
                  f"{name}; tracking: {uri})", highlight=False)
    tracker, started_ray = _open_store_and_ray(study, uri, address, verbose)
    progress = Progress(total=remaining, skipped=n_done)
    callback = MlflowWriter(tracker, study, progress, console, concurrency, optuna_study=name)
    keys = list(search.full_space(spec))
    base = {"sections": {s: getattr(spec, s).model_dump(mode="json")
                         for s in ("dataset", "model", "train")},
            "seeds": list(spec.seeds), "keys": keys, "done": done, "root": root,
            "cpus": res.cpus_per_trial, "gpus": res.gpus_per_trial,
            "fault_file": os.environ.get("ABLATE_FAULT_FILE")}
    searcher = ConcurrencyLimiter(_optuna_searcher(spec, storage, name),
                                  max_concurrent=concurrency)
    interrupted = _fit(
        tune.with_resources(_search_trainable, {"cpu": res.cpus_per_trial,
                                                "gpu": res.gpus_per_trial}),
        {"base": base},
        dict(search_alg=searcher, scheduler=_scheduler(spec, spec.train.epochs),
             num_samples=remaining),
        spec, callback, started_ray, progress, verbose)
    console.print(f"{spec.name}: {progress.line(concurrency)}", highlight=False)
    _print_pareto(console, storage, name, spec)
    return RunSummary(spec.search.n_trials, n_done, progress.done, progress.pruned,
                      progress.failed, uri, interrupted)


def _print_pareto(console: Console, storage, name: str, spec) -> None:
    from ablate import search

    best = search.pareto_set(storage, name)
    objs = list(spec.search.objectives)
    title = "Pareto set" if len(objs) > 1 else "best trial"
    console.print(f"{title} ({', '.join(f'{k}: {v}' for k, v in spec.search.objectives.items())}"
                  f", seed means):", highlight=False)
    for b in best:
        vals = ", ".join(f"{k}={v:.4g}" for k, v in zip(objs, b["values"], strict=True))
        console.print(f"  #{b['number']}: {vals}  {b['params']}", highlight=False)


def _dirname(trial) -> str:
    return f"{trial.config['t']['trial']['trial_id']}_{trial.trial_id}"


def status(study: Study, tracking_uri: str | None = None) -> dict[str, Any]:
    """Counts by status (trials with no run are 'pending') and the best finished trial."""
    from ablate.tracking import load_runs

    uri = resolve_tracking_uri(tracking_uri, study.spec.tracking.uri)
    df = load_runs(study.experiment, uri)
    optuna_search = study.spec.search.method == "optuna"
    ids = ({t.trial_id for t in study.trials} if not optuna_search else
           set(df["trial_id"]) if not df.empty else set())
    counts = {s: 0 for s in ("finished", "pruned", "running", "failed", "killed", "pending")}
    best = None
    if not df.empty:
        df = df[df["trial_id"].isin(ids)]
        rank = {s: i for i, s in enumerate(("finished", "pruned", "running", "failed",
                                            "killed"))}
        df = df.assign(_r=df["status"].map(lambda s: rank.get(s, 9)))
        latest = df.sort_values(["_r", "start_time"], ascending=[True, False]).groupby(
            "trial_id").head(1)
        for s in latest["status"]:
            counts[s] = counts.get(s, 0) + 1
        fin = latest[latest["status"] == "finished"]
        if not fin.empty and "val_acc" in fin:
            b = fin.sort_values("val_acc", ascending=False).iloc[0]
            best = {"run_name": b["run_name"], "trial_id": b["trial_id"],
                    "val_acc": float(b["val_acc"]),
                    "test_acc": float(b["test_acc"]) if "test_acc" in b else None}
        counts["pending"] = len(ids) - len(latest)
    else:
        counts["pending"] = len(ids)
    info = {"study": study.spec.name, "tracking_uri": uri, "trials": len(ids),
            "counts": counts, "best": best, "done": sum(counts[s] for s in DONE)}
    if optuna_search:
        info["optuna"] = _search_status(study.spec)
    return info


def _search_status(spec) -> dict[str, Any]:
    """Optuna trials by state and the Pareto set (or best trial), from the search's storage."""
    from ablate import search

    url = spec.search.storage or search.default_storage_url()
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return {"study_name": search.study_name(spec), "states": {}, "pareto": []}
    import optuna

    storage = search.open_storage(url)
    name = search.study_name(spec)
    try:
        st = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {"study_name": name, "states": {}, "pareto": []}
    states: dict[str, int] = {}
    for t in st.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return {"study_name": name, "n_trials": spec.search.n_trials, "states": states,
            "objectives": spec.search.objectives, "pareto": search.pareto_set(storage, name)}
