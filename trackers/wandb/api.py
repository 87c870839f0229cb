"""W&B's online API behind a small interface (``WandbApi``), shared by the online
reader and writer. ``SdkApi`` is the real one, over ``wandb.Api`` with trackbridge's
retries; tests put fakes built from the SDK's own objects in its place (``wandb.Api``
runs through the bundled wandb-core binary, which no HTTP mock can intercept).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from trackbridge.errors import MissingExtraError
from trackbridge.retry import RetryPolicy

EVENTS_FILE = "wandb-events.jsonl"


@dataclass
class Entry:
    """One file of a logged artifact, as its manifest lists it."""

    path: str
    size: int | None
    md5: str | None  # base64, as W&B gives it
    ref: str | None = None


@dataclass
class Link:
    """An artifact version linked into a W&B Registry collection or the legacy model registry."""

    registry: str  # "model" for wandb-registry-model; "model-registry" for the legacy one
    collection: str
    version: str  # "v3"
    aliases: list[str] = field(default_factory=list)
    created_at: datetime | None = None


@dataclass
class ArtifactInfo:
    """A logged artifact version. The SDK cannot build a logged ``Artifact`` without a
    server, so the interface hands over these fields rather than the object."""

    project: str
    name: str  # without ":v3"
    version: str | None
    type: str
    digest: str
    aliases: list[str]
    description: str | None
    metadata: dict[str, Any]
    created_at: datetime | None
    entries: list[Entry]
    links: list[Link] = field(default_factory=list)
    handle: Any = None  # the SDK object, for downloads


@dataclass
class SweepInfo:
    """A sweep as the server knows it: its definition and best run live only there."""

    sweep_id: str
    name: str | None = None
    config: dict[str, Any] | None = None  # the definition, as ``wandb.sweep`` took it
    state: str | None = None
    created_at: datetime | None = None
    best_run_id: str | None = None
    best_run_name: str | None = None
    best_value: float | None = None  # the best run's value of the sweep's metric


class WandbApi(Protocol):
    """Everything trackbridge asks of W&B online. Runs and files are ``wandb.apis.public``
    objects; artifacts are ``ArtifactInfo``."""

    def projects(self, entity: str) -> list[str]: ...

    def runs(self, entity: str, project: str) -> Iterable[Any]: ...

    def scan_history(self, run: Any) -> Iterator[dict[str, Any]]: ...

    def files(self, run: Any) -> list[Any]: ...

    def download_file(self, run: Any, file: Any, folder: str) -> str: ...

    def logged_artifacts(self, run: Any) -> list[ArtifactInfo]: ...

    def used_artifacts(self, run: Any) -> list[ArtifactInfo]: ...

    def download_entry(self, art: ArtifactInfo, path: str, folder: str) -> str: ...

    def sweep(self, entity: str, project: str, sweep_id: str) -> SweepInfo | None: ...


class SdkApi:
    """``WandbApi`` over ``wandb.Api``; every call retried under ``RetryPolicy``."""

    def __init__(self, policy: RetryPolicy | None = None) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise MissingExtraError("wandb", "wandb") from e
        self.policy = policy or RetryPolicy()
        self._api: Any = None

    @property
    def api(self) -> Any:
        """``wandb.Api``, made on first use: it reads the credentials then."""
        if self._api is None:
            import wandb

            self._api = self.policy.call(wandb.Api, timeout=60)
        return self._api

    def projects(self, entity: str) -> list[str]:
        return self.policy.call(lambda: [p.name for p in self.api.projects(entity)])

    def runs(self, entity: str, project: str) -> Iterable[Any]:
        return self.policy.call(lambda: list(self.api.runs(f"{entity}/{project}", per_page=500)))

    def scan_history(self, run: Any) -> Iterator[dict[str, Any]]:
        # A failed page is retried from the step after the last row we got, so a retry
        # neither repeats nor skips a row.
        last = -1
        for attempt in self.policy.retrying():
            with attempt:
                for row in run.scan_history(page_size=1000, min_step=last + 1):
                    last = int(row.get("_step", last + 1))
                    yield row

    def files(self, run: Any) -> list[Any]:
        return self.policy.call(lambda: list(run.files()))

    def download_file(self, run: Any, file: Any, folder: str) -> str:
        return self.policy.call(lambda: file.download(root=folder, replace=True).name)

    def _info(self, a: Any) -> ArtifactInfo:
        name, _, version = a.name.partition(":")
        links = []
        for linked in getattr(a, "linked_artifacts", None) or []:
            coll, _, lv = linked.name.partition(":")
            registry = linked.project.removeprefix("wandb-registry-")
            links.append(Link(registry, coll, lv, [x for x in linked.aliases if x != "latest"], None))
        return ArtifactInfo(
            project=a.project,
            name=name,
            version=version or a.version,
            type=a.type,
            digest=a.digest,
            aliases=[x for x in a.aliases if x != "latest"],
            description=a.description,
            metadata=dict(a.metadata or {}),
            created_at=wandb_time(a.created_at),
            entries=[Entry(p, e.size, e.digest, e.ref) for p, e in a.manifest.entries.items()],
            links=links,
            handle=a,
        )

    def logged_artifacts(self, run: Any) -> list[ArtifactInfo]:
        return self.policy.call(lambda: [self._info(a) for a in run.logged_artifacts()])

    def used_artifacts(self, run: Any) -> list[ArtifactInfo]:
        return self.policy.call(lambda: [self._info(a) for a in run.used_artifacts()])

    def download_entry(self, art: ArtifactInfo, path: str, folder: str) -> str:
        return self.policy.call(lambda: art.handle.get_entry(path).download(root=folder))

    def sweep(self, entity: str, project: str, sweep_id: str) -> SweepInfo | None:
        def ask() -> SweepInfo | None:
            sweep = self.api.sweep(f"{entity}/{project}/{sweep_id}")
            # the best run as W&B's sweep page ranks them: by the metric and goal of the config
            best = sweep.best_run() if sweep is not None and sweep.order else None
            return sweep_info(sweep, best)

        return self.policy.call(ask)


def sweep_info(sweep: Any, best: Any) -> SweepInfo | None:
    """``SweepInfo`` from a ``wandb.apis.public.Sweep`` and its best ``Run`` (or None)."""
    if sweep is None:
        return None
    config = dict(sweep.config or {})
    info = SweepInfo(
        sweep.id,
        name=sweep.name,
        config=config,
        state=sweep._attrs.get("state"),
        created_at=wandb_time(sweep._attrs.get("createdAt")),
    )
    metric = config.get("metric") or {}
    if best is not None:
        info.best_run_id, info.best_run_name = best.id, best.display_name
        value = (best.summary_metrics or {}).get(metric.get("name")) if isinstance(metric, dict) else None
        info.best_value = float(value) if isinstance(value, int | float) else None
    return info


def wandb_time(value: Any) -> datetime | None:
    """W&B gives ISO times, with or without a zone (UTC either way)."""
    if value is None or value == "":
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
