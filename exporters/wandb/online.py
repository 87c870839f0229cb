"""Read a W&B project through the online API (``wandb://entity/project``).

``wandb.Api`` talks through the bundled wandb-core binary, so HTTP mocks cannot stand in
for the server. Everything this exporter asks of W&B therefore goes through one small
interface, ``WandbApi``: ``SdkApi`` implements it with ``wandb.Api`` (with retries), and
the tests implement it with fakes made of the SDK's own ``wandb.apis.public`` objects.

Data rules:
- History comes from ``scan_history``, every row, never the sampled ``history()``.
- System metrics come from the run file ``wandb-events.jsonl`` when the run has it:
  every sample. The API's system stream is sampled, so without the file they are
  reported as not copied rather than copied in part.
- The rows go through the same builder as the offline reader (``exporters.wandb``), so
  a run read online and the same run read from its ``.wandb`` file give the same rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trackbridge import schema
from trackbridge.errors import SourceNotFoundError, first_line
from trackbridge.exporters.wandb.builder import RunBuilder, restore_written
from trackbridge.exporters.wandb.sweeps import Sweeps
from trackbridge.files import download_fetch, temp_dir
from trackbridge.model import (
    LABELS,
    STATUS,
    TOKEN,
    UPDATED,
    ArtifactPayload,
    FileRef,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    no_local_bytes,
    project_row,
)
from trackbridge.trackers.wandb import common as wc
from trackbridge.trackers.wandb.api import EVENTS_FILE, ArtifactInfo, SdkApi, WandbApi, wandb_time

# W&B run states that are also neutral ones; anything else (running, pending…) is running
ENDED_STATES = frozenset({"finished", "failed", "crashed", "killed"})


# -- the exporter


class WandbOnlineSource(TrackerSource):
    # W&B moves an alias without touching the run that logged the artifact, so a sync
    # must look at every run's artifacts, not only at the runs that changed.
    aliases_move_without_runs = True

    def __init__(self, entity_project: str, api: WandbApi | None = None) -> None:
        """``ENTITY/PROJECT`` reads one project; ``ENTITY`` every project of the entity
        (what ``wandb://ENTITY`` as a destination writes)."""
        entity, _, project = entity_project.strip("/").partition("/")
        if not entity or "/" in project:
            raise SourceNotFoundError(
                f"wandb://{entity_project}: expected wandb://ENTITY/PROJECT or wandb://ENTITY"
            )
        self.entity, self.project = entity, project or None
        self.api = api or SdkApi()
        self._runs: dict[str, Any] = {}
        self._project_of: dict[str, str] = {}  # run key → its W&B project
        self._origin: dict[str, str] = {}
        self._origin_source: dict[str, str] = {}
        self._arts: dict[str, list[ArtifactInfo]] = {}
        self.sweeps = Sweeps(self, lambda project, sweep_id: self.api.sweep(self.entity, project, sweep_id))
        try:
            self._names = [project] if project else sorted(self.api.projects(entity))
            listed = [(name, r) for name in self._names for r in self.api.runs(entity, name)]
        except Exception as e:
            raise SourceNotFoundError(f"{self.describe()}: cannot list runs ({first_line(e)})") from e
        for name, r in listed:
            key = wc.run_key(name, r.id)
            self._runs[key] = r
            self._project_of[key] = name
            meta = (r.config or {}).get(wc.META_KEY)
            if isinstance(meta, dict) and meta.get("source_key"):
                self._origin[key] = meta["source_key"]
                if meta.get("source"):
                    self._origin_source[key] = meta["source"]

    def describe(self) -> str:
        return f"wandb://{self.entity}/{self.project}" if self.project else f"wandb://{self.entity}"

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        rows = [
            {**project_row(wc.project_key(name), "wandb", name), "source_id": f"{self.entity}/{name}"}
            for name in self._names
        ]
        return [row for row in rows if sel.wants_project(row)]

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = {p["project_key"] for p in projects}
        out = []
        for key, r in self._runs.items():
            if wc.project_key(self._project_of[key]) not in wanted:
                continue
            row = {
                "run_key": key,
                "project_key": wc.project_key(self._project_of[key]),
                "source_id": r.id,
                "name": r.display_name,
                "start_time": wandb_time(r.created_at),
                "lifecycle": "active",
                TOKEN: _change_token(r),
                UPDATED: wandb_time(getattr(r, "heartbeat_at", None)) or wandb_time(r.created_at),
                LABELS: list(getattr(r, "tags", None) or []),
                STATUS: _status(r),
            }
            if sel.wants_run(row):
                meta = (r.config or {}).get(wc.META_KEY)
                self.sweeps.trial(row, self._project_of[key], getattr(r, "sweep_name", None), meta)
                out.append(row)
        return self.sweeps.rows(out) + out

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        key = run["run_key"]
        if self.sweeps.owns(key):
            return self.sweeps.read(key)
        r = self._runs[key]
        parsed = RunBuilder(key)
        parsed.set_config(dict(r.config or {}))
        parsed.set_summary(dict(r.summary_metrics or {}))
        for row in self.api.scan_history(r):
            parsed.history_row(row)
        files = self.api.files(r)
        events = next((f for f in files if f.name == EVENTS_FILE), None)
        if events is not None:
            with temp_dir() as d:
                local = self.api.download_file(r, events, str(d))
                for line in Path(local).read_text().splitlines():
                    if line.strip():
                        parsed.system_row(json.loads(line))
        else:
            parsed.notes.append(
                (
                    "source-not-copied",
                    "metrics.system/*",
                    f"no {EVENTS_FILE}: the API only samples system metrics",
                )
            )
        metrics_tbl, series_tbl = parsed.tables()
        row = self._run_row(r, run, parsed)
        if row.get("parent_run_key"):
            row["parent_run_key"] = self.local_key(row["parent_run_key"])
        run_files = ArtifactPayload(
            row={
                "artifact_key": wc.files_key(self._project_of[key], r.id),
                "project_key": wc.project_key(self._project_of[key]),
                "name": "run-files",
                "type": "run-files",
                "aliases": [],
                "producer_run_key": key,
            },
            files=[
                FileRef(f.name, f.size, None, download_fetch(lambda d, f=f: self.api.download_file(r, f, d)))
                for f in files
                if f.name != EVENTS_FILE
            ],
        )
        logged = self.api.logged_artifacts(r)
        self._arts[key] = logged
        artifacts = [run_files, *(self._artifact(a, key) for a in logged)]
        usage = [
            {"run_key": key, "artifact_key": a.row["artifact_key"], "direction": "output"}
            for a in artifacts[1:]
        ]
        usage += [
            {
                "run_key": key,
                "artifact_key": wc.artifact_key(u.project, u.name, u.digest),
                "direction": "input",
            }
            for u in self.api.used_artifacts(r)
        ]
        payload = RunPayload(
            run=row,
            params=schema.table("params", wc.param_rows(key, parsed.config)),
            tags=schema.table("tags", parsed.tag_rows()),
            metrics=lambda: iter(metrics_tbl.to_batches(max_chunksize=100_000)),
            summary=schema.table("summary", parsed.summary_rows()),
            series=series_tbl,
            artifact_usage=schema.table("artifact_usage", usage),
            artifacts=artifacts,
            source_notes=parsed.notes,
        )
        restore_written(payload, parsed.config.get(wc.META_KEY))
        if row.get("sweep_key"):
            row["sweep_key"] = self.local_key(row["sweep_key"])
        return payload

    def _run_row(self, r: Any, listed: dict[str, Any], parsed: RunBuilder) -> dict[str, Any]:
        state = _status(r)
        user = getattr(r, "user", None)
        sweep = getattr(r, "sweep_name", None)
        row = {
            "run_key": listed["run_key"],
            "project_key": listed["project_key"],
            "source_id": r.id,
            "name": r.display_name,
            "status": state,
            "lifecycle": "active",
            "start_time": wandb_time(r.created_at),
            # W&B's last heartbeat is when a finished run stopped reporting
            "end_time": wandb_time(getattr(r, "heartbeat_at", None)) if state in ENDED_STATES else None,
            "user": getattr(user, "username", None) if user else None,
            "group": getattr(r, "group", None) or None,
            "job_type": getattr(r, "job_type", None) or None,
            "notes": getattr(r, "notes", None) or None,
            "labels": list(getattr(r, "tags", None) or []),
            "host": getattr(r, "host", None) or None,
            "source_url": None,
            "source_incomplete": False,
            "sweep_key": wc.sweep_key(listed["project_key"].split("/", 1)[1], sweep) if sweep else None,
        }
        wc.apply_meta(row, parsed.config.get(wc.META_KEY))
        return row

    def _artifact(self, a: ArtifactInfo, producer: str) -> ArtifactPayload:
        files = [
            FileRef(e.path, e.size, None, no_local_bytes, uri=e.ref)
            if e.ref
            else FileRef(
                e.path, e.size, None, download_fetch(lambda d, p=e.path: self.api.download_entry(a, p, d))
            )
            for e in a.entries
        ]
        return ArtifactPayload(
            row={
                "artifact_key": wc.artifact_key(a.project, a.name, a.digest),
                "project_key": wc.project_key(a.project),
                "name": a.name,
                "type": a.type,
                "version": a.version,
                "digest": a.digest,
                "aliases": sorted(a.aliases),
                "description": a.description,
                "metadata_json": schema.dumps_value(a.metadata) if a.metadata else None,
                "producer_run_key": producer,
                "created_at": a.created_at,
            },
            files=files,
        )

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        return iter(())  # artifacts travel with the run that logged them

    def registry(self, sel: Selection) -> RegistryPayload:
        """Registry links of the selected runs' artifacts: one model version per link."""
        models: dict[str, dict[str, Any]] = {}
        versions = []
        for row in self.runs(sel, self.projects(Selection())):
            key = row["run_key"]
            arts = self._arts.get(key)
            if arts is None:
                arts = self._arts[key] = self.api.logged_artifacts(self._runs[key])
            for a in arts:
                for link in a.links:
                    name = link.collection
                    models.setdefault(
                        name, {"name": name, "description": None, "tags": [("wandb.registry", link.registry)]}
                    )
                    versions.append(
                        {
                            "version_key": f"wandb:registry/{link.registry}/{name}:{link.version}",
                            "model_name": name,
                            "version": link.version.removeprefix("v"),
                            "run_key": key,
                            "artifact_key": wc.artifact_key(a.project, a.name, a.digest),
                            "aliases": sorted(link.aliases),
                            "status": "READY",
                            "description": a.description,
                            "tags": [("wandb.artifact", f"{a.name}:{a.version}"), ("wandb.digest", a.digest)],
                            "created_at": link.created_at or a.created_at,
                        }
                    )
        if sel.rules:
            rows = [
                (self._artifact(a, row["run_key"]).row, row["start_time"])
                for row in self.runs(sel, self.projects(Selection()))
                for a in self._arts[row["run_key"]]
            ]
            more_models, more_versions = wc.model_versions(rows, sel.rules)
            for m in more_models:
                models.setdefault(m["name"], m)
            versions += more_versions
        return RegistryPayload(
            schema.table("registered_models", sorted(models.values(), key=lambda m: m["name"])),
            schema.table("model_versions", versions),
        )


def _status(r: Any) -> str:
    state = (r.state or "").lower()
    return state if state in ENDED_STATES else "running"


def _change_token(r: Any) -> str:
    """What the listing already says about a run, hashed: a new history row, a heartbeat,
    an edited summary, config, name, tag or note all change it."""
    attrs = getattr(r, "_attrs", None) or {}
    parts = [
        r.state,
        getattr(r, "heartbeat_at", None) or attrs.get("heartbeatAt"),
        attrs.get("historyLineCount"),
        r.display_name,
        sorted(getattr(r, "tags", None) or []),
        getattr(r, "notes", None),
        getattr(r, "group", None),
        getattr(r, "job_type", None),
        dict(r.config or {}),
        dict(r.summary_metrics or {}),
    ]
    return "wandb:" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
