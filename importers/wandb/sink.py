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
  summary go into the ``_trackbridge`` config entry (``trackbridge.trackers.wandb.common``).
- System metrics cannot be logged, and the SDK overwrites ``_runtime``: those points
  are kept in the run file ``trackbridge/kept-metrics.parquet``.
- W&B-reserved artifact types (``run_table``, ``job``) are written as
  ``trackbridge-<type>``; the source row rides in the artifact's metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from trackbridge import schema
from trackbridge.errors import DestinationError, MissingExtraError
from trackbridge.importers.wandb import media
from trackbridge.importers.wandb.history import History
from trackbridge.model import ArtifactPayload, RunPayload
from trackbridge.report import RunReport
from trackbridge.trackers.wandb import TRACKER
from trackbridge.trackers.wandb import common as wc
from trackbridge.write import UNCHANGED, RunWriter

# bump when the way runs are written changes: every run is then rewritten
# (2: key/value tags in config, nested runs grouped, model links of points kept;
# 3: searches kept with their trials, images and tables drawn, decimal-step axes)
FORMAT = 3
MARKER = "trackbridge.json"
MAX_LABEL: int = TRACKER.capabilities.limits.tag_value_chars  # type: ignore[assignment]  # W&B tags
BAD_PROJECT = re.compile(r"[/\\#?%:]")
BAD_ARTIFACT = re.compile(r"[^\w.-]")


def derived_run_id(run_key: str, project: str | None = None) -> str:
    """A W&B run id from the source key: stable, so a second import finds the same run.

    A W&B key of the same project keeps its own id (the dual-logging shim's runs are
    keyed so), so the run is the one a nightly sync of W&B reads back under that key."""
    if project and run_key.startswith(f"wandb:run/{project}/"):
        own = run_key[len(f"wandb:run/{project}/") :]
        if re.fullmatch(r"[a-z0-9]{1,64}", own):
            return own
    return hashlib.sha256(run_key.encode()).hexdigest()[:16]


