"""The dashboard against a real MLflow store: AppTest on every tab, and a real browser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from ablate.study import load_study
from ablate.tracking import Tracker
from tests.conftest import ROOT, free_port, needs_service, wait_http, write

APP = str(ROOT / "ablate" / "dashboard" / "app.py")
VALS = {("attention", 0.5): [0.50, 0.52, 0.54], ("attention", 1.0): [0.80, 0.80, 0.80],
        ("conv", 0.5): [0.55, 0.55, 0.55], ("conv", 1.0): [0.70, 0.72, 0.74]}
DEMO = """\
name: demo
model: {dim: 16, depth: 2, heads: 2, patch_size: 4}
factors:
  model.mixer: [attention, conv]
  dataset.fraction: [0.5, 1.0]
seeds: [0, 1, 2, 3]
"""


def fill_store(tmp: Path) -> str:
    """Runs written through ablate's own Tracker: 12 finished (hand-set numbers), 1 failed;
    a study whose runs all failed; a study whose runs lack cost metrics."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    study = load_study(write(tmp / "demo.yaml", DEMO))
    tr = Tracker(uri, "demo")
    for t in study.trials:
        key = (t.factors["model.mixer"], t.factors["dataset.fraction"])
        if t.seed == 3:
            if key == ("conv", 1.0):
                rid = tr.start_run(t, study)
                tr.set_tags(rid, {"ablate.error": "diverged at epoch 2: training loss is nan"})
                tr.end_run(rid, "failed")
            continue
        acc = VALS[key][t.seed]
        rid = tr.start_run(t, study)
        for epoch in (1, 2):
            tr.log_metrics(rid, {"val_acc": acc * epoch / 2, "train_loss": 2.0 / epoch,
                                 "val_loss": 1.0, "lr": 1e-3, "epoch_time_s": 1.0}, step=epoch)
        gm = 2.0 if key[0] == "attention" else 1.0
        tr.log_metrics(rid, {"best_val_acc": acc, "test_acc": acc - 0.01, "gmacs": gm,
                             "params": 1000.0 * gm, "throughput_img_s": 300.0 / gm,
                             "latency_ms": gm, "train_time_s": 10.0, "train_img_s": 50.0,
                             "peak_mem_mb": 100.0}, step=2)
        if key[0] == "attention":  # profiled by today's ablate; conv's by an older one
            tr.log_metrics(rid, {"profile_train_batch_size": 64.0}, step=2)
        tr.end_run(rid, "finished")
    bad = load_study(write(tmp / "bad.yaml", DEMO.replace("name: demo", "name: allfailed")
                           .replace("seeds: [0, 1, 2, 3]", "seeds: [0]")))
    tb = Tracker(uri, "allfailed")
    for t in bad.trials[:2]:
        rid = tb.start_run(t, bad)
        tb.set_tags(rid, {"ablate.error": "RuntimeError: out of memory"})
        tb.end_run(rid, "failed")
    nm = load_study(write(tmp / "nm.yaml", DEMO.replace("name: demo", "name: nocost")
                          .replace("seeds: [0, 1, 2, 3]", "seeds: [0]")))
    tn = Tracker(uri, "nocost")
    for t in nm.trials:
        rid = tn.start_run(t, nm)
        tn.log_metrics(rid, {"val_acc": 0.5}, step=1)
        tn.end_run(rid, "finished")
    fill_search(tmp, uri)
    return uri


def fill_search(tmp: Path, uri: str) -> None:
    """A study whose runs came from an Optuna search: runs tagged with the Optuna study's
    name, its trials in an optuna.db beside the MLflow store (ablate's default layout), with
    train.lr planted as the parameter that matters."""
    import optuna

    from ablate.search import open_storage
    from tests.test_importance import _objective

    storage = open_storage(f"sqlite:///{tmp / 'optuna.db'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ost = optuna.create_study(study_name="search-abc", storage=storage, direction="maximize",
                              sampler=optuna.samplers.RandomSampler(seed=0))
    ost.optimize(_objective, n_trials=40)
    sr = load_study(write(tmp / "search.yaml", DEMO.replace("name: demo", "name: search")
                          .replace("seeds: [0, 1, 2, 3]", "seeds: [0]")))
    ts = Tracker(uri, "search")
    for i, t in enumerate(sr.trials):
        rid = ts.start_run(t, sr, {"optuna.study_name": "search-abc",
                                   "optuna.trial_number": str(i)})
        ts.log_metrics(rid, {"val_acc": 0.5 + 0.01 * i}, step=1)
        ts.end_run(rid, "finished")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return fill_store(tmp_path_factory.mktemp("dash"))


