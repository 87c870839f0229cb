"""`--register-models`: W&B model artifacts become MLflow registered model versions.

A W&B ``model`` artifact is an MLflow 3 logged model of the run that logged it (the runs
table's Models column lists it: the run's outputs name it), holding the files once; the
version's source is that model (``models:/<id>``), so lineage run → model → version
holds. W&B aliases become MLflow aliases, move when they move, and the same artifact
(name and digest) is never registered twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trackbridge.trackers.wandb import common as wc

from tests.conftest import run_cli

pytest.importorskip("wandb")

NEW_VERSION = r"""
import sys, wandb
root = sys.argv[1]
p = root + "/model-v2.bin"
open(p, "wb").write(b"better weights" * 100)
run = wandb.init(project="demo-research", name="retrain", settings=wandb.Settings(
    mode="offline", x_disable_stats=True, console="off", save_code=False))
run.log({"train/loss": 0.01}, step=0)
art = wandb.Artifact("demo-classifier", type="model")
art.add_file(p, name="weights/model.bin")
run.log_artifact(art, aliases=["production"])
run.finish()
"""


def _registry(db: Path) -> tuple[list, dict[str, str]]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    versions = sorted(client.search_model_versions("name='demo-classifier'"), key=lambda v: int(v.version))
    return versions, {k: str(v) for k, v in client.get_registered_model("demo-classifier").aliases.items()}


def test_model_artifacts_become_versions_once_and_aliases_move(wandb_demo: Path, tmp_path: Path) -> None:
    import mlflow

    src = tmp_path / "src"
    shutil.copytree(wandb_demo.parent, src, symlinks=True)
    db = tmp_path / "dest.db"
    dest = f"mlflow+sqlite:///{db}"
    p = run_cli("migrate", f"wandb+offline://{src / 'wandb'}", dest, "--register-models")
    assert "model versions: 1 new, 0 unchanged" in p.stdout, p.stdout
    assert "verify: identical (1 projects, 3 runs, 213 points, 1 model versions)" in p.stdout, p.stdout

    (v1,), aliases = _registry(db)
    assert aliases == {"candidate": "1", "production": "1"}
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run = client.get_run(v1.run_id)
    assert run.info.run_name == "baseline"  # lineage: the run that logged the artifact
    assert v1.tags["trackbridge.source_key"].startswith("wandb:artifact/demo-research/demo-classifier@")
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert v1.source == f"models:/{model.model_id}" and model.source_run_id == run.info.run_id
    assert (model.name, model.model_type, model.params) == ("demo-classifier", "model", {"arch": "r18"})
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]  # the Models column
    local = mlflow.artifacts.download_artifacts(
        f"{model.artifact_location}/weights/model.bin", dst_path=str(tmp_path / "m")
    )
    assert Path(local).read_bytes() == bytes(range(256)) * 64
    # the bytes are the model's, not a second copy in the run's own artifacts
    assert not [f for f in client.list_artifacts(run.info.run_id, "artifacts") if "demo-classifier" in f.path]

    p = run_cli("migrate", f"wandb+offline://{src / 'wandb'}", dest, "--register-models")
    assert "model versions: 0 new, 1 unchanged" in p.stdout, p.stdout

    # A later run logs a new version and takes "production": in MLflow the alias moves.
    env = {**os.environ, **wc.sandbox_env(src), "HOME": str(src / "home"), "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", NEW_VERSION, str(src)], env=env, check=True, timeout=300)
    p = run_cli(
        "migrate",
        f"wandb+offline://{src / 'wandb'}",
        dest,
        "--register-models",
        "--report",
        str(tmp_path / "r.json"),
    )
    assert "model versions: 1 new, 1 unchanged" in p.stdout, p.stdout
    versions, aliases = _registry(db)
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert len(client.search_logged_models([run.info.experiment_id])) == 2  # one per version, no copies
    assert aliases == {"candidate": "1", "production": "2"}
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["outcome"] for r in report["runs"]].count("new") == 1


def test_without_the_flag_no_model_is_registered(wandb_demo: Path, tmp_path: Path) -> None:
    db = tmp_path / "dest.db"
    p = run_cli("migrate", f"wandb+offline://{wandb_demo}", f"mlflow+sqlite:///{db}", "--no-verify")
    assert "model versions: 0 new, 0 unchanged" in p.stdout
