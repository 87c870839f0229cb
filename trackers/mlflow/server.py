"""A local `mlflow server` on 127.0.0.1, started and stopped by its PID.

The tests and the benchmarks need real servers with a SQLite, PostgreSQL or MySQL
backend (``trackbridge.trackers.mlflow.localdb`` starts the latter two); this keeps the
start, the health wait and the clean stop in one place. Only loopback is ever used.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with ``start_new_session`` and every process it started
    (its process group), by PID: politely (``sig``), then for good after 30 s."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class LocalMlflowServer:
    """``with LocalMlflowServer(folder) as url:`` or ``start()``/``stop()``."""

    def __init__(
        self, root: Path, workers: int = 1, env: dict[str, str] | None = None, backend: str | None = None
    ) -> None:
        self.root = Path(root)
        self.workers = workers
        self.backend = backend  # a database URL (PostgreSQL, MySQL); default: SQLite in root
        self.env = {
            **(env or os.environ),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.root / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                self.backend or f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                str(self.workers),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server did not start on {self.url}:\n{log}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server and every process it started (its process group), by PID."""
        if self.proc is None:
            return
        stop_group(self.proc)
        self.proc = None
        self._log.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
