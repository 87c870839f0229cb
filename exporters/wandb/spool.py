"""Read the shim's spool (``spool://PATH``) as a source, so any destination can be
completed from it: ``trackbridge sync spool://PATH mlflow+…``.

A spooled run carries the same keys as the run read back from W&B (``wandb:run/<project>/
<id>``; the shim's W&B run has that id), so the shim's live writes, a replay of the
spool and a nightly sync of W&B all land on one destination run and never on two.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from trackbridge import schema
from trackbridge import spool as sp
from trackbridge.errors import SourceNotFoundError
from trackbridge.files import local_fetch
from trackbridge.model import (
    TOKEN,
    ArtifactPayload,
    FileRef,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    file_token,
    named_projects,
)
from trackbridge.trackers.wandb import common as wc


class SpoolSource(TrackerSource):
    def __init__(self, path: str) -> None:
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise SourceNotFoundError(f"spool://{self.root}: no such folder")
        self._origin: dict[str, str] = {}
        self._runs = {d: sp.read_meta(d) for d in sorted(self.root.iterdir()) if (d / sp.META).is_file()}
        if not self._runs:
            raise SourceNotFoundError(f"spool://{self.root}: no spooled runs (no */{sp.META})")

    def describe(self) -> str:
        return f"spool://{self.root}"

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        return named_projects(sel, (m["project"] for m in self._runs.values()), "wandb", wc.project_key)

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {p["project_key"] for p in projects}
        out = []
        for d, meta in self._runs.items():
            if wc.project_key(meta["project"]) not in keys:
                continue
            row = {
                "run_key": meta["run_key"],
                "project_key": wc.project_key(meta["project"]),
                "source_id": meta["run_id"],
                "name": meta.get("name"),
                "start_time": datetime.fromisoformat(meta["start_time"]),
                "lifecycle": "active",
                **file_token("spool", sp.record_files(d) or [d / sp.META]),
            }
            if sel.wants_run(row):
                out.append(row)
        return out

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        d = next(d for d, m in self._runs.items() if m["run_key"] == run["run_key"])
        return spooled_payload(d, self._runs[d], token=run.get(TOKEN))

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        return iter(())

    def registry(self, sel: Selection) -> RegistryPayload:
        """As for W&B offline runs: with ``--register-models`` (or sync's rules) the
        logged model artifacts become registered versions, aliases kept."""
        if not sel.rules:
            return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))
        arts = []
        for row in self.runs(sel, self.projects(sel)):
            payload = self.read_run(row)
            arts += [(a.row, payload.run["start_time"]) for a in payload.artifacts[1:]]
        models, versions = wc.model_versions(arts, sel.rules)
        return RegistryPayload(
            schema.table("registered_models", models), schema.table("model_versions", versions)
        )


def spooled_payload(run_dir: Path, meta: dict[str, Any], token: str | None = None) -> RunPayload:
    """The neutral run a spool holds. The shim's final catch-up and ``sync spool://``
    both use it, so they write the same thing."""
    recs, notes = sp.read_records(run_dir)
    key = meta["run_key"]
    is_point = pc.equal(recs.column("kind"), "m")
    others = recs.filter(pc.invert(is_point)).to_pylist()
    # memory follows the points: only their four columns are copied, sorted once by
    # (key, step) before the run key column is added, and the records freed first
    m = recs.select(["key", "step", "time", "value"]).filter(is_point)
    del recs, is_point
    if m.num_rows:
        m = m.take(pc.sort_indices(m, [("key", "ascending"), ("step", "ascending")]))
    metrics = schema.metrics_table(
        key, m.column("key"), m.column("step"), m.column("time"), m.column("value")
    )
    del m
    config: dict[tuple[str, ...], str] = {}
    summary: dict[tuple[str, ...], str] = {}
    series, tags, arts = [], {}, []
    end: dict[str, Any] | None = None
    for r in others:
        k = r["kind"]
        if k == "c":
            config[tuple(json.loads(r["key"]))] = r["json"]
        elif k == "u":
            summary[tuple(json.loads(r["key"]))] = r["json"]
        elif k == "s":
            v = json.loads(r["json"])
            series.append(
                {
                    "run_key": key,
                    "key": r["key"],
                    "step": r["step"],
                    "timestamp": r["time"],
                    "kind": str(v["_type"]) if isinstance(v, dict) and "_type" in v else _kind_of(v),
                    "value_json": r["json"],
                }
            )
        elif k == "d":
            tags[f"define_metric/{r['key']}"] = r["json"]
        elif k == "a":
            arts.append(_artifact(run_dir, meta, json.loads(r["json"]), r["time"]))
        elif k == "e":
            end = {**json.loads(r["json"]), "time": r["time"]}
    status = end["status"] if end else ("running" if _alive(meta) else "crashed")
    run = {
        "run_key": key,
        "project_key": wc.project_key(meta["project"]),
        "source_id": meta["run_id"],
        "name": meta.get("name"),
        "status": status,
        "lifecycle": "active",
        "start_time": datetime.fromisoformat(meta["start_time"]),
        "end_time": end["time"] if end else None,
        "user": meta.get("user"),
        "group": meta.get("group"),
        "job_type": meta.get("job_type"),
        "notes": meta.get("notes"),
        "labels": list(meta.get("labels") or []),
        "host": meta.get("host"),
        "source_incomplete": bool(notes) or None,
    }
    files_art = ArtifactPayload(
        row={
            "artifact_key": wc.files_key(meta["project"], meta["run_id"]),
            "project_key": wc.project_key(meta["project"]),
            "name": "run-files",
            "type": "run-files",
            "aliases": [],
            "producer_run_key": key,
        }
    )
    usage = [{"run_key": key, "artifact_key": a.row["artifact_key"], "direction": "output"} for a in arts]
    h = hashlib.sha256()
    for f in sp.record_files(run_dir):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return RunPayload(
        run=run,
        params=schema.table(
            "params",
            [
                {
                    "run_key": key,
                    "path": list(p),
                    "value_json": v,
                    "value_type": schema.value_type(json.loads(v)),
                }
                for p, v in sorted(config.items())
            ],
        ),
        tags=schema.table("tags", [{"run_key": key, "key": k, "value": v} for k, v in sorted(tags.items())]),
        metrics=lambda: iter(metrics.to_batches(max_chunksize=100_000)),
        summary=schema.table(
            "summary",
            [{"run_key": key, "path": list(p), "value_json": v} for p, v in sorted(summary.items())],
        ),
        series=schema.table("series", series),
        artifacts=[files_art, *arts],
        artifact_usage=schema.table("artifact_usage", usage),
        fingerprint=h.hexdigest(),
        source_notes=[("source-incomplete", "runs", n) for n in notes],
        token=token,
    )


def _kind_of(v: Any) -> str:
    return {bool: "bool", str: "string", type(None): "null"}.get(type(v), "json")


def _artifact(run_dir: Path, meta: dict[str, Any], a: dict[str, Any], when: datetime) -> ArtifactPayload:
    files = [
        FileRef(path=f["path"], size=f["size"], sha256=f["sha256"], fetch=local_fetch(run_dir / f["stored"]))
        for f in a["files"]
    ]
    digest = hashlib.sha256("".join(sorted(f["sha256"] for f in a["files"])).encode()).hexdigest()[:32]
    row = {
        "artifact_key": wc.artifact_key(meta["project"], a["name"], digest),
        "project_key": wc.project_key(meta["project"]),
        "name": a["name"],
        "type": a.get("type") or "model",
        "digest": digest,
        "aliases": list(a.get("aliases") or []),
        "description": a.get("description"),
        "metadata_json": schema.dumps_value(a.get("metadata") or {}),
        "producer_run_key": meta["run_key"],
        "created_at": when,
    }
    return ArtifactPayload(row=row, files=files)


def _alive(meta: dict[str, Any]) -> bool:
    """A run with no end record is still running only if its process still lives here."""
    if meta.get("host") != socket.gethostname() or not meta.get("pid"):
        return False
    try:
        os.kill(int(meta["pid"]), 0)
    except OSError:
        return False
    return True
