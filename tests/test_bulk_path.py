"""The bulk path (new runs committed whole, many to a transaction, through MLflow's own
tables) against MLflow's API path, fed the same bundles, on each real database: every
table either touches must hold the same rows, compared in SQL once run ids (random on
both paths) are replaced by the source keys they carry."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from trackbridge.trackers.mlflow import common as mc

from tests import factories as f
from tests.conftest import run_cli

INF = float("inf")


def edge_bundle(path: Path) -> Path:
    """Points MLflow's latest-value rule and its primary key must decide: NaN, ±inf,
    several values at one step, a tie on (step, timestamp) broken by value, an exact
    repeat; a nested run, a deleted one, a run with no points."""
    ts = f.metrics  # one timestamp per point, a millisecond apart
    parent = f.payload(
        f.run("test:run/parent"),
        params=[(["lr"], 0.1), (["layers"], [64, 32]), (["name"], "x" * 300)],
        tags={"team": "vision", "note": "a\ttab and\nnewline"},
        points=[("loss", 0, 1.0), ("loss", 1, math.nan), ("loss", 2, INF), ("acc", 0, -INF), ("acc", 0, 0.5)],
    )
    child = f.payload(
        f.run("test:run/child", parent_run_key="test:run/parent", status="failed"),
        points=[
            ("loss", 5, 0.3),
            ("loss", 5, 0.3),
            ("loss", 5, 0.2),
            ("loss", 4, 9.0),
            ("weird key/α", 1, 2.0),
        ],
    )
    gone = f.payload(f.run("test:run/gone", lifecycle="deleted"), points=[("loss", 0, 1.0)])
    empty = f.payload(f.run("test:run/empty", status="running", end_time=None))

    def at_one_time(key: str, points: list[tuple]) -> f.RunPayload:
        """A run whose points share one timestamp: ties on (step, timestamp)."""
        run = f.payload(f.run(key), points=points)
        batch = ts(key, points)
        same = batch.set_column(
            batch.schema.get_field_index("timestamp"),
            "timestamp",
            batch.column("timestamp").take([0] * len(points)),
        )
        run.metrics = lambda: iter([same])
        return run

    tie = at_one_time("test:run/tie", [("m", 3, 1.0), ("m", 3, 2.0), ("m", 3, 0.5)])
    # equal (step, timestamp, value) after MLflow's sanitising; -0.0 repeats 0.0 for the
    # primary key
    zero = at_one_time("test:run/zero", [("z", 4, math.nan), ("z", 4, 0.0), ("z", 4, -0.0), ("z", 4, 0.0)])
    return f.write_bundle(path, [f.project()], [parent, child, gone, empty, tie, zero])


def dump(url: str) -> dict[str, list]:
    """Every row the import wrote, run ids replaced by source keys, claims (a clock
    reading) left out of the bookkeeping tag."""
    eng = sa.create_engine(url)
    key_ = eng.dialect.identifier_preparer.quote("key")  # a keyword in MySQL
    with eng.connect() as c:
        keys = dict(
            c.execute(
                sa.text(f"SELECT run_uuid, value FROM tags WHERE {key_} = :k"), {"k": mc.TAG_SOURCE_KEY}
            ).all()
        )

        def k(run_id: str) -> str:
            return keys.get(run_id, run_id)

        def rows(sql: str) -> list:
            return [tuple(r) for r in c.execute(sa.text(sql.replace("KEY", key_))).all()]

        out: dict[str, list] = {}
        out["runs"] = sorted(
            (
                k(r[0]),
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                r[9] is not None,
                r[10].replace(r[0], k(r[0])),
            )
            for r in rows(
                "SELECT run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                "start_time, end_time, deleted_time, artifact_uri FROM runs"
            )
        )
        tags = []
        for run, key, value in rows("SELECT run_uuid, KEY, value FROM tags"):
            if key == mc.TAG_STATE:
                state = mc.run_state({mc.TAG_STATE: value})
                state.pop("claim", None)
                value = json.dumps(state, sort_keys=True)
            elif key == mc.TAG_PARENT:
                value = k(value)
            tags.append((k(run), key, value))
        out["tags"] = sorted(tags)
        out["params"] = sorted(
            (k(r), key, v) for r, key, v in rows("SELECT run_uuid, KEY, value FROM params")
        )
        for table in ("metrics", "latest_metrics"):
            out[table] = sorted(
                (k(r), key, float(v), int(t), int(s), bool(n))
                for r, key, v, t, s, n in rows(
                    f"SELECT run_uuid, KEY, value, timestamp, step, is_nan FROM {table}"
                )
            )
        datasets = {u: (n, d) for u, n, d in rows("SELECT dataset_uuid, name, digest FROM datasets")}
        out["datasets"] = sorted(rows(
            "SELECT name, digest, dataset_source_type, dataset_source, dataset_schema, dataset_profile "
            "FROM datasets"
        ))  # fmt: skip
        inputs = rows(
            "SELECT input_uuid, source_type, source_id, destination_type, destination_id, step FROM inputs"
        )
        itags = rows("SELECT input_uuid, name, value FROM input_tags")
        # dataset inputs; a logged model's output edge has the model's own (random) id
        out["inputs"] = sorted(
            (st, datasets.get(si, si), dt, k(di), step, tuple(sorted((n, v) for u, n, v in itags if u == iu)))
            if st == "DATASET"
            else (st, dt, k(di) if dt == "RUN" else "model", step)
            for iu, st, si, dt, di, step in inputs
        )
    eng.dispose()
    return out


def fresh(kind: str, request: pytest.FixtureRequest, tmp_path: Path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    server = request.getfixturevalue("postgres" if kind == "postgresql" else "mariadb")
    return server.create_database(f"{name}{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mysql"])
def test_the_bulk_path_writes_the_rows_mlflows_api_writes(kind, demo_store, tmp_path, request):
    edges = edge_bundle(tmp_path / "edges")
    demo = tmp_path / "demo-bundle"
    run_cli("export", demo_store["tb"], str(demo))
    got = {}
    for path, env in (("api", {"TRACKBRIDGE_BULK": "0"}), ("bulk", {})):
        url = fresh(kind, request, tmp_path, path)
        for bundle in (edges, demo):
            p = subprocess.run(
                [sys.executable, "-m", "trackbridge.cli", "import", str(bundle), f"mlflow+{url}",
                 "--artifact-root", str(tmp_path / f"{path}-files")],
                capture_output=True, text=True, env={**os.environ, **env}, timeout=600,
            )  # fmt: skip
            assert p.returncode == 0, p.stdout + p.stderr
            assert ("bulk-path-off" in p.stdout) == (path == "api"), p.stdout
        got[path] = dump(url)
        got[path]["runs"] = [(*r[:-1], r[-1].replace(f"{path}-files", "X")) for r in got[path]["runs"]]
    for table in got["api"]:
        assert got["bulk"][table] == got["api"][table], table
    assert len(got["bulk"]["runs"]) == 6 + 6 and got["bulk"]["inputs"]
    zero = [r for r in got["bulk"]["metrics"] if r[1] == "z"]
    assert sorted(bool(r[-1]) for r in zero) == [False, True]  # NaN, and 0.0 once (-0.0 repeats it)
    assert any(n for *_, n in got["bulk"]["latest_metrics"])  # a NaN is the latest of a key


def _mlflow_rule(batches: list[list[dict]]) -> tuple[set[tuple], dict[str, tuple]]:
    """MLflow's store, point by point as ``log_batch`` settles them: its own
    ``sanitize_metric_value``, exact repeats kept once, the latest value per key the
    greatest (step, timestamp, value) with the first of equals kept."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    rows: set[tuple] = set()
    latest: dict[str, tuple] = {}
    for batch in batches:
        for p in batch:
            is_nan, value = SqlAlchemyStore.sanitize_metric_value(None, p["value"])
            rows.add((p["key"], float(value), p["timestamp"], p["step"], is_nan))
            best = latest.get(p["key"])
            if best is None or (p["step"], p["timestamp"], value) > best[:3]:
                latest[p["key"]] = (p["step"], p["timestamp"], float(value), is_nan)
    return rows, latest


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.fixed_dictionaries(
                {
                    "key": st.sampled_from(["a", "b", "c/d"]),
                    "value": st.sampled_from([0.0, -0.0, 1.0, 2.5, -1.0, math.nan, INF, -INF]),
                    "timestamp": st.integers(0, 3),
                    "step": st.integers(-1, 3),
                }
            ),
            min_size=1,
            max_size=30,
        ),
        max_size=4,
    )
)
def test_points_held_as_columns_settle_as_mlflows_store_does(batches):
    """The few values (ties, repeats, NaN, ±inf, -0.0) make MLflow's rules decide often."""
    from trackbridge.importers.mlflow.columns import PendingPoints

    held = PendingPoints()
    for b in batches:
        held.add_records(b)
    want_rows, want_latest = _mlflow_rule(batches)
    got = held.rows
    assert set(zip(*(got[c].to_pylist() for c in got.column_names), strict=True)) == want_rows
    assert got.num_rows == len(want_rows)  # one row for -0.0 and 0.0, as the primary key keeps
    assert held.latest == want_latest
    assert held.count == sum(len(b) for b in batches)


