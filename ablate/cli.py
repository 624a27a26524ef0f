"""The `ablate` command line: parse arguments, call one function, print. Nothing else."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ablate import __version__
from ablate.errors import AblateError, mask_url

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ablation studies of vision architectures: is it attention, patches "
                       "or data?")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _fail(e: AblateError) -> typer.Exit:
    for line in e.lines():
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(e.exit_code)


def _version(value: bool) -> None:
    if value:
        out.print(f"ablate {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False
         ) -> None:
    """Ablation studies of vision architectures: is it attention, patches or data?"""


StudyArg = Annotated[Path, typer.Argument(help="Study file (YAML), e.g. studies/quickstart.yaml",
                                          show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a study key (repeat): dotted as in factors, "
    "value parsed as YAML, e.g. --set train.epochs=3 --set factors.model.mixer=[conv,mlp]. "
    "Validated like the file; changes trial ids where it changes the trial.")]


@app.command()
def validate(study: StudyArg, sets: SetOpt = None) -> None:
    """Check a study file; print the number of trials and of cells per factor."""
    from ablate.study import cells_per_factor, load_study

    try:
        s = load_study(study, sets or ())
    except AblateError as e:
        raise _fail(e) from None
    if s.spec.search.method == "optuna":
        from ablate.search import full_space, study_name

        sr = s.spec.search
        out.print(f"{study}: ok: Optuna {sr.sampler} search of {sr.n_trials} trials x "
                  f"{len(s.spec.seeds)} seeds in study '{s.spec.name}' (Optuna study "
                  f"{study_name(s.spec)}), objectives "
                  + ", ".join(f"{k} ({v})" for k, v in sr.objectives.items()),
                  highlight=False, markup=False)
        for key, dim in full_space(s.spec).items():
            out.print(f"  {key}: {dim}", highlight=False, markup=False)
        return
    cells = len({t.trial_id for t in s.trials}) // max(1, len(s.spec.seeds))
    out.print(f"{study}: ok: {len(s.trials)} trials ({cells} cells x {len(s.spec.seeds)} "
              f"seeds) in study '{s.spec.name}'", highlight=False)
    for key, counts in cells_per_factor(s).items():
        levels = ", ".join(f"{k}: {v}" for k, v in counts.items())
        out.print(f"  {key}: {len(counts)} levels ({levels} trials)", highlight=False)


@app.command()
def plan(study: StudyArg, sets: SetOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False
         ) -> None:
    """List the expanded trials with their trial ids and factor levels."""
    from ablate.study import load_study

    try:
        s = load_study(study, sets or ())
    except AblateError as e:
        raise _fail(e) from None
    if s.spec.search.method == "optuna":
        from ablate.search import full_space

        space = {k: v for k, v in full_space(s.spec).items()}
        if as_json:
            sys.stdout.write(json.dumps({"search": s.spec.search.model_dump(mode="json"),
                                         "space": space, "seeds": s.spec.seeds}, indent=2)
                             + "\n")
        else:
            out.print(f"{s.spec.name}: Optuna search, {s.spec.search.n_trials} trials x "
                      f"{len(s.spec.seeds)} seeds sampled from:", highlight=False)
            for k, v in space.items():
                out.print(f"  {k}: {v}", highlight=False, markup=False)
        return
    if as_json:
        rows = [{"trial_id": t.trial_id, "name": t.run_name, "factors": t.factors,
                 "config": t.config, **({"matched": t.matched.as_dict()} if t.matched else {})}
                for t in s.trials]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=f"{s.spec.name}: {len(s.trials)} trials")
    table.add_column("trial_id")
    for key in s.factor_keys:
        table.add_column(key)
    matched = list(dict.fromkeys(k for t in s.trials if t.matched for k in t.matched.as_dict()))
    for key in matched:  # model.match: the value chosen per cell and the cost it reaches
        table.add_column(f"matched {key}", justify="right")
    table.add_column("seed", justify="right")
    for t in s.trials:
        got = t.matched.as_dict() if t.matched else {}
        table.add_row(t.trial_id, *[("off" if t.factors[k] is None else str(t.factors[k]))
                                    for k in s.factor_keys],
                      *[f"{got[k]:.4g}" if k in got else "" for k in matched], str(t.seed))
    out.print(table)


@app.command()
def models() -> None:
    """List the paper-exact reference models and the backbone's token mixers."""
    from ablate.models import MIXERS, REFERENCES

    table = Table(title="reference models (also: timm:<name> for any timm model)")
    for col in ("name", "params", "GMACs", "input", "paper"):
        table.add_column(col)
    for name, ref in REFERENCES.items():
        table.add_row(name, f"{ref.params:,}", f"{ref.gmacs:.2f}",
                      f"{ref.image_size}px, {ref.num_classes} classes", ref.paper)
    out.print(table)
    out.print("backbone mixers: " + ", ".join(
        f"{k} ({(v.__doc__ or '').strip().splitlines()[0].rstrip('.')})"
        for k, v in MIXERS.items()), highlight=False)


