"""W&B runs land in MLflow as MLflow users would have logged them (issue 16), judged by
MLflow's own client: summary values searchable as metrics and tags, W&B tags searchable
with a value, images and drawn histograms in MLflow's image layout at their steps, a
W&B table loadable with ``MlflowClient.load_table``, system metrics under MLflow's names,
W&B's ``_runtime`` out of the user's metrics, and two trackbridge tags a run, not six.
Round trips stay exact, and a second import adds nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trackbridge.trackers.mlflow import common as mc

from tests.conftest import run_cli

pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trials of a small search, written by the real wandb SDK in offline mode."""
    from trackbridge.trackers.wandb.demo import make_wandb_search

    return make_wandb_search(tmp_path_factory.mktemp("wandb-search"), trials=2)


@pytest.fixture(scope="module")
def landed(search: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import mlflow

    out = tmp_path_factory.mktemp("landed")
    db = out / "m.db"
    p = run_cli(
        "migrate", f"wandb+offline://{search}", f"mlflow+sqlite:///{db}", "--report", str(out / "r.json")
    )
    assert "verify: identical (1 projects, 2 runs" in p.stdout, p.stdout
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("search").experiment_id
    return {"db": db, "client": client, "exp": exp, "dir": out}


def _runs(landed: dict, filter_string: str = "") -> list:
    return landed["client"].search_runs([landed["exp"]], filter_string=filter_string)


def test_summary_values_are_searchable_metrics_and_tags(landed: dict) -> None:
    assert len(_runs(landed, "metrics.best_val_acc > 0.5")) == 2
    (best,) = _runs(landed, "metrics.best_val_acc > 0.81")
    assert best.info.run_name == "trial-1"
    # define_metric(summary="min"): W&B's own column name, beside the untouched history
    for r in _runs(landed):
        hist = sorted(landed["client"].get_metric_history(r.info.run_id, "val/loss"), key=lambda m: m.step)
        assert len(hist) == 21 and r.data.metrics["val/loss"] == hist[-1].value
        assert r.data.metrics["val/loss.min"] == min(m.value for m in hist)
    assert [r.info.run_name for r in _runs(landed, "tags.status_note = 'converged'")] == ["trial-0"]


def test_wandb_tags_group_and_job_type_are_searchable(landed: dict) -> None:
    assert [r.info.run_name for r in _runs(landed, "tags.`label.baseline` = 'true'")] == ["trial-0"]
    assert len(_runs(landed, "tags.`label.resnet` = 'true'")) == 2
    assert len(_runs(landed, "tags.`run.group` = 'lr-search'")) == 2
    assert all(r.data.tags["run.job_type"] == "train" for r in _runs(landed))


def test_images_and_histograms_are_in_mlflows_image_layout(landed: dict, search: Path) -> None:
    client = landed["client"]
    for r in _runs(landed):
        assert r.data.tags["mlflow.loggedImages"] == "True"
        files = [f.path for f in client.list_artifacts(r.info.run_id, "images")]
        for key in ("samples", "weights"):
            mine = [f for f in files if f.startswith(f"images/{key}+step+")]
            pngs = [f for f in mine if f.endswith(".png")]
            assert sorted(int(f.split("+step+")[1].split("+")[0]) for f in pngs) == [0, 100, 200], files
            assert len([f for f in mine if f.endswith("+compressed.webp")]) == 3
    # the sample image at step 0 is the W&B file, byte for byte
    r = _runs(landed, "attributes.run_name = 'trial-0'")[0]
    local = Path(client.download_artifacts(r.info.run_id, "", str(landed["dir"] / "dl")))
    (mine,) = [p for p in (local / "images").glob("samples+step+0+*.png")]
    originals = list(search.glob("offline-run-*/files/media/images/samples_0_*.png"))
    assert any(o.read_bytes() == mine.read_bytes() for o in originals), originals


def test_a_wandb_table_loads_with_mlflows_own_client(landed: dict) -> None:
    client = landed["client"]
    for r in _runs(landed):
        (entry,) = json.loads(r.data.tags["mlflow.loggedArtifacts"])
        assert entry["type"] == "table" and entry["path"].startswith("media/table/")
        # load_table searches through MLflow's global tracking URI (its fluent API)
        with mc.global_tracking_uri(f"sqlite:///{landed['db']}"):
            table = client.load_table(landed["exp"], entry["path"], run_ids=[r.info.run_id])
        assert table["label"].tolist() == ["dog", "cat"] * 3 and len(table) == 6


def test_system_metrics_have_mlflows_names_and_runtime_is_not_a_metric(landed: dict) -> None:
    (r,) = _runs(landed, "attributes.run_name = 'trial-0'")
    keys = set(r.data.metrics)
    assert "_runtime" not in keys and not any(k.startswith("system/") and "." in k[7:] for k in keys)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_percentage"} <= keys
    assert "system/disk_usage_percentage" in keys


def test_two_trackbridge_tags_a_run_and_a_name(landed: dict) -> None:
    for r in _runs(landed):
        ours = {k for k in r.data.tags if k.startswith(mc.TB_PREFIX)}
        assert ours == {mc.TAG_SOURCE_KEY, mc.TAG_STATE}
        assert r.info.run_name in ("trial-0", "trial-1")


def test_round_trip_back_to_wandb_is_exact_and_a_second_import_adds_nothing(
    landed: dict, search: Path, tmp_path: Path
) -> None:
    src = f"mlflow+sqlite:///{landed['db']}"
    back = f"wandb+offline://{tmp_path / 'back'}"
    p = run_cli("migrate", src, back, "--experiment", "search")
    assert "verify: identical (1 projects, 2 runs" in p.stdout, p.stdout
    # the W&B runs back from MLflow hold what the originals hold (matched by name: their
    # keys are the MLflow runs', which verify matches them to above)
    from trackbridge.model import Selection
    from trackbridge.uri import open_source
    from trackbridge.verify import _compare_run

    sel = Selection()
    a, b = open_source(f"wandb+offline://{search}"), open_source(back)
    runs_a = {r["name"]: r for r in a.runs(sel, a.projects(sel))}
    runs_b = {r["name"]: r for r in b.runs(sel, b.projects(sel))}
    assert sorted(runs_a) == sorted(runs_b) == ["trial-0", "trial-1"]
    diffs: list[str] = []
    for name in runs_a:
        _compare_run(name, a.read_run(runs_a[name]), b.read_run(runs_b[name]), a, b, diffs.append)
    assert diffs == []

    before = {
        r.info.run_id: len(landed["client"].list_artifacts(r.info.run_id, "images")) for r in _runs(landed)
    }
    again = run_cli("migrate", f"wandb+offline://{search}", src, "--report", str(tmp_path / "r2.json"))
    outcomes = [r["outcome"] for r in json.loads((tmp_path / "r2.json").read_text())["runs"]]
    assert outcomes == ["unchanged", "unchanged"], again.stdout
    after = {
        r.info.run_id: len(landed["client"].list_artifacts(r.info.run_id, "images")) for r in _runs(landed)
    }
    assert before == after and len(after) == 2


def _summary_bundle(path: Path, summary: dict, points: list) -> Path:
    import dataclasses

    from trackbridge import schema

    from tests import factories as f

    row = f.run("test:run/s")
    rows = [
        {"run_key": row["run_key"], "path": [k], "value_json": schema.dumps_value(v)}
        for k, v in summary.items()
    ]
    p = dataclasses.replace(f.payload(row, points=points), summary=schema.table("summary", rows))
    return f.write_bundle(path, [f.project()], [p])


def test_a_changed_summary_is_followed_and_a_legacy_run_is_upgraded_in_place(tmp_path: Path) -> None:
    import mlflow

    db = tmp_path / "m.db"
    dest = f"mlflow+sqlite:///{db}"
    points = [("loss", 0, 0.5), ("loss", 1, 0.3)]
    first = _summary_bundle(tmp_path / "b1", {"loss": 0.1, "acc": 0.9, "note": "ok"}, points)
    run_cli("import", str(first), dest)
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (r,) = client.search_runs([client.get_experiment_by_name("limits").experiment_id])
    assert r.data.metrics["summary/loss"] == 0.1 and r.data.metrics["loss"] == 0.3
    assert r.data.metrics["acc"] == 0.9 and r.data.tags["note"] == "ok"

    # an earlier trackbridge's layout: one tag per piece of bookkeeping
    state = mc.run_state(r.data.tags)
    client.delete_tag(r.info.run_id, mc.TAG_STATE)
    for field, tag in (("claim", mc.TAG_CLAIM), ("source", mc.TAG_SOURCE), ("extras", mc.TAG_EXTRAS)):
        client.set_tag(r.info.run_id, tag, state[field])
    client.set_tag(r.info.run_id, mc.TAG_FINGERPRINT, state["fingerprint"])
    p = run_cli("import", str(first), dest)
    assert "0 updated, 1 unchanged" in p.stdout, p.stdout  # read as complete, not written again

    second = _summary_bundle(tmp_path / "b2", {"loss": 0.3, "acc": 0.95}, points)
    p = run_cli("import", str(second), dest)
    assert "0 new, 1 updated" in p.stdout, p.stdout
    (r,) = client.search_runs([client.get_experiment_by_name("limits").experiment_id])
    assert r.data.metrics["summary/loss"] == 0.3 and r.data.metrics["acc"] == 0.95
    assert "note" not in r.data.tags
    assert {k for k in r.data.tags if k.startswith(mc.TB_PREFIX)} == {mc.TAG_SOURCE_KEY, mc.TAG_STATE}
    assert mc.run_state(r.data.tags)["claim"] == state["claim"]
    run_cli("verify", str(second), dest)  # exit 0: the summary and history as the bundle has them


def test_the_mlflow_reader_gives_runtime_back_as_this_runs_points(landed: dict) -> None:
    from trackbridge.model import Selection
    from trackbridge.uri import open_source

    src = open_source(f"mlflow+sqlite:///{landed['db']}")
    sel = Selection(projects=("search",))
    for row in src.runs(sel, src.projects(sel)):
        payload = src.read_run(row)
        keys, run_keys = set(), set()
        for b in payload.metrics():
            keys |= set(b.column("key").to_pylist())
            run_keys |= set(b.column("run_key").to_pylist())
        assert "_runtime" in keys and run_keys == {payload.key}  # from the private file
        if any(k.startswith("system/") for k in keys):  # W&B's own names, restored
            assert "system/cpu" in keys and "system/cpu_utilization_percentage" not in keys
