"""Cost profiles: once per architecture key, alone on the node, before the trials; reused
from the store across studies; `--reprofile`; the `auto` precision/layout probe. Real Ray,
real MLflow (SQLite in a temp dir), synthetic data, tiny models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ablate.study import load_study
from ablate.tracking import load_runs
from ablate.tune.driver import run_study
from ablate.tune.profile_store import code_fingerprint
from tests.conftest import write

pytestmark = pytest.mark.slow

STUDY = """\
name: {name}
dataset: {{name: synthetic, image_size: 16, train_size: 120, test_size: 40}}
model: {{dim: 16, depth: 1, heads: 2, patch_size: 4}}
train: {{epochs: 1, batch_size: 32, eval_batch_size: 64, profile_batch_size: 8,
        profile_seconds: 0.05, warmup_epochs: 0.2{train}}}
factors:
  model.mixer: {mixers}
seeds: {seeds}
resources: {{cpus_per_trial: 1, max_concurrent: 2}}
"""

COST = ("params", "gmacs", "throughput_img_s", "latency_ms", "train_img_s", "peak_mem_mb",
        "throughput_img_s_iqr", "latency_ms_iqr", "train_img_s_iqr")



def study_file(tmp_path, name, mixers, seeds=(0,), train=""):
    text = STUDY.format(name=name, mixers=json.dumps(list(mixers)),
                        seeds=json.dumps(list(seeds)), train=train)
    return write(tmp_path / f"{name}.yaml", text)


def profile_runs(uri: str) -> list:
    """Every profile run in the store, whatever study measured it."""
    c = MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, filter_string="tags.`ablate.phase` = 'profile'")


def test_two_architectures_three_seeds_profile_twice_alone_and_reuse(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study(study_file(tmp_path, "prof", ["conv", "mlp"], seeds=[0, 1, 2]))
    summary = run_study(study, uri)
    assert summary.finished == 6 and summary.failed == 0
    profiles = profile_runs(uri)
    assert len(profiles) == 2
    assert {p.data.params["model.mixer"] for p in profiles} == {"conv", "mlp"}
    for p in profiles:
        assert p.data.tags["ablate.device_name"] and p.data.tags["ablate.torch_version"]
        assert p.info.status == "FINISHED"
    trials = load_runs("prof", uri)  # the trials only: profile runs are not results
    assert len(trials) == 6 and set(trials["status"]) == {"finished"}
    # each profile was measured while no trial ran: its time span meets no trial's
    for p in profiles:
        p0, p1 = p.info.start_time, p.info.end_time
        assert p1 >= p0
        for _, t in trials.iterrows():
            t0, t1 = t["start_time"].value // 10**6, t["end_time"].value // 10**6
            assert p1 <= t0 or p0 >= t1, (p.info.run_name, t["run_name"])
    # every trial carries its architecture's profile, exactly
    by_key = {p.data.tags["ablate.arch_key"]: p for p in profiles}
    c = MlflowClient(uri)
    for _, t in trials.iterrows():
        run = c.get_run(t["run_id"])
        prof = by_key[run.data.tags["ablate.arch_key"]]
        assert prof.data.params["model.mixer"] == t["factor.model.mixer"]
        for m in COST:
            assert run.data.metrics[m] == pytest.approx(prof.data.metrics[m]), m
        # its training time alone on the profile node: what it trained on at the profile's speed
        seen = run.data.metrics["train_images_seen"]
        assert 0 < seen <= run.data.metrics["train_images"]  # 1 epoch (full batches only)
        assert run.data.metrics["train_time_alone_s"] == pytest.approx(
            seen / prof.data.metrics["train_img_s"])
        # ... timed at its own batch (what tells its alone time from an older ablate's)
        assert run.data.metrics["profile_train_batch_size"] == 32.0
        assert run.data.params["train.precision_resolved"] == "fp32"
        assert run.data.params["train.channels_last_resolved"] == "False"
    # the seeds of one architecture share one measurement
    assert trials.groupby("factor.model.mixer")["throughput_img_s"].nunique().max() == 1
    # ... and every run names the machine and code its timing costs come from
    [ident] = set(trials["profile_identity"])
    p = profiles[0].data.tags
    assert ident.startswith(f"{p['ablate.device_name']}, torch {p['ablate.torch_version']},")
    assert p["ablate.profile_code"] in ident
    # ... whose training step was timed as the trials train: their batch, their threads
    for p in profiles:
        assert p.data.params["train_batch_size"] == "32"
        assert p.data.params["train_threads"] == p.data.tags["ablate.train_threads"] == "1"
    # the trials started longest first by their profiles (equal images: the slower one)
    slower = min(profiles, key=lambda p: p.data.metrics["train_img_s"]).data.params[
        "model.mixer"]
    first_two = trials.sort_values("start_time")["factor.model.mixer"].head(2)
    assert list(first_two) == [slower, slower]

    # status counts trials, not profile runs
    from typer.testing import CliRunner

    from ablate.cli import app

    cli = CliRunner()
    st = cli.invoke(app, ["status", str(study.path), "--tracking-uri", uri, "--json"])
    assert st.exit_code == 0, st.output
    info = json.loads(st.stdout)
    assert info["trials"] == 6 and info["counts"]["finished"] == 6

    # another study with one architecture seen before and one new: only the new is measured
    second = load_study(study_file(tmp_path, "prof2", ["conv", "identity"]))
    assert run_study(second, uri).finished == 2
    after = profile_runs(uri)
    assert len(after) == 3
    new = [p for p in after if p.info.run_id not in {q.info.run_id for q in profiles}]
    assert [p.data.params["model.mixer"] for p in new] == ["identity"]
    conv_old = next(p for p in profiles if p.data.params["model.mixer"] == "conv")
    t2 = load_runs("prof2", uri)
    conv2 = t2[t2["factor.model.mixer"] == "conv"].iloc[0]
    assert conv2["throughput_img_s"] == pytest.approx(conv_old.data.metrics["throughput_img_s"])
    assert c.get_run(conv2["run_id"]).data.tags["ablate.profile_run_id"] == conv_old.info.run_id

    # --reprofile measures the architectures it runs again
    third = study_file(tmp_path, "prof3", ["conv"])
    res = cli.invoke(app, ["run", str(third), "--tracking-uri", uri, "--reprofile", "-q"])
    assert res.exit_code == 0, res.output
    last = profile_runs(uri)
    assert len(last) == 4
    assert sum(p.data.params["model.mixer"] == "conv" for p in last) == 2

    # a profile measured by other model or cost code (an earlier ablate, another timm) is
    # not reused: the run says so and measures the architecture again
    assert {p.data.tags["ablate.profile_code"] for p in last} == {code_fingerprint()}
    for p in last:
        if p.data.params["model.mixer"] == "conv":
            c.set_tag(p.info.run_id, "ablate.profile_code", "0123456789abcdef")
    fifth = study_file(tmp_path, "prof5", ["conv"])
    res = cli.invoke(app, ["run", str(fifth), "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "profiling 1 alone" in res.output
    assert "1 stored profile(s) were measured by other model or cost code" in res.output
    assert len(profile_runs(uri)) == 5
    t5 = c.get_run(load_runs("prof5", uri).iloc[0]["run_id"])
    assert t5.data.tags["ablate.profile_run_id"] not in {p.info.run_id for p in last}

    # a run without profiles (what --smoke does) measures nothing
    fourth = replace(load_study(study_file(tmp_path, "prof4", ["pool"])), profile=False)
    assert run_study(fourth, uri).finished == 1
    assert len(profile_runs(uri)) == 5

    # the timing budget is part of the key: a study asking for longer timings (a factor
    # train.profile_seconds here) does not take the profile timed more briefly; each level is
    # measured at its own budget, and a later study at 0.05 s takes the 0.05 s profile
    longer = write(tmp_path / "prof6.yaml", STUDY.format(
        name="prof6", mixers='["conv"]', seeds="[0]", train="").replace(
        "profile_seconds: 0.05, ", "").replace(
        "factors:\n", "factors:\n  train.profile_seconds: [0.05, 0.1]\n"))
    res = cli.invoke(app, ["run", str(longer), "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "2 architecture(s); profiling 1 alone" in res.output  # 0.1 s; 0.05 s is stored
    six = profile_runs(uri)
    assert len(six) == 6
    (long_conv,) = [p for p in six if p.data.params["profile_seconds"] == "0.1"]
    for _, t in load_runs("prof6", uri).iterrows():
        tags = c.get_run(t["run_id"]).data.tags
        asked = t["factor.train.profile_seconds"]
        (prof,) = [p for p in six if p.info.run_id == tags["ablate.profile_run_id"]]
        assert float(prof.data.params["profile_seconds"]) == asked
    shorter = study_file(tmp_path, "prof7", ["conv"])  # 0.05 s
    res = cli.invoke(app, ["run", str(shorter), "--tracking-uri", uri])
    assert res.exit_code == 0 and "profiling 0 alone" in res.output, res.output
    assert len(profile_runs(uri)) == 6
    t7 = c.get_run(load_runs("prof7", uri).iloc[0]["run_id"])
    assert t7.data.tags["ablate.profile_run_id"] != long_conv.info.run_id


def test_the_profiled_code_digest_follows_the_model_and_cost_code_only(tmp_path, monkeypatch):
    from importlib import metadata

    from ablate.tune.profile_store import PROFILED_CODE

    for name in ("ablate/models/mixers.py", "ablate/cost.py", "ablate/archs.py",
                 "ablate/train.py", "ablate/tune/profiling.py", "ablate/report.py"):
        write(tmp_path / name, f"# {name}\n")
    first = code_fingerprint(tmp_path)
    assert code_fingerprint(tmp_path) == first
    write(tmp_path / "ablate/report.py", "# not model code\n")  # outside PROFILED_CODE
    assert code_fingerprint(tmp_path) == first
    for name in ("ablate/models/mixers.py", "ablate/cost.py"):
        write(tmp_path / name, "x = 1\n")
        assert code_fingerprint(tmp_path) != first, name
        first = code_fingerprint(tmp_path)
    write(tmp_path / "ablate/models/new_mixer.py", "y = 2\n")  # a new model file counts
    assert code_fingerprint(tmp_path) != first
    first = code_fingerprint(tmp_path)
    # an editor's lock file (a dangling link) is neither read nor digested
    (tmp_path / "ablate/models/.#mixers.py").symlink_to(tmp_path / "nowhere")
    assert code_fingerprint(tmp_path) == first
    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda d: "0.0.1" if d == "timm" else real(d))  # another timm
    assert code_fingerprint(tmp_path) != first
    # profiled code that is not there is an error, not a digest that matches any version's
    (tmp_path / "ablate/cost.py").unlink()
    with pytest.raises(RuntimeError, match="ablate/cost.py is not under"):
        code_fingerprint(tmp_path)
    # the installed package's own files are what is digested
    root = Path(code_fingerprint.__code__.co_filename).resolve().parents[2]
    assert all(list(root.glob(p)) for p in PROFILED_CODE)


def test_auto_precision_and_layout_are_probed_once_and_logged(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study(study_file(tmp_path, "auto", ["conv"], seeds=[0, 1],
                                  train=", precision: auto, channels_last: auto"))
    assert run_study(study, uri).finished == 2
    (prof,) = profile_runs(uri)
    probes = {k: v for k, v in prof.data.metrics.items() if k.startswith("probe_img_s.")}
    from ablate.cost import supported_candidates

    assert set(probes) == {f"probe_img_s.{p}_{'channels_last' if cl else 'contiguous'}"
                           for p, cl in supported_candidates("cpu")}
    assert {"probe_img_s.fp32_contiguous", "probe_img_s.fp32_channels_last"} <= set(probes)
    fastest = max(probes, key=probes.get).removeprefix("probe_img_s.")
    layout = ("channels_last" if prof.data.params["train.channels_last_resolved"] == "True"
              else "contiguous")
    chosen = f"{prof.data.params['train.precision_resolved']}_{layout}"
    assert chosen == fastest
    # the probe timed the steps with the trials' threads (cpus_per_trial 1), not the node's
    assert prof.data.params["train_threads"] == "1"
    assert prof.data.tags["ablate.probe_threads"] == "1"  # what it used, not only asked for
    assert prof.data.tags["ablate.profile_threads"] == "2"
    c = MlflowClient(uri)
    for _, t in load_runs("auto", uri).iterrows():
        params = c.get_run(t["run_id"]).data.params
        assert params["train.precision"] == "auto"
        assert params["train.precision_resolved"] == prof.data.params["train.precision_resolved"]
        assert (params["train.channels_last_resolved"]
                == prof.data.params["train.channels_last_resolved"])
    # the report and the dashboard read it without asking for params (the precision sentence)
    lean = load_runs("auto", uri, params=False)
    assert set(lean["params.train.precision_resolved"]) == {
        prof.data.params["train.precision_resolved"]}



SEARCH = """\
name: psearch
dataset: {name: synthetic, image_size: 16, train_size: 120, test_size: 40}
model: {dim: 16, depth: 1, heads: 2, patch_size: 4}
train: {epochs: 1, batch_size: 32, eval_batch_size: 64, profile_batch_size: 8,
        profile_seconds: 0.05, warmup_epochs: 0.2}