@app.command()
def profile(
    name: Annotated[str | None, typer.Argument(help="Reference name or timm:NAME; leave out "
                                                    "for the backbone.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input size (default: the model's).")]
    = None,
    num_classes: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size for throughput and training.")]
    = 64,
    timing: Annotated[bool, typer.Option(help="Measure speed and memory (--no-timing: "
                                              "counts only).")] = True,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    mixer: Annotated[str | None, typer.Option(help="Backbone: token mixer.")] = None,
    dim: Annotated[int | None, typer.Option()] = None,
    depth: Annotated[int | None, typer.Option()] = None,
    patch_size: Annotated[int | None, typer.Option()] = None,
    kernel_size: Annotated[int | None, typer.Option()] = None,
    heads: Annotated[int | None, typer.Option()] = None,
    window_size: Annotated[int | None, typer.Option()] = None,
    tokens: Annotated[int | None, typer.Option(help="TokenLearner tokens.")] = None,
) -> None:
    """Params, GMACs, throughput, latency, training speed and peak memory of a model."""
    from ablate.cost import profile as run_profile
    from ablate.models import REFERENCES, create_model
    from ablate.train import DTYPES

    if precision not in DTYPES:
        raise _fail(AblateError(f"--precision: unknown {precision!r}; use fp32, bf16 or fp16"))
    import torch

    if device.split(":")[0] not in ("cpu", "cuda"):
        raise _fail(AblateError(f"--device: unknown {device!r}; use cpu or cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _fail(AblateError("--device cuda: no CUDA device is visible here; use --device "
                                "cpu (or run on a machine with a GPU)"))
    if precision == "fp16" and not device.startswith("cuda"):
        raise _fail(AblateError("--precision fp16 needs --device cuda; use bf16 on the CPU"))
    try:
        if name is None:
            kw = dict(mixer=mixer, dim=dim, depth=depth, patch_size=patch_size,
                      kernel_size=kernel_size, heads=heads, window_size=window_size,
                      tokens=tokens, image_size=image_size, num_classes=num_classes)
            model = create_model("backbone", **kw)
            size = image_size or 224
        else:
            model = create_model(name, image_size=image_size, num_classes=num_classes)
            size = image_size or (REFERENCES[name].image_size if name in REFERENCES else 224)
    except AblateError as e:
        raise _fail(e) from None
    classes = num_classes or getattr(model, "num_classes", None) or 1000
    p = run_profile(model, size, num_classes=classes, batch_size=batch_size, device=device,
                    dtype=DTYPES[precision], timing=timing)
    if as_json:
        sys.stdout.write(json.dumps(p.as_dict(), indent=2) + "\n")
        return
    table = Table(title=f"{name or 'backbone'} on {p.device} ({p.dtype}, batch {p.batch_size}, "
                        f"{p.image_size}px)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in p.as_dict().items():
        if k in ("device", "dtype", "batch_size", "image_size") or (k == "compile_s" and v is None):
            continue  # compile_s: only a compiled profile has one
        table.add_row(k, "-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:,.3f}"))
    out.print(table)


UriOpt = Annotated[str | None, typer.Option("--tracking-uri", envvar="ABLATE_TRACKING_URI",
                                            help="MLflow tracking URI (default: the study's "
                                                 "tracking.uri, else sqlite mlruns/mlflow.db).")]


