"""What the MLflow exporter and importer must agree on.

The importer writes bookkeeping (identity tags, a record of every value it had to map
to fit MLflow's limits) that the exporter reads back to restore the original data. Both
sides import the names from here so they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trackbridge.errors import MissingExtraError, first_line
from trackbridge.model import find_by_key, legacy_key  # noqa: F401 (find_by_key: the importer's)
from trackbridge.retry import POLICY, HttpStatusError, RetryingProxy

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# trackbridge draws its own progress; MLflow's per-file bars would flood the terminal.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# ...and its "View run at" line per terminated run would bury the summary.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# trackbridge retries itself (trackbridge.retry): MLflow's urllib3 retries would repeat a
# create-run whose response was lost and so make a duplicate run, and they hide the
# status and Retry-After of the failure from us.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

# Tags the importer owns. Anything under this prefix is bookkeeping, not user data.
TB_PREFIX = "trackbridge."
TAG_SOURCE_KEY = "trackbridge.source_key"
TAG_FINGERPRINT = "trackbridge.fingerprint"
# Where the object came from (``trackbridge.uri.canonical`` of the source), so verify can tell
# an object of this source that the source no longer has from one of another source.
TAG_SOURCE = "trackbridge.source"
# Set at creation: which of two copies of one source object is kept (``trackbridge.claims``).
TAG_CLAIM = "trackbridge.claim"
# A copy that lost to an earlier claim: deleted, and ignored by every trackbridge reader.
TAG_DUPLICATE_OF = "trackbridge.duplicate_of"
# The source's change token (trackbridge.model.TOKEN), written with the fingerprint: a sync
# that lists the same token skips the run without reading it.
TAG_SOURCE_TOKEN = "trackbridge.source_token"
TAG_MAPPED = "trackbridge.mapped"  # set when mapping.json holds originals to restore
TAG_SOURCE_STATUS = "trackbridge.source_status"
TAG_SOURCE_CREATED = "trackbridge.source_created_at"
TAG_SOURCE_VERSION = "trackbridge.source_version"
TAG_SOURCE_ARTIFACT = "trackbridge.source_artifact"  # on a version made from a source artifact
MAPPING_ARTIFACT = "trackbridge/mapping.json"
MAPPING_DIR = "trackbridge"
TAG_INCOMPLETE = "trackbridge.source_incomplete"
TAG_STEP_SCALE = "trackbridge.step_scale"  # metric steps are the exact step × this
# What MLflow has no field for (summary, series, non-MLflow artifacts and lineage, fork
# points) travels in these run files, which the exporter reads back.
TAG_EXTRAS = "trackbridge.extras"
# A run's bookkeeping beyond its identity, in one tag, so that MLflow's runs table shows
# trackbridge in two columns (the source key and this) rather than six: its claim, source,
# fingerprint, change token and which of its own files it wrote ("extras", "mapped").
# Runs trackbridge 0.1 wrote hold one tag each (the TAG_* above): ``run_state`` reads both.
TAG_STATE = "trackbridge.state"
_STATE_TAGS = {
    "claim": TAG_CLAIM,
    "source": TAG_SOURCE,
    "fingerprint": TAG_FINGERPRINT,
    "token": TAG_SOURCE_TOKEN,
    "extras": TAG_EXTRAS,
    "mapped": TAG_MAPPED,
}
LEGACY_STATE_TAGS = tuple(_STATE_TAGS.values())
EXTRAS_ARTIFACT = "trackbridge/extras.json"
SERIES_ARTIFACT = "trackbridge/series.parquet"
# The source's bookkeeping series (W&B's _runtime), kept out of the user's metrics
KEPT_METRICS_ARTIFACT = "trackbridge/metrics.parquet"
# Source artifacts (W&B artifacts, Neptune files) land under this run folder.
ARTIFACTS_DIR = "artifacts"

# Neutral run fields that MLflow keeps as ordinary, visible tags.
RUN_FIELD_TAGS = {
    "group": "run.group",
    "job_type": "run.job_type",
    "host": "run.host",
    "git_commit": "mlflow.source.git.commit",
    "git_remote": "mlflow.source.git.repoURL",
    "command": "mlflow.source.name",
}
# Each label (a W&B tag, a Neptune sys/tags entry) is one tag with an empty value.
LABEL_PREFIX = "label."

# Tags MLflow itself maintains on a logged model; importing them would be wrong, since
# the destination writes its own (e.g. which registry versions point at the model).
MANAGED_MODEL_TAGS = frozenset({"mlflow.modelVersions"})

TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
TAG_USER = "mlflow.user"
TAG_RUN_NAME = "mlflow.runName"

TO_MLFLOW_STATUS = {
    "running": "RUNNING",
    "scheduled": "SCHEDULED",
    "finished": "FINISHED",
    "failed": "FAILED",
    "killed": "KILLED",
    "crashed": "FAILED",
}
FROM_MLFLOW_STATUS = {v: k for k, v in TO_MLFLOW_STATUS.items() if k != "crashed"}


def run_state(tags: dict[str, str]) -> dict[str, str]:
    """A run's bookkeeping (``TAG_STATE``), from its one tag or from the separate tags an
    earlier trackbridge wrote; an unreadable state counts as none (the run is written
    again, never skipped on a guess)."""
    out = {f: tags[t] for f, t in _STATE_TAGS.items() if t in tags}
    text = tags.get(TAG_STATE)
    if text:
        try:
            got = json.loads(text)
        except ValueError:
            got = None
        if isinstance(got, dict):
            out.update({k: v for k, v in got.items() if k in _STATE_TAGS and isinstance(v, str)})
    return out


def state_text(state: dict[str, str]) -> str:
    return json.dumps(dict(sorted(state.items())), separators=(",", ":"))


def display_name(run: dict[str, Any]) -> str | None:
    """The run's name in MLflow. A source run without one (a W&B offline run is named
    only when synced) is called by its source id, which its users know, rather than a
    random name MLflow would make up; the exporter restores the missing name."""
    return run.get("name") or run.get("source_id") or None


def artifact_dir(row: dict[str, Any]) -> str:
    """Where a source artifact's files sit in the run: one folder per name and version."""
    version = row.get("version") or (row.get("digest") or "")[:16] or "files"
    return f"{ARTIFACTS_DIR}/{row['name']}/{version}"


