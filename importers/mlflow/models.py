"""MLflow 3 logged models, standalone artifacts and the Model Registry (registered
models, versions with their source key, aliases, stages), each made once.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from typing import Any

from trackbridge import schema
from trackbridge.fit import fit_key
from trackbridge.importers.mlflow.files import sendable, upload_missing
from trackbridge.importers.mlflow.identity import quote
from trackbridge.model import ArtifactPayload, RegistryPayload
from trackbridge.report import RunReport
from trackbridge.trackers.mlflow import LIMITS
from trackbridge.trackers.mlflow import common as mc


def fit_alias(alias: str, where: str, report: Any) -> str | None:
    """MLflow's alias rules: ``[\\w-]``, at most 255 characters, not ``latest`` or ``v<N>``
    (those name versions). W&B allows more; what cannot be kept is reported."""
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        report.mapped("alias-skipped", where, "MLflow reserves it for versions")
        return None
    fitted = re.sub(r"[^\w-]", "_", alias)[:255]
    if fitted != alias:
        report.mapped("alias-renamed", where, f"written as {fitted!r}")
    return fitted or None


def as_logged_model(art: ArtifactPayload) -> ArtifactPayload:
    """A source artifact in the shape of an MLflow logged model: its type is the model
    type, its version a tag, its scalar metadata the model's params."""
    meta: dict[str, Any] = {"model_type": art.row["type"], "tags": {}}
    if art.row.get("version"):
        meta["tags"][mc.TAG_SOURCE_VERSION] = str(art.row["version"])
    given = json.loads(art.row.get("metadata_json") or "{}")
    if isinstance(given, dict):
        # a view for MLflow's model page: the exact metadata stays in the artifact row
        params = {
            fit_key(str(k), LIMITS): str(v)[: LIMITS.param_value_chars or None]
            for k, v in given.items()
            if isinstance(v, str | int | float | bool) and not str(k).startswith("_")
        }
        meta["params"] = params or None
    row = {**art.row, "metadata_json": json.dumps(meta)}
    return dataclasses.replace(art, row=row, files=sendable(art.files))


