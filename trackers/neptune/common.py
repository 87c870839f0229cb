"""What the three Neptune readers share: keys, the step unit, and one run builder.

Neptune keeps every value under an attribute path (``train/loss``, ``sys/tags``) with a
type: atoms (float, int, bool, string, datetime), string sets, float/string/histogram/
file series, files and file sets. The offline op logs (``neptune`` 1.x, the client of
Neptune 2.x), the ``neptune-scale`` SQLite queues (Neptune 3.x) and neptune-exporter's
Parquet all describe the same model, so each reader only decodes its format and feeds
``NeptuneRun``; the mapping to the neutral schema lives here once, and a run reads the
same whichever way it reached us.

Steps. Neptune steps are decimals with six places (``decimal(18,6)``); MLflow's and
W&B's are integers. The builder counts in micro-steps and picks, per key, the smallest
power of ten that makes every step of that key an integer: ``runs.step_scales`` (a
JSON object, key → scale, of the keys whose scale is not 1). The neutral ``step`` of a
point is then ``exact step × its key's scale``, so the exact value is always
``step / scale``, and every key with integer steps (the usual case) is untouched, even
beside one key logged at fractional steps.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from trackbridge import schema
from trackbridge.files import bytes_fetch, local_fetch, sha256_file
from trackbridge.model import ArtifactPayload, FileRef, RunPayload

MICRO = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SYS = "sys/"
# sys/ attributes that have a column of their own in the neutral ``runs`` table
_RUN_COLUMNS = {
    "sys/name",
    "sys/description",
    "sys/tags",
    "sys/group_tags",
    "sys/creation_time",
    "sys/owner",
    "sys/failed",
    "sys/state",
    "sys/hostname",
}


def project_key(project: str) -> str:
    return f"neptune:project/{project}"


def run_key(project: str, run_id: str) -> str:
    return f"neptune:run/{project}/{run_id}"


def micro_steps(step: Any) -> int:
    """A step (int, float, Decimal) in millionths, the precision Neptune stores."""
    if isinstance(step, int):
        return step * MICRO
    return int(
        (Decimal(repr(step)) if isinstance(step, float) else Decimal(step)).scaleb(6).to_integral_value()
    )


def micro_text(m: int) -> str:
    """A micro-step as the decimal a user typed (``1.5``, ``3``)."""
    d = Decimal(m).scaleb(-6).normalize()
    return format(d, "f")


def decimals(micros: pa.Array) -> np.ndarray:
    """Per micro-step, the decimals it needs (0 for a whole step, up to 6)."""
    m = np.abs(micros.to_numpy(zero_copy_only=False).astype(np.int64))
    need = np.full(len(m), 6, dtype=np.int64)
    for k in range(1, 7):
        need = np.where(m % 10**k == 0, np.minimum(need, 6 - k), need)
    return need


def key_scales(keys: pa.Array, micros: pa.Array) -> dict[str, int]:
    """Each key's scale (``step_scale`` of its own steps), vectorised over the points."""
    if not len(keys):
        return {}
    agg = pa.table({"key": keys, "d": decimals(micros)}).group_by("key").aggregate([("d", "max")])
    scales = (10**d for d in agg.column("d_max").to_pylist())
    return dict(zip(agg.column("key").to_pylist(), scales, strict=True))


def step_scale(micros: Iterator[int]) -> int:
    """The smallest 10**d (d ≤ 6) that makes every step of a run an integer."""
    d = 0
    for m in micros:
        while d < 6 and m % (10 ** (6 - d)):
            d += 1
        if d == 6:
            break
    return 10**d


def to_us(t: datetime | float | int | None) -> int | None:
    """A time (datetime, or seconds since the epoch) in µs; Neptune's are UTC."""
    if t is None:
        return None
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return (t - EPOCH) // timedelta(microseconds=1)
    return round(float(t) * MICRO)


us_to_dt = schema.us_to_dt


