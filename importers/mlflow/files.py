"""A run's files, dataset inputs and what has no place of its own in MLflow
(``trackbridge/extras.json``), uploaded once each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
from trackbridge import schema
from trackbridge.files import safe_relpath, temp_dir
from trackbridge.model import ArtifactPayload, RunPayload
from trackbridge.report import RunReport
from trackbridge.trackers.mlflow import common as mc
from trackbridge.trackers.mlflow import media
from trackbridge.untrusted import inside


def extras_of(payload: RunPayload, shown: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's data that MLflow has no field for, as one JSON document (None if empty),
    and what the importer added to make the rest native (``shown``: the exporter takes
    it back out)."""
    arts = [a for a in payload.artifacts if a.row["type"] not in ("run-files", schema.LOGGED_MODEL)]
    own = {a.row["artifact_key"] for a in payload.artifacts if a.row["type"] == schema.LOGGED_MODEL}
    usage = [u for u in payload.artifact_usage.to_pylist() if u["artifact_key"] not in own]
    run = {
        k: payload.run[k]
        for k in ("fork_parent_run_key", "fork_step", "step_scale", "step_scales", "sweep_key")
        if payload.run.get(k) is not None
    }
    if run.get("sweep_key") and not schema.is_sweep(payload.run):
        run["parent_run_key"] = payload.run.get("parent_run_key")  # nested under the search, not a child
    if not payload.run.get("name"):
        run["name"] = None  # MLflow's run is named after the source id (``display_name``)
    shown = {k: v for k, v in (shown or {}).items() if v}
    if not (arts or usage or run or payload.summary.num_rows or shown):
        return None
    return {
        "version": 1,
        "native": shown,
        "run": run,
        "summary": [{"path": r["path"], "value_json": r["value_json"]} for r in payload.summary.to_pylist()],
        "artifacts": [
            {
                "row": a.row,
                "files": [
                    {"path": f.path, "size": f.size, "sha256": f.sha256, "uri": f.uri} for f in a.files
                ],
            }
            for a in arts
        ],
        "usage": [{"artifact_key": u["artifact_key"], "direction": u["direction"]} for u in usage],
    }


def sendable(files: list[Any]) -> list[Any]:
    """Files with bytes to upload; references (s3://…) stay where they are."""
    return [f for f in files if not (f.uri and f.sha256 is None)]


def under(art: ArtifactPayload, folder: str) -> ArtifactPayload:
    """The same artifact with its files placed under ``folder`` (references stay out)."""
    files = [dataclasses.replace(f, path=f"{folder}/{f.path}") for f in sendable(art.files)]
    return ArtifactPayload(row=art.row, files=files)


def upload_missing(
    art: ArtifactPayload, lister: Any, log: Any, report: RunReport | None, put: Any = None
) -> None:
    """Upload the files the destination lacks (same path and size counts as present):
    through ``log`` (MLflow's ``log_artifact`` form), or ``put(local, rel)`` if given."""
    have = {fi.path: fi.file_size for fi in mc.walk_artifacts(lister)} if lister else {}
    for f in art.files:
        if f.path in have and (f.size is None or have[f.path] == f.size):
            continue
        with f.fetch() as local:
            if put is not None:
                put(local, f.path)
            else:
                upload_one(local, f.path, log)
        if report is not None:
            report.files += 1
            report.bytes += int(f.size or 0)


def upload_one(local: str, rel: str, log: Any) -> None:
    """Upload ``local`` so that it lands at ``rel``; MLflow names files by their basename."""
    folder, name = posixpath.split(rel)
    if os.path.basename(local) == name:
        log(local, folder or None)
        return
    with temp_dir() as d:
        link = d / name
        try:
            os.symlink(os.path.abspath(local), link)
        except OSError:
            shutil.copyfile(local, link)
        log(str(link), folder or None)