class ModelsWriter:
    """Logged models and the registry."""

    def _write_logged_model(
        self, art: ArtifactPayload, exp_id: str, run_id: str | None, report: RunReport | None
    ) -> str:
        from mlflow.entities import LoggedModelStatus

        key = art.row["artifact_key"]
        meta = json.loads(art.row.get("metadata_json") or "{}")
        index = self._models_index(exp_id)
        m = index.get(key)
        if m is None:
            tags = {k: v for k, v in meta.get("tags", {}).items() if k not in mc.MANAGED_MODEL_TAGS}
            tags[mc.TAG_SOURCE_KEY] = key
            if self.origin:
                tags[mc.TAG_SOURCE] = self.origin
            if meta.get("creation_timestamp") is not None:
                tags[mc.TAG_SOURCE_CREATED] = str(meta["creation_timestamp"])
            raw = self.client.unwrapped
            m = mc.create_once(
                lambda: raw.create_logged_model(
                    exp_id,
                    name=art.row["name"],
                    source_run_id=run_id,
                    tags=tags,
                    params=meta.get("params") or None,
                    model_type=meta.get("model_type"),
                ),
                lambda: next(
                    (
                        x
                        for x in mc.paged(
                            lambda t: raw.search_logged_models([exp_id], max_results=100, page_token=t)
                        )
                        if x.tags.get(mc.TAG_SOURCE_KEY) == key
                    ),
                    None,
                ),
            )
            with self._lock:
                index[key] = m
        with self._lock:
            self._model_ids[key] = m.model_id
        upload_missing(
            art,
            lambda p: self.client.list_logged_model_artifacts(m.model_id, p),
            lambda lp, ap: self.client.log_model_artifact(m.model_id, lp, ap),
            report,
        )
        status = meta.get("status", "READY")
        if "READY" in status and str(m.status) != str(LoggedModelStatus.READY):
            self.client.finalize_logged_model(m.model_id, LoggedModelStatus.READY)
        elif "FAILED" in status and "FAILED" not in str(m.status):
            self.client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED)
        if run_id:
            self._link_output(run_id, m.model_id)
        return m.model_id

    def _link_output(self, run_id: str, model_id: str) -> None:
        """The run's output link to its logged model: what MLflow's own ``log_model`` adds
        and what the runs table's Models column and the run page list."""
        from mlflow.entities import LoggedModelOutput

        def linked() -> bool:
            outputs = self.client.get_run(run_id).outputs
            return any(o.model_id == model_id for o in (outputs.model_outputs if outputs else None) or [])

        if linked():
            return
        try:
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        except Exception:
            if not linked():  # another importer of the run linked it first: that is the same link
                raise

    def _write_source_model(self, art: ArtifactPayload, exp_id: str, run_id: str, report: RunReport) -> None:
        """A source's model (a W&B ``model`` artifact) as an MLflow 3 logged model of the run
        that logged it: its files in the model's own artifact location, once."""
        self._write_logged_model(as_logged_model(art), exp_id, run_id, report)
        with self._lock:
            self._source_models.add(art.row["artifact_key"])
        report.mapped(
            "model-as-logged-model",
            f"artifacts.{art.row['name']}",
            "an MLflow 3 logged model of the run (the Models column), its files in the model",
        )

    def write_artifact(self, payload: ArtifactPayload, report: Any) -> None:
        """An artifact no run owns (a Neptune model version's files) has one home in
        MLflow 3: a logged model, which needs no run; its type becomes the model type."""
        exp_id = self._exp_ids.get(payload.row["project_key"])
        if exp_id is None or self.dry_run:
            return
        if payload.row["type"] != schema.LOGGED_MODEL:
            payload = as_logged_model(payload)
            report.mapped(
                "artifact-as-logged-model",
                payload.row["artifact_key"],
                f"{payload.row['type']!r} artifact {payload.row['name']!r} written as an MLflow logged model",
            )
        self._write_logged_model(payload, exp_id, None, None)

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        try:
            self._write_registry(payload, report)
        except BaseException:
            self._registry_failed = True
            raise

    def _write_registry(self, payload: RegistryPayload, report: Any) -> None:
        from mlflow.exceptions import MlflowException

        versions = payload.model_versions.to_pylist()
        by_model: dict[str, list[dict[str, Any]]] = {}
        for v in versions:
            by_model.setdefault(v["model_name"], []).append(v)
        for rm in payload.registered_models.to_pylist():
            name = rm["name"]
            if self.dry_run:
                continue
            try:
                have = self.client.get_registered_model(name)
            except MlflowException:
                have = None
            tags = dict(rm["tags"] or [])
            if have is None:
                try:
                    self.client.create_registered_model(name, tags=tags, description=rm["description"])
                except MlflowException as e:
                    # another shard, or a retried request whose answer was lost, made it
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            else:
                if (have.description or None) != rm["description"]:
                    self.client.update_registered_model(name, description=rm["description"] or "")
                for k, v in tags.items():
                    if have.tags.get(k) != v:
                        self.client.set_registered_model_tag(name, k, v)
            self._write_versions(name, by_model.get(name, []), report)

    def _write_versions(self, name: str, versions: list[dict[str, Any]], report: Any) -> None:
        existing = {}
        for v in self.client.search_model_versions(f"name='{quote(name)}'", max_results=10000):
            if mc.TAG_SOURCE_KEY in v.tags:
                existing[mc.version_origin(dict(v.tags))] = v
        wanted_aliases: dict[str, str] = {}
        ours = set()
        for sv in sorted(versions, key=lambda v: int(v["version"]) if v["version"].isdigit() else 0):
            dv = mc.find_by_key(existing, sv["version_key"])
            if dv is None:
                dv, made = self._create_version(name, sv, report)
                outcome = "new" if made else "unchanged"
                report.models[outcome] = report.models.get(outcome, 0) + 1
            else:
                report.models["unchanged"] = report.models.get("unchanged", 0) + 1
                if (dv.description or None) != sv["description"]:
                    self.client.update_model_version(name, dv.version, description=sv["description"] or "")
                for k, v in dict(sv["tags"] or []).items():
                    if dv.tags.get(k) != v:
                        self.client.set_model_version_tag(name, dv.version, k, v)
            ours.add(str(dv.version))
            stage = sv.get("stage")
            if stage and stage != "None" and dv.current_stage != stage:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still used
                    self.client.transition_model_version_stage(name, dv.version, stage)
            for a in sv["aliases"] or []:
                fitted = fit_alias(a, f"{name}: alias {a!r}", report)
                if fitted:
                    wanted_aliases[fitted] = str(dv.version)
        if not ours:
            return
        current = self.client.get_registered_model(name).aliases or {}
        for alias, version in wanted_aliases.items():
            if str(current.get(alias)) != version:
                self.client.set_registered_model_alias(name, alias, version)
        for alias, version in current.items():
            if alias not in wanted_aliases and str(version) in ours:
                self.client.delete_registered_model_alias(name, alias)

    def _create_version(self, name: str, sv: dict[str, Any], report: Any) -> tuple[Any, bool]:
        run_id = self._find_run_id(sv["run_key"]) if sv["run_key"] else None
        model_id = self._model_ids.get(sv["artifact_key"]) if sv["artifact_key"] else None
        placed = self._artifact_dirs.get(sv["artifact_key"] or "")
        source = sv["source"]
        if model_id and sv["artifact_key"] in self._source_models:
            source = f"models:/{model_id}"  # a W&B model artifact: the logged model made of it
        elif model_id and (source or "").startswith("models:/"):
            source = f"models:/{model_id}"
        elif placed and not sv["source_subpath"]:
            # a W&B model artifact: its files, uploaded to the run that logged it
            run_id = placed[0]
            source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{placed[1]}"
        elif run_id and sv["source_subpath"]:
            source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{sv['source_subpath']}"
        else:
            report.mapped(
                "model-source-kept",
                f"{name} v{sv['version']}",
                f"source {source!r} points outside the migrated runs and was kept as is",
            )
        tags = {
            **dict(sv["tags"] or []),
            mc.TAG_SOURCE_KEY: sv["version_key"],
            mc.TAG_SOURCE_VERSION: sv["version"],
            **({mc.TAG_SOURCE: self.origin} if self.origin else {}),
        }
        if (placed or sv["artifact_key"] in self._source_models) and not sv["source_subpath"]:
            tags[mc.TAG_SOURCE_ARTIFACT] = sv["artifact_key"]
        if sv.get("created_at") is not None:
            tags[mc.TAG_SOURCE_CREATED] = sv["created_at"].isoformat()
        raw = self.client.unwrapped

        def create() -> Any:
            with mc.global_tracking_uri(self.uri):
                return raw.create_model_version(
                    name, source, run_id=run_id, tags=tags, description=sv["description"], model_id=model_id
                )

        def find() -> Any:
            return next(
                (
                    v
                    for v in raw.search_model_versions(f"name='{quote(name)}'", max_results=10000)
                    if v.tags.get(mc.TAG_SOURCE_KEY) == sv["version_key"]
                ),
                None,
            )

        # another importer may have registered it since this model's versions were listed
        with mc.store_lock(self.uri):
            found = find()
            if found is not None:
                return found, False
            return mc.create_once(create, find), True
