"""An mlflow-export-import folder: which layout, where each experiment, run and logged
model is, found from the files the exporter wrote (``export_import`` says why it is
read, ``export_client`` answers the MLflow reader's calls from it).

Everything read here is untrusted: ids that become folder names are checked to be one
plain name, a link anywhere below a run's or model's files fails that object, and JSON
of another shape than the exporter writes is one line naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trackbridge.errors import BadInputError, SourceNotFoundError
from trackbridge.trackers.mlflow.uris import EXPORT_IMPORT as SCHEME

# a run, experiment or logged model id that names a folder: one plain name
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def linked(path: Any) -> BadInputError:
    """A link in an export could make a copy read any file of this machine."""
    return BadInputError(f"{path}: is a link; an export's files must be plain files")


def read_json(path: Path) -> dict[str, Any]:
    if path.is_symlink():
        raise linked(path)
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(doc, dict):
        raise BadInputError(f"{path}: not a JSON object")
    return doc


@contextmanager
def shaped(path: Path) -> Iterator[None]:
    """A file of the export whose JSON has another shape than the exporter writes: one
    line naming it, not a Python error from deep in the reading."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"{path}: not as mlflow-export-import writes it ({type(e).__name__}: {e})") from e


def pairs(x: Any) -> list[tuple[str, str]]:
    """Tags as the exporter wrote them: a JSON object, or a list of {key, value}."""
    if isinstance(x, dict):
        return [(str(k), "" if v is None else str(v)) for k, v in x.items()]
    return [(str(t["key"]), "" if t.get("value") is None else str(t["value"])) for t in x or []]


def _folder(parent: Path, name: Any, what: str) -> Path:
    if not isinstance(name, str) or not _ID.fullmatch(name) or name in (".", ".."):
        raise BadInputError(f"{parent}: {what} {name!r} is not a plain id")
    return parent / name


def _no_links(top: Path) -> None:
    """Every file and folder below ``top`` must be its own, not a link."""
    if top.is_symlink():
        raise linked(top)
    for parent, dirs, files in os.walk(top):
        for n in dirs + files:
            link = os.path.join(parent, n)
            if os.path.islink(link):
                raise linked(link)


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
        with shaped(d):
            return self._read_experiment(d)

    def _read_experiment(self, d: Path) -> dict[str, Any] | None:
        if (d / "experiment.json").is_file():
            doc = read_json(d / "experiment.json")
            body = doc.get("mlflow", {})
            exp, run_ids, traces = body.get("experiment"), body.get("runs", []), body.get("traces") or []
            system = doc.get("system", {})
            new = system.get("export_file_version") == "2" or (d / "runs").is_dir()  # layout 2
            runs_dir = d / "runs" if new else d
            self.tracking_uri = self.tracking_uri or system.get("mlflow_tracking_uri")
        elif (d / "manifest.json").is_file() and "experiment" in (doc := read_json(d / "manifest.json")):
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


def repo(folder: Path) -> Any:
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    if folder.exists():
        _no_links(folder)
    return LocalArtifactRepository(str(folder))
