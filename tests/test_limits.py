"""MLflow's limits never drop data silently: each mapping is reported and reversible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
from trackbridge import engine
from trackbridge.bundle import BundleWriter
from trackbridge.bundle_reader import BundleSource
from trackbridge.importers.mlflow.plan import MAX_KEY, MAX_PARAM, MAX_TAG, fit_key
from trackbridge.model import Selection
from trackbridge.trackers.mlflow import common as mc
from trackbridge.uri import open_sink, open_source
from trackbridge.verify import verify

from tests import factories as f

LONG_KEY = "k" * 300
NASTY_PARAMS = [
    (["optimizer", "lr"], 0.001),  # nested config with a float
    (["optimizer.lr"], "dotted, a different key"),  # collides with the nested one once joined
    (["layers"], [64, 32]),
    (["flag"], True),
    (["nothing"], None),
    ([LONG_KEY], "long key"),
    (["bad key!@#"], "charset"),
    (["../escape"], "path trick"),
    (["big"], "v" * (MAX_PARAM + 1000)),
]


def _bundle(tmp_path):
    row = f.run("test:run/limits", status="crashed")
    pl = f.payload(
        row,
        params=NASTY_PARAMS,
        tags={"note/../x": "y", "huge": "t" * (MAX_TAG + 10), "ok": "fine"},
        points=[
            ("loss@val", 0, 1.5),
            ("loss@val", 1, float("nan")),
            ("loss@val", 1, 0.5),
            ("acc", 0, 0.1),
            ("a" * 260, 0, 2.0),
        ],
    )
    return f.write_bundle(tmp_path / "bundle", [f.project()], [pl])


def test_fit_key_meets_mlflow_rules():
    import re

    for k in ["a b:c/d.e-f_g", "x@y", "a//b", "/lead", "trail/", "../up", "a/./b", "k" * 400, "ü-ok"]:
        fk = fit_key(k)
        assert re.match(r"^[/\w.\- :]*$", fk) and len(fk) <= MAX_KEY
        assert not fk.startswith("/") and ".." not in fk.split("/") and "//" not in fk


def test_every_mapping_is_reported_and_reversed(tmp_path):
    bundle = _bundle(tmp_path)
    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    report = engine.copy(BundleSource(bundle), open_sink(dest), Selection())
    assert not report.failed, report.summary_lines()
    kinds = sorted({(m.kind, m.field) for _, m in report.all_mappings()})
    assert ("value-truncated", "params.big") in kinds
    assert ("value-truncated", "tags.huge") in kinds
    assert ("key-renamed", "params.bad key!@#") in kinds
    assert ("key-renamed", f"params.{LONG_KEY}") in kinds
    assert ("key-renamed", "metrics.loss@val") in kinds
    assert ("key-renamed", "tags.note/../x") in kinds
    assert ("status-mapped", "runs.status") in kinds

    client = mc.client(dest.split("+", 1)[1])
    run = client.search_runs([client.get_experiment_by_name("limits").experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags[mc.TAG_SOURCE_STATUS] == "crashed"
    assert len(run.data.params["big"]) == MAX_PARAM and run.data.params["big"].endswith(
        "[truncated by trackbridge]"
    )
    assert run.data.params["bad key___"] == "charset"
    assert (
        "optimizer.lr" in run.data.params
        and len([k for k in run.data.params if k.startswith("optimizer.lr")]) == 2
    )
    hist = client.get_metric_history(run.info.run_id, "loss_val")
    assert len(hist) == 3 and sum(math.isnan(m.value) for m in hist) == 1
    local = client.download_artifacts(run.info.run_id, mc.MAPPING_ARTIFACT, str(tmp_path))
    mapping = json.loads(Path(local).read_text())
    assert mapping["params"]["big"]["value_json"] == json.dumps("v" * (MAX_PARAM + 1000))
    assert mapping["metrics"]["loss_val"] == "loss@val"

    # reading the destination back restores every original key, value and type
    diffs, stats = verify(BundleSource(bundle), open_source(dest), Selection())
    assert diffs == [] and stats["points"] == 5
    back = tmp_path / "back"
    engine.copy(open_source(dest), BundleWriter(back), Selection())
    src = BundleSource(back)
    r = src.read_run(src.runs(Selection(), src.projects(Selection()))[0])
    params = {tuple(p["path"]): (p["value_json"], p["value_type"]) for p in r.params.to_pylist()}
    assert params[("optimizer", "lr")] == ("0.001", "float")
    assert params[("optimizer.lr",)] == ('"dotted, a different key"', "str")
    assert params[("layers",)] == ("[64,32]", "list") and params[("flag",)] == ("true", "bool")
    assert params[("nothing",)] == ("null", "null")
    assert mc.MAPPING_ARTIFACT not in [fr.path for a in r.artifacts for fr in a.files]


def test_verify_reports_a_lost_mapping(tmp_path):
    """If the mapping record is lost, verify must say so rather than pass."""
    bundle = _bundle(tmp_path)
    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    engine.copy(BundleSource(bundle), open_sink(dest), Selection())
    client = mc.client(dest.split("+", 1)[1])
    run = client.search_runs([client.get_experiment_by_name("limits").experiment_id])[0]
    state = {k: v for k, v in mc.run_state(run.data.tags).items() if k != "mapped"}
    client.set_tag(run.info.run_id, mc.TAG_STATE, mc.state_text(state))
    diffs, _ = verify(BundleSource(bundle), open_source(dest), Selection())
    assert any("params differ" in d for d in diffs) and any("metrics differ" in d for d in diffs)


def test_a_link_to_a_logged_model_outside_the_import_is_reported(tmp_path):
    row = f.run("test:run/linked")
    batch = f.metrics("test:run/linked", [("f1", 0, 0.9)])
    batch = batch.set_column(
        batch.schema.get_field_index("model_key"), "model_key", pa.array(["mlflow:model/m-elsewhere"])
    )
    pl = f.payload(row)
    pl.metrics = lambda: iter([batch])
    bundle = f.write_bundle(tmp_path / "bundle", [f.project()], [pl])
    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    report = engine.copy(BundleSource(bundle), open_sink(dest), Selection())
    assert report.points == 1 and not report.failed
    assert [m.kind for _, m in report.all_mappings()] == ["model-link-dropped"]


def _fingerprint(payload):
    from trackbridge.write import Fingerprint

    return Fingerprint(payload, "m1").value


def test_fingerprint_without_a_source_digest_sees_every_point():
    """A run whose source offers no digest is hashed in full, not from a printed summary."""
    points = [("loss", i, float(i)) for i in range(100)]
    a = f.payload(f.run("test:run/fp"), points=points)
    changed = list(points)
    changed[50] = ("loss", 50, -1.0)
    b = f.payload(f.run("test:run/fp"), points=changed)
    assert a.fingerprint is None and b.fingerprint is None
    assert _fingerprint(a) != _fingerprint(b)
    assert _fingerprint(a) == _fingerprint(f.payload(f.run("test:run/fp"), points=points))


def test_a_fingerprint_taken_while_writing_is_the_one_a_second_read_gives():
    """A new run's fingerprint comes from the points as they stream into the destination;
    it must equal the one the next import computes by reading the run, or every re-run
    would write every run again. A pass that stops early, or none, falls back to a read."""
    from trackbridge.write import Fingerprint

    points = [("loss", i, float(i)) for i in range(5_000)] + [("acc", i, 0.5) for i in range(3)]
    p = f.payload(f.run("test:run/stream"), points=points)
    expected = _fingerprint(p)
    fp = Fingerprint(p, "m1")
    streamed = fp.stream(p)
    assert sum(b.num_rows for b in streamed.metrics()) == len(points)
    assert sum(b.num_rows for b in streamed.metrics()) == len(points)  # a second pass is not hashed
    assert fp.value == expected and expected.endswith(".m1")
    early = Fingerprint(p, "m1")
    next(iter(early.stream(p).metrics()))
    assert early.value == expected
    assert Fingerprint(p, "w3").value == expected[:-3] + ".w3"


def test_sub_millisecond_times_and_infinities_are_reported(tmp_path):
    row = f.run("test:run/precise")
    batch = f.metrics("test:run/precise", [("x", 0, float("inf")), ("x", 1, 1.0)])
    ts = batch.column("timestamp").cast(pa.int64()).to_pylist()
    batch = batch.set_column(
        batch.schema.get_field_index("timestamp"),
        "timestamp",
        pa.array([ts[0] + 250, ts[1]], pa.int64()).cast(batch.schema.field("timestamp").type),
    )
    pl = f.payload(row)
    pl.metrics = lambda: iter([batch])
    bundle = f.write_bundle(tmp_path / "bundle", [f.project()], [pl])
    report = engine.copy(
        BundleSource(bundle), open_sink(f"mlflow+sqlite:///{tmp_path / 'd.db'}"), Selection()
    )
    assert report.points == 2
    assert sorted(m.kind for _, m in report.all_mappings()) == ["timestamp-truncated", "value-clamped"]


def test_an_unreadable_mapping_fails_the_run_instead_of_exporting_truncated_values(tmp_path):
    bundle = _bundle(tmp_path)
    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    engine.copy(BundleSource(bundle), open_sink(dest), Selection())
    for p in (tmp_path / "dest-artifacts").rglob("mapping.json"):
        p.unlink()
    report = engine.copy(open_source(dest), BundleWriter(tmp_path / "back"), Selection())
    assert report.count("failed") == 1
    assert "trackbridge/mapping.json cannot be read" in report.runs[0].error


def test_only_a_missing_endpoint_counts_as_no_logged_models():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ENDPOINT_NOT_FOUND, INTERNAL_ERROR

    assert mc.endpoint_missing(MlflowException("old server", error_code=ENDPOINT_NOT_FOUND))
    assert not mc.endpoint_missing(MlflowException("boom", error_code=INTERNAL_ERROR))
    assert not mc.endpoint_missing(ConnectionError("reset"))
