"""A large MLflow store for the dashboard benchmark, written fast but kept real: MLflow creates
the schema and the experiments, and the first run of every study is written by ablate's own
`Tracker` (so the tags MLflow adds, the column defaults, the artifact URI are its own); the
other runs are that run's rows cloned with SQL (`executemany` in one transaction), one per
trial of a real study file (`load_study`), with each trial's own ids, tags, params, per-epoch
and final metrics. Writing 50,000 runs through MLflow's client takes hours; this, a minute.

`build(folder, studies, runs)` makes `folder/mlflow.db` and `folder/bench*.yaml` once and
marks the folder done; a later call with the same arguments reuses it.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
import uuid
from pathlib import Path

import numpy as np

VERSION = 1  # bump when the generated store changes: the cache folder is keyed by it
EPOCHS = 10
MIXERS = ["attention", "mlp", "conv", "dual", "pool"]
MIXER_ACC = {"attention": 0.02, "mlp": 0.0, "conv": 0.05, "dual": 0.04, "pool": -0.01}
MIXER_COST = {"attention": 1.6, "mlp": 1.2, "conv": 1.0, "dual": 1.4, "pool": 0.9}


def study_text(name: str, runs: int) -> str:
    """5 mixers x 4 patch sizes x 5 depths x 10 data fractions = 1,000 cells, and as many
    seeds as make `runs` (5 for 5,000)."""
    seeds = max(1, runs // 1000)
    fractions = [round(0.1 * (i + 1), 1) for i in range(10)]
    return f"""\
name: {name}
description: dashboard benchmark study ({runs} runs)
dataset: {{name: synthetic, image_size: 32, num_classes: 10, train_size: 2000, test_size: 500}}
model: {{dim: 64, depth: 4, heads: 4, patch_size: 4, window_size: 2}}
train: {{epochs: {EPOCHS}, batch_size: 64}}
factors:
  model.mixer: {MIXERS}
  model.patch_size: [2, 4, 8, 16]
  model.depth: [2, 4, 6, 8, 10]
  dataset.fraction: {fractions}
seeds: {list(range(seeds))}
"""


def metrics_of(t, rng: np.random.Generator) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-epoch curves (epoch -> value lists) and final metrics with planted effects."""
    f = t.factors
    mixer, patch, depth, frac = (f["model.mixer"], f["model.patch_size"], f["model.depth"],
                                 f["dataset.fraction"])
    acc = (0.35 + MIXER_ACC[mixer] - 0.02 * math.log2(patch) + 0.004 * depth + 0.2 * frac
           + 0.01 * rng.standard_normal())
    gmacs = MIXER_COST[mixer] * depth * (32 / patch) ** 2 * 64 * 64 * 2 / 1e9
    epochs = np.arange(1, EPOCHS + 1)
    curve = acc * (1 - np.exp(-epochs / 3)) / (1 - math.exp(-EPOCHS / 3))
    per_epoch = {"epoch": epochs.astype(float).tolist(),
                 "train_loss": (2.3 * np.exp(-epochs / 4) + 0.5).tolist(),
                 "val_loss": (2.2 * np.exp(-epochs / 4) + 0.6).tolist(),
                 "val_acc": curve.tolist(), "lr": (1e-3 * np.cos(epochs / EPOCHS)).tolist(),
                 "epoch_time_s": (1.0 + 0.01 * rng.standard_normal(EPOCHS)).tolist()}
    final = {"best_val_acc": float(curve.max()), "test_acc": acc - 0.01, "test_loss": 1.1,
             "params": depth * 64 * 64 * 8 * MIXER_COST[mixer], "gmacs": gmacs,
             "throughput_img_s": 50.0 / gmacs, "latency_ms": 20.0 * gmacs,
             "train_img_s": 10.0 / gmacs, "train_time_s": 100.0 * frac * gmacs,
             "peak_mem_mb": 200.0 + 100 * gmacs, "train_images": 2000.0 * frac,
             "train_steps": 320.0, "train_images_seen": 20000.0 * frac}
    return per_epoch, final


def _status(i: int) -> str:
    """1 run in 100 failed, 1 in 100 pruned, the rest finished."""
    return "failed" if i % 100 == 37 else "pruned" if i % 100 == 73 else "finished"


