"""A small but awkward MLflow dataset, made with the real MLflow SDK.

``quickstart`` migrates it, and the tests use it as their fixture, so it deliberately
holds what tends to get lost: old start times, nested runs, NaN and repeated steps,
failed/killed/deleted runs, binary and nested artifacts, dataset inputs, an MLflow 3
logged model with linked metrics, and registry versions with aliases and stages.
"""

from __future__ import annotations

import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

from trackbridge.trackers.mlflow import common as mc

T0 = 1_736_900_000_000  # 2025-01-15, in ms: clearly not "now"


def make_mlflow_demo(
    tracking_uri: str, steps: int = 60, seed: int = 7, legacy: bool = False
) -> dict[str, Any]:
    """Fill ``tracking_uri`` with the demo data; return ids the tests check against.

    ``legacy``: only what MLflow 2.3 could hold (no dataset inputs, no logged model), the
    data that tools of that time, such as mlflow-export-import 1.x, can copy whole."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelStatus, Metric, Param, RunTag

    rng = random.Random(seed)
    client = mc.client(tracking_uri)
    out: dict[str, Any] = {"runs": {}}

    exp_id = client.create_experiment(
        "demo-classifier",
        artifact_location=mc.experiment_artifact_location(tracking_uri, "demo-classifier"),
        tags={"team": "research", mc.TAG_NOTE: "Image classifier sweep (trackbridge demo)"},
    )
    exp2 = client.create_experiment(
        "demo-regression",
        artifact_location=mc.experiment_artifact_location(tracking_uri, "demo-regression"),
    )
    out["experiments"] = [exp_id, exp2]

    def run(name: str, exp: str, offset_min: int, user: str, tags: dict[str, str] | None = None) -> str:
        r = client.create_run(
            exp, start_time=T0 + offset_min * 60_000, tags={mc.TAG_USER: user, **(tags or {})}, run_name=name
        )
        out["runs"][name] = r.info.run_id
        return r.info.run_id

    parent = run("sweep", exp_id, 0, "alice", {"purpose": "hyperparameter sweep"})
    client.log_batch(parent, params=[Param("sweep.method", "grid"), Param("sweep.metric", "val/acc")])
    client.set_terminated(parent, "FINISHED", end_time=T0 + 90 * 60_000)

    for i, lr in enumerate((0.1, 0.01)):
        rid = run(
            f"trial-{i}",
            exp_id,
            1 + i,
            "alice",
            {mc.TAG_PARENT: parent, "trial": str(i), "mlflow.note.content": f"trial {i} notes"},
        )
        client.log_batch(
            rid,
            params=[
                Param("lr", str(lr)),
                Param("batch_size", "64"),
                Param("optimizer", "adam"),
                Param("model/arch", "resnet18"),
                Param("long_description", "x" * 5000),
            ],
            tags=[RunTag("dataset", "cifar10")],
        )
        metrics = []
        for s in range(steps):
            ts = T0 + (1 + i) * 60_000 + s * 1000
            metrics.append(Metric("train/loss", 2.0 / (1 + s * lr * 10) + rng.random() * 0.01, ts, s))
            metrics.append(Metric("val/acc", min(0.99, 0.1 + s * lr), ts, s))
        metrics.append(Metric("train/loss", float("nan"), T0 + 10_000_000, steps))  # a NaN point
        metrics.append(Metric("val/acc", 0.5, T0 + 10_000_001, 3))  # a repeated step
        metrics.append(Metric("val/acc", 0.25, T0 + 10_000_002, 3))
        metrics.append(Metric("epoch", 1.0, T0 + 10_000_003, -1))  # negative step
        for k in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[k : k + 1000])
        if not legacy:
            client.log_inputs(
                rid,
                datasets=[
                    DatasetInput(
                        Dataset(
                            "cifar10-train",
                            "d41d8cd9",
                            "local",
                            '{"uri": "/data/cifar10"}',
                            '{"mlflow_colspec": []}',
                            '{"num_rows": 50000}',
                        ),
                        [InputTag("mlflow.data.context", "training")],
                    )
                ],
            )
        with tempfile.TemporaryDirectory() as d:
            p = Path(d)
            (p / "notes.txt").write_text(f"trial {i}: lr={lr}\n")
            (p / "model").mkdir()
            (p / "model" / "weights.bin").write_bytes(rng.randbytes(50_000))
            (p / "model" / "sub").mkdir()
            (p / "model" / "sub" / "config.json").write_text('{"layers": 18}')
            client.log_artifact(rid, str(p / "notes.txt"))
            client.log_artifacts(rid, str(p / "model"), "model")
        status = "FINISHED" if i == 0 else "FAILED"
        client.set_terminated(rid, status, end_time=T0 + (30 + i) * 60_000)

    # MLflow 3: a logged model with params, tags, files, and metrics linked to it.
    rid0 = out["runs"]["trial-0"]
    if not legacy:
        lm = client.create_logged_model(
            exp_id,
            name="resnet",
            source_run_id=rid0,
            tags={"framework": "torch"},
            params={"depth": "18"},
            model_type="classifier",
        )
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
            client.log_model_artifact(lm.model_id, str(Path(d) / "MLmodel"))
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
        client.log_batch(
            rid0,
            metrics=[
                Metric(
                    "eval/f1",
                    0.87,
                    T0 + 20_000_000,
                    0,
                    model_id=lm.model_id,
                    dataset_name="cifar10-test",
                    dataset_digest="abc123",
                )
            ],
        )
        out["logged_model"] = lm.model_id

    killed = run("killed-run", exp_id, 5, "bob")
    client.log_batch(killed, metrics=[Metric("loss", 1.0, T0 + 5 * 60_000, 0)])
    client.set_terminated(killed, "KILLED", end_time=T0 + 6 * 60_000)

    deleted = run("deleted-run", exp_id, 6, "bob")
    client.set_terminated(deleted, "FINISHED", end_time=T0 + 7 * 60_000)
    client.delete_run(deleted)

    reg = run("linear", exp2, 10, "carol")
    client.log_batch(
        reg,
        params=[Param("alpha", "0.5")],
        metrics=[Metric("rmse", 1.0 / (s + 1), T0 + s, s) for s in range(steps)],
    )
    client.set_terminated(reg, "FINISHED", end_time=T0 + 11 * 60_000)

    # Model Registry: one version from run files, one from the logged model.
    client.create_registered_model(
        "demo-classifier", tags={"owner": "alice"}, description="The demo's image classifier"
    )
    art_uri = client.get_run(rid0).info.artifact_uri
    v1 = client.create_model_version(
        "demo-classifier",
        f"{art_uri}/model",
        run_id=rid0,
        tags={"validated": "yes"},
        description="from run files",
    )
    if legacy:  # a second version from run files, as MLflow 2 made them
        v2 = client.create_model_version("demo-classifier", f"{art_uri}/model", run_id=rid0)
    else:
        with mc.global_tracking_uri(tracking_uri):
            v2 = client.create_model_version(
                "demo-classifier",
                f"models:/{out['logged_model']}",
                run_id=rid0,
                description="from the logged model",
                model_id=out["logged_model"],
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still used
        client.transition_model_version_stage("demo-classifier", v1.version, "Staging")
    client.set_registered_model_alias("demo-classifier", "champion", v2.version)
    client.set_registered_model_alias("demo-classifier", "baseline", v1.version)
    out["versions"] = [v1.version, v2.version]
    return out
