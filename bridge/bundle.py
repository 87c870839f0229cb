"""The bundle: trackbridge's on-disk form of the neutral schema.

Layout (docs/schema.md has the details)::

    manifest.json               schema version, producer, source, counts, checksums
    <table>/<unit>.parquet      one Parquet dataset per table, one file per unit
    blobs/sha256/ab/cd/<hex>    artifact bytes, content-addressed
    _complete/<unit>.json       the unit's marker: its files, row counts and checksums

A *unit* is what becomes visible atomically: a project, a run (with its metrics,
params, files, ...), a standalone artifact, or the registry. Every file is written to a
temporary name and renamed; the marker is written last, so a unit whose export was
killed half-way has no marker and readers never see it. Re-exporting a unit first
removes its marker, so a crash mid-rewrite cannot leave old and new files mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from trackbridge import schema
from trackbridge.errors import BadInputError, SourceNotFoundError, UsageError
from trackbridge.files import (
    atomic_path,
    atomic_write_bytes,
    copy_hashed,
    safe_relpath,
    sha256_file,
)
from trackbridge.model import ArtifactPayload, FileRef, RegistryPayload, RunPayload
from trackbridge.untrusted import blob_relpath, check_manifest, check_marker, readable_version
from trackbridge.uri import same_place
from trackbridge.version import __version__
from trackbridge.write import count_points

FORMAT = "trackbridge-bundle"
MANIFEST = "manifest.json"
MARKERS = "_complete"
RUN_TABLES = ("runs", "params", "tags", "summary", "series", "dataset_inputs", "artifact_usage")


def unit_id(kind: str, key: str) -> str:
    return f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:24]}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


# --------------------------------------------------------------------------- writer


def _json_file(path: Path) -> Any:
    """A bundle's JSON file, or one line naming the file and the place it goes wrong."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}: line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (byte {e.start})") from e


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        if not root.exists():
            raise SourceNotFoundError(f"{root}: no such bundle")
        raise BadInputError(f"{path}: missing; {root} is not a trackbridge bundle")
    if path.is_symlink() or not path.is_file():
        raise BadInputError(f"{path}: must be a plain file of the bundle, not a link or a folder")
    body = _json_file(path)
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a trackbridge bundle manifest")
    check_manifest(path, body)
    version = body.get("schema_version")
    if not readable_version(version):
        raise BadInputError(
            f"{path}: bundle schema version {version!r} is not supported by trackbridge "
            f"{__version__} (it reads version {', '.join(map(str, sorted(schema.READABLE_SCHEMA_VERSIONS)))})"
        )
    return body


def load_markers(root: Path) -> Iterator[dict[str, Any]]:
    d = root / MARKERS
    if not d.is_dir():
        return
    for p in sorted(d.glob("*.json")):
        if p.is_symlink() or not p.is_file():
            raise BadInputError(f"{p}: a unit marker must be a plain file of the bundle, not a link")
        m = _json_file(p)
        check_marker(p, m)
        m["_marker"] = str(p)
        yield m


class BundleWriter:
    """A Sink that writes a bundle folder. A dry run checks the folder, counts what
    would be written and writes nothing."""

    def __init__(self, path: str | Path, dry_run: bool = False) -> None:
        self.root = Path(path)
        self.dry_run = dry_run
        self.source = ""
        self.notices: list[tuple[str, str, str]] = []

    def describe(self) -> str:
        return f"bundle://{self.root.resolve()}"

    def begin(self, source: str) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"{self.root}: exists and is not a folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / MANIFEST).exists():
            raise UsageError(f"{self.root}: folder is not empty and is not a bundle; choose a new path")
        self.source = source
        old = self._old_manifest()
        if old and old.get("source") is not None and not same_place(old["source"], source):
            raise UsageError(
                f"{self.root}: bundle holds data from {old.get('source')}, not {source}; "
                "use a new bundle path"
            )
        if not self.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)
            self._write_manifest(complete=False)

    def _old_manifest(self) -> dict[str, Any] | None:
        p = self.root / MANIFEST
        if not p.exists():
            return None
        return read_manifest(self.root)

    def write_project(self, row: dict[str, Any]) -> None:
        if self.dry_run:
            return
        self._write_unit("project", row["project_key"], {"projects": schema.table("projects", [row])})

    def write_run(self, payload: RunPayload, report: Any) -> str:
        key = payload.key
        uid = unit_id("run", key)
        existed = (self.root / MARKERS / f"{uid}.json").exists()
        if self.dry_run:
            report.points += count_points(payload)
            return "updated" if existed else "new"
        tables: dict[str, pa.Table] = {
            "runs": schema.table("runs", [payload.run]),
            "params": payload.params,
            "tags": payload.tags,
            "summary": payload.summary,
            "series": payload.series,
            "dataset_inputs": payload.dataset_inputs,
            "artifact_usage": payload.artifact_usage,
        }
        batches = list(payload.metrics())
        metrics = pa.Table.from_batches(batches, schema=schema.SCHEMAS["metrics"])
        if metrics.num_rows:
            metrics = metrics.sort_by(
                [
                    ("key", "ascending"),
                    ("step", "ascending"),
                    ("timestamp", "ascending"),
                    ("value", "ascending"),
                ]
            )
        tables["metrics"] = metrics
        report.points += metrics.num_rows
        art_rows, file_rows, blobs = self._store_artifacts(payload.artifacts, report)
        tables["artifacts"] = schema.table("artifacts", art_rows)
        tables["artifact_files"] = schema.table("artifact_files", file_rows)
        # The source's own fingerprint travels on, so a run reaches a destination with
        # the same fingerprint through a bundle (migrate) as directly (sync).
        self._write_unit("run", key, tables, blobs=blobs, source_fingerprint=payload.fingerprint)
        return "updated" if existed else "new"

    def write_artifact(self, payload: ArtifactPayload, report: Any) -> None:
        if self.dry_run:
            return
        art_rows, file_rows, blobs = self._store_artifacts([payload], report)
        self._write_unit(
            "artifact",
            payload.row["artifact_key"],
            {
                "artifacts": schema.table("artifacts", art_rows),
                "artifact_files": schema.table("artifact_files", file_rows),
            },
            blobs=blobs,
        )

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        if self.dry_run:
            return
        self._write_unit(
            "registry",
            "registry",
            {
                "registered_models": payload.registered_models,
                "model_versions": payload.model_versions,
            },
        )

    def finish(self) -> None:
        if not self.dry_run:
            self._write_manifest(complete=True)

    # -- internals

    def _store_artifacts(
        self, artifacts: list[ArtifactPayload], report: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        art_rows, file_rows, blobs = [], [], []
        for art in artifacts:
            art_rows.append(art.row)
            where = f"artifact {art.row['artifact_key']}"
            for f in art.files:
                rel = safe_relpath(f.path, where)
                if f.uri is not None and f.sha256 is None:
                    # a reference: the bytes live elsewhere and are not copied
                    file_rows.append(
                        {
                            "artifact_key": art.row["artifact_key"],
                            "path": rel,
                            "size": f.size,
                            "sha256": None,
                            "uri": f.uri,
                        }
                    )
                    continue
                digest, size = self._store_blob(f)
                blobs.append(digest)
                report.files += 1
                report.bytes += size
                file_rows.append(
                    {
                        "artifact_key": art.row["artifact_key"],
                        "path": rel,
                        "size": size,
                        "sha256": digest,
                        "uri": f.uri,
                    }
                )
        return art_rows, file_rows, blobs

    def _store_blob(self, f: FileRef) -> tuple[str, int]:
        if f.sha256 and (self.root / blob_relpath(f.sha256)).exists():
            return f.sha256, int(f.size or (self.root / blob_relpath(f.sha256)).stat().st_size)
        with f.fetch() as local:
            tmp, digest, size = copy_hashed(local, self.root / "blobs" / "tmp")
        final = self.root / blob_relpath(digest)
        if final.exists():
            tmp.unlink()
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        return digest, size

    def _write_unit(
        self,
        kind: str,
        key: str,
        tables: dict[str, pa.Table],
        blobs: list[str] | None = None,
        source_fingerprint: str | None = None,
    ) -> None:
        uid = unit_id(kind, key)
        marker = self.root / MARKERS / f"{uid}.json"
        # The unit is invisible from here until its new marker lands.
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        entries: dict[str, Any] = {}
        for name, tbl in tables.items():
            rel = f"{name}/{uid}.parquet"
            path = self.root / rel
            if tbl.num_rows == 0:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            tbl = tbl.cast(schema.SCHEMAS[name])
            with atomic_path(path) as tmp:
                pq.write_table(tbl, tmp, compression="zstd")
            entries[name] = {"file": rel, "rows": tbl.num_rows, "sha256": sha256_file(path)}
        body = {
            "kind": kind,
            "key": key,
            "schema_version": schema.SCHEMA_VERSION,
            "written_at": _now(),
            "tables": entries,
            "blobs": sorted(set(blobs or [])),
        }
        if source_fingerprint:
            body["source_fingerprint"] = source_fingerprint
        atomic_write_bytes(marker, json.dumps(body, indent=1).encode())

    def _write_manifest(self, complete: bool) -> None:
        counts = dict.fromkeys(schema.TABLES, 0)
        checksums: dict[str, str] = {}
        units: dict[str, int] = {}
        blobs: set[str] = set()
        for m in load_markers(self.root):
            units[m["kind"]] = units.get(m["kind"], 0) + 1
            blobs.update(m.get("blobs", []))
            for name, e in m["tables"].items():
                counts[name] += e["rows"]
                checksums[e["file"]] = e["sha256"]
        blob_bytes = sum(
            (self.root / blob_relpath(b)).stat().st_size
            for b in blobs
            if (self.root / blob_relpath(b)).exists()
        )
        body = {
            "format": FORMAT,
            "schema_version": schema.SCHEMA_VERSION,
            "producer": f"trackbridge {__version__}",
            "source": self.source,
            "written_at": _now(),
            "complete": complete,
            "units": units,
            "counts": counts,
            "blobs": {"count": len(blobs), "bytes": blob_bytes},
            "checksums": dict(sorted(checksums.items())),
        }
        atomic_write_bytes(self.root / MANIFEST, json.dumps(body, indent=1).encode())


# --------------------------------------------------------------------------- reader