search:
  method: optuna
  n_trials: 4
  objectives: {val_acc: max, throughput_img_s: max}
  space:
    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    model.mixer: [mlp, conv]
  storage: sqlite:///STORAGE
seeds: [0, 1]
resources: {cpus_per_trial: 1, max_concurrent: 2}
"""


def test_a_search_profiles_each_architecture_it_can_sample_once_before_its_trials(
        ray_session, tmp_path):
    """An Optuna search samples architectures as it goes; its finite model dimensions are
    enumerated and profiled alone before the first trial, and each trial (whatever lr it
    drew) carries its architecture's profile, also as the objective Optuna was told."""
    import optuna

    from ablate.search import open_storage, study_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write(tmp_path / "psearch.yaml",
                 SEARCH.replace("STORAGE", str(tmp_path / "optuna.db")))
    study = load_study(path)
    summary = run_study(study, uri)
    assert summary.finished == 4 and summary.failed == 0
    profiles = profile_runs(uri)
    assert sorted(p.data.params["model.mixer"] for p in profiles) == ["conv", "mlp"]
    trials = load_runs("psearch", uri)
    assert len(trials) == 8 and set(trials["status"]) == {"finished"}
    first_trial = min(t.value // 10**6 for t in trials["start_time"])
    assert all(p.info.end_time <= first_trial for p in profiles)
    by_key = {p.data.tags["ablate.arch_key"]: p for p in profiles}
    c = MlflowClient(uri)
    for _, t in trials.iterrows():
        prof = by_key[c.get_run(t["run_id"]).data.tags["ablate.arch_key"]]
        assert prof.data.params["model.mixer"] == t["factor.model.mixer"]
        for m in COST:
            assert t[m] == pytest.approx(prof.data.metrics[m]), m
    ost = optuna.load_study(study_name=study_name(study.spec),
                            storage=open_storage(study.spec.search.storage))
    tput = {p.data.params["model.mixer"]: p.data.metrics["throughput_img_s"] for p in profiles}
    for t in ost.trials:
        assert t.values[1] == pytest.approx(tput[t.params["model.mixer"]])


def test_search_architectures_enumerates_only_finite_model_dimensions(tmp_path):
    from ablate.tune.profiling import search_architectures

    text = SEARCH.replace("STORAGE", str(tmp_path / "o.db"))
    two = search_architectures(load_study(write(tmp_path / "a.yaml", text)))
    assert sorted(t.model.mixer for t in two) == ["conv", "mlp"]
    wide = text.replace("model.mixer: [mlp, conv]",
                        "model.mixer: [mlp, conv]\n    model.depth: {low: 1, high: 4}")
    assert len(search_architectures(load_study(write(tmp_path / "b.yaml", wide)))) == 8
    cont = text.replace("model.mixer: [mlp, conv]",
                        "model.mixer: [mlp, conv]\n    model.mlp_ratio: {low: 1.0, high: 4.0}")
    assert search_architectures(load_study(write(tmp_path / "c.yaml", cont))) is None
    big = text.replace("model.mixer: [mlp, conv]", "model.dim: {low: 8, high: 1024, step: 8}")
    assert search_architectures(load_study(write(tmp_path / "d.yaml", big))) is None
    # the timing budget is part of the key (arch_config): each sampled budget is profiled
    budget = text.replace("model.mixer: [mlp, conv]",
                          "model.mixer: [mlp, conv]\n    train.profile_seconds: [0.05, 0.1]")
    four = search_architectures(load_study(write(tmp_path / "e.yaml", budget)))
    assert sorted((t.model.mixer, t.train.profile_seconds) for t in four) == [
        ("conv", 0.05), ("conv", 0.1), ("mlp", 0.05), ("mlp", 0.1)]
    # every train field the key holds is a dimension a search enumerates
    from ablate.tune.profiling import ARCH_DIMS, arch_config

    t = search_architectures(load_study(write(tmp_path / "f.yaml", text.replace(
        "train: {", "train: {compile: true, "))))[0]
    fields = set(t.train.model_dump())
    held = {("batch_size" if k == "train_batch_size" else k)
            for k in arch_config(t, (16, 3, 10), "cpu", 1)} & fields
    assert {"precision", "profile_seconds", "batch_size", "compile", "grad_clip"} <= held
    assert {f"train.{k}" for k in held} <= set(ARCH_DIMS)


@pytest.mark.parametrize("clip", [None, 1e-6])
def test_the_profiled_training_step_clips_gradients_as_the_trials_do(tmp_path, clip):
    """train.grad_clip (1.0 by default) makes every trial's step clip its gradients; the
    profile's step did not, so train_img_s timed less work than the trials do (helper-33's
    review). Each optimizer step of the profile and of the probe sees the clipped norm, and
    the clip is part of the architecture key."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from ablate.tune.profiling import arch_config, arch_key, measure

    clip_text = "null" if clip is None else clip
    text = STUDY.format(name="g", mixers='["mlp"]', seeds="[0]",
                        train=f", grad_clip: {clip_text}, channels_last: auto")
    (t,) = load_study(write(tmp_path / "g.yaml", text)).trials
    norms: list[float] = []

    def record(opt, args, kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))

    hook = register_optimizer_step_pre_hook(record)
    threads = torch.get_num_threads()
    try:
        measure(t.to_dict(), (16, 3, 10), "cpu", 1, 1)  # the probe, then the profile
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    assert len(norms) > 10
    if clip is None:
        assert min(norms) > 1e-3  # unclipped: the loss's own gradients
    else:
        assert max(norms) <= clip * (1 + 1e-3)
    def key(grad_clip: str) -> str:
        other = load_study(write(tmp_path / "h.yaml", text.replace(
            f"grad_clip: {clip_text}", f"grad_clip: {grad_clip}"))).trials[0]
        return arch_key(arch_config(other, (16, 3, 10), "cpu", 1))

    # whether the step clips is in the key; by how much is not (the same work for any norm)
    assert key("null") != key("0.5") == key("2.0")


def test_a_search_over_grad_clip_profiles_each_clipping_state_up_front(tmp_path):
    """helper-35: train.grad_clip was in the architecture key but not among a search's
    architecture dimensions, so a sampled clip other than the study's found no profile and
    its trial measured its own costs beside the others (and had no train_time_alone_s). Now
    the key holds whether it clips, and the search profiles each state it samples."""
    from ablate.tune.profiling import arch_config, arch_key, search_architectures

    text = SEARCH.replace("STORAGE", str(tmp_path / "o.db"))

    def profiled(space: str) -> tuple[list[tuple[str, float | None]], set[str]]:
        study = load_study(write(tmp_path / "s.yaml", text.replace(
            "model.mixer: [mlp, conv]", f"model.mixer: [mlp, conv]\n    {space}")))
        archs = search_architectures(study)
        keys = {arch_key(arch_config(t, (16, 3, 10), "cpu", 1)) for t in archs}
        return sorted(((t.model.mixer, t.train.grad_clip) for t in archs), key=str), keys

    def sampled(mixer: str, clip: float | None) -> str:
        t = load_study(write(tmp_path / "t.yaml", STUDY.format(
            name="t", mixers=f'["{mixer}"]', seeds="[0]",
            train=f", grad_clip: {'null' if clip is None else clip}"))).trials[0]
        return arch_key(arch_config(t, (16, 3, 10), "cpu", 1))

    archs, keys = profiled("train.grad_clip: [0.5, 1.0, 2.0]")
    assert [m for m, _ in archs] == ["conv", "mlp"]  # one profile per model: all clip
    assert {sampled("mlp", 2.0), sampled("conv", 0.5)} <= keys
    archs, keys = profiled("train.grad_clip: [null, 1.0]")
    assert len(archs) == 4 and {sampled("mlp", None), sampled("mlp", 1.0)} <= keys
    archs, keys = profiled("train.grad_clip: {low: 0.1, high: 5.0, log: true}")
    assert len(archs) == 2 and sampled("conv", 0.37) in keys  # continuous: still profiled


def test_a_profile_is_keyed_by_the_training_batch_and_threads_it_times(tmp_path):
    """A profile times the training step (and the `auto` probe) at train.batch_size and, on
    CPU, with the trials' threads (resources.cpus_per_trial), so both are part of every
    architecture key (and a search that samples the batch enumerates it); on CUDA the
    threads are not."""
    from ablate.tune.profiling import arch_config, arch_key, search_architectures

    def key(text: str, batch: int, cpus: int = 1, device: str = "cpu") -> str:
        t = load_study(write(tmp_path / f"k{batch}.yaml", text.replace(
            "batch_size: 32,", f"batch_size: {batch},"))).trials[0]
        return arch_key(arch_config(t, (16, 3, 10), device, cpus))

    for train in ("", ", channels_last: auto"):
        text = STUDY.format(name="k", mixers='["conv"]', seeds="[0]", train=train)
        assert key(text, 32) != key(text, 64)
        assert key(text, 32) == key(text, 32)
        assert key(text, 32, cpus=1) != key(text, 32, cpus=2)
        assert key(text, 32, 1, "cuda") == key(text, 32, 2, "cuda")
        assert key(text, 32, 1, "cuda") != key(text, 32, 1, "cpu")
    text = SEARCH.replace("STORAGE", str(tmp_path / "o.db")).replace(
        "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}", "train.batch_size: [16, 32]")
    archs = search_architectures(load_study(write(tmp_path / "s.yaml", text)))
    assert sorted((t.model.mixer, t.train.batch_size) for t in archs) == [
        ("conv", 16), ("conv", 32), ("mlp", 16), ("mlp", 32)]
    precisions = text.replace("model.mixer: [mlp, conv]",
                              "model.mixer: [mlp, conv]\n    train.precision: [fp32, bf16]")
    assert len(search_architectures(load_study(write(tmp_path / "p.yaml", precisions)))) == 8


def test_a_profile_times_training_with_the_trials_threads_and_batch(tmp_path):
    """The training step (its speed and memory, and the auto probe) is timed as the trials
    train, at their threads (resources.cpus_per_trial) and train.batch_size, alone on the
    node; throughput and latency with the node's threads at the profile batch."""
    import torch

    from ablate.tune.profiling import measure

    text = STUDY.format(name="t", mixers='["conv"]', seeds="[0]",
                        train=", channels_last: auto")
    (t,) = load_study(write(tmp_path / "t.yaml", text)).trials
    threads = torch.get_num_threads()
    try:
        res = measure(t.to_dict(), (16, 3, 10), "cpu", 2, train_threads=1)
        assert res["probe_threads"] == 1 and len(res["probe"]) >= 2
        assert res["train_threads"] == 1
        assert res["threads"] == "2" and torch.get_num_threads() == 2  # the profile's
        assert res["metrics"]["train_img_s"] > 0
    finally:
        torch.set_num_threads(threads)


def test_the_profile_training_step_runs_at_the_batch_and_threads_given(monkeypatch):
    """cost.profile times its training step at `train_batch_size` with `train_threads`
    (what it records; its img/s counts that batch), and its inference with the caller's
    threads at `batch_size`; its peak memory follows the training batch."""
    import torch

    from ablate import cost
    from ablate.models import create_model

    threads = torch.get_num_threads()
    model = create_model("backbone", image_size=16, in_chans=3, num_classes=10, dim=32,
                         depth=1, patch_size=4, mixer="mlp")
    seen = []
    forward = model.forward

    def spy(x):
        seen.append((torch.is_grad_enabled(), x.shape[0], torch.get_num_threads()))
        return forward(x)

    model.forward = spy
    try:
        torch.set_num_threads(2)
        small = cost.profile(model, 16, num_classes=10, batch_size=8, min_seconds=0.02,
                             warmup=1, train_batch_size=8, train_threads=1)
        big = cost.profile(model, 16, num_classes=10, batch_size=8, min_seconds=0.02,
                           warmup=1, train_batch_size=256, train_threads=1)
        assert torch.get_num_threads() == 2  # given back

        def half_a_second(fn, *args, **kwargs):  # every timed block: one call, 0.5 s
            fn()
            return [0.5] * 5

        monkeypatch.setattr(cost, "_time_calls", half_a_second)
        fixed = cost.profile(model, 16, num_classes=10, batch_size=8, warmup=1,
                             train_batch_size=256, train_threads=1)
    finally:
        torch.set_num_threads(threads)
    train = {(b, n) for grad, b, n in seen if grad}
    infer = {(b, n) for grad, b, n in seen if not grad}
    assert train == {(8, 1), (256, 1)}
    assert {n for _, n in infer} == {2} and {b for b, _ in infer} >= {8, 1}
    assert (small.train_batch_size, small.train_threads, big.train_batch_size) == (8, 1, 256)
    assert fixed.train_img_s == pytest.approx(256 / 0.5)  # the training batch's images
    assert fixed.throughput_img_s == pytest.approx(8 / 0.5)
    if small.peak_mem_mb is not None:  # the heap is readable on this libc
        assert big.peak_mem_mb > small.peak_mem_mb


def test_a_profile_identity_unpickles_without_torch():
    """The driver unpickles each profile's identity; a torch type in it (TorchVersion) would
    make the driver import torch while the profile node waits."""
    import pickle
    import subprocess
    import sys

    from ablate.tune.profiling import identity

    blob = pickle.dumps(identity("cpu", 1))
    code = ("import pickle, sys; d = pickle.loads(sys.stdin.buffer.read()); "
            "print(sorted(d), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                         check=True).stdout.decode()
    assert out.strip().endswith("False"), out


def test_a_compiled_trial_is_profiled_compiled_even_in_a_reused_worker(tmp_path):
    """`train.compile: true` trials train the compiled model, so their profile times the
    compiled model, under a key of its own (one eager profile would give compiled and eager
    trials the same speed); keys without compile stay what they were. One worker takes every
    profile of a study: past dynamo's recompile limit a later architecture would time eager
    code, so each compiled profile compiles afresh (a low limit stands in for a worker that
    compiled many models before)."""
    import torch
    from torch._dynamo.utils import counters

    from ablate.tune.profiling import arch_config, arch_key, measure

    def trials(train: str) -> list:
        text = STUDY.format(name="c", mixers='["conv", "mlp"]', seeds="[0]", train=train)
        return load_study(write(tmp_path / f"c{len(train)}.yaml", text)).trials

    from ablate.models import create_model

    shape = (16, 3, 10)
    eager, compiled = trials(""), trials(", compile: true")
    assert "compile" not in arch_config(eager[0], shape, "cpu", 1)
    assert arch_key(arch_config(eager[0], shape, "cpu", 1)) != arch_key(
        arch_config(compiled[0], shape, "cpu", 1))
    threads = torch.get_num_threads()  # measure() sets the profile's thread count
    try:
        with torch._dynamo.config.patch(recompile_limit=3):
            # another model, compiled for 3 shapes: the worker is at its limit
            other = torch.compile(create_model(mixer="pool", dim=8, depth=1, patch_size=4,
                                               image_size=16, num_classes=10), dynamic=False)
            with torch.no_grad():
                for b in (1, 2, 3):
                    other(torch.zeros(b, 3, 16, 16))
            for t in compiled:  # conv, then mlp in the same process
                before = counters["stats"]["unique_graphs"]
                res = measure(t.to_dict(), shape, "cpu", 1)
                assert counters["stats"]["unique_graphs"] > before, t.model.mixer  # not eager
                assert res["metrics"]["compile_s"] > 0 and res["metrics"]["train_img_s"] > 0
                assert res["metrics"]["peak_mem_mb"] > 0
        assert "compile_s" not in measure(eager[0].to_dict(), shape, "cpu", 1)["metrics"]
    finally:
        torch.set_num_threads(threads)


def test_a_compiled_trial_trains_compiled_in_a_reused_worker(tmp_path):
    """Ray Tune reuses a trial's worker for the next trial: past dynamo's recompile limit the
    next compiled trial would train eager, silently, so `train_cell` resets dynamo first (a
    low limit stands in for a worker that compiled many trials' models before)."""
    import torch
    from torch._dynamo.utils import counters

    from ablate.models import create_model
    from ablate.tune.trainable import train_cell

    text = STUDY.format(name="w", mixers='["conv"]', seeds="[0]", train=", compile: true")
    (trial,) = load_study(write(tmp_path / "w.yaml", text)).trials
    ctx = {"root": None, "cpus": 1, "gpus": 0, "profile": False}
    threads = torch.get_num_threads()  # train_cell sets the trial's thread count
    try:
        with torch._dynamo.config.patch(recompile_limit=3):
            other = torch.compile(create_model(mixer="pool", dim=8, depth=1, patch_size=4,
                                               image_size=16, num_classes=10), dynamic=False)
            with torch.no_grad():
                for b in (1, 2, 3):  # the worker is at its limit
                    other(torch.zeros(b, 3, 16, 16))
            before = counters["stats"]["unique_graphs"]
            reports: list = []
            train_cell({"context": ctx, "cell": [trial.to_dict()]}, reports.append)
            assert counters["stats"]["unique_graphs"] > before  # compiled, not eager
            assert len(reports) == 1 and reports[0]["train_loss"] == reports[0]["train_loss"]
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


@pytest.mark.parametrize("setting,auto", [("profile_batch_size", False),
                                          ("batch_size", False), ("batch_size", True)])
def test_a_profile_out_of_memory_stops_the_run_in_one_line(ray_session, tmp_path, setting,
                                                          auto):
    """A batch that does not fit (10^11 images: past any address space, refused whatever the
    kernel's overcommit): the run stops before any trial (grid trials must not finish without
    their costs) with one line naming the setting whose batch it was and the fix: the
    throughput's train.profile_batch_size, or train.batch_size, the batch of the profile's
    training step (and of the auto probe, which comes first)."""
    from ablate.errors import AblateError

    path = study_file(tmp_path, "oom", ["conv"], train=", precision: auto" if auto else "")
    text = path.read_text()
    old = f"{setting}: {8 if setting == 'profile_batch_size' else 32},"
    assert old in text
    path.write_text(text.replace(old, f"{setting}: 100000000000,"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(AblateError) as stopped:
        run_study(load_study(path), uri)
    msg = str(stopped.value)
    assert "\n" not in msg and str(path) in msg and "ran out of memory" in msg
    assert f": train.{setting}: " in msg and "at batch 100000000000" in msg
    assert msg.endswith(f"lower train.{setting}")
    assert load_runs("oom", uri).empty  # no trial ran


def test_a_profile_that_fails_otherwise_stops_the_run_and_a_rerun_resumes(ray_session, tmp_path,
                                                                         monkeypatch):
    """Any other failure of a profile (here one raised by the test hook inside the real Ray
    task, as a bug would be) stops the run before any trial, in one line that names the study
    file, the architecture and the cause, with exit code 1 (not the study file's fault),
    leaving no run behind; the next run profiles and runs its trial."""
    from typer.testing import CliRunner

    from ablate.cli import app

    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"profile": {"times": 1}}))
    monkeypatch.setenv("ABLATE_FAULT_FILE", str(faults))
    path = study_file(tmp_path, "pfail", ["pool"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", uri, "-q"])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith(f"{path}: the cost profile of mixer=pool failed")
    assert "RuntimeError: injected fault in a cost profile" in lines[0]
    assert load_runs("pfail", uri).empty and profile_runs(uri) == []  # no trial, no profile
    assert json.loads(faults.read_text())["profile"]["times"] == 0  # it did run the task
    res = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", uri, "-q"])
    assert res.exit_code == 0, res.output
    trials = load_runs("pfail", uri)
    assert len(trials) == 1 and set(trials["status"]) == {"finished"}
    assert len(profile_runs(uri)) == 1


def test_a_compile_that_fails_fails_its_trials_not_the_study(tmp_path):
    """No working C++ compiler on the node: the compiled architecture's profile fails, the
    run says so in one line (no traceback) and goes on; the compiled trial fails with the
    one-line fix, the eager one finishes with its profile's costs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = study_file(tmp_path, "nocxx", ["conv"], train=", compile: false")
    path.write_text(path.read_text().replace(
        "factors:\n", "factors:\n  train.compile: [false, true]\n"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"),
           "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # a cached kernel would need no compiler
    exe = Path(sys.executable).with_name("ablate")
    res = subprocess.run([str(exe), "run", str(path), "--tracking-uri", uri, "-q"], env=env,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    # the failed trial's traceback is Ray Tune's, as for any failed trial; the profile's none
    assert "profiling.py" not in out, out[-3000:]
    failed = [line for line in out.splitlines() if "profile of" in line and "failed" in line]
    assert len(failed) == 1 and "compile=True" in failed[0], out[-3000:]
    assert failed[0].count("set train.compile: false") == 1, failed[0]  # not wrapped twice
    assert "its trials run without" in failed[0]
    df = load_runs("nocxx", uri)
    assert len(df) == 2, df
    by = {str(v).lower(): r for v, r in zip(df["factor.train.compile"], df.itertuples(),
                                             strict=True)}
    eager, comp = by["false"]._asdict(), by["true"]._asdict()
    assert eager["status"] == "finished" and eager["train_img_s"] > 0
    assert comp["status"] == "failed" and "set train.compile: false" in comp["error"]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("nocxx")
    profiles = c.search_runs([exp.experiment_id], "tags.`ablate.phase` = 'profile'")
    assert len(profiles) == 1 and "compile" not in profiles[0].data.params



def test_a_grid_starts_its_longest_trials_first_by_their_profiles(tmp_path):
    """Hand-computed lengths (images to train on / profiled img/s): conv 2 epochs x 120
    images / 10 img/s = 24 s; mlp 2 x 120 / 40 = 6 s, at half the data 3 s; pool has no
    profile (its length unknown: it goes first). Ties keep the study's order (seeds stay
    together); without any profile the order is the study's."""
    from ablate.tune.order import longest_first

    path = study_file(tmp_path, "order", ["mlp", "pool", "conv"], seeds=[0, 1],
                      train=", epochs: 2")
    text = path.read_text().replace("factors:\n", "factors:\n  dataset.fraction: [0.5, 1.0]\n")
    trials = load_study(write(path, text.replace("epochs: 1, ", ""))).trials
    speed = {"conv": 10.0, "mlp": 40.0}
    prof = {t.trial_id: {"metrics": {"train_img_s": speed[t.model.mixer]}} for t in trials
            if t.model.mixer in speed}
    got = [(t.model.mixer, t.dataset.fraction, t.seed) for t in longest_first(trials, prof)]
    pool = [(m, f, s) for m, f, s in got if m == "pool"]
    assert got[:4] == pool and len(pool) == 4  # unknown first, in the study's order
    assert pool == [(m, f, s) for m, f, s in ((t.model.mixer, t.dataset.fraction, t.seed)
                                              for t in trials) if m == "pool"]
    assert got[4:] == [("conv", 1.0, 0), ("conv", 1.0, 1), ("conv", 0.5, 0), ("conv", 0.5, 1),
                       ("mlp", 1.0, 0), ("mlp", 1.0, 1), ("mlp", 0.5, 0), ("mlp", 0.5, 1)]
    assert longest_first(trials, {}) == trials
    # an image folder's size is not known before it is read: beside synthetic data its
    # trials' length is unknown (first); where every trial reads one, its size counts alike
    from types import SimpleNamespace

    def folder(t):
        return SimpleNamespace(trial_id=t.trial_id, train=t.train, model=t.model, seed=t.seed,
                               dataset=t.dataset.model_copy(update={"name": "imagefolder"}))

    conv_full = [t for t in trials if t.model.mixer == "conv" and t.dataset.fraction == 1.0]
    mixed = [folder(t) if t in conv_full else t for t in trials]
    got = [(t.model.mixer, t.dataset.fraction, t.seed) for t in longest_first(mixed, prof)]
    assert got[4:6] == [("conv", 1.0, 0), ("conv", 1.0, 1)] and got[6] == ("conv", 0.5, 0)
    assert [t.trial_id for t in longest_first([folder(t) for t in trials], prof)] == [
        t.trial_id for t in longest_first(trials, prof)]
    # under ASHA the order would change which trials are pruned: the study's own is kept
    from ablate.tune.order import start_order

    study = load_study(path)
    assert start_order(study, trials, prof) == longest_first(trials, prof) != trials
    asha = load_study(write(tmp_path / "asha.yaml", path.read_text() + "scheduler: {name: asha}\n"))
    assert start_order(asha, asha.trials, prof) == asha.trials


def test_a_study_wide_auto_precision_weighs_every_architectures_probe():
    """Hand-computed: two architectures, equal weight; conv trains 3x faster in bf16, mlp at
    0.8x. Alone, conv picks bf16 and mlp fp32; in total, fp32 costs 1/100 + 1/100 = 0.0200
    and bf16 1/300 + 1/80 = 0.0158 per unit, so the study trains both in bf16. With mlp's
    bf16 at 0.4x (1/300 + 1/40 = 0.0283) fp32 wins; fp32 stays unless another precision is
    at least 5% faster in total."""
    from ablate.tune.precision_plan import probe_speeds, study_precision

    conv = {"probe_img_s.fp32_contiguous": 100.0, "probe_img_s.fp32_channels_last": 90.0,
            "probe_img_s.bf16_contiguous": 250.0, "probe_img_s.bf16_channels_last": 300.0}
    mlp = {"probe_img_s.fp32_contiguous": 100.0, "probe_img_s.bf16_contiguous": 80.0}
    assert probe_speeds(conv) == {"fp32": (100.0, False), "bf16": (300.0, True)}
    precision, total = study_precision({"a": 1.0, "b": 1.0}, {"a": conv, "b": mlp})
    assert precision == "bf16"
    assert total["fp32"] == pytest.approx(0.02) and total["bf16"] == pytest.approx(1 / 300 + 1 / 80)
    slow = {**mlp, "probe_img_s.bf16_contiguous": 40.0}
    assert study_precision({"a": 1.0, "b": 1.0}, {"a": conv, "b": slow})[0] == "fp32"
    # weights count: three times the trials of conv tip it back to bf16 (3/300+1/40 = 0.035
    # against 3/100+1/100 = 0.04)
    assert study_precision({"a": 3.0, "b": 1.0}, {"a": conv, "b": slow})[0] == "bf16"
    even = {"probe_img_s.fp32_contiguous": 100.0, "probe_img_s.bf16_contiguous": 104.0}
    assert study_precision({"a": 1.0}, {"a": even})[0] == "fp32"  # 4% faster: within noise
    clear = {**even, "probe_img_s.bf16_contiguous": 106.0}
    assert study_precision({"a": 1.0}, {"a": clear})[0] == "bf16"
    # a precision one architecture was not probed at is not a candidate; no probe: no plan
    fp32_only = {"probe_img_s.fp32_contiguous": 50.0}
    assert study_precision({"a": 1.0, "b": 1.0}, {"a": conv, "b": fp32_only})[0] == "fp32"
    assert study_precision({"a": 1.0, "b": 1.0}, {"a": conv, "b": {}}) is None


def test_a_resumed_study_goes_on_at_the_precision_its_finished_trials_trained_at(tmp_path):
    """With mlp's bf16 at 0.4x, fp32 is the study's precision in total (the unit test above),
    and conv is to be profiled again at fp32; but if the study's finished trials trained at
    bf16 (it began with conv alone, say), it goes on at bf16 and mlp is the one to redo."""
    from rich.console import Console

    from ablate.tune.precision_plan import plan_study_precision
    from ablate.tune.profiling import arch_config, arch_key

    study = load_study(study_file(tmp_path, "resume", ["conv", "mlp"], seeds=[0],
                                  train=", precision: auto"))
    probe = {"conv": {"probe_img_s.fp32_contiguous": 100.0, "probe_img_s.bf16_contiguous": 300.0},
             "mlp": {"probe_img_s.fp32_contiguous": 100.0, "probe_img_s.bf16_contiguous": 40.0}}
    keys, by_trial, found = {}, {}, {}
    for t in study.trials:
        mixer = t.factors["model.mixer"]
        config = arch_config(t, (16, 3, 10), "cpu", 1)
        keys[mixer] = (config, t)
        by_trial[t.trial_id] = mixer
        found[mixer] = {"precision": "bf16" if mixer == "conv" else "fp32",
                        "channels_last": False, "probe": probe[mixer]}
    quiet = Console(quiet=True)
    fresh = plan_study_precision(study, study.trials, keys, by_trial, found, quiet)
    assert set(fresh) == {"conv"} and fresh["conv"][2].train.precision == "fp32"
    resumed = plan_study_precision(study, study.trials, keys, by_trial, found, quiet,
                                   trained={"bf16"})
    assert set(resumed) == {"mlp"} and resumed["mlp"][2].train.precision == "bf16"
    assert resumed["mlp"][0] == arch_key(resumed["mlp"][1])
    # a fixed setting: the key any study asking for bf16 (at this batch) would profile under
    assert resumed["mlp"][1] == {**keys["mlp"][0], "precision": "bf16"}


def test_the_study_precision_weighs_each_architecture_by_the_images_it_trains_on(tmp_path):
    """conv trains on 40x the images of mlp (its trials read a larger training set): bf16,
    3x conv's fp32 speed, makes the study faster in total even though it is 0.4x mlp's;
    weighed by epochs x fraction alone, the two count the same and fp32 would be kept."""
    from rich.console import Console

    from ablate.tune.precision_plan import plan_study_precision
    from ablate.tune.profiling import arch_config

    probe = {"conv": {"probe_img_s.fp32_contiguous": 100.0, "probe_img_s.bf16_contiguous": 300.0},
             "mlp": {"probe_img_s.fp32_contiguous": 100.0, "probe_img_s.bf16_contiguous": 40.0}}
    trials, keys, by_trial, found = [], {}, {}, {}
    for mixer, size in (("conv", 4000), ("mlp", 100)):
        text = STUDY.replace("train_size: 120", f"train_size: {size}").format(
            name=f"w{mixer}", mixers=json.dumps([mixer]), seeds="[0, 1]",
            train=", precision: auto")
        study = load_study(write(tmp_path / f"w{mixer}.yaml", text))
        trials += study.trials
        keys[mixer] = (arch_config(study.trials[0], (16, 3, 10), "cpu", 1), study.trials[0])
        by_trial.update({t.trial_id: mixer for t in study.trials})
        found[mixer] = {"precision": "bf16" if mixer == "conv" else "fp32",
                        "channels_last": False, "probe": probe[mixer]}
    plan = plan_study_precision(study, trials, keys, by_trial, found, Console(quiet=True))
    assert set(plan) == {"mlp"} and plan["mlp"][2].train.precision == "bf16"


def _store_disagreeing_probes(uri, study) -> dict:
    """Stored auto profiles of `study`'s conv and mlp where conv alone picks bf16 (3x fp32)
    and mlp fp32 (bf16 at 0.8x); bf16 wins in total (the unit test above). Returns
    mixer -> (probe, own pick)."""
    probes = {"conv": ({"probe_img_s.fp32_contiguous": 100.0,
                        "probe_img_s.bf16_contiguous": 300.0}, "bf16"),
              "mlp": ({"probe_img_s.fp32_contiguous": 100.0,
                       "probe_img_s.bf16_contiguous": 80.0}, "fp32")}
    for mixer, (probe, own) in probes.items():
        trial = next(t for t in study.trials if t.factors["model.mixer"] == mixer)
        _stored_auto_profile(uri, study, trial, probe, own)
    return probes


def _stored_auto_profile(uri, study, trial, probe, precision):
    """A finished profile of `trial`'s auto key in the store, as a profile of this node would
    be logged, with the probe speeds given (so which precision each pick favours is known)."""
    import time

    from ablate.tracking import Tracker
    from ablate.tune.profile_store import identity, log_profile
    from ablate.tune.profiling import arch_config, arch_key

    config = arch_config(trial, (16, 3, 10), "cpu", 1)
    now = int(time.time() * 1000)
    res = {"metrics": {m: 1.0 for m in COST}, "precision": precision, "channels_last": False,
           "probe": probe, "probe_threads": 1, "start_ms": now - 10, "end_ms": now,
           **identity("cpu", 2)}  # the profile node: ray_session's 2 CPUs
    log_profile(Tracker(uri, "seeded"), study, arch_key(config), config, res, trial.cell_name)


def test_a_study_wide_auto_precision_trains_every_architecture_at_one(ray_session, tmp_path):
    """`precision: auto` (scope study, the default) with stored probes where conv alone would
    pick bf16 and mlp fp32 (the unit test above: bf16 wins in total): every trial trains at
    bf16, mlp is profiled again at bf16 (one new profile, taken alone) and its trials carry
    that profile; with `precision_scope: architecture` each keeps its own pick."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study(study_file(tmp_path, "wide", ["conv", "mlp"], seeds=[0, 1],
                                  train=", precision: auto"))
    probes = _store_disagreeing_probes(uri, study)
    # a study stopped after its conv trials: they trained at bf16 (conv alone picks it) ...
    first = load_study(study_file(tmp_path, "wide", ["conv"], seeds=[0, 1],
                                  train=", precision: auto"))
    assert run_study(first, uri).finished == 2
    # ... and resumed: mlp alone would pick fp32; the study goes on at one precision
    summary = run_study(study, uri)
    assert summary.finished == 2 and summary.skipped == 2
    profiles = profile_runs(uri)
    (again,) = [p for p in profiles if p.data.params["precision"] == "bf16"]
    assert again.data.params["model.mixer"] == "mlp"
    assert again.data.params["train.precision_resolved"] == "bf16"
    c = MlflowClient(uri)
    trials = load_runs("wide", uri)
    for _, t in trials.iterrows():
        run = c.get_run(t["run_id"])
        assert run.data.params["train.precision_resolved"] == "bf16", t["factor.model.mixer"]
        if t["factor.model.mixer"] == "mlp":  # the profile taken at the study's precision
            assert run.data.tags["ablate.profile_run_id"] == again.info.run_id
            assert run.data.metrics["train_img_s"] == pytest.approx(
                again.data.metrics["train_img_s"])
            t0 = t["start_time"].value // 10**6
            assert again.info.end_time <= t0  # taken before its trials, alone
    # the same stored probes, each architecture on its own: no new profile, mixed precisions
    per_arch = load_study(study_file(tmp_path, "own", ["conv", "mlp"], seeds=[0],
                                     train=", precision: auto, precision_scope: architecture"))
    assert run_study(per_arch, uri).finished == 2
    assert len(profile_runs(uri)) == len(profiles)
    for _, t in load_runs("own", uri).iterrows():
        params = c.get_run(t["run_id"]).data.params
        assert params["train.precision_resolved"] == probes[t["factor.model.mixer"]][1]
    # a search over the same two architectures decides the same way: its trials look their
    # profile up by their own (auto) key and find mlp's at bf16; nothing new is profiled
    text = (SEARCH.replace("STORAGE", str(tmp_path / "optuna.db"))
            .replace("warmup_epochs: 0.2}", "warmup_epochs: 0.2, precision: auto}")
            .replace("n_trials: 4", "n_trials: 3"))
    search_study = load_study(write(tmp_path / "psearch.yaml", text))
    assert run_study(search_study, uri).finished == 3
    assert len(profile_runs(uri)) == len(profiles)
    runs = load_runs("psearch", uri)
    assert len(runs) == 6
    for _, t in runs.iterrows():
        run = c.get_run(t["run_id"])
        assert run.data.params["train.precision_resolved"] == "bf16"
        if t["factor.model.mixer"] == "mlp":
            assert run.data.tags["ablate.profile_run_id"] == again.info.run_id
    # whichever mixers the sampler drew: the lookup every search trial makes finds mlp's
    # profile at bf16 under mlp's own key
    from rich.console import Console

    from ablate.tracking import Tracker
    from ablate.tune.driver import _search_profiles
    from ablate.tune.profiling import lookup_for, search_architectures

    ctx = {**_search_profiles(search_study, Tracker(uri, "lookup"), Console(quiet=True), None),
           "cpus": 1}
    lookup = lookup_for(ctx)
    found = {t.factors["model.mixer"]: lookup(t) for t in search_architectures(search_study)}
    assert found["mlp"]["precision"] == "bf16" and found["conv"]["precision"] == "bf16"
    assert found["mlp"]["run_id"] == again.info.run_id
    assert found["mlp"]["arch_key"] == again.data.tags["ablate.arch_key"]


def test_tuning_levels_search_at_the_study_precision(ray_session, tmp_path):
    """Equal tuning with `precision: auto`: each level (here one mixer) would pick its own
    precision; the study's one precision is decided before the levels from the grid's
    architectures (stored probes: conv alone bf16, mlp alone fp32, bf16 in total), and every
    tuning trial and every grid trial trains at it."""
    from tests.test_tuning import STUDY as TUNED

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = TUNED.format(storage=tmp_path / "optuna.db").replace(
        "warmup_epochs: 0.2}", "warmup_epochs: 0.2, precision: auto}").replace(
        "n_trials: 3", "n_trials: 2")
    study = load_study(write(tmp_path / "tuned.yaml", text))
    _store_disagreeing_probes(uri, study)
    assert run_study(study, uri).finished == 2
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(study.experiment).experiment_id
    tuning = c.search_runs([exp], filter_string="tags.`ablate.phase` = 'tune'")
    assert {r.data.params["model.mixer"] for r in tuning} == {"conv", "mlp"}
    for r in tuning:  # searched at the study's precision, whichever level
        assert r.data.params["train.precision"] == "bf16", r.data.params["model.mixer"]
    for _, t in load_runs(study.spec.name, uri).iterrows():
        assert c.get_run(t["run_id"]).data.params["train.precision_resolved"] == "bf16"
    # mlp's profile at bf16 was measured once: the level's search and the grid reused it
    mlp_bf16 = [p for p in profile_runs(uri) if p.data.params["model.mixer"] == "mlp"
                and p.data.params["precision"] == "bf16" and "channels_last" in p.data.params
                and p.data.params["channels_last"] == "False"]
    assert len(mlp_bf16) == 1


def test_a_resumed_search_cell_takes_todays_profile_for_seeds_an_older_ablate_stored(tmp_path):
    """A search cell resumed across the change keeps seed 0's stored final metrics, whose
    profile costs an older ablate timed at the node's threads and profile batch (no
    profile_train_batch_size): the cell's mean, what Optuna is told, takes today's profile
    for every seed, and seed 0's alone time from what it trained on at today's speed."""
    import torch

    from ablate import search
    from ablate.study import trials_for
    from ablate.tune.profiling import arch_config, arch_key
    from ablate.tune.trainable import train_cell

    study = load_study(write(tmp_path / "s.yaml", SEARCH.replace("STORAGE", str(tmp_path))))
    spec = study.spec
    sections = {s: getattr(spec, s).model_dump(mode="json") for s in ("dataset", "model", "train")}
    keys = list(search.full_space(spec))
    values = {"model.mixer": "mlp", "train.lr": 1e-3}
    old, new = trials_for(sections, values, spec.seeds, keys)
    profile = {"train_img_s": 30.0, "gmacs": 0.5, "peak_mem_mb": 7.0,
               "profile_train_batch_size": 32.0}
    ctx = {"root": None, "cpus": 1, "gpus": 0, "profile": True, "device_type": "cpu",
           "arch_keys": {arch_key(arch_config(new, (16, 3, 10), "cpu", 1)): {
               "metrics": profile, "precision": "fp32", "channels_last": False,
               "run_id": "r"}}}
    stored = {"val_acc": 0.5, "test_acc": 0.5, "train_images_seen": 96.0, "gmacs": 0.5,
              "train_img_s": 999.0, "peak_mem_mb": 1.0, "train_time_alone_s": 0.1}
    config = {"context": ctx, **values,
              "search": {"sections": sections, "seeds": list(spec.seeds), "keys": keys,
                         "done": {old.trial_id: stored}}}
    reports: list = []
    threads = torch.get_num_threads()
    try:
        train_cell(config, reports.append)
    finally:
        torch.set_num_threads(threads)
    final = reports[-1]
    seen = json.loads(final["per_seed"])[new.trial_id]["train_images_seen"]
    assert final["train_img_s"] == 30.0 and final["peak_mem_mb"] == 7.0  # not 999 / 1 mixed
    assert final["train_time_alone_s"] == pytest.approx((96.0 / 30.0 + seen / 30.0) / 2)
