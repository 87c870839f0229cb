"""MLflow → bundle → MLflow, checked field by field with MLflow's own client.

These checks read the destination directly rather than through ``verify``, so a bug in
verify cannot hide a loss; a separate test shows that verify does catch differences.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
from pathlib import Path

import pytest
from trackbridge import engine
from trackbridge.bundle import BundleWriter
from trackbridge.bundle_reader import BundleSource
from trackbridge.cli import run_migrate, run_verify
from trackbridge.model import Selection
from trackbridge.trackers.mlflow import common as mc
from trackbridge.uri import open_sink, open_source

from tests.conftest import run_cli


def _client(uri: str):
    return mc.client(uri.split("+", 1)[1] if uri.startswith("mlflow+") else uri)


def _runs_by_name(client, exp_name: str) -> dict:
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(exp_name)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    return {r.info.run_name: r for r in runs}


def _history(client, run_id: str, key: str) -> list[tuple]:
    return sorted(
        (m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
        for m in client.get_metric_history(run_id, key)
    )


def _files(client, run_id: str, path: str | None = None) -> dict[str, bytes]:
    out = {}
    for fi in client.list_artifacts(run_id, path):
        if fi.is_dir:
            out.update(_files(client, run_id, fi.path))
        else:
            with tempfile.TemporaryDirectory(prefix="tb-dl-") as d:
                out[fi.path] = Path(client.download_artifacts(run_id, fi.path, d)).read_bytes()
    return out


def _dataset_inputs(run) -> list[tuple]:
    return [
        (
            d.dataset.name,
            d.dataset.digest,
            d.dataset.source,
            d.dataset.profile,
            d.dataset.schema,
            [(t.key, t.value) for t in d.tags],
        )
        for d in run.inputs.dataset_inputs
    ]


def _counts(db: Path) -> tuple[int, ...]:
    c = sqlite3.connect(db)
    try:
        return tuple(
            c.execute(f"select count(*) from {t}").fetchone()[0]
            for t in (
                "experiments",
                "runs",
                "metrics",
                "params",
                "tags",
                "model_versions",
                "logged_models",
                "inputs",
            )
        )
    finally:
        c.close()


@pytest.fixture(scope="module")
def migrated(demo_store, tmp_path_factory):
    """The demo store exported to a bundle and imported into a new SQLite store."""
    d = tmp_path_factory.mktemp("rt")
    bundle = d / "bundle"
    dest = f"mlflow+sqlite:///{d / 'dest.db'}"
    exp = engine.copy(open_source(demo_store["tb"]), BundleWriter(bundle), Selection())
    assert not exp.failed, exp.summary_lines()
    imp = engine.copy(BundleSource(bundle), open_sink(dest), Selection())
    assert not imp.failed, imp.summary_lines()
    return {"bundle": bundle, "dest": dest, "db": d / "dest.db", "export": exp, "import": imp}


def test_runs_keep_times_status_user_names_and_lifecycle(demo_store, migrated):
    src, dst = _client(demo_store["tb"]), _client(migrated["dest"])
    a, b = _runs_by_name(src, "demo-classifier"), _runs_by_name(dst, "demo-classifier")
    assert set(a) == set(b) == {"sweep", "trial-0", "trial-1", "killed-run", "deleted-run"}
    for name, ra in a.items():
        rb = b[name]
        assert rb.info.run_id != ra.info.run_id
        assert (rb.info.start_time, rb.info.end_time) == (ra.info.start_time, ra.info.end_time), name
        assert rb.info.start_time < 1_800_000_000_000  # not reset to import time
        assert rb.info.status == ra.info.status, name
        assert rb.info.user_id == ra.info.user_id, name
        assert rb.info.lifecycle_stage == ra.info.lifecycle_stage, name
        assert rb.data.tags[mc.TAG_SOURCE_KEY] == mc.run_key(ra.info.run_id)
    assert b["deleted-run"].info.lifecycle_stage == "deleted"
    assert b["trial-1"].info.status == "FAILED" and b["killed-run"].info.status == "KILLED"


def test_nesting_is_remapped_to_the_new_parent(migrated):
    b = _runs_by_name(_client(migrated["dest"]), "demo-classifier")
    assert b["trial-0"].data.tags[mc.TAG_PARENT] == b["sweep"].info.run_id
    assert b["trial-1"].data.tags[mc.TAG_PARENT] == b["sweep"].info.run_id


def test_params_tags_and_experiment(demo_store, migrated):
    src, dst = _client(demo_store["tb"]), _client(migrated["dest"])
    a, b = _runs_by_name(src, "demo-classifier"), _runs_by_name(dst, "demo-classifier")
    for name in a:
        assert b[name].data.params == a[name].data.params
        ta = {k: v for k, v in a[name].data.tags.items() if k != mc.TAG_PARENT}
        tb = {
            k: v
            for k, v in b[name].data.tags.items()
            if k != mc.TAG_PARENT and not k.startswith("trackbridge.")
        }
        assert tb == ta, name
    assert len(b["trial-0"].data.params["long_description"]) == 5000
    ea, eb = src.get_experiment_by_name("demo-classifier"), dst.get_experiment_by_name("demo-classifier")
    assert eb.tags["team"] == "research"
    assert eb.tags[mc.TAG_NOTE] == ea.tags[mc.TAG_NOTE]


def test_every_metric_point_with_nan_repeats_and_negative_steps(demo_store, migrated):
    src, dst = _client(demo_store["tb"]), _client(migrated["dest"])
    a, b = _runs_by_name(src, "demo-classifier"), _runs_by_name(dst, "demo-classifier")
    for name in a:
        keys = set(a[name].data.metrics)
        assert set(b[name].data.metrics) == keys
        for k in keys:
            assert _history(dst, b[name].info.run_id, k) == _history(src, a[name].info.run_id, k)
    hist = _history(dst, b["trial-0"].info.run_id, "val/acc")
    assert [p for p in hist if p[0] == 3] and len([p for p in hist if p[0] == 3]) == 3
    assert any(p[2] == "nan" for p in _history(dst, b["trial-0"].info.run_id, "train/loss"))
    assert _history(dst, b["trial-0"].info.run_id, "epoch")[0][0] == -1


def test_artifacts_byte_for_byte_and_dataset_inputs(demo_store, migrated):
    src, dst = _client(demo_store["tb"]), _client(migrated["dest"])
    a, b = _runs_by_name(src, "demo-classifier"), _runs_by_name(dst, "demo-classifier")
    fa, fb = _files(src, a["trial-0"].info.run_id), _files(dst, b["trial-0"].info.run_id)
    assert set(fa) == {"notes.txt", "model/weights.bin", "model/sub/config.json"}
    assert fa == fb
    # artifacts of an in-process SQLite store sit beside the database, not in the CWD,
    # including those of the store's own "Default" experiment
    beside = Path(migrated["db"]).parent.as_uri()
    assert b["trial-0"].info.artifact_uri.startswith(beside)
    assert dst.get_experiment("0").artifact_location.startswith(beside)
    da, db = _dataset_inputs(a["trial-0"]), _dataset_inputs(b["trial-0"])
    assert da == db and len(da) == 1


def test_logged_model_with_files_params_and_linked_metric(demo_store, migrated):
    src, dst = _client(demo_store["tb"]), _client(migrated["dest"])
    b = _runs_by_name(dst, "demo-classifier")
    exp = dst.get_experiment_by_name("demo-classifier")
    models = dst.search_logged_models([exp.experiment_id])
    assert len(models) == 1
    m = models[0]
    orig = src.get_logged_model(demo_store["ids"]["logged_model"])
    assert (m.name, m.model_type, m.params, m.source_run_id) == (
        orig.name,
        orig.model_type,
        orig.params,
        b["trial-0"].info.run_id,
    )
    assert m.tags["framework"] == "torch"
    assert [fi.path for fi in dst.list_logged_model_artifacts(m.model_id)] == ["MLmodel"]
    assert [(x.key, x.value, x.step, x.dataset_name) for x in m.metrics] == [
        (x.key, x.value, x.step, x.dataset_name) for x in orig.metrics
    ]


def test_registry_versions_aliases_stages_and_rewritten_sources(migrated):
    dst = _client(migrated["dest"])
    rm = dst.get_registered_model("demo-classifier")
    assert rm.description == "The demo's image classifier" and rm.tags["owner"] == "alice"
    versions = {str(v.version): v for v in dst.search_model_versions("name='demo-classifier'")}
    assert set(versions) == {"1", "2"}
    run = _runs_by_name(dst, "demo-classifier")["trial-0"]
    v1, v2 = versions["1"], versions["2"]
    assert v1.run_id == run.info.run_id and v2.run_id == run.info.run_id
    assert v1.source == f"{run.info.artifact_uri}/model"
    assert v1.current_stage == "Staging" and v1.tags["validated"] == "yes"
    model = dst.search_logged_models([run.info.experiment_id])[0]
    assert v2.source == f"models:/{model.model_id}"
    assert {k: str(v) for k, v in rm.aliases.items()} == {"champion": "2", "baseline": "1"}


def test_manifest_and_report_name_the_source_exactly(demo_store, migrated):
    assert BundleSource(migrated["bundle"]).manifest["source"] == demo_store["tb"]
    assert migrated["export"].source == demo_store["tb"]
    assert migrated["import"].destination == migrated["dest"]


def test_second_import_adds_nothing_and_skips_writes(migrated):
    before = _counts(migrated["db"])
    report = engine.copy(BundleSource(migrated["bundle"]), open_sink(migrated["dest"]), Selection())
    assert _counts(migrated["db"]) == before
    assert report.count("unchanged") == len(report.runs) == 6
    assert report.points == 0 and report.models == {"new": 0, "unchanged": 2}


def test_verify_passes_and_catches_a_tampered_point(demo_store, migrated, tmp_path, capsys):
    assert run_verify(demo_store["tb"], migrated["dest"], Selection()) == 0
    assert "identical" in capsys.readouterr().out
    dest = f"mlflow+sqlite:///{tmp_path / 'tampered.db'}"
    engine.copy(BundleSource(migrated["bundle"]), open_sink(dest), Selection())
    assert run_verify(demo_store["tb"], dest, Selection()) == 0
    dst = _client(dest)
    run = _runs_by_name(dst, "demo-classifier")["killed-run"]
    from mlflow.entities import Metric

    dst.log_batch(run.info.run_id, metrics=[Metric("loss", 9.0, 1, 99)])
    dst.set_tag(run.info.run_id, "extra", "x")
    dst.set_registered_model_alias("demo-classifier", "champion", "1")
    assert run_verify(demo_store["tb"], dest, Selection()) == 4
    out = capsys.readouterr().out
    assert "aliases" in out
    assert "killed-run" in out and "metrics differ" in out and "'extra' only in destination" in out


def test_filters_select_experiment_and_time(demo_store, tmp_path):
    bundle = tmp_path / "b"
    sel = Selection(projects=("demo-regression",))
    engine.copy(open_source(demo_store["tb"]), BundleWriter(bundle), sel)
    runs = BundleSource(bundle).runs(Selection(), BundleSource(bundle).projects(Selection()))
    assert [r["name"] for r in runs] == ["linear"]
    from datetime import UTC, datetime

    bundle2 = tmp_path / "b2"
    sel = Selection(since=datetime.fromtimestamp(1_736_900_200, UTC), registry=False)
    engine.copy(open_source(demo_store["tb"]), BundleWriter(bundle2), sel)
    src2 = BundleSource(bundle2)
    names = sorted(r["name"] for r in src2.runs(Selection(), src2.projects(Selection())))
    assert names == ["deleted-run", "killed-run", "linear"]


@pytest.mark.parametrize("bulk", [False, True])
def test_interrupted_import_is_completed_without_duplicates(
    demo_store, migrated, tmp_path, monkeypatch, bulk
):
    """Through MLflow's API, a run whose import died half-way has no fingerprint, and the
    next import fills the gap. On the bulk path (a new run into a SQL store, committed
    whole) the run is not there at all, and the next import writes it whole."""
    dest = f"mlflow+sqlite:///{tmp_path / 'half.db'}"
    api_only = {} if bulk else {"TRACKBRIDGE_BULK": "0"}
    for k, v in api_only.items():
        monkeypatch.setenv(k, v)
    sink = open_sink(dest)
    sink._batch = 10  # small batches, so a run dies with some of its points written
    calls = {"n": 0}
    # the bulk path holds a new run's points column-wise, not in batches sent
    hook = "_pending_points" if bulk else "_send_metrics"
    real = getattr(sink, hook)

    def failing(run_id, recs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("simulated crash after the first metric batch")
        return real(run_id, recs)

    monkeypatch.setattr(sink, hook, failing)
    first = engine.copy(BundleSource(migrated["bundle"]), sink, Selection())
    assert first.count("failed") == 1
    failed = next(r.run_key for r in first.runs if r.outcome == "failed")
    left = [r for r in _client(dest).search_runs(
        [e.experiment_id for e in _client(dest).search_experiments(view_type=3)], run_view_type=3
    ) if r.data.tags.get(mc.TAG_SOURCE_KEY) == failed]  # fmt: skip
    assert len(left) == (0 if bulk else 1)  # half-written through the API; absent on the bulk path
    monkeypatch.undo()
    for k, v in api_only.items():
        monkeypatch.setenv(k, v)
    second = engine.copy(BundleSource(migrated["bundle"]), open_sink(dest), Selection())
    assert not second.failed
    assert second.count("new" if bulk else "updated") == 1
    assert _counts(tmp_path / "half.db") == _counts(migrated["db"])
    assert run_verify(demo_store["tb"], dest, Selection()) == 0


def test_server_round_trip_and_server_to_sqlite(demo_store, mlflow_server, tmp_path, capsys):
    server = f"mlflow+{mlflow_server}"
    assert run_migrate(demo_store["tb"], server, Selection(), workers=3) == 0
    assert "identical" in capsys.readouterr().out
    # and back out of the server, into a fresh SQLite store
    dest = f"mlflow+sqlite:///{tmp_path / 'from-server.db'}"
    assert run_migrate(server, dest, Selection(), workers=2) == 0
    out = capsys.readouterr().out
    assert "identical" in out
    b = _runs_by_name(_client(dest), "demo-classifier")
    assert (
        b["trial-0"].info.start_time
        == _runs_by_name(_client(demo_store["tb"]), "demo-classifier")["trial-0"].info.start_time
    )
    # a second migration into the server adds nothing
    assert run_migrate(demo_store["tb"], server, Selection(), do_verify=False) == 0
    assert "0 new, 0 updated, 6 unchanged" in capsys.readouterr().out


def test_cli_migrate_and_inspect(demo_store, tmp_path):
    dest = f"mlflow+sqlite:///{tmp_path / 'cli.db'}"
    p = run_cli(
        "migrate",
        demo_store["tb"],
        dest,
        "--bundle",
        str(tmp_path / "bundle"),
        "--report",
        str(tmp_path / "report.json"),
    )
    assert "verify: identical" in p.stdout
    import json

    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["summary"]["new"] == 6 and rep["summary"]["points"] == 310
    p = run_cli("inspect", str(tmp_path / "bundle"), "--check")
    assert "schema version: 1" in p.stdout and "check: every file and blob" in p.stdout
    p = run_cli("import", str(tmp_path / "bundle"), dest, "--dry-run")
    assert "0 new, 0 updated, 6 unchanged" in p.stdout and "dry run" in p.stdout


def test_sql_fast_path_stores_what_log_batch_stores(tmp_path):
    """Points into an in-process SQLite store bypass the ORM (``SqlPoints``); the rows,
    the duplicate rule and the latest values must be exactly ``log_batch``'s."""
    import pyarrow as pa
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from trackbridge import schema
    from trackbridge.importers.mlflow.sink import MlflowSink

    inf, nan = math.inf, math.nan
    points = [  # (key, step, ms, value): NaN, ±inf, repeats, out of order, negative steps
        ("loss", 0, 1000, 1.0),
        ("loss", 2, 1002, 0.5),
        ("loss", 1, 1001, nan),
        ("loss", 2, 1002, 0.5),  # the same point twice in one batch
        ("loss", 2, 1003, 0.4),  # the same step, later
        ("acc", -1, 900, inf),
        ("acc", 5, 905, -inf),
        ("acc", 5, 905, 0.7),  # a tie on step and time: the larger value is latest
        ("lr", 3, 950, nan),
        ("lr", 3, 950, nan),
    ]
    later = [("loss", 2, 1002, 0.5), ("loss", 9, 2000, 0.1), ("lr", 1, 999, 0.2)]  # one repeat

    def batch(rows):
        k, st, ms, v = zip(*rows, strict=True)
        ts = pa.array([x * 1000 for x in ms], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        return schema.metrics_table(
            "r", pa.array(k), pa.array(st, pa.int64()), ts, pa.array(v, pa.float64())
        ).to_batches()[0]

    fast_uri, api_uri = f"sqlite:///{tmp_path / 'fast.db'}", f"sqlite:///{tmp_path / 'api.db'}"
    sink = MlflowSink(fast_uri)
    assert sink._sql is not None  # the fast path is in use for this store
    fast = MlflowClient(fast_uri)
    fast_run = fast.create_run(fast.create_experiment("e")).info.run_id
    for rows in (points, later, later):  # the last one again: nothing may be added
        sink.append_points(fast_run, batch(rows))

    api = MlflowClient(api_uri)
    api_run = api.create_run(api.create_experiment("e")).info.run_id
    for rows in (points, later, later):
        api.log_batch(api_run, metrics=[Metric(k, v, ms, st) for k, st, ms, v in rows])

    def stored(c, run_id):
        hist = {
            k: sorted((m.step, m.timestamp, repr(m.value)) for m in c.get_metric_history(run_id, k))
            for k in ("loss", "acc", "lr")
        }
        latest = {k: repr(v) for k, v in c.get_run(run_id).data.metrics.items()}
        return hist, latest

    got, want = stored(fast, fast_run), stored(api, api_run)
    assert got == want
    assert len(got[0]["loss"]) == 5 and got[1]["loss"] == "0.1" and got[1]["acc"] == "0.7"


def test_sql_fast_path_retries_a_locked_database(tmp_path, monkeypatch):
    """Another process writing the same SQLite file: the batch waits and goes in once."""
    import sqlite3 as sq

    import pyarrow as pa
    from mlflow import MlflowClient
    from trackbridge import schema
    from trackbridge.importers.mlflow.sink import MlflowSink

    uri = f"sqlite:///{tmp_path / 'locked.db'}"
    sink = MlflowSink(uri)
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("e")).info.run_id
    real, tries = sink._sql.write, []

    def locked_once(rid, recs):
        tries.append(len(recs))
        if len(tries) == 1:
            raise sq.OperationalError("database is locked")
        return real(rid, recs)

    monkeypatch.setattr(sink._sql, "write", locked_once)
    ts = pa.array([1_000_000 * s for s in range(5)], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    batch = schema.metrics_table(
        "r", pa.array(["loss"] * 5), pa.array(range(5), pa.int64()), ts, pa.array([0.5] * 5)
    ).to_batches()[0]
    sink.append_points(run_id, batch)
    assert tries == [5, 5]
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [0, 1, 2, 3, 4]


def test_history_pages_parse_exactly_as_python_json():
    """The REST export parses ``get-history`` pages with Arrow's JSON reader; whatever it
    gives must be what Python's json gives, and the pages Arrow refuses (proto3 spells NaN
    and the infinities as strings) must still come through, value for value."""
    import json
    import random

    from trackbridge.exporters.mlflow.history import _parse_page

    rng = random.Random(3)
    values = [rng.uniform(-1e6, 1e6) for _ in range(2000)] + [5e-324, 1.7976931348623157e308, -0.0, 1 / 3]
    points = [
        {"key": "m", "value": v, "timestamp": 1_700_000_000_000 + i, "step": i - 5}
        for i, v in enumerate(values)
    ]
    del points[0]["step"]  # proto3 leaves out zero fields
    del points[1]["value"]
    points[2]["run_id"] = "abc"  # a field this reader does not need
    body = json.dumps({"metrics": points, "next_page_token": "tok"}, indent=2).encode()
    page, token = _parse_page(body)
    assert token == "tok"
    assert page.column("step").to_pylist() == [p.get("step", 0) for p in points]
    assert page.column("timestamp").to_pylist() == [p["timestamp"] for p in points]
    assert page.column("value").to_pylist() == [p.get("value", 0.0) for p in points]

    odd = [{"key": "m", "value": v, "timestamp": 5, "step": 1} for v in ("NaN", "Infinity", "-Infinity", 2.5)]
    page, token = _parse_page(json.dumps({"metrics": odd}).encode())
    got = page.column("value").to_pylist()
    assert math.isnan(got[0]) and got[1:] == [math.inf, -math.inf, 2.5] and token is None
    for empty in (b"{}", b'{"metrics": []}'):
        page, token = _parse_page(empty)
        assert page.num_rows == 0 and token is None


def test_run_files_leave_out_a_logged_model_of_the_same_name(tmp_path):
    """Below the root, ``MlflowClient.list_artifacts`` goes through ``runs:/``, which also
    lists the files of a logged model named like the folder. Those belong to the logged
    model, which travels as its own artifact: the run's files must be the run's alone."""
    import pyarrow.parquet as pq
    from mlflow.entities import LoggedModelStatus

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mc.client(uri)
    # its files beside the store (MLflow's client alone would put them in ./mlruns)
    exp = client.create_experiment("same-name", artifact_location=(tmp_path / "artifacts").as_uri())
    rid = client.create_run(exp).info.run_id
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weights.bin").write_bytes(b"run's own")
    client.log_artifacts(rid, str(tmp_path / "mine"), "model")
    lm = client.create_logged_model(exp, name="model", source_run_id=rid)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    client.log_model_artifact(lm.model_id, str(tmp_path / "MLmodel"))
    client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    client.set_terminated(rid)

    bundle = tmp_path / "bundle"
    rep = engine.copy(open_source(f"mlflow+{uri}"), BundleWriter(bundle), Selection())
    assert not rep.failed, rep.summary_lines()
    files = pq.read_table(bundle / "artifact_files").to_pylist()
    by_artifact = {}
    for f in files:
        by_artifact.setdefault(f["artifact_key"], []).append(f["path"])
    assert by_artifact[mc.files_key(rid)] == ["model/weights.bin"]
    assert by_artifact[mc.model_key(lm.model_id)] == ["MLmodel"]
