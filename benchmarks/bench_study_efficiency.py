"""Study efficiency of `ablate run`: sum of the trials' training time / (wall time x
concurrent slots), the wall time taken from the call to `ablate run` to its exit (Ray start,
profiles and tracking included), into a throwaway store. Also prints the sum of the trials'
run durations (start to end of each MLflow run) over the same denominator, and what each
profile's `auto` probe picked when the study asks for it.

Usage: python benchmarks/bench_study_efficiency.py [STUDY] [--set KEY=VALUE ...]
       (default STUDY: studies/quickstart.yaml)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("study", nargs="?", default=str(ROOT / "studies" / "quickstart.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    from mlflow import MlflowClient

    from ablate.study import load_study
    from ablate.tracking import load_runs

    study = load_study(args.study, args.sets)
    slots = study.spec.resources.max_concurrent or 1
    with tempfile.TemporaryDirectory(prefix="ablate-eff-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cmd = [sys.executable, "-m", "ablate.cli", "run", args.study, "--tracking-uri", uri,
               "-q", *[a for s in args.sets for a in ("--set", s)]]
        t0, epoch0 = time.perf_counter(), time.time()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        runs = load_runs(study.experiment, uri)
        train = float(runs["train_time_s"].sum())
        spans = float((runs["end_time"] - runs["start_time"]).dt.total_seconds().sum())
        print(f"\n{study.spec.name}: {len(runs)} trials, {slots} slots, wall {wall:.1f} s")
        print(f"  sum train_time_s {train:.1f} s -> efficiency {train / (wall * slots):.3f}")
        print(f"  sum trial run spans {spans:.1f} s -> {spans / (wall * slots):.3f}")
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name(study.experiment)
        profiles = c.search_runs([exp.experiment_id], "tags.`ablate.phase` = 'profile'")
        print_timeline(runs, profiles, epoch0, wall, slots)
        for p in profiles:
            probes = {k.removeprefix("probe_img_s."): round(v, 1)
                      for k, v in sorted(p.data.metrics.items()) if k.startswith("probe_img_s.")}
            span = (p.info.end_time - p.info.start_time) / 1000
            print(f"  profile {p.data.params['model.mixer']:9s} {span:5.1f} s  picked "
                  f"{p.data.params['train.precision_resolved']}/"
                  f"cl={p.data.params['train.channels_last_resolved']}  {probes}")


def print_timeline(runs, profiles, epoch0: float, wall: float, slots: int) -> None:
    """Where the wall time went, in seconds from the call: start-up before the first profile,
    the profiles, the wait for the first trial, the tail (fewer trials running than slots,
    after the last moment all slots were busy) and the exit after the last trial."""
    starts = sorted(ts.timestamp() - epoch0 for ts in runs["start_time"])
    ends = sorted(ts.timestamp() - epoch0 for ts in runs["end_time"])
    p_start = min((p.info.start_time / 1000 - epoch0 for p in profiles), default=float("nan"))
    p_end = max((p.info.end_time / 1000 - epoch0 for p in profiles), default=float("nan"))
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends])
    running, full = 0, starts[0]
    for t, d in events:
        running += d
        if running >= slots:
            full = t
    last_full = min(t for t, d in events if d == -1 and t >= full)
    print(f"  timeline: profiles {p_start:.1f}-{p_end:.1f} s, first trial starts "
          f"{starts[0]:.1f} s, all {slots} slots busy until {last_full:.1f} s, last trial "
          f"ends {ends[-1]:.1f} s (tail {ends[-1] - last_full:.1f} s), exit {wall:.1f} s")


if __name__ == "__main__":
    main()
