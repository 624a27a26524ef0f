"""`--set KEY=VALUE` on validate/plan/run, `--max-concurrent`, and the cluster-sized default
concurrency."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.errors import StudyError
from ablate.spec import ResourcesSpec
from ablate.study import load_study
from ablate.tune.driver import _concurrency
from tests.conftest import write
from tests.test_study import GOOD

runner = CliRunner()


def test_set_changes_the_trial_and_its_id_like_editing_the_file(tmp_path):
    base = write(tmp_path / "a.yaml", GOOD)
    edited = write(tmp_path / "b.yaml", GOOD.replace("epochs: 1", "epochs: 3"))
    over = load_study(base, ["train.epochs=3"])
    assert {t.train.epochs for t in over.trials} == {3}
    assert [t.trial_id for t in over.trials] == [t.trial_id for t in load_study(edited).trials]
    assert not {t.trial_id for t in over.trials} & {t.trial_id for t in load_study(base).trials}
    assert over.sets == ("train.epochs=3",) and over.path == base.resolve()


def test_set_dotted_factor_keys_and_yaml_lists(tmp_path):
    p = write(tmp_path / "s.yaml", GOOD)
    s = load_study(p, ["factors.model.mixer=[conv, pool, identity]", "seeds=[3]"])
    assert sorted({t.factors["model.mixer"] for t in s.trials}) == ["conv", "identity", "pool"]
    assert {t.seed for t in s.trials} == {3}
    # a later --set wins; a new factor key is added to the grid
    s2 = load_study(p, ["train.lr=0.1", "train.lr=0.01", "factors.model.depth=[1, 2]"])
    assert {t.train.lr for t in s2.trials} == {0.01}
    assert len(s2.trials) == 2 * 2 * 2


@pytest.mark.parametrize("item, needle", [
    ("train.epochs=0", "train.epochs"),
    ("train.epochz=3", "did you mean 'epochs'"),
    ("factors.model.mixr=[conv]", "model has no field 'mixr'"),
    ("noequals", "not KEY=VALUE"),
    ("train..lr=1", "not KEY=VALUE"),
    ("train.lr=[1, ", "not a YAML scalar"),
    ("seeds.x=1", "seeds is a list"),
])
def test_bad_set_is_one_line_error_naming_file_and_override(tmp_path, item, needle):
    p = write(tmp_path / "s.yaml", GOOD)
    with pytest.raises(StudyError) as e:
        load_study(p, [item])
    assert needle in str(e.value) and str(p) in str(e.value)
    res = runner.invoke(app, ["validate", str(p), "--set", item])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


def test_cli_validate_and_plan_take_set(tmp_path):
    p = write(tmp_path / "s.yaml", GOOD)
    res = runner.invoke(app, ["validate", str(p), "--set", "seeds=[0,1,2]"])
    assert res.exit_code == 0 and "6 trials" in res.output
    res = runner.invoke(app, ["plan", str(p), "--json", "--set", "train.epochs=2",
                              "--set", "factors.model.mixer=[conv]"])
    rows = json.loads(res.output)
    assert len(rows) == 2 and {r["config"]["train"]["epochs"] for r in rows} == {2}
    assert {r["factors"]["model.mixer"] for r in rows} == {"conv"}


def test_run_dry_run_takes_set_and_max_concurrent(tmp_path):
    p = write(tmp_path / "s.yaml", GOOD)
    uri = f"sqlite:///{tmp_path}/m.db"
    res = runner.invoke(app, ["run", str(p), "--dry-run", "--tracking-uri", uri,
                              "--set", "seeds=[0]", "--max-concurrent", "3"])
    assert res.exit_code == 0, res.output
    assert "2 to run" in res.output
    res = runner.invoke(app, ["run", str(p), "--dry-run", "--max-concurrent", "0"])
    assert res.exit_code == 2
    assert load_study(p, ["resources.max_concurrent=3"]).spec.resources.max_concurrent == 3


def test_default_concurrency_comes_from_the_cluster_not_the_driver():
    # 64 CPUs and 8 GPUs in the cluster: GPU trials are bounded by the GPUs
    assert _concurrency(ResourcesSpec(cpus_per_trial=2, gpus_per_trial=1),
                        {"CPU": 64.0, "GPU": 8.0}) == 8
    assert _concurrency(ResourcesSpec(cpus_per_trial=4), {"CPU": 64.0}) == 16
    assert _concurrency(ResourcesSpec(gpus_per_trial=0.5), {"CPU": 64.0, "GPU": 2.0}) == 4
    assert _concurrency(ResourcesSpec(gpus_per_trial=1), {"CPU": 64.0}) == 1  # at least one
    # as Ray packs fractions (in floats, 1 // 0.2 is 4.0 and 1 // 0.1 is 9.0)
    assert _concurrency(ResourcesSpec(gpus_per_trial=0.2), {"CPU": 64.0, "GPU": 1.0}) == 5
    assert _concurrency(ResourcesSpec(gpus_per_trial=0.1), {"CPU": 64.0, "GPU": 1.0}) == 10
    assert _concurrency(ResourcesSpec(cpus_per_trial=0.1), {"CPU": 1.0}) == 10
    assert _concurrency(ResourcesSpec(max_concurrent=5), {"CPU": 1.0}) == 5


@pytest.mark.slow
def test_default_concurrency_reads_a_real_ray_cluster():
    import os

    import ray

    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    cpus = (os.cpu_count() or 1) * 4  # a cluster bigger than this driver's machine
    ray.init(num_cpus=cpus, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        assert _concurrency(ResourcesSpec(cpus_per_trial=1)) == cpus
    finally:
        ray.shutdown()
