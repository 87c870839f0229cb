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
from trackbridge.exporters.wandb.history import HistoryTables
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
    sweep_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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
    if meta.get("tags_in_config"):  # the tags shown in config are the run's tags, not params
        rows = [p for p in payload.params.to_pylist() if p["path"][0] != wc.TAGS_CONFIG]
        payload.params = schema.table("params", rows)
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
    if meta.get("model_links"):
        payload.metrics = _linked(payload.metrics, meta["model_links"])
    if meta.get("native_series"):  # drawn as wandb.Image / wandb.Table: the rows as they were
        kept = [
            {**r, "run_key": key, "timestamp": wc.seconds_to_dt(r["timestamp"])}
            for r in meta["native_series"]
        ]
        drawn = {(r["key"], r["step"]) for r in kept}
        rows = [r for r in payload.series.to_pylist() if (r["key"], r["step"]) not in drawn]
        payload.series = schema.table("series", rows + kept)
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
    if meta.get("native_series"):  # the run_table artifact W&B makes of a logged wandb.Table
        theirs = {u["artifact_key"] for u in meta.get("usage", [])}
        payload.artifacts = [run_files] + [
            a
            for a in payload.artifacts[1:]
            if a.row["type"] != "run_table" or a.row["artifact_key"] in theirs
        ]
    for a in payload.artifacts[1:]:
        _restore_artifact_row(a)


def _linked(metrics: Any, links: list[list[Any]]) -> Any:
    """The points again with the logged-model and dataset links W&B's history cannot
    hold (``_trackbridge.model_links``: key, step, value, model, dataset name, digest).
    Only batches holding a linked key are looked at, point by point."""

    def value_key(v: Any) -> str:
        return "nan" if isinstance(v, float) and math.isnan(v) else repr(float(v))

    def patched() -> Iterator[pa.RecordBatch]:
        todo: dict[tuple[str, int, str], list[list[Any]]] = {}
        for k, s, v, *link in links:
            todo.setdefault((k, s, value_key(v)), []).append(link)
        linked_keys = pa.array(sorted({k for k, *_ in links}), pa.string())
        for b in metrics():
            rows = pc.indices_nonzero(pc.is_in(b.column("key"), value_set=linked_keys)).to_pylist()
            if not rows:
                yield b
                continue
            cols = {c: b.column(c).to_pylist() for c in ("model_key", "dataset_name", "dataset_digest")}
            keys, steps, values = (b.column(c).take(rows).to_pylist() for c in ("key", "step", "value"))
            for i, k, s, v in zip(rows, keys, steps, values, strict=True):
                waiting = todo.get((k, s, value_key(v)))
                if waiting:
                    cols["model_key"][i], cols["dataset_name"][i], cols["dataset_digest"][i] = waiting.pop(0)
            for c, vals in cols.items():
                b = b.set_column(b.schema.get_field_index(c), c, pa.array(vals, pa.string()))
            yield b

    return patched


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


class RunBuilder(HistoryTables):
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

    # -- the same, from the online API's dicts (exporters.wandb_online)

    def set_config(self, config: dict[str, Any]) -> None:
        for path, v in wc.flatten(config):
            self._config_ops[tuple(path)] = schema.dumps_value(v)
        self._config = None

    def set_summary(self, summary: dict[str, Any]) -> None:
        self._summary_flush()
        for path, v in wc.flatten(summary):
            self._summary_ops[tuple(path)] = schema.dumps_value(v)

    # -- results

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
            "sweep_key": wc.sweep_key(rf.project, r.sweep_id) if r.sweep_id else None,
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
