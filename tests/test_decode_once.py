"""A study loads and decodes its image folder once per node, not once per trial: trials that
start together wait for the one decode and read the on-disk cache. Its own Ray session: the
workers must see the decode log (ABLATE_DECODE_LOG) and the test's cache from their start."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ablate.study import load_study
from ablate.tune.driver import run_study
from tests.conftest import write
from tests.test_data import make_folder

pytestmark = pytest.mark.slow

STUDY = """\
name: {name}
dataset: {{name: imagefolder, root: {root}, val_fraction: 0.25}}
model: {{dim: 8, depth: 1, heads: 1, patch_size: 4}}
train: {{epochs: 1, batch_size: 8, eval_batch_size: 16, profile_batch_size: 4,
        profile_seconds: 0.02}}
factors:
  model.mixer: [conv, pool, identity]
  train.lr: [0.001, 0.002]
seeds: [0, 1]
resources: {{cpus_per_trial: 1, max_concurrent: 2}}
"""


@pytest.fixture(scope="module")
def decode_log(tmp_path_factory):
    import ray

    log = tmp_path_factory.mktemp("decodes") / "decodes.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ABLATE_DECODE_LOG", str(log))
        # the cache the autouse fixture gives the driver: workers and driver share it
        mp.setenv("ABLATE_CACHE", str(tmp_path_factory.getbasetemp() / "ablate-cache"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        yield log
        ray.shutdown()


@pytest.mark.parametrize("profile", [False, True])  # trials alone (racing); driver first
def test_a_twelve_trial_study_decodes_its_image_folder_once(decode_log, tmp_path, profile,
                                                           monkeypatch):
    monkeypatch.setenv("ABLATE_DECODE_LOG", str(decode_log))
    root = make_folder(tmp_path / "imgs", n_train=8, n_test=2)
    decode_log.unlink(missing_ok=True)
    study = replace(load_study(write(tmp_path / "s.yaml", STUDY.format(
        name=f"decodes{int(profile)}", root=root))), profile=profile)
    assert len(study.trials) == 12
    assert run_study(study, f"sqlite:///{tmp_path / 'mlflow.db'}").finished == 12
    assert len(decode_log.read_text().splitlines()) == 1, decode_log.read_text()