@app.command()
def run(study: StudyArg,
        tracking_uri: UriOpt = None,
        address: Annotated[str | None, typer.Option(help="Ray cluster address to join "
                                                         "(default: start Ray locally).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run and what "
                                                                "would be skipped.")] = False,
        verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show Ray's own output."
                                              )] = False,
        force_unlock: Annotated[bool, typer.Option(
            "--force-unlock", help="Take the study over from a driver known to be dead "
                                   "(its lease would expire after 60 s anyway).")] = False,
        keep_trial_dirs: Annotated[bool, typer.Option(
            "--keep-trial-dirs", help="Keep Ray's trial folders of a finished study.")] = False,
        quiet: Annotated[bool, typer.Option(
            "--quiet", "-q", help="No verdict and table at the end.")] = False,
        sets: SetOpt = None,
        smoke: Annotated[bool, typer.Option(
            "--smoke", help="Every cell for 1 epoch on a tiny class-balanced subset (no "
                            "profile) in a throwaway store; list the cells that failed "
                            "(exit 1 if any).")] = False,
        max_concurrent: Annotated[int | None, typer.Option(
            "--max-concurrent", min=1, help="Trials at once (default: resources.max_concurrent, "
            "else as many as the Ray cluster's CPUs and GPUs hold).")] = None,
        reprofile: Annotated[bool, typer.Option(
            "--reprofile", help="Measure the cost profile of every architecture to run again "
                                "instead of reusing a stored one.")] = False,
        ) -> None:
    """Run a study's trials on Ray Tune and log every trial to MLflow (resumable)."""
    import signal

    from ablate.study import load_study
    from ablate.tracking import resolve_tracking_uri
    from ablate.tune.driver import plan_run, run_study

    def _terminated(signum, frame):  # outside the trials (planning, the summary): just exit
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _terminated)

    sets = [*(sets or []), *([f"resources.max_concurrent={max_concurrent}"]
                             if max_concurrent is not None else [])]
    if smoke:
        _smoke(study, sets, address, verbose)
        return
    try:
        s = load_study(study, sets)
        if reprofile:
            import dataclasses

            s = dataclasses.replace(s, reprofile=True)
        if dry_run:
            uri = resolve_tracking_uri(tracking_uri, s.spec.tracking.uri)
            todo, skipped = plan_run(s, uri)
            out.print(f"{s.spec.name}: {len(todo)} to run, {len(skipped)} skipped (finished) "
                      f"[tracking: {mask_url(uri)}]", highlight=False, markup=False)
            for t in todo:
                out.print(f"  run   {t.trial_id}  {t.run_name}", highlight=False, markup=False)
            for t in skipped:
                out.print(f"  skip  {t.trial_id}  {t.run_name}", highlight=False, markup=False)
            return
        summary = run_study(s, tracking_uri, address, verbose, out, force_unlock, keep_trial_dirs)
        signal.signal(signal.SIGTERM, _terminated)  # Ray's shutdown may have reset it
    except AblateError as e:
        raise _fail(e) from None
    if summary.interrupted:
        err.print("interrupted: running trials were marked killed; `ablate run` again resumes")
        raise typer.Exit(143 if summary.terminated else 130)
    if not quiet and s.spec.search.method == "grid":
        _print_summary(study, tracking_uri, sets)


def _smoke(study: Path, sets: list[str], address: str | None, verbose: bool) -> None:
    from ablate.tune.smoke import run_smoke

    try:
        res = run_smoke(study, sets, address, verbose, out)
    except AblateError as e:
        raise _fail(e) from None
    if res.summary is not None and res.summary.interrupted:
        err.print("interrupted: the smoke run stopped before every cell ran")
        raise typer.Exit(143 if res.summary.terminated else 130)
    if not res.failed:
        out.print(f"smoke: all {res.total} cells ran an epoch", highlight=False)
        return
    table = Table(title=f"smoke: {len(res.failed)} of {res.total} cells failed")
    for col in ("cell", "status", "why"):
        table.add_column(col, overflow="fold")
    for row in res.failed:
        table.add_row(*row)
    out.print(table)
    raise typer.Exit(1)


def _print_summary(study: Path, tracking_uri: str | None, sets: list[str] | None = None
                   ) -> None:
    from ablate.report import run_summary

    # named on the command line: ABLATE_TRACKING_URI (Typer fills the option from it) finds
    # the same store again without it
    named = tracking_uri if tracking_uri != os.environ.get("ABLATE_TRACKING_URI") else None
    try:
        text = run_summary(study, tracking_uri, sets=sets or (), named_uri=named)
    except AblateError as e:  # nothing finished yet: say so, the run itself succeeded
        text = f"No verdict: {e}"
    out.print("\n" + text, highlight=False, markup=False, soft_wrap=True)


