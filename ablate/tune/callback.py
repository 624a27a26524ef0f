"""Ray Tune's events -> the study's one MLflow writer and the progress line.

A Tune trial trains one cell's seeds (`trainable.cell_trials`); this callback turns its
start, reports, retries, errors and end into `RunWriter` events per ablate trial id.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback
from rich.console import Console

from ablate.study import TrialSpec
from ablate.tracking import RunWriter
from ablate.tune.progress import Progress
from ablate.tune.trainable import cell_trials


def failure_reason(text: str) -> str:
    """The last line of an exception text that says something (type: message)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "diverged at epoch" in ln:
            return ln[ln.index("diverged"):]
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return ln
    return lines[-1] if lines else "unknown error"


class StudyCallback(Callback):
    """Feeds the writer and the progress line from the driver (Tune's event loop)."""

    def __init__(self, writer: RunWriter, progress: Progress, console: Console,
                 concurrency: int, optuna_study: str | None = None,
                 tags: dict[str, str] | None = None,
                 arch: dict[str, dict[str, Any]] | None = None,
                 lookup: Callable[[TrialSpec], dict[str, Any] | None] | None = None) -> None:
        self.writer, self.progress, self.console = writer, progress, console
        self.concurrency = concurrency
        self.optuna_study = optuna_study
        self.tags = dict(tags or {})  # added to every run (a tuning phase's tags)
        self.arch = arch or {}  # trial id -> its architecture's profile (profiling.py)
        self.lookup = lookup  # a search's: trial -> its architecture's profile
        self.trials: dict[str, list[TrialSpec]] = {}  # Tune trial id -> its ablate trials
        self.started: dict[str, float] = {}
        self.status = None  # a rich Status line while the study runs (terminals only)
        self._shown = 0.0

    def trials_of(self, trial) -> list[TrialSpec]:
        """The ablate trials a Tune trial trains (seeds finished before are not among them)."""
        if trial.trial_id not in self.trials:
            try:
                todo, _ = cell_trials(trial.config)
            except ValueError:  # a sampled configuration that cannot run: the trial fails
                todo = []
            self.trials[trial.trial_id] = todo
        return self.trials[trial.trial_id]

    def _name(self, trial) -> str:
        specs = self.trials_of(trial)
        return specs[0].cell_name if specs else trial.trial_id

    def on_step_end(self, iteration, trials, **info):
        """Refresh the live progress line (at most once a second)."""
        if self.status is not None and time.monotonic() - self._shown > 1.0:
            self._shown = time.monotonic()
            self.status.update(self.progress.line(self.concurrency))

    def on_trial_start(self, iteration, trials, trial, **info):
        number = trial.config.get("__optuna_number")
        extra = {**self.tags, **({"optuna.trial_number": str(number),
                                  "optuna.study_name": str(self.optuna_study)}
                                 if number is not None else {})}
        from ablate.tune.profiling import trial_params

        for spec in self.trials_of(trial):
            info = self.arch.get(spec.trial_id) or (self.lookup(spec) if self.lookup else None)
            tags, params = trial_params(info) if info else ({}, {})
            self.writer.start(spec, {**extra, **tags}, params)
        self.started[trial.trial_id] = time.monotonic()
        self.progress.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        per_seed = json.loads(result.get("per_seed") or "{}")
        for tid, metrics in per_seed.items():
            step = int(metrics.get("curve_step", epoch))
            self.writer.result(tid, metrics, step, node=result.get("node_ip"),
                               hostname=result.get("hostname", ""))
        acc = result.get("val_acc")
        if acc is not None and (self.progress.best is None or acc > self.progress.best):
            self.progress.best, self.progress.best_name = acc, self._name(trial)

    def _error_text(self, trial) -> str:
        try:
            err = trial.get_error()
        except Exception:  # noqa: BLE001 - no error object: fall back to the error file
            err = None
        if isinstance(err, BaseException):
            return "".join(traceback.format_exception(err))
        if err:
            return str(err)
        path = getattr(trial, "error_file", None)
        if path and Path(path).exists():
            return Path(path).read_text(errors="replace")
        return "unknown error (see the Ray logs)"

    @staticmethod
    def _log_tail(trial) -> str:
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
        reason = failure_reason(text)
        for spec in self.trials_of(trial):
            self.writer.error(spec.trial_id, text, tail, reason, final)
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
        for spec in self.trials_of(trial):
            self.writer.end(spec.trial_id, status)
        self.progress.running.discard(trial.trial_id)
        self.progress.durations.append(
            time.monotonic() - self.started.get(trial.trial_id, time.monotonic()))
        if status == "finished":
            self.progress.done += 1
        else:
            self.progress.pruned += 1
        acc = last.get("test_acc")
        acc_s = f"val_acc {last.get('val_acc', float('nan')):.4f}" + (
            f" test_acc {acc:.4f}" if acc is not None else "")
        self.console.print(f"[green]{status}[/green] {self._name(trial)}: {acc_s}  "
                           f"({self.progress.line(self.concurrency)})", highlight=False)

    def close(self) -> None:
        """Mark every run still open killed and wait for the writes; warn about failures."""
        for msg in self.writer.mark_killed():
            self.console.print(f"[yellow]warning[/yellow]: a tracking write failed: {msg}",
                               highlight=False)

    def on_experiment_end(self, trials, **info):
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its state for restoring; ablate resumes from MLflow instead.
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
