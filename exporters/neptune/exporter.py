"""Read what Neptune's own exporter tool wrote (``neptune-exporter:///PATH``).

neptune-exporter (Neptune's migration tool of 2025–26) saved each project as Parquet
files of one row per value, plus a folder of downloaded files:

    PATH/data/<project>/<run>_part_N.parquet        runs
    PATH/data/<project>/models/…parquet             registry: models
    PATH/data/<project>/model_versions/…parquet     registry: model versions
    PATH/files/…                                    what file_value.path points at

``PATH`` may also be the data folder itself (the files folder is then its sibling
``files``). Rows are grouped by their ``run_id`` column, not by file name, so every
layout the tool used reads the same. A file whose columns are not the ones this reader
knows is refused with one line: it comes from an exporter version nobody has checked
the meaning of, and guessing would move data wrongly without a word.

Unlike Neptune's loaders this one is incremental (a run's token is its parts' sizes and
times), idempotent (identity lives in the destination) and carries the registry.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from trackbridge import schema
from trackbridge.errors import BadInputError, SourceNotFoundError, first_line
from trackbridge.files import safe_relpath
from trackbridge.model import (
    TOKEN,
    ArtifactPayload,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    file_token,
    named_projects,
)
from trackbridge.trackers.neptune import common as nc

# The columns of neptune-exporter's Parquet, as this reader understands them.
EXPORT_SCHEMA = pa.schema(
    [
        ("project_id", pa.string()),
        ("run_id", pa.string()),
        ("attribute_path", pa.string()),
        ("attribute_type", pa.string()),
        ("step", pa.decimal128(18, 6)),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("int_value", pa.int64()),
        ("float_value", pa.float64()),
        ("string_value", pa.string()),
        ("bool_value", pa.bool_()),
        ("datetime_value", pa.timestamp("us", tz="UTC")),
        ("string_set_value", pa.list_(pa.string())),
        ("file_value", pa.struct([("path", pa.string())])),
        (
            "histogram_value",
            pa.struct(
                [("type", pa.string()), ("edges", pa.list_(pa.float64())), ("values", pa.list_(pa.float64()))]
            ),
        ),
    ]
)
_ATOMS = {
    "float": "float_value",
    "int": "int_value",
    "bool": "bool_value",
    "string": "string_value",
    "datetime": "datetime_value",
}
_SCOPES = ("models", "model_versions")
_VERSION_NO = re.compile(r"-(\d+)$")


class NeptuneExporterSource(TrackerSource):
    # model versions belong to no run, so a sync looks at the whole registry each time
    aliases_move_without_runs = True

    def __init__(self, path: str) -> None:
        self.root = Path(path).expanduser()
        self.safe = str(self.root)
        if not self.root.is_dir():
            raise SourceNotFoundError(f"neptune-exporter://{self.safe}: no such folder {self.root}")
        data = self.root / "data"
        self.data = data if data.is_dir() else self.root
        files = self.data.parent / "files"
        self.files = files if files.is_dir() else None
        self._origin: dict[str, str] = {}
        # (scope, project, id) -> the Parquet files holding its rows
        self._parts: dict[tuple[str, str, str], list[Path]] = {}
        self._created: dict[tuple[str, str], datetime] = {}  # for --since at listing time
        self._discover()
        if not self._parts:
            raise SourceNotFoundError(
                f"neptune-exporter://{self.safe}: no neptune-exporter Parquet files under {self.data}"
            )

    def describe(self) -> str:
        return f"neptune-exporter://{self.safe}"

    def _discover(self) -> None:
        for f in sorted(self.data.rglob("*.parquet")):
            rel = f.relative_to(self.data).parts
            scope = next((s for s in _SCOPES if s in rel[:-1]), "runs")
            _check_schema(f)
            try:
                ids = (
                    pq.read_table(f, columns=["project_id", "run_id"])
                    .group_by(["project_id", "run_id"])
                    .aggregate([])
                )
            except (pa.ArrowException, OSError) as e:
                raise BadInputError(f"{f}: not a readable Parquet file ({first_line(e)})") from e
            try:
                created = pq.read_table(
                    f,
                    columns=["project_id", "run_id", "datetime_value"],
                    filters=[("attribute_path", "=", "sys/creation_time")],
                ).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise BadInputError(f"{f}: not a readable Parquet file ({first_line(e)})") from e
            for c in created:
                if c["datetime_value"] is not None:
                    self._created[(c["project_id"], c["run_id"])] = c["datetime_value"]
            for project, rid in zip(
                ids.column("project_id").to_pylist(), ids.column("run_id").to_pylist(), strict=True
            ):
                if project is None or rid is None:
                    raise BadInputError(f"{f}: rows with no project_id or run_id")
                self._parts.setdefault((scope, project, rid), []).append(f)

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        return named_projects(sel, (project for _, project, _ in self._parts), "neptune", nc.project_key)

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {p["project_key"] for p in projects}
        out = []
        for (scope, project, rid), parts in sorted(self._parts.items()):
            if scope != "runs" or nc.project_key(project) not in keys:
                continue
            row = {
                "run_key": nc.run_key(project, rid),
                "project_key": nc.project_key(project),
                "source_id": rid,
                "name": rid,
                "start_time": self._created.get((project, rid)),
                "lifecycle": "active",
                **file_token("neptune-exporter", parts),
            }
            if sel.wants_run(row):
                out.append(row)
        return out

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        project = _project_of(run["project_key"])
        rid = run["source_id"]
        parts = self._parts[("runs", project, rid)]
        nr = self._build(parts, project, rid)
        return nr.payload(fingerprint=nc.digest_of(parts), token=run.get(TOKEN))

    def _build(self, parts: list[Path], project: str, rid: str) -> nc.NeptuneRun:
        nr = nc.NeptuneRun(project, rid)
        for f in parts:
            tbl = _read(f, rid)
            is_float = pc.equal(tbl.column("attribute_type"), "float_series")
            self._floats(nr, tbl.filter(is_float), f)
            for row in tbl.filter(pc.invert(is_float)).to_pylist():
                self._row(nr, row, f)
        a = nr.atoms
        if "sys/forking/parent" in a:
            step = a.get("sys/forking/step", (None, None))[1]
            nr.fork = (
                project,
                str(a["sys/forking/parent"][1]),
                nc.micro_steps(step) if step is not None else 0,
            )
        if "sys/experiment/name" in a:
            nr.experiment = str(a["sys/experiment/name"][1])
        return nr

    def _floats(self, nr: nc.NeptuneRun, tbl: pa.Table, f: Path) -> None:
        """Float series in bulk: the step decimals to exact micro-steps without Python."""
        if tbl.num_rows == 0:
            return
        micro = pc.multiply(tbl.column("step"), pa.scalar(Decimal(nc.MICRO), pa.decimal128(7, 0))).cast(
            pa.int64()
        )
        if micro.null_count:
            raise BadInputError(f"{f}: float_series rows with no step")
        block = pa.table(
            {
                "path": tbl.column("attribute_path"),
                "micro": micro,
                "ts": tbl.column("timestamp").cast(pa.int64()),
                "value": tbl.column("float_value"),
            }
        )
        for path in pc.unique(block.column("path")).to_pylist():
            nr.float_block(path, block.filter(pc.equal(block.column("path"), path)))

    def _row(self, nr: nc.NeptuneRun, r: dict[str, Any], f: Path) -> None:
        path, kind = r["attribute_path"], r["attribute_type"]
        ts = nc.to_us(r["timestamp"])
        nr.seen(r["timestamp"])
        micro = nc.micro_steps(r["step"]) if r["step"] is not None else None
        if kind in _ATOMS:
            nr.assign(path, kind, r[_ATOMS[kind]])
        elif kind == "string_set":
            nr.set_clear(path)
            nr.set_add(path, r["string_set_value"] or [])
        elif kind == "string_series":
            nr.append_other(path, _need(micro, f, path), ts, "string", r["string_value"])
        elif kind == "histogram_series":
            h = r["histogram_value"] or {}
            dens = (h.get("type") or "COUNTS").upper() != "COUNTS"
            value = nc.histogram(h.get("edges"), h.get("values"), dens)
            nr.append_other(path, _need(micro, f, path), ts, "histogram", value)
        elif kind == "file":
            nr.set_file(path, self._file(r, f))
        elif kind == "file_series":
            nr.append_other(path, _need(micro, f, path), ts, "file", self._file(r, f))
        elif kind == "file_set":
            src = self._file(r, f)
            if src.local is not None and src.local.is_dir():
                for x in sorted(p for p in src.local.rglob("*") if p.is_file()):
                    nr.add_to_file_set(
                        path, x.relative_to(src.local).as_posix(), nc.FileSource(name=x.name, local=x)
                    )
            else:
                nr.note("source-file-missing", f"files.{path}", f"{src.where} is not a folder any more")
        else:
            nr.note(
                "attribute-not-read",
                path,
                f"{f}: attribute type {kind!r} is not one this reader knows; its values were not copied",
            )

    def _file(self, r: dict[str, Any], f: Path) -> nc.FileSource:
        rel = (r["file_value"] or {}).get("path")
        if not rel:
            raise BadInputError(f"{f}: {r['attribute_path']}: a file row with no file_value.path")
        if self.files is None:
            return nc.FileSource(name=Path(rel).name, where=f"{rel} (no files folder beside {self.data})")
        local = self.files / safe_relpath(rel, f"{f}: {r['attribute_path']}")
        return nc.FileSource(name=local.name, local=local, where=str(local))

    # -- standalone artifacts and registry

    def _registry_entities(self, scope: str, sel: Selection) -> list[tuple[str, str, nc.NeptuneRun]]:
        out = []
        for (s, project, eid), parts in sorted(self._parts.items()):
            if s == scope and sel.wants_project({"name": project, "source_id": project}):
                out.append((project, eid, self._build(parts, project, eid)))
        return out

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]):
        """A model version's files: they belong to no run, so they travel on their own."""
        if not sel.registry:
            return
        models = {(p, e): nr for p, e, nr in self._registry_entities("models", sel)}
        for project, vid, nr in self._registry_entities("model_versions", sel):
            yield self._version_artifact(project, vid, nr, models)

    def _version_artifact(self, project: str, vid: str, nr: nc.NeptuneRun, models: dict) -> ArtifactPayload:
        files = nr.payload().artifacts[0]
        model_id = str(nr.atoms.get("sys/model_id", (None, vid.rsplit("-", 1)[0]))[1])
        m = models.get((project, model_id))
        name = _model_name(m, model_id)
        row = {
            "artifact_key": f"neptune:model_version/{project}/{vid}",
            "project_key": nc.project_key(project),
            "name": name,
            "type": "model",
            "version": _version_number(vid),
            "aliases": [],
            "metadata_json": schema.dumps_value({"neptune_id": vid}),
            "created_at": nr.atoms.get("sys/creation_time", (None, None))[1],
        }
        return ArtifactPayload(row=row, files=files.files)

    def registry(self, sel: Selection) -> RegistryPayload:
        if not sel.registry:
            return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))
        models = {(p, e): nr for p, e, nr in self._registry_entities("models", sel)}
        model_rows = {}
        for (project, mid), nr in models.items():
            a = {k: v for k, (_, v) in nr.atoms.items()}
            model_rows[(project, mid)] = {
                "name": _model_name(nr, mid),
                "description": a.get("sys/description") or None,
                "tags": sorted(_entity_tags(nr).items()),
                "created_at": a.get("sys/creation_time"),
                "updated_at": a.get("sys/modification_time"),
            }
        versions = []
        for project, vid, nr in self._registry_entities("model_versions", sel):
            a = {k: v for k, (_, v) in nr.atoms.items()}
            model_id = str(a.get("sys/model_id") or vid.rsplit("-", 1)[0])
            if (project, model_id) not in model_rows:
                model_rows[(project, model_id)] = {"name": model_id, "tags": []}
            stage = str(a.get("sys/stage") or "none")
            versions.append(
                {
                    "version_key": f"neptune:model_version/{project}/{vid}",
                    "model_name": model_rows[(project, model_id)]["name"],
                    "version": _version_number(vid),
                    "artifact_key": f"neptune:model_version/{project}/{vid}",
                    "source": "models:/",
                    # Neptune's stages are what MLflow's aliases replaced
                    "aliases": [stage.lower()] if stage.lower() in ("staging", "production") else [],
                    "stage": stage.capitalize(),  # MLflow's words: None, Staging, Production, Archived
                    "status": "READY",
                    "description": a.get("sys/description") or None,
                    "tags": sorted(_entity_tags(nr).items()),
                    "user": a.get("sys/owner"),
                    "created_at": a.get("sys/creation_time"),
                    "updated_at": a.get("sys/modification_time"),
                }
            )
        return RegistryPayload(
            schema.table("registered_models", model_rows.values()), schema.table("model_versions", versions)
        )


