"""`import ablate`: the Python API (load_study, run, load_runs, report, analysis), lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import ablate
from ablate.cli import app
from tests.conftest import ROOT, write
from tests.test_dashboard import VALS, fill_store


def test_import_ablate_is_light():
    code = ("import sys, ablate; ablate.load_study; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas', 'streamlit', "
            "'statsmodels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _no_date(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("- date:"))


def test_load_runs_analyse_report_like_the_cli(tmp_path):
    uri = fill_store(tmp_path)
    study = ablate.load_study(tmp_path / "demo.yaml")
    assert len(study.trials) == 16
    runs = ablate.load_runs(study, uri)
    assert len(runs) == 13 and runs.equals(ablate.load_runs(tmp_path / "demo.yaml", uri))
    assert len(ablate.load_runs("demo", uri)) == 13  # any experiment by name
    fin = runs[runs["status"] == "finished"]
    agg = ablate.aggregate(fin, "val_acc")
    best = agg.sort_values("mean", ascending=False).iloc[0]
    assert best["mean"] == pytest.approx(sum(VALS[("attention", 1.0)]) / 3)
    front = ablate.frontier(agg, "gmacs")
    assert len(front) >= 1 and front["mean"].max() == pytest.approx(best["mean"])
    a = ablate.analyse(runs, "val_acc", study.spec.grids())
    assert isinstance(a, ablate.Analysis) and a.verdict
    text = ablate.report(tmp_path / "demo.yaml", metric="val_acc", tracking_uri=uri)
    cli = CliRunner().invoke(app, ["report", str(tmp_path / "demo.yaml"), "--format", "md",
                                   "--metric", "val_acc", "--tracking-uri", uri])
    assert cli.exit_code == 0 and _no_date(text) == _no_date(cli.output)
    out = tmp_path / "r.html"
    html = ablate.report(study, metric="val_acc", fmt="html", output=out, tracking_uri=uri)
    assert out.read_text() == html and "<html" in html.lower()


@pytest.mark.slow
def test_run_a_study_file_with_overrides(tmp_path):
    p = write(tmp_path / "s.yaml", """\
name: api
dataset: {name: synthetic, image_size: 16, train_size: 120, test_size: 40}
model: {dim: 16, depth: 1, heads: 2, patch_size: 4}
train: {epochs: 3, batch_size: 32, profile_batch_size: 8, profile_seconds: 0.02}
factors: {model.mixer: [mlp]}
""")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    summary = ablate.run(p, tracking_uri=uri, sets=["train.epochs=1", "seeds=[0, 1]"],
                         max_concurrent=1)
    assert summary.finished == 2 and summary.failed == 0
    runs = ablate.load_runs(ablate.load_study(p, ["train.epochs=1", "seeds=[0, 1]"]), uri)
    assert set(runs["status"]) == {"finished"} and len(runs) == 2
