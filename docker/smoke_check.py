"""Checks docker/smoke.sh makes against the running stack, from the host, through MLflow's client
and a headless Chromium. Each subcommand exits 0 when the check holds, 1 with a reason when not.

  smoke_check.py wait-epoch URI EXPERIMENT [--timeout S]
  smoke_check.py verify URI EXPERIMENT --trials N --epochs E --head-ip IP --worker-ips IP,IP
  smoke_check.py browse URL EXPERIMENT
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return client, runs


def _trial_runs(runs):
    """The runs of the study's trials (not profile or tuning runs)."""
    return [r for r in runs if "ablate.trial_id" in r.data.tags
            and r.data.tags.get("ablate.phase", "final") == "final"]


def wait_epoch(uri: str, experiment: str, timeout: float) -> int:
    """Wait until some trial has logged an epoch (the study is under way)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _, runs = _runs(uri, experiment)
        except Exception:  # noqa: BLE001 - the server may still be starting
            runs = []
        if any("epoch" in r.data.metrics for r in _trial_runs(runs)):
            return 0
        time.sleep(1)
    print(f"smoke_check: no trial of {experiment} logged an epoch within {timeout:.0f} s")
    return 1


def verify(uri: str, experiment: str, trials: int, epochs: int, head_ip: str,
           worker_ips: list[str]) -> int:
    client, runs = _runs(uri, experiment)
    runs = _trial_runs(runs)
    problems = []
    per_trial = Counter(r.data.tags["ablate.trial_id"] for r in runs)
    if len(per_trial) != trials:
        problems.append(f"{len(per_trial)} trials have a run, expected {trials}")
    twice = [t for t, n in per_trial.items() if n != 1]
    if twice:
        problems.append(f"trials with more than one run: {twice}")
    nodes, retried = Counter(), 0
    for r in runs:
        tid = r.data.tags["ablate.trial_id"]
        status = r.data.tags.get("ablate.status")
        if r.info.status != "FINISHED" or status != "finished":
            problems.append(f"trial {tid}: status {r.info.status}/{status}")
        for m in ("test_acc", "val_acc", "params", "gmacs"):
            if m not in r.data.metrics:
                problems.append(f"trial {tid}: no {m}")
        history = client.get_metric_history(r.info.run_id, "val_acc")
        if len({h.step for h in history}) < epochs:
            problems.append(f"trial {tid}: val_acc logged at {len(history)} steps, "
                            f"expected {epochs} (a write was lost)")
        node = r.data.tags.get("ablate.node_ip", "")
        nodes[node] += 1
        if node == head_ip or node not in worker_ips:
            problems.append(f"trial {tid} ran on {node or 'an unknown node'}, not on a worker "
                            f"({', '.join(worker_ips)})")
        retried += int(r.data.tags.get("ablate.attempts", "1")) > 1
    for p in problems:
        print(f"smoke_check: {p}")
    print(f"smoke_check: {len(runs)} trial runs, nodes {dict(nodes)}, {retried} retried")
    return 1 if problems else 0


def browse(url: str, experiment: str) -> int:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/?study={experiment}")
        page.wait_for_selector(".js-plotly-plot", timeout=120_000)
        errors = page.locator("[data-testid='stException']").count()
        shown = page.locator(f"text={experiment}").count()
        browser.close()
    if errors or not shown:
        print(f"smoke_check: dashboard at {url}: {errors} exceptions, study named {shown} times")
        return 1
    print(f"smoke_check: dashboard at {url} renders {experiment} with plots")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="smoke_check.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-epoch")
    w.add_argument("uri")
    w.add_argument("experiment")
    w.add_argument("--timeout", type=float, default=600)
    v = sub.add_parser("verify")
    v.add_argument("uri")
    v.add_argument("experiment")
    v.add_argument("--trials", type=int, required=True)
    v.add_argument("--epochs", type=int, required=True)
    v.add_argument("--head-ip", required=True)
    v.add_argument("--worker-ips", required=True)
    b = sub.add_parser("browse")
    b.add_argument("url")
    b.add_argument("experiment")
    a = ap.parse_args(argv)
    if a.cmd == "wait-epoch":
        return wait_epoch(a.uri, a.experiment, a.timeout)
    if a.cmd == "verify":
        return verify(a.uri, a.experiment, a.trials, a.epochs, a.head_ip,
                      [ip for ip in a.worker_ips.split(",") if ip])
    return browse(a.url, a.experiment)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
