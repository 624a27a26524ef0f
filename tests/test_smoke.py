"""`ablate run STUDY --smoke`: every cell for one epoch in a throwaway store, failures listed."""

from __future__ import annotations

import json
import tempfile

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.study import load_study
from ablate.tune.smoke import SMOKE_TEST, SMOKE_TRAIN, smoke_sets
from tests.conftest import write

pytestmark = pytest.mark.slow

STUDY = """\
name: smoky
dataset: {name: synthetic, image_size: 16, train_size: 600, test_size: 300}
model: {dim: 16, depth: 1, heads: 2, patch_size: 4}
train: {epochs: 50, batch_size: 64, warmup_epochs: 0.2}
factors:
  model.mixer: [mlp, pool, identity]
seeds: [4, 5]
resources: {cpus_per_trial: 1, max_concurrent: 2}
"""


def test_smoke_runs_every_cell_once_lists_failures_and_leaves_nothing(tmp_path, monkeypatch):
    p = write(tmp_path / "s.yaml", STUDY)
    base = load_study(p)
    smoke = load_study(p, smoke_sets(base, tmp_path))
    assert len(smoke.trials) == 3 and {t.seed for t in smoke.trials} == {4}
    assert {(t.train.epochs, t.dataset.max_train, t.dataset.max_test) for t in smoke.trials} \
        == {(1, SMOKE_TRAIN, SMOKE_TEST)}
    ident = next(t.trial_id for t in smoke.trials if t.factors["model.mixer"] == "identity")
    fault = tmp_path / "faults.json"
    fault.write_text(json.dumps({ident: {"epoch": 1, "times": 99}}))
    monkeypatch.setenv("ABLATE_FAULT_FILE", str(fault))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real_store = tmp_path / "real.db"
    monkeypatch.setenv("ABLATE_TRACKING_URI", f"sqlite:///{real_store}")
    res = CliRunner().invoke(app, ["run", str(p), "--smoke"])
    assert res.exit_code == 1, res.output
    table = res.output.split("1 of 3 cells failed", 1)[1]
    assert "injected fault" in table
    assert "mixer=identity" in table and "mixer=mlp" not in table
    assert not real_store.exists()  # the user's store is never touched
    assert not list(tmp.glob("ablate-smoke-*"))  # the throwaway store is gone
    monkeypatch.delenv("ABLATE_FAULT_FILE")
    res = CliRunner().invoke(app, ["run", str(p), "--smoke"])
    assert res.exit_code == 0, res.output
    assert "all 3 cells ran" in res.output
