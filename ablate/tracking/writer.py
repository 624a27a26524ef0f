"""The one MLflow writer of a study: every run, metric, tag and artifact goes through it.

It lives in the driver and is keyed by ablate trial id; whoever runs the trials (Ray Tune's
callback in `ablate.tune`) hands it events. Writes happen on one background thread in the
order they were handed in, so a SQLite store sees one writer and the scheduler never waits on
the tracking store (a remote server included).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ablate.tracking.store import EPOCH_METRICS, FINAL_METRICS, PROFILE_METRICS, Tracker


class RunWriter:
    """Opens, fills and closes the MLflow run of every trial of one study."""

    def __init__(self, tracker: Tracker, study: Any) -> None:
        self.tracker, self.study = tracker, study
        self.runs: dict[str, Future] = {}  # trial id -> future of its MLflow run id
        self.attempts: dict[str, int] = {}
        self.open: set[str] = set()  # trial ids whose run is still running
        self.nodes: dict[str, str] = {}
        self.resolved: set[str] = set()  # trial ids whose own `auto` choice is logged
        self.errors: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-mlflow")

    def _write(self, trial_id: str, fn: Callable[[str], Any]) -> None:
        """Queue `fn(run_id)` behind the run's creation; a failure is kept, not raised."""
        def op() -> None:
            try:
                fn(self.runs[trial_id].result())
            except Exception as e:  # noqa: BLE001 - reported by flush, the study goes on
                self.errors.append(f"{type(e).__name__}: {e}")

        self._pool.submit(op)

    def start(self, trial: Any, extra_tags: dict[str, str] | None = None,
              extra_params: dict[str, str] | None = None) -> None:
        """A trial starts: a new run, or the next attempt of its run after a retry."""
        tid = trial.trial_id
        if tid in self.runs:
            self.attempts[tid] += 1
            tags = {"ablate.attempts": str(self.attempts[tid]), "ablate.status": "running"}
            self._write(tid, lambda rid: self.tracker.set_tags(rid, tags))
        else:
            self.runs[tid] = self._pool.submit(self.tracker.start_run, trial, self.study,
                                               extra_tags, extra_params)
            self.attempts[tid] = 1
        self.open.add(tid)

    def result(self, trial_id: str, metrics: dict[str, Any], step: int,
               node: str | None = None, hostname: str = "") -> None:
        """One report of a trial: its per-epoch metrics, and the final ones on the last."""
        if trial_id not in self.runs:
            return
        if node and self.nodes.get(trial_id) != node:  # where it ran (and, after a retry, reran)
            self.nodes[trial_id] = node
            tags = {"ablate.node_ip": str(node), "ablate.hostname": str(hostname)}
            self._write(trial_id, lambda rid: self.tracker.set_tags(rid, tags))
        if metrics.get("resolved_params"):  # `auto` a trial resolved itself (no profile)
            self._resolved(trial_id, {str(k): str(v)
                                      for k, v in metrics["resolved_params"].items()})
        per_epoch = {k: metrics[k] for k in EPOCH_METRICS if k in metrics}
        self._write(trial_id, lambda rid: self.tracker.log_metrics(rid, per_epoch, step=step))
        if "test_acc" in metrics:
            final = {k: metrics[k] for k in (*FINAL_METRICS, *PROFILE_METRICS)
                     if k in metrics and k not in per_epoch}
            self._write(trial_id, lambda rid: self.tracker.log_metrics(rid, final, step=step))

    def _resolved(self, trial_id: str, params: dict[str, str]) -> None:
        """They come with the final metrics (the attempt that finished: a retry's own probe
        may choose otherwise than an attempt that failed); params are written once."""
        if trial_id not in self.resolved:
            self.resolved.add(trial_id)
            self._write(trial_id, lambda rid: self.tracker.log_params(rid, params))

    def error(self, trial_id: str, text: str, log_tail: str, reason: str, final: bool) -> None:
        """An attempt failed: its traceback and log tail as artifacts; `final` ends the run."""
        if trial_id not in self.runs:
            return
        n = self.attempts.get(trial_id, 1)

        def record(rid: str) -> None:
            self.tracker.log_text(rid, text, f"error_attempt{n}.txt")
            if log_tail:
                self.tracker.log_text(rid, log_tail, f"log_tail_attempt{n}.txt")
            self.tracker.set_tags(rid, {"ablate.error": reason[:500]})
            if final:
                self.tracker.end_run(rid, "failed")

        self._write(trial_id, record)
        if final:
            self.open.discard(trial_id)

    def end(self, trial_id: str, status: str) -> None:
        """Close a trial's run as finished, pruned, failed or killed."""
        if trial_id in self.runs:
            self._write(trial_id, lambda rid: self.tracker.end_run(rid, status))
            self.open.discard(trial_id)

    def mark_killed(self) -> list[str]:
        """Close every run still open as killed, wait for all writes; returns the failures."""
        for tid in list(self.open):
            self.end(tid, "killed")
        return self.flush()

    def flush(self) -> list[str]:
        """Wait for every queued write; returns (and forgets) the writes that failed."""
        self._pool.shutdown(wait=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-mlflow")
        failed = list(dict.fromkeys(self.errors))
        self.errors.clear()
        return failed