class FilesWriter:
    """Run files, datasets and extras."""

    def _write_extras(
        self,
        run_id: str,
        payload: RunPayload,
        report: RunReport,
        shown: dict[str, Any] | None = None,
        kept: list[pa.RecordBatch] | None = None,
    ) -> bool:
        """Keep what MLflow has no field for in run files the exporter reads back: the
        summary and series, source artifacts and lineage, and the source's bookkeeping
        series (``kept``, W&B's ``_runtime``), which are no user's metrics. Returns whether
        it wrote any (the run's state says so: the exporter then reads them)."""
        import pyarrow.parquet as pq

        if kept:
            shown = shown or {}
            hidden = {k for b in kept for k in b.column("key").to_pylist()} | set(shown.get("hidden") or [])
            shown = {**shown, "hidden": sorted(hidden)}
        extras = extras_of(payload, shown)
        # rows MLflow's own layout gives back (its step-wise images and tables) need no copy
        series = payload.series
        if series.num_rows:
            series = schema.table("series", [r for r in series.to_pylist() if not media.derived(r)])
        if extras is None and series.num_rows == 0:
            return False
        with self._files_into(run_id, mc.MAPPING_DIR) as d:
            if extras is not None:
                (d / "extras.json").write_text(json.dumps(extras, indent=1, ensure_ascii=False, default=str))
            if series.num_rows:
                pq.write_table(series, d / "series.parquet")
            if kept:
                pq.write_table(pa.Table.from_batches(kept), d / "metrics.parquet")
        if payload.summary.num_rows:
            n = payload.summary.num_rows
            report.mapped("summary-kept", "summary", f"{n} value(s) in {mc.EXTRAS_ARTIFACT}")
        if series.num_rows:
            n = series.num_rows
            report.mapped("series-kept", "series", f"{n} value(s) in {mc.SERIES_ARTIFACT}")
        return True

    @contextmanager
    def _files_into(self, run_id: str, artifact_path: str) -> Iterator[Path]:
        """A folder whose files become the run's artifacts under ``artifact_path``: the
        artifact folder itself for a run held for the bulk path on this machine, else a
        temporary one uploaded when the block ends."""
        held = getattr(self, "_pending", {}).get(run_id)
        local = held.local_dir() if held is not None else None
        if local is not None:
            folder = Path(local, *artifact_path.split("/"))
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
            return
        with temp_dir() as d:
            yield d
            self.client.log_artifacts(run_id, str(d), artifact_path)

    def _upload_run_files(self, run_id: str, art: ArtifactPayload, existed: bool, report: RunReport) -> None:
        upload_missing(
            art,
            (lambda p: self.client.list_artifacts(run_id, p)) if existed else None,
            lambda lp, ap: self.client.log_artifact(run_id, lp, ap),
            report,
            put=self._local_put(run_id),
        )

    def _local_put(self, run_id: str) -> Any:
        """For a new run held for the bulk path whose artifact folder is on this machine:
        a copy straight to the file's place, not a temporary link and MLflow's copy."""
        held = getattr(self, "_pending", {}).get(run_id)
        local = held.local_dir() if held is not None else None
        if local is None:
            return None

        made: set[Path] = set()

        def put(src: str, rel: str) -> None:
            dest = inside(Path(local), safe_relpath(rel, f"run {run_id}"), "an artifact")
            if dest.parent not in made:
                dest.parent.mkdir(parents=True, exist_ok=True)
                made.add(dest.parent)
            shutil.copyfile(src, dest)

        return put

    def _write_datasets(self, run_id: str, tbl: pa.Table, existing: Any) -> None:
        if tbl.num_rows == 0:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        have = set()
        if existing is not None and existing.inputs:
            have = {
                (d.dataset.name, d.dataset.digest, tuple(sorted((t.key, t.value) for t in d.tags)))
                for d in existing.inputs.dataset_inputs
            }
        todo = []
        for d in tbl.to_pylist():
            tags = tuple(sorted(d["tags"] or []))
            if (d["name"], d["digest"], tags) in have:
                continue
            todo.append(
                DatasetInput(
                    Dataset(d["name"], d["digest"], d["source_type"], d["source"], d["schema"], d["profile"]),
                    [InputTag(k, v) for k, v in tags],
                )
            )
        if todo:
            self.client.log_inputs(run_id, datasets=todo)
