"""Shared fixtures: real MLflow stores and a real MLflow server on 127.0.0.1.

The environment is pinned before anything imports MLflow: telemetry off, and HOME and
every tracker directory inside one temporary folder, so no test writes to the real home.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

_SANDBOX = Path(tempfile.mkdtemp(prefix="trackbridge-tests-"))
os.environ["HOME"] = str(_SANDBOX / "home")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SANDBOX / 'unused-default.db'}"
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "2"
os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ[var] = str(_SANDBOX / var.lower())
os.environ["WANDB_MODE"] = "offline"
(_SANDBOX / "home").mkdir(parents=True, exist_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sandbox() -> Path:
    return _SANDBOX


@pytest.fixture(scope="session")
def mlflow_server(sandbox: Path) -> Iterator[str]:
    """A real `mlflow server` subprocess with a SQLite backend; stopped by its PID."""
    root = sandbox / "server"
    root.mkdir()
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start in 90 s")
            time.sleep(0.3)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def demo_store(sandbox: Path) -> dict:
    """The demo MLflow dataset in a SQLite store, made once with the real SDK."""
    from bridge.demo import make_mlflow_demo

    db = sandbox / "demo" / "source.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    ids = make_mlflow_demo(uri)
    return {"uri": uri, "tb": f"mlflow+{uri}", "ids": ids, "db": db}


@pytest.fixture
def new_sqlite(tmp_path: Path) -> str:
    """A trackbridge URI for a fresh, empty SQLite store (MLflow creates it on first use)."""
    return f"mlflow+sqlite:///{tmp_path / 'dest.db'}"


def run_cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run the real `trackbridge` command in a subprocess, as a user would."""
    p = subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    if check is not None and p.returncode != check:
        raise AssertionError(f"exit {p.returncode} != {check}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p
