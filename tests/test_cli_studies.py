"""`ablate studies`: the studies in a store, runs by status, last activity, best run."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ablate.cli import app
from ablate.study import load_study
from ablate.tune.status import store_studies
from tests.test_dashboard import VALS, fill_store

runner = CliRunner()


def test_studies_lists_counts_activity_and_best(tmp_path):
    uri = fill_store(tmp_path)
    rows = {r["study"]: r for r in store_studies(uri)}
    n_search = len(load_study(tmp_path / "search.yaml").trials)  # fill_store's search study
    assert set(rows) == {"demo", "allfailed", "nocost", "search"}
    assert rows["demo"]["counts"] == {"finished": 12, "failed": 1}
    assert rows["demo"]["best"]["val_acc"] == max(max(v) for v in VALS.values())
    assert rows["allfailed"]["counts"] == {"failed": 2} and rows["allfailed"]["best"] is None
    assert rows["nocost"]["runs"] == 4 and rows["nocost"]["best"]["val_acc"] == 0.5
    # newest activity first: the search study was written last, nocost before it
    assert [r["study"] for r in store_studies(uri)][:2] == ["search", "nocost"]
    res = runner.invoke(app, ["studies", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    for name in rows:
        assert name in res.output
    data = json.loads(runner.invoke(app, ["studies", "--json", "--tracking-uri", uri]).output)
    assert {d["study"]: d["runs"] for d in data} == {"demo": 13, "allfailed": 2, "nocost": 4,
                                                     "search": n_search}


def test_studies_on_an_empty_store_says_so_and_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    res = runner.invoke(app, ["studies", "--tracking-uri", uri])
    assert res.exit_code == 0 and "no studies" in res.output
    assert not (tmp_path / "none.db").exists()
