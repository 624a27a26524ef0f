"""One driver per study: a lease kept in the study's MLflow experiment, and the reconciliation
of runs a dead driver left RUNNING.

The lease is an experiment tag (`ablate.lease`: driver id, host, pid, heartbeat), so it works
on a SQLite file and on a tracking server alike. A live holder refreshes the heartbeat every
`ttl / 4` seconds; a holder is dead when its heartbeat is older than `ttl`, or at once when it
ran on this host and its pid is gone. Taking the lease is write-then-read-back: two drivers
starting in the same instant both write, one reads the other's id back and gives way.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from ablate.errors import AblateError

LEASE_TAG = "ablate.lease"
DRIVER_TAG = "ablate.driver"  # on each run: the id of the driver that started it


class StudyLockedError(AblateError):
    """Another live driver holds the study."""


def lease_ttl() -> float:
    return float(os.environ.get("ABLATE_LEASE_TTL", "60"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def holder_alive(lease: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether the driver that wrote `lease` may still be running."""
    if not lease or not lease.get("id"):
        return False
    now = time.time() if now is None else now
    if now - float(lease.get("beat", 0)) > lease_ttl():
        return False
    if lease.get("host") == socket.gethostname():
        return _pid_alive(int(lease.get("pid", -1)))
    return True


def read_lease(client, experiment_id: str) -> dict[str, Any] | None:
    return parse_lease(client.get_experiment(experiment_id).tags.get(LEASE_TAG))


def parse_lease(raw: object) -> dict[str, Any] | None:
    """The lease tag's value; None where there is none (None, a SQL NULL read as NaN) or it
    is not a lease's JSON."""
    try:
        return json.loads(raw) if isinstance(raw, str) and raw else None
    except ValueError:
        return None


def describe(lease: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("since", 0))))
    return f"host {lease.get('host')} pid {lease.get('pid')} (since {since})"


class StudyLease:
    """Hold a study's lease for the life of one `ablate run`; `with` releases it."""

    def __init__(self, client, experiment_id: str, study: str, force: bool = False) -> None:
        self.client, self.experiment_id, self.study = client, experiment_id, study
        self.id = uuid.uuid4().hex[:12]
        self.since = time.time()
        self._stop = threading.Event()
        current = read_lease(client, experiment_id)
        if current and not force and holder_alive(current):
            raise self._locked(current)
        self._write()
        time.sleep(0.3)  # let a driver that raced us write, then see who won
        current = read_lease(client, experiment_id)
        if not current or current.get("id") != self.id:
            raise self._locked(current or {})
        self._thread = threading.Thread(target=self._beat, name="ablate-lease", daemon=True)
        self._thread.start()

    def _locked(self, lease: dict[str, Any]) -> StudyLockedError:
        return StudyLockedError(
            f"study {self.study}: already being run by {describe(lease)}; wait for it to "
            f"finish, or if that driver is dead, wait {lease_ttl():.0f} s for its lease to "
            "expire or pass --force-unlock")

    def _write(self) -> None:
        lease = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                 "since": self.since, "beat": time.time()}
        self.client.set_experiment_tag(self.experiment_id, LEASE_TAG, json.dumps(lease))

    def _beat(self) -> None:
        while not self._stop.wait(lease_ttl() / 4):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a store hiccup: the next beat retries
                pass

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            current = read_lease(self.client, self.experiment_id)
            if current and current.get("id") == self.id:
                self.client.delete_experiment_tag(self.experiment_id, LEASE_TAG)
        except Exception:  # noqa: BLE001 - an expired lease is as good as a released one
            pass

    def __enter__(self) -> StudyLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reconcile(tracker, lease: StudyLease) -> int:
    """Mark killed every run still RUNNING that this driver did not start: with the lease
    held, no other driver is alive to finish it. Returns how many were marked."""
    from ablate.tracking.store import _search_all

    stale = [r for r in _search_all(tracker.client, [tracker.experiment_id],
                                    "attributes.status = 'RUNNING'")
             if r.data.tags.get(DRIVER_TAG) != lease.id]
    for r in stale:
        tracker.client.set_tag(r.info.run_id, "ablate.error",
                               "its driver died (killed, out of memory or node lost); "
                               "marked killed by the next `ablate run`")
        tracker.end_run(r.info.run_id, "killed")
    return len(stale)


def without_orphans(df, uri: str, experiment: str):
    """Runs still RUNNING while no live driver holds the study (it was killed and no run
    since has reconciled them) are shown as killed: nobody is running them."""
    if df.empty or "status" not in df or not (df["status"] == "running").any():
        return df
    from ablate.tracking.store import client

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is not None and holder_alive(read_lease(c, exp.experiment_id)):
        return df
    df = df.copy()
    df.loc[df["status"] == "running", "status"] = "killed"
    return df