def app(uri: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("ABLATE_TRACKING_URI", uri)
    at = AppTest.from_file(APP, default_timeout=120)
    return at.run()


SIGNATURE = {"frontier_table": "std", "effect_sizes": "range", "runs_table": "run_id",
             "pairwise_table": "p_holm", "search_importance": "fanova",
             "grid_importance": "p_value", "compare_table": "values",
             "compare_costs": "b / a"}


def table(at: AppTest, key: str):
    """AppTest does not expose dataframe keys: find each table by a column only it has."""
    return next(d.value for d in at.dataframe if SIGNATURE[key] in d.value.columns)


def test_frontier_effects_runs_for_a_study(store, monkeypatch):
    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("demo").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "demo"
    front = table(at, "frontier_table")
    got = sorted(zip(front["model.mixer"], front["dataset.fraction"],
                     front["mean"].round(6), strict=True))
    assert got == [("attention", 1.0, 0.8), ("conv", 1.0, 0.72)]
    runs = table(at, "runs_table")
    assert len(runs) == 12 and set(runs["status"]) == {"finished"}
    sizes = table(at, "effect_sizes")
    assert sizes["factor"].tolist() == ["dataset.fraction", "model.mixer"]
    assert sizes["range"].iloc[0] == pytest.approx(0.76 - 0.535)
    assert any("1 runs left out of every average (1 failed)" in c.value for c in at.caption)
    # widgets: another metric, another cost, a factor filter, failed runs shown
    at.sidebar.selectbox(key="metric").set_value("test_acc").run()
    assert sorted(table(at, "frontier_table")["mean"].round(6)) == [0.71, 0.79]
    at.selectbox(key="cost").set_value("throughput_img_s").run()
    assert not at.exception
    assert not any("older ablate" in w.value for w in at.warning)
    # training speed timed by two ablates' profiles (the trials' setting and the node's)
    at.selectbox(key="cost").set_value("train_img_s").run()
    assert any("train_img_s from an older ablate's profile" in w.value for w in at.warning)
    at.selectbox(key="cost").set_value("throughput_img_s").run()
    at.sidebar.multiselect(key="filter.factor.model.mixer").set_value(["conv"]).run()
    assert table(at, "frontier_table")["model.mixer"].tolist() == ["conv"]
    at.sidebar.multiselect(key="status").set_value(["finished", "failed"]).run()
    runs = table(at, "runs_table")
    assert len(runs) == 7 and (runs["status"] == "failed").sum() == 1
    assert "diverged at epoch 2" in runs.loc[runs["status"] == "failed", "error"].iloc[0]
    assert not at.exception


def test_verdict_tab_first_with_sentences_pairwise_and_download(store, monkeypatch):
    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("demo").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.label for t in at.tabs][0] == "Verdict"
    # only finished runs by default: the failed run is not selected, pruned would not be
    assert at.sidebar.multiselect(key="status").value == ["finished"]
    text = " ".join(m.value for m in at.markdown)
    assert "- Attention:" in text and "- Data:" in text and "Largest interaction" in text
    pw = table(at, "pairwise_table")
    mixer = pw[pw["factor"] == "model.mixer"].iloc[0]
    # balanced 2x2 with 3 seeds: attention - conv = mean of their cell means' difference
    want = (0.52 + 0.80) / 2 - (0.55 + 0.72) / 2
    assert {mixer["a"], mixer["b"]} == {"attention", "conv"}
    assert abs(mixer["diff"]) == pytest.approx(want)
    assert mixer["ci_low"] <= mixer["diff"] <= mixer["ci_high"]
    buttons = at.get("download_button")
    assert any("report" in str(b.proto.label) for b in buttons)


def test_importance_tab_for_a_search_and_for_a_grid(store, monkeypatch):
    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("search").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.label for t in at.tabs][4] == "Importance"
    imp = table(at, "search_importance")
    for ev in ("fanova", "ped_anova"):  # the planted parameter ranks first for both
        assert imp.sort_values(ev, ascending=False)["param"].iloc[0] == "train.lr"
    at.sidebar.selectbox(key="study").set_value("demo").run()
    assert not at.exception
    grid = table(at, "grid_importance")
    assert {"model.mixer", "dataset.fraction"} <= set(grid["term"])
    pw = table(at, "pairwise_table")  # the Verdict tab's analysis, the same numbers
    assert grid["share"].between(0, 1).all() and len(pw)


