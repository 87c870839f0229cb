"""MLflow, declared once: its URIs, limits and precision, and where its reader
(``trackbridge.exporters.mlflow``) and writer (``trackbridge.importers.mlflow``) are.

Importing this module must stay cheap: the CLI reads every declaration to parse a URI,
and MLflow itself is imported only when a store is opened.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trackbridge.tracker import Capabilities, Limits, Target, Tracker, redact
from trackbridge.trackers.mlflow import uris

# MLflow's documented limits (mlflow.utils.validation); batches keep room for JSON overhead
LIMITS = Limits(
    key_chars=250,
    key_pattern=r"[/\w.\- :]+",
    param_value_chars=6000,
    tag_value_chars=8000,
    metrics_per_batch=1000,
    params_tags_per_batch=100,
    batch_bytes=800_000,
)

# How MLflow words a failure worth another try once its HTTP client or SQLAlchemy gave
# up on it: a busy SQLite file, a dropped connection, a server's temporary refusal.
_TRANSIENT_TEXT = re.compile(
    r"Connection aborted|RemoteDisconnected|Connection reset|ConnectionResetError|Connection refused|"
    r"NewConnectionError|BrokenPipe|IncompleteRead|ChunkedEncodingError|timed out|timeout exception|"
    r"database is locked|ProtocolError",
    re.IGNORECASE,
)
_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})


def _transient(exc: BaseException) -> bool:
    if getattr(exc, "error_code", None) in _TRANSIENT_CODES:
        return True
    kinds = tuple(
        k
        for k in (
            getattr(sys.modules.get("mlflow.exceptions"), "MlflowException", None),
            getattr(sys.modules.get("sqlalchemy.exc"), "OperationalError", None),
            getattr(sys.modules.get("sqlite3"), "OperationalError", None),  # the SQL fast path's
        )
        if k is not None
    )
    return bool(kinds) and isinstance(exc, kinds) and bool(_TRANSIENT_TEXT.search(str(exc)))


def _legacy_key(key: str) -> str:
    """Experiment and model version keys end in ``@<creation time in ms>`` since 0.1
    (``common.project_key``): without it they are the keys earlier bundles and
    destinations hold."""
    if key.startswith(("mlflow:experiment/", "mlflow:model-version/")):
        base, at, ms = key.rpartition("@")
        if at and ms.isdigit():
            return base
    return key


# where MLflow's system metrics monitor logs, and its UI's System metrics tab looks
SYSTEM = "system/"


def _open_source(t: Target, **options: Any) -> Any:
    if t.scheme == uris.EXPORT_IMPORT:
        from trackbridge.exporters.mlflow.export_import import ExportImportSource

        return ExportImportSource(t.inner, **options)
    from trackbridge.exporters.mlflow.source import MlflowSource

    return MlflowSource(t.inner, safe=redact(t.inner), **options)


def _open_sink(t: Target, **options: Any) -> Any:
    from trackbridge.importers.mlflow.sink import MlflowSink

    return MlflowSink(t.inner, safe=redact(t.inner), **options)


def _demo(root: Path, say: Callable[[str], None]) -> str:
    from trackbridge.trackers.mlflow.demo import make_mlflow_demo

    db = root / "source.db"
    if not db.exists():
        say(f"making a demo MLflow store with the mlflow SDK: {db}")
        make_mlflow_demo(uris.sqlite_url(db))
    else:
        say(f"reusing the demo MLflow store {db}")
    return f"mlflow+{uris.sqlite_url(db)}"


TRACKER = Tracker(
    name="mlflow",
    title="MLflow",
    schemes=uris.SCHEMES,
    uris=(
        ("mlflow+http://HOST:PORT", "an MLflow tracking server (or https://)"),
        ("mlflow+sqlite:////ABS/PATH.db", "an MLflow SQLite store, used in-process"),
        ("mlflow+postgresql://…", "an MLflow database store, used in-process (also mysql://, any +driver)"),
        ("mlflow+file:///ABS/PATH", "an MLflow file store (mlruns), used in-process"),
        (
            "mlflow-export-import:///ABS/PATH",
            "a folder mlflow-export-import wrote (export-all, -experiments, -experiment, -models), "
            "read as the store it came from, original times kept (read only)",
        ),
    ),
    capabilities=Capabilities(time_precision_ms=1, limits=LIMITS, live_append=True),
    extra="mlflow",
    accepts=uris.accepts,
    parse=uris.parse,
    open_source=_open_source,
    open_sink=_open_sink,
    check_source=uris.check_source,
    check_destination=uris.check_destination,
    canonical=uris.canonical,
    in_process=uris.is_local,
    sink_options=("artifact_root",),
    read_only=(uris.EXPORT_IMPORT,),
    not_a_destination=(
        "an mlflow-export-import folder is a source only: migrate it into mlflow+… "
        "(its original times kept) or wandb+offline://…"
    ),
    transient=_transient,
    # what MLflow itself keeps in tags for fields the neutral schema has elsewhere, and
    # the tag it maintains on a logged model for the versions made from it
    bookkeeping_tags=("mlflow.parentRunId", "mlflow.user", "mlflow.runName", "mlflow.modelVersions"),
    legacy_key=_legacy_key,
    # MLflow's own system metric names are the neutral ones (trackbridge.native)
    system_metric=lambda key: key[len(SYSTEM) :] if key.startswith(SYSTEM) else None,
    system_metric_key=lambda name: SYSTEM + name,
    process_env=(("MLFLOW_DISABLE_TELEMETRY", "true"),),
    demo=_demo,
    scratch=lambda folder: f"mlflow+{uris.sqlite_url(folder / 'mlflow.db')}",
    order=10,
)
