"""A tracker that lives outside trackbridge: JSON-lines folders, as source and destination.

It is the walk-through of docs/architecture.md's "adding a tracker", kept honest by the
tests: nothing in trackbridge names it. It is found through the ``trackbridge.trackers``
entry point of a distribution the tests install at run time (``install``), gets
``jsonl://`` URIs, ``--help`` lines and retries from its declaration, writes through
trackbridge's write template, and runs the conformance suite like the built-in trackers.

Layout of ``jsonl:///PATH``: ``projects.jsonl`` (a project a line) and, per run,
``runs/<sha1 of the run key>.jsonl``: the run row, then one line per param, tag,
summary, series, dataset input and usage row, one per metric point, one per artifact,
and last the fingerprint line that marks the run complete. The n-th artifact's files go
in ``runs/<sha1>.files/<n>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from trackbridge import schema
from trackbridge.errors import BadInputError, SourceNotFoundError
from trackbridge.files import atomic_write_bytes, local_fetch, safe_relpath, sha256_file
from trackbridge.model import ArtifactPayload, FileRef, RegistryPayload, RunPayload, Selection, TrackerSource
from trackbridge.tracker import Capabilities, Tracker
from trackbridge.uri import folder_destination
from trackbridge.write import Found, RunWriter

TABLES = ("params", "tags", "summary", "series", "dataset_inputs", "artifact_usage")


def _enc(v: Any) -> Any:
    return {"$t": v.isoformat()} if isinstance(v, datetime) else v


def _dec(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"$t"}:
        return datetime.fromisoformat(v["$t"])
    if isinstance(v, list) and v and all(isinstance(x, list) and len(x) == 2 for x in v):
        return [tuple(x) for x in v]  # a map column's (key, value) pairs
    return v


def _line(obj: dict[str, Any]) -> str:
    return json.dumps({k: _enc(v) for k, v in obj.items()}, default=str) + "\n"


def _read(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise BadInputError(f"{where}: not a JSON line ({e})") from e
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: not a JSON object")
    return {k: _dec(v) for k, v in obj.items()}


def _run_file(root: Path, key: str) -> Path:
    return root / "runs" / (hashlib.sha1(key.encode()).hexdigest() + ".jsonl")


class JsonlSource(TrackerSource):
    def __init__(self, path: str) -> None:
        self.root = Path(path)
        if not (self.root / "projects.jsonl").is_file():
            raise SourceNotFoundError(f"jsonl://{self.root}: no projects.jsonl")
        self._origin: dict[str, str] = {}

    def describe(self) -> str:
        return f"jsonl://{self.root}"

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        rows = list(self._lines(self.root / "projects.jsonl"))
        return [r for r in rows if sel.wants_project(r)]

    def _lines(self, f: Path) -> Iterator[dict[str, Any]]:
        with open(f, "rb") as fh:
            for i, raw in enumerate(fh):
                try:
                    text = raw.decode()
                except UnicodeDecodeError as e:
                    raise BadInputError(f"{f}: line {i + 1}, byte {e.start}: not UTF-8") from e
                yield _read(text, f"{f}:{i + 1}")

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {p["project_key"] for p in projects}
        out = []
        for f in sorted((self.root / "runs").glob("*.jsonl")):
            first = next(self._lines(f))
            row = first.get("run")
            if not isinstance(row, dict) or "run_key" not in row:
                raise BadInputError(f"{f}:1: the first line must be the run")
            row = {k: _dec(v) for k, v in row.items()}
            if row["project_key"] in keys and sel.wants_run(row):
                out.append(row)
        return out

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        f = _run_file(self.root, run["run_key"])
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        points: list[list[Any]] = []
        arts: list[ArtifactPayload] = []
        for obj in self._lines(f):
            if "table" in obj and obj["table"] in rows:
                rows[obj["table"]].append({k: _dec(v) for k, v in obj["row"].items()})
            elif "m" in obj:
                points.append(obj["m"])
            elif "artifact" in obj:
                folder = f.with_suffix(".files") / str(len(arts))
                files = [
                    FileRef(
                        p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p), local_fetch(p)
                    )
                    for p in sorted(folder.rglob("*"))
                    if p.is_file() and not p.is_symlink()  # a link would reach outside the folder
                ]
                arts.append(ArtifactPayload({k: _dec(v) for k, v in obj["artifact"].items()}, files))
        key = run["run_key"]

        def metrics() -> Iterator[pa.RecordBatch]:
            if points:
                cols = list(zip(*points, strict=True))
                tbl = schema.metrics_table(
                    key,
                    pa.array(cols[0], pa.string()),
                    pa.array(cols[1], pa.int64()),
                    pa.array(cols[2], pa.int64()),
                    pa.array(cols[3], pa.float64()),
                )
                yield from tbl.to_batches()

        return RunPayload(
            run=run,
            metrics=metrics,
            artifacts=arts,
            **{t: schema.table(t, r) for t, r in rows.items()},  # type: ignore[arg-type]
        )

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        return iter(())

    def registry(self, sel: Selection) -> RegistryPayload:
        return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))


class JsonlSink(RunWriter):
    """The write template's primitives for a folder of JSON-lines files."""

    FORMAT = "j1"

    def __init__(self, path: str, dry_run: bool = False) -> None:
        self.root = Path(path)
        self.dry_run = dry_run
        self.notices: list[tuple[str, str, str]] = []

    def describe(self) -> str:
        return f"jsonl://{self.root}"

    def begin(self, source: str) -> None:
        if not self.dry_run:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        pass

    def write_project(self, row: dict[str, Any]) -> None:
        if self.dry_run:
            return
        f = self.root / "projects.jsonl"
        have = f.read_text().splitlines(keepends=True) if f.exists() else []
        kept = [t for t in have if json.loads(t)["project_key"] != row["project_key"]]
        atomic_write_bytes(f, "".join([*kept, _line(row)]).encode())

    def find(self, payload: RunPayload, report: Any) -> Found | None:
        f = _run_file(self.root, payload.key)
        if not f.exists():
            return None
        with open(f, "rb") as fh:
            fh.seek(max(0, f.stat().st_size - 200))
            last = fh.read().decode(errors="replace").splitlines()[-1:]
        fp = json.loads(last[0]).get("fingerprint") if last and last[0].startswith('{"fingerprint"') else None
        return Found(f.stem, fp, state=f)

    def settle(self, payload: RunPayload, found: Found | None, report: Any) -> Found:
        again = self.find(payload, report)
        return again or Found(_run_file(self.root, payload.key).stem, None, existed=False)

    def write(self, payload: RunPayload, run: Found, plan: Any, report: Any) -> None:
        f = _run_file(self.root, payload.key)
        with open(f, "w") as out:
            out.write(json.dumps({"run": {k: _enc(v) for k, v in payload.run.items()}}, default=str) + "\n")
            for t in TABLES:
                for row in getattr(payload, t).to_pylist():
                    out.write(_line({"table": t, "row": {k: _enc(v) for k, v in row.items()}}))
            for b in payload.metrics():
                ts = b.column("timestamp").cast(pa.int64()).to_pylist()
                for k, s, t, v in zip(
                    b.column("key").to_pylist(),
                    b.column("step").to_pylist(),
                    ts,
                    b.column("value").to_pylist(),
                    strict=True,
                ):
                    out.write(json.dumps({"m": [k, s, t, v]}) + "\n")
                report.points += b.num_rows
            for art in payload.artifacts:
                out.write(_line({"artifact": {k: _enc(v) for k, v in art.row.items()}}))
        files_dir = f.with_suffix(".files")
        shutil.rmtree(files_dir, ignore_errors=True)
        for n, art in enumerate(payload.artifacts):
            for ref in art.files:
                target = files_dir / str(n) / safe_relpath(ref.path, f"run {payload.key}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with ref.fetch() as local:
                    shutil.copyfile(local, target)
                report.files += 1

    def seal(self, payload: RunPayload, run: Found, fingerprint: str, report: Any) -> None:
        with open(_run_file(self.root, payload.key), "a") as out:
            out.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def write_artifact(self, payload: ArtifactPayload, report: Any) -> None:
        report.errors.append(f"artifact {payload.row['artifact_key']}: a JSON-lines folder holds runs only")

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        if payload.model_versions.num_rows:
            report.mapped("registry-not-written", "model_versions", "a JSON-lines folder has no registry")


TRACKER = Tracker(
    name="jsonl",
    title="JSON lines (test tracker)",
    schemes=("jsonl",),
    uris=(("jsonl:///ABS/PATH", "a folder of JSON-lines runs (the tests' plug-in tracker)"),),
    capabilities=Capabilities(local=True, rewrites_history=True),
    open_source=lambda t, **o: JsonlSource(t.inner, **o),
    open_sink=lambda t, **o: JsonlSink(t.inner, **o),
    check_destination=folder_destination,
    scratch=lambda folder: f"jsonl://{folder / 'runs'}",
    order=95,
)


def install(site: Path) -> dict[str, str]:
    """Make this module an installed tracker: a distribution's metadata in ``site``, whose
    entry point names it, as ``pip install`` of a plug-in package would leave. Returns the
    environment a subprocess needs to see it too."""
    info = site / "trackbridge_jsonl-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trackbridge-jsonl\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[trackbridge.trackers]\njsonl = tests.jsonl_tracker:TRACKER\n")
    root = str(Path(__file__).resolve().parents[1])
    return {
        "PYTHONPATH": os.pathsep.join([str(site), root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    }
