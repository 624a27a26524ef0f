"""A built wheel installed into a fresh venv (not editable, no source tree) gives a working
`ablate` and `ablate dashboard`: the app ships inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_http
from tests.test_dashboard import fill_store

pytestmark = pytest.mark.slow


# no PYTHONPATH: the installed package must be what runs, never this checkout
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(*cmd: str | Path, cwd: Path) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """The wheel of a clean copy of the tracked tree, installed into a new venv whose only
    extra path is this environment's site-packages (the dependencies, not re-downloaded;
    a .pth path line runs no editable-install hook, so this checkout is not importable)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = _run("git", "ls-files", "-co", "--exclude-standard", cwd=ROOT).split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    _run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "-q", "-w", tmp / "dist", cwd=src)
    wheel = next((tmp / "dist").glob("ablate-*.whl"))
    env = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", env, cwd=tmp)
    purelib = _run(env / "bin" / "python", "-c", "import sysconfig; "
                   "print(sysconfig.get_paths()['purelib'])", cwd=tmp).strip()
    Path(purelib, "zz_ablate_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install",
         "--no-deps", "--no-index", "-q", wheel, cwd=tmp)
    return env


def test_wheel_install_imports_from_the_venv_not_the_checkout(venv, tmp_path):
    where = _run(venv / "bin" / "python", "-c", "import ablate, ablate.api; "
                 "print(ablate.__file__)", cwd=tmp_path).strip()
    assert Path(where).is_relative_to(venv)
    assert _run(venv / "bin" / "ablate", "--version", cwd=tmp_path).startswith("ablate ")


def test_wheel_install_serves_the_dashboard(venv, tmp_path):
    uri = fill_store(tmp_path)
    app = _run(venv / "bin" / "python", "-c", "import ablate, pathlib; print(pathlib.Path("
               "ablate.__file__).parent / 'dashboard' / 'app.py')", cwd=tmp_path).strip()
    assert Path(app).is_file() and Path(app).is_relative_to(venv)
    # the installed app renders a study without an exception
    code = ("import os, sys; from streamlit.testing.v1 import AppTest; "
            f"os.environ['ABLATE_TRACKING_URI'] = {uri!r}; "
            f"at = AppTest.from_file({app!r}, default_timeout=120).run(); "
            "print('EXC', [e.value for e in at.exception]); print('TITLE', at.title[0].value)")
    out = _run(venv / "bin" / "python", "-c", code, cwd=tmp_path)
    assert "EXC []" in out and "TITLE " in out
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "ablate"), "dashboard", "--tracking-uri", uri,
                             "--port", str(port)], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert app in cmdline
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
