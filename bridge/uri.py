"""Turn a source or destination URI into an adapter.

This is the only place that knows which scheme maps to which exporter or importer, so
adding a tracker means adding a line here. Credentials never come from a URI we keep:
``redact`` strips any user:password before a URI reaches a manifest, log or report, and
``canonical`` gives the one spelling of a place that locks and identities are keyed on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bridge.errors import DestinationError, SourceNotFoundError, TrackbridgeError, UsageError

# Every database MLflow's SQL store accepts, as SQLAlchemy spells it, with any driver
# (``mlflow+postgresql+psycopg2://``); mssql is accepted but untested.
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
MLFLOW_SCHEMES = ("mlflow+http", "mlflow+https", "mlflow+file", *(f"mlflow+{d}" for d in DATABASES))
KNOWN = (*MLFLOW_SCHEMES, "bundle", "wandb", "wandb+offline", "neptune+offline", "neptune-exporter", "spool")
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
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


@dataclass(frozen=True)
class Target:
    scheme: str  # "mlflow", "bundle", ...
    inner: str  # the URI the tracker's own SDK understands
    raw: str

    @property
    def safe(self) -> str:
        return redact(self.raw)


def redact(uri: str) -> str:
    """Drop user:password@, the query and the fragment; keep everything else byte-exact.

    (urlunsplit would also turn ``sqlite:////abs/path`` into ``sqlite://abs/path``.)
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{slash}{path}"


def parse(uri: str) -> Target:
    if "://" not in uri:
        # A plain path is a bundle.
        return Target("bundle", str(Path(uri).expanduser()), uri)
    scheme = uri.split("://", 1)[0].lower()
    rest = uri.split("://", 1)[1]
    if scheme.startswith("mlflow+") and _mlflow_dialect(scheme) in (*DATABASES, "http", "https", "file"):
        inner = uri.split("+", 1)[1]
        return Target("mlflow", _plain_sqlite(inner) if inner.startswith("sqlite:") else inner, uri)
    if scheme == "bundle":
        return Target("bundle", rest, uri)
    if scheme == "wandb+offline":
        return Target("wandb+offline", _path_of(rest), uri)
    if scheme == "wandb":
        return Target("wandb", rest, uri)
    if scheme in ("neptune+offline", "neptune-exporter", "spool"):
        return Target(scheme, _path_of(rest), uri)
    if scheme in KNOWN:
        raise UsageError(f"{redact(uri)}: the {scheme!r} adapter is not available in this version yet")
    raise UsageError(
        f"{redact(uri)}: unknown URI scheme {scheme!r}; use one of "
        + ", ".join(f"{s}://" for s in KNOWN)
        + " or a bundle path"
    )


def open_source(uri: str, **options: object):
    t = parse(uri)
    if t.scheme == "mlflow":
        check_driver(t)
    if t.scheme == "bundle":
        from bridge.bundle import BundleSource

        return BundleSource(t.inner)
    if t.scheme == "mlflow":
        from exporters.mlflow import MlflowSource

        _check_local_store_exists(t)
        return MlflowSource(t.inner, safe=redact(t.inner), **options)  # type: ignore[arg-type]
    if t.scheme == "wandb+offline":
        from exporters.wandb import WandbOfflineSource

        return WandbOfflineSource(t.inner)
    if t.scheme == "wandb":
        from exporters.wandb_online import WandbOnlineSource

        return WandbOnlineSource(t.inner)
    if t.scheme == "neptune+offline":
        from exporters.neptune import NeptuneOfflineSource

        return NeptuneOfflineSource(t.inner)
    if t.scheme == "neptune-exporter":
        from exporters.neptune_exporter import NeptuneExporterSource

        return NeptuneExporterSource(t.inner)
    if t.scheme == "spool":
        from exporters.spool import SpoolSource

        return SpoolSource(t.inner)
    raise AssertionError(t.scheme)


def open_sink(uri: str, **options: object):
    t = parse(uri)
    check_destination(t)
    if t.scheme == "bundle":
        from bridge.bundle import BundleWriter

        return BundleWriter(t.inner)
    if t.scheme == "mlflow":
        from importers.mlflow import MlflowSink

        return MlflowSink(t.inner, safe=redact(t.inner), **options)  # type: ignore[arg-type]
    if t.scheme == "wandb+offline":
        from importers.wandb import WandbOfflineSink

        return WandbOfflineSink(t.inner, **options)  # type: ignore[arg-type]
    if t.scheme == "wandb":
        from importers.wandb import WandbOnlineSink

        return WandbOnlineSink(t.inner, **options)  # type: ignore[arg-type]
    if t.scheme == "spool":
        raise UsageError(f"{t.safe}: a spool is written by bridge.init() in training code, not by a copy")
    if t.scheme in ("neptune+offline", "neptune-exporter"):
        raise UsageError(
            f"{t.safe}: Neptune is a source only: its hosted service shut down on 2026-03-05, "
            "so there is no Neptune to write to; migrate into mlflow+… or wandb+offline://…"
        )
    raise AssertionError(t.scheme)


def default_workers(*uris: str) -> int:
    """Runs in parallel: 4 when every side is a server, 1 when one is a local store or
    folder (SQLite allows one writer; a disk gains nothing from more)."""
    local = ("mlflow+sqlite", "mlflow+file", "wandb+offline", "neptune", "spool")
    return 4 if all(not u.startswith(local) for u in uris) else 1


def _path_of(rest: str) -> str:
    """``wandb+offline:///abs`` and ``wandb+offline://rel/path`` both name a local folder."""
    return str(Path(rest).expanduser()) if rest.startswith("/") else str(Path.cwd() / rest)


def _mlflow_dialect(scheme: str) -> str:
    """``mlflow+postgresql+psycopg2`` -> ``postgresql``."""
    return scheme.split("+")[1] if scheme.count("+") >= 1 else ""


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
        super().__init__(
            f"{t.safe}: the database driver {top!r} is not installed; install it with "
            f"pip install '{package}' (or name another driver in the URL, e.g. mlflow+postgresql+psycopg2://)"
        )


def check_destination(t: Target) -> None:
    """What can be known about a destination before anything is read: a path that is a
    file where a folder must be (or the reverse), a folder that cannot be written, a
    missing driver. Each is one line and an exit code of its own, within a second,
    instead of a failure after minutes of export."""
    if t.scheme == "mlflow":
        check_driver(t)
        db = sqlite_path(t.inner)
        if db is not None:
            if db.is_dir():
                raise UsageError(f"{t.safe}: {db} is a folder, not an SQLite file")
            if not db.parent.is_dir():
                raise UsageError(f"{t.safe}: the folder {db.parent} does not exist")
            _writable(t, db if db.exists() else None, db.parent)
        elif t.inner.startswith("file:"):
            folder = Path(urlsplit(t.inner).path)
            _writable_folder(t, folder)
    elif t.scheme in ("bundle", "wandb+offline"):
        _writable_folder(t, Path(t.inner))


def _writable_folder(t: Target, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{t.safe}: {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{t.safe}: {existing} is a file, not a folder")
    _writable(t, None, existing)


def _writable(t: Target, file: Path | None, folder: Path) -> None:
    """SQLite needs the folder as well as the file: it writes its journal beside it."""
    for p, what in ((file, "file"), (folder, "folder")):
        if p is not None and not os.access(p, os.W_OK | (os.X_OK if what == "folder" else 0)):
            raise DestinationError(f"{t.safe}: cannot write into the {what} {p} (permission denied)")


def canonical(uri: str) -> str:
    """One spelling per place, with no credentials: what a lock or an identity is keyed on.

    ``wandb+offline:///x`` and ``wandb+offline:///x/``, a relative and an absolute path,
    a symlinked folder and its target, ``http://Host:80/`` and ``http://host``, and
    ``postgresql://`` and ``postgresql+psycopg2://`` at the same database all give the
    same text.
    """
    t = parse(uri)
    if t.scheme == "mlflow":
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
            raise UsageError(f"{redact(uri)}: {e}") from e
        path = parts.path.rstrip("/")
        return f"mlflow+{scheme}://{host}{f':{port}' if port else ''}{path}"
    if t.scheme == "wandb":
        return "wandb://" + "/".join(p for p in t.inner.split("?")[0].split("/") if p)
    query = uri.split("?", 1)[1] if "?" in uri.split("://", 1)[-1] else ""
    path = t.inner.split("?", 1)[0] if t.scheme != "bundle" else t.inner
    return f"{t.scheme}://{os.path.realpath(path)}" + (f"?{query}" if query else "")


def source_identity(source: object) -> str:
    """The place a source's data came from, canonical: a bundle names the tracker it was
    exported from (its manifest's ``source``), any other source is that place itself.
    Importers record it with each object, so verify can tell this source's objects from
    those of another source consolidated into the same destination."""
    text = getattr(source, "origin", None) or source.describe()  # type: ignore[attr-defined]
    try:
        return canonical(text)
    except TrackbridgeError:
        return text


def same_place(a: str, b: str) -> bool:
    try:
        return canonical(a) == canonical(b)
    except TrackbridgeError:
        return a == b


def _check_local_store_exists(t: Target) -> None:
    """A missing SQLite file would be silently created as an empty store: refuse instead."""
    path = sqlite_path(t.inner)
    if path is not None:
        if not path.exists():
            raise SourceNotFoundError(f"{t.safe}: no such SQLite file {path}")
    elif t.inner.startswith("file://"):
        path = Path(urlsplit(t.inner).path)
        if not path.exists():
            raise SourceNotFoundError(f"{t.safe}: no such folder {path}")
