"""Read W&B offline runs (``wandb+offline://PATH``) into the neutral schema.

PATH holds ``offline-run-*`` / ``run-*`` folders at any depth (the layout ``wandb
offline`` leaves on an HPC cluster), or is one such folder. Each folder's
``run-<id>.wandb`` is a record log (``bridge.wandb_log``); a run resumed offline leaves
several folders with one id, read in order as one run.

History is the bulk of the data, so it is decoded in one pass with all values of a run
parsed by a single ``json.loads`` and turned into Arrow columns at the end, instead of
building a Python object per point.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridge import schema
from bridge import wandb_common as wc
from bridge.errors import BadInputError, MissingExtraError, SourceNotFoundError
from bridge.files import local_fetch, sha256_file
from bridge.model import (
    ArtifactPayload,
    FileRef,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    file_token,
    no_local_bytes,
)
from bridge.wandb_log import RecordLog

RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


@dataclass
class _Head:
    """What the run record at the top of a log says, read without the rest of the log."""

    log: Path
    project: str = ""
    run_id: str = ""
    entity: str = ""
    name: str | None = None
    start: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # ``_trackbridge`` if we wrote it
    error: str | None = None


@dataclass
class _RunFiles:
    project: str
    run_id: str
    entity: str
    logs: list[Path] = field(default_factory=list)
    head_error: str | None = None
    name: str | None = None
    start: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


class WandbOfflineSource(TrackerSource):
    def __init__(self, path: str, safe: str | None = None) -> None:
        try:
            from wandb.proto import wandb_internal_pb2  # noqa: F401  (the record classes)
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise MissingExtraError("wandb", "wandb") from e
        self.root = Path(path).expanduser()
        self.safe = safe or str(self.root)
        if not self.root.exists():
            raise SourceNotFoundError(f"wandb+offline://{self.safe}: no such folder {self.root}")
        self._origin: dict[str, str] = {}
        self._origin_source: dict[str, str] = {}
        self._artifact_rows: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        self._runs = self._discover()

    def describe(self) -> str:
        return f"wandb+offline://{self.safe}"

    # -- discovery

    def _discover(self) -> dict[str, _RunFiles]:
        found: list[tuple[str, Path]] = []
        candidates = [self.root] if RUN_DIR.match(self.root.name) else []
        if not candidates:
            # walk folders only, and never into a run folder (its files/ may be huge)
            for parent, dirs, _ in os.walk(self.root):
                runs = sorted(d for d in dirs if RUN_DIR.match(d))
                candidates += [Path(parent) / d for d in runs]
                dirs[:] = sorted(d for d in dirs if not RUN_DIR.match(d))
        for d in candidates:
            m = RUN_DIR.match(d.name)
            assert m
            found += [(m.group(1), log) for log in sorted(d.glob("run-*.wandb"))]
        heads = [_head(log) for _, log in found]
        # A resumed run's segments in the order they ran; the folder name's second is too
        # coarse (two segments in one second get a "-1" suffix that sorts first).
        heads.sort(key=lambda h: (h.start, str(h.log)))
        runs: dict[str, _RunFiles] = {}
        for h in heads:
            key = wc.run_key(h.project, h.run_id)
            rf = runs.get(key)
            if rf is None:
                rf = runs[key] = _RunFiles(h.project, h.run_id, h.entity, start=h.start)
            rf.logs.append(h.log)
            rf.head_error = rf.head_error or h.error
            rf.name = h.name or rf.name
            rf.meta = h.meta or rf.meta
            if rf.meta.get("source_key"):
                self._origin[key] = rf.meta["source_key"]
                if rf.meta.get("source"):
                    self._origin_source[key] = rf.meta["source"]
        return runs

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for rf in self._runs.values():
            if rf.head_error and not rf.project:
                continue
            kept = rf.meta.get("project") or {}  # a project trackbridge wrote from elsewhere
            row = {
                "project_key": wc.project_key(rf.project),
                "system": "wandb",
                "source_id": f"{rf.entity}/{rf.project}" if rf.entity else rf.project,
                "name": kept.get("name") or rf.project,
                "description": kept.get("description"),
                "lifecycle": kept.get("lifecycle") or "active",
                "tags": sorted((kept.get("tags") or {}).items()),
            }
            if sel.wants_project(row):
                out.setdefault(row["project_key"], row)
        return sorted(out.values(), key=lambda r: r["name"])

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {p["project_key"] for p in projects}
        out = []
        for key, rf in self._runs.items():
            if wc.project_key(rf.project) not in keys and not (rf.head_error and not rf.project):
                continue
            start = rf.meta.get("start_time") or rf.start or None
            row = {
                "run_key": key,
                "project_key": wc.project_key(rf.project),
                "source_id": rf.run_id,
                "name": rf.name,
                "start_time": wc.seconds_to_dt(start),
                "lifecycle": rf.meta.get("lifecycle") or "active",
                **file_token("wandb-offline", rf.logs),
            }
            if sel.wants_run(row):
                out.append(row)
        return out

    # -- one run

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        rf = self._runs[run["run_key"]]
        parsed = RunBuilder(run["run_key"])
        for log in rf.logs:
            parsed.read(log)
        metrics_tbl, series_tbl = parsed.tables()
        row = parsed.run_row(run["project_key"], rf)
        meta = parsed.config.get(wc.META_KEY) or {}
        if isinstance(meta, dict) and meta.get("source_key"):
            self._origin[run["run_key"]] = meta["source_key"]
            if meta.get("source"):
                self._origin_source[run["run_key"]] = meta["source"]
        files_dirs = [log.parent / "files" for log in rf.logs]
        run_files = _run_files(rf, files_dirs)
        artifacts = [run_files, *parsed.artifacts(wc.project_key(rf.project))]
        usage = [
            {"run_key": row["run_key"], "artifact_key": a.row["artifact_key"], "direction": "output"}
            for a in artifacts[1:]
        ]
        h = hashlib.sha256()
        for log in rf.logs:
            h.update(sha256_file(log).encode())
        for f in run_files.files:
            h.update(f"{f.path}:{f.size}".encode())
        payload = RunPayload(
            run=row,
            params=schema.table("params", wc.param_rows(row["run_key"], parsed.config)),
            tags=schema.table("tags", parsed.tag_rows()),
            metrics=lambda: iter(metrics_tbl.to_batches(max_chunksize=100_000)),
            summary=schema.table("summary", parsed.summary_rows()),
            series=series_tbl,
            artifact_usage=schema.table("artifact_usage", usage),
            artifacts=artifacts,
            fingerprint=h.hexdigest(),
            source_notes=parsed.notes,
        )
        restore_written(payload, meta)
        self._artifact_rows[run["run_key"]] = [(a.row, row["start_time"]) for a in payload.artifacts[1:]]
        return payload

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        return iter(())  # every offline artifact belongs to the run that logged it

    def registry(self, sel: Selection) -> RegistryPayload:
        """Registry links need the server, so offline runs have none; with
        ``register_models`` their model artifacts become versions."""
        if not sel.rules:
            return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))
        arts = []
        for row in self.runs(sel, self.projects(sel)):
            if row["run_key"] not in self._artifact_rows:
                self.read_run(row)
            arts += self._artifact_rows[row["run_key"]]
        models, versions = wc.model_versions(arts, sel.rules)
        return RegistryPayload(
            schema.table("registered_models", models), schema.table("model_versions", versions)
        )


def _head(log: Path) -> _Head:
    from wandb.proto import wandb_internal_pb2 as pb

    m = RUN_DIR.match(log.parent.name)
    h = _Head(log, run_id=m.group(2) if m else log.stem.removeprefix("run-"))
    rec = pb.Record()
    try:
        for _, payload in RecordLog(log).payloads():
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "run":
                r = rec.run
                h.project, h.run_id, h.entity = r.project or "uncategorized", r.run_id or h.run_id, r.entity
                h.name = r.display_name or None
                h.start = r.start_time.seconds + r.start_time.nanos / 1e9
                for it in r.config.update:
                    if it.key == wc.META_KEY or list(it.nested_key) == [wc.META_KEY]:
                        meta = json.loads(it.value_json)
                        h.meta = meta if isinstance(meta, dict) else {}
                return h
        h.error = f"{log}: no run record"
    except BadInputError as e:
        h.error = str(e)
    except Exception as e:
        h.error = f"{log}: {e}"
    return h


def _floats(values: pa.Array) -> pa.Array:
    """JSON numbers (``NaN`` and ``Infinity`` included) as float64, parsed by Arrow."""
    try:
        return values.cast(pa.float64())
    except pa.ArrowInvalid:  # something Arrow's parser does not take: let json decide
        return pa.array([float(json.loads(v)) for v in values.to_pylist()], pa.float64())


def restore_written(payload: RunPayload, meta: Any) -> None:
    """Put back what W&B could not hold, for a run trackbridge wrote (``_trackbridge``).

    Both readers call it, so a run written offline reads the same from its folder and,
    after ``wandb sync``, from the API.
    """
    if not (isinstance(meta, dict) and meta.get("source_key")):
        return
    key = payload.key
    payload.artifact_usage = schema.table(
        "artifact_usage", [{"run_key": key, **u} for u in meta.get("usage", [])]
    )
    if meta.get("params"):
        extra = schema.table("params", [{**p, "run_key": key} for p in meta["params"]])
        kept = {tuple(p["path"]) for p in meta["params"]}
        rows = [p for p in payload.params.to_pylist() if tuple(p["path"]) not in kept]
        payload.params = pa.concat_tables([schema.table("params", rows), extra])
    payload.dataset_inputs = schema.table(
        "dataset_inputs",
        [
            {**d, "run_key": key, "tags": [tuple(kv) for kv in d.get("tags") or []]}
            for d in meta.get("dataset_inputs", [])
        ],
    )
    run_files = payload.artifacts[0]
    kept = next((f for f in run_files.files if f.path == wc.KEPT_METRICS_FILE), None)
    if kept is not None:
        with kept.fetch() as local:
            extra_points = pq.read_table(local).cast(schema.SCHEMAS["metrics"])
        extra_points = extra_points.set_column(
            0, "run_key", pa.array([key] * extra_points.num_rows, pa.string())
        )
        logged = payload.metrics

        def metrics() -> Iterator[pa.RecordBatch]:
            yield from logged()
            yield from extra_points.to_batches()

        payload.metrics = metrics
    own = set(meta.get("run_files", []))
    run_files.files = [f for f in run_files.files if f.path in own]
    for a in payload.artifacts[1:]:
        _restore_artifact_row(a)


def _restore_artifact_row(art: ArtifactPayload) -> None:
    """An artifact trackbridge wrote carries its source row in its metadata: use it."""
    meta = json.loads(art.row.get("metadata_json") or "{}")
    kept = meta.get(wc.META_KEY) if isinstance(meta, dict) else None
    if not isinstance(kept, dict) or "row" not in kept:
        return
    original = dict(kept["row"])
    for k in ("project_key", "producer_run_key"):
        original[k] = art.row[k]
    if original.get("created_at"):
        original["created_at"] = datetime.fromisoformat(original["created_at"])
    art.row = original


def _run_files(rf: _RunFiles, dirs: list[Path]) -> ArtifactPayload:
    """The run's ``files/`` folder (media, saved files): a later segment's copy wins."""
    by_path: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    by_path[p.relative_to(d).as_posix()] = p
    files = [
        FileRef(path=rel, size=p.stat().st_size, sha256=None, fetch=local_fetch(p))
        for rel, p in sorted(by_path.items())
    ]
    row = {
        "artifact_key": wc.files_key(rf.project, rf.run_id),
        "project_key": wc.project_key(rf.project),
        "name": "run-files",
        "type": "run-files",
        "aliases": [],
        "producer_run_key": wc.run_key(rf.project, rf.run_id),
    }
    return ArtifactPayload(row=row, files=files)


_Items = list[tuple[tuple[str, ...], str]]


def _item_value_json(it: Any) -> str:
    if it.value_json:
        return it.value_json
    which = it.WhichOneof("value") if "value" in it.DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "none":
        return "null"
    if which == "json":
        return it.json
    return json.dumps(getattr(it, which), allow_nan=True)


def _pb_items(items: Any) -> _Items:
    out = []
    for it in items:
        nk = it.nested_key
        out.append((tuple(nk) if nk else (it.key,), it.value_json or _item_value_json(it)))
    return out


# -- the fast path for history and summary records
#
# They are nearly all of a long run's log, and reading their items through the SDK's
# classes costs a Python object per item: ten times the parse itself. So they are also
# parsed with message types of our own whose repeated fields come back as whole lists
# in one C call. History records are decoded a batch at a time: each record's items are
# left as raw bytes, then all of them are concatenated and parsed as one message
# (protobuf appends repeated fields when messages are concatenated), giving every key
# and every value_json in one list. That lines up only when each item is exactly one
# nested key and one value_json, which ``_Fast`` checks; a batch that does not (a media
# value, a typed value) goes record by record through the SDK's classes instead. The
# fast path skips work; it never changes a result (tests compare both paths).

_HISTORY_TAG, _SUMMARY_TAG = 0x12, 0x1A  # Record.history = 2, Record.summary = 3
HISTORY_BATCH = 2048
SUMMARY_BATCH = 4096
# W&B's own summary key, in every other summary record: ``nested_key: "_wandb"``
_WANDB_KEY = b"\x12\x06_wandb"


def _kind(payload: bytes) -> int:
    """The tag of the record's first field after ``num``: history, summary or other."""
    if not payload:
        return 0
    p = 0
    if payload[0] == 0x08:  # num, a varint
        p = 1
        while p < len(payload) and payload[p] & 0x80:
            p += 1
        p += 1
    return payload[p] if p < len(payload) else 0


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Fast:
    _types: tuple[Any, Any, Any] | None = None

    def __init__(self) -> None:
        if _Fast._types is None:
            _Fast._types = _flat_types()
        batch_t, rec_t, items_t = _Fast._types
        self.batch, self.rec, self.items = batch_t(), rec_t(), items_t()
        self.paths: dict[bytes, tuple[str, ...]] = {}

    def history(self, payloads: list[bytes]) -> tuple[list[int], list[int], list[str], list[str]] | None:
        """(item count per record, step per record, keys, value_jsons), or None."""
        self.batch.ParseFromString(b"".join(b"\x0a" + _varint_bytes(len(p)) + p for p in payloads))
        counts, steps, raw = [], [], []
        for rec in self.batch.rec:
            h = rec.history
            items = h.item
            counts.append(len(items))
            steps.append(h.step.num)
            raw.extend(items)
        if len(counts) != len(payloads):
            return None
        return self._items(raw, counts, steps)

    def summary_batch(self, payloads: list[bytes]) -> list[tuple[tuple[str, ...], str | bytes]] | None:
        """The net effect of consecutive summary records: (path, value_json) for every path
        they set, with its last value. None when a record removes a path, or when a path
        of one kind of record nests inside a path of the other: then order matters record
        by record, and the caller replays them one at a time.

        The SDK writes two summary records per ``log`` call: the logged keys, one nested
        key per item, and W&B's own ``_wandb.runtime`` / ``_runtime``. Each kind is
        decoded in bulk: its records concatenated parse as one (protobuf merges repeated
        fields), giving every update in order in one C call. The first kind's items then
        line up in one more parse, as in history; the second's are split where their
        value_json field starts, each distinct path decoded once. A path both kinds set
        takes the value of whichever record set it last.
        """
        rec, its = self.rec, self.items
        kinds = [_WANDB_KEY in p for p in payloads]
        plain = [p for p, own in zip(payloads, kinds, strict=True) if not own]
        other = [p for p, own in zip(payloads, kinds, strict=True) if own]
        first: dict[tuple[str, ...], str | bytes] = {}
        if plain:
            rec.ParseFromString(b"".join(plain))
            if rec.summary.remove:
                return None
            updates = list(rec.summary.update)
            got = self._items(updates, [], [])
            if got is None:
                other, first = payloads, {}  # all of them item by item
            else:
                first = {(k,): v for k, v in dict(zip(got[2], got[3], strict=True)).items()}
        second: dict[tuple[str, ...], str | bytes] = {}
        if other:
            rec.ParseFromString(b"".join(other))
            if rec.summary.remove:
                return None
            known = self.paths
            for b in rec.summary.update:
                cut = _value_start(b)
                if cut is None:
                    return None
                head, start = cut
                path = known.get(head)
                if path is None:
                    its.ParseFromString(head)
                    keys, nested = list(its.key), list(its.nested_key)
                    if its.value_json or len(keys) + bool(nested) != 1:
                        return None
                    path = known[head] = tuple(nested) if nested else (keys[0],)
                second[path] = b[start:]
        for path in second.keys() & first.keys():
            if self._last_sets_in(payloads, kinds, path) is False:
                second.pop(path)  # a record of the first kind set it last
            else:
                first.pop(path)
        for a in first:
            for b in second:
                if a[: len(b)] == b or b[: len(a)] == a:
                    return None  # one nests in the other: order decides
        return [*first.items(), *second.items()]

    def _last_sets_in(self, payloads: list[bytes], kinds: list[bool], path: tuple[str, ...]) -> bool | None:
        """Whether the last record that sets ``path`` is of the second kind (checked with
        the SDK's classes: it takes a record or two, from the end)."""
        from wandb.proto import wandb_internal_pb2 as pb

        rec = pb.Record()
        needle = path[-1].encode()
        for i in range(len(payloads) - 1, -1, -1):
            if needle in payloads[i]:
                rec.ParseFromString(payloads[i])
                if any(p == path for p, _ in _pb_items(rec.summary.update)):
                    return kinds[i]
        return None

    def _items(
        self, raw: list[bytes], counts: list[int], steps: list[int]
    ) -> tuple[list[int], list[int], list[str], list[str]] | None:
        its = self.items
        its.ParseFromString(b"".join(raw))
        keys, values = its.nested_key, its.value_json
        n = len(raw)
        if len(keys) != n or len(values) != n or its.key:
            return None
        if not _all_start_with_nested_key(raw):
            return None
        return counts, steps, list(keys), list(values)


