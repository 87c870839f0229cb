"""The calls the MLflow reader (``MlflowSource``) makes of an ``MlflowClient``, answered
from an mlflow-export-import folder with MLflow's own entities, built from its JSON."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from trackbridge.errors import BadInputError
from trackbridge.exporters.mlflow.export_folder import (
    SCHEME,
    ExportFolder,
    linked,
    pairs,
    read_json,
    repo,
    shaped,
)
from trackbridge.exporters.mlflow.history import points_table

# tags mlflow-export-import 1.x adds to a run with --export-source-tags: copies of its
# info and of MLflow's tags, and the export's own metadata, none of them the run's
_EXPORT_TAGS = "mlflow_export_import."


def _points(points: list[dict[str, Any]]) -> Any:
    """One metric's history, as the exporter wrote it, in the reader's columns."""
    return points_table(
        [int(p.get("step") or 0) for p in points],
        [int(p["timestamp"]) for p in points],
        [float(p["value"]) for p in points],
    )


class FolderClient:
    """The ``MlflowClient`` calls ``MlflowSource`` makes, answered from an export."""

    def __init__(self, export: ExportFolder) -> None:
        from mlflow.entities import Experiment, ExperimentTag

        self.export = export
        self.experiments = [
            Experiment(
                str(e["experiment_id"]),
                str(e["name"]),
                str(e.get("artifact_location") or ""),
                e.get("lifecycle_stage") or "active",
                tags=[ExperimentTag(k, v) for k, v in pairs(e.get("tags"))],
                creation_time=e.get("creation_time"),
                last_update_time=e.get("last_update_time"),
            )
            for e in export.experiments
        ]
        self._lock = threading.Lock()
        self._docs: OrderedDict[str, dict[str, Any]] = OrderedDict()  # the last runs read
        self._runs: dict[str, Any] | None = None
        self.broken: dict[str, BadInputError] = {}  # run id -> why its run.json cannot be read

    # -- runs

    def doc(self, run_id: str) -> dict[str, Any]:
        """A run's ``run.json`` body, its histories as columns (as Python objects they take
        ten times the file): kept for the last few runs, whose histories are read one key
        at a time."""
        with self._lock:
            if run_id in self._docs:
                self._docs.move_to_end(run_id)
                return self._docs[run_id]
        body = self._parse(run_id)
        with shaped(self.export.run_dirs[run_id] / "run.json"):
            body = {**body, "metrics": {str(k): _points(p) for k, p in (body.get("metrics") or {}).items()}}
        with self._lock:
            self._docs[run_id] = body
            while len(self._docs) > 8:
                self._docs.popitem(last=False)
        return body

    def _parse(self, run_id: str) -> dict[str, Any]:
        """A run's ``run.json`` body as the exporter wrote it, checked to be that run's."""
        folder = self.export.run_dirs.get(run_id)
        if folder is None:
            raise BadInputError(f"{SCHEME}://{self.export.root}: no run {run_id} in this export")
        if folder.is_symlink():
            raise linked(folder)
        doc = read_json(folder / "run.json")
        with shaped(folder / "run.json"):
            body = doc.get("mlflow", doc)
            info = body.get("info") or {}
            ok = info.get("run_id", info.get("run_uuid")) == run_id
        if not ok:
            raise BadInputError(f"{folder / 'run.json'}: holds run {info.get('run_id')!r}, not {run_id}")
        return body

    def _run(self, run_id: str) -> Any:
        with shaped(self.export.run_dirs[run_id] / "run.json"):
            return self._run_of(run_id, self._parse(run_id))

    def _run_of(self, run_id: str, body: dict[str, Any]) -> Any:
        from mlflow.entities import (
            Dataset,
            DatasetInput,
            InputTag,
            Metric,
            Param,
            Run,
            RunData,
            RunInfo,
            RunInputs,
            RunTag,
        )

        info = body["info"]
        start, end = info.get("start_time"), info.get("end_time")
        if type(start) is not int or not (end is None or type(end) is int):
            raise ValueError(f"start_time {start!r} and end_time {end!r} must be whole milliseconds")
        tags = dict(pairs(body.get("tags")))
        if tags.get(_EXPORT_TAGS + "run_info.run_id") == run_id:  # 1.x --export-source-tags
            tags = {k: v for k, v in tags.items() if not k.startswith(_EXPORT_TAGS)}
        # one point a key is enough: the reader asks for each history in full
        latest = [
            Metric(k, float(p[-1]["value"]), int(p[-1]["timestamp"]), int(p[-1].get("step") or 0))
            for k, p in (body.get("metrics") or {}).items()
            if p
        ]
        inputs = [
            DatasetInput(
                Dataset(
                    **{
                        f: x["dataset"].get(f)
                        for f in ("name", "digest", "source_type", "source", "schema", "profile")
                    }
                ),
                [InputTag(k, v) for k, v in pairs(x.get("tags"))],
            )
            for x in (body.get("inputs") or {}).get("dataset_inputs") or []
        ]
        return Run(
            RunInfo(
                run_id=run_id,
                experiment_id=str(info["experiment_id"]),
                user_id=info.get("user_id") or "",
                status=info.get("status") or "FINISHED",
                start_time=start,
                end_time=end,
                lifecycle_stage=info.get("lifecycle_stage") or "active",
                artifact_uri=info.get("artifact_uri"),
                run_name=info.get("run_name") or tags.get("mlflow.runName"),
            ),
            RunData(
                metrics=latest,
                params=[Param(k, v) for k, v in pairs(body.get("params"))],
                tags=[RunTag(k, v) for k, v in tags.items()],
            ),
            RunInputs(dataset_inputs=inputs),
        )

    def _all_runs(self) -> dict[str, Any]:
        """Every run, without its histories. A run whose ``run.json`` cannot be read is
        listed all the same, as a stand-in that ``read_run`` refuses with the reason: it
        fails alone, and the export's other runs still move."""
        from mlflow.entities import Run, RunData, RunInfo

        if self._runs is None:
            runs = {}
            for rid in self.export.run_dirs:
                try:
                    runs[rid] = self._run(rid)
                except BadInputError as e:
                    self.broken[rid] = e
                    exp = self.export.run_experiment[rid]
                    runs[rid] = Run(RunInfo(rid, exp, "", "FAILED", 0, None, "active"), RunData())
            self._runs = runs
        return self._runs

    def get_run(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

        run = self._all_runs().get(run_id)
        if run is None:
            raise MlflowException(f"Run {run_id!r} is not in this export", RESOURCE_DOES_NOT_EXIST)
        return run

    def search_runs(self, experiment_ids, filter_string="", run_view_type=None, order_by=None, **_: Any):
        from mlflow.entities import ViewType
        from mlflow.store.entities.paged_list import PagedList
        from mlflow.utils.search_utils import SearchUtils

        ids = set(experiment_ids)
        view = run_view_type or ViewType.ACTIVE_ONLY
        mine = [r for r in self._all_runs().values() if r.info.experiment_id in ids]
        runs = [
            r for r in mine if r.info.run_id not in self.broken and _in_view(view, r.info.lifecycle_stage)
        ]
        runs = SearchUtils.sort(SearchUtils.filter(runs, filter_string), order_by or [])
        # a run that cannot be read is listed whatever was asked, so that it is reported
        return PagedList(runs + [r for r in mine if r.info.run_id in self.broken], None)

    def search_experiments(self, view_type=None, **_: Any):
        from mlflow.entities import ViewType
        from mlflow.store.entities.paged_list import PagedList

        view = view_type or ViewType.ACTIVE_ONLY
        return PagedList([e for e in self.experiments if _in_view(view, e.lifecycle_stage)], None)

    # -- logged models (layout 2)

    def search_logged_models(self, experiment_ids, **_: Any):
        from mlflow.store.entities.paged_list import PagedList

        out = []
        for d in self.export.model_dirs:
            with shaped(d / "logged_model.json"):
                m = self._logged_model(d)
            if m.experiment_id in experiment_ids:
                out.append(m)
        return PagedList(out, None)

    def _logged_model(self, d: Path) -> Any:
        from mlflow.entities import LoggedModel, LoggedModelStatus, Metric

        m = read_json(d / "logged_model.json").get("mlflow") or {}
        if m.get("model_id") != d.name:
            raise BadInputError(f"{d / 'logged_model.json'}: holds model {m.get('model_id')!r}, not {d.name}")
        return LoggedModel(
            experiment_id=str(m["experiment_id"]),
            model_id=d.name,
            name=m.get("name") or d.name,
            artifact_location=(d / "artifacts").as_uri(),
            creation_timestamp=m.get("creation_time", m.get("creation_timestamp")),
            last_updated_timestamp=m.get("last_updated_timestamp"),
            model_type=m.get("model_type"),
            source_run_id=m.get("source_run_id"),
            status=LoggedModelStatus(m.get("status") or "READY"),
            status_message=m.get("status_message"),
            tags=dict(pairs(m.get("tags"))),
            params=dict(pairs(m.get("params"))),
            metrics=[
                Metric(
                    x["key"],
                    float(x["value"]),
                    int(x["timestamp"]),
                    int(x.get("step") or 0),
                    model_id=x.get("model_id"),
                    dataset_name=x.get("dataset_name"),
                    dataset_digest=x.get("dataset_digest"),
                    run_id=x.get("run_id"),
                )
                for x in m.get("metrics") or []
            ],
        )

    def list_logged_model_artifacts(self, model_id: str, path: str | None = None):
        for d in self.export.model_dirs:
            if d.name == model_id:
                return repo(d / "artifacts").list_artifacts(path)
        raise BadInputError(f"{SCHEME}://{self.export.root}: no logged model {model_id} in this export")

    # -- registry

    def _models(self) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for p in self.export.model_files:
            doc = read_json(p)
            with shaped(p):
                m = (doc.get("mlflow") or doc).get("registered_model")
            if not isinstance(m, dict) or m.get("name") is None:
                raise BadInputError(f"{p}: names no registered model")
            out.append((p, m))
        return out

    def search_registered_models(self, **_: Any):
        from mlflow.entities.model_registry import RegisteredModel, RegisteredModelAlias, RegisteredModelTag
        from mlflow.store.entities.paged_list import PagedList

        out = []
        for p, m in self._models():
            with shaped(p):
                aliases = [
                    RegisteredModelAlias(a["alias"], str(a["version"])) for a in m.get("aliases") or []
                ]
                out.append(
                    RegisteredModel(
                        m["name"],
                        creation_timestamp=m.get("creation_timestamp"),
                        last_updated_timestamp=m.get("last_updated_timestamp"),
                        description=m.get("description"),
                        tags=[RegisteredModelTag(k, v) for k, v in pairs(m.get("tags"))],
                        aliases=aliases,
                    )
                )
        return PagedList(out, None)

    def search_model_versions(self, **_: Any):
        from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
        from mlflow.store.entities.paged_list import PagedList

        out = []
        for p, m in self._models():
            # 1.x kept only the latest version of each stage ("latest_versions")
            for v in m.get("versions", m.get("latest_versions")) or []:
                with shaped(p):
                    out.append(
                        ModelVersion(
                            m["name"],
                            str(v["version"]),
                            v.get("creation_timestamp"),
                            last_updated_timestamp=v.get("last_updated_timestamp"),
                            description=v.get("description"),
                            user_id=v.get("user_id"),
                            current_stage=v.get("current_stage"),
                            source=v.get("source"),
                            run_id=v.get("run_id") or None,
                            status=v.get("status") or "READY",
                            status_message=v.get("status_message"),
                            tags=[ModelVersionTag(k, val) for k, val in pairs(v.get("tags"))],
                            run_link=v.get("run_link"),
                            model_id=v.get("model_id"),
                        )
                    )
        return PagedList(out, None)


def _in_view(view: Any, stage: str) -> bool:
    from mlflow.entities import ViewType

    return view == ViewType.ALL or (stage == "deleted") == (view == ViewType.DELETED_ONLY)
