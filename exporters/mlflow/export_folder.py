"""An mlflow-export-import folder, found and answered as an ``MlflowClient`` would.

``export_import.ExportImportSource`` says why; this holds the reading of the exporter's
files: which layout, where each run's folder is, and MLflow's own entities built from
the JSON. Everything read here is untrusted: ids that become folder names are checked to
be one plain name, and a link anywhere below a run's or model's files fails that object.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from trackbridge.errors import BadInputError, SourceNotFoundError
from trackbridge.trackers.mlflow.uris import EXPORT_IMPORT as SCHEME

# a run, experiment or logged model id that names a folder: one plain name
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# tags mlflow-export-import 1.x adds to a run with --export-source-tags: copies of its
# info and of MLflow's tags, and the export's own metadata, none of them the run's
_EXPORT_TAGS = "mlflow_export_import."


def _json(path: Path) -> dict[str, Any]:
    if path.is_symlink():
        raise BadInputError(f"{path}: is a link; an export's files must be plain files")
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(doc, dict):
        raise BadInputError(f"{path}: not a JSON object")
    return doc


def _pairs(x: Any) -> list[tuple[str, str]]:
    """Tags as the exporter wrote them: a JSON object, or a list of {key, value}."""
    if isinstance(x, dict):
        return [(str(k), "" if v is None else str(v)) for k, v in x.items()]
    return [(str(t["key"]), "" if t.get("value") is None else str(t["value"])) for t in x or []]


def _folder(parent: Path, name: Any, what: str) -> Path:
    if not isinstance(name, str) or not _ID.fullmatch(name) or name in (".", ".."):
        raise BadInputError(f"{parent}: {what} {name!r} is not a plain id")
    return parent / name


def _no_links(top: Path) -> None:
    """A link in an export could make a copy read any file of this machine: refuse it."""
    if top.is_symlink():
        raise BadInputError(f"{top}: is a link; an export's files must be plain files")
    for parent, dirs, files in os.walk(top):
        for n in dirs + files:
            link = os.path.join(parent, n)
            if os.path.islink(link):
                raise BadInputError(f"{link}: is a link; an export's files must be plain files")


class ExportFolder:
    """What the folder holds: experiments, where each run's folder is, logged models and
    registered models, found from the files the exporter wrote."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.left_out: list[tuple[str, str]] = []  # (what, why): what is not carried
        self.tracking_uri: str | None = None
        self.experiments: list[dict[str, Any]] = []
        self.run_dirs: dict[str, Path] = {}  # run id -> its folder
        self.run_experiment: dict[str, str] = {}  # run id -> its experiment's id
        self.model_dirs: list[Path] = []  # logged models' folders
        base = root / "experiments" if (root / "experiments").is_dir() else root
        if self._experiment(base) is None:
            for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()):
                self._experiment(d)
        for kind in ("prompts", "evaluation_datasets"):  # layout 2's, beside the experiments
            held = [d for d in (root / kind).glob("*/") if d.is_dir()] if (root / kind).is_dir() else []
            if held:
                self.left_out.append((kind.replace("_", " "), f"{len(held)} left out"))
        model_files = sorted((root / "models").glob("*/model.json")) if (root / "models").is_dir() else []
        self.model_files = [p for p in model_files if not p.parent.is_symlink()]
        if not self.experiments and not self.model_files and (root / "run.json").is_file():
            raise SourceNotFoundError(
                f"{SCHEME}://{root}: one run's export (export-run) names no experiment to put it in; "
                "export its experiment with export-experiment, or the server with export-all"
            )
        if not self.experiments and not self.model_files:
            seen = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8]
            raise SourceNotFoundError(
                f"{SCHEME}://{root}: not an mlflow-export-import folder: no experiment.json, "
                f"manifest.json or models/*/model.json (found: {', '.join(seen) or 'nothing'})"
            )

    def _experiment(self, d: Path) -> dict[str, Any] | None:
        """Read one experiment folder of any layout; None if ``d`` is not one."""
        if (d / "experiment.json").is_file():
            doc = _json(d / "experiment.json")
            body = doc.get("mlflow", {})
            exp, run_ids, traces = body.get("experiment"), body.get("runs", []), body.get("traces") or []
            system = doc.get("system", {})
            new = system.get("export_file_version") == "2" or (d / "runs").is_dir()  # layout 2
            runs_dir = d / "runs" if new else d
            self.tracking_uri = self.tracking_uri or system.get("mlflow_tracking_uri")
        elif (d / "manifest.json").is_file() and "experiment" in (doc := _json(d / "manifest.json")):
            info = doc.get("export_info", {})
            exp, run_ids, runs_dir = doc["experiment"], info.get("ok_runs", []), d
            traces = []
            self.tracking_uri = self.tracking_uri or info.get("mlflow_tracking_uri")
        else:
            return None
        if not isinstance(exp, dict) or "experiment_id" not in exp or "name" not in exp:
            raise BadInputError(f"{d}: its experiment file names no experiment (id and name)")
        if traces:
            self.left_out.append((f"experiment {exp['name']!r}", f"{len(traces)} trace(s) left out"))
        self.experiments.append(exp)
        for rid in run_ids:
            self.run_dirs[rid] = _folder(runs_dir, rid, "run")
            self.run_experiment[rid] = str(exp["experiment_id"])
        models = d / "logged_models"
        if models.is_dir():
            for m in sorted(models.iterdir()):
                if (m / "logged_model.json").is_file() and not m.is_symlink():
                    self.model_dirs.append(_folder(models, m.name, "logged model"))
        return exp


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
                tags=[ExperimentTag(k, v) for k, v in _pairs(e.get("tags"))],
                creation_time=e.get("creation_time"),
                last_update_time=e.get("last_update_time"),
            )
            for e in export.experiments
        ]
        self._lock = threading.Lock()
        self._docs: OrderedDict[str, dict[str, Any]] = OrderedDict()  # the last runs read, whole
        self._runs: dict[str, Any] | None = None
        self.broken: dict[str, BadInputError] = {}  # run id -> why its run.json cannot be read

    # -- runs

    def doc(self, run_id: str) -> dict[str, Any]:
        """A run's ``run.json`` body: kept for the last few runs, whose histories are read
        one key at a time."""
        with self._lock:
            if run_id in self._docs:
                self._docs.move_to_end(run_id)
                return self._docs[run_id]
        folder = self.export.run_dirs.get(run_id)
        if folder is None:
            raise BadInputError(f"{SCHEME}://{self.export.root}: no run {run_id} in this export")
        if folder.is_symlink():
            raise BadInputError(f"{folder}: is a link; an export's files must be plain files")
        doc = _json(folder / "run.json")
        body = doc.get("mlflow", doc)
        info = body.get("info") or {}
        if info.get("run_id", info.get("run_uuid")) != run_id:
            raise BadInputError(f"{folder / 'run.json'}: holds run {info.get('run_id')!r}, not {run_id}")
        with self._lock:
            self._docs[run_id] = body
            while len(self._docs) > 8:
                self._docs.popitem(last=False)
        return body

    def _run(self, run_id: str) -> Any:
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

        body = self.doc(run_id)
        info = body["info"]
        tags = dict(_pairs(body.get("tags")))
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
                [InputTag(k, v) for k, v in _pairs(x.get("tags"))],
            )
            for x in (body.get("inputs") or {}).get("dataset_inputs") or []
        ]
        return Run(
            RunInfo(
                run_id=run_id,
                experiment_id=str(info["experiment_id"]),
                user_id=info.get("user_id") or "",
                status=info.get("status") or "FINISHED",
                start_time=info.get("start_time"),
                end_time=info.get("end_time"),
                lifecycle_stage=info.get("lifecycle_stage") or "active",
                artifact_uri=info.get("artifact_uri"),
                run_name=info.get("run_name") or tags.get("mlflow.runName"),
            ),
            RunData(
                metrics=latest,
                params=[Param(k, v) for k, v in _pairs(body.get("params"))],
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
                except (BadInputError, KeyError, TypeError, ValueError) as e:
                    where = self.export.run_dirs[rid] / "run.json"
                    self.broken[rid] = e if isinstance(e, BadInputError) else BadInputError(f"{where}: {e!r}")
                    exp = self.export.run_experiment[rid]
                    runs[rid] = Run(RunInfo(rid, exp, "", "FAILED", 0, None, "active"), RunData())
                with self._lock:  # listing needs no histories: keep none of them
                    self._docs.pop(rid, None)
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
        from mlflow.entities import LoggedModel, LoggedModelStatus, Metric
        from mlflow.store.entities.paged_list import PagedList

        out = []
        for d in self.export.model_dirs:
            m = _json(d / "logged_model.json").get("mlflow") or {}
            if m.get("model_id") != d.name:
                raise BadInputError(
                    f"{d / 'logged_model.json'}: holds model {m.get('model_id')!r}, not {d.name}"
                )
            if str(m.get("experiment_id")) not in experiment_ids:
                continue
            out.append(
                LoggedModel(
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
                    tags=dict(_pairs(m.get("tags"))),
                    params=dict(_pairs(m.get("params"))),
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
            )
        return PagedList(out, None)

    def list_logged_model_artifacts(self, model_id: str, path: str | None = None):
        for d in self.export.model_dirs:
            if d.name == model_id:
                return repo(d / "artifacts").list_artifacts(path)
        raise BadInputError(f"{SCHEME}://{self.export.root}: no logged model {model_id} in this export")

    # -- registry

    def _models(self) -> list[dict[str, Any]]:
        out = []
        for p in self.export.model_files:
            doc = _json(p)
            m = (doc.get("mlflow") or doc).get("registered_model")
            if not isinstance(m, dict) or m.get("name") is None:
                raise BadInputError(f"{p}: names no registered model")
            out.append(m)
        return out

    def search_registered_models(self, **_: Any):
        from mlflow.entities.model_registry import RegisteredModel, RegisteredModelAlias, RegisteredModelTag
        from mlflow.store.entities.paged_list import PagedList

        return PagedList(
            [
                RegisteredModel(
                    m["name"],
                    creation_timestamp=m.get("creation_timestamp"),
                    last_updated_timestamp=m.get("last_updated_timestamp"),
                    description=m.get("description"),
                    tags=[RegisteredModelTag(k, v) for k, v in _pairs(m.get("tags"))],
                    aliases=[
                        RegisteredModelAlias(a["alias"], str(a["version"])) for a in m.get("aliases") or []
                    ],
                )
                for m in self._models()
            ],
            None,
        )

    def search_model_versions(self, **_: Any):
        from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
        from mlflow.store.entities.paged_list import PagedList

        out = []
        for m in self._models():
            # 1.x kept only the latest version of each stage ("latest_versions")
            for v in m.get("versions", m.get("latest_versions")) or []:
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
                        tags=[ModelVersionTag(k, val) for k, val in _pairs(v.get("tags"))],
                        run_link=v.get("run_link"),
                        model_id=v.get("model_id"),
                    )
                )
        return PagedList(out, None)


def _in_view(view: Any, stage: str) -> bool:
    from mlflow.entities import ViewType

    return view == ViewType.ALL or (stage == "deleted") == (view == ViewType.DELETED_ONLY)


def repo(folder: Path) -> Any:
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    if folder.exists():
        _no_links(folder)
    return LocalArtifactRepository(str(folder))
