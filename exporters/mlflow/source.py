"""Read an MLflow tracking server or store into the neutral schema.

Works the same on a REST server (``http://…``) and an in-process store (``sqlite:///…``,
``postgresql://…``), through ``MlflowClient``. Metric histories are read in full with the
paged ``get-history`` call: the bulk endpoint truncates silently at 25,000 points and
the ``-interval`` one samples, so neither may be used for data.

Values that the MLflow importer had to map to fit MLflow's limits are restored from the
run's ``trackbridge/mapping.json``, so MLflow → MLflow → anything is lossless.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from trackbridge import native, schema
from trackbridge.errors import SourceNotFoundError, first_line
from trackbridge.exporters.mlflow.files import FilesReader
from trackbridge.exporters.mlflow.history import HistoryReader
from trackbridge.exporters.mlflow.models import ModelsReader, _model_points
from trackbridge.model import (
    ArtifactPayload,
    RunPayload,
    Selection,
    TrackerSource,
)
from trackbridge.trackers.mlflow import common as mc
from trackbridge.trackers.mlflow import media


def _own_metric_keys(metrics: Any, renamed: dict[str, str], shown: dict[str, Any]) -> list[str]:
    """The run's metric keys that hold its source's history, in the order of the names
    they restore to: not what the importer added for the runs table (summary values),
    not a bookkeeping series it keeps in a file, and not a key an earlier import wrote
    under the original name that a later one moved to a native one (an upgraded run has
    both, with the same points)."""
    added = set(shown.get("metrics", [])) | set(shown.get("hidden", []))
    moved = {orig for k, orig in renamed.items() if k in metrics}
    keys = [k for k in metrics if k not in added and (k in renamed or k not in moved)]
    return sorted(keys, key=lambda k: renamed.get(k, k))


class MlflowSource(HistoryReader, FilesReader, ModelsReader, TrackerSource):
    def __init__(self, tracking_uri: str, safe: str | None = None, client: Any = None) -> None:
        """``client``: what answers the calls made here instead of an ``MlflowClient``
        (an export folder's, ``export_import``)."""
        self.uri = tracking_uri
        self.safe = safe or tracking_uri
        try:
            self.client = client or mc.client(tracking_uri)
        except mc.StoreUnreachable as e:
            raise SourceNotFoundError(f"{self.describe()}: cannot connect ({e})") from e
        self._runs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._models_by_run: dict[str, list[Any]] | None = None
        self._exps: list[Any] | None = None
        self._created: dict[str, int | None] | None = None
        self._rest = tracking_uri.startswith(("http://", "https://"))
        # destination key -> source key, for objects trackbridge itself imported
        self._origin: dict[str, str] = {}
        self._origin_source: dict[str, str] = {}
        self._check_reachable()

    def describe(self) -> str:
        return f"mlflow+{self.safe}"

    def _remember(self, key: str, tags: Any) -> None:
        tags = dict(tags)
        src = tags.get(mc.TAG_SOURCE_KEY)
        if src:
            origin = mc.run_state(tags).get("source")
            with self._lock:
                self._origin[key] = src
                if origin:
                    self._origin_source[key] = origin

    def _check_reachable(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            mc.store_of(self.client)
            mc.first_contact(self.client)
        except mc.StoreUnreachable as e:
            raise SourceNotFoundError(f"{self.describe()}: cannot connect ({e})") from e
        except MlflowException as e:
            raise SourceNotFoundError(f"{self.describe()}: cannot read ({first_line(e)})") from e
        except OSError as e:
            raise SourceNotFoundError(f"{self.describe()}: cannot connect ({first_line(e)})") from e

    # -- projects

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        out = []
        for e in self._experiments():
            tags = dict(e.tags)
            row = {
                "project_key": self._project_key(e.experiment_id),
                "system": "mlflow",
                "source_id": e.experiment_id,
                "name": e.name,
                "description": tags.get(mc.TAG_NOTE),
                "lifecycle": e.lifecycle_stage,
                "created_at": mc.ms_to_dt(e.creation_time),
                # the note is the description; keep it in one place only
                "tags": sorted((k, v) for k, v in mc.user_tags(tags).items() if k != mc.TAG_NOTE),
            }
            self._remember(row["project_key"], tags)
            if sel.wants_project(row) and (sel.include_deleted or e.lifecycle_stage != "deleted"):
                out.append(row)
        return out

    def _project_key(self, experiment_id: str) -> str:
        if self._created is None:
            self._created = {e.experiment_id: e.creation_time for e in self._experiments()}
        return mc.project_key(experiment_id, self._created.get(experiment_id))

    def _experiments(self) -> list[Any]:
        """Every experiment, deleted ones too; listed once, for projects and logged models."""
        from mlflow.entities import ViewType

        with self._lock:
            if self._exps is None:
                self._exps = list(
                    mc.paged(
                        lambda t: self.client.search_experiments(
                            view_type=ViewType.ALL, max_results=mc.PAGE, page_token=t
                        )
                    )
                )
            return self._exps

    # -- runs

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from mlflow.entities import ViewType

        filters = []
        if sel.since:
            filters.append(f"attributes.start_time >= {mc.dt_to_ms(sel.since)}")
        if sel.until:
            filters.append(f"attributes.start_time < {mc.dt_to_ms(sel.until)}")
        view = ViewType.ALL if sel.include_deleted else ViewType.ACTIVE_ONLY
        out = []
        ids = [p["source_id"] for p in projects]
        for i in range(0, len(ids), 100):
            chunk = ids[i : i + 100]
            for r in mc.paged(
                lambda t, chunk=chunk: self.client.search_runs(
                    experiment_ids=chunk,
                    filter_string=" and ".join(filters),
                    run_view_type=view,
                    max_results=mc.PAGE,
                    order_by=["attributes.start_time ASC"],
                    page_token=t,
                )
            ):
                if mc.TAG_DUPLICATE_OF in r.data.tags:
                    continue  # a copy trackbridge retired (trackbridge.claims): not the user's
                row = self._run_row(r)
                self._remember(row["run_key"], r.data.tags)
                if sel.wants_run(row):
                    with self._lock:
                        self._runs[r.info.run_id] = r
                    out.append(row)
        return out

    def _run_row(self, r: Any) -> dict[str, Any]:
        tags = dict(r.data.tags)
        info = r.info
        status = tags.get(mc.TAG_SOURCE_STATUS) or mc.FROM_MLFLOW_STATUS.get(info.status, info.status.lower())
        parent = tags.get(mc.TAG_PARENT)
        url = None
        if self._rest:
            url = f"{self.safe.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
        return {
            "run_key": mc.run_key(info.run_id),
            "project_key": self._project_key(info.experiment_id),
            "source_id": info.run_id,
            "name": info.run_name,
            "status": status,
            "lifecycle": info.lifecycle_stage,
            "start_time": mc.ms_to_dt(info.start_time),
            "end_time": mc.ms_to_dt(info.end_time),
            "user": info.user_id or tags.get(mc.TAG_USER) or None,
            "notes": tags.get(mc.TAG_NOTE),
            "labels": sorted(k[len(mc.LABEL_PREFIX) :] for k in tags if k.startswith(mc.LABEL_PREFIX)),
            "parent_run_key": mc.run_key(parent) if parent else None,
            **{f: tags.get(tag) for f, tag in mc.RUN_FIELD_TAGS.items()},
            "source_url": url,
            "source_incomplete": tags.get(mc.TAG_INCOMPLETE) == "true",
        }

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        run_id = run["source_id"]
        with self._lock:
            r = self._runs.get(run_id)
        if r is None:
            r = self.client.get_run(run_id)
        key = run["run_key"]
        tags = dict(r.data.tags)
        repo = self._run_repo(r)
        state = mc.run_state(tags)
        mapping = self._mapping(run_id, repo) if "mapped" in state else {}
        extras = self._extras(run_id, repo) if "extras" in state else {}
        # what the importer added so MLflow's UI shows the run natively: taken back out
        shown = extras.get("native") or {}
        for k in shown.get("tags", []):
            tags.pop(k, None)
        for k, original in (shown.get("restore_tags") or {}).items():
            if original is None:
                tags.pop(k, None)
            else:
                tags[k] = original
        params = dict(r.data.params)
        param_rows = []
        restored_params = mapping.get("params", {})
        for k, v in sorted(params.items()):
            orig = restored_params.get(k)
            if orig:
                param_rows.append(
                    {
                        "run_key": key,
                        "path": orig["path"],
                        "value_json": orig["value_json"],
                        "value_type": orig["value_type"],
                    }
                )
            else:
                param_rows.append(
                    {"run_key": key, "path": [k], "value_json": schema.dumps_value(v), "value_type": "str"}
                )
        restored_tags = mapping.get("tags", {})
        if mc.TAG_NOTE in restored_tags:
            run = {**run, "notes": restored_tags[mc.TAG_NOTE]["value"]}
        tag_rows = []
        labels = []
        field_tags = {tag: f for f, tag in mc.RUN_FIELD_TAGS.items()}
        for k, v in sorted(mc.user_tags(tags).items()):
            if k == mc.TAG_NOTE:
                continue  # carried as the run's notes
            orig = restored_tags.get(k) or {"key": k, "value": v}
            if orig["key"].startswith(mc.LABEL_PREFIX):
                labels.append(orig["key"][len(mc.LABEL_PREFIX) :])
            elif orig["key"] in field_tags:
                run = {**run, field_tags[orig["key"]]: orig["value"]}
            else:
                tag_rows.append({"run_key": key, "key": orig["key"], "value": orig["value"]})
        run = {**run, "labels": sorted(labels)}
        run.update(extras.get("run", {}))
        if run.get("sweep_key"):  # the search as this store holds it (its parent run)
            run["sweep_key"] = self.local_key(run["sweep_key"])
        renamed_metrics = mapping.get("metrics", {})
        metric_keys = _own_metric_keys(r.data.metrics, renamed_metrics, shown)
        kept_metrics = extras.get("kept_metrics")
        if kept_metrics is not None:  # written under the source's run key: this run's now
            kept_metrics = kept_metrics.set_column(
                0, "run_key", pa.array([key] * kept_metrics.num_rows, pa.string())
            )
        models = self._logged_models_of(run_id)
        model_points = _model_points(models)
        datasets = [
            {
                "run_key": key,
                "name": d.dataset.name,
                "digest": d.dataset.digest,
                "source_type": d.dataset.source_type,
                "source": d.dataset.source,
                "schema": d.dataset.schema,
                "profile": d.dataset.profile,
                "tags": sorted((t.key, t.value) for t in d.tags),
            }
            for d in (r.inputs.dataset_inputs if r.inputs else [])
        ]
        # a source's model (W&B) whose files are an MLflow logged model of this run: read
        # from the model, and not given a second time as a logged model of MLflow's own
        # (one imported before 0.2 has no logged model: its files are in the run's folder)
        kept_models = {
            a["row"]["artifact_key"] for a in extras.get("artifacts", []) if native.is_model(a["row"])
        }
        homes = {
            m.tags.get(mc.TAG_SOURCE_KEY): m for m in models if m.tags.get(mc.TAG_SOURCE_KEY) in kept_models
        }
        models = [m for m in models if m not in homes.values()]
        source_arts = [
            self._source_artifact(repo, a, homes.get(a["row"]["artifact_key"]))
            for a in extras.get("artifacts", [])
        ]
        # our own files, only where the tags say we wrote them: a user's are theirs
        ours = [mc.MAPPING_ARTIFACT] if "mapped" in state else []
        if "extras" in state:
            ours += [mc.EXTRAS_ARTIFACT, mc.SERIES_ARTIFACT, mc.KEPT_METRICS_ARTIFACT]
            ours += [mc.artifact_dir(a.row) + "/" for a in source_arts]
            ours += shown.get("files", [])
        skip = tuple(ours)
        artifacts = [self._run_files(r, repo, skip), *source_arts]
        artifacts += [self._logged_model_artifact(m, run["project_key"]) for m in models]
        usage = [
            {"run_key": key, "artifact_key": mc.model_key(m.model_id), "direction": "output"} for m in models
        ] + [{"run_key": key, **u} for u in extras.get("usage", [])]
        summary = [{"run_key": key, **x} for x in extras.get("summary", [])]
        series = extras.get("series")
        # MLflow's own step-wise images and tables (log_image, log_table), as series rows a
        # W&B user sees as wandb.Image and wandb.Table; the files stay the run's files
        referenced = set(series.column("file_path").to_pylist()) if series is not None else set()
        paths = [f.path for f in artifacts[0].files if f.path not in referenced]
        made = media.series_rows(key, paths, tags)
        if made:
            both = [series] if series is not None else []
            series = pa.concat_tables([*both, schema.table("series", made)])

        def metrics() -> Iterator[pa.RecordBatch]:
            if kept_metrics is not None:
                yield from kept_metrics.replace_schema_metadata(None).to_batches()
            for mk in metric_keys:
                yield from self._history_table(
                    key, run_id, mk, renamed_metrics.get(mk, mk), model_points
                ).to_batches()

        return RunPayload(
            run=run,
            params=schema.table("params", param_rows),
            tags=schema.table("tags", tag_rows),
            metrics=metrics,
            dataset_inputs=schema.table("dataset_inputs", datasets),
            artifact_usage=schema.table("artifact_usage", usage),
            artifacts=artifacts,
            summary=schema.table("summary", summary),
            series=series if series is not None else schema.empty("series"),
        )

    # -- metrics

    # -- artifacts

    # -- MLflow 3 logged models

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        """Logged models that no run produced (a run's own ones travel with the run)."""
        keys = {p["source_id"] for p in projects}
        for m in self._all_logged_models().get("", []):
            if m.experiment_id in keys:
                yield self._logged_model_artifact(m, self._project_key(m.experiment_id))

    # -- registry
