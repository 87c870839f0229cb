"""Read an MLflow tracking server or store into the neutral schema.

Works the same on a REST server (``http://…``) and an in-process store (``sqlite:///…``,
``postgresql://…``), through ``MlflowClient``. Metric histories are read in full with the
paged ``get-history`` call: the bulk endpoint truncates silently at 25,000 points and
the ``-interval`` one samples, so neither may be used for data.

Values that the MLflow importer had to map to fit MLflow's limits are restored from the
run's ``trackbridge/mapping.json``, so MLflow → MLflow → anything is lossless.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bridge import mlflow_common as mc
from bridge import schema
from bridge.errors import BadInputError, SourceNotFoundError, first_line
from bridge.files import download_fetch, temp_dir
from bridge.model import (
    ArtifactPayload,
    FileRef,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    no_local_bytes,
)

PAGE = 1000
HISTORY_PAGE = 25000


class MlflowSource(TrackerSource):
    def __init__(self, tracking_uri: str, safe: str | None = None) -> None:
        self.uri = tracking_uri
        self.safe = safe or tracking_uri
        self.client = mc.client(tracking_uri)
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
            with self._lock:
                self._origin[key] = src
                if mc.TAG_SOURCE in tags:
                    self._origin_source[key] = tags[mc.TAG_SOURCE]

    def _check_reachable(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            mc.first_contact(self.client)
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
                            view_type=ViewType.ALL, max_results=PAGE, page_token=t
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
                    max_results=PAGE,
                    order_by=["attributes.start_time ASC"],
                    page_token=t,
                )
            ):
                if mc.TAG_DUPLICATE_OF in r.data.tags:
                    continue  # a copy trackbridge retired (bridge.claims): not the user's
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
        mapping = self._mapping(run_id, repo) if mc.TAG_MAPPED in tags else {}
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
        extras = self._extras(run_id, repo) if mc.TAG_EXTRAS in tags else {}
        run.update(extras.get("run", {}))
        renamed_metrics = mapping.get("metrics", {})
        metric_keys = sorted(r.data.metrics)
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
        source_arts = [self._source_artifact(repo, a) for a in extras.get("artifacts", [])]
        # our own files, only where the tags say we wrote them: a user's are theirs
        ours = [mc.MAPPING_ARTIFACT] if mc.TAG_MAPPED in tags else []
        if mc.TAG_EXTRAS in tags:
            ours += [mc.EXTRAS_ARTIFACT, mc.SERIES_ARTIFACT]
            ours += [mc.artifact_dir(a.row) + "/" for a in source_arts]
        skip = tuple(ours)
        artifacts = [self._run_files(r, repo, skip), *source_arts]
        artifacts += [self._logged_model_artifact(m, run["project_key"]) for m in models]
        usage = [
            {"run_key": key, "artifact_key": mc.model_key(m.model_id), "direction": "output"} for m in models
        ] + [{"run_key": key, **u} for u in extras.get("usage", [])]
        summary = [{"run_key": key, **x} for x in extras.get("summary", [])]
        series = extras.get("series")

        def metrics() -> Iterator[pa.RecordBatch]:
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

    def _history(self, run_id: str, key: str) -> pa.Table:
        """The full history of one metric, every page of it: columns step, timestamp (ms)
        and value."""
        if not self._rest:
            hist = self.client.get_metric_history(run_id, key)
            return _points_table([m.step for m in hist], [m.timestamp for m in hist], [m.value for m in hist])
        # Over REST, skip MlflowClient's per-point entity objects and Python's JSON: the
        # server is the bottleneck and shares the CPU with us, so every client cycle
        # saved is speed. Arrow parses a 5,000-point page in a fifth of the time.
        creds = self.client._tracking_client.store.get_host_creds()
        pages = []
        token = None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": HISTORY_PAGE}
            if token:
                params["page_token"] = token
            resp = mc.rest(creds, "/api/2.0/mlflow/metrics/get-history", "GET", params=params)
            page, token = _parse_page(resp.content)
            pages.append(page)
            if not token:
                return pa.concat_tables(pages)

    def _history_table(
        self,
        key: str,
        run_id: str,
        mlflow_key: str,
        neutral_key: str,
        model_points: _Links,
    ) -> pa.Table:
        hist = self._history(run_id, mlflow_key)
        n = hist.num_rows
        tbl = schema.metrics_table(
            key,
            pa.repeat(pa.scalar(neutral_key, pa.string()), n),
            hist.column("step"),
            pc.multiply_checked(hist.column("timestamp"), 1000),
            hist.column("value"),
        )
        hits = model_points.get(mlflow_key)
        if hits:  # a Python pass over the points only for a key linked to a logged model
            cols: list[list[str | None]] = [[None] * n for _ in range(3)]
            points = zip(*(hist.column(c).to_pylist() for c in ("step", "timestamp", "value")), strict=True)
            for i, point in enumerate(points):
                link = hits.get(point)
                if link:
                    cols[0][i], cols[1][i], cols[2][i] = link
            for name, col in zip(("model_key", "dataset_name", "dataset_digest"), cols, strict=True):
                i = tbl.schema.get_field_index(name)
                tbl = tbl.set_column(i, tbl.schema.field(i), pa.array(col, pa.string()))
        return tbl

    # -- artifacts

    def _mapping(self, run_id: str, repo: Any) -> dict[str, Any]:
        """The originals the importer had to map. Unreadable means the run fails, loudly:
        exporting the truncated values as if they were the originals would lose data."""
        with temp_dir() as d:
            try:
                local = mc.POLICY.call(repo.download_artifacts, mc.MAPPING_ARTIFACT, str(d))
                with open(local) as f:
                    return json.load(f)
            except Exception as e:
                raise BadInputError(
                    f"run {run_id} is tagged {mc.TAG_MAPPED} but its {mc.MAPPING_ARTIFACT} cannot be read "
                    f"({first_line(e)}); its mapped params and tags cannot be restored"
                ) from e

    def _extras(self, run_id: str, repo: Any) -> dict[str, Any]:
        """What the importer kept in run files because MLflow has no field for it."""
        import pyarrow.parquet as pq

        with temp_dir() as d:
            try:
                local = mc.POLICY.call(repo.download_artifacts, mc.MAPPING_DIR, str(d))
                extras_path = os.path.join(local, "extras.json")
                out: dict[str, Any] = {}
                if os.path.exists(extras_path):
                    with open(extras_path) as f:
                        out = json.load(f)
                series_path = os.path.join(local, "series.parquet")
                if os.path.exists(series_path):
                    out["series"] = pq.read_table(series_path).cast(schema.SCHEMAS["series"])
                return out
            except Exception as e:
                raise BadInputError(
                    f"run {run_id} is tagged {mc.TAG_EXTRAS} but its {mc.MAPPING_DIR}/ files cannot be read "
                    f"({first_line(e)}); its summary, series and artifacts cannot be restored"
                ) from e

    def _source_artifact(self, repo: Any, kept: dict[str, Any]) -> ArtifactPayload:
        row = dict(kept["row"])
        if row.get("created_at"):
            row["created_at"] = datetime.fromisoformat(row["created_at"])
        folder = mc.artifact_dir(row)
        files = [
            FileRef(f["path"], f["size"], None, no_local_bytes, uri=f["uri"])
            if f["uri"] and not f["sha256"]
            else FileRef(f["path"], f["size"], f["sha256"], _repo_fetcher(repo, f"{folder}/{f['path']}"))
            for f in kept["files"]
        ]
        return ArtifactPayload(row=row, files=files)

    def _run_repo(self, r: Any) -> Any:
        """The run's own artifact store, opened once per run.

        ``MlflowClient.list_artifacts``/``download_artifacts`` would look the run up again
        on every call, and below the root they go through ``runs:/``, which also lists the
        files of a logged model of the same name as if they were the run's. The run's own
        store lists only the run's files, and costs one request per listing or file.
        """
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

        uri = add_databricks_profile_info_to_artifact_uri(r.info.artifact_uri, self.uri)
        return get_artifact_repository(uri, tracking_uri=self.uri)

    def _run_files(self, r: Any, repo: Any, skip: tuple[str, ...]) -> ArtifactPayload:
        run_id = r.info.run_id
        files = []
        for fi in mc.walk_artifacts(lambda p: mc.POLICY.call(repo.list_artifacts, p)):
            if skip and fi.path.startswith(skip):
                continue
            files.append(
                FileRef(path=fi.path, size=fi.file_size, sha256=None, fetch=_repo_fetcher(repo, fi.path))
            )
        row = {
            "artifact_key": mc.files_key(run_id),
            "project_key": self._project_key(r.info.experiment_id),
            "name": "run-files",
            "type": "run-files",
            "aliases": [],
            "producer_run_key": mc.run_key(run_id),
        }
        return ArtifactPayload(row=row, files=files)

    def _uri_fetcher(self, uri: str):
        def download(d: str) -> str:
            import mlflow.artifacts

            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d, tracking_uri=self.uri)

        return download_fetch(download)

    # -- MLflow 3 logged models

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
            "type": "mlflow.logged_model",
            "aliases": [],
            "metadata_json": json.dumps(meta, sort_keys=True),
            "producer_run_key": mc.run_key(m.source_run_id) if m.source_run_id else None,
            "created_at": mc.ms_to_dt(m.creation_timestamp),
        }
        return ArtifactPayload(row=row, files=files)

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        """Logged models that no run produced (a run's own ones travel with the run)."""
        keys = {p["source_id"] for p in projects}
        for m in self._all_logged_models().get("", []):
            if m.experiment_id in keys:
                yield self._logged_model_artifact(m, self._project_key(m.experiment_id))

    # -- registry

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
            mc.paged(lambda t: self.client.search_registered_models(max_results=PAGE, page_token=t))
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

    def _run_artifact_uri(self, run_id: str) -> str:
        with self._lock:
            r = self._runs.get(run_id)
        if r is None:
            r = self.client.get_run(run_id)
        return r.info.artifact_uri


def _repo_fetcher(repo: Any, path: str):
    """A ``FileRef.fetch`` that downloads one known file (no is-it-a-folder listing first)."""

    def download(d: str) -> str:
        local = os.path.join(d, posixpath.basename(path))
        mc.POLICY.call(repo._download_file, path, local)
        return local

    return download_fetch(download)


_POINT = pa.struct([("step", pa.int64()), ("timestamp", pa.int64()), ("value", pa.float64())])
_PAGE = pa.schema([("metrics", pa.list_(_POINT)), ("next_page_token", pa.string())])


def _points_table(steps: Any, stamps: Any, values: Any) -> pa.Table:
    return pa.table(
        [pa.array(steps, pa.int64()), pa.array(stamps, pa.int64()), pa.array(values, pa.float64())],
        names=["step", "timestamp", "value"],
    )


def _parse_page(content: bytes) -> tuple[pa.Table, str | None]:
    """One ``get-history`` response → (step, timestamp, value) columns and the next token.

    Arrow's JSON reader does the common page in C. proto3 JSON leaves out zero fields
    (filled back here) and spells NaN and infinities as strings, which Arrow refuses as
    a double: such a page goes through Python's ``json`` instead, value by value.
    """
    import pyarrow.json as pj

    try:
        page = pj.read_json(
            io.BytesIO(content),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(content) + 1),
            parse_options=pj.ParseOptions(
                explicit_schema=_PAGE, newlines_in_values=True, unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        body = json.loads(content)
        points = body.get("metrics", [])
        return _points_table(
            [int(m.get("step", 0)) for m in points],
            [int(m.get("timestamp", 0)) for m in points],
            [float(m.get("value", 0.0)) for m in points],
        ), body.get("next_page_token")
    points = page.column("metrics")[0].values
    token = page.column("next_page_token")[0].as_py()
    if points is None:  # no "metrics" at all: an empty history
        return _points_table([], [], []), token
    return pa.table(
        [
            points.field("step").fill_null(0),
            points.field("timestamp").fill_null(0),
            points.field("value").fill_null(0.0),
        ],
        names=["step", "timestamp", "value"],
    ), token


_Links = dict[str, dict[tuple[int, int, float], tuple[str, str | None, str | None]]]


def _model_points(models: list[Any]) -> _Links:
    """Metric key → (step, timestamp, value) → (model key, dataset name, dataset digest)
    of the points linked to the run's logged models."""
    out: _Links = {}
    for m in models:
        for x in m.metrics or []:
            out.setdefault(x.key, {})[(x.step, x.timestamp, x.value)] = (
                mc.model_key(m.model_id),
                x.dataset_name,
                x.dataset_digest,
            )
    return out
