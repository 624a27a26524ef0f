"""Equal tuning (`tune`): an Optuna search per level before the grid, the grid on each level's
best values, resume. Real Ray, real Optuna storage (SQLite), real MLflow store."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from ablate.errors import StudyError
from ablate.report import make_report, study_source
from ablate.study import load_study
from ablate.tracking import load_runs
from ablate.tune.driver import open_search_study, run_study
from ablate.tune.tuning import level_study
from tests.conftest import write

STUDY = """\
name: tuned
dataset: {{name: synthetic, image_size: 16, train_size: 160, test_size: 64}}
model: {{dim: 16, depth: 2, heads: 2, patch_size: 4}}
train: {{epochs: 1, batch_size: 32, eval_batch_size: 128, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.2}}
factors:
  model.mixer: [mlp, conv]
search: {{storage: "sqlite:///{storage}"}}
tune:
  per: [model.mixer]
  space:
    train.lr: {{low: 3.0e-4, high: 1.0e-2, log: true}}
    train.weight_decay: {{low: 0.01, high: 0.1, log: true}}
  n_trials: 3
  epochs: 1
  seeds: [0]
seeds: [0]
resources: {{cpus_per_trial: 1, max_concurrent: 2}}
"""


def study_file(tmp_path, text: str | None = None):
    return write(tmp_path / "tuned.yaml",
                 text or STUDY.format(storage=tmp_path / "optuna.db"))


@pytest.mark.parametrize(("old", "new", "path", "words"), [
    ("search: {", "search: {method: optuna, space: {train.epochs: [1]}, ", "tune",
     "cannot be combined with search.method: optuna"),
    ("    train.weight_decay:", "    model.mixer: [mlp]\n    train.weight_decay:",
     "tune.space.model.mixer", "is also a factor"),
    ("per: [model.mixer]", "per: [model.patch_size]", "tune.per[0]", "is not a factor"),
    ("{low: 3.0e-4, high: 1.0e-2, log: true}", "{low: 0.1, high: 0.01}", "tune.space.train.lr",
     "low 0.1 > high 0.01"),
    ("  seeds: [0]\nseeds", "  seeds: []\nseeds", "tune.seeds", "at least one seed"),
])
def test_tune_validation_errors(tmp_path, old, new, path, words):
    text = STUDY.format(storage=tmp_path / "optuna.db")
    assert old in text
    with pytest.raises(StudyError) as e:
        load_study(study_file(tmp_path, text.replace(old, new, 1)))
    assert path in str(e.value) and words in str(e.value), str(e.value)


def test_space_key_in_per_is_refused(tmp_path):
    text = STUDY.format(storage=tmp_path / "optuna.db").replace(
        "    train.weight_decay:", "    model.mixer: [mlp, conv]\n    train.weight_decay:")
    with pytest.raises(StudyError, match="also in tune.per"):
        load_study(study_file(tmp_path, text))


def test_tuning_per_level_then_grid_on_best_values_then_resume(tmp_path):
    path = study_file(tmp_path)
    study = load_study(path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(study, uri)
    assert not summary.interrupted and summary.failed == 0 and summary.finished == 2

    best = {}
    for mixer in ("mlp", "conv"):
        _, _, ost = open_search_study(level_study(study, {"model.mixer": mixer}).spec)
        assert sum(t.state.name == "COMPLETE" for t in ost.trials) == 3
        best[mixer] = ost.best_trial.params

    final = load_runs("tuned", uri)
    assert len(final) == 2 and set(final["phase"]) == {"final"}
    for _, r in final.iterrows():
        b = best[r["factor.model.mixer"]]
        assert float(r["params.train.lr"]) == pytest.approx(b["train.lr"], rel=1e-12)
        assert float(r["params.train.weight_decay"]) == pytest.approx(
            b["train.weight_decay"], rel=1e-12)

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tuned")
    tune_runs = c.search_runs([exp.experiment_id], "tags.`ablate.phase` = 'tune'")
    assert len(tune_runs) == 6
    assert {r.data.tags["ablate.tune_level"] for r in tune_runs} == {
        "model.mixer=mlp", "model.mixer=conv"}
    assert all(r.data.tags["ablate.study"] == "tuned" for r in tune_runs)

    src = study_source(path, uri)  # the tuned grid's runs are current, not outdated
    assert set(src.runs["status"]) == {"finished"} and len(src.runs) == 2
    _, text = make_report(src, "test_acc", "md", None)
    for mixer, b in best.items():
        assert f"model.mixer={mixer}" in text and repr(b["train.lr"]) in text

    n_runs = len(load_runs("tuned", uri, phase=None))
    again = run_study(load_study(path), uri)
    assert again.finished == 0 and again.skipped == 2 and not again.interrupted
    assert len(load_runs("tuned", uri, phase=None)) == n_runs


def test_reprofile_measures_every_architecture_of_a_tuned_study_again_and_once(tmp_path):
    """`--reprofile` reached only the study itself (helper-35): its tuning levels' searches
    were built without it, so the architectures only they run (here the tuned batch of 16)
    reused the stored profiles, and under `precision: auto` the grid's were measured twice in
    one run (before the levels, to fix the study's precision, and again by the tuned grid)."""
    import dataclasses
    import time
    from collections import Counter

    text = STUDY.format(storage=tmp_path / "optuna.db").replace(
        "    train.weight_decay: {low: 0.01, high: 0.1, log: true}",
        "    train.batch_size: [16, 32]").replace("n_trials: 3", "n_trials: 2").replace(
        "warmup_epochs: 0.2", "warmup_epochs: 0.2, precision: auto")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_study(load_study(study_file(tmp_path, text)), uri).finished == 2
    again = text.replace("name: tuned", "name: tuned2").replace("optuna.db", "optuna2.db")
    study = dataclasses.replace(load_study(write(tmp_path / "tuned2.yaml", again)),
                                reprofile=True)
    t0 = int(time.time() * 1000)
    assert run_study(study, uri).finished == 2

    c = MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    profiles = c.search_runs(exps, "tags.`ablate.phase` = 'profile'")
    new = Counter(p.data.tags["ablate.arch_key"] for p in profiles if p.info.start_time >= t0)
    old = {p.data.tags["ablate.arch_key"] for p in profiles if p.info.start_time < t0}
    runs = c.search_runs([c.get_experiment_by_name("tuned2").experiment_id],
                         "tags.`ablate.phase` != 'profile'")
    used = {r.data.tags["ablate.arch_key"] for r in runs if "ablate.arch_key" in r.data.tags}
    batches = {r.data.params["train.batch_size"] for r in runs}
    assert batches == {"16", "32"}  # the levels sampled both batches: keys only they run
    assert len(used) >= 3 and used <= old  # the first study had profiled each of them
    assert used <= set(new), "a profile of the first study was reused under --reprofile"
    assert set(new.values()) == {1}, f"measured more than once in one run: {new}"
