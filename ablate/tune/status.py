"""A study's status from its tracking store (and Optuna storage): no Ray needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ablate import search
from ablate.errors import mask_url
from ablate.study import Study
from ablate.tracking import DONE, load_runs, resolve_tracking_uri
from ablate.tracking.lease import without_orphans

RANK = ("finished", "pruned", "running", "failed", "killed")  # the status a trial shows


def status(study: Study, tracking_uri: str | None = None) -> dict[str, Any]:
    """Counts by status (trials with no run are 'pending') and the best finished trial."""
    uri = resolve_tracking_uri(tracking_uri, study.spec.tracking.uri)
    df = without_orphans(load_runs(study.experiment, uri, params=False), uri,
                         study.experiment)
    optuna_search = study.spec.search.method == "optuna"
    ids = ({t.trial_id for t in study.trials} if not optuna_search else
           set(df["trial_id"]) if not df.empty else set())
    counts = {s: 0 for s in (*RANK, "pending")}
    best = None
    if not df.empty:
        df = df[df["trial_id"].isin(ids)]
        rank = {s: i for i, s in enumerate(RANK)}
        df = df.assign(_r=df["status"].map(lambda s: rank.get(s, 9)))
        latest = df.sort_values(["_r", "start_time"], ascending=[True, False]).groupby(
            "trial_id").head(1)
        for s in latest["status"]:
            counts[s] = counts.get(s, 0) + 1
        fin = latest[latest["status"] == "finished"]
        if not fin.empty and "val_acc" in fin:
            b = fin.sort_values("val_acc", ascending=False).iloc[0]
            best = {"run_name": b["run_name"], "trial_id": b["trial_id"],
                    "val_acc": float(b["val_acc"]),
                    "test_acc": float(b["test_acc"]) if "test_acc" in b else None}
        counts["pending"] = len(ids) - len(latest)
    else:
        counts["pending"] = len(ids)
    info = {"study": study.spec.name, "tracking_uri": mask_url(uri), "trials": len(ids),
            "counts": counts, "best": best, "done": sum(counts[s] for s in DONE)}
    if optuna_search:
        info["optuna"] = search_status(study.spec)
    return info


def search_status(spec) -> dict[str, Any]:
    """Optuna trials by state and the Pareto set (or best trial), from the search's storage."""
    url = spec.search.storage or search.default_storage_url()
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return {"study_name": search.study_name(spec), "states": {}, "pareto": []}
    import optuna

    storage = search.open_storage(url)
    name = search.study_name(spec)
    try:
        st = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {"study_name": name, "states": {}, "pareto": []}
    states: dict[str, int] = {}
    for t in st.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return {"study_name": name, "n_trials": spec.search.n_trials, "states": states,
            "objectives": spec.search.objectives, "pareto": search.pareto_set(storage, name)}


def store_studies(uri: str, metric: str = "val_acc") -> list[dict[str, Any]]:
    """Every study in a store (newest activity first): runs by status, last activity and the
    finished run best on `metric`. A few queries per study, none per run."""
    from ablate.tracking import list_studies

    rows = []
    for name in list_studies(uri):
        df = without_orphans(load_runs(name, uri, params=False), uri, name)
        if df.empty:
            rows.append({"study": name, "runs": 0, "counts": {}, "last_activity": None,
                         "best": None})
            continue
        counts = {str(k): int(v) for k, v in df["status"].value_counts().items()}
        times = [df[c].max() for c in ("start_time", "end_time") if c in df]
        last = max((t for t in times if t is not None and t == t), default=None)
        fin = df[df["status"] == "finished"]
        best = None
        if metric in fin and fin[metric].notna().any():
            b = fin.loc[fin[metric].idxmax()]
            best = {"run_name": b["run_name"], "trial_id": b.get("trial_id"),
                    metric: float(b[metric])}
        rows.append({"study": name, "runs": len(df), "counts": counts,
                     "last_activity": last, "best": best})
    return sorted(rows, key=lambda r: r["last_activity"] or pd.Timestamp.min, reverse=True)
