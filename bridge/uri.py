"""Turn a source or destination URI into an adapter.

This is the only place that knows which scheme maps to which exporter or importer, so
adding a tracker means adding a line here. Credentials never come from a URI we keep:
``redact`` strips any user:password before a URI reaches a manifest, log or report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bridge.errors import SourceNotFoundError, UsageError

MLFLOW_SCHEMES = (
    "mlflow+http",
    "mlflow+https",
    "mlflow+sqlite",
    "mlflow+postgresql",
    "mlflow+mysql",
    "mlflow+file",
)
KNOWN = (*MLFLOW_SCHEMES, "bundle", "wandb", "wandb+offline", "neptune+offline", "neptune-exporter", "spool")


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
    if scheme in MLFLOW_SCHEMES:
        return Target("mlflow", uri.split("+", 1)[1], uri)
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


def _check_local_store_exists(t: Target) -> None:
    """A missing SQLite file would be silently created as an empty store: refuse instead."""
    if t.inner.startswith("sqlite:///"):
        path = Path(t.inner[len("sqlite:///") :])
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.exists():
            raise SourceNotFoundError(f"{t.safe}: no such SQLite file {path}")
    elif t.inner.startswith("file://"):
        path = Path(urlsplit(t.inner).path)
        if not path.exists():
            raise SourceNotFoundError(f"{t.safe}: no such folder {path}")
