"""One W&B run's data, from offline records or the online API's dicts, into the neutral
tables: both readers build runs here, so a run read either way gives the same rows.
"""

from __future__ import annotations

import json
import math
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
from trackbridge import schema
from trackbridge.errors import BadInputError
from trackbridge.exporters.wandb.decode import (
    HISTORY_BATCH,
    HISTORY_TAG,
    SUMMARY_BATCH,
    SUMMARY_TAG,
    FastDecoder,
    Items,
    pb_items,
    record_kind,
)
from trackbridge.files import local_fetch
from trackbridge.model import (
    ArtifactPayload,
    FileRef,
    RunPayload,
    no_local_bytes,
)
from trackbridge.trackers.wandb import common as wc
from trackbridge.trackers.wandb.leveldb import RecordLog


@dataclass
class RunFiles:
    project: str
    run_id: str
    entity: str
    logs: list[Path] = field(default_factory=list)
    head_error: str | None = None
    name: str | None = None
    start: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


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
        self._fast = FastDecoder()
        self.fast_records = 0  # how many records the bulk path decoded (tests look)

    def read(self, log_path: Path) -> None:
        from wandb.proto import wandb_internal_pb2 as pb

        log = RecordLog(log_path)
        rec = pb.Record()
        batch: list[tuple[int, bytes]] = []
        for offset, payload in log.payloads():
            kind = record_kind(payload) if self.fast else 0
            if kind == HISTORY_TAG:
                batch.append((offset, payload))
                if len(batch) >= HISTORY_BATCH:
                    self._history_batch(batch, log_path)
                    batch = []
                continue
            if kind == SUMMARY_TAG:
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
                self._history(pb_items(rec.history.item), rec.history.step.num)
            elif kind == "stats":
                self._stats(rec.stats)
            elif kind == "summary":
                self._apply(self._summary_ops, pb_items(rec.summary.update), pb_items(rec.summary.remove))
            elif kind == "config":
                self._apply(self._config_ops, pb_items(rec.config.update), pb_items(rec.config.remove))
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
            self._apply(self._summary_ops, pb_items(rec.summary.update), pb_items(rec.summary.remove))

    def _run(self, r: Any) -> None:
        first = self.run
        self.run = r.__class__()
        self.run.CopyFrom(r)  # a resumed segment: its name, tags, notes… are the latest
        if first is not None and first.start_time.seconds:
            self.run.start_time.CopyFrom(first.start_time)  # the run started with its first segment
        self.exit_code = None
        self._apply(self._config_ops, pb_items(r.config.update), pb_items(r.config.remove))
        self._apply(self._summary_ops, pb_items(r.summary.update), pb_items(r.summary.remove))

    def _env(self, e: Any) -> None:
        if self.env is None:
            self.env = e.__class__()
        self.env.MergeFrom(e)

    def _apply(
        self,
        ops: dict[tuple[str, ...], str | None],
        updates: Items,
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
            self._history(pb_items(rec.history.item), rec.history.step.num)
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

    def _history(self, items: Items, step: int) -> None:
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
        items: Items = []
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

    def run_row(self, project_key: str, rf: RunFiles) -> dict[str, Any]:
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
