"""Write runs into W&B through its SDK: offline run folders (``wandb+offline://PATH``) or
a W&B server (``wandb://ENTITY[/PROJECT]``).

The offline folders are what ``wandb sync`` uploads, so they are also the way into a W&B
server that the importing machine cannot reach.

Identity: the W&B run id is derived from the source key. Offline, each finished run
folder gets a ``trackbridge.json`` marker beside its ``.wandb`` log, written last, holding
the source key and a content fingerprint; a changed run, or one whose import was killed
before its marker, is written again from scratch, after its old folders are removed, so
a folder never holds two copies. Online, the fingerprint goes into the run's own
``_trackbridge`` config entry last, and a changed or half-written run is resumed and
appended to (``WandbOnlineSink``), since W&B cannot rewrite a run.

W&B cannot take everything through its SDK, and nothing is dropped quietly:
- Steps. W&B's ``_step`` must increase. A source whose keys step independently
  (MLflow: repeated, negative, or out-of-order steps, or one step at several times) is
  written on a row counter, with the source step in ``trackbridge/step`` and
  ``define_metric("*", step_metric="trackbridge/step")`` so charts use it. The exporter
  turns it back into each point's step.
- Start/end time, status, user, key/value tags, dataset inputs, lineage and the exact
  summary go into the ``_trackbridge`` config entry (``bridge.wandb_common``).
- System metrics cannot be logged, and the SDK overwrites ``_runtime``: those points
  are kept in the run file ``trackbridge/kept-metrics.parquet``.
- W&B-reserved artifact types (``run_table``, ``job``) are written as
  ``trackbridge-<type>``; the source row rides in the artifact's metadata.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridge import schema
from bridge import wandb_common as wc
from bridge.errors import DestinationError, MissingExtraError, UsageError, first_line
from bridge.files import atomic_write_bytes
from bridge.locks import file_lock
from bridge.model import ArtifactPayload, RegistryPayload, RunPayload
from bridge.report import RunReport
from exporters.wandb_online import SdkApi

FORMAT = 1  # bump when the way runs are written changes: every run is then rewritten
MARKER = "trackbridge.json"
MAX_LABEL = 64
_BAD_PROJECT = re.compile(r"[/\\#?%:]")
_BAD_ARTIFACT = re.compile(r"[^\w.-]")


def derived_run_id(run_key: str, project: str | None = None) -> str:
    """A W&B run id from the source key: stable, so a second import finds the same run.

    A W&B key of the same project keeps its own id (the dual-logging shim's runs are
    keyed so), so the run is the one a nightly sync of W&B reads back under that key."""
    if project and run_key.startswith(f"wandb:run/{project}/"):
        own = run_key[len(f"wandb:run/{project}/") :]
        if re.fullmatch(r"[a-z0-9]{1,64}", own):
            return own
    return hashlib.sha256(run_key.encode()).hexdigest()[:16]


class _SdkSink:
    """What both W&B destinations share: projects, the run's config and labels, and one
    run written through the SDK. The two differ only in how they know what is there
    already (marker files beside offline folders; the run's own config online) and in
    how a run is opened."""

    def __init__(self, dry_run: bool = False) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise MissingExtraError("wandb", "wandb") from e
        self.dry_run = dry_run
        self._projects: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()  # one SDK run at a time per process
        self.origin: str | None = None  # the source, recorded with each run for verify

    def finish(self) -> None:
        pass

    def write_project(self, row: dict[str, Any]) -> None:
        name = _BAD_PROJECT.sub("-", row["name"])[:128] or "uncategorized"
        # W&B projects are made by the server, so what the SDK cannot set rides along
        # with every run of the project
        kept = {
            "name": row["name"],
            "description": row.get("description"),
            "lifecycle": row.get("lifecycle"),
            "tags": dict(row.get("tags") or []),
        }
        self._projects[row["project_key"]] = (name, kept)

    def _identity(self, payload: RunPayload, report: RunReport) -> tuple[str, str]:
        """The W&B run id and the content fingerprint that says whether it changed."""
        kept_project = self._projects.get(payload.run["project_key"], ("", {}))[1].get("name")
        run_id = derived_run_id(payload.key, kept_project)
        report.destination_id = run_id
        return run_id, f"{payload.content_digest()[:40]}.w{FORMAT}"

    def _project(self, payload: RunPayload, report: RunReport, project: str | None = None) -> dict[str, Any]:
        """The kept source project, and the W&B project name when the URI does not fix one."""
        if payload.run["project_key"] not in self._projects:
            raise DestinationError(
                f"run {payload.key}: its project {payload.run['project_key']} was not imported"
            )
        name, kept = self._projects[payload.run["project_key"]]
        if project is not None:
            if len(self._projects) > 1:
                report.mapped(
                    "project-merged",
                    "projects.name",
                    f"{kept['name']!r} written into W&B project {project!r} with other projects; "
                    "its name is kept in config._trackbridge.project, and a reader sees one project",
                )
        elif name != kept["name"]:
            report.mapped(
                "project-renamed",
                "projects.name",
                f"{kept['name']!r} written as W&B project {name!r}; the name is kept in "
                "config._trackbridge.project",
            )
        return {"name": project or name, "kept": kept}

    def _init_args(
        self, project: dict[str, Any], run_id: str, payload: RunPayload, report: RunReport
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``wandb.init`` arguments for the run, and the ``_trackbridge`` entry among them."""
        run = payload.run
        labels = [str(x) for x in run.get("labels") or []]
        fitted_labels = []
        for label in labels:
            if len(label) > MAX_LABEL:
                report.mapped(
                    "label-truncated", f"runs.labels.{label[:20]}…", "full label in config._trackbridge"
                )
            fitted_labels.append(label[:MAX_LABEL])
        config, conflicts = _config(payload.params)
        for path in conflicts:
            report.mapped("param-conflict", "params." + ".".join(path), "kept in config._trackbridge.params")
        meta = {
            "source_key": payload.key,
            "source": self.origin,
            "project": project["kept"],
            "labels": labels,
            "tags": {t["key"]: t["value"] for t in payload.tags.to_pylist()},
            "summary": [
                {"path": r["path"], "value_json": r["value_json"]} for r in payload.summary.to_pylist()
            ],
            "dataset_inputs": payload.dataset_inputs.to_pylist(),
            "usage": payload.artifact_usage.select(["artifact_key", "direction"]).to_pylist(),
            # params W&B's config cannot hold as they are: a path that is also a namespace,
            # or a type JSON does not tell (Neptune's datetime, string_set)
            "params": [
                p
                for p in payload.params.to_pylist()
                if tuple(p["path"]) in conflicts
                or p["value_type"] != schema.value_type(schema.loads_value(p["value_json"]))
            ],
            # the run files that are the source's; the SDK adds its own (requirements.txt…)
            "run_files": sorted(
                f.path for a in payload.artifacts if a.row["type"] == "run-files" for f in a.files
            ),
            **{k: run.get(k) for k in wc.META_RUN_FIELDS},
            "start_time": _seconds(run.get("start_time")),
            "end_time": _seconds(run.get("end_time")),
        }
        meta = json.loads(json.dumps(meta, default=str))
        config[wc.META_KEY] = meta
        settings = {
            "x_disable_stats": True,
            "x_disable_meta": True,
            "x_disable_machine_info": True,
            "console": "off",
            "save_code": False,
            "disable_git": True,
            "disable_job_creation": True,
            "silent": True,
        }
        args = {
            "project": project["name"],
            "id": run_id,
            "name": run.get("name"),
            "notes": run.get("notes"),
            "tags": fitted_labels,
            "group": run.get("group"),
            "job_type": run.get("job_type"),
            "config": config,
            "settings": settings,
            "reinit": "create_new",
        }
        return args, meta

    def _write(
        self,
        wrun: Any,
        payload: RunPayload,
        history: History,
        report: RunReport,
        after_step: int = -1,
        skip_artifacts: frozenset[str] = frozenset(),
        before_finish: Any = None,
        digest: bool = False,
    ) -> Path:
        """Log the run into an open SDK run and finish it; the folder it was written in.

        ``after_step``: W&B steps up to it are in the run already (a resumed run), so only
        the rows after it are logged."""
        ok = False
        try:
            if history.mapped:
                wrun.define_metric(wc.STEP_AXIS, hidden=True)
                wrun.define_metric("*", step_metric=wc.STEP_AXIS)
                report.mapped(
                    "step-axis",
                    "metrics.step",
                    f"steps are not one increasing sequence; the source step is in {wc.STEP_AXIS!r}",
                )
            for i, (step, stamp, values) in enumerate(history.rows(digest=digest)):
                wstep = i if history.mapped else step
                if wstep <= after_step:
                    continue
                data = dict(values)
                if stamp is not None:
                    data["_timestamp"] = stamp
                if history.mapped:
                    data[wc.STEP_AXIS] = step
                wrun.log(data, step=wstep)
                report.points += len(values)
            files_dir = Path(wrun.dir)
            if history.system is not None:
                target = files_dir / wc.KEPT_METRICS_FILE
                target.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(history.system, target)
                report.mapped(
                    "metrics-kept",
                    "metrics.system/*, metrics._runtime",
                    f"the SDK cannot log these; {history.system.num_rows} point(s) in {wc.KEPT_METRICS_FILE}",
                )
            for art in payload.artifacts:
                if art.row["type"] == "run-files":
                    self._copy_run_files(art, files_dir, report)
                elif art.row["artifact_key"] not in skip_artifacts:
                    self._log_artifact(wrun, art, report)
            if before_finish is not None:
                before_finish(wrun)
            ok = True
        finally:
            status = payload.run.get("status") or "finished"
            wrun.finish(exit_code=0 if ok and status in ("finished", "running", "scheduled") else 1)
        return Path(wrun.dir).parent

    def _copy_run_files(self, art: ArtifactPayload, files_dir: Path, report: RunReport) -> None:
        for f in art.files:
            if f.path == wc.KEPT_METRICS_FILE:
                continue  # ours, written from the metrics
            target = files_dir / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with f.fetch() as local:
                shutil.copyfile(local, target)
            report.files += 1
            report.bytes += int(f.size or target.stat().st_size)

    def _log_artifact(self, wrun: Any, art: ArtifactPayload, report: RunReport) -> None:
        import wandb

        row = art.row
        name, kind = _artifact_name(row)
        if kind != (row.get("type") or "artifact"):
            report.mapped(
                "artifact-type",
                f"artifacts.{row['name']}",
                f"W&B reserves {row['type']!r}: written as {kind}",
            )
        if name != row["name"]:
            report.mapped("artifact-renamed", f"artifacts.{row['name']}", f"written as {name!r}")
        meta = json.loads(row["metadata_json"]) if row.get("metadata_json") else {}
        a = wandb.Artifact(
            name,
            type=kind,
            description=row.get("description"),
            metadata={**(meta if isinstance(meta, dict) else {"value": meta}), wc.META_KEY: {"row": row}},
        )
        for f in art.files:
            if f.uri and f.sha256 is None:
                report.mapped("reference-skipped", f"artifacts.{row['name']}.{f.path}", f"reference {f.uri}")
                continue
            with f.fetch() as local:
                a.add_file(local, name=f.path)  # the SDK copies it to its staging folder now
            report.files += 1
            report.bytes += int(f.size or 0)
        wrun.log_artifact(a, aliases=list(row.get("aliases") or []))

    def write_artifact(self, payload: ArtifactPayload, report: Any) -> None:
        report.errors.append(
            f"artifact {payload.row['artifact_key']}: W&B artifacts belong to a run; "
            "a standalone one has no place in a W&B project"
        )


class WandbOfflineSink(_SdkSink):
    def __init__(self, path: str, dry_run: bool = False) -> None:
        super().__init__(dry_run)
        self.root = Path(path).expanduser().resolve()
        self._index: dict[str, dict[str, Any]] | None = None

    def describe(self) -> str:
        return f"wandb+offline://{self.root}"

    def begin(self, source: str) -> None:
        self.origin = source
        if not self.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)

    def _runs_index(self) -> dict[str, dict[str, Any]]:
        """run id → {"fingerprint": marker's or None, "dirs": [folders]} for our folder."""
        if self._index is None:
            from exporters.wandb import RUN_DIR

            index: dict[str, dict[str, Any]] = {}
            base = self.root / "wandb"
            for d in sorted(base.iterdir()) if base.is_dir() else []:
                if d.is_dir() and RUN_DIR.match(d.name):
                    self._add_folder(index, d)
            self._index = index
        return self._index

    @staticmethod
    def _add_folder(index: dict[str, dict[str, Any]], d: Path) -> None:
        from exporters.wandb import RUN_DIR, _head

        logs = list(d.glob("run-*.wandb"))
        run_id = _head(logs[0]).run_id if logs else RUN_DIR.match(d.name).group(2)  # type: ignore[union-attr]
        entry = index.setdefault(run_id, {"fingerprint": None, "dirs": []})
        entry["dirs"].append(d)
        marker = d / MARKER
        if marker.exists():
            entry["fingerprint"] = json.loads(marker.read_text()).get("fingerprint")

    def _fresh(self, run_id: str) -> dict[str, Any] | None:
        """The run's folders as they are now: another process may have written it since
        the index was read (folders are named ``…-<run id>``, a second one of the same
        second ``…-<run id>-1``; the run id inside the log decides)."""
        from exporters.wandb import RUN_DIR

        index: dict[str, dict[str, Any]] = {}
        for d in sorted((self.root / "wandb").glob(f"*-{run_id}*")):
            if d.is_dir() and RUN_DIR.match(d.name):
                self._add_folder(index, d)
        return index.get(run_id)

    def _run_lock(self, run_id: str) -> Any:
        """One writer per run across processes: a lock file per run id beside the runs."""
        folder = self.root / ".trackbridge-locks"
        folder.mkdir(exist_ok=True)
        return file_lock(folder / f"{run_id}.lock")

    def write_run(self, payload: RunPayload, report: RunReport) -> str:
        run_id, fp = self._identity(payload, report)
        have = self._runs_index().get(run_id)
        if have and have["fingerprint"] == fp:
            return "unchanged"
        outcome = "updated" if have else "new"
        if self.dry_run:
            report.points = sum(b.num_rows for b in payload.metrics())
            return outcome
        project = self._project(payload, report)
        args, _ = self._init_args(project, run_id, payload, report)
        history = _history(payload)
        import wandb

        with self._lock, self._run_lock(run_id):
            have = self._fresh(run_id)
            if have and have["fingerprint"] == fp:
                self._runs_index()[run_id] = have
                return "unchanged"  # written by another process meanwhile
            outcome = "updated" if have else "new"
            for d in have["dirs"] if have else []:
                shutil.rmtree(d)  # the whole run is written again; never two copies
            settings = wandb.Settings(mode="offline", **args.pop("settings"))
            wrun = wandb.init(dir=str(self.root), settings=settings, **args)
            folder = self._write(wrun, payload, history, report)
            atomic_write_bytes(
                folder / MARKER,
                json.dumps({"source_key": payload.key, "fingerprint": fp, "run_id": run_id}).encode(),
            )
            self._runs_index()[run_id] = {"fingerprint": fp, "dirs": [folder]}
        return outcome

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        n = payload.model_versions.num_rows
        if n:
            report.mapped(
                "registry-not-written",
                "model_versions",
                f"{n} model version(s): offline W&B runs cannot hold registry links; "
                "link them after `wandb sync`, or migrate to wandb://",
            )


