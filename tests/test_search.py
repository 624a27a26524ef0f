"""Optuna search: validation errors, TPE + ASHA, NSGA-II Pareto set, interrupt and resume.
Real Ray, real Optuna storage (SQLite), real MLflow store."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from ablate.cli import app
from ablate.search import study_name
from ablate.study import load_study
from ablate.tracking import load_runs
from ablate.tune.driver import run_study
from tests.conftest import signal_and_wait, write

BASE = """\
name: srch
dataset: {{name: synthetic, image_size: 16, train_size: 240, test_size: 80}}
model: {{dim: 16, depth: 2, heads: 2, patch_size: 4, window_size: 2}}
train: {{epochs: {epochs}, batch_size: 32, eval_batch_size: 128, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.2}}
search:
  method: optuna
  sampler: {sampler}
  n_trials: {n}
  objectives: {objectives}
  space:
    train.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
    model.mixer: [mlp, conv, identity]
  storage: sqlite:///{storage}
scheduler: {scheduler}
seeds: [0, 1]
resources: {{cpus_per_trial: 1, max_concurrent: 2}}
"""


def study_file(tmp: Path, *, sampler="tpe", n=6, objectives="{val_acc: max}",
               scheduler="{name: fifo}", epochs=2, extra="") -> Path:
    text = BASE.format(sampler=sampler, n=n, objectives=objectives, scheduler=scheduler,
                       epochs=epochs, storage=tmp / "optuna.db") + extra
    return write(tmp / "search.yaml", text)



runner = CliRunner()

BAD = {
    "low_gt_high": ("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}",
                    "train.lr: {low: 0.1, high: 0.01}", "low 0.1 > high 0.01"),
    "log_low_zero": ("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}",
                     "train.lr: {low: 0.0, high: 0.01, log: true}", "log scale needs low > 0"),
    "step_not_fitting": ("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}",
                         "train.lr: {low: 0.1, high: 0.5, step: 0.3}", "does not fit"),
    "unknown_key": ("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}",
                    "train.learning_rate: {low: 0.1, high: 0.5}", "unknown dotted key"),
    "empty_categorical": ("model.mixer: [mlp, conv, identity]", "model.mixer: []",
                          "empty categorical"),
    "unknown_sampler": ("sampler: tpe", "sampler: bayes", "search.sampler"),
    "cmaes_categorical": ("sampler: tpe", "sampler: cmaes", "cmaes cannot sample categorical"),
    "cmaes_two_objectives": ("model.mixer: [mlp, conv, identity]\n", "\n",
                             "cmaes is single-objective"),
    "asha_two_objectives": ("{name: fifo}", "{name: asha}", "cannot serve a multi-objective"),
    "train_size_searched": ("model.mixer: [mlp, conv, identity]",
                            "model.mixer: [mlp, conv]\n    dataset.max_train: "
                            "{low: 100, high: 400}",
                            "search.space.dataset.max_train: cannot be a search dimension"),
    "precision_scope_searched": ("model.mixer: [mlp, conv, identity]",
                                 "model.mixer: [mlp, conv]\n    train.precision_scope: "
                                 "[study, architecture]",
                                 "search.space.train.precision_scope: is the study's choice"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_search_validation_errors(case, tmp_path):
    old, new, expected = BAD[case]
    objectives = "{val_acc: max, gmacs: min}" if "two_objectives" in case else "{val_acc: max}"
    path = study_file(tmp_path, objectives=objectives)
    text = path.read_text()
    if case == "cmaes_two_objectives":
        text = text.replace("sampler: tpe", "sampler: cmaes")
    assert old in text
    path.write_text(text.replace(old, new))
    before = sorted(tmp_path.iterdir())
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and expected in res.output, res.output
    assert sorted(tmp_path.iterdir()) == before


def test_unreachable_storage_is_named_before_ray_starts(tmp_path):
    path = study_file(tmp_path)
    bad = "sqlite:////nonexistent-dir/deeper/optuna.db"
    path.write_text(path.read_text().replace(f"sqlite:///{tmp_path / 'optuna.db'}", bad))
    exe = Path(sys.executable).with_name("ablate")
    res = subprocess.run([str(exe), "run", str(path), "--tracking-uri",
                          f"sqlite:///{tmp_path / 'm.db'}"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert bad in res.stderr and "Traceback" not in res.stderr
    # refused before anything started: no search announced, no tracking store created
    assert "search," not in res.stdout and not (tmp_path / "m.db").exists()


def test_a_search_on_training_time_alone_needs_profiles_it_can_take(tmp_path):
    """With a continuous model dimension no architecture is profiled up front, so no trial
    would carry train_time_alone_s: refused in one line before anything is written."""
    from ablate.tune.profiling import check_alone_objective

    path = study_file(tmp_path, objectives="{val_acc: max, train_time_alone_s: min}",
                      extra="")
    check_alone_objective(load_study(path))  # 3 categorical architectures: all profiled
    text = path.read_text().replace(
        "    model.mixer: [mlp, conv, identity]\n",
        "    model.mixer: [mlp, conv, identity]\n    model.mlp_ratio: {low: 1.0, high: 4.0}\n")
    path.write_text(text)
    exe = Path(sys.executable).with_name("ablate")
    res = subprocess.run([str(exe), "run", str(path), "--tracking-uri",
                          f"sqlite:///{tmp_path / 'm.db'}"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert f"{path}: search.objectives.train_time_alone_s needs a profile of every " \
        "architecture the search samples" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.yaml"]  # no Optuna study


def optuna_trials(path: Path):
    from ablate.search import open_storage

    spec = load_study(path).spec
    return optuna.load_study(study_name=study_name(spec),
                             storage=open_storage(spec.search.storage))


def test_tpe_asha_finishes_n_trials_with_pruned_marked(ray_session, tmp_path):
    path = study_file(tmp_path, n=8, epochs=3,
                      scheduler="{name: asha, grace_period: 1, reduction_factor: 2}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(load_study(path), uri)
    st = optuna_trials(path)
    states = [t.state for t in st.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 8
    assert states.count(TrialState.PRUNED) >= 1 and summary.pruned >= 1
    df = load_runs("srch", uri)
    assert len(df) == 16  # 8 sampled configurations x 2 seeds
    for t in st.trials:
        runs = df[df["optuna.trial_number"] == t.number]
        assert len(runs) == 2
        expected = "pruned" if t.state == TrialState.PRUNED else "finished"
        assert set(runs["status"]) == {expected}
        if t.state == TrialState.COMPLETE:
            # plain Optuna's value is the seed mean of the MLflow metric
            assert t.values[0] == pytest.approx(runs["val_acc"].mean())
            assert set(runs["seed"]) == {0, 1}
    out = runner.invoke(app, ["status", str(path), "--tracking-uri", uri])
    assert out.exit_code == 0 and "best trial" in out.output


def test_nsga2_two_objectives_pareto_set(ray_session, tmp_path):
    path = study_file(tmp_path, sampler="nsga2", n=6,
                      objectives="{val_acc: max, gmacs: min}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_study(load_study(path), uri)
    st = optuna_trials(path)
    done = [t for t in st.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6
    pareto = st.best_trials
    assert pareto
    for p in pareto:
        for q in done:
            dominates = (q.values[0] >= p.values[0] and q.values[1] <= p.values[1]
                         and (q.values[0] > p.values[0] or q.values[1] < p.values[1]))
            assert not dominates, (p.values, q.values)
    status = runner.invoke(app, ["status", str(path), "--tracking-uri", uri, "--json"])
    assert status.exit_code == 0
    import json

    info = json.loads(status.stdout)
    assert {b["number"] for b in info["optuna"]["pareto"]} == {p.number for p in pareto}


def test_interrupted_search_resumes_to_exactly_n_trials(ray_session, tmp_path):
    """Ctrl-C after the first finished configuration, then a rerun completes exactly
    n_trials. Its trials take about a second each: with 6 of them, waiting for two finished
    before the Ctrl-C let the search end first on one CI run; 8, interrupted after one,
    leave the Ctrl-C several trials of room."""
    path = study_file(tmp_path, n=8, epochs=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exe = Path(sys.executable).with_name("ablate")
    proc = subprocess.Popen([str(exe), "run", str(path), "--tracking-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:  # wait for a finished configuration, then Ctrl-C
            n = 0
            if (tmp_path / "optuna.db").exists():
                try:
                    n = sum(t.state == TrialState.COMPLETE for t in optuna_trials(path).trials)
                except KeyError:  # the study is not created yet
                    n = 0
            if n >= 1:
                break
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        signal_and_wait(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = [t.state for t in optuna_trials(path).trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in before) < 8
    run_study(load_study(path), uri)
    st = optuna_trials(path)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in st.trials) == 8
    df = load_runs("srch", uri)
    fin = df[df["status"] == "finished"]
    assert fin["trial_id"].is_unique  # no finished trial was run twice
    # running again adds nothing
    run_study(load_study(path), uri)
    assert len(load_runs("srch", uri)) == len(df)


def test_resumed_search_proposes_new_configurations(ray_session, tmp_path):
    """Raising n_trials continues the same Optuna study; the sampler is re-seeded from the
    trials already told, so the random start-up suggestions are not replayed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = study_file(tmp_path, sampler="random", n=2, epochs=1)
    run_study(load_study(path), uri)
    first = [t.params for t in optuna_trials(path).trials]
    path = study_file(tmp_path, sampler="random", n=4, epochs=1)
    run_study(load_study(path), uri)
    trials = optuna_trials(path).trials
    assert len(trials) == 4 and [t.params for t in trials[:2]] == first
    lrs = [t.params["train.lr"] for t in trials]
    assert len(set(lrs)) == 4, lrs  # a replayed seed would propose the first two again


