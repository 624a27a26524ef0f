"""A new SQLite store starts as a copy of an empty store of MLflow's own schema."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing

from mlflow import MlflowClient

from ablate.tracking.store import Tracker, _template_path, client


def _schema(path) -> list[tuple]:
    """Every table, index and their columns and constraints (as sets: two runs of MLflow's
    own migrations order a table's constraints differently), and the schema's revision."""
    with closing(sqlite3.connect(path)) as con:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        version = con.execute("SELECT * FROM alembic_version").fetchall()
    return [(kind, name, frozenset(ln.strip().rstrip(",") for ln in (sql or "").splitlines()))
            for kind, name, sql in rows] + version


def test_a_new_store_is_a_copy_of_mlflows_schema_with_its_own_default_experiment(
        tmp_path, monkeypatch):
    """The copy has exactly the schema MLflow migrates a new file to; its default experiment
    is made by MLflow when the copy is opened (this store's time); the copy is used (a mark
    put in the template shows up in the next store); a store that exists is never replaced;
    a damaged template is made again."""
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "ca#che?%"))  # SQLite URI characters
    plain = tmp_path / "plain.db"
    MlflowClient(tracking_uri=f"sqlite:///{plain}").search_experiments()  # MLflow's own
    start_ms = time.time() * 1000
    client(f"sqlite:///{tmp_path / 'a.db'}")
    template = _template_path()
    assert template.parent == tmp_path / "ca#che?%" and template.exists()
    with closing(sqlite3.connect(template)) as con:  # MLflow gives each copy its default
        assert con.execute("SELECT count(*) FROM experiments").fetchone()[0] == 0
    assert _schema(tmp_path / "a.db") == _schema(plain)
    ours = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'a.db'}")
    [default] = ours.search_experiments()
    [theirs] = MlflowClient(tracking_uri=f"sqlite:///{plain}").search_experiments()
    assert (default.experiment_id, default.name, default.artifact_location) == (
        theirs.experiment_id, theirs.name, theirs.artifact_location)
    assert default.creation_time >= start_ms - 1000  # made now, not when the template was
    assert Tracker(f"sqlite:///{tmp_path / 'a.db'}", "study").experiment_id == "1"

    with closing(sqlite3.connect(template)) as con:  # mark the template
        con.execute("CREATE TABLE ablate_mark (x INTEGER)")
        con.commit()
    client(f"sqlite:///{tmp_path / 'b.db'}")
    assert "ablate_mark" in {r[1] for r in _schema(tmp_path / "b.db") if len(r) == 3}
    # a store that exists is opened as it is: its study is still there
    client(f"sqlite:///{tmp_path / 'a.db'}")
    assert ours.get_experiment_by_name("study") is not None
    assert "ablate_mark" not in {r[1] for r in _schema(tmp_path / "a.db") if len(r) == 3}

    template.write_bytes(b"not a database")  # damaged: made again, and used
    client(f"sqlite:///{tmp_path / 'c.db'}")
    assert _schema(tmp_path / "c.db") == _schema(plain) == _schema(template)
    with closing(sqlite3.connect(template)) as con:
        con.execute("UPDATE alembic_version SET version_num = 'an-older-one'")
        con.commit()
    client(f"sqlite:///{tmp_path / 'd.db'}")  # stale: made again at MLflow's revision
    assert _schema(tmp_path / "d.db") == _schema(plain) == _schema(template)
    with closing(sqlite3.connect(template)) as con:
        con.execute("CREATE TABLE ablate_mark (x INTEGER)")
        con.commit()
    client(f"sqlite:///{tmp_path / 'new' / 'e.db'}")  # a folder that does not exist yet
    assert "ablate_mark" in {r[1] for r in _schema(tmp_path / "new" / "e.db") if len(r) == 3}
    assert not list(tmp_path.glob(".*.tmp")) and not list(template.parent.glob(".*.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()  # nothing left beside (WAL aside)
                  if not p.name.endswith(("-wal", "-shm"))) == sorted(
        [".a.db.lock", ".b.db.lock", ".c.db.lock", ".d.db.lock", "a.db", "b.db", "c.db", "d.db",
         "ca#che?%", "new", "plain.db"])


def test_a_cache_that_cannot_be_written_leaves_new_stores_to_mlflow(tmp_path, monkeypatch):
    """No template can be made (the cache's folder would be inside a file): the new store is
    MLflow's own migrated file, and the process does not try the template again."""
    from ablate.tracking import store

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "a-file" / "cache"))
    plain = tmp_path / "plain.db"
    MlflowClient(tracking_uri=f"sqlite:///{plain}").search_experiments()
    c = client(f"sqlite:///{tmp_path / 'a.db'}")
    assert [e.name for e in c.search_experiments()] == ["Default"]
    assert _schema(tmp_path / "a.db") == _schema(plain)
    assert store._template_failed and not _template_path().exists()
    assert not list(tmp_path.glob(".*.tmp"))
