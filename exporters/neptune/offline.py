"""Read Neptune's offline folders (``neptune+offline://PATH``) into the neutral schema.

A ``.neptune`` folder holds runs of one client or the other, and this reader tells them
apart by what is on disk:
- ``neptune`` 1.x (the client of Neptune 2.x): ``offline/run__*/`` folders, each with
  ``metadata.json`` and ``data-N.log`` files of one JSON operation per line
  (``{"obj": {"type": "LogFloats", "path": [...], ...}, "version": N, "at": secs}``).
  Files logged by path stay where they were; files logged as content sit in
  ``upload_path/``.
- ``neptune-scale`` (Neptune 3.x): ``<project>_<run>_<ns>/run_operations.sqlite3``, a
  queue of protobuf ``neptune_api`` messages (``Run`` to create, ``UpdateRunSnapshot``
  per logging call) and the files waiting to be uploaded.

Only the SDK packages' data formats are used (``neptune_api`` protobufs; plain JSON
for 1.x), never their ``neptune`` console command. Both formats feed one
``trackbridge.trackers.neptune.common.NeptuneRun``, so the neutral run is the same whichever way it
was logged.

What the offline formats never held: a 1.x offline run has no project and no
``custom_run_id`` (the server set those on ``neptune sync``). The project is the one the
URI names (``?project=ws/name``), else the folder that holds ``.neptune``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from trackbridge import schema
from trackbridge.errors import BadInputError, MissingExtraError, SourceNotFoundError, first_line
from trackbridge.model import (
    TOKEN,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    file_token,
    named_projects,
)
from trackbridge.trackers.neptune import common as nc

SCALE_DB = "run_operations.sqlite3"
_LOG = re.compile(r"data-(\d+)\.log$")


class NeptuneOfflineSource(TrackerSource):
    def __init__(self, target: str) -> None:
        path, _, query = target.partition("?")
        self.root = Path(path).expanduser()
        self.safe = str(self.root)
        if not self.root.exists():
            raise SourceNotFoundError(f"neptune+offline://{self.safe}: no such folder {self.root}")
        if (self.root / ".neptune").is_dir():
            self.root = self.root / ".neptune"
        self.project_name = (parse_qs(query).get("project") or [""])[0] or _default_project(self.root)
        self._origin: dict[str, str] = {}
        self._runs: dict[str, _Found] = {}
        self._discover()
        if not self._runs:
            raise SourceNotFoundError(
                f"neptune+offline://{self.safe}: no Neptune offline runs here (looked for "
                f"offline/run__*/data-*.log of neptune 1.x and */{SCALE_DB} of neptune-scale)"
            )

    def describe(self) -> str:
        return f"neptune+offline://{self.safe}"

    # -- discovery

    def _discover(self) -> None:
        offline = self.root / "offline"
        legacy = sorted(d for d in offline.iterdir() if d.is_dir()) if offline.is_dir() else []
        if not legacy and any(self.root.glob("data-*.log")):
            legacy = [self.root]  # one run folder named directly
        for d in legacy:
            logs = sorted((p for p in d.glob("data-*.log")), key=lambda p: int(_LOG.search(p.name).group(1)))  # type: ignore[union-attr]
            if not logs:
                continue
            meta = _metadata(d)
            run_id = meta.get("containerId") or d.name.split("__")[1 if "__" in d.name else 0]
            created = _iso(meta.get("createdAt"))
            self._add(_Found("legacy", self.project_name, run_id, d, logs, created))
        dbs = (
            [self.root / SCALE_DB]
            if (self.root / SCALE_DB).is_file()
            else sorted(self.root.glob(f"*/{SCALE_DB}"))
        )
        for db in dbs:
            project, run_id, created = _scale_head(db)
            self._add(_Found("scale", project, run_id, db.parent, [db], created))

    def _add(self, f: _Found) -> None:
        key = nc.run_key(f.project, f.run_id)
        if key in self._runs:
            raise BadInputError(
                f"{f.folder}: run {f.run_id!r} of {f.project!r} is also in {self._runs[key].folder}; "
                "keep one copy in the folder"
            )
        self._runs[key] = f

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        return named_projects(sel, (f.project for f in self._runs.values()), "neptune", nc.project_key)

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {p["project_key"] for p in projects}
        out = []
        for key, f in self._runs.items():
            if nc.project_key(f.project) not in keys:
                continue
            row = {
                "run_key": key,
                "project_key": nc.project_key(f.project),
                "source_id": f.run_id,
                "name": f.run_id,
                "start_time": f.created,
                "lifecycle": "active",
                **file_token(f"neptune-{f.kind}", f.watched()),
            }
            if sel.wants_run(row):
                out.append(row)
        return out

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        f = self._runs[run["run_key"]]
        nr = nc.NeptuneRun(f.project, f.run_id)
        if f.kind == "legacy":
            nr.created = f.created
            for log in f.files:
                _read_log(nr, log, f.folder, last=log == f.files[-1])
        else:
            _read_scale(nr, f.files[0])
        return nr.payload(fingerprint=nc.digest_of(f.watched()), token=run.get(TOKEN))

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]):
        return iter(())  # offline runs own all their files

    def registry(self, sel: Selection) -> RegistryPayload:
        """Neptune's model registry lived on the server only; offline folders have none."""
        return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))


