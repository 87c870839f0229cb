"""Runs into a W&B server through the SDK (``wandb://entity[/project]``), resumed and
appended to when they changed, and model versions linked into the W&B Registry.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from trackbridge.errors import DestinationError, UsageError, first_line
from trackbridge.importers.wandb.history import history_of, with_links
from trackbridge.importers.wandb.sink import BAD_ARTIFACT, SdkSink, artifact_name
from trackbridge.model import RegistryPayload, RunPayload
from trackbridge.report import RunReport
from trackbridge.trackers.wandb import common as wc
from trackbridge.trackers.wandb.api import SdkApi
from trackbridge.write import Found


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


class WandbOnlineSink(SdkSink):
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

    # -- the write template's primitives (trackbridge.write)

    def find(self, payload: RunPayload, report: RunReport) -> Found | None:
        run_id = self._run_id(payload, report)
        project = self.project or self._projects.get(payload.run["project_key"], ("", {}))[0]
        for art in payload.artifacts:
            if art.row["type"] != "run-files":
                self._artifacts[art.row["artifact_key"]] = (project, *artifact_name(art.row))
        have = self.api.find_run(self.entity, project, run_id) if project else None
        if have is None:
            return None
        return Found(run_id, (have.meta or {}).get("fingerprint"), state=have)

    def exclusive(self, payload: RunPayload) -> Any:
        return self._lock  # the SDK writes one run at a time in a process

    def settle(self, payload: RunPayload, found: Found | None, report: RunReport) -> Found:
        return found or Found(self._run_id(payload, report), None, existed=False)

    def fit(self, payload: RunPayload, found: Found | None, report: RunReport) -> Any:
        project = self._project(payload, report, self.project)
        args, meta = self._init_args(project, self._run_id(payload, report), payload, report)
        return project, args, meta

    def write(self, payload: RunPayload, run: Found, fitted: Any, report: RunReport) -> None:
        project, args, meta = fitted
        have = run.state if run.existed else None
        meta_have = (have.meta or {}) if have else {}
        history = history_of(payload)
        args = with_links(args, history)
        meta = args["config"][wc.META_KEY]
        written = meta_have.get("history_digest")
        if written and history.digest(int(meta_have.get("history_rows") or 0)) != written:
            raise DestinationError(
                f"run {payload.key}: history already in W&B run {self.entity}/{project['name']}/{run.id} "
                "differs from the source's; W&B cannot rewrite a run's history, so delete that run and "
                "import into another project"
            )
        after = have.last_step if have else -1
        logged = frozenset(meta_have.get("logged_artifacts") or [])
        if have:
            args["resume"] = "allow"
            args["allow_val_change"] = True
            if after >= 0:
                report.mapped("resumed", "metrics", f"W&B run had steps up to {after}; the rest appended")
        wrun = self.api.init(self.entity, dir=str(self._scratch), **args)
        self._log(wrun, payload, history, report, after, logged, digest=True)
        run.state = (wrun, history, meta)

    def seal(self, payload: RunPayload, run: Found, fingerprint: str, report: RunReport) -> None:
        """The fingerprint goes into the run's config as the last thing before it finishes
        (the SDK takes config only while the run is open)."""
        wrun, history, meta = run.state
        done = {
            **meta,
            "fingerprint": fingerprint,
            "history_rows": history.count,
            "history_digest": history.full_digest,
            "logged_artifacts": sorted(
                a.row["artifact_key"] for a in payload.artifacts if a.row["type"] != "run-files"
            ),
        }
        try:
            wrun.config.update({wc.META_KEY: done}, allow_val_change=True)
        except BaseException:
            wrun.finish(exit_code=1)
            raise
        self._finish(wrun, payload)

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
            self.api.link(path, f"wandb-registry-model/{BAD_ARTIFACT.sub('-', v['model_name'])}", aliases)
            report.models["linked"] = report.models.get("linked", 0) + 1
        if payload.model_versions.num_rows:
            report.mapped(
                "registry-version-numbers",
                "model_versions.version",
                "W&B numbers a collection's versions itself (v0, v1…); they are linked in the source's order",
            )
