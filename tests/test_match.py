"""Equal compute (`model.match`): every cell brought to a cost target by its dim or depth."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.cost import profile
from ablate.errors import StudyError
from ablate.models import create_model
from ablate.study import load_study
from tests.conftest import write

STUDY = """\
name: m
dataset: {{name: synthetic, image_size: 32}}
model: {{depth: 4, match: {match}}}
factors:
  model.mixer: [attention, mlp, conv]
  model.patch_size: [2, 4]
{extra}seeds: [0, 1]
"""


def study(tmp_path, match: str, extra: str = ""):
    return load_study(write(tmp_path / "s.yaml", STUDY.format(match=match, extra=extra)))


def measured(trial) -> dict[str, float]:
    """The cell's cost from the profiler, on a real model with real weights."""
    args = trial.model.model_dump(exclude={"arch", "match"}, exclude_none=True)
    model = create_model("backbone", image_size=32, in_chans=3, num_classes=10, **args)
    p = profile(model, 32, num_classes=10, timing=False)
    return {"gmacs": p.gmacs, "params": p.params}


def test_three_mixers_two_patch_sizes_match_gmacs_within_tolerance(tmp_path):
    s = study(tmp_path, "{gmacs: 0.2, by: dim, tolerance: 0.1}")
    cells = {t.cell_id: t for t in s.trials}
    assert len(cells) == 6
    for t in cells.values():
        got = measured(t)["gmacs"]
        assert abs(got - 0.2) <= 0.1 * 0.2, (t.run_name, got)
        assert t.matched.cost == pytest.approx(got)
        assert t.config["model"]["dim"] == t.matched.value  # the matched dim is in the id
        if t.factors["model.mixer"] == "attention":
            heads = t.config["model"]["heads"]
            assert t.matched.value % (8 * heads) == 0
        else:
            assert t.matched.value % 8 == 0
    dims = {(t.factors["model.mixer"], t.factors["model.patch_size"]): t.matched.value
            for t in cells.values()}
    for mixer in ("attention", "mlp", "conv"):  # 4x the tokens: a narrower model
        assert dims[mixer, 2] < dims[mixer, 4]


def test_params_by_depth_is_even_for_dual(tmp_path):
    text = STUDY.format(match="{params: 1.0e+6, by: depth, tolerance: 0.1}", extra="").replace(
        "[attention, mlp, conv]", "[dual, mlp]").replace("depth: 4, ", "dim: 96, ")
    s = load_study(write(tmp_path / "s.yaml", text))
    for t in s.trials:
        assert abs(measured(t)["params"] - 1e6) <= 0.1 * 1e6
        if t.factors["model.mixer"] == "dual":
            assert t.matched.value % 2 == 0


def test_unreachable_target_fails_naming_cell_target_and_nearest(tmp_path):
    with pytest.raises(StudyError) as e:
        study(tmp_path, "{gmacs: 1.0e-5, tolerance: 0.05}")
    text = str(e.value)
    assert "model.mixer=attention, model.patch_size=2" in text
    assert "gmacs 1e-05" in text and "nearest reachable" in text


def test_match_as_a_factor_gives_two_budgets(tmp_path):
    s = study(tmp_path, "{gmacs: 0.1, tolerance: 0.1}", "  model.match.gmacs: [0.1, 0.4]\n")
    assert len({t.cell_id for t in s.trials}) == 12
    for t in s.trials:
        target = t.factors["model.match.gmacs"]
        assert abs(measured(t)["gmacs"] - target) <= 0.1 * target
        assert t.config["model"]["match"]["gmacs"] == target  # logged as a param


@pytest.mark.parametrize(("match", "extra", "path", "words"), [
    ("{flops: 0.1}", "", "model.match.flops", "unknown key"),
    ("{gmacs: 0.1, params: 1000}", "", "model.match", "exactly one cost key"),
    ("{gmacs: 0}", "", "model.match.gmacs", "must be > 0"),
    ("{gmacs: 0.1}", "  model.match.gmacs: [0.1, -1]\n", "model.match.gmacs[1]", "must be > 0"),
    ("{gmacs: 0.1, by: depth}", "  model.depth: [2, 4]\n", "factors.model.depth", "is a factor"),
    ("{gmacs: 0.1}", "  model.dim: [64, 128]\n", "factors.model.dim", "is a factor"),
])
def test_match_errors_name_the_field(tmp_path, match, extra, path, words):
    with pytest.raises(StudyError) as e:
        study(tmp_path, match, extra)
    assert path in str(e.value) and words in str(e.value)


def test_match_with_a_fixed_dim_fails(tmp_path):
    text = STUDY.format(match="{gmacs: 0.1}", extra="").replace("depth: 4,", "depth: 4, dim: 64,")
    with pytest.raises(StudyError, match="model.dim: is fixed at 64"):
        load_study(write(tmp_path / "s.yaml", text))


def test_plan_shows_matched_dim_and_cost(tmp_path):
    path = write(tmp_path / "s.yaml", STUDY.format(match="{gmacs: 0.2, tolerance: 0.1}",
                                                   extra=""))
    res = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert all(set(r["matched"]) == {"dim", "gmacs"} for r in rows)
    assert all(r["matched"]["dim"] == r["config"]["model"]["dim"] for r in rows)
    table = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "200"})
    assert "matched dim" in table.output and "matched gmacs" in table.output


def test_a_matched_trial_trains_at_its_matched_width():
    """The matched dim reaches the model the trial builds (and `match` itself does not)."""
    from ablate.data import load_dataset
    from ablate.study import validate_study
    from ablate.train import build_model, fit

    raw = {"name": "m", "dataset": {"name": "synthetic", "image_size": 16, "train_size": 100,
                                    "test_size": 20},
           "model": {"depth": 2, "patch_size": 4, "mixer": "mlp",
                     "match": {"gmacs": 0.002, "tolerance": 0.2}},
           "train": {"epochs": 1, "batch_size": 50}, "seeds": [0]}
    s = validate_study(raw, "inline.yaml")
    (trial,) = s.trials
    data = load_dataset(trial.dataset)
    model = build_model(trial, data.image_size, data.channels, data.num_classes)
    assert sum(p.numel() for p in model.parameters()) == measured_params(trial)
    final = fit(model, data, trial.train, trial.seed)
    assert 0.0 <= final["test_acc"] <= 1.0


def measured_params(trial) -> int:
    args = trial.model.model_dump(exclude={"arch", "match"}, exclude_none=True)
    assert args["dim"] % 8 == 0  # the matched dim, filled in by validation
    return profile(create_model("backbone", image_size=16, in_chans=3, num_classes=10, **args),
                   16, num_classes=10, timing=False).params
