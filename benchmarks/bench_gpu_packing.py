"""Trials per GPU-hour with small trials packed on one GPU, against one trial per GPU: runs
STUDY (default studies/quickstart.yaml) twice, each into a throwaway store, on the machine's
first GPU only (CUDA_VISIBLE_DEVICES=0): with `resources.gpus_per_trial` SHARE (default 0.25,
1/SHARE trials at once) and with 1 (one at a time). Prints, for each, the wall time (from the
call to `ablate run` to its exit: Ray start and the profiles included), trials per GPU-hour
over that wall and over the trials' own span (first start to last end), the study efficiency
(sum of train_time_s / (wall x slots)), the profile's device name, and the two rates' ratio.

Packed trials share the GPU, so each one's train_time_s is longer; what packing buys is the
rate. An untimed `--smoke` run first warms CUDA and the file cache, so the run measured first
does not pay the machine's cold start (`--no-warmup` skips it). Needs a CUDA device: without
one it says so and exits 2 (nothing is measured).

Usage: python benchmarks/bench_gpu_packing.py [STUDY] [--share 0.25] [--no-warmup]
       [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(study_path: str, experiment: str, share: float, sets: list[str]) -> dict:
    from mlflow import MlflowClient

    from ablate.tracking import load_runs

    slots = max(1, int(round(1 / share)))
    with tempfile.TemporaryDirectory(prefix="ablate-gpu-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cmd = [sys.executable, "-m", "ablate.cli", "run", study_path, "--tracking-uri", uri,
               "-q", "--max-concurrent", str(slots),
               "--set", f"resources.gpus_per_trial={share}",
               *[a for s in sets for a in ("--set", s)]]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}  # one GPU: the rate is per GPU
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        wall = time.perf_counter() - t0
        if rc != 0:  # its own one-line error is above
            print(f"bench_gpu_packing: ablate run at gpus_per_trial {share:g} exited {rc}; "
                  "nothing measured")
            raise SystemExit(rc)
        runs = load_runs(experiment, uri)
        done = runs[runs["status"] == "finished"]
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name(experiment)
        profiles = c.search_runs([exp.experiment_id], "tags.`ablate.phase` = 'profile'")
        devices = sorted({p.data.tags.get("ablate.device_name", "?") for p in profiles})
    span = (done["end_time"].max() - done["start_time"].min()).total_seconds()
    return {"share": share, "slots": slots, "trials": len(done), "wall": wall, "span": span,
            "train": float(done["train_time_s"].sum()), "devices": devices}


def warm_up(study_path: str, share: float, sets: list[str]) -> None:
    """An untimed `ablate run --smoke` on the same GPU (its own throwaway store): CUDA's
    context and kernels, and torch's files, are warm for both measured runs alike."""
    cmd = [sys.executable, "-m", "ablate.cli", "run", study_path, "--smoke",
           "--set", f"resources.gpus_per_trial={share}", *[a for s in sets for a in ("--set", s)]]
    subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"},
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("study", nargs="?", default=str(ROOT / "studies" / "quickstart.yaml"))
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed --smoke run that warms CUDA and the file cache")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_packing: no CUDA device is visible here; not run (it measures trials "
              "per GPU-hour on a GPU)")
        raise SystemExit(2)
    from ablate.study import load_study

    study = load_study(args.study, args.sets)
    print(f"{study.spec.name} on {torch.cuda.get_device_name(0)} (torch {torch.__version__})")
    if not args.no_warmup:  # the first run on a fresh machine pays CUDA's and the disk's cold
        warm_up(args.study, args.share, args.sets)  # start: not the one measured first
    rows = [run_once(args.study, study.experiment, s, args.sets) for s in (args.share, 1.0)]
    for r in rows:
        print(f"  gpus_per_trial {r['share']:g} ({r['slots']} at once): {r['trials']} trials, "
              f"wall {r['wall']:.1f} s, {3600 * r['trials'] / r['wall']:.0f} trials/GPU-hour "
              f"({3600 * r['trials'] / r['span']:.0f} over the trials' span of {r['span']:.1f} s)"
              f", efficiency {r['train'] / (r['wall'] * r['slots']):.3f}, profiled on "
              f"{', '.join(r['devices'])}")
    packed, alone = rows
    print(f"  packed / alone: {alone['wall'] / packed['wall']:.2f}x the trials per GPU-hour "
          f"({alone['span'] / packed['span']:.2f}x over the trials' span)")


if __name__ == "__main__":
    main()