class _Found:
    def __init__(
        self, kind: str, project: str, run_id: str, folder: Path, files: list[Path], created: Any
    ) -> None:
        self.kind = kind
        self.project = project
        self.run_id = run_id
        self.folder = folder
        self.files = files
        self.created = created

    def watched(self) -> list[Path]:
        """What changes when the run changes: its logs, or its database and WAL."""
        extra = [self.files[0].with_name(SCALE_DB + "-wal")] if self.kind == "scale" else []
        return [p for p in [*self.files, *extra] if p.exists()]


def _default_project(root: Path) -> str:
    holder = root.parent if root.name == ".neptune" else root
    return f"offline/{holder.resolve().name or 'neptune'}"


def _metadata(d: Path) -> dict[str, Any]:
    p = d / "metadata.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{p}: not readable JSON ({first_line(e)})") from e


def _iso(text: str | None) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# -- neptune 1.x operation logs


def _read_log(nr: nc.NeptuneRun, log: Path, folder: Path, last: bool) -> None:
    with open(log, "rb") as fh:
        lines = fh.read().split(b"\n")
    # a final line with no newline is a write cut short; an empty one is the file's end
    tail = lines.pop() if lines else b""
    for lineno, raw in enumerate(lines, 1):
        if raw.strip():
            _apply(nr, _parse(raw, log, lineno), log, lineno, folder)
    if tail.strip():
        try:
            op = json.loads(tail)
        except ValueError:
            nr.incomplete = True
            nr.note(
                "source-incomplete",
                "runs",
                f"{log}: line {len(lines) + 1} is cut short (the process was killed while writing); "
                "every whole operation before it was read and the run is marked incomplete",
            )
            return
        _apply(nr, op, log, len(lines) + 1, folder)


def _parse(raw: bytes, log: Path, lineno: int) -> dict[str, Any]:
    try:
        op = json.loads(raw)
    except ValueError as e:
        raise BadInputError(f"{log}: line {lineno}: not a JSON operation ({first_line(e)})") from e
    if not isinstance(op, dict) or not isinstance(op.get("obj"), dict):
        raise BadInputError(f"{log}: line {lineno}: not a Neptune operation (no 'obj')")
    return op


