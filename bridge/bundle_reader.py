"""Reading a bundle, which is untrusted input: only units with a marker exist, every
table is checked against its marker's checksum and row count, every blob path comes
from a validated digest and every blob is hashed as it is read (trackbridge.untrusted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from trackbridge import schema
from trackbridge.bundle import MANIFEST, load_markers, read_manifest
from trackbridge.errors import BadInputError, first_line
from trackbridge.files import (
    safe_relpath,
    sha256_file,
)
from trackbridge.model import ArtifactPayload, FileRef, RegistryPayload, RunPayload, Selection
from trackbridge.untrusted import (
    blob_relpath,
    check_blob,
    inside,
    verified_blob,
)

SMALL_TABLE = 8 << 20  # bytes: a table file this small is read into memory at once


class BundleSource:
    """A Source that reads a bundle; only units with a marker exist for it."""

    aliases_move_without_runs = False  # a bundle holds the registry its export saw

    def __init__(self, path: str | Path, verify_checksums: bool = True) -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.verify_checksums = verify_checksums
        self.units: dict[str, list[dict[str, Any]]] = {}
        for m in load_markers(self.root):
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
        path, source = self._checked_file(entry)
        try:
            # one file, so no dataset discovery: a fifth of read_table's time on small files
            with pq.ParquetFile(source) as pf:
                tbl = pf.read(use_threads=False)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(f"{path}: not a readable Parquet file ({first_line(e, limit=500)})") from e
        if tbl.num_rows != entry["rows"]:
            raise BadInputError(f"{path}: holds {tbl.num_rows} rows, its marker says {entry['rows']}")
        return self._conform(tbl, name, path)

    def _checked_file(self, entry: dict[str, Any]) -> tuple[Path, Path | pa.BufferReader]:
        """The table's file, checked against its marker's checksum, and what to parse.

        A small file (most are: a run's own rows) is read once, and the bytes hashed are
        the bytes parsed: half the cost of opening it twice, and nothing can change it in
        between. A large one is hashed as it streams and parsed from disk."""
        rel = safe_relpath(entry["file"], f"{self.root / MANIFEST}")
        path = inside(self.root, rel, "a table file")
        if not path.is_file():
            raise BadInputError(f"{path}: missing from the bundle")
        source: Path | pa.BufferReader = path
        if path.stat().st_size <= SMALL_TABLE:
            data = path.read_bytes()
            source = pa.BufferReader(data)
            digest = hashlib.sha256(data).hexdigest() if self.verify_checksums else None
        else:
            digest = sha256_file(path) if self.verify_checksums else None
        if digest is not None and digest != entry["sha256"]:
            raise BadInputError(
                f"{path}: checksum mismatch (the file was changed or is corrupt); re-export this run"
            )
        return path, source

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
        path, source = self._checked_file(entry)
        try:
            with pq.ParquetFile(source) as pf:
                self._conform(pf.schema_arrow.empty_table(), "metrics", path)
                if pf.metadata.num_rows != entry["rows"]:
                    raise BadInputError(
                        f"{path}: holds {pf.metadata.num_rows} rows, its marker says {entry['rows']}"
                    )
                if not isinstance(source, Path):  # small: at once, not a batch reader's set-up
                    yield from pf.read(use_threads=False).cast(schema.SCHEMAS["metrics"]).to_batches(65536)
                    return
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
