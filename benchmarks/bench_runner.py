"""Platform overhead: N trivial trials through `ablate run` against a bare `ray.tune.Tuner`
running the same trial function without ablate (no MLflow, no planning, no progress).
Both start their own Ray; printed as a ratio measured in one run (goal <= 1.2).

Usage: python benchmarks/bench_runner.py [--trials 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

STUDY = """\
name: bench_runner
dataset: {{name: synthetic, image_size: 8, train_size: 40, test_size: 20}}
model: {{dim: 8, depth: 1, heads: 1, patch_size: 4, mixer: mlp}}
train: {{epochs: 1, batch_size: 20, profile_batch_size: 2, profile_seconds: 0.001}}
factors:
  train.lr: [{levels}]
seeds: [0]
resources: {{cpus_per_trial: 1, max_concurrent: 2}}
"""

BARE = """\
import sys, time
t0 = time.perf_counter()
import ray
from ray import tune
from ablate.tune.trainable import train_cell
from ablate.study import load_study

study = load_study(sys.argv[1])
ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
cells = [[t.to_dict()] for t in study.trials]

def trainable(config):
    train_cell(config, tune.report)

tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                   param_space={"context": {"root": None, "cpus": 1, "gpus": 0},
                                "cell": tune.grid_search(cells)},
                   tune_config=tune.TuneConfig(max_concurrent_trials=2,
                                               reuse_actors=sys.argv[3] == "reuse"),
                   run_config=tune.RunConfig(storage_path=sys.argv[2], verbose=0))
results = tuner.fit()
assert not results.errors, results.errors
ray.shutdown()
print(f"{time.perf_counter() - t0:.3f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    exe = Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        levels = ", ".join(f"{1e-3 * (1 + i / 100):.6f}" for i in range(args.trials))
        study = tmp / "study.yaml"
        study.write_text(STUDY.format(levels=levels))
        (tmp / "bare.py").write_text(textwrap.dedent(BARE))
        times: dict[str, list[float]] = {"ablate": [], "bare": [], "bare_reuse": []}
        for i in range(2):  # alternate A B A B
            uri = f"sqlite:///{tmp / f'mlflow{i}.db'}"
            t0 = time.perf_counter()
            subprocess.run([str(exe.with_name("ablate")), "run", str(study), "--tracking-uri",
                            uri], check=True, capture_output=True, stdin=subprocess.DEVNULL)
            times["ablate"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([str(exe), str(tmp / "bare.py"), str(study), str(tmp / "ray"), "new"],
                           check=True, capture_output=True, stdin=subprocess.DEVNULL)
            times["bare"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([str(exe), str(tmp / "bare.py"), str(study), str(tmp / "ray"),
                            "reuse"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
            times["bare_reuse"].append(time.perf_counter() - t0)
    a, b, r = min(times["ablate"]), min(times["bare"]), min(times["bare_reuse"])
    print(f"{args.trials} trivial trials, 2 in parallel, each command starting its own Ray:")
    print(f"  ablate run (reuses trial actors): {a:.1f} s")
    print(f"  bare ray.tune.Tuner, Ray's default (new actor per trial): {b:.1f} s -> ratio "
          f"{a / b:.2f} (goal <= 1.2)")
    print(f"  bare ray.tune.Tuner with reuse_actors=True (same scheduling as ablate): {r:.1f} s "
          f"-> ratio {a / r:.2f} (ablate's own overhead: MLflow, planning, progress)")


if __name__ == "__main__":
    main()
