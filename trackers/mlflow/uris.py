"""MLflow's URIs: every store MLflow accepts, spelt ``mlflow+<its own URI>``.

A tracking server (``mlflow+http(s)://``), a file store, or any SQL database with the
driver SQLAlchemy names (``mlflow+postgresql+psycopg2://``); mssql is accepted but
untested. What can be known before anything is read is checked here: a missing driver,
a missing or unwritable SQLite file, a folder where a file must be.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from trackbridge.errors import BadInputError, SourceNotFoundError, UsageError
from trackbridge.tracker import Target, local_path, redact
from trackbridge.uri import folder_canonical, writable, writable_folder

DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
# a folder mlflow-export-import wrote: read as the store it was exported from
EXPORT_IMPORT = "mlflow-export-import"
SCHEMES = ("mlflow+http", "mlflow+https", "mlflow+file", *(f"mlflow+{d}" for d in DATABASES), EXPORT_IMPORT)
# The pip package that brings each database driver SQLAlchemy may ask for.
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pymysql": "pymysql",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}
# The extra of trackbridge that brings it.
DRIVER_EXTRAS = {"psycopg": "postgres", "psycopg2": "postgres", "pymysql": "mysql"}
SQLITE_HEADER = b"SQLite format 3\x00"
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def accepts(scheme: str) -> bool:
    """``mlflow+postgresql+psycopg2``: a database with its driver named."""
    parts = scheme.split("+")
    return len(parts) >= 2 and parts[0] == "mlflow" and parts[1] in (*DATABASES, "http", "https", "file")


def parse(scheme: str, rest: str, raw: str) -> str:
    if scheme == EXPORT_IMPORT:
        return local_path(rest)
    inner = raw.split("+", 1)[1]
    return _plain_sqlite(inner) if inner.startswith("sqlite:") else inner


def sqlite_path(inner: str) -> Path | None:
    """The file an ``sqlite:///…`` URL names, decoded exactly as SQLAlchemy decodes it
    (``%20`` is a space), made absolute against the working folder; None otherwise."""
    if not inner.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        db = make_url(inner).database
    except Exception as e:  # sqlalchemy's ArgumentError: not a URL it can read
        raise UsageError(f"{redact(inner)}: not a database URL SQLAlchemy can read ({e})") from e
    if not db or db == ":memory:":
        raise UsageError(f"{redact(inner)}: an in-memory SQLite store would vanish; name a file")
    path = Path(db)
    return path if path.is_absolute() else Path.cwd() / path


def _plain_sqlite(inner: str) -> str:
    """The SQLite URL as MLflow must be given it: an absolute path, percent-decoded.

    SQLAlchemy decodes ``%20`` in the path, but MLflow first creates the file's folder
    from the raw text, so ``/a%20b/x.db`` would leave an empty ``a%20b`` folder beside the
    real ``a b``. Only what SQLAlchemy itself would misread stays encoded."""
    query = inner.split("?", 1)[1] if "?" in inner else ""
    return sqlite_url(sqlite_path(inner)) + (f"?{query}" if query else "")  # type: ignore[arg-type]


def sqlite_url(path: Path) -> str:
    return "sqlite:///" + str(path).replace("%", "%25").replace("?", "%3F")


def check_driver(t: Target) -> None:
    """A database URL whose driver is not installed: one line that names the package, before
    anything is read or exported, instead of a ModuleNotFoundError deep in a copy."""
    scheme = t.inner.split("://", 1)[0]
    if scheme.split("+")[0] not in DATABASES or scheme.startswith("sqlite"):
        return
    try:
        from sqlalchemy.engine import make_url

        dialect = make_url(t.inner).get_dialect()
    except ImportError as e:
        raise MissingDriverError(t, getattr(e, "name", None) or str(e)) from e
    except Exception as e:  # NoSuchModuleError: a driver name SQLAlchemy does not know
        raise UsageError(f"{t.safe}: SQLAlchemy does not know the database driver in {scheme!r} ({e})") from e
    try:
        dialect.import_dbapi()
    except ImportError as e:
        raise MissingDriverError(t, getattr(e, "name", None) or dialect.driver) from e


class MissingDriverError(UsageError):
    def __init__(self, t: Target, module: str) -> None:
        top = module.split(".")[0]
        package = DRIVER_PACKAGES.get(top, top)
        extra = DRIVER_EXTRAS.get(top)
        also = f" or pip install 'trackbridge[{extra}]'" if extra else ""
        if top == "MySQLdb":  # it compiles against the MySQL client headers; PyMySQL does not
            also = " (it needs the MySQL client headers), or use mlflow+mysql+pymysql:// with "
            also += "pip install 'trackbridge[mysql]'"
        super().__init__(
            f"{t.safe}: the database driver {top!r} is not installed; install it with "
            f"pip install '{package}'{also}"
        )


def _check_sqlite_header(t: Target, path: Path) -> None:
    """A file that is not an SQLite database, named with the byte where it goes wrong,
    instead of SQLAlchemy's "file is not a database" from deep inside MLflow."""
    if not path.is_file() or path.stat().st_size == 0:
        return  # SQLite makes an empty file a database
    with open(path, "rb") as fh:
        head = fh.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        at = next((i for i, (a, b) in enumerate(zip(head, SQLITE_HEADER, strict=False)) if a != b), len(head))
        raise BadInputError(
            f"{path}: byte {at}: not an SQLite database (its header is damaged or another format)"
        )


