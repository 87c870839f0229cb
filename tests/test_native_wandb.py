"""MLflow runs land in W&B as W&B users would have logged them (issue 16): images logged
with MLflow's ``log_image(key=, step=)`` are ``wandb.Image`` at their step, and tables
logged with ``log_table`` are ``wandb.Table``, read from the W&B run's own record log. The
round trips stay exact: MLflow → W&B → MLflow and MLflow → MLflow verify identical, and
MLflow's own layout needs no private copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One MLflow run with images at steps 0 and 5 and a table, logged by MLflow's client."""
    import mlflow
    import numpy as np

    root = tmp_path_factory.mktemp("mlflow-media")
    uri = f"sqlite:///{root / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("media", artifact_location=(root / "art").as_uri())
    run = client.create_run(exp, run_name="with-media")
    rid = run.info.run_id
    for step in (0, 5):
        pixels = np.full((8, 8, 3), 40 * (step + 1), dtype=np.uint8)
        client.log_image(rid, pixels, key="eval/samples", step=step, timestamp=1_780_000_000_000 + step)
        client.log_metric(rid, "loss", 1.0 / (step + 1), step=step, timestamp=1_780_000_000_000 + step)
    client.log_table(rid, data={"id": [1, 2], "label": ["cat", "dog"]}, artifact_file="eval/predictions.json")
    client.set_terminated(rid)
    return {"uri": uri, "db": root / "m.db", "client": client, "run": rid}


def _wandb_media(folder: Path) -> dict[str, list[tuple[int, dict]]]:
    """Per key, the W&B media entries of the run's history rows: (step, entry)."""
    from trackbridge import schema
    from trackbridge.trackers.wandb.leveldb import RecordLog
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    out: dict[str, list[tuple[int, dict]]] = {}
    for _, payload in RecordLog(log).payloads():
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for i in rec.history.item:  # a media entry comes as one item per field
            path = [i.key] if i.key else list(i.nested_key)
            schema.set_path(row, path, json.loads(i.value_json))
        for k, v in row.items():
            if isinstance(v, dict) and "_type" in v:
                out.setdefault(k, []).append((row["_step"], v))
    return out


def test_mlflow_images_and_tables_are_wandb_media_at_their_step(store: dict, tmp_path: Path) -> None:
    wb = tmp_path / "wb"
    p = run_cli("migrate", f"mlflow+{store['uri']}", f"wandb+offline://{wb}", "--experiment", "media")
    assert "verify: identical (1 projects, 1 runs" in p.stdout, p.stdout
    got = _wandb_media(wb)
    assert [(s, v["_type"]) for s, v in got["eval/samples"]] == [(0, "image-file"), (5, "image-file")]
    assert [(s, v["_type"]) for s, v in got["eval/predictions"]] == [(0, "table-file")]
    # the files W&B's panels read are there, the image the one MLflow saved
    (files,) = wb.glob("wandb/offline-run-*/files")
    from PIL import Image

    with Image.open(files / got["eval/samples"][1][1]["path"]) as im:
        assert im.size == (8, 8) and im.getpixel((0, 0))[:3] == (240, 240, 240)
    table = json.loads((files / got["eval/predictions"][0][1]["path"]).read_text())
    assert table["columns"] == ["id", "label"] and table["data"] == [[1, "cat"], [2, "dog"]]

    # and back: MLflow → W&B → MLflow gives the run MLflow had
    back = tmp_path / "back.db"
    p = run_cli("migrate", f"wandb+offline://{wb}", f"mlflow+sqlite:///{back}")
    assert "verify: identical (1 projects, 1 runs" in p.stdout, p.stdout
    from trackbridge.model import Selection
    from trackbridge.uri import open_source
    from trackbridge.verify import _compare_run

    sel = Selection()
    a, b = open_source(f"mlflow+{store['uri']}"), open_source(f"mlflow+sqlite:///{back}")
    (ra,) = [x for x in a.runs(sel, a.projects(sel)) if x["name"] == "with-media"]
    (rb,) = [x for x in b.runs(sel, b.projects(sel)) if x["name"] == "with-media"]
    diffs: list[str] = []
    _compare_run("with-media", a.read_run(ra), b.read_run(rb), a, b, diffs.append)
    assert diffs == []


def test_mlflow_to_mlflow_keeps_its_own_layout_without_a_private_copy(store: dict, tmp_path: Path) -> None:
    import mlflow

    dest = tmp_path / "d.db"
    p = run_cli("migrate", f"mlflow+{store['uri']}", f"mlflow+sqlite:///{dest}", "--experiment", "media")
    assert "verify: identical (1 projects, 1 runs" in p.stdout, p.stdout
    client = mlflow.MlflowClient(f"sqlite:///{dest}")
    (run,) = client.search_runs([client.get_experiment_by_name("media").experiment_id])
    files = {f.path for f in client.list_artifacts(run.info.run_id, "images")}
    assert len(files) == 4  # two images and their compressed copies: no second set
    assert "trackbridge" not in {f.path for f in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["mlflow.loggedImages"].lower() == "true"
