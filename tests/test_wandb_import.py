"""Writing W&B offline runs with the real SDK, and reading them back with our reader.

MLflow → W&B is where steps need mapping (MLflow keys step independently, repeat and go
negative); W&B → W&B checks that what the SDK cannot take (its own _runtime, system
metrics, reserved artifact types) is kept another way. Both must verify identical and
import a second time without a write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trackbridge.trackers.wandb.leveldb import RecordLog

from tests.conftest import run_cli

pytest.importorskip("wandb")

EXPERIMENTS = ("--experiment", "demo-classifier", "--experiment", "demo-regression", "--no-registry")


def _outcomes(path: Path) -> list[str]:
    return sorted(r["outcome"] for r in json.loads(path.read_text())["runs"])


def test_mlflow_to_wandb_offline_round_trip(demo_store: dict, tmp_path: Path) -> None:
    dest = f"wandb+offline://{tmp_path / 'wb'}"
    p = run_cli("migrate", demo_store["tb"], dest, *EXPERIMENTS, "--report", str(tmp_path / "r1.json"))
    assert "verify: identical (2 projects, 6 runs, 310 points" in p.stdout, p.stdout
    report = json.loads((tmp_path / "r1.json").read_text())
    kinds = {m["kind"] for r in report["runs"] for m in r["mappings"]}
    assert "step-axis" in kinds  # the demo's trials log repeated and negative steps
    assert _outcomes(tmp_path / "r1.json") == ["new"] * 6
    folders = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(folders) == 6 and all((f / "trackbridge.json").exists() for f in folders)

    p2 = run_cli("migrate", demo_store["tb"], dest, *EXPERIMENTS, "--report", str(tmp_path / "r2.json"))
    assert _outcomes(tmp_path / "r2.json") == ["unchanged"] * 6, p2.stdout
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 6


def test_registry_is_reported_not_dropped(demo_store: dict, tmp_path: Path) -> None:
    p = run_cli(
        "migrate",
        demo_store["tb"],
        f"wandb+offline://{tmp_path / 'wb'}",
        "--no-verify",
        "--report",
        str(tmp_path / "r.json"),
    )
    assert "registry-not-written" in p.stdout and "2 model version(s)" in p.stdout


def test_wandb_to_wandb_keeps_what_the_sdk_cannot_log(wandb_demo: Path, tmp_path: Path) -> None:
    dest = f"wandb+offline://{tmp_path / 'wb'}"
    p = run_cli("migrate", f"wandb+offline://{wandb_demo}", dest, "--report", str(tmp_path / "r.json"))
    assert "verify: identical (1 projects, 3 runs, 213 points" in p.stdout, p.stdout
    kinds = {m["kind"] for r in json.loads((tmp_path / "r.json").read_text())["runs"] for m in r["mappings"]}
    assert {"metrics-kept", "artifact-type"} <= kinds

    # several keys logged at one step stay one history row, in step order (no step axis)
    from wandb.proto import wandb_internal_pb2 as pb

    steps = []
    for folder in (tmp_path / "wb" / "wandb").glob("offline-run-*"):
        log = next(folder.glob("run-*.wandb"))
        rec = pb.Record()
        rows = []
        for _, payload in RecordLog(log).payloads():
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "history":
                keys = {".".join(i.nested_key) or i.key for i in rec.history.item}
                rows.append((rec.history.step.num, keys))
        if any("train/acc" in k for _, k in rows):
            steps = [s for s, _ in rows]
            assert all({"train/loss", "train/acc", "lr"} <= k for _, k in rows[:40])
    assert steps == sorted(steps) and len(steps) == 42  # 40 steps, NaN step, media step


def test_half_written_run_is_written_again_once(wandb_demo: Path, tmp_path: Path) -> None:
    dest = f"wandb+offline://{tmp_path / 'wb'}"
    run_cli("migrate", f"wandb+offline://{wandb_demo}", dest, "--no-verify")
    markers = list((tmp_path / "wb" / "wandb").glob("offline-run-*/trackbridge.json"))
    victim = markers[0]
    run_id = json.loads(victim.read_text())["run_id"]
    victim.unlink()  # as if the import was killed after the SDK finished, before the marker
    run_cli("migrate", f"wandb+offline://{wandb_demo}", dest, "--report", str(tmp_path / "r.json"))
    assert _outcomes(tmp_path / "r.json") == ["unchanged", "unchanged", "updated"]
    assert len(list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}*"))) == 1


def test_project_name_w_and_b_cannot_take_is_reported_and_read_back(tmp_path: Path) -> None:
    from tests import factories as f

    bundle = f.write_bundle(
        tmp_path / "b",
        [f.project(name="team/vision: v2")],
        [f.payload(f.run("test:run/a"), points=[("loss", 0, 1.0), ("loss", 1, 0.5)])],
    )
    p = run_cli(
        "migrate", str(bundle), f"wandb+offline://{tmp_path / 'wb'}", "--report", str(tmp_path / "r.json")
    )
    assert "verify: identical (1 projects, 1 runs, 2 points" in p.stdout, p.stdout
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    (renamed,) = [m for m in run["mappings"] if m["kind"] == "project-renamed"]
    assert "'team-vision- v2'" in renamed["detail"]


def test_mlflow_runs_land_natively_in_wandb_and_come_back_exact(demo_store: dict, tmp_path: Path) -> None:
    """MLflow's key/value tags are config a W&B user filters on, a nested search is one
    W&B run group, and MLflow → W&B → MLflow verifies identical (parents and the logged
    model's linked metric included)."""
    from wandb.proto import wandb_internal_pb2 as pb

    dest = f"wandb+offline://{tmp_path / 'wb'}"
    p = run_cli("migrate", demo_store["tb"], dest, *EXPERIMENTS)
    assert "verify: identical (2 projects, 6 runs" in p.stdout, p.stdout
    records = {}
    for log in (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"):
        rec = pb.Record()
        for _, payload in RecordLog(log).payloads():
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "run":
                config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
                records[rec.run.display_name] = (rec.run.run_group, config)
                break
    group, config = records["sweep"]
    assert config["tags"]["purpose"] == "hyperparameter sweep"
    assert not any(k.startswith("mlflow.") for k in config["tags"])  # MLflow's own: run fields
    assert group == "sweep" and records["trial-0"][0] == records["trial-1"][0] == "sweep"
    assert records["linear"][0] == ""  # not nested: no group

    back = f"mlflow+sqlite:///{tmp_path / 'back.db'}"
    p = run_cli("migrate", dest, back)
    assert "verify: identical (2 projects, 6 runs" in p.stdout, p.stdout


def _history_and_axes(log: Path) -> tuple[list[dict], dict[str, str]]:
    """A W&B run's history rows and its metrics' step metrics, from its own record log."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows, axes = [], {}
    for _, payload in RecordLog(log).payloads():
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "metric" and rec.metric.step_metric:
            axes[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
    return rows, axes


def test_a_decimal_step_key_gets_its_own_x_axis_and_the_others_keep_their_steps(tmp_path: Path) -> None:
    """Issue 16's case: `train/loss` at steps 0…299 and one key at decimal steps (Neptune
    scaled it ×10). In W&B the decimal key is charted on its own x-axis holding the exact
    step; `train/loss` keeps `_step` = its step, and nothing moves to a row counter."""
    from tests import factories as f

    points = [("train/loss", s, 1.0 / (s + 1)) for s in range(300)]
    points += [("eval/score", 2995, 0.5), ("eval/score", 3000, 0.6), ("eval/score", 3005, 0.7)]
    row = f.run("test:run/mixed", step_scales=json.dumps({"eval/score": 10}))
    bundle = f.write_bundle(tmp_path / "b", [f.project()], [f.payload(row, points=points)])
    p = run_cli("migrate", str(bundle), f"wandb+offline://{tmp_path / 'wb'}")
    assert "verify: identical (1 projects, 1 runs, 303 points" in p.stdout, p.stdout
    (log,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    rows, axes = _history_and_axes(log)
    assert axes == {"eval/score": "trackbridge/step/eval/score"}  # no row counter for the rest
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == [
        (s, 1.0 / (s + 1)) for s in range(300)
    ]
    score = [r for r in rows if "eval/score" in r]
    assert [(r["trackbridge/step/eval/score"], r["eval/score"]) for r in score] == [
        (299.5, 0.5),
        (300.0, 0.6),
        (300.5, 0.7),
    ]
    assert [r["_step"] for r in score] == [300, 301, 302]  # after the other rows, in order
