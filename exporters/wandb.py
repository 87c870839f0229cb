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

import contextlib
import hashlib
import json
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridge import schema
from bridge import wandb_common as wc
from bridge.errors import BadInputError, SourceNotFoundError
from bridge.model import ArtifactPayload, FileRef, RegistryPayload, RunPayload, Selection, no_local_bytes
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


class WandbOfflineSource:
    def __init__(self, path: str, safe: str | None = None) -> None:
        self.root = Path(path).expanduser()
        self.safe = safe or str(self.root)
        if not self.root.exists():
            raise SourceNotFoundError(f"wandb+offline://{self.safe}: no such folder {self.root}")
        self._origin: dict[str, str] = {}
        self._runs = self._discover()

    def describe(self) -> str:
        return f"wandb+offline://{self.safe}"

    def close(self) -> None:
        pass

    def origin_of(self, kind: str, key: str) -> str:
        return self._origin.get(key, key)

    # -- discovery

    def _discover(self) -> dict[str, _RunFiles]:
        found: list[tuple[str, Path]] = []
        candidates = [self.root] if RUN_DIR.match(self.root.name) else []
        candidates += [p for p in self.root.rglob("*") if p.is_dir() and RUN_DIR.match(p.name)]
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
            }
            if sel.wants_run(row):
                out.append(row)
        return out

    # -- one run

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        rf = self._runs[run["run_key"]]
        parsed = _Parser(run["run_key"])
        for log in rf.logs:
            parsed.read(log)
        metrics_tbl, series_tbl = parsed.tables()
        row = parsed.run_row(run["project_key"], rf)
        meta = parsed.config.get(wc.META_KEY) or {}
        if isinstance(meta, dict) and meta.get("source_key"):
            self._origin[run["run_key"]] = meta["source_key"]
        files_dirs = [log.parent / "files" for log in rf.logs]
        run_files = _run_files(rf, files_dirs)
        artifacts = [run_files, *parsed.artifacts(wc.project_key(rf.project))]
        usage = [
            {"run_key": row["run_key"], "artifact_key": a.row["artifact_key"], "direction": "output"}
            for a in artifacts[1:]
        ]
        params = wc.param_rows(row["run_key"], parsed.config)
        datasets: list[dict[str, Any]] = []
        if isinstance(meta, dict) and meta.get("source_key"):
            # a run trackbridge wrote: put back what W&B could not hold
            usage = [{"run_key": row["run_key"], **u} for u in meta.get("usage", [])]
            params += [{**p, "run_key": row["run_key"]} for p in meta.get("params", [])]
            datasets = [
                {**d, "run_key": row["run_key"], "tags": [tuple(kv) for kv in d.get("tags") or []]}
                for d in meta.get("dataset_inputs", [])
            ]
            system = next((f for f in run_files.files if f.path == wc.KEPT_METRICS_FILE), None)
            if system is not None:
                with system.fetch() as local:
                    extra = pq.read_table(local).cast(schema.SCHEMAS["metrics"])
                metrics_tbl = pa.concat_tables(
                    [
                        metrics_tbl,
                        extra.set_column(
                            0, "run_key", pa.array([row["run_key"]] * extra.num_rows, pa.string())
                        ),
                    ]
                )
            own = set(meta.get("run_files", []))
            run_files.files = [f for f in run_files.files if f.path in own]
            for a in artifacts[1:]:
                _restore_artifact_row(a)
        h = hashlib.sha256()
        for log in rf.logs:
            h.update(_file_digest(log).encode())
        for f in run_files.files:
            h.update(f"{f.path}:{f.size}".encode())
        return RunPayload(
            run=row,
            params=schema.table("params", params),
            tags=schema.table("tags", parsed.tag_rows()),
            metrics=lambda: iter(metrics_tbl.to_batches(max_chunksize=100_000)),
            summary=schema.table("summary", parsed.summary_rows()),
            series=series_tbl,
            artifact_usage=schema.table("artifact_usage", usage),
            dataset_inputs=schema.table("dataset_inputs", datasets),
            artifacts=artifacts,
            fingerprint=h.hexdigest(),
            source_notes=parsed.notes,
        )

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        return iter(())  # every offline artifact belongs to the run that logged it

    def registry(self, sel: Selection) -> RegistryPayload:
        # Registry links need the server; offline runs cannot carry them.
        return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))


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


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _local_fetch(path: Path):
    @contextlib.contextmanager
    def fetch() -> Iterator[str]:
        if not path.exists():
            raise BadInputError(f"{path}: the file disappeared while reading")
        yield str(path)

    return fetch