def _check_schema(f: Path) -> None:
    try:
        got = pq.read_schema(f)
    except (pa.ArrowException, OSError) as e:
        raise BadInputError(f"{f}: not a readable Parquet file ({first_line(e)})") from e
    missing = [n for n in EXPORT_SCHEMA.names if n not in got.names]
    extra = [n for n in got.names if n not in EXPORT_SCHEMA.names]
    if missing or extra:
        raise BadInputError(
            f"{f}: not from a neptune-exporter version this reader knows "
            f"(missing columns {missing}, unknown columns {extra})"
        )


def _read(f: Path, rid: str) -> pa.Table:
    try:
        tbl = pq.read_table(f, filters=[("run_id", "=", rid)])
        return tbl.select(EXPORT_SCHEMA.names).cast(EXPORT_SCHEMA)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadInputError(
            f"{f}: columns of types this reader does not know, or an unreadable file ({first_line(e)})"
        ) from e


def _need(micro: int | None, f: Path, path: str) -> int:
    if micro is None:
        raise BadInputError(f"{f}: {path}: a series row with no step")
    return micro


def _project_of(project_key: str) -> str:
    return project_key.split("/", 1)[1]


def _model_name(nr: nc.NeptuneRun | None, model_id: str) -> str:
    if nr is not None:
        name = nr.atoms.get("sys/name", (None, None))[1]
        if name:
            return str(name)
    return model_id


def _version_number(vid: str) -> str:
    m = _VERSION_NO.search(vid)
    return m.group(1) if m else vid


def _entity_tags(nr: nc.NeptuneRun) -> dict[str, str]:
    """A model's or version's own values (not sys/) as registry tags, typed as JSON."""
    out = {}
    for p in nr.payload().params.to_pylist():
        v = schema.loads_value(p["value_json"])
        out["/".join(p["path"])] = v if isinstance(v, str) else p["value_json"]
    labels = sorted(nr.sets.get("sys/tags", set()))
    if labels:
        out["neptune.tags"] = schema.dumps_value(labels)
    return out