def _apply(nr: nc.NeptuneRun, op: dict[str, Any], log: Path, lineno: int, folder: Path) -> None:
    o = op["obj"]
    kind = o.get("type")
    try:
        path = "/".join(o["path"])
    except (KeyError, TypeError) as e:
        raise BadInputError(f"{log}: line {lineno}: operation {kind!r} has no path") from e
    nr.seen(op.get("at"))
    simple = {"AssignFloat": "float", "AssignInt": "int", "AssignBool": "bool", "AssignString": "string"}
    if kind in simple:
        nr.assign(path, simple[kind], o["value"])
    elif kind == "AssignDatetime":
        nr.assign(path, "datetime", datetime.fromtimestamp(o["value"] / 1000, UTC))
    elif kind == "AddStrings":
        nr.set_add(path, o["values"])
    elif kind == "RemoveStrings":
        nr.set_remove(path, o["values"])
    elif kind == "ClearStringSet":
        nr.set_clear(path)
    elif kind == "LogFloats":
        for v in o["values"]:
            nr.append_float(path, nr.step_of(path, v.get("step")), nc.to_us(v.get("ts")), v["value"])
    elif kind == "LogStrings":
        for v in o["values"]:
            nr.append_other(
                path, nr.step_of(path, v.get("step")), nc.to_us(v.get("ts")), "string", v["value"]
            )
    elif kind == "LogImages":
        for v in o["values"]:
            img = v["value"]
            src = nc.FileSource(name="image.png", data=base64.b64decode(img["data"]), mime_type="image/png")
            nr.append_other(path, nr.step_of(path, v.get("step")), nc.to_us(v.get("ts")), "file", src)
    elif kind in ("ClearFloatLog", "ClearStringLog", "ClearImageLog"):
        nr.clear_series(path)
    elif kind == "ConfigFloatSeries":
        nr.extra_tags[f"neptune.series_config/{path}"] = schema.dumps_value(
            {k: o.get(k) for k in ("min", "max", "unit")}
        )
    elif kind == "UploadFile":
        nr.set_file(path, _upload(o, folder, path))
    elif kind == "UploadFileContent":
        name = f"{path.rsplit('/', 1)[-1]}.{o.get('ext') or 'bin'}"
        nr.set_file(path, nc.FileSource(name=name, data=base64.b64decode(o["file_content"])))
    elif kind == "UploadFileSet":
        _upload_set(nr, path, o)
    elif kind == "DeleteFiles":
        members = nr.file_sets.get(path, {})
        for p in o.get("file_paths", []):
            members.pop(p.lstrip("/"), None)
    elif kind == "DeleteAttribute":
        nr.delete(path)
    elif kind == "AssignArtifact":
        nr.tracked.setdefault(path, {"files": []})["hash"] = o.get("hash")
    elif kind == "TrackFilesToArtifact":
        t = nr.tracked.setdefault(path, {"files": []})
        for entry in o.get("entries", []):
            where, dest = entry[0], entry[1] if len(entry) > 1 else None
            # a relative path was relative to the logging process's folder, unknown here:
            # it is kept as written rather than guessed
            local = Path(where) if "://" not in where and Path(where).is_absolute() else None
            uri = local.as_uri() if local is not None else where
            name = dest or (local.name if local is not None else where.rstrip("/").rsplit("/", 1)[-1])
            t["files"].append((name, uri, nc.file_size(local) if local is not None else None))
    elif kind == "ClearArtifact":
        nr.tracked.setdefault(path, {"files": []})["files"] = []
    else:
        nr.note(
            "operation-not-read",
            path,
            f"{log}: line {lineno}: operation {kind!r} has no neutral form and was not copied",
        )


def _upload(o: dict[str, Any], folder: Path, path: str) -> nc.FileSource:
    ext = o.get("ext") or ""
    if o.get("tmp_file_name"):
        local = folder / "upload_path" / o["tmp_file_name"]
        name = f"{path.rsplit('/', 1)[-1]}.{ext}" if ext else path.rsplit("/", 1)[-1]
    else:
        local = Path(o.get("file_path") or "")
        name = local.name
    return nc.FileSource(name=name, local=local, where=str(local))


def _upload_set(nr: nc.NeptuneRun, path: str, o: dict[str, Any]) -> None:
    import glob

    reset = str(o.get("reset")) == "True"
    if reset:
        nr.file_sets[path] = {}
    for pattern in o.get("file_globs", []):
        hits = sorted(glob.glob(pattern, recursive=True))
        if not hits:
            nr.note("source-file-missing", f"files.{path}", f"{pattern} matches no file any more")
        for hit in hits:
            p = Path(hit)
            files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
            base = p if p.is_dir() else p.parent
            for x in files:
                nr.add_to_file_set(path, x.relative_to(base).as_posix(), nc.FileSource(name=x.name, local=x))


# -- neptune-scale SQLite queues