@dataclass
class WrittenRun:
    """What a W&B project already holds of a run: its ``_trackbridge`` config entry and
    the last ``_step`` of its history (-1 for none)."""

    meta: dict[str, Any] | None
    last_step: int


class WandbWriteApi(Protocol):
    """Everything the online importer asks of W&B beyond the SDK run itself."""

    def ready(self) -> None: ...

    def find_run(self, entity: str, project: str, run_id: str) -> WrittenRun | None: ...

    def init(self, entity: str, **kwargs: Any) -> Any: ...

    def find_artifact(
        self, entity: str, project: str, name: str, kind: str, artifact_key: str
    ) -> str | None: ...

    def link(self, artifact_path: str, target_path: str, aliases: list[str]) -> None: ...


class SdkWriteApi(SdkApi):
    """``WandbWriteApi`` over ``wandb.init`` (online) and the reader's ``wandb.Api``
    handle, with the same retries."""

    def ready(self) -> None:
        """Fail before the first run, in one line, when W&B has no credentials."""
        import wandb

        try:
            self.api  # noqa: B018  (made now: it reads the credentials)
        except wandb.errors.UsageError as e:
            raise UsageError(f"W&B: {first_line(e)} (or set WANDB_API_KEY)") from e

    def find_run(self, entity: str, project: str, run_id: str) -> WrittenRun | None:
        from wandb.apis.public.runs import RunNotFoundError

        def look() -> WrittenRun | None:
            try:
                r = self.api.run(f"{entity}/{project}/{run_id}")
            except RunNotFoundError:
                return None
            meta = (r.config or {}).get(wc.META_KEY)
            return WrittenRun(meta if isinstance(meta, dict) else None, int(r.lastHistoryStep))

        return self.policy.call(look)

    def init(self, entity: str, **kwargs: Any) -> Any:
        import wandb

        settings = wandb.Settings(mode="online", **kwargs.pop("settings"))
        return wandb.init(entity=entity, settings=settings, **kwargs)

    def find_artifact(self, entity: str, project: str, name: str, kind: str, artifact_key: str) -> str | None:
        def look() -> str | None:
            if not self.api.artifact_collection_exists(f"{entity}/{project}/{name}", kind):
                return None
            for a in self.api.artifacts(kind, f"{entity}/{project}/{name}", per_page=100):
                if ((a.metadata or {}).get(wc.META_KEY) or {}).get("row", {}).get(
                    "artifact_key"
                ) == artifact_key:
                    return a.qualified_name
            return None

        return self.policy.call(look)

    def link(self, artifact_path: str, target_path: str, aliases: list[str]) -> None:
        self.policy.call(lambda: self.api.artifact(artifact_path).link(target_path, aliases))


