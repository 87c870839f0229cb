"""The neutral schema: the one contract that every exporter and importer shares.

Adapters never talk to each other; they only produce or consume these tables. The
version number travels in every bundle's manifest, so a reader can refuse (with a clear
message) or upgrade a bundle written by another version. docs/schema.md describes every
column; keep the two in step.

Conventions that make the tables lossless:
- Timestamps are UTC with microsecond precision (W&B and Neptune carry sub-millisecond
  times; MLflow's milliseconds fit without loss).
- Config and param keys are ``path: list<string>`` so that a dotted key (``a.b``) and a
  nested one (``a`` → ``b``) never collapse into the same thing.
- Values whose type matters (config, summary, series) are stored as JSON text plus a type
  name, so ints, floats, bools, null and lists come back exactly as they went in.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
# The artifact type of a logged model (a model with its own identity, metrics and params,
# which MLflow 3 introduced and named); other trackers' models are ordinary artifacts.
LOGGED_MODEL = "mlflow.logged_model"
# Bundles this reader understands. A future version adds an upgrade step here.
READABLE_SCHEMA_VERSIONS = frozenset({1})

TS = pa.timestamp("us", tz="UTC")
STR = pa.string()
STR_LIST = pa.list_(pa.string())
STR_MAP = pa.map_(pa.string(), pa.string())

SCHEMAS: dict[str, pa.Schema] = {
    "projects": pa.schema(
        [
            ("project_key", STR),
            ("system", STR),
            ("source_id", STR),
            ("name", STR),
            ("description", STR),
            ("lifecycle", STR),
            ("created_at", TS),
            ("tags", STR_MAP),
        ]
    ),
    "runs": pa.schema(
        [
            ("run_key", STR),
            ("project_key", STR),
            ("source_id", STR),
            ("name", STR),
            ("status", STR),
            ("lifecycle", STR),
            ("start_time", TS),
            ("end_time", TS),
            ("user", STR),
            ("group", STR),
            ("job_type", STR),
            ("notes", STR),
            ("labels", STR_LIST),
            ("parent_run_key", STR),
            ("fork_parent_run_key", STR),
            ("fork_step", pa.float64()),
            ("git_commit", STR),
            ("git_remote", STR),
            ("command", STR),
            ("host", STR),
            ("source_url", STR),
            ("source_incomplete", pa.bool_()),
            # Neptune's decimal steps, as bundles of trackbridge 0.1 wrote them: every metric and
            # series ``step`` of the run is the exact step × step_scale (a power of ten)
            ("step_scale", pa.int64()),
            # ... and since: per key, a JSON object {key: scale} of the keys whose steps
            # are the exact step × scale; every other key's steps are as logged
            ("step_scales", STR),
            # a W&B sweep (a hyperparameter search): on each trial, the key of the search it
            # belongs to; on the search's own row (the sweep), its own run_key
            ("sweep_key", STR),
        ]
    ),
    "params": pa.schema(
        [
            ("run_key", STR),
            ("path", STR_LIST),
            ("value_json", STR),
            ("value_type", STR),
        ]
    ),
    "metrics": pa.schema(
        [
            ("run_key", STR),
            ("key", STR),
            ("step", pa.int64()),
            ("timestamp", TS),
            ("value", pa.float64()),
            # MLflow 3 links a point to a logged model and a dataset; null elsewhere.
            ("model_key", STR),
            ("dataset_name", STR),
            ("dataset_digest", STR),
        ]
    ),
    "series": pa.schema(
        [
            ("run_key", STR),
            ("key", STR),
            ("step", pa.int64()),
            ("timestamp", TS),
            ("kind", STR),
            ("value_json", STR),
            ("file_path", STR),
            ("file_sha256", STR),
        ]
    ),
    "summary": pa.schema([("run_key", STR), ("path", STR_LIST), ("value_json", STR)]),
    "tags": pa.schema([("run_key", STR), ("key", STR), ("value", STR)]),
    "dataset_inputs": pa.schema(
        [
            ("run_key", STR),
            ("name", STR),
            ("digest", STR),
            ("source_type", STR),
            ("source", STR),
            ("schema", STR),
            ("profile", STR),
            ("tags", STR_MAP),
        ]
    ),
    "artifacts": pa.schema(
        [
            ("artifact_key", STR),
            ("project_key", STR),
            ("name", STR),
            ("type", STR),
            ("version", STR),
            ("digest", STR),
            ("aliases", STR_LIST),
            ("description", STR),
            ("metadata_json", STR),
            ("producer_run_key", STR),
            ("created_at", TS),
        ]
    ),
    "artifact_files": pa.schema(
        [
            ("artifact_key", STR),
            ("path", STR),
            ("size", pa.int64()),
            ("sha256", STR),
            ("uri", STR),  # set when the bytes live outside the bundle (a reference)
        ]
    ),
    "artifact_usage": pa.schema([("run_key", STR), ("artifact_key", STR), ("direction", STR)]),
    "registered_models": pa.schema(
        [
            ("name", STR),
            ("description", STR),
            ("tags", STR_MAP),
            ("created_at", TS),
            ("updated_at", TS),
        ]
    ),
    "model_versions": pa.schema(
        [
            ("version_key", STR),
            ("model_name", STR),
            ("version", STR),
            ("run_key", STR),
            ("artifact_key", STR),
            ("source", STR),
            ("source_subpath", STR),  # path of the model inside the run's artifacts
            ("aliases", STR_LIST),
            ("stage", STR),
            ("status", STR),
            ("description", STR),
            ("tags", STR_MAP),
            ("user", STR),
            ("created_at", TS),
            ("updated_at", TS),
        ]
    ),
}

TABLES = tuple(SCHEMAS)

# Nullable columns added to schema v1 after its first bundles were written. A bundle
# without them still reads: they come back null, which is what the older writer meant.
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {"runs": ("step_scale", "step_scales", "sweep_key")}

# Run states in the neutral schema. Adapters map their own vocabulary onto these.
RUN_STATUSES = ("running", "scheduled", "finished", "failed", "killed", "crashed")


def is_sweep(run: Mapping[str, Any]) -> bool:
    """A search's own row (a W&B sweep), not a run that logged anything: every tracker
    without sweeps shows it as the parent of its trials."""
    return bool(run.get("sweep_key")) and run.get("sweep_key") == run.get("run_key")


def step_scales(run: Mapping[str, Any]) -> dict[str, int]:
    """The run's keys logged at decimal steps → the power of ten their ``step`` is
    scaled by (``runs.step_scales``); empty for every other run."""
    text = run.get("step_scales")
    scales = loads_value(text) if text else {}
    return {str(k): int(v) for k, v in scales.items()} if isinstance(scales, dict) else {}


def depends_on(run: Mapping[str, Any]) -> str | None:
    """The run this one must be written after: its parent, or the search it is a trial of
    (a destination nests the trials under it)."""
    if run.get("parent_run_key"):
        return run["parent_run_key"]
    return None if is_sweep(run) else run.get("sweep_key") or None


def table(name: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a table of the named schema; missing columns become null, extra ones are an error.

    Failing on an unknown column catches an adapter that drifted from the schema, which
    would otherwise drop a field without anyone noticing.
    """
    schema = SCHEMAS[name]
    rows = list(rows)
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"{name}: unknown column(s) {sorted(extra)}")
    columns = {f: [row.get(f) for row in rows] for f in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def metrics_table(run_key: str, key: Any, step: Any, timestamp: Any, value: Any) -> pa.Table:
    """A run's points as a ``metrics`` table from columns (Arrow arrays), the MLflow 3
    model and dataset links null: what every source without those links builds."""
    n = len(key)
    return pa.table(
        {
            "run_key": pa.repeat(pa.scalar(run_key, pa.string()), n),
            "key": key,
            "step": step,
            "timestamp": timestamp.cast(TS),
            "value": value,
            "model_key": pa.nulls(n, pa.string()),
            "dataset_name": pa.nulls(n, pa.string()),
            "dataset_digest": pa.nulls(n, pa.string()),
        },
        schema=SCHEMAS["metrics"],
    )


def flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[list[str], Any]]:
    """Leaves of a nested config or summary as (path, value).

    An empty dict is a leaf (it is data), and so is a dict with ``_type``: that is one
    media value (an image, a histogram), not a namespace.
    """
    for k, v in tree.items():
        path = (*prefix, str(k))
        if isinstance(v, dict) and v and "_type" not in v:
            yield from flatten(v, path)
        else:
            yield list(path), v


