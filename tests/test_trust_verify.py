"""`verify` looks at the destination as its own users do: a duplicated run, a duplicated
model version, a run the source does not have and a byte changed in an artifact are all
differences (exit 4); and consolidating several MLflow stores into one is a normal use,
each store verifying on its own, an existing destination still recognised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trackbridge.trackers.mlflow import common as mc
from trackbridge.uri import canonical

from tests.conftest import run_cli
from tests.factories import small_mlflow_store


def _client(db: Path):
    return mc.client(f"sqlite:///{db}").unwrapped


@pytest.fixture
def migrated(demo_store, tmp_path: Path) -> tuple[str, Path]:
    """The demo MLflow store migrated into a new SQLite store, verified identical."""
    db = tmp_path / "dest.db"
    p = run_cli("migrate", demo_store["tb"], f"mlflow+sqlite:///{db}")
    assert "verify: identical" in p.stdout
    return demo_store["tb"], db


def _imported_runs(client, exp_name: str = "demo-classifier") -> list:
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(exp_name)
    return [
        r
        for r in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
        if mc.TAG_SOURCE_KEY in r.data.tags
    ]


def test_a_duplicated_run_is_a_difference_and_the_next_import_removes_it(migrated, tmp_path):
    src, db = migrated
    client = _client(db)
    original = next(r for r in _imported_runs(client) if r.info.lifecycle_stage == "active")
    key = original.data.tags[mc.TAG_SOURCE_KEY]
    # what two importers racing without trackbridge's guards left behind: a second run,
    # created as an importer creates one, whose import did not finish
    client.create_run(
        original.info.experiment_id,
        start_time=original.info.start_time,
        tags={mc.TAG_SOURCE_KEY: key, mc.TAG_USER: original.info.user_id},
        run_name=original.info.run_name,
    )
    p = run_cli("verify", src, f"mlflow+sqlite:///{db}", check=4)
    assert f"run {key}: 2 copies in destination" in p.stdout
    report = tmp_path / "r.json"
    p = run_cli("migrate", src, f"mlflow+sqlite:///{db}", "--report", str(report))
    assert "duplicate-removed" in p.stdout and "verify: identical" in p.stdout
    live = [r for r in _imported_runs(client) if r.data.tags[mc.TAG_SOURCE_KEY] == key]
    kept = [r for r in live if r.info.lifecycle_stage == "active"]
    retired = [r for r in live if mc.TAG_DUPLICATE_OF in r.data.tags]
    assert len(kept) == 1 and len(retired) == 1
    assert retired[0].info.lifecycle_stage == "deleted"
    assert retired[0].data.tags[mc.TAG_DUPLICATE_OF] == kept[0].info.run_id
    notices = json.loads(report.read_text())["mappings"]
    assert [m["kind"] for m in notices] == ["duplicate-removed"]


def test_a_duplicated_model_version_is_a_difference(migrated):
    src, db = migrated
    client = _client(db)
    v = client.search_model_versions("name='demo-classifier'")[0]
    with mc.global_tracking_uri(f"sqlite:///{db}"):  # MLflow resolves models:/ sources through it
        client.create_model_version(v.name, v.source, run_id=v.run_id, tags=dict(v.tags))
    p = run_cli("verify", src, f"mlflow+sqlite:///{db}", check=4)
    assert "model version" in p.stdout and "2 copies in destination" in p.stdout


def test_a_run_the_source_does_not_have_is_a_difference_only_if_it_came_from_this_source(migrated):
    src, db = migrated
    client = _client(db)
    exp = client.get_experiment_by_name("demo-classifier").experiment_id
    other = client.create_run(
        exp, tags={mc.TAG_SOURCE_KEY: "mlflow:run/not-here", mc.TAG_SOURCE: "mlflow+sqlite:////elsewhere.db"}
    )
    run_cli("verify", src, f"mlflow+sqlite:///{db}")  # another source's run: not this one's business
    client.create_run(exp, tags={mc.TAG_SOURCE_KEY: "mlflow:run/gone", mc.TAG_SOURCE: canonical(src)})
    p = run_cli("verify", src, f"mlflow+sqlite:///{db}", check=4)
    assert "run mlflow:run/gone: only in destination" in p.stdout
    assert "not-here" not in p.stdout and other.info.run_id not in p.stdout
    # a filter that narrows the source cannot tell a gone run from one left out
    run_cli("verify", src, f"mlflow+sqlite:///{db}", "--since", "2000-01-01")


def test_a_byte_changed_in_a_destination_artifact_is_a_difference(wandb_demo, tmp_path):
    src = f"wandb+offline://{wandb_demo}"
    db = tmp_path / "dest.db"
    run_cli("migrate", src, f"mlflow+sqlite:///{db}")
    # a W&B artifact's file: its SHA-256 is recorded in the destination, the bytes must be read
    target = next(p for p in (tmp_path / "dest-artifacts").rglob("artifacts/artifacts/*/*/*") if p.is_file())
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x20
    target.write_bytes(bytes(data))
    p = run_cli("verify", src, f"mlflow+sqlite:///{db}", check=4)
    assert f"file {target.name}: content differs" in p.stdout


def test_two_stores_each_with_experiment_1_consolidate_into_one(tmp_path):
    a = small_mlflow_store(tmp_path / "a.db", "exp-a", 0.5)
    b = small_mlflow_store(tmp_path / "b.db", "exp-b", 0.25)
    dest = f"mlflow+sqlite:///{tmp_path / 'dest.db'}"
    for src in (a, b):
        p = run_cli("migrate", src, dest)
        assert "verify: identical" in p.stdout and "model versions: 1 new" in p.stdout
    for src in (a, b):  # each still verifies on its own, and a re-run adds nothing
        p = run_cli("migrate", src, dest)
        assert "runs: 0 new" in p.stdout and "model versions: 0 new, 1 unchanged" in p.stdout
        assert "verify: identical" in p.stdout
    client = _client(tmp_path / "dest.db")
    assert sorted(int(v.version) for v in client.search_model_versions("name='churn'")) == [1, 2]


def test_a_destination_written_by_an_earlier_version_is_still_recognised(tmp_path):
    """Earlier versions keyed experiments and model versions without their creation time."""
    a = small_mlflow_store(tmp_path / "a.db", "exp-a", 0.5)
    b = small_mlflow_store(tmp_path / "b.db", "exp-b", 0.25)
    dest_db = tmp_path / "dest.db"
    dest = f"mlflow+sqlite:///{dest_db}"
    for src in (a, b):
        run_cli("migrate", src, dest)
    client = _client(dest_db)
    for e in client.search_experiments():
        key = e.tags.get(mc.TAG_SOURCE_KEY)
        if key:
            assert mc.legacy_key(key) != key
            client.set_experiment_tag(e.experiment_id, mc.TAG_SOURCE_KEY, mc.legacy_key(key))
    for v in client.search_model_versions("name='churn'"):
        key = v.tags[mc.TAG_SOURCE_KEY]
        client.set_model_version_tag("churn", v.version, mc.TAG_SOURCE_KEY, mc.legacy_key(key))
        client.delete_model_version_tag("churn", v.version, mc.TAG_SOURCE)
    for src in (a, b):
        p = run_cli("verify", src, dest)
        assert "verify: identical" in p.stdout
        p = run_cli("migrate", src, dest)
        assert "runs: 0 new" in p.stdout and "model versions: 0 new, 1 unchanged" in p.stdout
    assert len(client.search_model_versions("name='churn'")) == 2


def test_verify_of_a_bundle_knows_where_the_bundle_came_from(demo_store, tmp_path):
    bundle = tmp_path / "b"
    run_cli("export", demo_store["tb"], str(bundle))
    db = tmp_path / "d.db"
    run_cli("import", str(bundle), f"mlflow+sqlite:///{db}")
    client = _client(db)
    exp = client.get_experiment_by_name("demo-classifier").experiment_id
    client.create_run(
        exp, tags={mc.TAG_SOURCE_KEY: "mlflow:run/gone", mc.TAG_SOURCE: canonical(demo_store["tb"])}
    )
    for src in (str(bundle), demo_store["tb"]):
        p = run_cli("verify", src, f"mlflow+sqlite:///{db}", check=4)
        assert "run mlflow:run/gone: only in destination" in p.stdout
    shutil.rmtree(bundle)