class SdkSink(RunWriter):
    """What both W&B destinations share: projects, the run's config and labels, and one
    run written through the SDK. The two differ only in how they know what is there
    already (marker files beside offline folders; the run's own config online) and in
    how a run is opened; the write protocol is the template's (trackbridge.write)."""

    FORMAT = f"w{FORMAT}"

    def __init__(self, dry_run: bool = False) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise MissingExtraError("wandb", "wandb") from e
        self.dry_run = dry_run
        self._projects: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()  # one SDK run at a time per process
        self.origin: str | None = None  # the source, recorded with each run for verify
        self.notices: list[tuple[str, str, str]] = []
        self._nest_groups: dict[str, str] = {}  # run key -> the W&B group of its nesting
        self._sweeps: dict[str, dict[str, Any]] = {}  # search key -> kept with its trials

    def expect_runs(self, runs: list[dict[str, Any]]) -> None:
        """A nested family (an MLflow parent run and its children, as a hyperparameter
        search logs them) or a search with its trials becomes one W&B run group, named
        after the top parent, so a W&B user sees the search together; a run with a group
        of its own keeps it."""
        by_key = {r["run_key"]: r for r in runs}
        parents = {schema.depends_on(r) for r in runs} - {None}

        def top(key: str) -> str:
            seen = {key}
            while (p := schema.depends_on(by_key[key])) in by_key and p not in seen:
                key = p
                seen.add(p)
            return key

        for r in runs:
            if r.get("group") or not (r["run_key"] in parents or schema.depends_on(r) in by_key):
                continue
            root = by_key[top(r["run_key"])]
            self._nest_groups[r["run_key"]] = root.get("name") or root.get("source_id") or root["run_key"]

    def write_run(self, payload: RunPayload, report: Any) -> str:
        """A search (a sweep's own row) is no W&B run: only W&B's sweep controller makes
        sweeps. It is kept with each of its trials (``_trackbridge.sweep``), which a W&B
        reader turns back into the search, and the trials are grouped under its name."""
        if not schema.is_sweep(payload.run):
            return super().write_run(payload, report)
        self._sweeps[payload.key] = wc.kept_sweep(payload)
        report.mapped(
            "search-on-trials",
            "runs",
            f"search {payload.run.get('name')!r} is kept with its trials (config._trackbridge.sweep) "
            "and they are one W&B group: W&B makes sweeps only through its sweep controller",
        )
        return UNCHANGED

    def finish(self) -> None:
        pass

    def write_project(self, row: dict[str, Any]) -> None:
        name = BAD_PROJECT.sub("-", row["name"])[:128] or "uncategorized"
        # W&B projects are made by the server, so what the SDK cannot set rides along
        # with every run of the project
        kept = {
            "name": row["name"],
            "description": row.get("description"),
            "lifecycle": row.get("lifecycle"),
            "tags": dict(row.get("tags") or []),
        }
        self._projects[row["project_key"]] = (name, kept)

    def _run_id(self, payload: RunPayload, report: RunReport | None = None) -> str:
        """The W&B run id: derived from the source key, so a second import finds it."""
        kept_project = self._projects.get(payload.run["project_key"], ("", {}))[1].get("name")
        run_id = derived_run_id(payload.key, kept_project)
        if report is not None:
            report.destination_id = run_id
        return run_id

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
        config, conflicts = config_of(payload.params)
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
            "start_time": wc.dt_to_seconds(run.get("start_time")),
            "end_time": wc.dt_to_seconds(run.get("end_time")),
        }
        drawn = media.foreign_media(payload)
        if drawn:  # images and tables W&B draws itself: the rows as they were, for the reader
            meta["native_series"] = media.kept_rows(drawn)
        meta = json.loads(json.dumps(meta, default=str))
        taken = {p[0] for p in payload.params.column("path").to_pylist() if p}
        # key/value tags (MLflow's) where a W&B user filters: config, under "tags"; MLflow's
        # own (mlflow.*) hold what W&B shows as the run's name, user, parent, notes, source
        shown = {k: v for k, v in meta["tags"].items() if not k.startswith("mlflow.")}
        if shown and wc.TAGS_CONFIG not in taken:
            config[wc.TAGS_CONFIG] = shown
            meta["tags_in_config"] = True
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
        sweep = run.get("sweep_key")
        if sweep and sweep != payload.key:
            meta["sweep"] = self._sweeps.get(sweep) or {"key": sweep, "row": {}}
        group = run.get("group")
        if not group and payload.key in self._nest_groups:
            group = self._nest_groups[payload.key]
            meta["nested_group"] = True  # the source had none: the exporter takes it out
            field = "runs.parent_run_key" if run.get("parent_run_key") else "runs.sweep_key"
            report.mapped("nesting-as-group", field, f"nested runs are W&B group {group!r}")
        args = {
            "project": project["name"],
            "id": run_id,
            "name": run.get("name"),
            "notes": run.get("notes"),
            "tags": fitted_labels,
            "group": group,
            "job_type": run.get("job_type"),
            "config": config,
            "settings": settings,
            "reinit": "create_new",
        }
        return args, meta

    def _log(
        self,
        wrun: Any,
        payload: RunPayload,
        history: History,
        report: RunReport,
        after_step: int = -1,
        skip_artifacts: frozenset[str] = frozenset(),
        digest: bool = False,
    ) -> None:
        """Log the run into an open SDK run; on failure, finish it as failed.

        ``after_step``: W&B steps up to it are in the run already (a resumed run), so only
        the rows after it are logged."""
        try:
            if history.mapped:
                wrun.define_metric(wc.STEP_AXIS, hidden=True)
                wrun.define_metric("*", step_metric=wc.STEP_AXIS)
                report.mapped(
                    "step-axis",
                    "metrics.step",
                    f"steps are not one increasing sequence; the source step is in {wc.STEP_AXIS!r}",
                )
            for key, axis in history.axes.items():
                wrun.define_metric(axis, hidden=True)
                wrun.define_metric(key, step_metric=axis)
                report.mapped(
                    "decimal-step-axis",
                    f"metrics.{key}",
                    f"logged at decimal steps: charted on its own x-axis {axis!r} (the exact step), "
                    "after the run's other rows, whose steps are untouched",
                )
            drawn = media.foreign_media(payload)
            if drawn:
                report.mapped(
                    "media-as-wandb",
                    "series",
                    f"{len(drawn)} image(s) and table(s) as wandb.Image and wandb.Table at their step",
                )
            for i, (step, stamp, values) in enumerate(history.rows(digest=digest)):
                wstep = i if history.mapped else step
                if wstep <= after_step:
                    continue
                stack = contextlib.ExitStack()
                data = media.as_wandb(values, step, drawn, stack, report) if drawn else dict(values)
                if stamp is not None:
                    data["_timestamp"] = stamp
                if history.mapped:
                    data.setdefault(wc.STEP_AXIS, step)  # a decimal key's row holds its own
                with stack:  # the media files stay until the SDK has copied them
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
        except BaseException:
            wrun.finish(exit_code=1)
            raise

    @staticmethod
    def _finish(wrun: Any, payload: RunPayload) -> Path:
        """Finish the SDK run with the source's outcome; the folder it was written in."""
        status = payload.run.get("status") or "finished"
        wrun.finish(exit_code=0 if status in ("finished", "running", "scheduled") else 1)
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
        name, kind = artifact_name(row)
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


def config_of(params: pa.Table) -> tuple[dict[str, Any], set[tuple[str, ...]]]:
    """Nested config from param paths; a path that is both a leaf and a namespace is
    kept aside rather than overwriting the other."""
    leaves: list[tuple[list[str], Any]] = []
    paths = {tuple(p["path"]) for p in params.to_pylist()}
    conflicts = {p for p in paths if any(q != p and q[: len(p)] == p for q in paths)}
    for p in params.to_pylist():
        if tuple(p["path"]) not in conflicts:
            leaves.append((p["path"], schema.loads_value(p["value_json"])))
    return wc.unflatten(leaves), conflicts


def artifact_name(row: dict[str, Any]) -> tuple[str, str]:
    """The W&B name and type an artifact is logged under."""
    kind = row.get("type") or "artifact"
    if kind in wc.RESERVED_ARTIFACT_TYPES:
        kind = f"trackbridge-{kind}"
    return BAD_ARTIFACT.sub("-", row["name"] or "artifact"), kind