def test_a_quiet_nights_index_read_from_tags_is_the_runs_index(tmp_path):
    """What a sync may skip, read from the bookkeeping tags in one query, is what the
    runs index built from MLflow's search says: complete runs (deleted ones too) with
    their change tokens, a run without its fingerprint left out, a state kept in the
    separate tags of an earlier trackbridge read; and where two runs carry one source key
    it is left to the runs index, which retires one."""
    from trackbridge import engine
    from trackbridge.bundle_reader import BundleSource
    from trackbridge.model import Selection
    from trackbridge.uri import open_sink

    bundle = edge_bundle(tmp_path / "bundle")
    url = f"sqlite:///{tmp_path / 'd.db'}"
    engine.copy(BundleSource(bundle), open_sink(f"mlflow+{url}"), Selection())
    client = mc.client(url)
    exp = client.get_experiment_by_name("limits")
    runs = {
        r.data.tags[mc.TAG_SOURCE_KEY]: r
        for r in client.search_runs([exp.experiment_id], run_view_type=3)  # ViewType.ALL
    }

    def state(key: str) -> dict:
        return mc.run_state(runs[key].data.tags)

    client.set_tag(
        runs["test:run/tie"].info.run_id, mc.TAG_STATE, json.dumps({**state("test:run/tie"), "token": "t1"})
    )
    unfinished = {k: v for k, v in state("test:run/zero").items() if k != "fingerprint"}
    client.set_tag(runs["test:run/zero"].info.run_id, mc.TAG_STATE, json.dumps(unfinished))
    legacy = runs["test:run/empty"].info.run_id  # an earlier trackbridge's separate tags
    client.set_tag(legacy, mc.TAG_FINGERPRINT, state("test:run/empty")["fingerprint"])
    client.delete_tag(legacy, mc.TAG_STATE)

    def synced(light: bool) -> dict:
        sink = open_sink(f"mlflow+{url}")
        src = BundleSource(bundle)
        for p in src.projects(Selection()):
            sink.write_project(engine.Plan().project(p))
        if not light:
            sink._bulk = None
        else:
            assert sink._synced_from_tags(sink._exp_ids["test:project/1"]) is not None
        return sink.synced("test:project/1")

    got = synced(light=True)
    assert got == synced(light=False)
    assert set(got) == {k for k in runs if k != "test:run/zero"}
    assert got["test:run/tie"] == ("t1", runs["test:run/tie"].info.run_id)
    assert got["test:run/gone"][1] == runs["test:run/gone"].info.run_id  # deleted, still known

    twin = client.create_run(exp.experiment_id, tags={mc.TAG_SOURCE_KEY: "test:run/tie"})
    sink = open_sink(f"mlflow+{url}")
    for p in BundleSource(bundle).projects(Selection()):
        sink.write_project(engine.Plan().project(p))
    assert sink._synced_from_tags(sink._exp_ids["test:project/1"]) is None
    assert sink.synced("test:project/1")["test:run/tie"][1] != twin.info.run_id
