"""TPE + ASHA against the full grid of the same small synthetic problem, in one run: the
best validation accuracy each found and the training epochs each spent.
Goal: within 1 point of the grid's best accuracy using at most 40% of its epochs.

Usage: python benchmarks/bench_search.py [--n-trials 16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ablate.study import load_study
from ablate.tracking import load_curves, load_runs
from ablate.tune.driver import run_study

COMMON = """\
dataset: {name: synthetic, image_size: 16, train_size: 1200, test_size: 200}
model: {depth: 2, heads: 2, patch_size: 4, window_size: 2}
train: {epochs: 6, batch_size: 64, eval_batch_size: 256, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.5}
seeds: [0]
resources: {cpus_per_trial: 1, max_concurrent: 2}
"""
LEVELS = {"train.lr": [3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2], "model.mixer": ["mlp", "conv",
                                                                        "identity"],
          "model.dim": [16, 32]}


def spent_epochs(study: str, uri: str) -> int:
    curves = load_curves(study, uri, metrics=("val_acc",))
    return int(len(curves))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-trials", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        factors = "\n".join(f"  {k}: {v}" for k, v in LEVELS.items())
        grid = tmp / "grid.yaml"
        grid.write_text(f"name: bench_grid\n{COMMON}factors:\n{factors}\n")
        search = tmp / "search.yaml"
        search.write_text(
            f"name: bench_tpe\n{COMMON}search:\n  method: optuna\n  sampler: tpe\n"
            f"  n_trials: {args.n_trials}\n  objectives: {{val_acc: max}}\n"
            f"  storage: sqlite:///{tmp / 'optuna.db'}\n  space:\n"
            + "\n".join(f"    {k}: {v}" for k, v in LEVELS.items())
            + "\nscheduler: {name: asha, metric: val_acc, mode: max, grace_period: 2, "
              "reduction_factor: 3}\n")
        run_study(load_study(grid), uri)
        run_study(load_study(search), uri)
        g, s = load_runs("bench_grid", uri), load_runs("bench_tpe", uri)
        g_best = g["best_val_acc"].max()
        s_best = s["best_val_acc"].max()
        g_ep, s_ep = spent_epochs("bench_grid", uri), spent_epochs("bench_tpe", uri)
    print(f"full grid: {len(g)} configurations, best val_acc {g_best:.4f}, {g_ep} epochs")
    print(f"TPE + ASHA: {args.n_trials} trials, best val_acc {s_best:.4f}, {s_ep} epochs "
          f"({100 * s_ep / g_ep:.0f}% of the grid's)")
    print(f"gap {100 * (g_best - s_best):+.1f} points (goal: within 1 point using <= 40% of "
          "the epochs)")


if __name__ == "__main__":
    main()
