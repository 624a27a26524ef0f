"""The one trainable: the seeds of one cell, trained in lock-step in one process.

The grid hands it one seed per Tune trial; an Optuna search hands it every seed of a sampled
configuration, so each report is the seed mean (what ASHA prunes on and Optuna optimizes).
`train_cell` is Ray-free; `trainable` is the function Ray Tune runs.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from ablate.study import TrialSpec, trials_for


def sampled(config: dict[str, Any]) -> dict[str, Any]:
    """The dimensions an Optuna search sampled for a trial (dotted keys)."""
    return {k: v for k, v in config.items() if "." in k}


def cell_trials(config: dict[str, Any]) -> tuple[list[TrialSpec], dict[str, dict[str, float]]]:
    """(trials to train, final metrics of seeds that finished before) of a Tune trial's config.

    `config["cell"]` lists the trials of a grid cell; a search's config holds the study's
    sections, seeds and keys under `config["search"]` and the sampled values as dotted keys.
    Raises ValueError for a sampled configuration that cannot run."""
    if "cell" in config:
        return [TrialSpec.from_dict(d) for d in config["cell"]], {}
    search = config["search"]
    trials = trials_for(search["sections"], sampled(config), search["seeds"], search["keys"])
    done = search["done"]
    return ([t for t in trials if t.trial_id not in done],
            {t.trial_id: done[t.trial_id] for t in trials if t.trial_id in done})


def take_fault(fault_file: str | None, trial_id: str, epoch: int) -> bool:
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


def seed_mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric metric that all rows carry."""
    keys = set().union(*rows) if rows else set()
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals and len(vals) == len(rows):
            out[k] = float(sum(vals) / len(vals))
    return out


def train_cell(config: dict[str, Any], report) -> None:
    """Data -> one model per seed -> the epochs of every seed in lock-step. Each report
    carries the seed means and, under `per_seed`, each seed's own metrics by trial id (JSON).

    Cost metrics come from the architecture's profile, measured by the driver alone on a node
    (`context.arch` by trial id; a search's `context.arch_keys` by architecture key), with the
    precision and layout it chose for `auto`; with a profile, each seed's final metrics also
    carry `train_time_alone_s`, its images seen over the profile's `train_img_s`: its training
    time at its own batch and threads, alone on the profile node, free of whatever trained
    beside it (its `train_time_s` is the measured one). Only a search trial whose
    architecture was not profiled up front (`context.self_profile`) measures its own costs,
    beside other trials."""
    import torch

    from ablate.cost import profile
    from ablate.data import load_dataset
    from ablate.train import DTYPES, build_model, fit_epochs, is_auto, pick_device, resolve_auto
    from ablate.tune.profiling import keyed, trial_threads

    todo, stored = cell_trials(config)
    ctx = config["context"]
    if not todo:  # every seed finished before: report what is stored, train nothing
        epochs = int(config["search"]["sections"]["train"].get("epochs") or 1)
        report({**seed_mean(list(stored.values())), "epoch": float(epochs), "per_seed": "{}"})
        return
    torch.set_num_threads(trial_threads(ctx.get("cpus", 1)))
    if any(t.train.compile for t in todo):  # a reused worker compiled other trials' models:
        torch._dynamo.reset()  # past dynamo's recompile limit (8) this one would run eager
    device = pick_device(ctx.get("gpus", 0.0))
    if device.type == "cuda":  # a reused worker's cache still holds the last trial's blocks:
        torch.cuda.empty_cache()  # give them back to the trials sharing this GPU
    first = todo[0]
    data = load_dataset(first.dataset, Path(ctx["root"]) if ctx.get("root") else None)
    arch = ctx.get("arch") or {}
    by_key = ctx.get("arch_keys") or {}  # a search's profiles, by architecture key
    shape = (data.image_size, data.channels, data.num_classes)  # as loaded: no second read
    extra: dict[str, float] = {}
    alone = None  # the profile's training speed (img/s), timed alone on a node
    runs = {}
    resolved = {}  # what a trial without a profile resolved `auto` to itself: its run's params
    own = None  # ... probed once per cell: its seeds share the architecture
    for trial in todo:
        model = build_model(trial, data.image_size, data.channels, data.num_classes)
        info = arch.get(trial.trial_id) or (keyed(by_key, trial, shape, ctx["device_type"],
                                                  ctx["cpus"]) if by_key else None)
        choice = (info["precision"], info["channels_last"]) if info else own
        cfg = resolve_auto(trial.train, model, data, device, choice)
        if not info and is_auto(trial.train):
            own = (cfg.precision, cfg.channels_last)
            resolved[trial.trial_id] = {"train.precision_resolved": cfg.precision,
                                        "train.channels_last_resolved": str(cfg.channels_last)}
        if info:
            extra = dict(info["metrics"])
            alone = extra.get("train_img_s")
        elif not extra and ctx.get("profile", True) and ctx.get("self_profile"):
            precision = "fp32" if cfg.precision == "fp16" and device.type != "cuda" \
                else cfg.precision
            cost = profile(model, data.image_size, in_chans=data.channels,
                           num_classes=data.num_classes, batch_size=cfg.profile_batch_size,
                           device=device, dtype=DTYPES[precision],
                           channels_last=cfg.channels_last, min_seconds=cfg.profile_seconds,
                           warmup=2, compile_=cfg.compile, train_batch_size=cfg.batch_size,
                           grad_clip=cfg.grad_clip)
            extra = {**cost.metrics(), "profile_batch_size": float(cost.batch_size),
                     "profile_train_batch_size": float(cost.train_batch_size)}
        runs[trial.trial_id] = fit_epochs(model, data, cfg, trial.seed, device,
                                          final_extra=extra)
    for epoch in range(1, first.train.epochs + 1):
        per_seed = {tid: next(run) for tid, run in runs.items()}
        if epoch == first.train.epochs:  # with the final metrics: an attempt that failed
            for tid, params in resolved.items():  # before would name what it did not finish
                per_seed[tid]["resolved_params"] = params
        for tid in per_seed:
            if take_fault(ctx.get("fault_file"), tid, epoch):
                raise RuntimeError(f"injected fault at epoch {epoch} (ABLATE_FAULT_FILE)")
        if epoch == first.train.epochs and alone:
            # seeds an older ablate stored carry its profile's costs (training timed with the
            # node's threads at the profile batch): the cell's mean takes this profile's
            for m in stored.values():
                if "profile_train_batch_size" not in m:
                    m.update(extra)
                    m.pop("train_time_alone_s", None)
            # the training time without the trials beside it (seeds an older ablate stored
            # have no such metric: from what they trained on, for the cell's mean)
            for m in [*per_seed.values(), *stored.values()]:
                if m.get("train_images_seen") and "train_time_alone_s" not in m:
                    m["train_time_alone_s"] = m["train_images_seen"] / alone
        rows = list(per_seed.values())
        if epoch == first.train.epochs:
            rows += list(stored.values())
        report({**extra, **seed_mean(rows), "epoch": float(epoch),
                "per_seed": json.dumps(per_seed)})


def trainable(config: dict[str, Any]) -> None:
    """What Ray Tune runs for one Tune trial."""
    from ray import tune

    train_cell(config, tune.report)