def test_the_optuna_study_names_its_objectives(tmp_path):
    """Importance views and Optuna's own tools say which metric objective k is."""
    from ablate.tune.driver import open_search_study

    path = study_file(tmp_path, sampler="nsga2", objectives="{val_acc: max, gmacs: min}")
    _, _, ost = open_search_study(load_study(path).spec)
    assert ost.metric_names == ["val_acc", "gmacs"]
    assert [d.name for d in ost.directions] == ["MAXIMIZE", "MINIMIZE"]


def test_a_search_keeps_its_optuna_study_name_unless_auto_trains_otherwise(tmp_path):
    """The Optuna study name hashes the search's definition, train section included; a
    search from before `train.precision_scope` existed must find its study again on resume
    (else it starts over at 0 of n_trials). Its name was this formula over a train section
    without the field; only `auto` at one precision for the study trains otherwise."""
    import hashlib
    import json

    from ablate.search import full_space, study_name
    from ablate.study import load_study

    def old_name(spec) -> str:
        base = {s: getattr(spec, s).model_dump(mode="json") for s in ("dataset", "model",
                                                                      "train")}
        del base["train"]["precision_scope"]
        parts = {"space": full_space(spec), "objectives": spec.search.objectives,
                 "sampler": spec.search.sampler, "seeds": spec.seeds, "base": base}
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return f"{spec.name}-{hashlib.sha256(blob).hexdigest()[:10]}"

    def spec(train: str):
        path = study_file(tmp_path)
        text = path.read_text()
        path.write_text(text.replace("warmup_epochs: 0.2}", f"warmup_epochs: 0.2{train}}}"))
        return load_study(path).spec

    fp32 = spec("")
    assert study_name(fp32) == old_name(fp32)
    assert study_name(spec(", precision_scope: architecture")) == old_name(fp32)
    per_arch = spec(", precision: auto, precision_scope: architecture")
    assert study_name(per_arch) == old_name(per_arch)
    wide = spec(", precision: auto")
    assert study_name(wide) != old_name(wide)
