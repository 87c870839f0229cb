"""`trackbridge quickstart`: the README's first command works, and is safe to repeat."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess

from tests.conftest import run_cli


def test_quickstart_wandb_twice(tmp_path):
    """The default: W&B offline runs from the real SDK, into a SQLite MLflow store."""
    folder = tmp_path / "qs"
    p = run_cli("quickstart", "--dir", str(folder))
    assert "writing demo W&B offline runs with the wandb SDK" in p.stdout
    assert "runs: 3 new, 0 updated, 0 unchanged, 0 failed" in p.stdout
    assert "model versions: 1 new, 0 unchanged" in p.stdout  # the W&B model artifact
    assert "verify: identical (1 projects, 3 runs, 213 points, 1 model versions)" in p.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{folder / 'dest.db'}" in p.stdout
    assert "Traceback" not in p.stderr
    p = run_cli("quickstart", "--dir", str(folder))
    assert "runs: 0 new, 0 updated, 3 unchanged, 0 failed" in p.stdout
    assert "model versions: 0 new, 1 unchanged" in p.stdout
    assert "metric points written: 0" in p.stdout and "verify: identical" in p.stdout
    with sqlite3.connect(folder / "dest.db") as c:
        assert c.execute("select count(*) from runs").fetchone()[0] == 3
    # the nightly command it suggests works on what it made, and finds nothing to do
    hint = next(line for line in p.stdout.splitlines() if "trackbridge sync " in line)
    p = run_cli(*hint.split("trackbridge ", 2)[-1].split(), "--state-dir", str(tmp_path / "state"))
    assert "runs: 0 new, 0 updated, 3 unchanged, 0 failed" in p.stdout


def test_quickstart_mlflow_twice(tmp_path):
    folder = tmp_path / "qs"
    p = run_cli("quickstart", "--dir", str(folder), "--source", "mlflow")
    assert "runs: 6 new, 0 updated, 0 unchanged, 0 failed" in p.stdout
    assert "verify: identical (3 projects, 6 runs, 310 points, 2 model versions)" in p.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{folder / 'dest.db'}" in p.stdout
    assert "Traceback" not in p.stderr and "View run" not in p.stdout
    with sqlite3.connect(folder / "dest.db") as c:
        assert c.execute("select count(*) from runs").fetchone()[0] == 6
    p = run_cli("quickstart", "--dir", str(folder), "--source", "mlflow")
    assert "runs: 0 new, 0 updated, 6 unchanged, 0 failed" in p.stdout
    assert "metric points written: 0" in p.stdout and "verify: identical" in p.stdout
    with sqlite3.connect(folder / "dest.db") as c:
        assert c.execute("select count(*) from runs").fetchone()[0] == 6


def test_console_script_is_installed():
    exe = shutil.which("trackbridge")
    assert exe, "pip install -e . should put `trackbridge` on PATH"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("trackbridge, version")
