"""Hand-built neutral payloads, for tests that need data no real tracker would hold."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from trackbridge import schema
from trackbridge.bundle import BundleWriter
from trackbridge.model import ArtifactPayload, FileRef, RegistryPayload, RunPayload
from trackbridge.report import Report
from trackbridge.trackers.mlflow import common as mc

START = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


def project(key: str = "test:project/1", name: str = "limits") -> dict[str, Any]:
    return {
        "project_key": key,
        "system": "test",
        "source_id": "1",
        "name": name,
        "description": "hand-built",
        "lifecycle": "active",
        "created_at": START,
        "tags": [],
    }


def run(key: str, project_key: str = "test:project/1", **fields: Any) -> dict[str, Any]:
    row = {
        "run_key": key,
        "project_key": project_key,
        "source_id": key.rsplit("/", 1)[-1],
        "name": key.rsplit("/", 1)[-1],
        "status": "finished",
        "lifecycle": "active",
        "start_time": START,
        "end_time": START.replace(hour=13),
        "user": "tester",
        "labels": [],
        "source_incomplete": False,
    }
    row.update(fields)
    return row


def metrics(key: str, points: list[tuple[str, int, float]]) -> pa.RecordBatch:
    ts = [int(START.timestamp() * 1_000_000) + i * 1000 for i in range(len(points))]
    return pa.RecordBatch.from_pydict(
        {
            "run_key": [key] * len(points),
            "key": [p[0] for p in points],
            "step": [p[1] for p in points],
            "timestamp": ts,
            "value": [p[2] for p in points],
            "model_key": [None] * len(points),
            "dataset_name": [None] * len(points),
            "dataset_digest": [None] * len(points),
        },
        schema=schema.SCHEMAS["metrics"],
    )


def file_ref(path: str, local: Path) -> FileRef:
    @contextlib.contextmanager
    def fetch() -> Iterator[str]:
        yield str(local)

    return FileRef(path=path, size=local.stat().st_size, sha256=None, fetch=fetch)


def payload(
    row: dict[str, Any],
    params: list[tuple[list[str], Any]] = (),
    tags: dict[str, str] | None = None,
    points: list[tuple[str, int, float]] = (),
    files: list[FileRef] = (),
) -> RunPayload:
    key = row["run_key"]
    prow = [
        {"run_key": key, "path": p, "value_json": schema.dumps_value(v), "value_type": schema.value_type(v)}
        for p, v in params
    ]
    trow = [{"run_key": key, "key": k, "value": v} for k, v in (tags or {}).items()]
    batch = metrics(key, list(points))
    arts = []
    if files:
        arts.append(
            ArtifactPayload(
                row={
                    "artifact_key": f"{key}#files",
                    "project_key": row["project_key"],
                    "name": "run-files",
                    "type": "run-files",
                    "aliases": [],
                    "producer_run_key": key,
                },
                files=list(files),
            )
        )
    return RunPayload(
        run=row,
        params=schema.table("params", prow),
        tags=schema.table("tags", trow),
        metrics=lambda: iter([batch]),
        artifacts=arts,
    )


def write_bundle(
    path: Path, projects: list[dict], payloads: list[RunPayload], source: str = "test://"
) -> Path:
    w = BundleWriter(path)
    w.begin(source)
    for p in projects:
        w.write_project(p)
    rep = Report()
    for pl in payloads:
        w.write_run(pl, rep.run(pl.key))
    w.write_registry(RegistryPayload(schema.empty("registered_models"), schema.empty("model_versions")), rep)
    w.finish()
    return path


def small_mlflow_store(path: Path, experiment: str, metric: float) -> str:
    """A small MLflow store of its own: experiment 1 with one run, and model churn v1."""
    uri = f"sqlite:///{path}"
    client = mc.client(uri).unwrapped
    exp = client.create_experiment(
        experiment, artifact_location=mc.experiment_artifact_location(uri, experiment)
    )
    assert exp == "1"
    run = client.create_run(exp, run_name=f"{experiment}-run", start_time=1_700_000_000_000)
    client.log_metric(run.info.run_id, "loss", metric, step=0)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=1_700_000_100_000)
    client.create_registered_model("churn")
    client.create_model_version("churn", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return f"mlflow+{uri}"
