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
    from ablate.train import DTYPES, fit, pick_device

    trial = TrialSpec.from_dict(config["trial"])
    torch.set_num_threads(max(1, int(config.get("cpus", 1))))
    device = pick_device(config.get("gpus", 0.0))
    root = Path(config["root"]) if config.get("root") else None
    data = load_dataset(trial.dataset, root)
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
                 concurrency: int) -> None:
        self.tracker, self.study, self.progress = tracker, study, progress
        self.console, self.concurrency = console, concurrency
        self.by_id = {t.trial_id: t for t in study.trials}
        self.runs: dict[str, Future] = {}  # ablate trial id -> future of its mlflow run id
        self.attempts: dict[str, int] = {}
        self.t0: dict[str, float] = {}
        self.open: set[str] = set()
        # One writer thread, in submission order: SQLite still sees one writer, and Tune's
        # event loop never waits on the tracking store (a remote server included).
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-mlflow")
        self.write_errors: list[str] = []

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

    def _tid(self, trial) -> str:
        return trial.config["t"]["trial"]["trial_id"]

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = self._tid(trial)
        if tid in self.runs:
            self.attempts[tid] += 1
            tags = {"ablate.attempts": str(self.attempts[tid]), "ablate.status": "running"}
            self._write(tid, lambda rid: self.tracker.set_tags(rid, tags))
        else:
            self.runs[tid] = self.pool.submit(self.tracker.start_run, self.by_id[tid],
                                              self.study)
            self.attempts[tid] = 1
        self.open.add(tid)
        self.t0[tid] = time.monotonic()
        self.progress.running.add(tid)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = self._tid(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        keys = [k for k in ("train_loss", "val_loss", "val_acc", "lr", "epoch_time_s")
                if k in result]
        per_epoch = {k: result[k] for k in keys}
        self._write(tid, lambda rid: self.tracker.log_metrics(rid, per_epoch, step=epoch))
        if "test_acc" in result:
            from ablate.tracking import FINAL_METRICS

            final = {k: result[k] for k in (*FINAL_METRICS, "profile_batch_size")
                     if k in result and k not in keys}
            self._write(tid, lambda rid: self.tracker.log_metrics(rid, final, step=epoch))
        acc = result.get("val_acc")
        if acc is not None and (self.progress.best is None or acc > self.progress.best):
            self.progress.best, self.progress.best_name = acc, self.by_id[tid].run_name

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
        tid = self._tid(trial)
        if tid not in self.runs:
            return
        text = self._error_text(trial)
        n = self.attempts.get(tid, 1)
        tail = self._log_tail(trial)
        reason = _reason(text)

        def record(rid: str) -> None:
            self.tracker.log_text(rid, text, f"error_attempt{n}.txt")
            if tail:
                self.tracker.log_text(rid, tail, f"log_tail_attempt{n}.txt")
            self.tracker.set_tags(rid, {"ablate.error": reason[:500]})
            if final:
                self.tracker.end_run(rid, "failed")

        self._write(tid, record)
        if final:
            self.open.discard(tid)
            self.progress.running.discard(tid)
            self.progress.failed += 1
            self.console.print(f"[red]failed[/red] {self.by_id[tid].run_name}: {reason}",
                          highlight=False)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._record_error(trial, final=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record_error(trial, final=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid = self._tid(trial)
        last = trial.last_result or {}
        status = "finished" if "test_acc" in last else "pruned"
        self._write(tid, lambda rid: self.tracker.end_run(rid, status))
        self.open.discard(tid)
        self.progress.running.discard(tid)
        self.progress.durations.append(time.monotonic() - self.t0.get(tid, time.monotonic()))
        if status == "finished":
            self.progress.done += 1
        else:
            self.progress.pruned += 1
        acc = last.get("test_acc")
        acc_s = f"val_acc {last.get('val_acc', float('nan')):.4f}" + (
            f" test_acc {acc:.4f}" if acc is not None else "")
        self.console.print(f"[green]{status}[/green] {self.by_id[tid].run_name}: {acc_s}  "
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

    roots = {str(resolve_root(t.dataset)) for t in study.trials}
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
    uri = resolve_tracking_uri(tracking_uri, study.spec.tracking.uri)
    todo, skipped = plan_run(study, uri)
    if not todo:
        console.print(f"{study.spec.name}: all {len(study.trials)} trials already finished; "
                      "nothing to run", highlight=False)
        return RunSummary(len(study.trials), len(skipped), 0, 0, 0, uri)
    root = data_root(study)
    tags = {"ablate.study_file_hash": study.file_hash, "ablate.study_file": str(study.path),
            "mlflow.note.content": study.spec.description or study.spec.name}
    # Opening the store (and creating a new one) overlaps with Ray's start-up.
    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(Tracker, uri, study.experiment, tags)
        started_ray = _init_ray(address, verbose)
        try:
            tracker = opening.result()
        except BaseException:
            if started_ray:
                import ray

                ray.shutdown()
            raise
    res = study.spec.resources
    concurrency = res.max_concurrent or max(1, int((os.cpu_count() or 1) // res.cpus_per_trial))
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
    sched = study.spec.scheduler
    scheduler = None
    if sched.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", metric=sched.metric,
                                  mode=sched.mode, max_t=max(t.train.epochs for t in todo),
                                  grace_period=sched.grace_period,
                                  reduction_factor=sched.reduction_factor)
    storage = Path(tempfile.gettempdir()) / "ablate-ray"
    storage.mkdir(parents=True, exist_ok=True)
    interrupted = False
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={"t": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrency,
                                        reuse_actors=True,
                                        trial_dirname_creator=lambda tr: _dirname(tr),
                                        trial_name_creator=lambda tr: _dirname(tr)),
            run_config=tune.RunConfig(
                name=f"{study.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(storage), verbose=2 if verbose else 0, log_to_file=True,
                failure_config=tune.FailureConfig(max_failures=study.spec.failures.max_retries),
                callbacks=[callback], progress_reporter=None),
        )
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        callback.mark_killed()
        if started_ray:
            import ray

            ray.shutdown()
    # Tune stops gracefully on Ctrl-C and returns: unfinished trials mean we were interrupted
    interrupted = interrupted or (progress.done + progress.pruned + progress.failed
                                  < progress.total)
    console.print(f"{study.spec.name}: {progress.line(concurrency)}", highlight=False)
    return RunSummary(len(study.trials), len(skipped), progress.done, progress.pruned,
                      progress.failed, uri, interrupted)


def _dirname(trial) -> str:
    return f"{trial.config['t']['trial']['trial_id']}_{trial.trial_id}"


def status(study: Study, tracking_uri: str | None = None) -> dict[str, Any]:
    """Counts by status (trials with no run are 'pending') and the best finished trial."""
    from ablate.tracking import load_runs

    uri = resolve_tracking_uri(tracking_uri, study.spec.tracking.uri)
    df = load_runs(study.experiment, uri)
    ids = {t.trial_id for t in study.trials}
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
    return {"study": study.spec.name, "tracking_uri": uri, "trials": len(ids), "counts": counts,
            "best": best, "done": sum(counts[s] for s in DONE)}
