"""W&B offline runs, written by the real wandb SDK, read by our own `.wandb` reader.

The fixture is the quickstart's demo (``trackbridge.trackers.wandb.demo``); every W&B directory is in
the test sandbox. The checks compare against what the demo script logged, not against
our own reader's idea of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
from trackbridge import schema
from trackbridge.errors import BadInputError
from trackbridge.model import Selection
from trackbridge.trackers.mlflow import common as mc
from trackbridge.trackers.wandb.leveldb import BLOCK, RecordLog

from tests.conftest import run_cli

pytest.importorskip("wandb")


def _source(path: Path):
    from trackbridge.exporters.wandb.offline import WandbOfflineSource

    return WandbOfflineSource(str(path))


def _read_all(path: Path) -> dict[str, object]:
    src = _source(path)
    sel = Selection()
    return {r["name"]: src.read_run(r) for r in src.runs(sel, src.projects(sel))}


def _metrics(payload) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for b in payload.metrics():
        for r in b.to_pylist():
            out.setdefault(r["key"], []).append((r["step"], r["value"]))
    return out


def test_reader_maps_every_field(wandb_demo: Path) -> None:
    runs = _read_all(wandb_demo)
    assert set(runs) == {"baseline", "diverged", "resumed"}
    base = runs["baseline"]
    row = base.run
    assert row["status"] == "finished"
    assert row["labels"] == ["baseline", "resnet"]
    assert (row["notes"], row["group"], row["job_type"]) == (
        "First baseline of the demo sweep",
        "sweep-1",
        "train",
    )
    assert row["start_time"] is not None and row["end_time"] >= row["start_time"]
    assert row["host"] and row["command"]

    params = {
        tuple(p["path"]): (schema.loads_value(p["value_json"]), p["value_type"])
        for p in base.params.to_pylist()
    }
    assert params == {
        ("lr",): (0.001, "float"),
        ("epochs",): (40, "int"),
        ("optimizer", "name"): ("adam", "str"),
        ("optimizer", "betas"): ([0.9, 0.999], "list"),
        ("amp",): (True, "bool"),
    }

    m = _metrics(base)
    assert [s for s, _ in m["train/loss"]] == list(range(41))
    assert m["train/loss"][0] == (0, 1.0) and math.isnan(m["train/loss"][-1][1])
    assert len(m["train/acc"]) == len(m["lr"]) == 40
    assert "_runtime" in m  # W&B's own per-row clock is history too
    assert all(t is not None for b in base.metrics() for t in b.column("timestamp").to_pylist())

    summary = {tuple(r["path"]): json.loads(r["value_json"]) for r in base.summary.to_pylist()}
    assert summary[("best_acc",)] == 0.975
    assert summary[("status",)] == "converged"
    assert not any(p[0].startswith("_") for p in summary)

    series = {r["key"]: r for r in base.series.to_pylist()}
    assert series["samples"]["kind"] == "image-file" and series["samples"]["step"] == 41
    assert series["weights"]["kind"] == "histogram" and series["weights"]["file_path"] is None
    assert series["predictions"]["kind"] == "table-file"
    assert series["status"]["kind"] == "string" and json.loads(series["status"]["value_json"]) == "converged"
    files = {f.path for f in base.artifacts[0].files}
    assert series["samples"]["file_path"] in files and series["predictions"]["file_path"] in files

    model = next(a for a in base.artifacts if a.row["name"] == "demo-classifier")
    assert model.row["type"] == "model" and model.row["aliases"] == ["candidate", "production"]
    assert json.loads(model.row["metadata_json"]) == {"arch": "r18"}
    assert model.row["description"] == "ResNet weights" and len(model.row["digest"]) == 32
    (f,) = model.files
    assert f.path == "weights/model.bin"
    with f.fetch() as local:
        got = hashlib.sha256(Path(local).read_bytes()).hexdigest()
    assert got == hashlib.sha256(bytes(range(256)) * 64).hexdigest()
    usage = base.artifact_usage.to_pylist()
    assert {u["artifact_key"] for u in usage} == {a.row["artifact_key"] for a in base.artifacts[1:]}


def test_failed_run_large_record_and_resumed_segments(wandb_demo: Path) -> None:
    runs = _read_all(wandb_demo)
    diverged = runs["diverged"]
    assert diverged.run["status"] == "failed"  # exit code 1
    vocab = next(p for p in diverged.params.to_pylist() if p["path"] == ["vocab"])
    assert len(json.loads(vocab["value_json"])) == 6000  # a record split over several 32 KiB blocks
    log = next(wandb_demo.glob(f"*-{diverged.run['source_id']}/run-*.wandb"))
    assert log.stat().st_size > BLOCK

    resumed = runs["resumed"]
    assert [s for s, _ in _metrics(resumed)["val/loss"]] == list(range(20))  # both segments, in order
    assert resumed.run["status"] == "finished"


def _copy_run(wandb_demo: Path, tmp_path: Path, name: str) -> Path:
    runs = _read_all(wandb_demo)
    run_id = runs[name].run["source_id"]
    src = next(p for p in wandb_demo.iterdir() if p.name.endswith(f"-{run_id}"))
    dest = tmp_path / "wandb" / src.name
    shutil.copytree(src, dest)
    return next(dest.glob("run-*.wandb"))


def test_truncated_log_reads_every_whole_record_and_marks_the_run(wandb_demo: Path, tmp_path: Path) -> None:
    log = _copy_run(wandb_demo, tmp_path, "baseline")
    offsets = [o for o, _ in RecordLog(log).payloads()]
    whole = _metrics(_read_all(tmp_path)["baseline"])["train/loss"]
    cut = offsets[len(offsets) // 2] + 5  # inside a record's header: a killed writer
    with open(log, "r+b") as f:
        f.truncate(cut)
    payload = _read_all(tmp_path)["baseline"]
    assert payload.run["source_incomplete"] is True
    assert payload.run["status"] == "crashed"
    got = _metrics(payload)["train/loss"]
    assert 0 < len(got) < len(whole) and got == whole[: len(got)]
    assert any(kind == "source-incomplete" for kind, _, _ in payload.source_notes)


def test_corrupt_record_names_file_and_offset(wandb_demo: Path, tmp_path: Path) -> None:
    log = _copy_run(wandb_demo, tmp_path, "baseline")
    offsets = [o for o, _ in RecordLog(log).payloads()]
    bad = offsets[len(offsets) // 2]
    data = bytearray(log.read_bytes())
    data[bad + 9] ^= 0xFF  # one flipped bit pattern inside the payload
    log.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=rf"{log.name}: byte {bad}: record checksum mismatch"):
        list(RecordLog(log).payloads())


@pytest.mark.parametrize(
    ("byte", "flip", "says"),
    [
        (6, 0x80, "record checksum mismatch"),  # the type byte: the checksum covers it
        (5, 0x7F, "runs past its block"),  # the length's high byte: past the block's end
    ],
    ids=["type", "length"],
)
def test_a_damaged_header_mid_file_is_an_error_not_a_cut(
    wandb_demo: Path, tmp_path: Path, byte, flip, says
) -> None:
    """A damaged record header in the middle of the file names the file and the byte; it
    is never taken for the end of a cut-off file (which would drop every later record
    without a word)."""
    log = _copy_run(wandb_demo, tmp_path, "baseline")
    offsets = [o for o, _ in RecordLog(log).payloads()]
    bad = offsets[len(offsets) // 2]
    data = bytearray(log.read_bytes())
    data[bad + byte] ^= flip
    log.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=rf"{log.name}: byte {bad}: .*{says}"):
        list(RecordLog(log).payloads())


def test_not_a_wandb_file(tmp_path: Path) -> None:
    d = tmp_path / "offline-run-20260101_000000-abcdefgh"
    d.mkdir()
    (d / "run-abcdefgh.wandb").write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(BadInputError, match="not a W&B run file"):
        list(RecordLog(d / "run-abcdefgh.wandb").payloads())


def test_missing_staging_file_is_reported(tmp_path: Path) -> None:
    from trackbridge.trackers.wandb.demo import make_wandb_demo

    demo = make_wandb_demo(tmp_path / "demo")
    for f in (tmp_path / "demo" / "data" / "artifacts" / "staging").iterdir():
        f.unlink()  # what `wandb sync` does once it has uploaded them
    got = _read_all(demo)["baseline"]
    notes = {n[1]: n[2] for n in got.source_notes if n[0] == "source-file-missing"}
    assert "weights/model.bin" in notes["artifacts.demo-classifier"]
    assert "no longer in W&B's staging folder" in notes["artifacts.demo-classifier"]
    model = next(a for a in got.artifacts if a.row["name"] == "demo-classifier")
    assert model.files == [] and model.row["digest"]  # the metadata still moves


def test_migrate_to_mlflow_keeps_everything_and_is_idempotent(wandb_demo: Path, tmp_path: Path) -> None:
    import mlflow

    db = tmp_path / "dest.db"
    dest = f"mlflow+sqlite:///{db}"
    p = run_cli("migrate", f"wandb+offline://{wandb_demo}", dest, "--report", str(tmp_path / "r1.json"))
    assert "verify: identical (1 projects, 3 runs" in p.stdout, p.stdout
    report = json.loads((tmp_path / "r1.json").read_text())
    assert sorted(r["outcome"] for r in report["runs"]) == ["new", "new", "new"]

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (exp,) = [e for e in client.search_experiments() if e.name == "demo-research"]
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    base = runs["baseline"]
    assert base.data.params["optimizer.name"] == "adam"
    assert base.data.params["optimizer.betas"] == "[0.9,0.999]"  # JSON text; the type is in mapping.json
    assert base.data.params["amp"] == "true"
    tags = base.data.tags
    assert tags["run.group"] == "sweep-1" and tags["run.job_type"] == "train"
    assert tags["label.baseline"] == "true" and tags["label.resnet"] == "true"
    assert tags["mlflow.note.content"] == "First baseline of the demo sweep"
    assert base.info.status == "FINISHED" and runs["diverged"].info.status == "FAILED"
    hist = client.get_metric_history(base.info.run_id, "train/loss")
    assert len(hist) == 41 and math.isnan(hist[-1].value)
    src = _read_all(wandb_demo)["baseline"]
    assert base.info.start_time == int(src.run["start_time"].timestamp() * 1000)

    local = Path(client.download_artifacts(base.info.run_id, "", str(tmp_path / "dl")))
    image = src.series.to_pylist()
    image_path = next(r["file_path"] for r in image if r["kind"] == "image-file")
    original = next(a for a in src.artifacts if a.row["type"] == "run-files")
    with next(f for f in original.files if f.path == image_path).fetch() as orig:
        assert (local / image_path).read_bytes() == Path(orig).read_bytes()
    # the model artifact is an MLflow 3 logged model of the run, its files the model's
    assert not (local / "artifacts/demo-classifier").exists()
    (model,) = client.search_logged_models([exp.experiment_id])
    assert (model.name, model.source_run_id) == ("demo-classifier", base.info.run_id)
    assert [o.model_id for o in base.outputs.model_outputs] == [model.model_id]
    assert json.loads((local / "trackbridge/extras.json").read_text())["summary"]

    again = run_cli("migrate", f"wandb+offline://{wandb_demo}", dest, "--report", str(tmp_path / "r2.json"))
    report2 = json.loads((tmp_path / "r2.json").read_text())
    assert [r["outcome"] for r in report2["runs"]] == ["unchanged"] * 3, again.stdout
    assert len(client.search_runs([exp.experiment_id])) == 3
    assert len(client.get_metric_history(base.info.run_id, "train/loss")) == 41


def test_corrupt_run_fails_alone_and_is_not_marked_complete(wandb_demo: Path, tmp_path: Path) -> None:
    import mlflow

    shutil.copytree(wandb_demo, tmp_path / "src")
    runs = _read_all(tmp_path / "src")
    bad_id = runs["baseline"].run["source_id"]
    log = next((tmp_path / "src").glob(f"*-{bad_id}/run-*.wandb"))
    offsets = [o for o, _ in RecordLog(log).payloads()]
    data = bytearray(log.read_bytes())
    data[offsets[len(offsets) // 2] + 9] ^= 0xFF
    log.write_bytes(bytes(data))
    db = tmp_path / "dest.db"
    p = run_cli("migrate", f"wandb+offline://{tmp_path / 'src'}", f"mlflow+sqlite:///{db}", check=None)
    assert p.returncode == 1, p.stdout + p.stderr  # partial: some runs failed
    assert "checksum mismatch" in p.stdout + p.stderr and "byte" in p.stdout + p.stderr
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("demo-research")
    names = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"diverged", "resumed"} <= set(names)
    assert "baseline" not in names or "fingerprint" not in mc.run_state(names["baseline"].data.tags)


def test_fast_path_gives_exactly_what_the_sdk_classes_give(wandb_demo: Path) -> None:
    """History and summary records take a bulk decoding path; it must change nothing."""
    from trackbridge.exporters.wandb.builder import RunBuilder

    logs = sorted(wandb_demo.glob("offline-run-*/run-*.wandb"))
    assert len(logs) >= 4
    for log in logs:
        got = {}
        for fast in (True, False):
            p = RunBuilder("k", fast=fast)
            p.read(log)
            metrics, series = p.tables()
            # as JSON text, where NaN equals NaN
            got[fast] = json.dumps(
                [metrics.to_pylist(), series.to_pylist(), p.summary_rows(), p.config], default=str
            )
            assert (p.fast_records > 0) == fast
        assert got[True] == got[False], log
        assert '"train/' in got[True] or '"val/' in got[True]  # and they did read the history
