"""Neptune's three forms in, MLflow and W&B out: every field, twice, and bad input.

The offline folders are written by the real ``neptune`` and ``neptune-scale`` SDKs (see
tests/neptune_fixtures.py); the exporter's Parquet is built to its schema with pyarrow.
Each migration ends with trackbridge's field-by-field verify, and the checks here look
at the destination itself for what verify cannot see: the exact decimal steps, types
and names as a user of MLflow or W&B finds them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trackbridge.errors import BadInputError
from trackbridge.model import Selection
from trackbridge.uri import open_source

from tests.conftest import run_cli
from tests.neptune_fixtures import write_exporter, write_legacy, write_scale

pytest.importorskip("neptune")
pytest.importorskip("neptune_scale")


@pytest.fixture(scope="module")
def neptune_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("neptune")
    return {
        "legacy": write_legacy(root / "legacy"),
        "scale": write_scale(root / "scale"),
        "exporter": write_exporter(root / "exporter"),
    }


def _uri(kind: str, path: Path) -> str:
    return f"neptune-exporter://{path}" if kind == "exporter" else f"neptune+offline://{path}"


def _read(uri: str) -> dict[str, object]:
    src = open_source(uri)
    sel = Selection()
    return {r["source_id"]: src.read_run(r) for r in src.runs(sel, src.projects(sel))}


def _points(payload) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for b in payload.metrics():
        for r in b.to_pylist():
            out.setdefault(r["key"], []).append((r["step"], r["value"]))
    return out


def _params(payload) -> dict[str, tuple[str, str]]:
    return {"/".join(p["path"]): (p["value_json"], p["value_type"]) for p in payload.params.to_pylist()}


# -- the readers


def test_legacy_offline_run_reads_every_field(neptune_data: dict[str, Path]) -> None:
    (run,) = _read(_uri("legacy", neptune_data["legacy"])).values()
    r = run.run
    assert r["name"] == "legacy run" and r["notes"] == "a 1.x run" and r["status"] == "finished"
    assert r["labels"] == ["baseline", "cnn", "extra"]
    assert r["project_key"] == "neptune:project/offline/legacy"  # 1.x offline runs hold no project
    # steps 0, 0.5, 1, ... of two keys; eval/acc's 0, 1, 2 and the image's 0 stay as logged
    assert r["start_time"] is not None and json.loads(r["step_scales"]) == {"train/log": 10, "train/loss": 10}
    p = _params(run)
    assert p["parameters/lr"] == ("0.001", "float") and p["parameters/epochs"] == ("3", "int")
    assert p["parameters/augment"] == ("true", "bool") and p["parameters/model/depth"] == ("18", "int")
    assert p["parameters/started"] == ('"2025-06-01T12:00:00+00:00"', "datetime")
    assert p["data/classes"] == ('["cat","dog"]', "string_set")
    assert "scratch" not in p  # deleted in the run
    pts = _points(run)
    # the 1.x client itself drops NaN with a warning: it never reaches the log
    assert [s for s, _ in pts["train/loss"]] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert pts["train/loss"][1][1] == 0.5
    assert pts["eval/acc"] == [(0, 0.5), (1, 0.6), (2, 0.7)]  # no step given: 0, 1, 2, unscaled
    kinds = {(s["key"], s["kind"]) for s in run.series.to_pylist()}
    assert kinds == {("train/log", "string"), ("samples", "neptune-file")}
    files = {f.path: f for f in run.artifacts[0].files}
    assert set(files) == {
        "model/weights/weights.bin",
        "data/config/config.yaml",
        "data/assets/a.txt",
        "data/assets/b.txt",
        "samples/0.png",
    }
    with files["model/weights/weights.bin"].fetch() as local:
        assert Path(local).read_bytes() == b"weights-bytes"
    missing = [n for n in run.source_notes if n[0] == "source-file-missing"]
    assert len(missing) == 1 and "gone.txt" in missing[0][2]


def test_scale_offline_runs_read_every_field(neptune_data: dict[str, Path]) -> None:
    runs = _read(_uri("scale", neptune_data["scale"]))
    base, fork = runs["base-1"], runs["fork-1"]
    assert (
        base.run["group"] == "resnet-sweep"
        and base.run["start_time"].isoformat() == "2025-01-02T03:04:05+00:00"
    )
    assert base.run["labels"] == ["family-a", "gpu", "sweep"]
    # only the keys logged at quarter steps are scaled (issue 16): the others keep theirs
    assert json.loads(base.run["step_scales"]) == {"train/acc": 100, "train/loss": 100}
    assert fork.run["fork_parent_run_key"] == base.key and fork.run["fork_step"] == 1.5
    p = _params(base)
    assert p["params/batch"] == ("64", "int") and p["params/aug"] == ('["crop","flip"]', "string_set")
    assert p["params/when"] == ('"2024-05-06T00:00:00+00:00"', "datetime")
    pts = _points(base)
    assert [s for s, _ in pts["train/loss"]] == [0, 25, 50, 75, 100, 125, 150, 175]
    # a preview point a final value replaced is gone; one never replaced stays
    assert pts["val/loss"] == [(3, 0.8), (4, 0.7)]
    series = {(s["key"], s["step"]): s for s in base.series.to_pylist()}
    assert json.loads(series[("weights/hist", 1)]["value_json"]) == {
        "_type": "histogram",
        "bins": [0, 0.5, 1],
        "values": [3, 5],
    }
    assert json.loads(series[("logs/stdout", 2)]["value_json"]) == "epoch 2 done"
    assert series[("media/frame", 1)]["file_path"] == "media/frame/1.bin"
    paths = {f.path for f in base.artifacts[0].files}
    assert {"files/notes/notes.txt", "media/frame/0.bin", "media/frame/1.bin"} <= paths
    assert any(n[0] == "source-file-missing" and "gone.txt" in n[2] for n in base.source_notes)


def test_exporter_parquet_reads_every_field_and_the_registry(neptune_data: dict[str, Path]) -> None:
    uri = _uri("exporter", neptune_data["exporter"])
    runs = _read(uri)
    r1, r2 = runs["RUN-1"], runs["RUN-2"]
    assert r1.run["name"] == "exported run" and r1.run["user"] == "alice" and r1.run["group"] == "exp-main"
    assert json.loads(r1.run["step_scales"])["train/loss"] == 1_000_000  # a step of 0.000001
    tags = {t["key"]: t["value"] for t in r1.tags.to_pylist()}
    assert tags["sys/custom_run_id"] == "custom-abc" and tags["sys/id"] == "EXP-1"
    steps = [s for s, _ in _points(r1)["train/loss"]]
    exact = [Decimal(s) / 1_000_000 for s in steps]
    assert exact == [Decimal(x) for x in ("0", "0.000001", "0.5", "1", "1.5", "123456.25", "200000")]
    assert (
        r2.run["status"] == "failed"
        and r2.run["fork_parent_run_key"] == r1.key
        and r2.run["fork_step"] == 1.5
    )
    assert {f.path for f in r1.artifacts[0].files} == {
        "model/ckpt/ckpt.pt",
        "dataset/part-a.csv",
        "dataset/sub/part-b.csv",
        "preds/0.png",
        "preds/1.5.png",
    }
    assert any("nope.pt" in n[2] for n in r1.source_notes if n[0] == "source-file-missing")
    src = open_source(uri)
    reg = src.registry(Selection())
    assert reg.registered_models.to_pylist()[0]["name"] == "classifier"
    versions = sorted(reg.model_versions.to_pylist(), key=lambda v: v["version"])
    assert [(v["version"], v["stage"], v["aliases"]) for v in versions] == [
        ("1", "Archived", []),
        ("2", "Production", ["production"]),
    ]
    assert dict(versions[1]["tags"])["validation/acc"] == "0.92"


def test_since_filters_at_listing_time(neptune_data: dict[str, Path]) -> None:
    from datetime import UTC, datetime

    def listed(kind: str, since: datetime) -> list[str]:
        src = open_source(_uri(kind, neptune_data[kind]))
        sel = Selection(since=since)
        return sorted(r["source_id"] for r in src.runs(sel, src.projects(sel)))

    assert listed("scale", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)) == ["base-1", "fork-1"]
    assert listed("scale", datetime(2025, 2, 1, tzinfo=UTC)) == ["fork-1"]  # made today
    assert listed("exporter", datetime(2025, 3, 1, 10, 0, 10, tzinfo=UTC)) == ["RUN-2"]
    assert listed("legacy", datetime(2100, 1, 1, tzinfo=UTC)) == []


# -- end to end


@pytest.mark.parametrize("kind", ["legacy", "scale", "exporter"])
def test_neptune_to_mlflow_field_by_field_and_again(
    kind: str, neptune_data: dict[str, Path], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    db = tmp_path / "m.db"
    dest = f"mlflow+sqlite:///{db}"
    src = _uri(kind, neptune_data[kind])
    p = run_cli("migrate", src, dest, "--report", str(tmp_path / "r1.json"))
    assert "verify: identical" in p.stdout, p.stdout
    c = MlflowClient(f"sqlite:///{db}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    by_scale = {r.data.tags.get("trackbridge.step_scale") for r in runs}
    # each fixture has a run with decimal steps, and only their keys are scaled
    assert {"train/log=10, train/loss=10", "train/acc=100, train/loss=100"} & by_scale or any(
        s and "train/loss=1000000" in s for s in by_scale
    ), by_scale
    if kind == "exporter":
        run = next(r for r in runs if r.info.run_name == "exported run")
        hist = c.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in hist][:3] == [0, 1, 500000]
        assert run.data.params["config.start"] == "2025-03-01T10:00:01+00:00"
        model = c.get_registered_model("classifier")
        assert {k: str(v) for k, v in model.aliases.items()} == {"production": "2"}
        v2 = c.get_model_version("classifier", "2")
        assert v2.source.startswith("models:/")
    p2 = run_cli("migrate", src, dest, "--report", str(tmp_path / "r2.json"))
    outcomes = {r["outcome"] for r in json.loads((tmp_path / "r2.json").read_text())["runs"]}
    assert outcomes == {"unchanged"}, p2.stdout
    assert "model versions: 0 new" in p2.stdout
    assert len(c.search_runs([e.experiment_id for e in c.search_experiments()])) == len(runs)


def test_decimal_step_keys_get_their_own_wandb_x_axis(neptune_data: dict[str, Path], tmp_path: Path) -> None:
    """In W&B, each key logged at decimal steps is charted on its own x-axis holding the
    exact step (``define_metric`` with a step metric), in rows after the others. Read from
    the W&B run's own record log. (This run's other keys are on a row counter of their
    own making: three series share step 1 at three times; test_wandb_import has the case
    where they keep ``_step``.)"""
    pytest.importorskip("wandb")
    from tests.test_wandb_import import _history_and_axes

    p = run_cli(
        "migrate", _uri("scale", neptune_data["scale"]), f"wandb+offline://{tmp_path}", "--no-registry"
    )
    assert "verify: identical" in p.stdout, p.stdout
    from trackbridge.trackers.wandb.runfolder import read_head

    (log,) = [
        log for log in tmp_path.glob("wandb/offline-run-*/run-*.wandb") if read_head(log).name == "base-1"
    ]
    rows, axes = _history_and_axes(log)
    assert (
        axes["train/loss"] == "trackbridge/step/train/loss"
        and axes["train/acc"] == "trackbridge/step/train/acc"
    )
    loss = [r for r in rows if "train/loss" in r]
    assert [r["trackbridge/step/train/loss"] for r in loss] == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]
    assert [r["trackbridge/step"] for r in rows if "val/loss" in r] == [3, 4]  # the exact Neptune steps
    others = [r["_step"] for r in rows if "train/loss" not in r and "train/acc" not in r]
    assert min(r["_step"] for r in loss) > max(others)


@pytest.mark.parametrize("kind", ["legacy", "scale", "exporter"])
def test_neptune_to_wandb_offline_field_by_field_and_again(
    kind: str, neptune_data: dict[str, Path], tmp_path: Path
) -> None:
    dest = f"wandb+offline://{tmp_path / 'wb'}"
    src = _uri(kind, neptune_data[kind])
    # W&B keeps artifacts only inside runs: an offline folder has no home for the registry
    p = run_cli("migrate", src, dest, "--no-registry", "--report", str(tmp_path / "r1.json"))
    assert "verify: identical" in p.stdout, p.stdout
    back = _read(dest)
    orig = _read(src)
    for sid, payload in orig.items():
        got = next(b for b in back.values() if b.run["name"] == payload.run["name"])
        assert got.run["step_scales"] == payload.run["step_scales"]
        assert _params(got) == _params(payload)
        assert _points(got).keys() == _points(payload).keys(), sid
    p2 = run_cli("migrate", src, dest, "--no-registry", "--report", str(tmp_path / "r2.json"))
    outcomes = {r["outcome"] for r in json.loads((tmp_path / "r2.json").read_text())["runs"]}
    assert outcomes == {"unchanged"}, p2.stdout
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == len(orig)


def test_nightly_sync_of_an_export_skips_unchanged_runs_unread(
    neptune_data: dict[str, Path], tmp_path: Path
) -> None:
    src = _uri("exporter", neptune_data["exporter"])
    dest = f"mlflow+sqlite:///{tmp_path / 'm.db'}"
    state = ("--state-dir", str(tmp_path / "state"))
    run_cli("sync", src, dest, *state, "--report", str(tmp_path / "r1.json"))
    first = json.loads((tmp_path / "r1.json").read_text())["pairs"][0]["summary"]
    assert (first["new"], first["models"]["new"]) == (2, 2)
    run_cli("sync", src, dest, *state, "--report", str(tmp_path / "r2.json"))
    again = json.loads((tmp_path / "r2.json").read_text())["pairs"][0]
    assert again["summary"]["unchanged"] == 2 and again["summary"]["points"] == 0
    assert again["summary"]["models"] == {"new": 0, "unchanged": 2}
    assert {r["outcome"] for r in again["runs"]} == {"unchanged"}


def test_neptune_is_a_source_only(neptune_data: dict[str, Path], tmp_path: Path) -> None:
    p = run_cli("migrate", _uri("legacy", neptune_data["legacy"]), f"neptune+offline://{tmp_path}", check=2)
    assert "shut down on 2026-03-05" in p.stderr + p.stdout


# -- bad input


def _copy_legacy(neptune_data: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    dest = tmp_path / "copy"
    shutil.copytree(neptune_data["legacy"] / ".neptune", dest / ".neptune")
    (log,) = (dest / ".neptune" / "offline").glob("*/data-1.log")
    return dest, log


def test_truncated_op_log_reads_whole_operations_and_marks_the_run(
    neptune_data: dict[str, Path], tmp_path: Path
) -> None:
    dest, log = _copy_legacy(neptune_data, tmp_path)
    data = log.read_bytes()
    cut = data.rfind(b'"LogFloats"') + 20  # inside the line of eval/acc's last point
    log.write_bytes(data[:cut])
    (run,) = _read(_uri("legacy", dest)).values()
    assert run.run["source_incomplete"] is True and run.run["status"] == "crashed"
    note = next(n for n in run.source_notes if n[0] == "source-incomplete")
    assert "data-1.log: line" in note[2] and "cut short" in note[2]
    assert _points(run)["eval/acc"] == [(0, 0.5), (1, 0.6)]


def test_garbled_op_log_line_names_file_and_line(neptune_data: dict[str, Path], tmp_path: Path) -> None:
    dest, log = _copy_legacy(neptune_data, tmp_path)
    lines = log.read_bytes().split(b"\n")
    lines[3] = b'{"obj": {"type": "AssignFl'
    log.write_bytes(b"\n".join(lines))
    p = run_cli("export", _uri("legacy", dest), str(tmp_path / "b"), check=None)
    assert p.returncode == 1  # that run failed, named; nothing marked complete
    assert "data-1.log: line 4: not a JSON operation" in p.stdout + p.stderr


def _copy_scale(neptune_data: dict[str, Path], tmp_path: Path) -> Path:
    shutil.copytree(neptune_data["scale"], tmp_path / ".neptune")
    return next((tmp_path / ".neptune").glob("ws_scale_base-1_*/run_operations.sqlite3"))


def test_locked_scale_database_is_one_line(neptune_data: dict[str, Path], tmp_path: Path) -> None:
    db = _copy_scale(neptune_data, tmp_path)
    # the queue is in WAL mode, where only a holder in exclusive locking mode (or a
    # crashed one's recovery) keeps a reader out
    holder = sqlite3.connect(db)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO metadata (version, project, run_id) VALUES ('v', 'p', 'r')")
    try:
        with pytest.raises(BadInputError, match="locked by another process"):
            _read(_uri("scale", tmp_path / ".neptune"))
    finally:
        holder.rollback()
        holder.close()


def test_corrupt_scale_database_is_one_line(neptune_data: dict[str, Path], tmp_path: Path) -> None:
    db = _copy_scale(neptune_data, tmp_path)
    db.write_bytes(b"this is not sqlite" * 100)
    p = run_cli("export", _uri("scale", tmp_path / ".neptune"), str(tmp_path / "b"), check=3)
    assert f"{db}: not a readable neptune-scale database" in p.stderr
    assert "Traceback" not in p.stderr


def test_parquet_from_an_unknown_exporter_version_is_refused(
    neptune_data: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "exp"
    shutil.copytree(neptune_data["exporter"], root)
    f = root / "data" / "ws_exported" / "RUN-2_part_0.parquet"
    tbl = pq.read_table(f)
    pq.write_table(tbl.append_column("series_aggregations", pa.nulls(tbl.num_rows, pa.string())), f)
    p = run_cli("export", _uri("exporter", root), str(tmp_path / "b"), check=3)
    assert "RUN-2_part_0.parquet: not from a neptune-exporter version this reader knows" in p.stderr
    assert "unknown columns ['series_aggregations']" in p.stderr
