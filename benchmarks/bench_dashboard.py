"""Dashboard data path with 5,000 runs in a SQLite MLflow store: load the study, aggregate
over seeds, compute the frontier and build its figure, cold (fresh process state) and
cached (the app's st.cache_data), in one run. Goal: cold <= 3 s, cached <= 0.5 s.
Then the verdict: the full analysis (ANOVA, 1,000 bootstrap resamples, marginal means,
pairwise tests, slopes, cost) and the HTML report of a 5,000-run study with three factors
(10 x 10 x 10 cells) x 5 seeds. Goal: under 5 s.

Usage: python benchmarks/bench_dashboard.py [--runs 5000] [--store DIR] [--verdict-only]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def fill(uri: str, n: int) -> None:
    """n finished runs written with MLflow's client: 5 factors, seeds, ~60 params each."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    c = MlflowClient(uri)
    exp = c.create_experiment("bench_dash")
    levels = list(itertools.product(["attention", "mlp", "conv", "dual", "pool", "identity"],
                                    [1, 2, 4, 8], [0.1, 0.25, 0.5, 1.0], [3, 5, 7, 9]))
    rng = np.random.default_rng(0)
    now = int(time.time() * 1000)
    for i in range(n):
        mixer, patch, frac, k = levels[i % len(levels)]
        seed = i // len(levels)
        tags = {"ablate.study": "bench_dash", "ablate.trial_id": f"{i:012x}",
                "ablate.status": "finished", "ablate.seed": str(seed),
                "factor.model.mixer": mixer, "factor.model.patch_size": str(patch),
                "factor.dataset.fraction": str(frac), "factor.model.kernel_size": str(k)}
        r = c.create_run(exp, run_name=f"run {i}", tags=tags)
        acc = 0.5 + 0.1 * frac + 0.02 * rng.standard_normal()
        metrics = {"val_acc": acc, "best_val_acc": acc + 0.01, "test_acc": acc - 0.01,
                   "gmacs": 0.1 * 8 / patch + 0.01 * k, "params": 1e6 / patch,
                   "throughput_img_s": 1000.0 * patch, "latency_ms": 5.0 / patch,
                   "train_time_s": 100.0 * frac, "train_img_s": 500.0, "peak_mem_mb": 900.0}
        params = [Param(f"cfg.p{j}", str(j)) for j in range(60)]
        c.log_batch(r.info.run_id, metrics=[Metric(k2, v, now, 10) for k2, v in
                                            metrics.items()], params=params)
        c.set_terminated(r.info.run_id, "FINISHED")


def verdict_runs(seeds: int = 5):
    """A 3-factor study as `load_runs` returns it: mixers x patch sizes x data fractions
    (10 levels each), `seeds` runs per cell, planted effects plus seed noise."""
    import pandas as pd

    rng = np.random.default_rng(0)
    mixers = [f"mixer{i}" for i in range(10)]
    patches = [2 ** i for i in range(10)]
    fractions = [round(0.1 * (i + 1), 1) for i in range(10)]
    rows = []
    for i, (m, p, f) in enumerate(itertools.product(mixers, patches, fractions)):
        for s in range(seeds):
            acc = 0.5 + 0.01 * mixers.index(m) - 0.005 * patches.index(p) + 0.1 * f \
                + 0.01 * rng.standard_normal()
            rows.append({"run_id": f"{i}-{s}", "run_name": f"cell {i} seed {s}",
                         "cell_id": f"c{i}", "grid": 0, "status": "finished", "seed": s,
                         "factor.model.mixer": m, "factor.model.patch_size": p,
                         "factor.dataset.fraction": f, "test_acc": acc,
                         "gmacs": (1 + mixers.index(m)) / p, "params": 1e6 / p})
    return pd.DataFrame(rows)


def bench_verdict() -> None:
    from ablate import analysis, report

    df = verdict_runs()
    t0 = time.perf_counter()
    a = analysis.analyse(df, "test_acc")
    t_analysis = time.perf_counter() - t0
    page = report.to_html(a, {"study": "bench"})
    total = time.perf_counter() - t0
    print(f"verdict of {len(df)} runs ({len(a.fits[0].design.cells)} cells, "
          f"{a.fits[0].n_boot} bootstrap resamples): analysis {t_analysis:.2f} s, analysis + "
          f"HTML report ({len(page) / 1e6:.1f} MB) {total:.2f} s (goal < 5 s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--store", help="reuse/keep the store in this folder (filling takes "
                                    "minutes)")
    ap.add_argument("--verdict-only", action="store_true", help="time only the analysis "
                    "and the HTML report (no MLflow store)")
    args = ap.parse_args()
    if args.verdict_only:
        bench_verdict()
        return
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    folder = Path(args.store or tempfile.mkdtemp(prefix="bench-dash-"))
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    if not (folder / "mlflow.db").exists():
        t0 = time.perf_counter()
        fill(uri, args.runs)
        print(f"filled {args.runs} runs in {time.perf_counter() - t0:.0f} s ({folder})")
    import streamlit as st

    from ablate import analysis, plots, tracking

    @st.cache_data(ttl=30, show_spinner=False)
    def runs(study: str, uri: str):
        return tracking.load_runs(study, uri, params=False)

    def page(df):
        factors = analysis.factor_columns(df)
        agg = analysis.aggregate(df, "val_acc", factors)
        front = analysis.frontier(agg, "gmacs")
        return plots.frontier_figure(agg, front, "gmacs", "val_acc", "factor.model.mixer",
                                     "factor.model.patch_size", log_x=True), len(df), len(agg)

    t0 = time.perf_counter()
    fig, n, n_cfg = page(runs("bench_dash", uri))
    cold = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        page(runs("bench_dash", uri))
        times.append(time.perf_counter() - t0)
    cached = min(times)
    print(f"{n} runs, {n_cfg} configurations, {len(fig.data)} traces")
    print(f"load + aggregate + frontier figure: cold {cold:.2f} s (goal <= 3 s), cached "
          f"{cached:.3f} s (goal <= 0.5 s)")
    bench_verdict()


if __name__ == "__main__":
    main()