def _connect(db: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise _db_error(db, e) from e
    return con


def _db_error(db: Path, e: sqlite3.Error) -> BadInputError:
    text = first_line(e)
    if "locked" in text or "busy" in text:
        return BadInputError(
            f"{db}: locked by another process (is the run still logging?); read it once that process ends"
        )
    return BadInputError(f"{db}: not a readable neptune-scale database ({text})")


def _scale_head(db: Path) -> tuple[str, str, datetime | None]:
    """Project, run id and creation time: enough to list and filter without a full read."""
    con = _connect(db)
    try:
        row = con.execute("SELECT project, run_id FROM metadata ORDER BY id LIMIT 1").fetchone()
        first = con.execute(
            "SELECT operation FROM run_operations WHERE operation_type = 1 ORDER BY sequence_id LIMIT 1"
        ).fetchone()
    except sqlite3.Error as e:
        raise _db_error(db, e) from e
    finally:
        con.close()
    if row is None:
        raise BadInputError(f"{db}: no run metadata (was the run ever started?)")
    created = None
    if first is not None:
        try:
            r = _proto().Run.FromString(first[0])
        except Exception as e:
            raise BadInputError(f"{db}: the run's first operation does not decode ({first_line(e)})") from e
        created = _ts(r.creation_time) if r.HasField("creation_time") else None
    return str(row[0]), str(row[1]), created


def _proto():
    try:
        from neptune_api.proto.neptune_pb.ingest.v1 import common_pb2
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise MissingExtraError("neptune", "neptune-scale") from e
    return common_pb2


def _read_scale(nr: nc.NeptuneRun, db: Path) -> None:
    pb = _proto()
    con = _connect(db)
    try:
        uploads = {
            dest: (src, mime, size)
            for src, dest, mime, size in con.execute(
                "SELECT source_path, destination, mime_type, size_bytes FROM file_upload_requests"
            )
        }
        cur = con.execute(
            "SELECT sequence_id, operation_type, operation FROM run_operations ORDER BY sequence_id"
        )
        for seq, typ, blob in cur:
            try:
                msg = pb.Run.FromString(blob) if typ == 1 else pb.UpdateRunSnapshot.FromString(blob)
            except Exception as e:
                raise BadInputError(f"{db}: operation {seq}: does not decode ({first_line(e)})") from e
            if typ == 1:
                _scale_create(nr, msg)
            else:
                _scale_update(nr, msg, uploads)
    except sqlite3.Error as e:
        raise _db_error(db, e) from e
    finally:
        con.close()


def _ts(t: Any) -> datetime:
    return datetime.fromtimestamp(t.seconds, UTC).replace(microsecond=t.nanos // 1000)


def _scale_create(nr: nc.NeptuneRun, r: Any) -> None:
    if r.HasField("creation_time"):
        nr.created = _ts(r.creation_time)
    if r.HasField("experiment_id") and r.experiment_id:
        nr.experiment = r.experiment_id
    if r.HasField("fork_point"):
        fp = r.fork_point
        nr.fork = (fp.parent_project, fp.parent_run_id, fp.step.whole * nc.MICRO + fp.step.micro)
    if r.HasField("family") and r.family and r.family != nr.run_id:
        nr.extra_tags["sys/family"] = r.family


def _scale_update(nr: nc.NeptuneRun, u: Any, uploads: dict[str, tuple[str, str, int]]) -> None:
    ts = _ts(u.timestamp) if u.HasField("timestamp") else None
    nr.seen(ts)
    ts_us = nc.to_us(ts)
    for key, v in u.assign.items():
        which = v.WhichOneof("value")
        if which == "string_set":
            nr.set_clear(key)
            nr.set_add(key, v.string_set.values)
        elif which == "file_ref":
            nr.set_file(key, _scale_file(v.file_ref, uploads))
        elif which == "timestamp":
            nr.assign(key, "datetime", _ts(v.timestamp))
        elif which is not None:
            nr.assign(
                key,
                {"float64": "float", "int64": "int", "bool": "bool", "string": "string"}[which],
                getattr(v, which),
            )
    for key, mod in u.modify_sets.items():
        for value, op in mod.string.values.items():
            if op == 1:
                nr.set_add(key, [value])
            elif op == 2:
                nr.set_remove(key, [value])
    if not u.append:
        return
    micro = u.step.whole * nc.MICRO + u.step.micro if u.HasField("step") else None
    preview = u.HasField("preview") and u.preview.is_preview
    for key, v in u.append.items():
        m = micro if micro is not None else nr.step_of(key, None)
        which = v.WhichOneof("value")
        if which in ("float64", "int64"):
            nr.append_float(key, m, ts_us, getattr(v, which), preview=preview)
        elif which == "string":
            nr.append_other(key, m, ts_us, "string", v.string)
        elif which == "histogram":
            h = v.histogram
            dens = h.WhichOneof("values") == "densities"
            value = nc.histogram(h.bin_edges, h.densities.values if dens else h.counts.values, dens)
            nr.append_other(key, m, ts_us, "histogram", value)
        elif which == "file_ref":
            nr.append_other(key, m, ts_us, "file", _scale_file(v.file_ref, uploads))
        else:
            nr.note("operation-not-read", key, f"an appended {which} value has no neutral form")


def _scale_file(ref: Any, uploads: dict[str, tuple[str, str, int]]) -> nc.FileSource:
    src = uploads.get(ref.path)
    name = os.path.basename(ref.path)
    if src is None:
        return nc.FileSource(
            name=name, mime_type=ref.mime_type, size=ref.size_bytes, where=f"Neptune storage {ref.path}"
        )
    local = Path(src[0])
    return nc.FileSource(
        name=local.name if local.suffix else name,
        local=local,
        mime_type=ref.mime_type,
        size=ref.size_bytes,
        where=str(local),
    )
