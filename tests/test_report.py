"""`ablate report` on a real tiny study run through `ablate run` (real Ray, real MLflow), in
all three formats; its errors; a foreign MLflow experiment; the HTML in headless Chromium
with the network cut off."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ablate import render
from ablate.study import load_study
from ablate.tracking import Tracker, load_runs
from tests.conftest import ROOT, write

pytestmark = pytest.mark.slow

TINY = """\
name: tiny
dataset: {name: synthetic, image_size: 16, train_size: 200, test_size: 80}
model: {dim: 16, depth: 1, heads: 2, patch_size: 4, window_size: 2}
train: {epochs: 1, batch_size: 50, eval_batch_size: 128, profile_batch_size: 8,
        profile_seconds: 0.02, warmup_epochs: 0.2}
factors:
  model.mixer: [attention, conv]
  dataset.fraction: [0.5, 1.0]
seeds: [0, 1]
resources: {cpus_per_trial: 1, max_concurrent: 2}
"""


def ablate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ablate.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)


RUN_OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("report")
    path = write(tmp / "tiny.yaml", TINY)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    res = ablate("run", str(path), "--tracking-uri", uri, cwd=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    RUN_OUTPUT["stdout"] = res.stdout
    return path, uri


def test_run_ends_with_the_reports_verdict_and_a_cell_table(study, tmp_path):
    path, uri = study
    printed = RUN_OUTPUT["stdout"]
    js = ablate("report", str(path), "--tracking-uri", uri, "--format", "json", cwd=tmp_path)
    assert js.returncode == 0, js.stderr
    verdict = json.loads(js.stdout)["verdict"]
    assert verdict and all(f"- {s}" in printed for s in verdict)
    # the table: one line per cell, seed means of the finished runs, best first
    runs = load_runs("tiny", uri)
    means = runs.groupby("cell_id")["test_acc"].mean().sort_values(ascending=False)
    table = printed.split("best first):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    head = table[0].split()
    assert sorted(head[:2]) == ["dataset.fraction", "model.mixer"]
    assert head[2:4] == ["seeds", "test_acc"]
    shown = [float(line.split()[3]) for line in table[1:]]
    assert shown == pytest.approx(list(means), abs=5e-5)
    assert all(line.split()[2] == "2" and "[" in line for line in table[1:])
    assert f"ablate dashboard --tracking-uri {uri}" in printed
    # the report command it prints works as printed: the run's own store, named
    hint = printed.split("Full report: ", 1)[1].split("   |", 1)[0]
    assert hint.startswith("ablate report ") and f"--tracking-uri {uri}" in hint
    out = ablate(*shlex.split(hint)[1:], "--format", "json", cwd=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout)["verdict"] == verdict, out.stderr
    # the store from ABLATE_TRACKING_URI: found the same way again, not named in the hint
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ABLATE_TRACKING_URI": uri}
    st_env = subprocess.run([sys.executable, "-m", "ablate.cli", "status", str(path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert st_env.returncode == 0, st_env.stderr
    assert "Full report: ablate report " in st_env.stdout
    assert "--tracking-uri" not in st_env.stdout.split("Full report: ", 1)[1]
    # a store URI with a password: the hint names it without printing the password
    from ablate.report import run_summary

    text = run_summary(path, uri, named_uri="postgresql://ablate:pa/ss@db:5432/mlflow")
    assert "pa/ss" not in text and "***" not in text
    assert "ablate report " in text and " --tracking-uri URI   |" in text
    assert text.rstrip().endswith("its password is not printed)")
    from ablate.errors import mask_url  # a password runs to the first @, as SQLAlchemy reads it

    assert mask_url("postgresql://u:pa/ss@h/db") == "postgresql://u:***@h/db"
    assert mask_url("http://127.0.0.1:5000/api") == "http://127.0.0.1:5000/api"
    # a finished study's status prints the same table
    st = ablate("status", str(path), "--tracking-uri", uri, cwd=tmp_path)
    assert st.returncode == 0 and "\n".join(table) in st.stdout


def test_one_seed_says_why_there_is_no_verdict_and_quiet_prints_none(tmp_path):
    path = write(tmp_path / "one.yaml", TINY.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "dataset.fraction: [0.5, 1.0]", "dataset.fraction: [1.0]"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    quiet = ablate("run", str(path), "--tracking-uri", uri, "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "verdict" not in quiet.stdout.lower() and "seed means" not in quiet.stdout.lower()
    again = ablate("run", str(path), "--tracking-uri", uri, cwd=tmp_path)  # nothing to run
    assert again.returncode == 0, again.stderr
    assert "No verdict: 1 seed per cell; a claim needs at least 2 seeds" in again.stdout
    assert "n/a (1 seed)" in again.stdout


def test_report_in_three_formats(study, tmp_path):
    path, uri = study
    runs = load_runs("tiny", uri)
    assert len(runs) == 8 and set(runs["status"]) == {"finished"}
    res = ablate("report", str(path), "--tracking-uri", uri, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "report-tiny.html").read_text()
    assert "Attention:" in page and "Grid 0" in page and "Provenance" in page
    # Plotly's JS inlined: no script loaded from anywhere (the Chromium test cuts the network)
    assert "<script src" not in page and "plotly-latest" not in page
    assert page.count("Plotly.newPlot") >= 4
    md = ablate("report", str(path), "--tracking-uri", uri, "--format", "md", cwd=tmp_path)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("## Verdict: tiny (test_acc)")
    assert "| model.mixer |" in md.stdout and "- Attention:" in md.stdout
    out = tmp_path / "r.json"
    js = ablate("report", str(path), "--tracking-uri", uri, "--format", "json", "-o", str(out),
                cwd=tmp_path)
    assert js.returncode == 0, js.stderr
    data = json.loads(out.read_text())
    assert data["metric"] == "test_acc" and data["n_runs"] == 8
    (grid,) = data["grids"]
    mixer = grid["factors"]["model.mixer"]
    for k in ("share", "share_ci", "omega2", "p_value", "levels"):
        assert k in mixer
    assert 0 <= mixer["share_ci"][0] <= mixer["share_ci"][1] <= 1
    # balanced 2 x 2 x 2 seeds: a level's marginal mean is the mean of its runs
    for level in ("attention", "conv"):
        want = runs.loc[runs["factor.model.mixer"] == level, "test_acc"].mean()
        assert mixer["levels"][level]["mean"] == pytest.approx(want)
    assert "model.mixer x dataset.fraction" in grid["interactions"]
    assert len(data["verdict"]) == 5 and data["verdict"][0].startswith("Attention:")
    # TINY varies the data fraction under the default epochs budget: the verdict says so
    assert data["verdict"][-1].startswith("Budget:") and "confounded" in data["verdict"][-1]
    assert data["provenance"]["study_file_hash"] == load_study(path).file_hash


def test_report_errors_exit_2_and_write_nothing(study, tmp_path):
    path, uri = study
    cases = [
        ["report", str(tmp_path / "missing.yaml"), "--tracking-uri", uri],
        ["report", str(path), "--tracking-uri", uri, "--metric", "nope_acc"],
        ["report", "--experiment", "no-such", "--factor", "x", "--tracking-uri", uri],
        ["report", "--experiment", "tiny", "--factor", "model.dim", "--tracking-uri", uri],
        ["report", str(path), "--tracking-uri", uri, "--format", "pdf"],
        ["report", "--tracking-uri", uri],
    ]
    for args in cases:
        res = ablate(*args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            res.stderr
        assert list(tmp_path.iterdir()) == [], args
    assert "one level" in ablate(*cases[3], cwd=tmp_path).stderr
    assert "no run has it" in ablate(*cases[1], cwd=tmp_path).stderr


def test_no_finished_runs_is_an_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write(tmp_path / "s" / "failed.yaml", TINY.replace("name: tiny", "name: failed"))
    s = load_study(path)
    tr = Tracker(uri, "failed")
    for t in s.trials:
        rid = tr.start_run(t, s)
        tr.end_run(rid, "failed")
    out = tmp_path / "out"
    out.mkdir()
    res = ablate("report", str(path), "--tracking-uri", uri, cwd=out)
    assert res.returncode == 2 and "no finished runs" in res.stderr
    assert list(out.iterdir()) == []


def test_foreign_experiment_by_its_params(tmp_path):
    """A sweep another tool logged: params lr, opt, seed and a metric `acc`."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("sweep")
    rng = np.random.default_rng(0)
    for lr in ("0.1", "0.01"):
        for opt in ("sgd", "adam"):
            for seed in range(3):
                r = c.create_run(exp)
                for k, v in (("lr", lr), ("opt", opt), ("seed", str(seed))):
                    c.log_param(r.info.run_id, k, v)
                acc = 0.7 + (0.1 if opt == "adam" else 0.0) + 0.005 * rng.standard_normal()
                c.log_metric(r.info.run_id, "acc", acc)
                c.set_terminated(r.info.run_id, "FINISHED")
    res = ablate("report", "--experiment", "sweep", "--factor", "lr", "--factor", "opt",
                 "--seed-key", "seed", "--metric", "acc", "--format", "json",
                 "--tracking-uri", uri, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    (grid,) = data["grids"]
    assert set(grid["factors"]) == {"lr", "opt"} and grid["balanced"]
    assert grid["factors"]["opt"]["share"] > 0.9
    assert data["verdict"][0].startswith("opt:") and "inconclusive" not in data["verdict"][0]
    assert data["verdict"][1].startswith("lr: inconclusive")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_renders_offline_in_chromium(study, tmp_path):
    from playwright.sync_api import sync_playwright

    path, uri = study
    res = ablate("report", str(path), "--tracking-uri", uri, "-o", str(tmp_path / "r.html"),
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        ctx = browser.new_context(offline=True, viewport={"width": 1300, "height": 1000})
        page = ctx.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto((tmp_path / "r.html").as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
        n_plots = page.locator(".js-plotly-plot").count()
        n_drawn = page.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg').length")
        points = page.locator(".js-plotly-plot .point").count()
        assert "Verdict" in page.inner_text("body")
        # one frontier per cost metric the runs have, each drawn with its points
        frontiers = page.evaluate("""() => [...document.querySelectorAll('h3')]
            .filter(h => h.textContent.startsWith('Accuracy vs'))
            .map(h => [h.textContent,
                       h.nextElementSibling.querySelectorAll('.main-svg').length,
                       h.nextElementSibling.querySelectorAll('.point').length])""")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert n_plots >= 4 and n_drawn >= n_plots and points > 0
    runs = load_runs("tiny", uri)
    # every trial of the tiny study has a profile, so its training time alone on the profile
    # node has a frontier too, beside the measured one
    assert runs["train_time_alone_s"].notna().all() and runs["train_time_s"].notna().all()
    costs = ["gmacs", "params", "train_time_alone_s", "train_time_s"]
    assert [t for t, _, _ in frontiers] == [f"Accuracy vs {render.FRONTIER_TITLES[c]}"
                                            for c in costs]
    assert all(svg > 0 and pts >= 4 for _, svg, pts in frontiers), frontiers
    assert [u for u in requests if not u.startswith("file:")] == []
    out = ROOT / ".artifacts"
    out.mkdir(exist_ok=True)
    shutil.copy(shot, out / "report.png")
