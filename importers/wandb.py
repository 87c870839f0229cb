"""Write runs into W&B through its SDK: offline run folders (``wandb+offline://PATH``).

The offline folders are what ``wandb sync`` uploads, so this is also the way into a W&B
server that the importing machine cannot reach.

Identity: the W&B run id is derived from the source key, and each finished run folder
gets a ``trackbridge.json`` marker beside its ``.wandb`` log, written last, holding the
source key and a content fingerprint. A run whose marker matches costs no writes; a
changed run, or one whose import was killed before its marker, is written again from
scratch, after its old folders are removed, so a folder never holds two copies.

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
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridge import schema
from bridge import wandb_common as wc
from bridge.errors import DestinationError, MissingExtraError
from bridge.files import atomic_write_bytes
from bridge.model import ArtifactPayload, RegistryPayload, RunPayload
from bridge.report import RunReport

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


class WandbOfflineSink:
    def __init__(self, path: str, dry_run: bool = False) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise MissingExtraError("wandb", "wandb") from e
        self.root = Path(path).expanduser().resolve()
        self.dry_run = dry_run
        self._projects: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()  # one SDK run at a time per process
        self._index: dict[str, dict[str, Any]] | None = None

    def describe(self) -> str:
        return f"wandb+offline://{self.root}"

    def begin(self, source: str) -> None:
        if not self.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        pass

    # -- identity

    def _runs_index(self) -> dict[str, dict[str, Any]]:
        """run id → {"fingerprint": marker's or None, "dirs": [folders]} for our folder."""
        if self._index is None:
            from exporters.wandb import RUN_DIR, _head

            index: dict[str, dict[str, Any]] = {}
            base = self.root / "wandb"
            for d in sorted(base.iterdir()) if base.is_dir() else []:
                if not (d.is_dir() and RUN_DIR.match(d.name)):
                    continue
                logs = list(d.glob("run-*.wandb"))
                run_id = _head(logs[0]).run_id if logs else RUN_DIR.match(d.name).group(2)  # type: ignore[union-attr]
                entry = index.setdefault(run_id, {"fingerprint": None, "dirs": []})
                entry["dirs"].append(d)
                marker = d / MARKER
                if marker.exists():
                    entry["fingerprint"] = json.loads(marker.read_text()).get("fingerprint")
            self._index = index
        return self._index

    # -- writes

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

    def write_run(self, payload: RunPayload, report: RunReport) -> str:
        key = payload.key
        kept_project = self._projects.get(payload.run["project_key"], ("", {}))[1].get("name")
        run_id = derived_run_id(key, kept_project)
        fp = f"{payload.content_digest()[:40]}.w{FORMAT}"
        have = self._runs_index().get(run_id)
        report.destination_id = run_id
        if have and have["fingerprint"] == fp:
            return "unchanged"
        outcome = "updated" if have else "new"
        if self.dry_run:
            report.points = sum(b.num_rows for b in payload.metrics())
            return outcome
        if payload.run["project_key"] not in self._projects:
            raise DestinationError(f"run {key}: its project {payload.run['project_key']} was not imported")
        project, kept = self._projects[payload.run["project_key"]]
        if project != kept["name"]:
            report.mapped(
                "project-renamed",
                "projects.name",
                f"{kept['name']!r} written as W&B project {project!r}; the name is kept in "
                "config._trackbridge.project",
            )
        with self._lock:
            for d in have["dirs"] if have else []:
                shutil.rmtree(d)  # the whole run is written again; never two copies
            folder = self._write(project, kept, run_id, payload, report)
            atomic_write_bytes(
                folder / MARKER, json.dumps({"source_key": key, "fingerprint": fp, "run_id": run_id}).encode()
            )
            self._runs_index()[run_id] = {"fingerprint": fp, "dirs": [folder]}
        return outcome

    def _write(
        self, project: str, kept: dict[str, Any], run_id: str, payload: RunPayload, report: RunReport
    ) -> Path:
        import wandb

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
            "project": kept,
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
        config[wc.META_KEY] = json.loads(json.dumps(meta, default=str))
        settings = wandb.Settings(
            mode="offline",
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
            console="off",
            save_code=False,
            disable_git=True,
            disable_job_creation=True,
            silent=True,
        )
        wrun = wandb.init(
            project=project,
            id=run_id,
            name=run.get("name"),
            notes=run.get("notes"),
            tags=fitted_labels,
            group=run.get("group"),
            job_type=run.get("job_type"),
            config=config,
            dir=str(self.root),
            settings=settings,
            reinit="create_new",
        )
        ok = False
        try:
            rows, mapped, system = _history(payload)
            if mapped:
                wrun.define_metric(wc.STEP_AXIS, hidden=True)
                wrun.define_metric("*", step_metric=wc.STEP_AXIS)
                report.mapped(
                    "step-axis",
                    "metrics.step",
                    f"steps are not one increasing sequence; the source step is in {wc.STEP_AXIS!r}",
                )
            for i, (step, stamp, values) in enumerate(rows):
                data = dict(values)
                if stamp is not None:
                    data["_timestamp"] = stamp
                if mapped:
                    data[wc.STEP_AXIS] = step
                wrun.log(data, step=i if mapped else step)
                report.points += len(values)
            files_dir = Path(wrun.dir)
            if system is not None:
                target = files_dir / wc.KEPT_METRICS_FILE
                target.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(system, target)
                report.mapped(
                    "metrics-kept",
                    "metrics.system/*, metrics._runtime",
                    f"the SDK cannot log these; {system.num_rows} point(s) in {wc.KEPT_METRICS_FILE}",
                )
            for art in payload.artifacts:
                if art.row["type"] == "run-files":
                    self._copy_run_files(art, files_dir, report)
                else:
                    self._log_artifact(wrun, art, report)
            ok = True
        finally:
            status = run.get("status") or "finished"
            wrun.finish(exit_code=0 if ok and status in ("finished", "running", "scheduled") else 1)
        folder = Path(wrun.dir).parent
        return folder

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
        name = _BAD_ARTIFACT.sub("-", row["name"] or "artifact")
        kind = row.get("type") or "artifact"
        if kind in wc.RESERVED_ARTIFACT_TYPES:
            report.mapped(
                "artifact-type",
                f"artifacts.{row['name']}",
                f"W&B reserves {kind!r}: written as trackbridge-{kind}",
            )
            kind = f"trackbridge-{kind}"
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
            "a standalone one has no place in an offline folder"
        )

    def write_registry(self, payload: RegistryPayload, report: Any) -> None:
        n = payload.model_versions.num_rows
        if n:
            report.mapped(
                "registry-not-written",
                "model_versions",
                f"{n} model version(s): offline W&B runs cannot hold registry links; "
                "link them after `wandb sync`, or migrate to wandb://",
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


def _history(
    payload: RunPayload,
) -> tuple[list[tuple[int, float | None, dict[str, Any]]], bool, pa.Table | None]:
    """History rows (step, _timestamp seconds, values), whether the step axis is mapped,
    and the system metrics kept aside.

    Points that share a step and a timestamp become one row, as one ``log`` call made
    them; a key seen twice at the same step and time starts another row.
    """
    rows: dict[tuple[int, int | None], list[dict[str, Any]]] = defaultdict(list)
    system = []

    def put(step: int, ts: int | None, key: str, value: Any) -> None:
        bucket = rows[(step, ts)]
        for r in bucket:
            if key not in r:
                r[key] = value
                return
        bucket.append({key: value})

    for batch in payload.metrics():
        keys_col = batch.column("key")
        aside = pc.or_(pc.starts_with(keys_col, "system/"), pc.equal(keys_col, "_runtime"))
        if pc.any(aside).as_py():
            system.append(batch.filter(aside))
            batch = batch.filter(pc.invert(aside))
        keys = batch.column("key").to_pylist()
        steps = batch.column("step").to_pylist()
        stamps = batch.column("timestamp").cast(pa.int64()).to_pylist()
        values = batch.column("value").to_pylist()
        for k, s, t, v in zip(keys, steps, stamps, values, strict=True):
            put(s, t, k, v)
    series = payload.series
    # µs as integers, as for the metrics above: a float round trip could split a row
    series_us = series.column("timestamp").cast(pa.int64()).to_pylist()
    for r, us in zip(series.select(["step", "key", "value_json"]).to_pylist(), series_us, strict=True):
        put(r["step"], us, r["key"], json.loads(r["value_json"]))
    ordered = sorted(rows.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1]))
    out = [
        (step, None if ts is None else ts / 1_000_000, vals)
        for (step, ts), bucket in ordered
        for vals in bucket
    ]
    steps = [s for s, _, _ in out]
    mapped = any(s < 0 for s in steps) or any(a >= b for a, b in itertools.pairwise(steps))
    sys_tbl = pa.Table.from_batches(system) if system else None
    return out, mapped, sys_tbl
