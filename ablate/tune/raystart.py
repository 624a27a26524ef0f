"""Starting Ray for a run, and the run's signals: SIGTERM takes Ctrl-C's graceful path, and
a signal while ray.init starts a local head node is held until Ray can be shut down."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from ablate.errors import AblateError

CLIENT_SESSION = ("Ray Client: this process is connected to a cluster through Ray Client, "
                  "which ablate does not support; ray.shutdown() first and run ablate on a "
                  "node of the cluster with --address auto")


def check_address(address: str | None) -> None:
    """A client address (ray://, or any other scheme://) is refused in one line: through Ray
    Client, Tune runs the whole experiment on the cluster and ships it the MLflow callback and
    the Optuna searcher, which do not travel (they hold the study's store, its lease and its
    Optuna study). The address is resolved as ray.init does: RAY_ADDRESS stands in for none
    and for "auto"."""
    env = (os.environ.get("RAY_ADDRESS") or "").strip()
    given = (address or "").strip()
    from_env = bool(env) and given in ("", "auto")
    target = env if from_env else given
    if "ray" in sys.modules and sys.modules["ray"].util.client.ray.is_connected():
        raise AblateError(CLIENT_SESSION)
    if "://" in target:
        where = (f"RAY_ADDRESS {target}" + (" (what --address auto reads)" if given else "")
                 if from_env else f"--address {target}")
        fix = "unset RAY_ADDRESS and run" if from_env else "run"
        raise AblateError(f"{where}: Ray Client ({target.split('://')[0]}://) is not "
                          f"supported; {fix} ablate on a node of the cluster with --address "
                          "auto (or HEAD_IP:6379)")


def _init_ray(address: str | None, verbose: bool) -> bool:
    """Start or join Ray; returns True if this call started it (and should shut it down)."""
    import ray

    check_address(address)  # also a Ray Client session this process opened before
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose,
                                  logging_level=logging.INFO if verbose else logging.ERROR,
                                  configure_logging=True)
    local = not (address or os.environ.get("RAY_ADDRESS"))  # a head node started here
    try:  # joining a cluster is not held: a wrong address retries for 20 s, Ctrl-C stops it
        with (_signals_held() if local else contextlib.nullcontext([])) as held:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(**kwargs)
            if held:  # still held: a second Ctrl-C cannot cut the shutdown short
                ray.shutdown()
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise AblateError(f"--address {address}: cannot reach the Ray cluster ({e}); check the "
                          "address (auto on a cluster node, or HEAD_IP:6379) and that it is running"
                          ) from None
    if held:
        _take_held(held)
    if ray.util.client.ray.is_connected():  # Ray Client by another route (RAY_CLIENT_MODE)
        ray.shutdown()
        raise AblateError(CLIENT_SESSION)
    return True


@contextlib.contextmanager
def quiet_trial_errors(verbose: bool) -> Iterator[None]:
    """Without -v, Ray Tune does not print each failed attempt's 30-line traceback: the
    "failed ..." line says why, and the run keeps every attempt's traceback as an artifact
    (`error_attemptN.txt`). TUNE_PRINT_ALL_TRIAL_ERRORS, read as Tune starts, is Tune's own
    switch; a value the user set is kept."""
    key = "TUNE_PRINT_ALL_TRIAL_ERRORS"
    if verbose or key in os.environ:
        yield
        return
    # ... nor, at the end, the list of the failed ones by Tune's own ids (ablate's lines name them)
    tail = logging.getLogger("ray.tune.tune")

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trials did not complete")

    os.environ[key] = "0"
    tail.addFilter(drop)
    try:
        yield
    finally:
        os.environ.pop(key, None)
        tail.removeFilter(drop)


def check_fits(study: Any, address: str | None = None, console: Any = None) -> None:
    """A trial no alive Ray node can hold (more CPUs than any node with its GPU share has, or
    a GPU share where no node has a GPU) waits in Tune's queue for ever, the run saying
    nothing. On the head node a run starts itself (no --address, no RAY_ADDRESS), whose
    resources cannot grow, that is an error in one line naming the field and the fix, before
    anything is profiled or run; on a cluster joined by address, where an autoscaler may add
    such a node, a warning on `console` (None: none), and the trials wait. Ray must be up."""
    import ray

    res = study.spec.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpu_ok = [r for r in nodes if r.get("GPU", 0.0) + 1e-9 >= res.gpus_per_trial]
    if any(r.get("CPU", 0.0) + 1e-9 >= res.cpus_per_trial for r in gpu_ok):
        return
    if gpu_ok:  # the GPU share fits somewhere: the CPUs beside it do not
        cpus = max(r.get("CPU", 0.0) for r in gpu_ok)
        field = "cpus_per_trial"
        have = (f"the Ray node has {cpus:g} CPUs" if len(nodes) == 1 else
                f"no Ray node{' with a GPU' if res.gpus_per_trial else ''} has more than "
                f"{cpus:g} CPUs")
        fix = (f"set cpus_per_trial: {cpus:g} or less" if cpus > 0
               else "add a node with CPUs for trials")
    else:
        gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
        field = "gpus_per_trial"
        have = ("no Ray node has a GPU" if not gpus else
                f"no Ray node has more than {gpus:g} GPUs")
        fix = ("set gpus_per_trial: 0 to train on CPUs" if not gpus
               else f"set gpus_per_trial: {gpus:g} or less")
    what = f"resources.{field} is {getattr(res, field):g} per trial but {have}"
    if address or os.environ.get("RAY_ADDRESS"):
        if console is not None:
            console.print(f"{study.path}: warning: {what}; the trials wait until the cluster "
                          f"adds such a node (an autoscaler), or {fix}", highlight=False,
                          markup=False)
        return
    raise AblateError(f"{study.path}: {what}, so no trial could ever start; {fix}, or run on "
                      "a cluster with such nodes (--address)")


def _take_held(held: list[int]) -> None:
    """Raise what a signal held while Ray started (and was then shut down) would have: Ctrl-C's
    path, marked as SIGTERM's (exit 143) when one came."""
    _rearm_python_signal_handlers()
    if signal.SIGTERM in held:
        if _on_term is None:  # no run to stop gracefully
            raise SystemExit(128 + int(signal.SIGTERM))
        _on_term.got["term"] = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM until the block ends; the list yielded gets those that came.

    Either signal inside ray.init while it waits for its new raylet (before Ray keeps a handle
    on the node) leaves Ray's dashboard and runtime-env agents running after the driver exits,
    orphaned for good (ray 2.60, measured). Held to the end of ray.init (about 5 s), the run
    shuts Ray down first. ray.init installs its own SIGTERM handler (sys.exit) as it begins:
    it is kept from doing so inside the block and installed at the end, where ray.init would
    have left it (a run in progress then re-arms its own)."""
    import threading

    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got  # signals are the main thread's: leave them alone
        return
    from ray._private import utils as ray_utils

    def hold(signum, frame):
        got.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    wanted: list[Any] = []  # the SIGTERM handler ray.init set
    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if setter is not None:
        ray_utils.set_sigterm_handler = wanted.append
    ok = False
    try:
        yield got
        ok = True
    finally:
        if setter is not None:
            ray_utils.set_sigterm_handler = setter
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
        # Ray's handler where ray.init left Ray running; else (Ray shut down, or never up) ours
        signal.signal(signal.SIGTERM, wanted[-1] if wanted and ok and not got
                      else previous[signal.SIGTERM])


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c() -> Iterator[dict[str, bool]]:
    """SIGTERM (docker stop, systemd, Kubernetes, batch schedulers) takes Ctrl-C's path: Tune
    stops gracefully, running trials are marked killed, Ray is shut down. Main thread only."""
    got = {"term": False}

    def on_term(signum, frame):
        got["term"] = True
        if not callable(signal.getsignal(signal.SIGINT)):
            # SIGINT ignored (a job a script started with `&` inherits SIG_IGN for it): the
            # relayed signal would be lost and the run go on; stop as Ctrl-C does here
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)  # Tune's graceful stop, or KeyboardInterrupt

    global _on_term
    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield got
        return
    on_term.got = got  # type: ignore[attr-defined]  # a signal held through ray.init sets it
    _on_term = on_term
    try:
        yield got
    finally:
        _on_term = None
        signal.signal(signal.SIGTERM, previous)


_on_term = None  # the SIGTERM handler of the run in progress, re-armed after ray.init


def _rearm_python_signal_handlers() -> None:
    """ray.init replaces the SIGTERM handler (natively: abort, exit -6; in Python: exit 15);
    put ours back so SIGTERM takes Ctrl-C's graceful path."""
    if _on_term is not None:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, _on_term)
