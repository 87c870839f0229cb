"""A drop-in for the part of the ``wandb`` module most training code uses.

Change one line, ``import wandb`` → ``import trackbridge.wandb_compat as wandb``, and the
script logs through the shim: to W&B (an offline run, for ``wandb sync``) and to MLflow,
or wherever ``$TRACKBRIDGE_TO`` says.

Covered, with W&B's meaning: ``init`` (project, entity, name, config, tags, group,
job_type, notes, id, dir), ``log`` (with or without ``step``, ``commit``), ``config``
(item, attribute and ``update``), ``summary`` (item and ``update``), ``finish``
(``exit_code``), ``define_metric``, ``Artifact`` (``add_file``, ``add_dir``) and
``log_artifact`` (an ``Artifact`` or a path, with aliases), and ``run`` / ``run.id``.
Media objects (``wandb.Image``…), tables, sweeps and the public API are not covered:
use ``wandb`` itself for those. Values that are not numbers are logged as series
values (their JSON, or their text).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trackbridge import shim

run: shim.Run | None = None


class _Proxy:
    """``wandb.config`` / ``wandb.summary`` before and after ``init``."""

    def __init__(self, attr: str) -> None:
        self._attr = attr

    def _target(self) -> Any:
        if run is None:
            raise RuntimeError(f"wandb.{self._attr} used before wandb.init()")
        return getattr(run, self._attr)

    def __getitem__(self, k: str) -> Any:
        return self._target()[k]

    def __setitem__(self, k: str, v: Any) -> None:
        self._target()[k] = v

    def __getattr__(self, k: str) -> Any:
        return getattr(self._target(), k)

    def __setattr__(self, k: str, v: Any) -> None:
        if k.startswith("_"):
            object.__setattr__(self, k, v)
        else:
            self._target()[k] = v

    def update(self, *a: Any, **kw: Any) -> None:
        self._target().update(*a, **kw)


config = _Proxy("config")
summary = _Proxy("summary")


def init(
    project: str | None = None,
    entity: str | None = None,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    tags: Iterable[str] | None = None,
    group: str | None = None,
    job_type: str | None = None,
    notes: str | None = None,
    id: str | None = None,
    dir: str | os.PathLike[str] | None = None,
    **ignored: Any,
) -> shim.Run:
    """As ``wandb.init``; destinations are ``$TRACKBRIDGE_TO``, else a W&B offline run in
    ``dir`` (default: here) and MLflow's default local SQLite store."""
    global run
    if run is not None and not run.finished:
        run.finish()
    to = (
        shim.default_destinations()
        if os.environ.get(shim.ENV_TO)
        else [
            *shim.default_destinations(),
            f"wandb+offline://{Path(dir or os.getcwd()).resolve()}",
        ]
    )
    run = shim.init(
        project=project or os.environ.get("WANDB_PROJECT") or "uncategorized",
        name=name,
        config=config,
        to=to,
        id=id,
        tags=tags,
        group=group,
        job_type=job_type,
        notes=notes,
    )
    return run


def log(data: Mapping[str, Any], step: int | None = None, commit: bool = True) -> None:
    _run().log(data, step=step, commit=commit)


def define_metric(name: str, step_metric: str | None = None, **options: Any) -> None:
    _run().define_metric(name, step_metric=step_metric, **options)


def finish(exit_code: int | None = None, quiet: bool | None = None) -> None:
    global run
    if run is not None:
        run.finish(exit_code=exit_code or 0, quiet=bool(quiet))
        run = None


class Artifact:
    """As ``wandb.Artifact``: files gathered now, logged by ``log_artifact``."""

    def __init__(
        self,
        name: str,
        type: str,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.description = description
        self.metadata = dict(metadata or {})
        self._dir = Path(tempfile.mkdtemp(prefix="trackbridge-artifact-"))

    def add_file(self, local_path: str, name: str | None = None) -> None:
        target = self._dir / (name or Path(local_path).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, target)

    def add_dir(self, local_path: str, name: str | None = None) -> None:
        shutil.copytree(local_path, self._dir / (name or ""), dirs_exist_ok=True)


def log_artifact(
    artifact_or_path: Artifact | str | os.PathLike[str],
    name: str | None = None,
    type: str | None = None,
    aliases: Iterable[str] | None = None,
) -> None:
    r = _run()
    if isinstance(artifact_or_path, Artifact):
        a = artifact_or_path
        try:
            r.log_artifact(
                a._dir,
                name=a.name,
                type=a.type,
                aliases=aliases or (),
                description=a.description,
                metadata=a.metadata,
            )
        finally:
            shutil.rmtree(a._dir, ignore_errors=True)
    else:
        r.log_artifact(artifact_or_path, name=name, type=type or "model", aliases=aliases or ())


def _run() -> shim.Run:
    if run is None:
        raise RuntimeError("call wandb.init() first")
    return run
