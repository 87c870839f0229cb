"""A run's files out of MLflow, from the run's own artifact store (three requests a
run instead of about ten through ``runs:/``), and trackbridge's own files in it
(``mapping.json``, ``extras.json``) read back so that a round trip is exact.
"""

from __future__ import annotations

import json
import os
import posixpath
from datetime import datetime
from typing import Any

from trackbridge import schema
from trackbridge.errors import BadInputError, first_line
from trackbridge.files import download_fetch, safe_relpath, temp_dir
from trackbridge.model import (
    ArtifactPayload,
    FileRef,
    no_local_bytes,
)
from trackbridge.trackers.mlflow import common as mc


def _repo_fetcher(repo: Any, path: str):
    """A ``FileRef.fetch`` that downloads one known file (no is-it-a-folder listing first)."""

    def download(d: str) -> str:
        local = os.path.join(d, posixpath.basename(path))
        mc.POLICY.call(repo._download_file, path, local)
        return local

    return download_fetch(download)


class FilesReader:
    """Run files, and the originals trackbridge kept beside them."""

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
                    f"run {run_id} says ({mc.TAG_STATE}) it has mapped values, but its "
                    f"{mc.MAPPING_ARTIFACT} cannot be read "
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
                kept_path = os.path.join(local, posixpath.basename(mc.KEPT_METRICS_ARTIFACT))
                if os.path.exists(kept_path):
                    out["kept_metrics"] = pq.read_table(kept_path).cast(schema.SCHEMAS["metrics"])
                return out
            except Exception as e:
                raise BadInputError(
                    f"run {run_id} says ({mc.TAG_STATE}) it has extras, but its "
                    f"{mc.MAPPING_DIR}/ files cannot be read "
                    f"({first_line(e)}); its summary, series and artifacts cannot be restored"
                ) from e

    def _source_artifact(self, repo: Any, kept: dict[str, Any], model: Any = None) -> ArtifactPayload:
        """A source artifact the importer kept: its files under the run's
        ``artifacts/<name>/…`` folder, or (a source's model) in its logged ``model``."""
        row = dict(kept["row"])
        if row.get("created_at"):
            row["created_at"] = datetime.fromisoformat(row["created_at"])
        # names and paths from the run's own extras.json: a folder read from disk (an
        # export) is untrusted, and ../ must not reach the repository
        where = f"artifact {row.get('name')!r} in {mc.EXTRAS_ARTIFACT}"
        folder = safe_relpath(mc.artifact_dir(row), where)

        def fetch(path: str) -> Any:
            if model is not None:
                return self._uri_fetcher(f"{model.artifact_location.rstrip('/')}/{path}")
            return _repo_fetcher(repo, f"{folder}/{path}")

        files = [
            FileRef(path, f["size"], None, no_local_bytes, uri=f["uri"])
            if f["uri"] and not f["sha256"]
            else FileRef(path, f["size"], f["sha256"], fetch(path))
            for f in kept["files"]
            for path in [safe_relpath(f["path"], where)]
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

    def _run_artifact_uri(self, run_id: str) -> str:
        with self._lock:
            r = self._runs.get(run_id)
        if r is None:
            r = self.client.get_run(run_id)
        return r.info.artifact_uri
