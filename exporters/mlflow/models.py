"""MLflow 3 logged models, and the Model Registry (registered models, versions,
aliases, stages) out of MLflow.
"""

from __future__ import annotations

import json
from typing import Any

from trackbridge import schema
from trackbridge.exporters.mlflow.history import Links
from trackbridge.model import (
    ArtifactPayload,
    FileRef,
    RegistryPayload,
    Selection,
)
from trackbridge.trackers.mlflow import common as mc


def _model_points(models: list[Any]) -> Links:
    """Metric key → (step, timestamp, value) → (model key, dataset name, dataset digest)
    of the points linked to the run's logged models."""
    out: Links = {}
    for m in models:
        for x in m.metrics or []:
            out.setdefault(x.key, {})[(x.step, x.timestamp, x.value)] = (
                mc.model_key(m.model_id),
                x.dataset_name,
                x.dataset_digest,
            )
    return out


class ModelsReader:
    """Logged models of the runs, and the registry."""

    def _all_logged_models(self) -> dict[str, list[Any]]:
        if self._models_by_run is not None:
            return self._models_by_run
        from mlflow.exceptions import MlflowException

        by_run: dict[str, list[Any]] = {}
        exp_ids = [e.experiment_id for e in self._experiments()]
        for i in range(0, len(exp_ids), 100):
            chunk = exp_ids[i : i + 100]
            try:
                for m in mc.paged(
                    lambda t, chunk=chunk: self.client.search_logged_models(
                        experiment_ids=chunk, max_results=100, page_token=t
                    )
                ):
                    by_run.setdefault(m.source_run_id or "", []).append(m)
            except MlflowException as e:
                if not mc.endpoint_missing(e):
                    raise
                break  # a pre-3.0 server: there are no logged models to move
        with self._lock:
            self._models_by_run = by_run
        return by_run

    def _logged_models_of(self, run_id: str) -> list[Any]:
        return list(self._all_logged_models().get(run_id, []))

    def _logged_model_artifact(self, m: Any, project_key: str | None) -> ArtifactPayload:
        self._remember(mc.model_key(m.model_id), m.tags)
        meta = {
            "model_id": m.model_id,
            "experiment_id": m.experiment_id,
            "model_type": m.model_type,
            "status": str(m.status),
            "status_message": m.status_message,
            "tags": mc.user_tags(dict(m.tags)),
            "params": dict(m.params),
            "metrics": [
                {
                    "key": x.key,
                    "value": x.value,
                    "timestamp": x.timestamp,
                    "step": x.step,
                    "run_id": x.run_id,
                    "dataset_name": x.dataset_name,
                    "dataset_digest": x.dataset_digest,
                }
                for x in (m.metrics or [])
            ],
            "creation_timestamp": m.creation_timestamp,
            "last_updated_timestamp": m.last_updated_timestamp,
            "source_run_id": m.source_run_id,
        }
        files = [
            FileRef(
                path=fi.path,
                size=fi.file_size,
                sha256=None,
                fetch=self._uri_fetcher(f"{m.artifact_location.rstrip('/')}/{fi.path}"),
            )
            for fi in mc.walk_artifacts(lambda p: self.client.list_logged_model_artifacts(m.model_id, p))
        ]
        row = {
            "artifact_key": mc.model_key(m.model_id),
            "project_key": project_key or self._project_key(m.experiment_id),
            "name": m.name,
            "type": schema.LOGGED_MODEL,
            "aliases": [],
            "metadata_json": json.dumps(meta, sort_keys=True),
            "producer_run_key": mc.run_key(m.source_run_id) if m.source_run_id else None,
            "created_at": mc.ms_to_dt(m.creation_timestamp),
        }
        return ArtifactPayload(row=row, files=files)

    def registry(self, sel: Selection) -> RegistryPayload:
        if not sel.registry:
            return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))
        with self._lock:
            # the runs listed, narrowed to the ones asked for (a sync shard asks for its own:
            # a version of another shard's run would point at a model not written yet)
            selected = {
                rid for rid in self._runs if not sel.runs or rid in sel.runs or mc.run_key(rid) in sel.runs
            }
        filtered = bool(sel.projects or sel.runs or sel.since or sel.until)
        models = list(
            mc.paged(lambda t: self.client.search_registered_models(max_results=mc.PAGE, page_token=t))
        )
        versions = list(
            mc.paged(lambda t: self.client.search_model_versions(max_results=10000, page_token=t))
        )
        # search_model_versions leaves ModelVersion.aliases empty; the models carry them.
        aliases: dict[tuple[str, str], list[str]] = {}
        for m in models:
            for alias, version in (m.aliases or {}).items():
                aliases.setdefault((m.name, str(version)), []).append(alias)
        mv_rows = []
        for v in sorted(versions, key=lambda v: (v.name, int(v.version))):
            if filtered and v.run_id and v.run_id not in selected:
                continue
            row = self._version_row(v)
            row["aliases"] = sorted(aliases.get((v.name, str(v.version)), []))
            mv_rows.append(row)
        names_with_versions = {r["model_name"] for r in mv_rows}
        all_names_with_versions = {v.name for v in versions}
        rm_rows = [
            {
                "name": m.name,
                "description": m.description or None,
                "tags": sorted(mc.user_tags(dict(m.tags)).items()),
                "created_at": mc.ms_to_dt(m.creation_timestamp),
                "updated_at": mc.ms_to_dt(m.last_updated_timestamp),
            }
            for m in models
            if not filtered or m.name in names_with_versions or m.name not in all_names_with_versions
        ]
        return RegistryPayload(
            schema.table("registered_models", rm_rows), schema.table("model_versions", mv_rows)
        )

    def _version_row(self, v: Any) -> dict[str, Any]:
        subpath = None
        src = v.source or ""
        if v.run_id:
            prefix = f"runs:/{v.run_id}/"
            if src.startswith(prefix):
                subpath = src[len(prefix) :]
            else:
                try:
                    art_uri = self._run_artifact_uri(v.run_id)
                except Exception:
                    art_uri = None
                if art_uri and src.startswith(art_uri.rstrip("/") + "/"):
                    subpath = src[len(art_uri.rstrip("/")) + 1 :]
        model_id = getattr(v, "model_id", None)
        if not model_id and src.startswith("models:/m-"):
            # search_model_versions leaves model_id empty; the source still names it
            model_id = src[len("models:/") :].split("/", 1)[0]
        key = mc.version_key(v.name, v.version, v.creation_timestamp)
        origin = mc.version_origin(dict(v.tags))
        if origin:
            with self._lock:
                self._origin[key] = origin
                if mc.TAG_SOURCE in v.tags:
                    self._origin_source[key] = v.tags[mc.TAG_SOURCE]
        return {
            "version_key": key,
            "model_name": v.name,
            "version": str(v.version),
            "run_key": mc.run_key(v.run_id) if v.run_id else None,
            # a version made from a source artifact (W&B) names it; else its logged model
            "artifact_key": v.tags.get(mc.TAG_SOURCE_ARTIFACT)
            or (mc.model_key(model_id) if model_id else None),
            "source": v.source,
            "source_subpath": subpath,
            "aliases": sorted(v.aliases or []),
            "stage": v.current_stage,
            "status": v.status,
            "description": v.description or None,
            "tags": sorted(mc.user_tags(dict(v.tags)).items()),
            "user": v.user_id,
            "created_at": mc.ms_to_dt(v.creation_timestamp),
            "updated_at": mc.ms_to_dt(v.last_updated_timestamp),
        }
