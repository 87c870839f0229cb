"""Turn a source or destination URI into an adapter, through the trackers' declarations.

Nothing here names a tracker: each declares its schemes, how to parse them and how to
open its source and sink (``trackbridge.tracker``). Credentials never come from a URI we
keep: ``redact`` strips any user:password before a URI reaches a manifest, log or
report, and ``canonical`` gives the one spelling of a place that locks and identities
are keyed on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trackbridge import tracker
from trackbridge.errors import DestinationError, TrackbridgeError, UsageError
from trackbridge.tracker import Target, redact

__all__ = ["Target", "canonical", "open_sink", "open_source", "parse", "redact"]

# A plain path, with no scheme, is a bundle: trackbridge's own folder format.
PLAIN_PATH = "bundle"


def parse(uri: str) -> Target:
    if "://" not in uri:
        return Target(PLAIN_PATH, PLAIN_PATH, str(Path(uri).expanduser()), uri)
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    t = tracker.for_scheme(scheme)
    if t is None:
        raise UsageError(
            f"{redact(uri)}: unknown URI scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in tracker.all_schemes())
            + " or a bundle path"
        )
    return Target(t.name, scheme, t.parse(scheme, rest, uri), uri)


def open_source(uri: str, **options: Any) -> Any:
    t = parse(uri)
    d = t.tracker
    if not d.capabilities.reads:
        raise UsageError(f"{t.safe}: {d.not_a_source or f'{d.title} is a destination only'}")
    if d.check_source is not None:
        d.check_source(t)
    return d.open_source(t, **options)


def open_sink(uri: str, **options: Any) -> Any:
    t = parse(uri)
    d = t.tracker
    if not d.capabilities.writes:
        raise UsageError(f"{t.safe}: {d.not_a_destination or f'{d.title} is a source only'}")
    check_destination(t)
    options = {k: v for k, v in options.items() if v is not None}
    for k in sorted(set(options) - {"dry_run", *d.sink_options}):
        raise UsageError(f"--{k.replace('_', '-')}: {d.title} destinations do not take it")
    return d.open_sink(t, **options)


def check_destination(t: Target) -> None:
    """What can be known about a destination before anything is read: a path that is a
    file where a folder must be (or the reverse), a folder that cannot be written, a
    missing driver. Each is one line and an exit code of its own, within a second,
    instead of a failure after minutes of export."""
    d = t.tracker
    if t.scheme in d.read_only:
        raise UsageError(f"{t.safe}: {d.not_a_destination or f'{t.scheme}:// is read only'}")
    if d.check_destination is not None:
        d.check_destination(t)


def default_workers(*uris: str) -> int:
    """Runs in parallel: 4 when every side given is a server or a database, 1 when one is
    a local store or folder (SQLite allows one writer; a disk gains nothing from more).
    The commands give it the side that is written: the destination."""
    targets = [parse(u) for u in uris]
    return 1 if any(t.tracker.is_local(t) for t in targets) else 4


def folder_destination(t: Target) -> None:
    """``check_destination`` for a tracker whose destination is a local folder."""
    writable_folder(t, Path(t.inner))


def writable_folder(t: Target, folder: Path) -> None:
    """A destination folder (or the nearest existing folder above it) that can be written."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{t.safe}: {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{t.safe}: {existing} is a file, not a folder")
    writable(t, None, existing)


def writable(t: Target, file: Path | None, folder: Path) -> None:
    """SQLite needs the folder as well as the file: it writes its journal beside it."""
    for p, what in ((file, "file"), (folder, "folder")):
        if p is not None and not os.access(p, os.W_OK | (os.X_OK if what == "folder" else 0)):
            raise DestinationError(f"{t.safe}: cannot write into the {what} {p} (permission denied)")


def canonical(uri: str) -> str:
    """One spelling per place, with no credentials: what a lock or an identity is keyed on.

    ``wandb+offline:///x`` and ``wandb+offline:///x/``, a relative and an absolute path,
    a symlinked folder and its target, ``http://Host:80/`` and ``http://host``, and
    ``postgresql://`` and ``postgresql+psycopg2://`` at the same database all give the
    same text (a tracker with servers declares how; a folder is its real path).
    """
    t = parse(uri)
    return t.tracker.canonical(t) if t.tracker.canonical is not None else folder_canonical(t)


def folder_canonical(t: Target) -> str:
    """A local folder's one spelling: its real path, the query kept."""
    query = t.raw.split("?", 1)[1] if "?" in t.raw.split("://", 1)[-1] else ""
    path = t.inner.split("?", 1)[0]
    return f"{t.scheme}://{os.path.realpath(path)}" + (f"?{query}" if query else "")


def source_identity(source: object) -> str:
    """The place a source's data came from, canonical: a bundle names the tracker it was
    exported from (its manifest's ``source``), any other source is that place itself.
    Importers record it with each object, so verify can tell this source's objects from
    those of another source consolidated into the same destination."""
    from trackbridge.model import CopiedSource

    text = (source.origin if isinstance(source, CopiedSource) else None) or source.describe()  # type: ignore[attr-defined]
    try:
        return canonical(text)
    except TrackbridgeError:
        return text


def same_place(a: str, b: str) -> bool:
    try:
        return canonical(a) == canonical(b)
    except TrackbridgeError:
        return a == b