def client(tracking_uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise MissingExtraError("mlflow", "mlflow") from e
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _create_sqlite_store(tracking_uri)
    if is_database(tracking_uri):
        _probe_database(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        _see_error_responses()
    # (MlflowClient opens its store at once: a new database gets MLflow's tables here)
    made = _opening(lambda: MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
    return RetryingProxy(made, POLICY)


def _see_error_responses() -> None:
    """Let our retries see the status and Retry-After of MLflow's failed requests.

    With its own retries off, MLflow's REST layer turns a 429/503 into an error whose
    text has the status but not the Retry-After header. This wraps the one function it
    sends every request through so that, in exactly that case (no retries of its own,
    a status it would retry), the error raised carries the response's headers; MLflow
    still wraps it in an MlflowException, which keeps it as ``__context__`` for
    trackbridge.retry to read. With MLflow's retries on, nothing changes.
    """
    from mlflow.utils import rest_utils

    original = getattr(rest_utils, "_get_http_response_with_retries", None)
    if original is None or getattr(original, "_trackbridge", False):
        return  # another MLflow version, or done already: plain backoff still applies

    def send(
        method, url, max_retries, backoff_factor, backoff_jitter, retry_codes, raise_on_status=True, **kw
    ):
        if max_retries != 0 or not raise_on_status:
            return original(
                method, url, max_retries, backoff_factor, backoff_jitter, retry_codes, raise_on_status, **kw
            )
        resp = original(method, url, max_retries, backoff_factor, backoff_jitter, retry_codes, False, **kw)
        if resp.status_code in retry_codes:
            raise HttpStatusError(resp.status_code, f"{method} {url}", resp.headers.get("Retry-After"))
        return resp

    send._trackbridge = True  # type: ignore[attr-defined]
    rest_utils._get_http_response_with_retries = send


def rest(creds: Any, endpoint: str, method: str, **kw: Any) -> Any:
    """One REST call we make ourselves (the bulk metric paths), retried under POLICY.

    Unlike MlflowClient's calls, these see the response, so a 429/503's Retry-After is
    obeyed exactly.
    """
    from mlflow.utils.rest_utils import http_request

    def once() -> Any:
        resp = http_request(creds, endpoint, method, max_retries=0, raise_on_status=False, **kw)
        if resp.status_code != 200:
            raise HttpStatusError(
                resp.status_code, f"{endpoint}: {resp.text[:200]}", resp.headers.get("Retry-After")
            )
        return resp

    return POLICY.call(once)


def store_of(client: Any) -> Any:
    """The client's store, opened now. For a database store this connects (and runs
    MLflow's schema migrations on a new one), so a database that is down, refuses the
    account or is not MLflow's fails here, as one line, not later as "a bug"."""
    return _opening(lambda: client._tracking_client.store)


def _opening(open_store: Callable[[], Any]) -> Any:
    for attempt in range(5):
        try:
            return open_store()
        except Exception as e:
            dbapi = getattr(sys.modules.get("sqlalchemy.exc"), "DBAPIError", None)
            if dbapi is None or not isinstance(e, dbapi):
                raise
            if attempt < 4 and _RACED_SCHEMA.search(str(e)):
                # another process made MLflow's tables in this new database at the same
                # moment (its migrations ran first): open it again, as it now stands
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StoreUnreachable(first_line(e)) from e
    raise AssertionError("unreachable")  # pragma: no cover


# How PostgreSQL and MySQL word a table or type that a concurrent migration made first.
_RACED_SCHEMA = re.compile(r"already exists|duplicate key|UniqueViolation|Duplicate entry", re.IGNORECASE)


def _probe_database(tracking_uri: str) -> None:
    """One connection to a database store, retried briefly: MLflow's own store retries a
    failed connection ten times over about 100 s, which a wrong host, port or password
    should not cost (a server restarting mid-sync is what the retries later are for)."""
    import sqlalchemy
    from trackbridge.retry import RetryPolicy

    engine = sqlalchemy.create_engine(tracking_uri, poolclass=sqlalchemy.pool.NullPool)

    def connect() -> None:
        with engine.connect():
            pass

    try:
        RetryPolicy(attempts=min(3, POLICY.attempts), initial=0.5, maximum=2.0).call(connect)
    except sqlalchemy.exc.DBAPIError as e:
        raise StoreUnreachable(first_line(e)) from e
    finally:
        engine.dispose()


class StoreUnreachable(Exception):
    """A database store that could not be opened; the reader and the writer each say it
    as their side's error."""


def first_contact(client: Any) -> None:
    """One cheap request that proves the server answers, retried only briefly.

    A wrong host or port should fail in seconds, not after the whole retry budget that
    a server restarting in the middle of a long sync deserves.
    """
    from trackbridge.retry import RetryPolicy

    quick = RetryPolicy(attempts=min(3, POLICY.attempts), initial=0.5, maximum=2.0)
    quick.call(client.unwrapped.search_experiments, max_results=1)


def change_once(change: Callable[[], Any], done: Callable[[], bool]) -> None:
    """A state change (restore, delete) that MLflow refuses to repeat: if a retry fails
    because the first, unanswered attempt already made it, the change is done."""
    from mlflow.exceptions import MlflowException

    try:
        change()
    except MlflowException:
        if not done():
            raise


def create_once(create: Callable[[], Any], find: Callable[[], Any]) -> Any:
    """Create something exactly once although the call is retried.

    A request whose response is lost (a dropped connection) may still have been applied.
    Before each retry we therefore look for the object by its source key (``find``), and
    only create it if it is not there: a retried create never makes a duplicate.
    """
    tries = 0

    def go() -> Any:
        nonlocal tries
        tries += 1
        if tries > 1:
            found = find()
            if found is not None:
                return found
        try:
            return create()
        except Exception as e:
            # another process made it between our look-up and our create (an experiment
            # or a registered model, whose names are unique)
            if getattr(e, "error_code", None) == "RESOURCE_ALREADY_EXISTS":
                found = find()
                if found is not None:
                    return found
            raise

    return POLICY.call(go)


PAGE = 1000  # experiments, runs, versions and registered models a search request


def paged(search: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every item of a paged MLflow search; ``search(token)`` returns one PagedList."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def walk_artifacts(lister: Callable[[str | None], Any], path: str | None = None) -> Iterator[Any]:
    """Every file (not folder) below ``path``; ``lister`` is list_artifacts or its kin."""
    for fi in lister(path):
        if fi.is_dir:
            yield from walk_artifacts(lister, fi.path)
        else:
            yield fi


def endpoint_missing(e: BaseException) -> bool:
    """True only when the server lacks the API (a pre-3.0 MLflow has no logged models).

    Any other failure must surface: treating it as "no logged models" would drop them.
    """
    return getattr(e, "error_code", None) in ("ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED")


def sqlite_artifact_root(tracking_uri: str) -> Path | None:
    from trackbridge.trackers.mlflow.uris import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    db = db.resolve()
    return db.parent / f"{db.stem}-artifacts"


def store_lock(tracking_uri: str) -> Any:
    """A lock that every trackbridge process writing the same in-process store shares,
    held while it looks an object up by its source key and creates it: two importers
    into one store then never both create it. For SQLite or a file store, the store's
    folder; for PostgreSQL and MySQL, a lock of the database server itself, for that one
    database (an advisory lock, ``GET_LOCK``), which reaches every machine that writes
    it. A
    tracking server is not locked here; ``trackbridge.claims`` guards those."""
    from trackbridge.locks import folder_lock
    from trackbridge.trackers.mlflow.uris import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None:
        return folder_lock(db.parent)
    if tracking_uri.startswith("file:"):
        from urllib.parse import urlsplit

        return folder_lock(urlsplit(tracking_uri).path)
    if is_database(tracking_uri):
        return _database_lock(tracking_uri)
    return contextlib.nullcontext()


def is_locked(tracking_uri: str) -> bool:
    """Whether ``store_lock`` reaches every other trackbridge writing this store."""
    return tracking_uri.startswith(("sqlite:", "file:")) or is_database(tracking_uri)


_LOCK_ENGINES: dict[str, Any] = {}
_LOCK = threading.Lock()
_LOCK_NAME = "trackbridge.store_lock"
_MYSQL_LOCK = f"CONCAT('{_LOCK_NAME}:', SHA1(DATABASE()))"  # within MySQL's 64 characters
_LOCK_KEY = int.from_bytes(hashlib.sha256(_LOCK_NAME.encode()).digest()[:8], "big", signed=True)


@contextmanager
def _database_lock(tracking_uri: str) -> Iterator[None]:
    """The database server's own lock, on a connection of its own (it is held by that
    session, and released by it, or by the server when a killed importer's connection
    drops: a kill -9 never leaves it held)."""
    import sqlalchemy

    with _LOCK:
        engine = _LOCK_ENGINES.get(tracking_uri)
        if engine is None:
            engine = _LOCK_ENGINES[tracking_uri] = sqlalchemy.create_engine(tracking_uri, pool_size=2)
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        if postgres:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
        else:
            # GET_LOCK names are the whole server's (PostgreSQL's advisory locks are one
            # database's): named after this database, other stores' imports never wait
            got = conn.exec_driver_sql(f"SELECT GET_LOCK({_MYSQL_LOCK}, 3600)").scalar()
            if got != 1:
                raise TimeoutError(f"the database lock {_LOCK_NAME} was not granted within an hour")
        try:
            yield
        finally:
            if postgres:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
            else:
                conn.exec_driver_sql(f"SELECT RELEASE_LOCK({_MYSQL_LOCK})")
            conn.commit()


def _create_sqlite_store(tracking_uri: str) -> None:
    """Create a new SQLite store with its artifact root beside the database, exactly once
    however many processes race to create it.

    Left to MlflowClient, a new store's "Default" experiment stores artifacts in
    ./mlruns relative to wherever the command happened to run. The store is built under
    a temporary name (MLflow's schema migrations are not atomic in SQLite, and a store
    killed half-way through them never opens again) and then hard-linked to its name,
    which fails rather than replace a store that another process created meanwhile; the
    folder's lock makes the others wait for the first and then find its store.
    """
    from trackbridge.locks import folder_lock
    from trackbridge.trackers.mlflow.uris import sqlite_path, sqlite_url

    root = sqlite_artifact_root(tracking_uri)
    db = sqlite_path(tracking_uri)
    if root is None or db is None or db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with folder_lock(db.parent):
        if db.exists():
            return  # another process made it while we waited
        tmp = db.with_name(f".{db.name}.{os.getpid()}.creating")
        try:
            SqlAlchemyStore(sqlite_url(tmp), root.as_uri()).engine.dispose()
            try:
                os.link(tmp, db)
            except FileExistsError:
                pass  # made by a process that did not lock: theirs stands
            except OSError:  # a file system without hard links: the lock still orders us
                if not db.exists():
                    os.replace(tmp, db)
        finally:
            tmp.unlink(missing_ok=True)


def ms_to_dt(ms: int | None) -> datetime | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def dt_to_ms(dt: datetime | None) -> int | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # integer arithmetic, truncating: the same rule as every sub-ms timestamp we report
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def experiment_artifact_location(tracking_uri: str, name: str, root: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: under ``root`` (``--artifact-root``), else
    beside a SQLite database; never in the current folder.

    MLflow's default for an in-process store is ./mlruns relative to wherever the
    command runs; for other stores (servers) the store decides, so None. The folder is
    named from the experiment's name, as its id is not known before it is created.
    """
    leaf = hashlib.sha1(name.encode()).hexdigest()[:16]
    if root is not None:
        return f"{root.rstrip('/')}/{leaf}"
    local = sqlite_artifact_root(tracking_uri)
    return None if local is None else (local / leaf).as_uri()


def artifact_root_uri(root: str) -> str:
    """``--artifact-root`` as MLflow stores a location: a URI (``s3://…``, ``file:///…``)
    as given, a local folder as an absolute ``file:`` URI (a relative one against the
    current folder, said once here rather than resolved by each later reader)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", root):
        return root
    return Path(root).expanduser().resolve().as_uri()


def is_database(tracking_uri: str) -> bool:
    """An in-process database store other than SQLite (PostgreSQL, MySQL, MSSQL)."""
    from trackbridge.trackers.mlflow.uris import DATABASES

    scheme = tracking_uri.split("://", 1)[0].split("+")[0]
    return scheme in DATABASES and scheme != "sqlite"


def run_key(run_id: str) -> str:
    return f"mlflow:run/{run_id}"


def project_key(experiment_id: str, created_ms: int | None = None) -> str:
    """An experiment's key. Experiment ids are small numbers that every store reuses, so
    the key also holds the experiment's creation time: consolidating several stores into
    one, each one's experiment 1 keeps its own identity. The creation time is the
    experiment's own, so the key is the same however the store is reached (a server, or
    its database directly). A store too old to record it gives the plain key."""
    base = f"mlflow:experiment/{experiment_id}"
    return f"{base}@{created_ms}" if created_ms is not None else base


def model_key(model_id: str) -> str:
    return f"mlflow:model/{model_id}"


def files_key(run_id: str) -> str:
    return f"mlflow:run/{run_id}#files"


def version_key(name: str, version: str, created_ms: int | None = None) -> str:
    """A model version's key, with its creation time for the same reason as
    ``project_key``: two stores' ``churn`` v1 are two versions."""
    base = f"mlflow:model-version/{name}/{version}"
    return f"{base}@{created_ms}" if created_ms is not None else base


def version_origin(tags: dict[str, str]) -> str | None:
    """The source key a destination model version carries, in today's form: a version an
    earlier trackbridge registered has the plain key, and its source's creation time in
    ``TAG_SOURCE_CREATED``, which together give the qualified key."""
    key = tags.get(TAG_SOURCE_KEY)
    created = tags.get(TAG_SOURCE_CREATED)
    if key and created and key.startswith("mlflow:model-version/") and legacy_key(key) == key:
        try:
            return f"{key}@{dt_to_ms(datetime.fromisoformat(created))}"
        except ValueError:
            return key
    return key


def is_bookkeeping(tag_key: str) -> bool:
    return tag_key.startswith(TB_PREFIX)


def user_tags(tags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tags.items() if not is_bookkeeping(k)}


_GLOBAL_URI_LOCK = threading.Lock()


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the duration of a call.

    MLflow's in-process registry store resolves ``models:/<id>`` sources through the
    global tracking URI rather than the client's (a TODO in MLflow itself), so
    registering a version of a logged model in a SQLite store fails without this.
    Both the module global and the environment variable are restored afterwards.
    """
    from mlflow.tracking._tracking_service import utils

    with _GLOBAL_URI_LOCK:
        before_global = utils._tracking_uri
        before_env = os.environ.get("MLFLOW_TRACKING_URI")
        utils.set_tracking_uri(uri)
        try:
            yield
        finally:
            utils.set_tracking_uri(before_global)
            if before_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before_env