class WandbOnlineSink(_SdkSink):
    """Write runs into a W&B server through the SDK (``wandb://entity[/project]``).

    Identity lives in the run itself: the run id is derived from the source key, and the
    ``_trackbridge`` config entry gets the content fingerprint and a digest of the
    history rows as the last thing before the run finishes. So, with no local state:
    - a run whose fingerprint matches is not touched;
    - a run that changed, or whose import was killed, is resumed (``resume="allow"``)
      and only the history rows after the server's last ``_step`` are logged. Config,
      summary, name and tags are set again; artifacts already logged are not.
    W&B keeps a deleted run's id for 7 days and its rewind is in private preview, so a run
    can only grow: a source whose already-written rows changed is refused with one line,
    never written twice.
    """

    def __init__(self, entity_project: str, api: WandbWriteApi | None = None, dry_run: bool = False) -> None:
        super().__init__(dry_run)
        entity, _, project = entity_project.strip("/").partition("/")
        if not entity or "/" in project:
            raise UsageError(f"wandb://{entity_project}: expected wandb://ENTITY or wandb://ENTITY/PROJECT")
        self.entity, self.project = entity, project or None
        self.api: WandbWriteApi = api or SdkWriteApi()
        # artifact_key → (W&B project, name, type) of the runs' artifacts, for the registry
        self._artifacts: dict[str, tuple[str, str, str]] = {}
        self._scratch: Path | None = None

    def describe(self) -> str:
        return f"wandb://{self.entity}/{self.project or ''}".rstrip("/")

    def begin(self, source: str) -> None:
        self.origin = source
        self.api.ready()
        # the SDK's local copy of each run (its files are uploaded from there at finish);
        # begin may be called twice (migrate checks the destination before its export)
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="trackbridge-wandb-"))

    def finish(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def write_run(self, payload: RunPayload, report: RunReport) -> str:
        run_id, fp = self._identity(payload, report)
        project = self._project(payload, report, self.project)
        for art in payload.artifacts:
            if art.row["type"] != "run-files":
                self._artifacts[art.row["artifact_key"]] = (project["name"], *_artifact_name(art.row))
        have = self.api.find_run(self.entity, project["name"], run_id)
        meta_have = (have.meta or {}) if have else {}
        if have and meta_have.get("fingerprint") == fp:
            return "unchanged"
        outcome = "updated" if have else "new"
        if self.dry_run:
            report.points = sum(b.num_rows for b in payload.metrics())
            return outcome
        args, meta = self._init_args(project, run_id, payload, report)
        history = _history(payload)
        written = meta_have.get("history_digest")
        if written and history.digest(int(meta_have.get("history_rows") or 0)) != written:
            raise DestinationError(
                f"run {payload.key}: history already in W&B run {self.entity}/{project['name']}/{run_id} "
                "differs from the source's; W&B cannot rewrite a run's history, so delete that run and "
                "import into another project"
            )
        after = have.last_step if have else -1
        logged = frozenset(meta_have.get("logged_artifacts") or [])

        def seal(wrun: Any) -> None:
            done = {
                **meta,
                "fingerprint": fp,
                "history_rows": history.count,
                "history_digest": history.full_digest,
                "logged_artifacts": sorted(
                    a.row["artifact_key"] for a in payload.artifacts if a.row["type"] != "run-files"
                ),
            }
            wrun.config.update({wc.META_KEY: done}, allow_val_change=True)

        if have:
            args["resume"] = "allow"
            args["allow_val_change"] = True
            if after >= 0:
                report.mapped("resumed", "metrics", f"W&B run had steps up to {after}; the rest appended")
        with self._lock:
            wrun = self.api.init(self.entity, dir=str(self._scratch), **args)
            self._write(wrun, payload, history, report, after, logged, seal, digest=True)
        return outcome

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        """Link each model version's artifact into the W&B Registry collection of its
        model (``wandb-registry-model/<name>``), with its aliases, and its stage as one."""
        for rm in payload.registered_models.to_pylist():
            if rm.get("description") or rm.get("tags"):
                report.mapped(
                    "registry-model-fields",
                    f"registered_models.{rm['name']}",
                    "the description and tags of a Registry collection are not set through the SDK",
                )
        versions = payload.model_versions.to_pylist()
        # linked in the source's order, so W&B's own numbering keeps it
        versions.sort(key=lambda v: (v["model_name"], int(v["version"]) if v["version"].isdigit() else 0))
        for v in versions:
            label = f"model version {v['model_name']}/{v['version']}"
            if v.get("description") or v.get("tags"):
                report.mapped(
                    "registry-version-fields",
                    f"model_versions.{v['model_name']}.{v['version']}",
                    "a link has no description or tags of its own; the artifact keeps its own",
                )
            key = v.get("artifact_key")
            if key not in self._artifacts:
                report.mapped(
                    "registry-not-linked",
                    f"model_versions.{v['model_name']}.{v['version']}",
                    f"its files are not an artifact ({v.get('source')}); they stay in its run's files",
                )
                continue
            if self.dry_run:  # the runs were not written: nothing to find yet
                report.models["linked"] = report.models.get("linked", 0) + 1
                continue
            project, name, kind = self._artifacts[key]
            path = self.api.find_artifact(self.entity, project, name, kind, key)
            if path is None:
                report.errors.append(f"{label}: artifact {key} was not found in W&B; not linked")
                continue
            aliases = list(v.get("aliases") or [])
            stage = v.get("stage")
            if stage and stage != "None" and stage.lower() not in aliases:
                aliases.append(stage.lower())
            self.api.link(path, f"wandb-registry-model/{_BAD_ARTIFACT.sub('-', v['model_name'])}", aliases)
            report.models["linked"] = report.models.get("linked", 0) + 1
        if payload.model_versions.num_rows:
            report.mapped(
                "registry-version-numbers",
                "model_versions.version",
                "W&B numbers a collection's versions itself (v0, v1…); they are linked in the source's order",
            )


def _seconds(dt: Any) -> float | None:
    return None if dt is None else dt.timestamp()


def _config(params: pa.Table) -> tuple[dict[str, Any], set[tuple[str, ...]]]:
    """Nested config from param paths; a path that is both a leaf and a namespace is
    kept aside rather than overwriting the other."""
    leaves: list[tuple[list[str], Any]] = []
    paths = {tuple(p["path"]) for p in params.to_pylist()}
    conflicts = {p for p in paths if any(q != p and q[: len(p)] == p for q in paths)}
    for p in params.to_pylist():
        if tuple(p["path"]) not in conflicts:
            leaves.append((p["path"], schema.loads_value(p["value_json"])))
    return wc.unflatten(leaves), conflicts


@dataclass
class History:
    """A run's history as the SDK takes it, streamed: memory follows the run's Arrow
    points, never one Python dict per row for the whole run.

    ``points`` holds every point (step, ts in µs or null, key, value, json) in row order:
    by step, timestamp and key, a key's repeats in the order the source gave them. Points
    that share a step and a timestamp become one row, as one ``log`` call made them; a
    key's n-th point at the same step and time goes into that call's n-th row.
    ``mapped`` says the rows' steps are not one increasing sequence (so ``_step`` counts
    rows instead)."""

    points: pa.Table
    mapped: bool
    system: pa.Table | None
    count: int = 0  # rows, once ``rows(digest=True)`` has gone through them
    full_digest: str | None = None

    def rows(
        self, digest: bool = False, chunk: int = 65_536
    ) -> Iterator[tuple[int, float | None, dict[str, Any]]]:
        """(step, _timestamp seconds, values) per row. With ``digest``, ``count`` and
        ``full_digest`` are set once the last row has been handed out."""
        h = self._hasher() if digest else None
        n = 0
        current: tuple[int, int | None] | None = None
        bucket: list[dict[str, Any]] = []

        def emit() -> Iterator[tuple[int, float | None, dict[str, Any]]]:
            assert current is not None
            step, ts = current
            for values in bucket:
                row = (step, None if ts is None else ts / 1_000_000, values)
                if h is not None:
                    h.update(_row_bytes(row))
                yield row

        for off in range(0, self.points.num_rows, chunk):
            part = self.points.slice(off, chunk)
            cols = [part.column(c).to_pylist() for c in ("step", "ts", "key", "value", "json")]
            for step, ts, key, value, text in zip(*cols, strict=True):
                if (step, ts) != current:
                    if bucket:
                        n += len(bucket)
                        yield from emit()
                    current, bucket = (step, ts), []
                v = value if text is None else json.loads(text)
                for r in bucket:
                    if key not in r:
                        r[key] = v
                        break
                else:
                    bucket.append({key: v})
        if bucket:
            n += len(bucket)
            yield from emit()
        if h is not None:
            self.count, self.full_digest = n, h.hexdigest()

    def digest(self, n: int) -> str:
        """Of the first ``n`` rows as W&B holds them: a resumed run may only grow, so the
        rows already written must be the same ones."""
        h = self._hasher()
        for row in itertools.islice(self.rows(), n):
            h.update(_row_bytes(row))
        return h.hexdigest()

    def _hasher(self) -> Any:
        return hashlib.sha256(b"mapped" if self.mapped else b"steps")


def _row_bytes(row: tuple[int, float | None, dict[str, Any]]) -> bytes:
    return json.dumps(row, sort_keys=True, default=str).encode()


def _artifact_name(row: dict[str, Any]) -> tuple[str, str]:
    """The W&B name and type an artifact is logged under."""
    kind = row.get("type") or "artifact"
    if kind in wc.RESERVED_ARTIFACT_TYPES:
        kind = f"trackbridge-{kind}"
    return _BAD_ARTIFACT.sub("-", row["name"] or "artifact"), kind


def _history(payload: RunPayload) -> History:
    """The run's points in row order (see ``History``), with system metrics set aside."""
    parts, system = [], []
    for batch in payload.metrics():
        keys_col = batch.column("key")
        aside = pc.or_(pc.starts_with(keys_col, "system/"), pc.equal(keys_col, "_runtime"))
        if pc.any(aside).as_py():
            system.append(batch.filter(aside))
            batch = batch.filter(pc.invert(aside))
        parts.append(_points(batch, batch.column("value"), pa.nulls(batch.num_rows, pa.string())))
    series = payload.series
    parts.append(_points(series, pa.nulls(series.num_rows, pa.float64()), series.column("value_json")))
    points = pa.concat_tables(parts).combine_chunks()
    n = points.num_rows
    sort = pa.table(
        {
            "step": points.column("step"),
            "ts": pc.fill_null(points.column("ts"), -1),
            "key": points.column("key"),
            "order": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    order = pc.sort_indices(sort, [(c, "ascending") for c in sort.column_names])
    sort = sort.select(["step", "ts", "key"]).take(order)
    # one row per step, in increasing order, unless a step is negative, has two times, or
    # has a key twice at one time (each makes a second row for that step)
    step, ts, key = (sort.column(c) for c in ("step", "ts", "key"))
    mapped = n > 0 and (
        pc.min(step).as_py() < 0
        or (
            n > 1
            and pc.any(
                pc.and_(
                    pc.equal(step.slice(1), step.slice(0, n - 1)),
                    pc.or_(
                        pc.not_equal(ts.slice(1), ts.slice(0, n - 1)),
                        pc.equal(key.slice(1), key.slice(0, n - 1)),
                    ),
                )
            ).as_py()
        )
    )
    del sort, step, ts, key  # before the points are copied: one sorted copy at a time
    sys_tbl = pa.Table.from_batches(system) if system else None
    return History(points.take(order), bool(mapped), sys_tbl)


def _points(tbl: pa.Table | pa.RecordBatch, value: Any, text: Any) -> pa.Table:
    """Metrics (a float value) or series (a JSON text) as ``History.points`` rows."""
    return pa.table(
        {
            "step": tbl.column("step"),
            # µs as integers: a float round trip could split a row
            "ts": tbl.column("timestamp").cast(pa.int64()),
            "key": tbl.column("key"),
            "value": value,
            "json": text,
        }
    )