def _all_start_with_nested_key(items: list[bytes]) -> bool:
    """Every item opens with a nested_key field (tag 0x12). Serializers write fields in
    number order and key (1) is absent, so with as many nested keys as items, each item
    has exactly one; and with as many value_jsons, exactly one value."""
    return all(items) and set(map(_first_byte, items)) == {0x12}


_first_byte = operator.itemgetter(0)


def _value_start(b: bytes) -> tuple[bytes, int] | None:
    """Split an item into its path fields and the start of its value_json bytes.

    Walks the path fields (key = 1, nested_key = 2) by their lengths, so a 0x82 byte
    inside a name or a length is never mistaken for the value's tag; None if the item
    has any other shape.
    """
    p, n = 0, len(b)
    while p < n:
        tag = b[p]
        if tag == 0x82 and p + 1 < n and b[p + 1] == 0x01:
            length, q = b[p + 2], p + 3
            if length >= 0x80:
                length, shift = length & 0x7F, 7
                while True:
                    x = b[q]
                    q += 1
                    length |= (x & 0x7F) << shift
                    if x < 0x80:
                        break
                    shift += 7
            return (b[:p], q) if q + length == n else None
        if tag != 0x12 and tag != 0x0A:
            return None
        length, q = b[p + 1], p + 2
        if length >= 0x80:
            return None  # a name over 127 bytes: rare; the SDK's classes handle it
        p = q + length
    return None


