"""PostgreSQL and MariaDB servers of one's own, for MLflow stores in tests and benchmarks.

Production MLflow keeps its runs in PostgreSQL or MySQL, so the tests and the benchmarks
use the real servers, from Debian's packages (``postgresql``, ``mariadb-server``), each
in a fresh temporary folder, listening on 127.0.0.1 only, started and stopped by its PID.
Both refuse to run as root: when we are root (CI), the server and the tools that touch
its files run as the account the Debian package made for it (``postgres``, ``mysql``),
and the folder belongs to that account alone.

pytest-postgresql and pytest-mysql run the server as the current user, which fails as
root, and have no MariaDB of their own to bring; this is the small part they would do.
"""

from __future__ import annotations

import abc
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from trackbridge.trackers.mlflow.server import free_port, stop_group


class DatabaseUnavailable(RuntimeError):
    """The server's programs are not installed (``apt-get install postgresql`` etc.)."""


def _find(names: list[str], patterns: list[str]) -> str | None:
    for n in names:
        if p := shutil.which(n):
            return p
    for pattern in patterns:
        if found := sorted(glob.glob(pattern), reverse=True):
            return found[0]
    return None


class LocalDatabase(abc.ABC):
    """One server in its own folder; ``with Local…() as db: db.create_database("x")``."""

    kind = ""
    os_user = ""

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable  # keep the server's fsyncs (benchmarks); tests go without
        self.port = free_port()
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None

    # -- running things as the server's owner

    def _owner(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.os_user)
        except KeyError as e:
            raise DatabaseUnavailable(f"no '{self.os_user}' account to run {self.kind} as") from e

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.os_user, "--", *argv] if self._owner() else list(argv)

    def _env(self) -> dict[str, str]:
        """The server's temporary files in its own folder: gone with it, and always
        writable by its account (a caller's TMPDIR may be private to the caller)."""
        return {**os.environ, "TMPDIR": str(self.root)} if self.root else dict(os.environ)

    def _run(self, *argv: str, timeout: float = 120) -> str:
        p = subprocess.run(self._cmd(*argv), capture_output=True, text=True, timeout=timeout, env=self._env())
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {(p.stderr or p.stdout).strip()[-1500:]}")
        return p.stdout

    def _make_root(self) -> Path:
        root = Path(tempfile.mkdtemp(prefix=f"trackbridge-{self.kind}-"))
        if owner := self._owner():
            os.chown(root, owner.pw_uid, owner.pw_gid)
        return root

    # -- the life cycle

    @abc.abstractmethod
    def _initialise(self) -> None:
        """One server kind's part of the life cycle."""

    @abc.abstractmethod
    def _server_argv(self) -> list[str]:
        """One server kind's part of the life cycle."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """One server kind's part of the life cycle."""

    def _after_start(self) -> None:  # noqa: B027 - most kinds need nothing here
        """One-time set-up that needs the server up (accounts)."""

    def start(self, timeout: float = 120) -> LocalDatabase:
        self.root = self._make_root()
        self._initialise()
        self._log = open(self.root.parent / f"{self.root.name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self._cmd(*self._server_argv()),
            env=self._env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = Path(self._log.name).read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"{self.kind} did not start on 127.0.0.1:{self.port}:\n{log}")
            time.sleep(0.2)
        self._after_start()
        return self

    def stop(self) -> None:
        """Stop the server by its PID (its fast shutdown), then remove its folder."""
        if self.proc is not None:
            stop_group(self.proc, self.stop_signal)
            self.proc = None
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    stop_signal = signal.SIGTERM

    def __enter__(self) -> LocalDatabase:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @abc.abstractmethod
    def create_database(self, name: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL with the default driver."""


class LocalPostgres(LocalDatabase):
    """PostgreSQL: ``initdb`` with one trusted account, ``mlflow``, on loopback only."""

    kind = "postgresql"
    os_user = "postgres"
    stop_signal = signal.SIGINT  # PostgreSQL's "fast" shutdown: clients are cut off

    def __init__(self, durable: bool = False) -> None:
        super().__init__(durable)
        found = _find(["pg_ctl"], ["/usr/lib/postgresql/*/bin/pg_ctl"])
        if found is None:
            raise DatabaseUnavailable("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = Path(os.path.realpath(found)).parent

    def _initialise(self) -> None:
        assert self.root is not None
        self._run(
            str(self.bin / "initdb"), "-D", str(self.root / "data"), "-U", "mlflow", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip

    def _server_argv(self) -> list[str]:
        assert self.root is not None
        argv = [
            str(self.bin / "postgres"), "-D", str(self.root / "data"), "-h", "127.0.0.1",
            "-p", str(self.port), "-k", str(self.root), "-c", "max_connections=200",
        ]  # fmt: skip
        return argv if self.durable else [*argv, "-c", "fsync=off", "-c", "synchronous_commit=off"]

    def _ready(self) -> bool:
        p = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
        )
        return p.returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run(
            str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", "mlflow", "-d", database, "-c", sql,
        )  # fmt: skip

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/{name}"


class LocalMariaDB(LocalDatabase):
    """MariaDB (Debian's MySQL): ``mariadb-install-db``, then an ``mlflow`` account that
    may connect from 127.0.0.1 with a password, as MLflow's users connect."""

    kind = "mariadb"
    os_user = "mysql"
    password = "mlflow"

    def __init__(self, durable: bool = False) -> None:
        super().__init__(durable)
        self.server = _find(["mariadbd", "mysqld"], ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"])
        self.install = _find(["mariadb-install-db", "mysql_install_db"], [])
        self.client = _find(["mariadb", "mysql"], [])
        if not (self.server and self.install and self.client):
            raise DatabaseUnavailable("MariaDB is not installed (apt-get install mariadb-server)")

    def _initialise(self) -> None:
        assert self.root is not None
        self._run(
            self.install, "--no-defaults", f"--datadir={self.root / 'data'}", "--skip-test-db",
            "--auth-root-authentication-method=normal", "--skip-name-resolve",
            *([f"--user={self.os_user}"] if self._owner() else []),
        )  # fmt: skip

    def _server_argv(self) -> list[str]:
        assert self.root is not None
        argv = [
            self.server, "--no-defaults", f"--datadir={self.root / 'data'}", f"--socket={self.root / 'sock'}",
            f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
            f"--pid-file={self.root / 'pid'}", "--max-connections=200", "--skip-log-bin",
            *([f"--user={self.os_user}"] if self._owner() else []),
        ]  # fmt: skip
        return argv if self.durable else [*argv, "--innodb-flush-log-at-trx-commit=0", "--sync-binlog=0"]

    def sql(self, sql: str) -> str:
        assert self.root is not None and self.client
        p = subprocess.run(
            [self.client, "--no-defaults", "-uroot", f"--socket={self.root / 'sock'}", "-N", "-e", sql],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if p.returncode != 0:
            raise RuntimeError(f"mariadb: {p.stderr.strip()[-1500:]}")
        return p.stdout

    def _ready(self) -> bool:
        assert self.root is not None
        if not (self.root / "sock").exists():
            return False
        try:
            self.sql("SELECT 1")
        except RuntimeError:
            return False
        return True

    def _after_start(self) -> None:
        self.sql(
            f"CREATE USER 'mlflow'@'127.0.0.1' IDENTIFIED BY '{self.password}';"
            " GRANT ALL PRIVILEGES ON *.* TO 'mlflow'@'127.0.0.1';"
        )

    def create_database(self, name: str) -> str:
        # as MySQL 8 makes one by default (MariaDB's own default is latin1, which no MLflow
        # database should have: a non-Latin key would not fit)
        self.sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        return f"mysql+pymysql://mlflow:{self.password}@127.0.0.1:{self.port}/{name}"
