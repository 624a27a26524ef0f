"""A cost profile's record in the MLflow store: what identifies it (device, torch, threads,
method and the code that built and timed the model: `identity`), finding a stored one to
reuse (`stored_profiles`), and logging a new one (`log_profile`). Measuring is
`ablate.tune.profiling`'s."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ablate.tracking import Tracker, flatten
from ablate.tracking.lease import DRIVER_TAG

if TYPE_CHECKING:  # pragma: no cover
    from ablate.study import Study

PHASE = "profile"
KEY_TAG = "ablate.arch_key"
PROFILE_IDENTITY_TAG = "ablate.profile_identity"  # on trial runs: `identity_label`
IDENTITY_TAGS = {"device_name": "ablate.device_name", "torch_version": "ablate.torch_version",
                 "threads": "ablate.profile_threads", "method": "ablate.profile_method",
                 "code": "ablate.profile_code"}
# the code that builds and times a model: a profile is only reused by the same (a change to a
# mixer, to how a model is built or timed, or another timm, changes the cost it measures)
# (timm's version counts for every architecture, and train.py whole: a needless re-measure of a
# few seconds per architecture costs less than a stale profile on a frontier)
PROFILED_CODE = ("ablate/models/*.py", "ablate/archs.py", "ablate/cost.py", "ablate/train.py",
                 "ablate/tune/profil*.py")
# how profiles are taken; a profile taken another way is not reused. 2: training steps free
# their gradients (set_to_none) as the trainer does, and the auto probe times the training
# batch in interleaved blocks (profiles of method 1 carry no tag)
PROFILE_METHOD = "2"


def code_fingerprint(root: Path | None = None) -> str:
    """A digest of the source files that build and time a model (`PROFILED_CODE`, under the
    folder holding the `ablate` package) and of timm's version (`timm:` architectures): a
    profile measured by other code is not reused, even under the same architecture key."""
    from importlib import metadata

    root = root or Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pattern in PROFILED_CODE:
        # not an editor's lock or backup (.#mixers.py, a dangling link) nor anything not a file
        files = sorted(f for f in root.glob(pattern)
                       if not f.name.startswith(".") and f.is_file())
        if not files:  # a digest of nothing would match every other version's
            raise RuntimeError(f"ablate's profiled code {pattern} is not under {root}: cannot "
                               "tell its profiles from another version's")
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        timm = metadata.version("timm")
    except metadata.PackageNotFoundError:
        timm = "none"
    h.update(f"timm {timm}".encode())
    return h.hexdigest()[:16]


PROFILE_GPU = "resources.gpus_per_trial > 0 and Ray gave the profile task a whole GPU"


def identity(device_type: str, threads: int) -> dict[str, str]:
    """The device name, torch version, thread count, profile method and profiled code
    (`code_fingerprint`) a profile is only reused on, as the profile node has them."""
    import torch

    if device_type == "cuda":  # never the CPU's name and timings under a GPU study's key
        from ablate.train import require_cuda

        require_cuda(PROFILE_GPU)
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    # str(): torch.__version__ is a TorchVersion, and unpickling one makes the driver import
    # torch (3 s of a 2-core node's start-up, while the profile node waits)
    return {"device_name": name, "torch_version": str(torch.__version__),
            "threads": str(threads), "method": PROFILE_METHOD, "code": code_fingerprint()}


def identity_label(ident: dict[str, str]) -> str:
    """A profile's identity in one line, as trial runs carry it (`ablate.profile_identity`):
    timing costs measured under two such lines are not comparable."""
    return (f"{ident['device_name']}, torch {ident['torch_version']}, {ident['threads']} "
            f"CPU(s), profile code {ident['code']} (method {ident['method']})")


def stored_profiles(tracker: Tracker, ident: dict[str, str], keys: set[str],
                    stale: set[str] | None = None, driver: str | None = None
                    ) -> dict[str, dict[str, Any]]:
    """The newest finished profile of each key in the whole store (any study) taken on the
    same device name, torch version, thread count, method and profiled code (`identity`).
    `stale` collects the keys found only as profiles of other code (the rest the same).
    `driver`: only the profiles that driver took (`ablate.driver`, the run's lease id)."""
    from ablate.tracking.store import _search_all

    c = tracker.client
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = _search_all(c, exps, f"tags.`ablate.phase` = '{PHASE}' and "
                                "tags.`ablate.status` = 'finished'")
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True):
        tags = r.data.tags
        key = tags.get(KEY_TAG)
        if key not in keys or key in out or (driver is not None
                                              and tags.get(DRIVER_TAG) != driver):
            continue
        differ = {k for k, tag in IDENTITY_TAGS.items() if tags.get(tag) != ident[k]}
        if differ:
            if differ == {"code"} and stale is not None:
                stale.add(key)
            continue
        out[key] = {"metrics": {k: v for k, v in r.data.metrics.items()
                                if not k.startswith("probe_img_s.")},
                    "precision": r.data.params.get("train.precision_resolved", "fp32"),
                    "channels_last": r.data.params.get("train.channels_last_resolved") == "True",
                    "run_id": r.info.run_id,
                    "probe": {k: v for k, v in r.data.metrics.items()
                              if k.startswith("probe_img_s.")}}
    return out


def reusable_profiles(study: Study, tracker: Tracker, ident: dict[str, Any], keys: set[str],
                      stale: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The stored profiles of `keys` this run may reuse: any in the store; with `--reprofile`
    only those this run's driver measured already (a tuning level's profile, reused by the
    next level and the tuned grid: every architecture measured again, and once)."""
    if not study.reprofile:
        return stored_profiles(tracker, ident, keys, stale)
    driver = tracker.run_tags.get(DRIVER_TAG)
    return stored_profiles(tracker, ident, keys, driver=driver) if driver else {}


def log_profile(tracker: Tracker, study: Study, key: str, config: dict[str, Any],
                 res: dict[str, Any], name: str) -> str:
    """The profile as a finished MLflow run spanning the measurement's own time."""
    from mlflow.entities import Metric, Param

    c = tracker.client
    tags = {**tracker.run_tags,  # the driver's id and the git revision, as on trial runs
            "ablate.phase": PHASE, KEY_TAG: key, "ablate.study": study.spec.name,
            "ablate.status": "running",
            **{tag: str(res[k]) for k, tag in IDENTITY_TAGS.items()}}
    if res.get("probe_threads") is not None:  # the threads the auto probe timed with
        tags["ablate.probe_threads"] = str(res["probe_threads"])
    if res.get("train_threads") is not None:  # the threads its training step was timed with
        tags["ablate.train_threads"] = str(res["train_threads"])
    run = c.create_run(tracker.experiment_id, start_time=res["start_ms"],
                       run_name=f"profile {name}", tags=tags)
    rid = run.info.run_id
    params = {**flatten(config), "train.precision_resolved": res["precision"],
              "train.channels_last_resolved": res["channels_last"]}
    now = res["end_ms"]
    metrics = [Metric(k, float(v), now, 0) for k, v in {**res["metrics"], **res["probe"]}.items()]
    c.log_batch(rid, metrics=metrics,
                params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    c.set_tag(rid, "ablate.status", "finished")
    c.set_terminated(rid, "FINISHED", end_time=res["end_ms"])
    return rid
