"""The shapes that move between a source and a sink.

A *source* (an exporter, or a bundle being read) and a *sink* (an importer, or a bundle
being written) share nothing but these types and the neutral schema. That keeps every
adapter small: it only translates its tracker to and from these payloads, and the engine
in ``trackbridge.engine`` does the ordering, parallelism, progress and reporting once.

A run travels as one ``RunPayload``: small tables held in memory, and the metric history
as a lazily produced stream of record batches, so memory follows the largest run rather
than the number of runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
from trackbridge import schema


@dataclass
class FileRef:
    """One file of an artifact. ``fetch`` yields a local path holding its bytes.

    Sources that must download (MLflow over REST) download inside ``fetch`` and delete the
    copy when the context exits, so only one file at a time sits on local disk.
    """

    path: str
    size: int | None
    sha256: str | None
    fetch: Callable[[], contextlib.AbstractContextManager[str]]
    uri: str | None = None


@dataclass
class ArtifactPayload:
    row: dict[str, Any]  # a row of the `artifacts` table
    files: list[FileRef] = field(default_factory=list)


@dataclass
class RunPayload:
    run: dict[str, Any]  # a row of the `runs` table
    params: pa.Table
    tags: pa.Table
    metrics: Callable[[], Iterator[pa.RecordBatch]]
    summary: pa.Table = field(default_factory=lambda: schema.empty("summary"))
    series: pa.Table = field(default_factory=lambda: schema.empty("series"))
    dataset_inputs: pa.Table = field(default_factory=lambda: schema.empty("dataset_inputs"))
    artifact_usage: pa.Table = field(default_factory=lambda: schema.empty("artifact_usage"))
    # Artifacts this run produced and owns: its own files, MLflow 3 logged models, ...
    artifacts: list[ArtifactPayload] = field(default_factory=list)
    # A digest of the run's content when the source can give one cheaply (bundles can).
    fingerprint: str | None = None
    # What the source could not give in full (kind, where, detail): a truncated log, a
    # file already gone. The engine copies these into the run's report.
    source_notes: list[tuple[str, str, str]] = field(default_factory=list)
    # The source's cheap change token from its listing (see ``TOKEN``); importers store
    # it with their completion marker so the next sync can skip the run unread.
    token: str | None = None

    @property
    def key(self) -> str:
        return self.run["run_key"]

    def content_digest(self) -> str:
        """What importers store to tell an unchanged run from a changed one.

        The source's own fingerprint when it has a cheap one (a bundle's checksums, a
        ``.wandb`` file's hash); otherwise a hash of everything the run carries.
        """
        if self.fingerprint is not None:
            return self.fingerprint
        h = digest_head(self)
        for b in self.metrics():
            h.update(b.serialize())  # every value; Array.to_string() elides the middle
        digest_tail(h, self)
        return h.hexdigest()


def digest_head(p: RunPayload) -> Any:
    """The content digest up to the metrics: everything but the points and artifacts.
    (Split so that a writer can feed the points as it writes them: trackbridge.write.)"""
    h = hashlib.sha256()
    for tbl in (p.params, p.tags, p.dataset_inputs, p.summary, p.series):
        h.update(json.dumps(tbl.to_pylist(), default=str, sort_keys=True).encode())
    # the project key in the form earlier versions gave it: qualifying MLflow
    # experiment keys must not make every run look changed after an upgrade
    run = dict(p.run)
    if run.get("project_key"):
        run["project_key"] = legacy_key(run["project_key"])
    h.update(json.dumps(run, default=str, sort_keys=True).encode())
    return h


def digest_tail(h: Any, p: RunPayload) -> None:
    for a in p.artifacts:
        h.update(json.dumps([a.row, [(f.path, f.size) for f in a.files]], default=str).encode())


def legacy_key(key: str) -> str:
    """The key an earlier trackbridge gave the same object, as the tracker the key names
    (``mlflow:…``) declares it (``Tracker.legacy_key``); most keys never changed."""
    from trackbridge import tracker

    system = key.split(":", 1)[0]
    t = next((t for t in tracker.registry() if t.name == system), None)
    return t.legacy_key(key) if t is not None and t.legacy_key is not None else key


def find_by_key(index: dict[str, Any], key: str) -> Any:
    """An object in ``index`` (source key -> object) by ``key``, in either form: a
    destination written by an earlier trackbridge, or a bundle it exported, may hold the
    key in its legacy form (``legacy_key``)."""
    hit = index.get(key)
    if hit is not None:
        return hit
    old = legacy_key(key)
    if old != key:
        return index.get(old)
    matches = [v for k, v in index.items() if legacy_key(k) == key]
    return matches[0] if len(matches) == 1 else None


@dataclass
class RegistryPayload:
    registered_models: pa.Table
    model_versions: pa.Table


@dataclass(frozen=True)
class ModelRule:
    """Which source artifacts become registered model versions, and under what name.

    ``artifact`` and ``type`` are globs (fnmatch) on the artifact's name and type;
    ``model`` is the registered model's name, with ``{artifact}`` and ``{project}``
    filled in; ``aliases`` keeps only the listed aliases (empty: all of them).
    """

    artifact: str = "*"
    type: str = "model"
    model: str = "{artifact}"
    aliases: tuple[str, ...] = ()

    def matches(self, row: dict[str, Any]) -> bool:
        from fnmatch import fnmatchcase

        return fnmatchcase(row.get("name") or "", self.artifact) and fnmatchcase(
            row.get("type") or "", self.type
        )

    def model_name(self, row: dict[str, Any], project: str) -> str:
        return self.model.format(artifact=row["name"], project=project, type=row.get("type") or "")


@dataclass
class Selection:
    """Filters every source honours. Empty means everything."""

    projects: tuple[str, ...] = ()  # names or source ids
    runs: tuple[str, ...] | frozenset[str] = ()  # source ids or run keys (a set when many)
    since: datetime | None = None  # start time at or after
    until: datetime | None = None  # start time before
    include_deleted: bool = True
    registry: bool = True
    # W&B: every artifact of type "model" becomes a registered model version too
    register_models: bool = False
    # ...and every artifact a rule names (sync's config file)
    model_rules: tuple[ModelRule, ...] = ()

    @property
    def rules(self) -> tuple[ModelRule, ...]:
        """The model rules in force: the config's, then ``--register-models``'s."""
        return self.model_rules + ((ModelRule(),) if self.register_models else ())

    def wants_run(self, row: dict[str, Any]) -> bool:
        if self.runs and row["source_id"] not in self.runs and row["run_key"] not in self.runs:
            return False
        if not self.include_deleted and row.get("lifecycle") == "deleted":
            return False
        start = row.get("start_time")
        if self.since and (start is None or start < self.since):
            return False
        return not (self.until and start is not None and start >= self.until)

    def wants_project(self, row: dict[str, Any]) -> bool:
        if not self.projects:
            return True
        return row["name"] in self.projects or row["source_id"] in self.projects


# A listed run row may carry these keys besides the ``runs`` table's columns, when the
# source knows them without reading the run. ``sync`` uses them to skip and to filter.
TOKEN = "_token"  # changes whenever anything in the run changes (sizes+mtimes, heartbeat…)
UPDATED = "_updated"  # when the run last changed (datetime), if the source can tell
LABELS = "_labels"  # the run's labels (W&B tags), if listed
STATUS = "_status"  # the run's neutral status, if listed


def project_row(project_key: str, system: str, name: str) -> dict[str, Any]:
    """A ``projects`` row for a source whose project is only a name (no description or tags)."""
    return {
        "project_key": project_key,
        "system": system,
        "source_id": name,
        "name": name,
        "lifecycle": "active",
        "tags": [],
    }


def named_projects(
    sel: Selection, names: Iterable[str], system: str, key: Callable[[str], str]
) -> list[dict[str, Any]]:
    """The ``projects`` rows of a source whose projects are only names, as ``sel`` wants
    them, once each, by name."""
    out = {}
    for name in names:
        row = project_row(key(name), system, name)
        if sel.wants_project(row):
            out[row["project_key"]] = row
    return sorted(out.values(), key=lambda r: r["name"])


def file_token(kind: str, paths: list[Any]) -> dict[str, Any]:
    """``TOKEN`` and ``UPDATED`` for a run kept in local files that only grow or are
    rewritten: their sizes and modification times tell a changed run without reading it."""
    from datetime import UTC

    stats = [p.stat() for p in paths]
    return {
        TOKEN: f"{kind}:" + ",".join(f"{st.st_size}:{st.st_mtime_ns}" for st in stats),
        UPDATED: datetime.fromtimestamp(max(st.st_mtime for st in stats), tz=UTC) if stats else None,
    }


class TrackerSource:
    """What the tracker exporters share: nothing to close, and a map from the keys of
    objects trackbridge itself imported to the source keys they carry, for verify
    (``ProvenanceSource``)."""

    aliases_move_without_runs = False

    _origin: dict[str, str]
    # key -> the source an imported object came from (trackbridge.uri.canonical), where recorded
    _origin_source: dict[str, str]

    def close(self) -> None:
        pass

    def origin_of(self, kind: str, key: str) -> str:
        """The source key of an object that trackbridge imported; its own key otherwise."""
        return self._origin.get(key, key)

    def recorded_source(self, key: str) -> str | None:
        """Which source an imported object came from, if the importer recorded it (objects
        imported before trackbridge recorded it say nothing)."""
        return self.__dict__.get("_origin_source", {}).get(key)

    def local_key(self, key: str) -> str:
        """This source's key for the object trackbridge imported here from ``key`` (a
        run's parent, as the run's source named it), or ``key`` itself: so that a
        reference reads as one into this source, which the next destination holds."""
        n, inverse = self.__dict__.get("_inverse_origin", (-1, {}))
        if n != len(self._origin):  # objects listed or read since: rebuild once
            inverse = {}
            for mine, theirs in self._origin.items():
                inverse.setdefault(theirs, mine)  # the first, as a scan in order would find
            self.__dict__["_inverse_origin"] = (len(self._origin), inverse)
        return inverse.get(key, key)


class Source(Protocol):
    """What every exporter (and the bundle reader) offers."""

    # W&B online and Neptune's exporter move aliases without touching any run, so a sync
    # must read the registry even when no run changed
    aliases_move_without_runs: bool

    def describe(self) -> str:
        """The source as a URI with no credentials, for manifests and reports."""
        ...

    def projects(self, sel: Selection) -> list[dict[str, Any]]: ...

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def read_run(self, run: dict[str, Any]) -> RunPayload: ...

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        """Artifacts no run owns (a run's own ones travel in its RunPayload)."""
        ...

    def registry(self, sel: Selection) -> RegistryPayload: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """What every importer (and the bundle writer) offers."""

    # (kind, key, detail) of what the sink found and fixed on its own, for the report
    # (duplicates another importer left, removed)
    notices: list[tuple[str, str, str]]

    def describe(self) -> str: ...

    def begin(self, source: str) -> None: ...

    def write_project(self, row: dict[str, Any]) -> None: ...

    def write_run(self, payload: RunPayload, report: Any) -> str:
        """Write one run; return 'new', 'updated' or 'unchanged'."""
        ...

    def write_artifact(self, payload: ArtifactPayload, report: Any) -> None: ...

    def write_registry(self, payload: RegistryPayload, report: Any) -> None: ...

    def finish(self) -> None: ...


@contextlib.contextmanager
def no_local_bytes() -> Iterator[str]:
    """``FileRef.fetch`` of a reference: its bytes live elsewhere (s3://…) and are never copied."""
    from trackbridge.errors import BadInputError

    raise BadInputError("a reference file has no local bytes to copy")
    yield ""  # pragma: no cover


def rows(tbl: pa.Table) -> list[dict[str, Any]]:
    return tbl.to_pylist()


# Optional roles. A source or sink that plays one implements its methods; generic code
# asks with isinstance, never by probing for attribute names.


@runtime_checkable
class ProvenanceSource(Protocol):
    """A destination read back: for each object trackbridge imported, the source key it
    carries and the source it came from (what verify matches and checks)."""

    def origin_of(self, kind: str, key: str) -> str: ...

    def recorded_source(self, key: str) -> str | None: ...


@runtime_checkable
class CopiedSource(Protocol):
    """A source that is a copy of another place (a bundle): ``origin`` names that place."""

    @property
    def origin(self) -> str | None: ...


@runtime_checkable
class NoticingSource(Protocol):
    """A source that holds what it does not carry (an export folder's traces): each
    notice, (kind, what, detail), goes into the report as a mapping does."""

    notices: list[tuple[str, str, str]]


@runtime_checkable
class IncrementalSink(Protocol):
    """A destination that lists, per project, what it holds: source key -> (the source's
    change token when written, destination id), so a sync skips unchanged runs unread."""

    def synced(self, project_key: str) -> dict[str, tuple[str | None, str]]: ...


@runtime_checkable
class PlanningSink(Protocol):
    """A destination that looks at the runs about to be written before the first one
    (W&B groups a parent run with its children, whichever comes first)."""

    def expect_runs(self, runs: list[dict[str, Any]]) -> None: ...


@runtime_checkable
class LiveSink(Protocol):
    """A destination that takes a running job's points as they come (the shim)."""

    def append_points(self, run_id: str, batch: pa.RecordBatch) -> None: ...
