"""What the W&B exporters and importer agree on: keys, config shape, the step axis.

Run keys leave out the entity on purpose. An offline run often has no entity, and
``wandb sync`` later files it under the user's default one; the same run read from its
``.wandb`` file today and from the API tomorrow must have one key, or a nightly sync
would copy it twice. Run ids are random per project, so project + id is unique enough.

W&B cannot take some source fields through its SDK (start and end time, status other
than an exit code, key/value tags, a non-monotonic step). The importer keeps them in
one config entry, ``_trackbridge``, that the exporters read back and hide, so
MLflow → W&B → MLflow returns what went in.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from trackbridge import schema

META_KEY = "_trackbridge"
# The x-axis the importer logs when the source's steps cannot be W&B's ``_step``.
STEP_AXIS = "trackbridge/step"
# Keys W&B itself maintains in every history row and summary.
HISTORY_INTERNAL = ("_step", "_timestamp", "_runtime")
SUMMARY_INTERNAL = ("_wandb", "_step", "_timestamp", "_runtime")
CONFIG_INTERNAL = ("_wandb", META_KEY)
# The config key that shows a run's key/value tags (MLflow's) in W&B's runs table, where
# a W&B user filters; the importer notes it in ``_trackbridge`` and the exporter takes
# it back out of the params
TAGS_CONFIG = "tags"
# Run fields the importer keeps in ``_trackbridge`` and the exporter puts back.
META_RUN_FIELDS = (
    "status",
    "user",
    "lifecycle",
    "parent_run_key",
    "source_url",
    "git_commit",
    "git_remote",
    "command",
    "host",
    "source_incomplete",
    "fork_parent_run_key",
    "fork_step",
    "step_scale",
    "step_scales",
    "sweep_key",
)
# the fields of a search (a sweep's own row) a W&B destination keeps with each of its
# trials, in ``_trackbridge.sweep``: W&B's SDK cannot make a sweep
SWEEP_FIELDS = ("name", "status", "user", "notes", "group", "job_type", "source_id", "lifecycle")
# Points the SDK cannot log as history (system metrics, the source's own ``_runtime``):
# the importer keeps them in this run file.
KEPT_METRICS_FILE = "trackbridge/kept-metrics.parquet"
# Artifact types W&B reserves for itself; written as "trackbridge-<type>" and read back.
RESERVED_ARTIFACT_TYPES = ("run_table", "job", "wandb-history")


def run_key(project: str, run_id: str) -> str:
    return f"wandb:run/{project}/{run_id}"


def sweep_key(project: str, sweep_id: str) -> str:
    return f"wandb:sweep/{project}/{sweep_id}"


def kept_sweep(payload: Any) -> dict[str, Any]:
    """A search (``RunPayload`` of a sweep's own row) as a W&B destination keeps it with
    each of its trials: its source key, run fields, definition and summary, all JSON."""
    row = payload.run
    return {
        "key": payload.key,
        "row": {k: row.get(k) for k in SWEEP_FIELDS}
        | {k: dt_to_seconds(row.get(k)) for k in ("start_time", "end_time")},
        "params": [
            {k: p[k] for k in ("path", "value_json", "value_type")} for p in payload.params.to_pylist()
        ],
        "summary": [{"path": s["path"], "value_json": s["value_json"]} for s in payload.summary.to_pylist()],
    }


def project_key(project: str) -> str:
    return f"wandb:project/{project}"


def artifact_key(project: str, name: str, digest: str) -> str:
    return f"wandb:artifact/{project}/{name}@{digest}"


def files_key(project: str, run_id: str) -> str:
    return f"{run_key(project, run_id)}#files"


def model_versions(
    artifacts: list[tuple[dict[str, Any], datetime | None]],
    rules: tuple[Any, ...],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Registered models and versions for the artifacts that ``rules`` (trackbridge.model.
    ModelRule) name: one version per logged artifact, keyed by its artifact key (name and
    digest), so the same bytes are never registered twice. ``artifacts`` are (artifact
    row, producing run's start) pairs; versions come out in that order, so where two
    versions claim one alias (offline runs cannot see an alias move), the later run's
    version keeps it. The first rule that matches an artifact decides."""
    models: dict[str, dict[str, Any]] = {}
    versions: list[dict[str, Any]] = []
    holder: dict[tuple[str, str], dict[str, Any]] = {}  # (model, alias) -> the version that has it
    ordered = sorted(artifacts, key=lambda a: (a[1] is None, a[1] or datetime.min.replace(tzinfo=UTC)))
    for row, _ in ordered:
        rule = next((r for r in rules if r.matches(row)), None)
        if rule is None:
            continue
        name = rule.model_name(row, (row.get("project_key") or "").rpartition("/")[2])
        models.setdefault(
            name, {"name": name, "description": None, "tags": [("wandb.artifact", row["name"])]}
        )
        aliases = [a for a in row.get("aliases") or [] if not rule.aliases or a in rule.aliases]
        version = {
            "version_key": row["artifact_key"] if name == row["name"] else f"{row['artifact_key']}->{name}",
            "model_name": name,
            "version": (row.get("version") or "").removeprefix("v"),
            "run_key": row["producer_run_key"],
            "artifact_key": row["artifact_key"],
            "aliases": aliases,
            "status": "READY",
            "description": row.get("description"),
            "tags": [("wandb.digest", row.get("digest") or "")],
            "created_at": row.get("created_at"),
        }
        versions.append(version)
        for alias in version["aliases"]:
            earlier = holder.get((name, alias))
            if earlier is not None:  # an alias is on one version at a time: it moved
                earlier["aliases"] = [a for a in earlier["aliases"] if a != alias]
            holder[(name, alias)] = version
    return list(models.values()), versions


def dt_to_seconds(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def seconds_to_dt(seconds: float | None) -> datetime | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(round(seconds * 1_000_000) / 1_000_000, UTC)


def status_from_exit(exit_code: int | None, truncated: bool) -> str:
    if truncated:
        return "crashed"
    if exit_code is None:
        return "running"  # no exit record yet: still running, or killed without one
    return "finished" if exit_code == 0 else "failed"


def apply_meta(row: dict[str, Any], meta: Any) -> None:
    """For a run trackbridge wrote: its source's run fields, which the SDK could not set."""
    if not isinstance(meta, dict):
        return
    for k in ("start_time", "end_time"):
        if k in meta:  # None too: a run that never ended has no end, whatever W&B logged
            row[k] = seconds_to_dt(meta[k])
    for k in META_RUN_FIELDS:
        if k in meta:
            row[k] = meta[k]
    if "labels" in meta:
        row["labels"] = list(meta["labels"])
    if meta.get("nested_group"):
        row["group"] = None  # the importer grouped a nested family; the source had no group


flatten = schema.flatten  # W&B's nesting is the neutral one: config, summary, logged dicts


def param_rows(run_key_: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "run_key": run_key_,
            "path": path,
            "value_json": schema.dumps_value(v),
            "value_type": schema.value_type(v),
        }
        for path, v in flatten({k: v for k, v in config.items() if k not in CONFIG_INTERNAL})
    ]


unflatten = schema.unflatten
set_path = schema.set_path


def del_path(tree: dict[str, Any], path: list[str]) -> None:
    node: Any = tree
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def sandbox_env(root: str | os.PathLike[str]) -> dict[str, str]:
    """Every directory the SDK writes to, inside ``root``, so nothing lands in HOME."""
    root = os.fspath(root)
    return {
        "WANDB_DIR": root,
        "WANDB_DATA_DIR": os.path.join(root, "data"),
        "WANDB_CACHE_DIR": os.path.join(root, "cache"),
        "WANDB_CONFIG_DIR": os.path.join(root, "config"),
    }