@app.command()
def status(study: StudyArg, tracking_uri: UriOpt = None, sets: SetOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Counts of trials by status and the best trial so far."""
    from ablate.study import load_study
    from ablate.tune.status import status as study_status

    try:
        info = study_status(load_study(study, sets or ()), tracking_uri)
    except AblateError as e:
        raise _fail(e) from None
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    c = info["counts"]
    if "optuna" in info:
        o = info["optuna"]
        out.print(f"Optuna study {o['study_name']}: " + ", ".join(
            f"{k} {v}" for k, v in o["states"].items()) + f" (of n_trials "
            f"{o.get('n_trials', '?')})", highlight=False, markup=False)
        if o["pareto"]:
            objs = list(o["objectives"])
            out.print("Pareto set:" if len(objs) > 1 else "best trial:", highlight=False)
            for b in o["pareto"]:
                vals = ", ".join(f"{k}={v:.4g}" for k, v in zip(objs, b["values"], strict=True))
                out.print(f"  #{b['number']}: {vals}  {b['params']}", highlight=False,
                          markup=False)
    out.print(f"{info['study']}: {info['done']}/{info['trials']} done | " + " | ".join(
        f"{k} {v}" for k, v in c.items()) + f"  [tracking: {mask_url(info['tracking_uri'])}]",
        highlight=False, markup=False)
    if info["best"]:
        b = info["best"]
        out.print(f"best: {b['run_name']} (trial {b['trial_id']}): val_acc {b['val_acc']:.4f}"
                  + (f", test_acc {b['test_acc']:.4f}" if b["test_acc"] is not None else ""),
                  highlight=False, markup=False)
    if "optuna" not in info and info["trials"] and info["done"] == info["trials"]:
        _print_summary(study, tracking_uri, sets)  # a finished study: the verdict and cell table


@app.command()
def studies(tracking_uri: UriOpt = None,
            metric: Annotated[str, typer.Option(help="Metric the best run is chosen on.")]
            = "val_acc",
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The studies in a tracking store: runs by status, last activity, best run."""
    from ablate.tracking import resolve_tracking_uri
    from ablate.tune.status import store_studies

    try:
        uri = resolve_tracking_uri(tracking_uri)
        rows = store_studies(uri, metric)
    except AblateError as e:
        raise _fail(e) from None
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    if not rows:
        out.print(f"no studies in {mask_url(uri)}", highlight=False, markup=False)
        return
    table = Table(title=f"studies in {mask_url(uri)}")
    for col in ("study", "runs", "by status", "last activity", f"best {metric}", "best run"):
        table.add_column(col, justify="right" if col == "runs" else "left")
    for r in rows:
        b = r["best"]
        table.add_row(r["study"], str(r["runs"]),
                      ", ".join(f"{k} {v}" for k, v in r["counts"].items()),
                      r["last_activity"].strftime("%Y-%m-%d %H:%M") if r["last_activity"]
                      else "-", f"{b[metric]:.4f}" if b else "-", b["run_name"] if b else "-")
    out.print(table)


@app.command()
def report(
    study: Annotated[Path | None, typer.Argument(help="Study file (YAML); leave out with "
                                                      "--experiment.", show_default=False)]
    = None,
    tracking_uri: UriOpt = None,
    metric: Annotated[str, typer.Option(help="test_acc to report a finished study; val_acc "
                                             "for anything that selects.")] = "test_acc",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write "
                                                "(html default: report-<study>.html; md and "
                                                "json default: stdout).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="html | md | json")] = "html",
    experiment: Annotated[str | None, typer.Option(help="Analyse any MLflow experiment by "
                                                        "its params instead of a study.")]
    = None,
    factor: Annotated[list[str] | None, typer.Option("--factor", help="With --experiment: a "
                                                     "run param to compare (repeat).")] = None,
    seed_key: Annotated[str | None, typer.Option(help="With --experiment: the param that "
                                                      "holds the seed.")] = None,
    sets: SetOpt = None,
) -> None:
    """The verdict: is it attention, patches or data? ANOVA, effects and CIs per grid."""
    from ablate.report import experiment_source, make_report, study_source

    try:
        if (study is None) == (experiment is None):
            raise AblateError("ablate report: give a study file or --experiment NAME (one)")
        src = (study_source(study, tracking_uri, sets or ()) if study is not None else
               experiment_source(experiment, factor or [], seed_key, tracking_uri))
        path, text = make_report(src, metric, fmt, output)
    except AblateError as e:
        raise _fail(e) from None
    if path is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        err.print(f"wrote {path}", highlight=False, markup=False)


@app.command()
def dashboard(tracking_uri: UriOpt = None,
              host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")]
              = "127.0.0.1",
              port: Annotated[int, typer.Option(help="Port.")] = 8501) -> None:
    """Open the Streamlit dashboard: frontiers, factor effects, curves, runs."""
    from ablate.tracking import resolve_tracking_uri

    app_path = Path(__file__).resolve().parent / "dashboard" / "app.py"  # package data
    uri = resolve_tracking_uri(tracking_uri)
    env = {**os.environ, "ABLATE_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    out.print(f"dashboard on http://{host}:{port}  (tracking: {mask_url(uri)}; Ctrl-C stops "
              "it)", highlight=False, markup=False)
    sys.stdout.flush()
    # become Streamlit (same PID): SIGTERM and Ctrl-C reach the server itself, nothing is
    # left running behind a dead wrapper
    os.execve(sys.executable, cmd, env)


if __name__ == "__main__":  # pragma: no cover
    app()
