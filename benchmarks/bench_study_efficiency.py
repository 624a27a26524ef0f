"""Study efficiency of `ablate run`: sum of the trials' training time / (wall time x
concurrent slots), the wall time taken from the call to `ablate run` to its exit (Ray start,
profiles and tracking included), into a throwaway store. Also prints the sum of the trials'
run durations (start to end of each MLflow run) over the same denominator, and what each
profile's `auto` probe picked when the study asks for it.

Also: per cell, the measured training time beside the profile's estimate `train_time_alone_s`.

Usage: python benchmarks/bench_study_efficiency.py [STUDY] [--set KEY=VALUE ...]
       (default STUDY: studies/quickstart.yaml)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
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
    from ablate.tune.driver import _concurrency

    study = load_study(args.study, args.sets)
    # as the run sizes it: resources.max_concurrent, else what this machine's CPUs hold
    slots = _concurrency(study.spec.resources)
    with tempfile.TemporaryDirectory(prefix="ablate-eff-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cmd = [sys.executable, "-m", "ablate.cli", "run", args.study, "--tracking-uri", uri,
               "-q", *[a for s in args.sets for a in ("--set", s)]]
        t0, epoch0 = time.perf_counter(), time.time()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        runs = load_runs(study.experiment, uri)
        if runs.empty:
            print(f"\n{study.spec.name}: no trial ran (wall {wall:.1f} s)")
            return
        train = float(runs["train_time_s"].sum())
        spans = float((runs["end_time"] - runs["start_time"]).dt.total_seconds().sum())
        print(f"\n{study.spec.name}: {len(runs)} trials, {slots} slots, wall {wall:.1f} s")
        print(f"  sum train_time_s {train:.1f} s -> efficiency {train / (wall * slots):.3f}")
        print(f"  sum trial run spans {spans:.1f} s -> {spans / (wall * slots):.3f}")
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name(study.experiment)
        profiles = c.search_runs([exp.experiment_id], "tags.`ablate.phase` = 'profile'")
        print_timeline(runs, profiles, epoch0, wall, slots)
        print_ceiling(c, runs, profiles, slots, train)
        print_alone(runs)
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
    after the last moment all slots were busy) and the exit after the last trial. Counts
    MLflow runs, one per seed: right for a grid (one seed per slot), not for a search, whose
    seeds train together in one slot."""
    done = runs.dropna(subset=["start_time", "end_time"])
    if done.empty:
        print("  timeline: no trial ran")
        return
    starts = sorted(ts.timestamp() - epoch0 for ts in done["start_time"])
    ends = sorted(ts.timestamp() - epoch0 for ts in done["end_time"])
    spans = [(p.info.start_time / 1000 - epoch0, p.info.end_time / 1000 - epoch0)
             for p in profiles if p.info.end_time]
    prof = (f"profiles {min(a for a, _ in spans):.1f}-{max(b for _, b in spans):.1f} s"
            if spans else "no profile measured")
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends])
    running, full = 0, None  # index of the last event after which every slot was busy
    for i, (_, d) in enumerate(events):
        running += d
        if running >= slots:
            full = i
    if full is None:
        busy, tail_from = f"never all {slots} slots busy", starts[0]
    else:  # the next event is an end: from then on a slot stays idle
        tail_from = events[full + 1][0]
        busy = f"all {slots} slots busy until {tail_from:.1f} s"
    print(f"  timeline: {prof}, first trial starts {starts[0]:.1f} s, {busy}, last trial "
          f"ends {ends[-1]:.1f} s (tail {ends[-1] - tail_from:.1f} s), exit {wall:.1f} s")


def print_ceiling(c, runs, profiles, slots: int, train: float) -> None:
    """The most this run could have reached with nothing lost but what the study itself asks
    for: its profiles (the whole node, every slot idle) and its trials' evaluation between
    epochs (validation after each, the test set after the last, with the report; from the
    spacing of each run's `epoch_time_s` timestamps less the epochs' own training time).
    Ray's start, imports, set-up, the tail and the exit all count as zero here."""
    spans = [(p.info.start_time, p.info.end_time) for p in profiles if p.info.end_time]
    window = (max(b for _, b in spans) - min(a for a, _ in spans)) / 1000 if spans else 0.0
    between = 0.0
    for rid in runs["run_id"]:
        hist = sorted(c.get_metric_history(rid, "epoch_time_s"), key=lambda m: m.step)
        gaps = [(y.timestamp - x.timestamp) / 1000 - y.value for x, y in pairwise(hist)]
        # the first epoch's evaluation: as long as the later ones' but the last (which tests)
        between += sum(gaps) + (sum(gaps[:-1]) / len(gaps[:-1]) if len(gaps) > 1 else 0.0)
    lost = slots * window + between
    print(f"  ceiling: profiles {window:.1f} s x {slots} slots + evaluation between epochs "
          f"{between:.1f} s -> at most {train / (train + lost):.3f} with no other overhead")


def print_alone(runs) -> None:
    """Per cell (seed means), the measured training time beside the estimate from its
    profile (`train_time_alone_s`), in the order the grid started them: whether the two rank
    the architectures alike."""
    if "train_time_alone_s" not in runs:
        return
    cols = [c for c in runs.columns if c.startswith("factor.")]
    if not cols:
        return
    first = runs.groupby(cols)["start_time"].min()
    means = runs.groupby(cols)[["train_time_s", "train_time_alone_s"]].mean()
    for cell in first.sort_values().index:
        m = means.loc[cell]
        name = " ".join(map(str, cell if isinstance(cell, tuple) else (cell,)))
        measured, alone = m["train_time_s"], m["train_time_alone_s"]
        print(f"  {name:12s} train_time_s {measured:6.1f} s   train_time_alone_s "
              f"{alone:6.1f} s   ratio {measured / alone:.2f}")


if __name__ == "__main__":
    main()