def _flat_types() -> tuple[Any, Any, Any]:
    """Our own views of wandb_internal.proto's Record, HistoryRecord and HistoryItem."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="trackbridge_flat.proto", package="tbflat", syntax="proto3")

    def message(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if tname:
                f.type_name = tname

    rep, opt, msg = F.LABEL_REPEATED, F.LABEL_OPTIONAL, F.TYPE_MESSAGE
    message("Step", [("num", 1, F.TYPE_INT64, opt, None)])
    message(
        "Items",
        [
            ("key", 1, F.TYPE_STRING, rep, None),
            ("nested_key", 2, F.TYPE_STRING, rep, None),
            ("value_json", 16, F.TYPE_STRING, rep, None),
        ],
    )
    message("History", [("item", 1, F.TYPE_BYTES, rep, None), ("step", 2, msg, opt, ".tbflat.Step")])
    message("Summary", [("update", 1, F.TYPE_BYTES, rep, None), ("remove", 2, F.TYPE_BYTES, rep, None)])
    message("Rec", [("history", 2, msg, opt, ".tbflat.History"), ("summary", 3, msg, opt, ".tbflat.Summary")])
    message("Batch", [("rec", 1, msg, rep, ".tbflat.Rec")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return tuple(get(pool.FindMessageTypeByName(f"tbflat.{n}")) for n in ("Batch", "Rec", "Items"))  # type: ignore[return-value]


class RunBuilder:
    """One W&B run's data as it arrives, record by record (``read``) or as the online
    API's dicts (``history_row``…); ``tables()`` turns the history into Arrow at the end.
    Both readers use it, so a run read offline and online gives the same rows."""

    def __init__(self, run_key: str, fast: bool = True) -> None:
        self.run_key = run_key
        self.run: Any = None
        self.env: Any = None
        self.exit_code: int | None = None
        self.runtime: float | None = None
        self.truncated = False
        self._config_ops: dict[tuple[str, ...], str | None] = {}
        self._summary_ops: dict[tuple[str, ...], str | bytes | None] = {}
        # summary records not yet applied: applied in bulk (``_summary_flush``) before
        # anything else touches _summary_ops
        self._summary_batch: list[tuple[int, bytes]] = []
        self.notes: list[tuple[str, str, str]] = []
        self._artifacts: list[Any] = []
        self.last_time: float | None = None
        # history, flat: per row a step and a timestamp; per item a row index, key, json
        self.row_step: list[int] = []
        self.row_time: list[str | None] = []
        self.item_row: list[int] = []
        self.item_key: list[str] = []
        self.item_json: list[str] = []
        self.nested: list[tuple[int, dict[str, Any]]] = []
        self.stats_n = 0
        self._config: dict[str, Any] | None = None
        self.fast = fast
        self._fast = _Fast()
        self.fast_records = 0  # how many records the bulk path decoded (tests look)

    def read(self, log_path: Path) -> None:
        from wandb.proto import wandb_internal_pb2 as pb

        log = RecordLog(log_path)
        rec = pb.Record()
        batch: list[tuple[int, bytes]] = []
        for offset, payload in log.payloads():
            kind = _kind(payload) if self.fast else 0
            if kind == _HISTORY_TAG:
                batch.append((offset, payload))
                if len(batch) >= HISTORY_BATCH:
                    self._history_batch(batch, log_path)
                    batch = []
                continue
            if kind == _SUMMARY_TAG:
                self._summary_batch.append((offset, payload))
                if len(self._summary_batch) >= SUMMARY_BATCH:
                    self._summary_flush(log_path)
                continue
            try:
                rec.ParseFromString(payload)
            except Exception as e:
                raise BadInputError(f"{log_path}: byte {offset}: record does not decode ({e})") from e
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                self._history(_pb_items(rec.history.item), rec.history.step.num)
            elif kind == "stats":
                self._stats(rec.stats)
            elif kind == "summary":
                self._apply(self._summary_ops, _pb_items(rec.summary.update), _pb_items(rec.summary.remove))
            elif kind == "config":
                self._apply(self._config_ops, _pb_items(rec.config.update), _pb_items(rec.config.remove))
            elif kind == "run":
                self._run(rec.run)
            elif kind == "environment":
                self._env(rec.environment)
            elif kind == "exit":
                self.exit_code = rec.exit.exit_code
                self.runtime = float(rec.exit.runtime)
            elif kind == "artifact":
                a = pb.ArtifactRecord()
                a.CopyFrom(rec.artifact)
                self._artifacts.append(a)
        if batch:
            self._history_batch(batch, log_path)
        self._summary_flush(log_path)
        if log.truncated:
            self.truncated = True
            self.notes.append(
                (
                    "source-incomplete",
                    "runs",
                    f"{log_path} ends inside a record (the job was killed or preempted); "
                    "every whole record was read and the run is marked incomplete",
                )
            )

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            self._config = self._resolve(self._config_ops)
        return self._config

    @property
    def summary(self) -> dict[str, Any]:
        self._summary_flush()
        return self._resolve(self._summary_ops)

    def _summary_flush(self, log_path: Path | None = None) -> None:
        pending, self._summary_batch = self._summary_batch, []
        if not pending:
            return
        try:
            net = self._fast.summary_batch([p for _, p in pending])
        except Exception:
            net = None  # the SDK's classes will say what is wrong, record by record
        if net is not None:
            self.fast_records += len(pending)
            ops = self._summary_ops
            for path, value in net:
                ops.pop(path, None)
                ops[path] = value  # str or bytes; decoded once, in _resolve
            return
        from wandb.proto import wandb_internal_pb2 as pb

        rec = pb.Record()
        for offset, payload in pending:
            try:
                rec.ParseFromString(payload)
            except Exception as e:
                raise BadInputError(f"{log_path}: byte {offset}: record does not decode ({e})") from e
            self._apply(self._summary_ops, _pb_items(rec.summary.update), _pb_items(rec.summary.remove))

    def _run(self, r: Any) -> None:
        first = self.run
        self.run = r.__class__()
        self.run.CopyFrom(r)  # a resumed segment: its name, tags, notes… are the latest
        if first is not None and first.start_time.seconds:
            self.run.start_time.CopyFrom(first.start_time)  # the run started with its first segment
        self.exit_code = None
        self._apply(self._config_ops, _pb_items(r.config.update), _pb_items(r.config.remove))
        self._apply(self._summary_ops, _pb_items(r.summary.update), _pb_items(r.summary.remove))

    def _env(self, e: Any) -> None:
        if self.env is None:
            self.env = e.__class__()
        self.env.MergeFrom(e)

    def _apply(
        self,
        ops: dict[tuple[str, ...], str | None],
        updates: _Items,
        removes: Iterable[tuple[tuple[str, ...], str]],
    ) -> None:
        """Record updates as raw JSON by path; parse once at the end (``_resolve``).

        The SDK writes the updated summary keys after every ``log`` call, so a long run has
        as many summary records as history rows; parsing each value would double the cost
        of reading history. A later write to a path moves it to the end, so replaying the
        survivors in order gives exactly the tree the SDK built.
        """
        if ops is self._summary_ops:
            self._summary_flush()
        for path, text in updates:
            ops.pop(path, None)
            ops[path] = text
        for path, _ in removes:
            for p in [p for p in ops if p[: len(path)] == path]:
                del ops[p]
            ops[path] = None

    @staticmethod
    def _resolve(ops: dict[tuple[str, ...], Any]) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for path, text in ops.items():
            if text is None:
                wc.del_path(tree, list(path))
            else:
                wc.set_path(tree, list(path), json.loads(text))  # str or bytes
        return tree

    def _history_batch(self, batch: list[tuple[int, bytes]], log_path: Path) -> None:
        try:
            got = self._fast.history([p for _, p in batch])
        except Exception:
            got = None
        if got is None:
            if len(batch) > 1:  # record by record: the odd ones alone take the slow path
                for one in batch:
                    self._history_batch([one], log_path)
                return
            from wandb.proto import wandb_internal_pb2 as pb

            offset, payload = batch[0]
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception as e:
                raise BadInputError(f"{log_path}: byte {offset}: record does not decode ({e})") from e
            self._history(_pb_items(rec.history.item), rec.history.step.num)
            return
        counts, steps, keys, values = got
        self.fast_records += len(counts)
        base = len(self.row_step)
        self.row_step.extend(steps)
        self.row_time.extend([None] * len(steps))
        self.item_key.extend(keys)
        self.item_json.extend(values)
        for i, c in enumerate(counts):
            self.item_row.extend([base + i] * c)

    def _history(self, items: _Items, step: int) -> None:
        """One history row. Single keys go to the flat lists as they are, W&B's own
        (``_timestamp``, ``_step``…) included: ``tables()`` sorts them out for all rows
        at once. Nested keys (media, logged dicts) are rebuilt as a tree."""
        row = len(self.row_step)
        keys, jsons, rows = self.item_key, self.item_json, self.item_row
        nested: dict[str, Any] | None = None
        for path, v in items:
            if len(path) != 1:
                if nested is None:
                    nested = {}
                wc.set_path(nested, list(path), json.loads(v))
                continue
            keys.append(path[0])
            jsons.append(v)
            rows.append(row)
        self.row_step.append(step)
        self.row_time.append(None)
        if nested is not None:
            self.nested.append((row, nested))

    def _stats(self, s: Any) -> None:
        t = s.timestamp.seconds + s.timestamp.nanos / 1e9
        self._system(t, [(it.key, it.value_json) for it in s.item])

    def _system(self, t: float, items: list[tuple[str, str]]) -> None:
        row = len(self.row_step)
        self.row_step.append(self.stats_n)
        self.row_time.append(repr(t))
        self.stats_n += 1
        for key, value_json in items:
            self.item_key.append("system/" + key)
            self.item_json.append(value_json)
            self.item_row.append(row)

    # -- the same, from the online API's dicts (exporters.wandb_online)

    def history_row(self, row: dict[str, Any]) -> None:
        """One ``scan_history`` row. Nested dicts that are not media are namespaces."""
        items: _Items = []
        for path, v in wc.flatten({k: v for k, v in row.items() if k != "_step"}):
            items.append((tuple(path), schema.dumps_value(v)))
        self._history(items, int(row.get("_step") or 0))

    def system_row(self, row: dict[str, Any]) -> None:
        """One line of ``wandb-events.jsonl``: ``system.cpu`` → ``system/cpu``."""
        t = row.get("_timestamp")
        items = [
            (k.removeprefix("system."), schema.dumps_value(v))
            for k, v in row.items()
            if k not in ("_timestamp", "_runtime") and isinstance(v, int | float)
        ]
        self._system(float(t) if t is not None else 0.0, items)

    def set_config(self, config: dict[str, Any]) -> None:
        for path, v in wc.flatten(config):
            self._config_ops[tuple(path)] = schema.dumps_value(v)
        self._config = None

    def set_summary(self, summary: dict[str, Any]) -> None:
        self._summary_flush()
        for path, v in wc.flatten(summary):
            self._summary_ops[tuple(path)] = schema.dumps_value(v)

    # -- results

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """The metrics and series tables, built column-wise from the flat item lists."""
        keys = pa.array(self.item_key, pa.string())
        values = pa.array(self.item_json, pa.string())
        rows = pa.array(self.item_row, pa.int64())
        n_rows = len(self.row_step)
        # each row's time: stats rows carry it; history rows have a _timestamp item
        times = np.array([np.nan if t is None else float(t) for t in self.row_time], dtype=np.float64)
        is_ts = pc.equal(keys, "_timestamp")
        if n_rows and pc.any(is_ts).as_py():
            times[rows.filter(is_ts).to_numpy()] = _floats(values.filter(is_ts)).to_numpy(
                zero_copy_only=False
            )
        steps = np.array(self.row_step, dtype=np.int64)
        is_axis = pc.equal(keys, wc.STEP_AXIS)
        if pc.any(is_axis).as_py():  # a run trackbridge wrote on a row counter
            steps[rows.filter(is_axis).to_numpy()] = (
                _floats(values.filter(is_axis)).to_numpy().astype(np.int64)
            )
        self.steps_final = steps
        drop = pc.or_(pc.or_(is_ts, is_axis), pc.equal(keys, "_step"))
        if isinstance(self.config.get(wc.META_KEY), dict):
            drop = pc.or_(drop, pc.equal(keys, "_runtime"))  # our own import's clock
        keep = pc.invert(drop)
        keys, values, rows = keys.filter(keep), values.filter(keep), rows.filter(keep)
        first = pc.utf8_slice_codeunits(values, 0, 1)
        numeric = pc.is_in(first, value_set=pa.array(list("-0123456789NI")))
        known = times[~np.isnan(times)]
        self.last_time = float(known.max()) if known.size else None

        s_rows: list[dict[str, Any]] = []
        other = pc.invert(numeric)
        for k, v, r in zip(
            keys.filter(other).to_pylist(),
            values.filter(other).to_pylist(),
            rows.filter(other).to_pylist(),
            strict=True,
        ):
            self._series(s_rows, k, r, json.loads(v), times)
        m_keys, m_vals, m_rows = keys.filter(numeric), _floats(values.filter(numeric)), rows.filter(numeric)
        extra_k, extra_v, extra_r = [], [], []
        for row, tree in self.nested:
            for path, leaf in wc.flatten(tree):
                if type(leaf) is float or type(leaf) is int:
                    extra_k.append(".".join(path))
                    extra_v.append(float(leaf))
                    extra_r.append(row)
                else:
                    self._series(s_rows, ".".join(path), row, leaf, times)
        if extra_k:
            m_keys = pa.concat_arrays([m_keys, pa.array(extra_k, pa.string())])
            m_vals = pa.concat_arrays([m_vals, pa.array(extra_v, pa.float64())])
            m_rows = pa.concat_arrays([m_rows, pa.array(extra_r, pa.int64())])
        idx = m_rows.to_numpy()
        us = np.round(times[idx] * 1_000_000)
        stamps = pa.array(us, pa.float64(), from_pandas=True).cast(pa.int64()).cast(schema.TS)
        n = len(m_keys)
        none = pa.nulls(n, pa.string())
        tbl = pa.table(
            [
                pa.array([self.run_key] * n, pa.string()),
                m_keys,
                pa.array(steps[idx], pa.int64()),
                stamps,
                m_vals,
                none,
                none,
                none,
            ],
            schema=schema.SCHEMAS["metrics"],
        )
        if n:
            tbl = tbl.take(pc.sort_indices(tbl, [("key", "ascending"), ("step", "ascending")]))
        return tbl, schema.table("series", s_rows)

    def _series(self, out: list[dict[str, Any]], key: str, row: int, v: Any, times: np.ndarray) -> None:
        if isinstance(v, dict) and "_type" in v:
            kind = str(v["_type"])
            path = v.get("path") if isinstance(v.get("path"), str) else None
            sha = v.get("sha256") if isinstance(v.get("sha256"), str) else None
        else:
            kind = {bool: "bool", str: "string", type(None): "null"}.get(type(v), "json")
            path = sha = None
        t = float(times[row])
        out.append(
            {
                "run_key": self.run_key,
                "key": key,
                "step": int(self.steps_final[row]),
                "timestamp": None if math.isnan(t) else wc.seconds_to_dt(t),
                "kind": kind,
                "value_json": schema.dumps_value(v),
                "file_path": path,
                "file_sha256": sha,
            }
        )

    def summary_rows(self) -> list[dict[str, Any]]:
        meta = self.config.get(wc.META_KEY)
        if isinstance(meta, dict) and "summary" in meta:  # the source's exact summary
            return [{"run_key": self.run_key, **r} for r in meta["summary"]]
        tree = {k: v for k, v in self.summary.items() if k not in wc.SUMMARY_INTERNAL}
        rows = [
            {"run_key": self.run_key, "path": path, "value_json": schema.dumps_value(v)}
            for path, v in wc.flatten(tree)
        ]
        return sorted(rows, key=lambda r: r["path"])  # one order, however the records were read

    def tag_rows(self) -> list[dict[str, Any]]:
        meta = self.config.get(wc.META_KEY) or {}
        tags = meta.get("tags") or {} if isinstance(meta, dict) else {}
        return [{"run_key": self.run_key, "key": k, "value": v} for k, v in sorted(tags.items())]

    def run_row(self, project_key: str, rf: _RunFiles) -> dict[str, Any]:
        r, env = self.run, self.env
        if r is None:
            raise BadInputError(f"{rf.logs[0]}: no run record; this is not a complete W&B run log")
        start = r.start_time.seconds + r.start_time.nanos / 1e9 if r.start_time.seconds else None
        end = None
        if self.exit_code is not None:
            cands = [
                t for t in (self.last_time, start + self.runtime if start and self.runtime else None) if t
            ]
            end = max(cands) if cands else None
        git_commit = r.git.commit or (env.git.commit if env else "") or None
        git_remote = r.git.remote_url or (env.git.remote_url if env else "") or None
        command = None
        if env and env.program:
            command = shlex.join([env.program, *env.args])
        row = {
            "run_key": self.run_key,
            "project_key": project_key,
            "source_id": r.run_id,
            "name": r.display_name or None,
            "status": wc.status_from_exit(self.exit_code, self.truncated),
            "lifecycle": "active",
            "start_time": wc.seconds_to_dt(start),
            "end_time": wc.seconds_to_dt(end),
            "user": (env.username if env else "") or None,
            "group": r.run_group or None,
            "job_type": r.job_type or None,
            "notes": r.notes or None,
            "labels": list(r.tags),
            "parent_run_key": None,
            "fork_parent_run_key": wc.run_key(rf.project, r.branch_point.run) if r.branch_point.run else None,
            "fork_step": r.branch_point.value if r.branch_point.run else None,
            "git_commit": git_commit,
            "git_remote": git_remote,
            "command": command,
            "host": r.host or (env.host if env else "") or None,
            "source_url": None,
            "source_incomplete": self.truncated,
        }
        wc.apply_meta(row, self.config.get(wc.META_KEY))
        return row

    def artifacts(self, project_key: str) -> list[ArtifactPayload]:
        out = []
        for a in self._artifacts:
            project = a.project or project_key.split("/", 1)[1]
            key = wc.artifact_key(project, a.name, a.digest)
            files = []
            for entry in a.manifest.contents:
                if entry.ref:
                    files.append(FileRef(entry.path, entry.size or None, None, no_local_bytes, uri=entry.ref))
                    continue
                local = Path(entry.local_path) if entry.local_path else None
                if local is None or not local.exists():
                    self.notes.append(
                        (
                            "source-file-missing",
                            f"artifacts.{a.name}",
                            f"{entry.path} ({entry.size} bytes, md5 {entry.digest}) is no longer in "
                            f"W&B's staging folder ({local or 'no path recorded'}); it was not copied",
                        )
                    )
                    continue
                files.append(FileRef(entry.path, entry.size, None, local_fetch(local)))
            aliases = sorted(x for x in a.aliases if x != "latest")
            out.append(
                ArtifactPayload(
                    row={
                        "artifact_key": key,
                        "project_key": wc.project_key(project),
                        "name": a.name,
                        "type": a.type,
                        "version": None,  # the server numbers versions; offline there are none
                        "digest": a.digest,
                        "aliases": aliases,
                        "description": a.description or None,
                        "metadata_json": a.metadata or None,
                        "producer_run_key": self.run_key,
                    },
                    files=files,
                )
            )
        return out
