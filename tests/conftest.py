"""Shared fixtures: real MLflow stores and a real MLflow server on 127.0.0.1.

The environment is pinned before anything imports MLflow: telemetry off, and HOME and
every tracker directory inside one temporary folder, so no test writes to the real home;
the folder goes when the test process ends.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SANDBOX = Path(tempfile.mkdtemp(prefix="trackbridge-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)  # after every fixture's teardown
os.environ["HOME"] = str(_SANDBOX / "home")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SANDBOX / 'unused-default.db'}"
for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ[var] = str(_SANDBOX / var.lower())
os.environ["WANDB_MODE"] = "offline"
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_SANDBOX / "torchinductor")  # else /tmp/torchinductor_<user>
(_SANDBOX / "home").mkdir(parents=True, exist_ok=True)


_CHECKOUT = Path(__file__).resolve().parents[1]
_STRAYS = ("mlruns", "wandb", "mlartifacts")  # what a tracker drops in the current folder
_BEFORE = {name for name in _STRAYS if (_CHECKOUT / name).exists()}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test that leaves a tracker's folder in the checkout (MLflow's ./mlruns, W&B's
    ./wandb) fails the run: it would do the same in a user's project."""
    if hasattr(session.config, "workerinput"):
        return  # the controller checks, once, after every worker is done
    left = [name for name in _STRAYS if (_CHECKOUT / name).exists() and name not in _BEFORE]
    if left:
        session.config.get_terminal_writer().line(
            f"tests left {', '.join(left)} in {_CHECKOUT}: a test wrote into the current folder", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def sandbox() -> Path:
    return _SANDBOX


@pytest.fixture(scope="session")
def mlflow_server(sandbox: Path) -> Iterator[str]:
    """A real `mlflow server` subprocess with a SQLite backend; stopped by its PID."""
    from trackbridge.trackers.mlflow.server import LocalMlflowServer

    with LocalMlflowServer(sandbox / "server", workers=1) as url:
        yield url


@pytest.fixture(scope="session")
def demo_store(sandbox: Path) -> dict:
    """The demo MLflow dataset in a SQLite store, made once with the real SDK."""
    from trackbridge.trackers.mlflow.demo import make_mlflow_demo

    db = sandbox / "demo" / "source.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    ids = make_mlflow_demo(uri)
    return {"uri": uri, "tb": f"mlflow+{uri}", "ids": ids, "db": db}


@pytest.fixture(scope="session")
def wandb_demo(sandbox: Path) -> Path:
    """The demo W&B offline runs, written once by the real wandb SDK."""
    from trackbridge.trackers.wandb.demo import make_wandb_demo

    return make_wandb_demo(sandbox / "wandb-demo")


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL server (Debian's package) on 127.0.0.1 in a temporary folder, run
    as its own account when we are root; stopped by its PID at the end of the session."""
    from trackbridge.trackers.mlflow.localdb import LocalPostgres

    with LocalPostgres() as db:
        yield db


@pytest.fixture(scope="session")
def mariadb() -> Iterator[object]:
    """A real MariaDB server (Debian's MySQL) on 127.0.0.1, as ``postgres`` is."""
    from trackbridge.trackers.mlflow.localdb import LocalMariaDB

    with LocalMariaDB() as db:
        yield db


@pytest.fixture(params=["postgresql", "mysql"])
def database(request: pytest.FixtureRequest) -> str:
    """A new, empty database on each real server, as a SQLAlchemy URL (driver named)."""
    import uuid

    server = request.getfixturevalue("postgres" if request.param == "postgresql" else "mariadb")
    return server.create_database(f"t{uuid.uuid4().hex[:16]}")


@pytest.fixture
def new_sqlite(tmp_path: Path) -> str:
    """A trackbridge URI for a fresh, empty SQLite store (MLflow creates it on first use)."""
    return f"mlflow+sqlite:///{tmp_path / 'dest.db'}"


def run_cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run the real `trackbridge` command in a subprocess, as a user would."""
    p = subprocess.run(
        [sys.executable, "-m", "trackbridge.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    if check is not None and p.returncode != check:
        raise AssertionError(f"exit {p.returncode} != {check}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def killable_env(tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a command a test will kill -9: its temporary files in the
    test's own folder, since a killed process cannot remove them."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**(env if env is not None else os.environ), "TMPDIR": str(tmp_path / "tmp")}


def one_line(stderr: str) -> str:
    """The single line an error must be: no traceback, nothing else on stderr."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A hand-built bundle of two runs; run a has 2,500 points and one binary file."""
    from tests import factories as f

    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00\x01binary\xff" * 100)
    pl = f.payload(
        f.run("test:run/a"),
        params=[(["lr"], 0.1)],
        points=[("loss", i, 1.0 / (i + 1)) for i in range(2500)],
        files=[f.file_ref("model/weights.bin", src)],
    )
    pl2 = f.payload(f.run("test:run/b"), points=[("loss", 0, 1.0)])
    return f.write_bundle(tmp_path / "bundle", [f.project()], [pl, pl2])


def hold_sync_lock(state: Path, source: str, destination: str) -> subprocess.Popen:
    """Another process holding the sync lock of a pair, until killed; returns once held."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom trackbridge import sync as sy\n"
            "st = sy.State(Path(sys.argv[1]), sy.Pair(sys.argv[2], sys.argv[3]))\n"
            "with st.locked():\n    print('locked', flush=True)\n    time.sleep(600)\n",
            str(state),
            source,
            destination,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder
