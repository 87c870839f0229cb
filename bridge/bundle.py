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

from bridge import __version__, schema
from bridge.errors import BadInputError, SourceNotFoundError, UsageError, first_line
from bridge.files import (
    atomic_path,
    atomic_write_bytes,
    copy_hashed,
    safe_relpath,
    sha256_file,
)
from bridge.model import ArtifactPayload, FileRef, RegistryPayload, RunPayload, Selection
from bridge.untrusted import (
    blob_relpath,
    check_blob,
    check_manifest,
    check_marker,
    inside,
    readable_version,
    verified_blob,
)
from bridge.uri import same_place

FORMAT = "trackbridge-bundle"
MANIFEST = "manifest.json"
MARKERS = "_complete"
RUN_TABLES = ("runs", "params", "tags", "summary", "series", "dataset_inputs", "artifact_usage")


def unit_id(kind: str, key: str) -> str:
    return f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:24]}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


# --------------------------------------------------------------------------- writer


class BundleWriter:
    """A Sink that writes a bundle folder."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.source = ""

    def describe(self) -> str:
        return f"bundle://{self.root.resolve()}"

    def begin(self, source: str) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"{self.root}: exists and is not a folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / MANIFEST).exists():
            raise UsageError(f"{self.root}: folder is not empty and is not a bundle; choose a new path")
        self.root.mkdir(parents=True, exist_ok=True)
        self.source = source
        old = self._old_manifest()
        if old and old.get("source") is not None and not same_place(old["source"], source):
            raise UsageError(
                f"{self.root}: bundle holds data from {old.get('source')}, not {source}; "
                "use a new bundle path"
            )
        self._write_manifest(complete=False)

    def _old_manifest(self) -> dict[str, Any] | None:
        p = self.root / MANIFEST
        if not p.exists():
            return None
        return read_manifest(self.root)

    def write_project(self, row: dict[str, Any]) -> None:
        self._write_unit("project", row["project_key"], {"projects": schema.table("projects", [row])})

    def write_run(self, payload: RunPayload, report: Any) -> str:
        key = payload.key
        uid = unit_id("run", key)
        existed = (self.root / MARKERS / f"{uid}.json").exists()
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
        self._write_unit(
            "registry",
            "registry",
            {
                "registered_models": payload.registered_models,
                "model_versions": payload.model_versions,
            },
        )

    def finish(self) -> None:
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
        for m in _load_markers(self.root):
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


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        if not root.exists():
            raise SourceNotFoundError(f"{root}: no such bundle")
        raise BadInputError(f"{path}: missing; {root} is not a trackbridge bundle")
    if path.is_symlink() or not path.is_file():
        raise BadInputError(f"{path}: must be a plain file of the bundle, not a link or a folder")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}: line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (byte {e.start})") from e
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


def _load_markers(root: Path) -> Iterator[dict[str, Any]]:
    d = root / MARKERS
    if not d.is_dir():
        return
    for p in sorted(d.glob("*.json")):
        if p.is_symlink() or not p.is_file():
            raise BadInputError(f"{p}: a unit marker must be a plain file of the bundle, not a link")
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise BadInputError(f"{p}: line {e.lineno} column {e.colno}: {e.msg}") from e
        except UnicodeDecodeError as e:
            raise BadInputError(f"{p}: not UTF-8 text (byte {e.start})") from e
        check_marker(p, m)
        m["_marker"] = str(p)
        yield m


class BundleSource:
    """A Source that reads a bundle; only units with a marker exist for it."""

    def __init__(self, path: str | Path, verify_checksums: bool = True) -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.verify_checksums = verify_checksums
        self.units: dict[str, list[dict[str, Any]]] = {}
        for m in _load_markers(self.root):
            self.units.setdefault(m["kind"], []).append(m)
        self._run_units = {m["key"]: m for m in self.units.get("run", [])}

    def describe(self) -> str:
        return f"bundle://{self.root.resolve()}"

    @property
    def origin(self) -> str | None:
        """The tracker the bundle was exported from, as its manifest records it."""
        src = self.manifest.get("source")
        return src if isinstance(src, str) and src else None

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    # -- table access

    def read_table(self, marker: dict[str, Any], name: str) -> pa.Table:
        entry = marker["tables"].get(name)
        if entry is None:
            return schema.empty(name)
        path = self._checked_file(entry)
        try:
            tbl = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(f"{path}: not a readable Parquet file ({first_line(e, limit=500)})") from e
        if tbl.num_rows != entry["rows"]:
            raise BadInputError(f"{path}: holds {tbl.num_rows} rows, its marker says {entry['rows']}")
        return self._conform(tbl, name, path)

    def _checked_file(self, entry: dict[str, Any]) -> Path:
        rel = safe_relpath(entry["file"], f"{self.root / MANIFEST}")
        path = inside(self.root, rel, "a table file")
        if not path.is_file():
            raise BadInputError(f"{path}: missing from the bundle")
        if self.verify_checksums and sha256_file(path) != entry["sha256"]:
            raise BadInputError(
                f"{path}: checksum mismatch (the file was changed or is corrupt); re-export this run"
            )
        return path

    def _conform(self, tbl: pa.Table, name: str, path: Path) -> pa.Table:
        want = schema.SCHEMAS[name]
        added = schema.ADDED_COLUMNS.get(name, ())
        if tbl.schema.names != want.names and tbl.schema.names == [n for n in want.names if n not in added]:
            for n in added:
                tbl = tbl.append_column(want.field(n), pa.nulls(tbl.num_rows, want.field(n).type))
            tbl = tbl.select(want.names)
        if tbl.schema.names != want.names:
            raise BadInputError(
                f"{path}: columns {tbl.schema.names} do not match schema v{schema.SCHEMA_VERSION} "
                f"table {name!r}"
            )
        try:
            return tbl.cast(want)
        except (pa.ArrowException, ValueError) as e:
            raise BadInputError(f"{path}: column types do not match ({first_line(e, limit=500)})") from e

    def _iter_metrics(self, marker: dict[str, Any]) -> Iterator[pa.RecordBatch]:
        entry = marker["tables"].get("metrics")
        if entry is None:
            return
        path = self._checked_file(entry)
        try:
            pf = pq.ParquetFile(path)
            self._conform(pf.schema_arrow.empty_table(), "metrics", path)
            if pf.metadata.num_rows != entry["rows"]:
                raise BadInputError(
                    f"{path}: holds {pf.metadata.num_rows} rows, its marker says {entry['rows']}"
                )
            for batch in pf.iter_batches(batch_size=65536):
                yield batch.cast(schema.SCHEMAS["metrics"])
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(f"{path}: not a readable Parquet file ({first_line(e, limit=500)})") from e

    # -- Source protocol

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        out = []
        for m in self.units.get("project", []):
            out += [r for r in self.read_table(m, "projects").to_pylist() if sel.wants_project(r)]
        return sorted(out, key=lambda r: r["project_key"])

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {p["project_key"] for p in projects}
        out = []
        for m in self._run_units.values():
            rows = self.read_table(m, "runs").to_pylist()
            if [r["run_key"] for r in rows] != [m["key"]]:
                raise BadInputError(
                    f"{m['_marker']}: the unit of run {m['key']!r} holds the run rows "
                    f"{[r['run_key'] for r in rows][:3]}; a run unit holds its own run, once"
                )
            for r in rows:
                if r["project_key"] in keys and sel.wants_run(r):
                    out.append(r)
        return sorted(out, key=lambda r: (r["start_time"] is None, r["start_time"], r["run_key"]))

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        m = self._run_units[run["run_key"]]
        arts = self._artifacts_of(m)
        fp = (
            m.get("source_fingerprint")
            or hashlib.sha256(
                json.dumps(
                    [{k: e["sha256"] for k, e in sorted(m["tables"].items())}, m.get("blobs", [])]
                ).encode()
            ).hexdigest()
        )
        return RunPayload(
            run=run,
            params=self.read_table(m, "params"),
            tags=self.read_table(m, "tags"),
            metrics=lambda: self._iter_metrics(m),
            summary=self.read_table(m, "summary"),
            series=self.read_table(m, "series"),
            dataset_inputs=self.read_table(m, "dataset_inputs"),
            artifact_usage=self.read_table(m, "artifact_usage"),
            artifacts=arts,
            fingerprint=fp,
        )

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        keys = {p["project_key"] for p in projects}
        for m in self.units.get("artifact", []):
            for a in self._artifacts_of(m):
                if a.row["project_key"] in keys or a.row["project_key"] is None:
                    yield a

    def registry(self, sel: Selection) -> RegistryPayload:
        regs = self.units.get("registry", [])
        if not regs or not sel.registry:
            return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))
        m = regs[0]
        return RegistryPayload(self.read_table(m, "registered_models"), self.read_table(m, "model_versions"))

    def close(self) -> None:
        pass

    def _artifacts_of(self, m: dict[str, Any]) -> list[ArtifactPayload]:
        rows = self.read_table(m, "artifacts").to_pylist()
        arts = {r["artifact_key"]: ArtifactPayload(row=r) for r in rows}
        files_entry = m["tables"].get("artifact_files")
        files = self.read_table(m, "artifact_files").to_pylist()
        where = str(self.root / files_entry["file"]) if files_entry else str(self.root)
        unit = f"{m['kind']} {m['key']}"
        for i, f in enumerate(files):
            rel = safe_relpath(f["path"], f"{where} row {i}")
            if f["artifact_key"] not in arts:
                raise BadInputError(f"{where} row {i}: file of unknown artifact {f['artifact_key']!r}")
            if f["sha256"] is not None:
                blob_relpath(f["sha256"], f"{where} row {i}")
            elif not f["uri"]:
                raise BadInputError(f"{where} row {i}: file has neither a blob digest nor a reference URI")
            if f["size"] is not None and f["size"] < 0:
                raise BadInputError(f"{where} row {i}: negative size {f['size']}")
            arts[f["artifact_key"]].files.append(
                FileRef(
                    path=rel,
                    size=f["size"],
                    sha256=f["sha256"],
                    fetch=self._blob_fetcher(f["sha256"], rel, f"{unit}, file {rel}"),
                    uri=f["uri"],
                )
            )
        return list(arts.values())

    def _blob_fetcher(self, sha256: str | None, rel: str, where: str):
        @contextlib.contextmanager
        def fetch() -> Iterator[str]:
            if sha256 is None:
                raise BadInputError(f"{where}: a reference, not stored in the bundle")
            with verified_blob(self.root, sha256, rel, where) as local:
                yield local

        return fetch

    def check(self) -> list[str]:
        """Read every table and artifact path, re-hash every file and blob, and compare
        the manifest's counts and checksums with the units.

        Structural problems (a file that is not Parquet, a path escaping its folder, a
        digest that is not one) raise BadInputError like any read would; missing, linked
        or altered blobs and a manifest that disagrees with its units are returned as a
        list.
        """
        digests: dict[str, str] = {}
        for units in self.units.values():
            for marker in units:
                for name in marker["tables"]:
                    if name == "metrics":
                        for _ in self._iter_metrics(marker):
                            pass
                    else:
                        self.read_table(marker, name)
                for b in marker.get("blobs", []):
                    digests.setdefault(b, marker["_marker"])
                if marker["kind"] in ("run", "artifact"):
                    for a in self._artifacts_of(marker):
                        for f in a.files:
                            if f.sha256 is not None:
                                digests.setdefault(
                                    f.sha256, f"{marker['kind']} {marker['key']}, file {f.path}"
                                )
        return self._check_manifest_counts() + self.verify_blobs(digests)

    def _check_manifest_counts(self) -> list[str]:
        counts: dict[str, int] = {}
        checksums: dict[str, str] = {}
        for units in self.units.values():
            for m in units:
                for name, e in m["tables"].items():
                    counts[name] = counts.get(name, 0) + e["rows"]
                    checksums[e["file"]] = e["sha256"]
        problems = []
        said = self.manifest.get("counts", {})
        for name in sorted(set(said) | set(counts)):
            if said.get(name, 0) != counts.get(name, 0):
                problems.append(
                    f"{self.root / MANIFEST}: counts {said.get(name, 0)} row(s) of {name}, "
                    f"the units hold {counts.get(name, 0)}"
                )
        for rel, digest in sorted(self.manifest.get("checksums", {}).items()):
            if checksums.get(rel) not in (None, digest):
                problems.append(f"{self.root / MANIFEST}: checksum of {rel} differs from its unit's")
        return problems

    def verify_blobs(self, digests: dict[str, str] | None = None) -> list[str]:
        """Re-hash every blob (those the markers list, and those the file rows name);
        return the problems found (empty when intact)."""
        if digests is None:
            digests = {
                b: m["_marker"]
                for kind in ("run", "artifact")
                for m in self.units.get(kind, [])
                for b in m.get("blobs", [])
            }
        problems = []
        for b, where in sorted(digests.items()):
            try:
                check_blob(self.root, b, where)
            except BadInputError as e:
                problems.append(str(e))
        return problems
