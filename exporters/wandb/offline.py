"""Read W&B offline runs (``wandb+offline://PATH``) into the neutral schema.

PATH holds ``offline-run-*`` / ``run-*`` folders at any depth (the layout ``wandb
offline`` leaves on an HPC cluster), or is one such folder. Each folder's
``run-<id>.wandb`` is a record log (``trackbridge.trackers.wandb.leveldb``); a run resumed offline leaves
several folders with one id, read in order as one run.

History is the bulk of the data, so it is decoded in one pass with all values of a run
parsed by a single ``json.loads`` and turned into Arrow columns at the end, instead of
building a Python object per point.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trackbridge import schema
from trackbridge.errors import MissingExtraError, SourceNotFoundError
from trackbridge.exporters.wandb.builder import RunBuilder, RunFiles, restore_written
from trackbridge.exporters.wandb.sweeps import Sweeps
from trackbridge.files import local_fetch, sha256_file
from trackbridge.model import (
    ArtifactPayload,
    FileRef,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    file_token,
)
from trackbridge.trackers.wandb import common as wc
from trackbridge.trackers.wandb.runfolder import RUN_DIR, read_head


class WandbOfflineSource(TrackerSource):
    def __init__(self, path: str, safe: str | None = None) -> None:
        import importlib.util

        # the SDK's record classes are needed to read a run, not to list the runs: found
        # here, imported (a third of a second) only when a run is read
        if importlib.util.find_spec("wandb") is None:  # pragma: no cover - depends on the extras
            raise MissingExtraError("wandb", "wandb")
        self.root = Path(path).expanduser()
        self.safe = safe or str(self.root)
        if not self.root.exists():
            raise SourceNotFoundError(f"wandb+offline://{self.safe}: no such folder {self.root}")
        self._origin: dict[str, str] = {}
        self._origin_source: dict[str, str] = {}
        self._artifact_rows: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        self.sweeps = Sweeps(self, lambda project, sweep_id: None)  # the definition is online only
        self._runs = self._discover()

    def describe(self) -> str:
        return f"wandb+offline://{self.safe}"

    # -- discovery

    def _discover(self) -> dict[str, RunFiles]:
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
        heads = [read_head(log) for _, log in found]
        # A resumed run's segments in the order they ran; the folder name's second is too
        # coarse (two segments in one second get a "-1" suffix that sorts first).
        heads.sort(key=lambda h: (h.start, str(h.log)))
        runs: dict[str, RunFiles] = {}
        for h in heads:
            key = wc.run_key(h.project, h.run_id)
            rf = runs.get(key)
            if rf is None:
                rf = runs[key] = RunFiles(h.project, h.run_id, h.entity, start=h.start)
            rf.logs.append(h.log)
            rf.head_error = rf.head_error or h.error
            rf.name = h.name or rf.name
            rf.meta = h.meta or rf.meta
            rf.sweep_id = h.sweep_id or rf.sweep_id
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
            # every trial, wanted or not: a sweep's row (its start, offline) is the same
            # whichever of its trials a filter picks
            self.sweeps.trial(row, rf.project, rf.sweep_id, rf.meta)
            if sel.wants_run(row):
                out.append(row)
        return self.sweeps.rows(out) + out

    # -- one run

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        if self.sweeps.owns(run["run_key"]):
            return self.sweeps.read(run["run_key"])
        rf = self._runs[run["run_key"]]
        parsed = RunBuilder(run["run_key"])
        for log in rf.logs:
            parsed.read(log)
        metrics_tbl, series_tbl = parsed.tables()
        row = parsed.run_row(run["project_key"], rf)
        for f in ("parent_run_key", "sweep_key"):
            if row.get(f):
                row[f] = self.local_key(row[f])
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


def _run_files(rf: RunFiles, dirs: list[Path]) -> ArtifactPayload:
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


# -- the fast path for history and summary records
#
# They are nearly all of a long run's log, and reading their items through the SDK's
# classes costs a Python object per item: ten times the parse itself. So they are also
# parsed with message types of our own whose repeated fields come back as whole lists
# in one C call. History records are decoded a batch at a time: each record's items are
# left as raw bytes, then all of them are concatenated and parsed as one message
# (protobuf appends repeated fields when messages are concatenated), giving every key
# and every value_json in one list. That lines up only when each item is exactly one
# nested key and one value_json, which ``FastDecoder`` checks; a batch that does not (a media
# value, a typed value) goes record by record through the SDK's classes instead. The
# fast path skips work; it never changes a result (tests compare both paths).
