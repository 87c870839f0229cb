"""Read the folders mlflow-export-import writes as the MLflow store they were exported from.

Teams keep its export folders as backups, and its own import resets every run's start
time (its issues #72 and #238). Here the folder answers the few calls the MLflow reader
(``MlflowSource``) makes of an ``MlflowClient``, with MLflow's own entities built from
the export's JSON. So every key, field and mapping rule is the MLflow reader's: a run
read from an export has the key of the same run read from the live server (restoring
over an earlier migration adds nothing), and ``verify`` compares the export with the
original store directly.

Three layouts, told apart by their own files:

- ``1.x`` (PyPI 1.0-1.1.2): ``manifest.json`` files and ``run.json`` with ``export_info``;
- ``1.2`` (PyPI 1.2.0): ``experiment.json`` and ``run.json`` with ``system``/``mlflow``,
  runs in ``experiments/<id>/<run_id>/``;
- ``2`` (the project's source since October 2025, ``export_file_version`` 2): runs in
  ``experiments/<id>/runs/<run_id>/`` and MLflow 3 logged models in
  ``experiments/<id>/logged_models/<model_id>/``.

The folder's files are found in ``export_folder`` and read in ``export_client``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from trackbridge import native
from trackbridge.errors import BadInputError, SourceNotFoundError
from trackbridge.exporters.mlflow.export_client import FolderClient
from trackbridge.exporters.mlflow.export_folder import SCHEME, ExportFolder, repo
from trackbridge.exporters.mlflow.history import points_table
from trackbridge.exporters.mlflow.source import MlflowSource
from trackbridge.files import local_fetch
from trackbridge.tracker import redact
from trackbridge.trackers.mlflow import common as mc


class ExportImportSource(MlflowSource):
    """An mlflow-export-import folder, read as the store it was exported from."""

    def __init__(self, path: str, safe: str | None = None) -> None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise SourceNotFoundError(f"{SCHEME}://{safe or root}: no such folder {root}")
        self.export = ExportFolder(root)
        super().__init__(root.as_uri(), safe=safe or str(root), client=FolderClient(self.export))
        # traces, prompts and evaluation datasets: in layout 2, not carried by trackbridge
        self.notices = [
            ("not-carried", what, f"{n}: trackbridge does not carry MLflow's GenAI objects")
            for what, n in self.export.left_out
        ]

    def describe(self) -> str:
        return f"{SCHEME}://{self.safe}"

    @property
    def origin(self) -> str | None:
        """The server the export was made from, as ``mlflow+…``: a restore records it, as
        a bundle records its source, so ``verify`` against that server knows its runs."""
        uri = self.export.tracking_uri
        return f"mlflow+{redact(uri)}" if uri and "://" in uri else None

    def _check_reachable(self) -> None:
        pass  # the folder was read when it was opened

    def read_run(self, run: dict[str, Any]) -> Any:
        broken = self.client.broken.get(run["source_id"])
        if broken is not None:
            raise broken
        return super().read_run(run)

    def _run_repo(self, r: Any) -> Any:
        return repo(self.export.run_dirs[r.info.run_id] / "artifacts")

    def _source_artifact(self, repo: Any, kept: dict[str, Any], model: Any = None) -> Any:
        """A source artifact trackbridge kept in the run: its files are in the run's folder,
        or (a source's model) in an MLflow logged model, which only layout 2 exports. Not
        there is the run's failure, said plainly, before any of it is written."""
        art = super()._source_artifact(repo, kept, model)  # its paths checked there
        if model is None:
            folder = Path(repo.artifact_dir) / mc.artifact_dir(art.row)
            missing = [f.path for f in art.files if f.sha256 and not (folder / f.path).is_file()]
            if missing:
                where = (
                    "an MLflow logged model, which this export does not hold; export with a "
                    "release that exports logged models, or migrate from the server"
                    if native.is_model(art.row)
                    else "the run's files, which this export lacks"
                )
                raise BadInputError(
                    f"artifact {art.row['name']!r}: its files ({missing[0]}, …) were kept in {where}"
                )
        return art

    def _uri_fetcher(self, uri: str):
        parts = urlsplit(uri)
        path = Path(url2pathname(parts.path))
        if parts.scheme != "file" or not path.resolve().is_relative_to(self.export.root.resolve()):
            raise BadInputError(f"{self.describe()}: {uri} is not a file of this export")
        return local_fetch(path)

    def _history(self, run_id: str, key: str) -> Any:
        return self.client.doc(run_id)["metrics"].get(key) or points_table([], [], [])