def unflatten(rows: Iterable[tuple[list[str], Any]]) -> dict[str, Any]:
    """A nested config from (path, value) leaves: ``flatten``'s inverse."""
    out: dict[str, Any] = {}
    for path, value in rows:
        set_path(out, path, value)
    return out


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[a][b]… = value``; a non-dict on the way is replaced, as W&B's config does."""
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[path[-1]] = value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def us_to_dt(us: int | None) -> datetime | None:
    """Microseconds since the epoch as a UTC datetime, exactly (a float division may be
    a microsecond off)."""
    return None if us is None else _EPOCH + timedelta(microseconds=us)


@functools.cache
def empty(name: str) -> pa.Table:
    """Tables are immutable, so one empty table of each kind serves every reader."""
    return SCHEMAS[name].empty_table()


def dumps_value(value: Any) -> str:
    """JSON text for a config/summary value, keeping NaN and ±inf (plain JSON cannot).

    Keys are sorted: W&B hands back a media dict's keys in a different order each time it
    is read, and one canonical text makes equal values compare equal.
    """
    return json.dumps(value, allow_nan=True, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def loads_value(text: str) -> Any:
    return json.loads(text)


def value_type(value: Any) -> str:
    """The type name stored next to a value, so importers can restore it exactly."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return "str"
