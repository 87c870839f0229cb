"""Read a folder of TensorBoard event files (``tensorboard:///PATH``) into the neutral
schema.

Runs are grouped as TensorBoard groups them: each folder holding
``events.out.tfevents.*`` files is one run, named by its path under PATH (the top folder
itself, when it holds some, by its own name), and PATH is the project. A run's files
(a job restarted in the same folder writes a new one) are read in the order they were
started, which the timestamp in their names records. A file cut off mid-record (a
killed job) gives every whole record and marks the run incomplete; a checksum that does
not match fails that run with one line naming the file and the byte, and the other runs
still move, as for ``.wandb`` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trackbridge import schema
from trackbridge.errors import MissingExtraError, SourceNotFoundError
from trackbridge.exporters.tensorboard import events as ev
from trackbridge.files import bytes_fetch
from trackbridge.model import (
    TOKEN,
    ArtifactPayload,
    FileRef,
    RegistryPayload,
    RunPayload,
    Selection,
    TrackerSource,
    file_token,
    named_projects,
)
from trackbridge.trackers import tensorboard as tb
from trackbridge.trackers.tensorboard.tfrecord import read_records

# events.out.tfevents.<seconds>.<host>[.<pid>.<n>][.v2]
_NAME = re.compile(r"^events\.out\.tfevents\.(\d+)\.(.*?)(?:\.\d+\.\d+)?(?:\.v2)?$")


@dataclass
class _Found:
    rel: str  # the folder under the root, "." for the root itself
    folder: Path
    files: list[Path]

    def host(self) -> str | None:
        m = _NAME.match(self.files[0].name)
        return m.group(2) if m and m.group(2) else None


def _started(p: Path) -> tuple[int, list[tuple[int, int | str]]]:
    """A file's start second, then its name with numbers compared as numbers: a restart
    in the same second has the next counter (``.1`` after ``.0``, ``.10`` after ``.9``)."""
    m = _NAME.match(p.name)
    parts = [(0, int(x)) if x.isdigit() else (1, x) for x in p.name.split(".")]
    return (int(m.group(1)) if m else 0, parts)


class TensorBoardSource(TrackerSource):
    def __init__(self, path: str, safe: str | None = None) -> None:
        try:
            import tensorboard.compat.proto.event_pb2  # noqa: F401  (TensorBoard's own classes)
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise MissingExtraError("tensorboard", "tensorboard") from e
        self.root = Path(path).expanduser()
        self.safe = safe or str(self.root)
        if not self.root.is_dir():
            raise SourceNotFoundError(f"tensorboard://{self.safe}: no such folder {self.root}")
        self.project = self.root.resolve().name or "tensorboard"
        self._origin: dict[str, str] = {}
        self._runs = self._discover()
        if not self._runs:
            raise SourceNotFoundError(
                f"tensorboard://{self.safe}: no TensorBoard event files here "
                f"(looked for {tb.EVENTS_PREFIX}* at any depth)"
            )

    def describe(self) -> str:
        return f"tensorboard://{self.safe}"

    def _discover(self) -> dict[str, _Found]:
        found: dict[str, _Found] = {}
        # never follow a link out of the folder: event files are untrusted input
        for parent, dirs, files in os.walk(self.root, followlinks=False):
            dirs.sort()
            logs = sorted(
                (Path(parent) / f for f in files if f.startswith(tb.EVENTS_PREFIX)),
                key=_started,
            )
            logs = [p for p in logs if p.is_file() and not p.is_symlink()]
            if logs:
                rel = Path(parent).relative_to(self.root).as_posix()
                found[tb.run_key(self.project, rel)] = _Found(rel, Path(parent), logs)
        return found

    def projects(self, sel: Selection) -> list[dict[str, Any]]:
        return named_projects(sel, [self.project], "tensorboard", tb.project_key)

    def runs(self, sel: Selection, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if tb.project_key(self.project) not in {p["project_key"] for p in projects}:
            return []
        out = []
        for key, f in self._runs.items():
            started = _started(f.files[0])[0]
            row = {
                "run_key": key,
                "project_key": tb.project_key(self.project),
                "source_id": f.rel,
                "name": self.project if f.rel == "." else f.rel,
                "start_time": datetime.fromtimestamp(started, tz=UTC) if started else None,
                "lifecycle": "active",
                "labels": [],
                **file_token("tensorboard", f.files),
            }
            if sel.wants_run(row):
                out.append(row)
        return sorted(out, key=lambda r: r["run_key"])

    def read_run(self, run: dict[str, Any]) -> RunPayload:
        f = self._runs[run["run_key"]]
        key = run["run_key"]
        got = ev.Events()
        digest = hashlib.sha256()
        notes: list[tuple[str, str, str]] = []
        incomplete = False
        for path in f.files:
            records = read_records(path)
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(records.data).digest())
            ev.read_events(records, got)
            if records.truncated_at is not None:
                incomplete = True
                notes.append(
                    (
                        "source-truncated",
                        "runs",
                        f"{path.name} ends mid-record at byte {records.truncated_at} (a job cut "
                        "off while writing): every whole record before it moved",
                    )
                )
        for what, n in sorted(got.skipped.items()):
            notes.append(("not-carried", what, f"{n} left out: not tracking data trackbridge carries"))
        image_rows, blobs = ev.image_rows(got.images)
        series_rows = [{"run_key": key, **r} for r in [*got.series, *image_rows]]
        for r in series_rows:
            r["timestamp"] = schema.us_to_dt(r["timestamp"])
        tags = {}
        if got.file_version:
            tags["tensorboard.file_version"] = got.file_version
        if got.hparam_metrics:
            tags["tensorboard.hparams.metrics"] = json.dumps(got.hparam_metrics, ensure_ascii=False)
        row = {
            **{k: v for k, v in run.items() if k in schema.SCHEMAS["runs"].names},
            "start_time": schema.us_to_dt(got.first_us) or run.get("start_time"),
            "end_time": schema.us_to_dt(got.last_us),
            "status": "finished",
            "host": f.host(),
            "source_incomplete": incomplete or None,
        }
        files = ArtifactPayload(
            row={
                "artifact_key": f"{key}#files",
                "project_key": run["project_key"],
                "name": "run-files",
                "type": "run-files",
                "aliases": [],
                "producer_run_key": key,
            },
            files=[
                FileRef(path=p, size=len(data), sha256=None, fetch=bytes_fetch(data))
                for p, data in sorted(blobs.items())
            ],
        )
        metrics = got.metrics(key)
        return RunPayload(
            run=row,
            params=schema.table("params", ev.hparams_params(key, got.hparams)),
            tags=schema.table(
                "tags", [{"run_key": key, "key": k, "value": v} for k, v in sorted(tags.items())]
            ),
            metrics=lambda: iter(metrics.to_batches(max_chunksize=65536)),
            series=schema.table("series", sorted(series_rows, key=lambda r: (r["key"], r["step"]))),
            artifacts=[files] if files.files else [],
            fingerprint=digest.hexdigest(),
            source_notes=notes,
            token=run.get(TOKEN),
        )

    def artifacts(self, sel: Selection, projects: list[dict[str, Any]]) -> Iterator[ArtifactPayload]:
        return iter(())

    def registry(self, sel: Selection) -> RegistryPayload:
        return RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions"))