def test_compare_tab_difference_with_welch_ci(store, monkeypatch):
    from scipy import stats

    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("demo").run()
    assert not at.exception, [e.value for e in at.exception]

    def pick(key: str, mixer: str, fraction: str) -> None:
        box = at.selectbox(key=key)
        i = next(i for i, o in enumerate(box.options)
                 if f"mixer={mixer}" in o and f"fraction={fraction}" in o)
        box.select_index(i).run()

    pick("cmp_a", "conv", "1")
    pick("cmp_b", "attention", "0.5")
    assert not at.exception, [e.value for e in at.exception]
    cmp = table(at, "compare_table").set_index("cell")
    a, b = VALS[("conv", 1.0)], VALS[("attention", 0.5)]
    assert cmp["seeds"].dropna().tolist() == [3, 3]  # the failed conv seed is no seed
    assert cmp.loc["A - B", "mean"] == pytest.approx(sum(a) / 3 - sum(b) / 3)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert cmp.loc["A - B", "values"] == f"95% CI [{ci.low:+.4f}, {ci.high:+.4f}]"
    assert any("Welch t interval over seeds" in c.value for c in at.caption)
    costs = table(at, "compare_costs").set_index("cost")
    assert costs.loc["gmacs", "b / a"] == pytest.approx(2.0)  # attention: 2 GMACs, conv 1
    # a cell of another study with the same factors: one seed there, so no interval
    at.selectbox(key="cmp_study_b").set_value("nocost").run()
    assert not at.exception, [e.value for e in at.exception]
    cmp = table(at, "compare_table").set_index("cell")
    assert "n/a" in cmp.loc["A - B", "values"]


def test_only_failed_runs_get_a_message(store, monkeypatch):
    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("allfailed").run()
    assert not at.exception
    at.sidebar.multiselect(key="status").set_value(["failed"]).run()
    warn = " ".join(w.value for w in at.warning)
    assert "No finished runs" in warn and "out of memory" in warn
    assert not at.exception


def test_filters_follow_the_sidebars_study(store, monkeypatch):
    """A study's status and level filters do not carry over to the next study picked: after
    `allfailed` (no finished run, one mixer), `demo` shows its finished runs of both mixers."""
    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("allfailed").run()
    at.sidebar.selectbox(key="study").set_value("demo").run()
    assert not at.exception
    assert at.sidebar.multiselect(key="status").value == ["finished"]
    assert at.sidebar.multiselect(key="filter.factor.model.mixer").value == ["attention",
                                                                            "conv"]
    assert not any("no runs with the chosen filters" in i.value for i in at.info)


def test_missing_cost_metrics_get_a_message(store, monkeypatch):
    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("nocost").run()
    assert not at.exception
    assert any("no cost metrics" in w.value for w in at.warning)


def test_an_edited_studys_older_configurations_stay_off_the_frontier(tmp_path, monkeypatch):
    """The study ran, was edited (its lr) and ran again: the same factor levels under new
    cell ids. Only the newest configurations make the frontier (as in the verdict's models),
    and the dashboard says how many runs it left out."""
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "edited")
    for lr, bonus in (("1.0e-3", 0.10), ("2.0e-3", 0.0)):  # the older one scored higher
        study = load_study(write(tmp_path / "edited.yaml", DEMO.replace("name: demo",
                                 f"name: edited\ntrain: {{lr: {lr}}}")))
        for t in study.trials:
            if t.seed == 3:
                continue
            acc = VALS[(t.factors["model.mixer"], t.factors["dataset.fraction"])][t.seed]
            rid = tr.start_run(t, study)
            tr.log_metrics(rid, {"val_acc": acc + bonus, "test_acc": acc + bonus,
                                 "gmacs": 2.0 if t.factors["model.mixer"] == "attention"
                                 else 1.0}, step=1)
            tr.end_run(rid, "finished")
        time.sleep(0.05)  # the second study's runs start later
    at = app(uri, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    front = table(at, "frontier_table")
    got = sorted(zip(front["model.mixer"], front["dataset.fraction"],
                     front["mean"].round(6), strict=True))
    assert got == [("attention", 1.0, 0.8), ("conv", 1.0, 0.72)]  # not 0.9 / 0.82
    assert any("12 finished runs of configurations the study file has since changed"
               in c.value for c in at.caption)


def test_empty_store_says_what_to_run(tmp_path, monkeypatch):
    at = app(f"sqlite:///{tmp_path / 'none.db'}", monkeypatch)
    assert not at.exception
    assert any("ablate run studies/quickstart.yaml" in i.value for i in at.info)
    assert not (tmp_path / "none.db").exists()  # looking does not create a store



CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
@needs_service(Path(CHROMIUM).exists(),
               "Debian's chromium (apt-get install -y chromium; .ci/run installs it)")
def test_real_browser_renders_the_frontier(store, tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    exe = Path(sys.executable).with_name("ablate")
    proc = subprocess.Popen([str(exe), "dashboard", "--tracking-uri", store, "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_stcore/health", proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/?study=demo")
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            page.wait_for_selector("text=share of the variance", timeout=60_000)
            assert page.locator("text=Attention:").count() >= 1
            page.get_by_role("tab", name="Frontier").click()
            page.wait_for_selector("text=Pareto frontier", timeout=30_000)
            page.get_by_role("tab", name="Compare").click()
            page.wait_for_selector("text=Welch t interval over seeds", timeout=30_000)
            assert page.locator("[data-testid='stException']").count() == 0
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        out = ROOT / ".artifacts"
        out.mkdir(exist_ok=True)
        shutil.copy(shot, out / "dashboard.png")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
