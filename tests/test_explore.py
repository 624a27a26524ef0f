"""Exploration views: parallel coordinates and metric vs a numeric param (pure compute), and
the dashboard's Explore tab on a real store."""

from __future__ import annotations

import json

import pytest

from ablate import analysis, plots
from tests.test_dashboard import VALS, app, fill_store

MEANS = {k: sum(v) / len(v) for k, v in VALS.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return fill_store(tmp_path_factory.mktemp("explore"))


def finished(uri: str):
    from ablate.tracking import load_runs

    df = load_runs("demo", uri, params=False)
    return df[df["status"] == "finished"]


def test_parallel_dims_one_line_per_configuration(store):
    dims, color = analysis.parallel_dims(finished(store), "val_acc")
    assert sorted(d["label"] for d in dims[:-1]) == ["dataset.fraction", "model.mixer"]
    by = {d["label"]: d for d in dims}
    mixer, frac, acc = by["model.mixer"], by["dataset.fraction"], dims[-1]
    assert acc["label"] == "val_acc" and "ticktext" not in frac  # numeric axis
    assert mixer["ticktext"] == ["attention", "conv"]  # categorical axis, ordered
    got = {(mixer["ticktext"][m], f, round(a, 9))
           for m, f, a in zip(mixer["values"], frac["values"], acc["values"], strict=True)}
    assert got == {(k[0], k[1], round(v, 9)) for k, v in MEANS.items()}
    assert color == acc["values"]
    fig = plots.parallel_figure(dims, color, "val_acc")
    assert fig.data[0].type == "parcoords" and len(fig.data[0].dimensions) == 3


def test_metric_vs_param_has_seed_means_and_cis(store):
    fin = finished(store)
    assert analysis.numeric_params(fin) == ["factor.dataset.fraction"]
    cells = analysis.metric_vs_param(fin, "val_acc", "factor.dataset.fraction")
    assert list(cells["x"]) == sorted(cells["x"]) and set(cells["x"]) == {0.5, 1.0}
    for _, r in cells.iterrows():
        assert r["mean"] == pytest.approx(MEANS[(r["factor.model.mixer"], r["x"])])
        assert r["n"] == 3 and r["ci_low"] <= r["mean"] <= r["ci_high"]
    fig = plots.metric_vs_param_figure(cells, "val_acc", "factor.dataset.fraction",
                                       "factor.model.mixer")
    assert {t.name for t in fig.data if t.showlegend is not False} == {"attention", "conv"}


def test_explore_tab_renders(store, monkeypatch):
    at = app(store, monkeypatch)
    at.sidebar.selectbox(key="study").set_value("demo").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Explore" in [t.label for t in at.tabs]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any(d.get("type") == "parcoords" for s in specs for d in s.get("data", []))