def check_source(t: Target) -> None:
    """A missing SQLite file would be silently created as an empty store: refuse instead."""
    if t.scheme == EXPORT_IMPORT:
        if not Path(t.inner).is_dir():
            raise SourceNotFoundError(f"{t.safe}: no such folder {t.inner}")
        return
    check_driver(t)
    path = sqlite_path(t.inner)
    if path is not None:
        if not path.exists():
            raise SourceNotFoundError(f"{t.safe}: no such SQLite file {path}")
        _check_sqlite_header(t, path)
    elif t.inner.startswith("file://"):
        path = Path(urlsplit(t.inner).path)
        if not path.exists():
            raise SourceNotFoundError(f"{t.safe}: no such folder {path}")


def check_destination(t: Target) -> None:
    check_driver(t)
    db = sqlite_path(t.inner)
    if db is not None:
        if db.is_dir():
            raise UsageError(f"{t.safe}: {db} is a folder, not an SQLite file")
        if not db.parent.is_dir():
            raise UsageError(f"{t.safe}: the folder {db.parent} does not exist")
        writable(t, db if db.exists() else None, db.parent)
        _check_sqlite_header(t, db)
    elif t.inner.startswith("file:"):
        writable_folder(t, Path(urlsplit(t.inner).path))


def canonical(t: Target) -> str:
    """One spelling per store: a real path for files; for servers and databases the host
    in lower case, without the default port, the driver, credentials or a trailing slash."""
    if t.scheme == EXPORT_IMPORT:
        return folder_canonical(t)
    inner = t.inner
    scheme = inner.split("://", 1)[0].split("+")[0].lower()
    db = sqlite_path(inner)
    if db is not None:
        return f"mlflow+sqlite:///{os.path.realpath(db)}"
    parts = urlsplit(inner)
    if scheme == "file":
        return f"mlflow+file://{os.path.realpath(parts.path)}"
    host = (parts.hostname or "").lower()
    try:
        port = parts.port if parts.port not in (None, _DEFAULT_PORTS.get(scheme)) else None
    except ValueError as e:
        raise UsageError(f"{t.safe}: {e}") from e
    path = parts.path.rstrip("/")
    return f"mlflow+{scheme}://{host}{f':{port}' if port else ''}{path}"


def is_local(t: Target) -> bool:
    """SQLite and file stores take one writer at a time. A database server used
    in-process is not local here: 4 workers were as fast as 1 or faster into PostgreSQL
    with the bulk path (docs/benchmarks.md)."""
    return t.scheme == EXPORT_IMPORT or t.inner.startswith(("sqlite:", "file:"))