def _tags(t, study, template: dict[str, str]) -> dict[str, str]:
    """The tags `Tracker.start_run` gives this trial, on the template run's other tags."""
    tags = dict(template)
    tags.update({"ablate.trial_id": t.trial_id, "ablate.cell_id": t.cell_id,
                 "ablate.grid": str(t.grid), "ablate.seed": str(t.seed),
                 "mlflow.runName": t.run_name})
    for k, v in t.factors.items():
        tags[f"factor.{k}"] = "off" if v is None else str(v)
    return tags


def fill_study(uri: str, db: Path, study, t0_ms: int) -> None:
    """Every trial of `study` as a run: the first through Tracker, the rest cloned with SQL."""
    from ablate.tracking import Tracker, flatten

    rng = np.random.default_rng(sum(map(ord, study.spec.name)))
    tr = Tracker(uri, study.experiment, {"ablate.study_file_hash": study.file_hash,
                                         "ablate.study_file": str(study.path)})
    first = study.trials[0]
    rid0 = tr.start_run(first, study)
    tr.set_tags(rid0, {"ablate.hostname": "bench-host", "ablate.node_ip": "10.0.0.1"})
    per_epoch, final = metrics_of(first, rng)
    for e in range(EPOCHS):
        tr.log_metrics(rid0, {k: v[e] for k, v in per_epoch.items()}, step=e + 1)
    tr.log_metrics(rid0, final, step=EPOCHS)
    tr.end_run(rid0, "finished")
    con = sqlite3.connect(db, timeout=60)
    try:
        cols = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
        run0 = dict(zip(cols, con.execute("SELECT * FROM runs WHERE run_uuid = ?",
                                          (rid0,)).fetchone(), strict=True))
        tag0 = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (rid0,)))
        runs, tags, params, metrics, latest = [], [], [], [], []
        for i, t in enumerate(study.trials[1:], start=1):
            rid = uuid.uuid4().hex
            status = _status(i)
            start = t0_ms + i * 1000
            end = start + 900
            runs.append({**run0, "run_uuid": rid, "name": t.run_name, "start_time": start,
                         "end_time": end, "artifact_uri": run0["artifact_uri"].replace(rid0, rid),
                         "status": {"failed": "FAILED"}.get(status, "FINISHED")})
            tg = _tags(t, study, tag0)
            tg["ablate.status"] = status
            if status == "failed":
                tg["ablate.error"] = "RuntimeError: diverged at epoch 2: training loss is nan"
            tags += [(k, v, rid) for k, v in tg.items()]
            params += [(k, str(v)[:6000], rid) for k, v in flatten(t.config).items()]
            per_epoch, final = metrics_of(t, rng)
            n_ep = {"failed": 2, "pruned": 3}.get(status, EPOCHS)
            last: dict[str, tuple] = {}
            for e in range(n_ep):
                ts = start + 80 * (e + 1)
                for k, v in per_epoch.items():
                    metrics.append((k, v[e], ts, rid, e + 1, 0))
                    last[k] = (k, v[e], ts, e + 1, 0, rid)
            if status == "finished":
                for k, v in final.items():
                    metrics.append((k, v, end, rid, EPOCHS, 0))
                    last[k] = (k, v, end, EPOCHS, 0, rid)
            latest += last.values()
        names = list(run0)
        con.executemany(f"INSERT INTO runs ({', '.join(names)}) VALUES "
                        f"({', '.join('?' * len(names))})",
                        [tuple(r[n] for n in names) for r in runs])
        con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)", tags)
        con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)", params)
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                        "VALUES (?, ?, ?, ?, ?, ?)", metrics)
        con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, "
                        "run_uuid) VALUES (?, ?, ?, ?, ?, ?)", latest)
        con.commit()
    finally:
        con.close()


def build(folder: Path, studies: int = 10, runs: int = 5000, log=print) -> str:
    """The store's URI; built (minutes) unless `folder` already holds a finished one."""
    import time

    from ablate.study import load_study

    db = folder / "mlflow.db"
    uri = f"sqlite:///{db}"
    if (folder / "DONE").exists():
        return uri
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    now = int(time.time() * 1000)
    for s in range(studies):
        path = folder / f"bench{s:02d}.yaml"
        path.write_text(study_text(f"bench{s:02d}", runs))
        study = load_study(path)
        fill_study(uri, db, study, now + s * runs * 1000)
        log(f"  study {s + 1}/{studies}: {len(study.trials)} runs "
            f"({time.perf_counter() - t0:.0f} s)")
    (folder / "DONE").write_text(f"{VERSION} {studies} {runs}\n")
    return uri
