"""Imports only point down: the torch-only core never pulls in Ray, MLflow or Streamlit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_no_ray_mlflow_streamlit():
    code = ("import sys, ablate.models, ablate.data, ablate.train, ablate.analysis, "
            "ablate.cost, ablate.study, ablate.search, ablate.sources; "
            "print(sorted(m for m in ('ray', 'mlflow', 'streamlit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _imports(path: Path) -> set[str]:
    """Every ablate module a file imports (at any depth of the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ablate"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("ablate")}
    return names


def test_nothing_below_tune_imports_tune_and_study_search_have_no_cycle():
    pkg = ROOT / "ablate"
    for sub in ("archs", "models", "data", "sources", "train", "analysis", "cost", "study",
                "studyfile", "cells", "search", "spec", "tracking"):
        files = list((pkg / sub).rglob("*.py")) if (pkg / sub).is_dir() else [pkg / f"{sub}.py"]
        for f in files:
            bad = {m for m in _imports(f) if m.startswith(("ablate.tune", "ablate.cli"))}
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
    assert "ablate.study" not in _imports(pkg / "search.py")
    assert "ablate.search" not in _imports(pkg / "spec.py")


def test_validating_a_study_and_reporting_import_no_torch(tmp_path):
    """`ablate check`, `ablate report` and the dashboard validate study files; importing torch
    for that costs seconds, so the facts validation needs live in ablate.archs."""
    study = tmp_path / "s.yaml"
    study.write_text("name: s\ndataset: {name: synthetic, image_size: 32, num_classes: 10}\n"
                     "model: {dim: 64, depth: 2, patch_size: 4}\n"
                     "factors: {model.mixer: [attention, mlp, conv, dual, pool, identity], "
                     "model.patch_size: [2, 4]}\nseeds: [0, 1]\n")
    code = ("import sys; from ablate.study import load_study; import ablate.report, "
            "ablate.dashboard.data; s = load_study(sys.argv[1]); "
            "print(len(s.trials), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(study)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    n, torch_loaded = out.stdout.split()
    assert int(n) > 0 and torch_loaded == "False", out.stdout