def _run_files(rf: _RunFiles, dirs: list[Path]) -> ArtifactPayload:
    """The run's ``files/`` folder (media, saved files): a later segment's copy wins."""
    by_path: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    by_path[p.relative_to(d).as_posix()] = p
    files = [
        FileRef(path=rel, size=p.stat().st_size, sha256=None, fetch=_local_fetch(p))
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


class _Parser:
    """Accumulates one run's records; ``tables()`` turns history into Arrow at the end."""

    def __init__(self, run_key: str) -> None:
        self.run_key = run_key
        self.run: Any = None
        self.env: Any = None
        self.exit_code: int | None = None
        self.runtime: float | None = None
        self.truncated = False
        self._config_ops: dict[tuple[str, ...], str | None] = {}
        self._summary_ops: dict[tuple[str, ...], str | None] = {}
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

    def read(self, log_path: Path) -> None:
        from wandb.proto import wandb_internal_pb2 as pb

        log = RecordLog(log_path)
        rec = pb.Record()
        for offset, payload in log.payloads():
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
        return self._resolve(self._summary_ops)

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
        for path, text in updates:
            ops.pop(path, None)
            ops[path] = text
        for path, _ in removes:
            for p in [p for p in ops if p[: len(path)] == path]:
                del ops[p]
            ops[path] = None

    @staticmethod
    def _resolve(ops: dict[tuple[str, ...], str | None]) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for path, text in ops.items():
            if text is None:
                wc.del_path(tree, list(path))
            else:
                wc.set_path(tree, list(path), json.loads(text))
        return tree

    def _history(self, items: _Items, step: int) -> None:
        row = len(self.row_step)
        stamp = None
        keys, jsons, rows = self.item_key, self.item_json, self.item_row
        nested: dict[str, Any] | None = None
        axis = None
        for path, v in items:
            if len(path) != 1:
                if nested is None:
                    nested = {}
                wc.set_path(nested, list(path), json.loads(v))
                continue
            k = path[0]
            if k[:1] == "_" and k in wc.HISTORY_INTERNAL:
                if k == "_timestamp":
                    stamp = v
                elif k == "_runtime":
                    keys.append(k)
                    jsons.append(v)
                    rows.append(row)
                continue
            if k == wc.STEP_AXIS:
                axis = json.loads(v)
                continue
            keys.append(k)
            jsons.append(v)
            rows.append(row)
        self.row_step.append(step if axis is None else int(axis))
        self.row_time.append(stamp)
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
        for path, v in wc.flatten(summary):
            self._summary_ops[tuple(path)] = schema.dumps_value(v)

    # -- results

    def tables(self) -> tuple[pa.Table, pa.Table]:
        values = json.loads("[" + ",".join(self.item_json) + "]") if self.item_json else []
        times = [float(t) if t is not None else None for t in self.row_time]
        if times:
            known = [t for t in times if t is not None]
            if known:
                self.last_time = max(known)
        m_idx: list[int] = []
        m_val: list[float] = []
        s_rows: list[dict[str, Any]] = []
        step, rowi, keyl = self.row_step, self.item_row, self.item_key
        meta = self.config.get(wc.META_KEY)
        ours = isinstance(meta, dict)
        for i, v in enumerate(values):
            if type(v) is float or type(v) is int:
                if ours and keyl[i] == "_runtime":
                    continue  # the clock of our own import; the source's is in the kept file
                m_idx.append(i)
                m_val.append(v)
            else:
                self._series(s_rows, keyl[i], rowi[i], v, times)
        for row, tree in self.nested:
            for path, leaf in wc.flatten(tree):
                if isinstance(leaf, dict):
                    self._series(s_rows, ".".join(path), row, leaf, times)
                elif type(leaf) is float or type(leaf) is int:
                    keyl.append(".".join(path))
                    rowi.append(row)
                    m_idx.append(len(keyl) - 1)
                    m_val.append(leaf)
                else:
                    self._series(s_rows, ".".join(path), row, leaf, times)
        idx = pa.array(m_idx, pa.int64())
        rows = pc.take(pa.array(rowi, pa.int64()), idx)
        keys = pc.take(pa.array(keyl, pa.string()), idx)
        steps = pc.take(pa.array(step, pa.int64()), rows)
        us = pa.array([None if t is None else round(t * 1_000_000) for t in times], pa.int64())
        stamps = pc.take(us, rows).cast(schema.TS)
        n = len(m_idx)
        none = pa.nulls(n, pa.string())
        tbl = pa.table(
            [
                pa.array([self.run_key] * n, pa.string()) if n else pa.array([], pa.string()),
                keys,
                steps,
                stamps,
                pa.array(m_val, pa.float64()),
                none,
                none,
                none,
            ],
            schema=schema.SCHEMAS["metrics"],
        )
        if n:
            tbl = tbl.take(pc.sort_indices(tbl, [("key", "ascending"), ("step", "ascending")]))
        return tbl, schema.table("series", s_rows)

    def _series(self, out: list[dict[str, Any]], key: str, row: int, v: Any, times: list[Any]) -> None:
        if isinstance(v, dict) and "_type" in v:
            kind = str(v["_type"])
            path = v.get("path") if isinstance(v.get("path"), str) else None
            sha = v.get("sha256") if isinstance(v.get("sha256"), str) else None
        else:
            kind = {bool: "bool", str: "string", type(None): "null"}.get(type(v), "json")
            path = sha = None
        t = times[row]
        out.append(
            {
                "run_key": self.run_key,
                "key": key,
                "step": self.row_step[row],
                "timestamp": wc.seconds_to_dt(t),
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
        return [
            {"run_key": self.run_key, "path": path, "value_json": schema.dumps_value(v)}
            for path, v in wc.flatten(tree)
        ]

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
        meta = self.config.get(wc.META_KEY)
        if isinstance(meta, dict):
            # a run trackbridge wrote: its source's fields that W&B could not take
            for k in ("start_time", "end_time"):
                if meta.get(k) is not None:
                    row[k] = wc.seconds_to_dt(meta[k])
            for k in wc.META_RUN_FIELDS:
                if k in meta:
                    row[k] = meta[k]
            if "labels" in meta:
                row["labels"] = list(meta["labels"])
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
                files.append(FileRef(entry.path, entry.size, None, _local_fetch(local)))
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