@dataclass
class FileSource:
    """Where one Neptune file's bytes are now: a path on disk, or bytes kept in the log."""

    name: str  # the file name it gets in the destination
    local: Path | None = None
    data: bytes | None = None
    mime_type: str | None = None
    size: int | None = None
    where: str = ""  # what the source said, for the report when the bytes are gone

    def exists(self) -> bool:
        return self.data is not None or (self.local is not None and self.local.is_file())

    def ref(self, path: str) -> FileRef:
        if self.data is not None:
            return FileRef(path=path, size=len(self.data), sha256=None, fetch=bytes_fetch(self.data))
        assert self.local is not None
        return FileRef(path=path, size=self.local.stat().st_size, sha256=None, fetch=local_fetch(self.local))


@dataclass
class _Points:
    """One float series: flat lists while a log is read, Arrow blocks when a reader has them."""

    micro: list[int] = field(default_factory=list)
    ts: list[int | None] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    preview: set[int] = field(default_factory=set)  # indexes of preview points (neptune-scale)
    blocks: list[pa.Table] = field(default_factory=list)


class NeptuneRun:
    """A Neptune run as its operations arrive, in order; ``payload()`` gives the neutral run."""

    def __init__(self, project: str, run_id: str) -> None:
        self.project = project
        self.run_id = run_id
        self.key = run_key(project, run_id)
        self.atoms: dict[str, tuple[str, Any]] = {}
        self.sets: dict[str, set[str]] = {}
        self.floats: dict[str, _Points] = {}
        # non-float series: path -> [(micro, ts µs, kind, value)], kind "string" | "histogram" | "file"
        self.others: dict[str, list[tuple[int, int | None, str, Any]]] = {}
        self.files: dict[str, FileSource] = {}
        self.file_sets: dict[str, dict[str, FileSource]] = {}
        self.tracked: dict[str, dict[str, Any]] = {}  # Neptune artifacts: hash + file locations
        self.extra_tags: dict[str, str] = {}
        self.notes: list[tuple[str, str, str]] = []
        self.created: datetime | None = None
        self.last_us: int | None = None
        self.experiment: str | None = None
        self.fork: tuple[str, str, int] | None = None  # parent project, parent run id, micro-step
        self.incomplete = False
        self.rounded = 0  # steps with more than six decimals, rounded as Neptune does

    # -- operations

    def seen(self, t: datetime | float | int | None) -> None:
        us = to_us(t)
        if us is not None and (self.last_us is None or us > self.last_us):
            self.last_us = us

    def assign(self, path: str, ntype: str, value: Any) -> None:
        self._forget(path)
        self.atoms[path] = (ntype, value)

    def set_add(self, path: str, values: Any) -> None:
        self.sets.setdefault(path, set()).update(str(v) for v in values)

    def set_remove(self, path: str, values: Any) -> None:
        self.sets.setdefault(path, set()).difference_update(str(v) for v in values)

    def set_clear(self, path: str) -> None:
        self.sets[path] = set()

    def step_of(self, path: str, step: Any) -> int:
        """The micro-step of an append; none given means one past the series' last, as
        Neptune numbers them."""
        if step is None:
            last = self._last_micro(path)
            return 0 if last is None else (last // MICRO + 1) * MICRO
        m = micro_steps(step)
        if isinstance(step, float) and Decimal(repr(step)).as_tuple().exponent < -6:  # type: ignore[operator]
            self.rounded += 1
        return m

    def _last_micro(self, path: str) -> int | None:
        pts = self.floats.get(path)
        if pts is not None and pts.micro:
            return pts.micro[-1]
        other = self.others.get(path)
        return other[-1][0] if other else None

    def append_float(
        self, path: str, micro: int, ts_us: int | None, value: float, preview: bool = False
    ) -> None:
        pts = self.floats.get(path)
        if pts is None:
            pts = self.floats[path] = _Points()
        if preview:
            pts.preview.add(len(pts.micro))
        pts.micro.append(micro)
        pts.ts.append(ts_us)
        pts.value.append(float(value))

    def float_block(self, path: str, block: pa.Table) -> None:
        """Points already in Arrow (``micro`` int64, ``ts`` int64 µs, ``value`` float64)."""
        self.floats.setdefault(path, _Points()).blocks.append(block)
        last = pc.max(block.column("ts")).as_py()
        if last is not None:
            self.seen(us_to_dt(last))

    def append_other(self, path: str, micro: int, ts_us: int | None, kind: str, value: Any) -> None:
        """kind: "string", "histogram" or "file" (its value a ``FileSource``)."""
        self.others.setdefault(path, []).append((micro, ts_us, kind, value))

    def clear_series(self, path: str) -> None:
        self.floats.pop(path, None)
        self.others.pop(path, None)

    def set_file(self, path: str, src: FileSource) -> None:
        self._forget(path)
        self.files[path] = src

    def add_to_file_set(self, path: str, rel: str, src: FileSource, reset: bool = False) -> None:
        if reset or path not in self.file_sets:
            self.file_sets[path] = {}
        self.file_sets[path][rel] = src

    def delete(self, path: str) -> None:
        self._forget(path)
        self.sets.pop(path, None)
        self.clear_series(path)

    def _forget(self, path: str) -> None:
        self.atoms.pop(path, None)
        self.files.pop(path, None)
        self.file_sets.pop(path, None)
        self.tracked.pop(path, None)

    def note(self, kind: str, where: str, detail: str) -> None:
        self.notes.append((kind, where, detail))

    # -- the neutral run

    def payload(self, fingerprint: str | None = None, token: str | None = None) -> RunPayload:
        metrics = self._metrics()
        scales = {}
        if metrics.num_rows:
            keys = metrics.column("key").combine_chunks()
            scales = key_scales(keys, metrics.column("micro").combine_chunks())
            names = pa.array(list(scales), pa.string())
            divs = pa.array([MICRO // scales[k] for k in names.to_pylist()], pa.int64())
            div_col = divs.take(pc.index_in(keys, value_set=names))
            steps = pc.divide(metrics.column("micro"), div_col)
            metrics = metrics.append_column("step", steps).drop_columns(["micro"])
        for attr, rows in self.others.items():
            scales[attr] = step_scale(iter(m for m, *_ in rows))
        # notes of this reading only: payload() may be called more than once
        notes = list(self.notes)
        if self.rounded:
            notes.append(
                (
                    "step-rounded",
                    "metrics.step",
                    f"{self.rounded} step(s) had more than six decimals and were rounded to six, "
                    "as Neptune stores them",
                )
            )
        files = self._run_files(notes)
        series = self._series(scales, files)
        run = self._run_row({k: v for k, v in sorted(scales.items()) if v != 1})
        key = self.key
        batches = _metric_batches(key, metrics)
        artifacts = [files, *self._tracked_artifacts()]
        usage = [
            {"run_key": key, "artifact_key": a.row["artifact_key"], "direction": "output"}
            for a in artifacts[1:]
        ]
        return RunPayload(
            run=run,
            params=schema.table("params", self._params()),
            tags=schema.table(
                "tags", [{"run_key": key, "key": k, "value": v} for k, v in sorted(self._tags().items())]
            ),
            metrics=lambda: iter(batches),
            series=series,
            artifacts=artifacts,
            artifact_usage=schema.table("artifact_usage", usage),
            fingerprint=fingerprint,
            source_notes=notes,
            token=token,
        )

    def _metrics(self) -> pa.Table:
        parts = []
        for path, pts in self.floats.items():
            if pts.micro:
                keep = _without_superseded_previews(pts)
                t = pa.table(
                    {
                        "micro": pa.array([pts.micro[i] for i in keep], pa.int64()),
                        "ts": pa.array([pts.ts[i] for i in keep], pa.int64()),
                        "value": pa.array([pts.value[i] for i in keep], pa.float64()),
                    }
                )
                parts.append(t.append_column("key", pa.array([path] * t.num_rows, pa.string())))
            for b in pts.blocks:
                parts.append(
                    b.select(["micro", "ts", "value"]).append_column(
                        "key", pa.array([path] * b.num_rows, pa.string())
                    )
                )
        if not parts:
            return pa.table({"micro": pa.array([], pa.int64())})
        tbl = pa.concat_tables(parts)
        return tbl.take(pc.sort_indices(tbl, [("key", "ascending"), ("micro", "ascending")]))

    def _run_row(self, scales: dict[str, int]) -> dict[str, Any]:
        a = {p: v for p, (_, v) in self.atoms.items()}
        failed = a.get("sys/failed") is True
        state = str(a.get("sys/state") or "").lower()
        if failed:
            status = "failed"
        elif self.incomplete:
            status = "crashed"
        elif state in ("running", "active"):
            status = "running"
        else:
            status = "finished"
        labels = sorted(self.sets.get("sys/tags", set()) | self.sets.get("sys/group_tags", set()))
        created = a.get("sys/creation_time") or self.created
        fork_key = fork_step = None
        if self.fork is not None:
            fork_key = run_key(self.fork[0] or self.project, self.fork[1])
            fork_step = self.fork[2] / MICRO
        return {
            "run_key": self.key,
            "project_key": project_key(self.project),
            "source_id": self.run_id,
            "name": a.get("sys/name") or self.run_id,
            "status": status,
            "lifecycle": "deleted" if a.get("sys/trashed") is True else "active",
            "start_time": created if isinstance(created, datetime) else None,
            "end_time": us_to_dt(self.last_us) if status != "running" else None,
            "user": a.get("sys/owner"),
            "group": self.experiment or a.get("sys/experiment/name"),
            "notes": a.get("sys/description") or None,
            "labels": labels,
            "fork_parent_run_key": fork_key,
            "fork_step": fork_step,
            "host": a.get("sys/hostname"),
            "source_incomplete": self.incomplete,
            "step_scales": schema.dumps_value(scales) if scales else None,
        }

    def _params(self) -> list[dict[str, Any]]:
        rows = []
        for path, (ntype, v) in sorted(self.atoms.items()):
            if path.startswith(SYS):
                continue
            rows.append({"run_key": self.key, "path": path.split("/"), **typed(ntype, v)})
        for path, values in sorted(self.sets.items()):
            if not path.startswith(SYS):
                rows.append({"run_key": self.key, "path": path.split("/"), **typed("string_set", values)})
        return rows

    def _tags(self) -> dict[str, str]:
        """sys/ values with no neutral column (sys/id, sys/custom_run_id, ...) keep their path."""
        out = dict(self.extra_tags)
        for path, (ntype, v) in self.atoms.items():
            if path.startswith(SYS) and path not in _RUN_COLUMNS:
                out[path] = typed(ntype, v)["value_json"] if ntype != "string" else str(v)
        if self.sets.get("sys/group_tags"):
            out["sys/group_tags"] = schema.dumps_value(sorted(self.sets["sys/group_tags"]))
        if self.experiment:
            out["sys/experiment/name"] = self.experiment
        return out

    def _run_files(self, notes: list[tuple[str, str, str]]) -> ArtifactPayload:
        refs: dict[str, FileRef] = {}

        def put(path: str, src: FileSource, attr: str) -> None:
            if src.exists():
                refs[path] = src.ref(path)
            else:
                notes.append(
                    (
                        "source-file-missing",
                        f"files.{attr}",
                        f"{src.where or src.name} no longer exists; the attribute's other data moved "
                        "without it",
                    )
                )

        for attr, src in self.files.items():
            put(f"{attr}/{src.name}", src, attr)
        for attr, members in self.file_sets.items():
            for rel, src in members.items():
                put(f"{attr}/{rel}", src, attr)
        for attr, rows in self.others.items():
            for m, _, kind, v in rows:
                if kind == "file":
                    put(file_series_path(attr, m, v), v, attr)
        row = {
            "artifact_key": f"{self.key}#files",
            "project_key": project_key(self.project),
            "name": "run-files",
            "type": "run-files",
            "aliases": [],
            "producer_run_key": self.key,
        }
        return ArtifactPayload(row=row, files=[refs[p] for p in sorted(refs)])

    def _series(self, scales: dict[str, int], files: ArtifactPayload) -> pa.Table:
        have = {f.path for f in files.files}
        rows = []
        for attr in sorted(self.others):
            div = MICRO // scales.get(attr, 1)
            for m, ts, kind, v in sorted(self.others[attr], key=lambda r: r[0]):
                fpath = None
                if kind == "file":
                    kind = "neptune-file"  # the kind is the value's _type, as for W&B media
                    fpath = file_series_path(attr, m, v)
                    value: Any = {"_type": kind, "path": fpath, "mime_type": v.mime_type}
                    if fpath not in have:
                        fpath = None
                else:
                    value = v
                rows.append(
                    {
                        "run_key": self.key,
                        "key": attr,
                        "step": m // div,
                        "timestamp": us_to_dt(ts),
                        "kind": kind,
                        "value_json": schema.dumps_value(value),
                        "file_path": fpath,
                    }
                )
        return schema.table("series", rows)

    def _tracked_artifacts(self) -> list[ArtifactPayload]:
        """Neptune artifacts track files where they live (S3, a disk); they move as
        references, never as copies."""
        from trackbridge.model import no_local_bytes

        out = []
        for attr, t in sorted(self.tracked.items()):
            files = [
                FileRef(path=p, size=size, sha256=None, fetch=no_local_bytes, uri=uri)
                for p, uri, size in sorted(t.get("files", []))
            ]
            row = {
                "artifact_key": f"{self.key}#artifact/{attr}",
                "project_key": project_key(self.project),
                "name": attr.replace("/", "-"),
                "type": "neptune-artifact",
                "digest": t.get("hash"),
                "aliases": [],
                "metadata_json": schema.dumps_value({"attribute": attr}),
                "producer_run_key": self.key,
            }
            out.append(ArtifactPayload(row=row, files=files))
        return out


def typed(ntype: str, v: Any) -> dict[str, str]:
    """value_json and value_type for a Neptune atom, its type kept exactly."""
    if ntype == "datetime":
        return {
            "value_json": schema.dumps_value(v.isoformat() if isinstance(v, datetime) else str(v)),
            "value_type": "datetime",
        }
    if ntype == "string_set":
        return {"value_json": schema.dumps_value(sorted(v)), "value_type": "string_set"}
    if ntype == "float":
        return {"value_json": schema.dumps_value(float(v)), "value_type": "float"}
    if ntype == "int":
        return {"value_json": schema.dumps_value(int(v)), "value_type": "int"}
    if ntype == "bool":
        return {"value_json": schema.dumps_value(bool(v)), "value_type": "bool"}
    return {"value_json": schema.dumps_value(str(v)), "value_type": "str"}


def histogram(edges: Any, values: Any, density: bool = False) -> dict[str, Any]:
    """A Neptune histogram in W&B's own shape (``_type``/``bins``/``values``), so W&B
    draws it; whole numbers are written as integers, as W&B writes them back."""
    out: dict[str, Any] = {"_type": "histogram", "bins": _nums(edges), "values": _nums(values)}
    if density:
        out["density"] = True
    return out


def _nums(xs: Any) -> list[Any]:
    return [int(x) if float(x).is_integer() else float(x) for x in xs or []]


def file_series_path(attr: str, micro: int, src: FileSource) -> str:
    ext = Path(src.name).suffix
    return f"{attr}/{micro_text(micro)}{ext}"


def guess_ext(mime: str | None) -> str:
    return (mimetypes.guess_extension(mime or "") or "") if mime else ""


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def digest_of(paths: list[Path]) -> str:
    """A content fingerprint of a run's source files (the log or database and its files)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        h.update(sha256_file(p).encode() if p.is_file() else b"-")
    return h.hexdigest()


def _without_superseded_previews(pts: _Points) -> list[int]:
    """neptune-scale's preview points are provisional: a final value at the same step
    replaces them, as in Neptune itself. Unreplaced previews are kept."""
    if not pts.preview:
        return list(range(len(pts.micro)))
    final = {pts.micro[i] for i in range(len(pts.micro)) if i not in pts.preview}
    return [i for i in range(len(pts.micro)) if i not in pts.preview or pts.micro[i] not in final]


def _metric_batches(key: str, metrics: pa.Table) -> list[pa.RecordBatch]:
    if metrics.num_rows == 0:
        return []
    c = metrics.column
    tbl = schema.metrics_table(key, c("key"), c("step"), c("ts"), c("value"))
    return tbl.to_batches(max_chunksize=100_000)
