"""trackbridge into MLflow's SQL stores, against the database's own bulk load and MLflow's
client, side by side in one run (issue 17).

    python bench/bench_sql.py                       # both cases, every database
    python bench/bench_sql.py --case points --db postgresql
    python bench/bench_sql.py --json bench/results/sql.json

Cases:

- ``points``: 500,000 points (10 runs x 10 keys x 5,000 steps) into a new store.
  Against the database's own bulk load of the same rows into a scratch table with
  MLflow's ``metrics`` indexes (PostgreSQL: ``COPY ... FROM STDIN``; MySQL: ``LOAD DATA
  LOCAL INFILE``; SQLite: one ``executemany``), and against a ``MlflowClient.log_batch``
  loop (1,000 points a call).
- ``small``: 1,000 small runs (10 params, 5 keys x 100 points) into a new store, against
  MLflow's client doing per run what a user's script does: ``create_run``, one
  ``log_batch`` of params, ``log_batch`` of points, ``set_terminated``.

trackbridge is timed inside this process (``engine.copy`` from a bundle on disk: the
bundle read included, Python's start-up and ``import mlflow`` not, as for the
references), and also as the real command, start-up included. The database servers are
our own (``trackbridge.trackers.mlflow.localdb``), on loopback, with their fsyncs on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def make_bundle(path: Path, runs: int, keys: int, steps: int, params: int) -> Path:
    from tests import factories as f

    if (path / "manifest.json").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    payloads = [
        f.payload(
            f.run(f"bench:run/r{i:05d}"),
            params=[([f"p{j}"], 0.001 * j) for j in range(params)],
            points=[(f"metric/{k}", s, s * 0.001 + k) for s in range(steps) for k in range(keys)],
        )
        for i in range(runs)
    ]
    return f.write_bundle(path, [f.project(name="bench")], payloads)


def trackbridge(bundle: Path, url: str, root: Path) -> float:
    from trackbridge import engine
    from trackbridge.bundle_reader import BundleSource
    from trackbridge.model import Selection
    from trackbridge.uri import open_sink

    sink = open_sink(f"mlflow+{url}", artifact_root=str(root))
    t = time.perf_counter()
    report = engine.copy(BundleSource(bundle), sink, Selection())
    took = time.perf_counter() - t
    assert not report.failed, [r.error for r in report.runs if r.error]
    return took


def command(bundle: Path, url: str, root: Path) -> float:
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trackbridge.cli",
            "import",
            str(bundle),
            f"mlflow+{url}",
            "--artifact-root",
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t


def rows_of(bundle: Path) -> list[tuple]:
    import pyarrow.dataset as ds

    t = ds.dataset(bundle / "metrics", format="parquet").to_table()
    run = [uuid.uuid5(uuid.NAMESPACE_URL, k).hex for k in t.column("run_key").to_pylist()]
    ts = [v // 1000 for v in t.column("timestamp").cast("int64").to_pylist()]
    return list(zip(t.column("key").to_pylist(), t.column("value").to_pylist(), ts, run,
                    t.column("step").to_pylist(), [False] * t.num_rows, strict=True))  # fmt: skip


def bulk_load(url: str, rows: list[tuple], tmp: Path) -> float:
    """The database's own bulk load of ``rows`` into a scratch copy of ``metrics`` (its
    primary key and indexes), the table made before the timer starts."""
    import sqlalchemy as sa
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from trackbridge.importers.mlflow.bulk import _copy_text

    SqlAlchemyStore(url, tmp.as_uri()).engine.dispose()  # MLflow's tables, to copy from
    eng = sa.create_engine(url)
    kind = eng.dialect.name
    with eng.begin() as c:
        if kind == "postgresql":
            c.exec_driver_sql("CREATE TABLE scratch (LIKE metrics INCLUDING ALL)")
        elif kind == "mysql":
            c.exec_driver_sql("CREATE TABLE scratch LIKE metrics")
        else:
            for sql in c.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'metrics' AND sql IS NOT NULL"
            ).scalars():
                c.exec_driver_sql(sql.replace("metrics", "scratch", 1).replace(" ON metrics", " ON scratch"))
    data = _copy_text(rows)
    if kind == "mysql":
        (tmp / "rows.tsv").write_bytes(data.replace(b"\tf\n", b"\t0\n"))
        eng = sa.create_engine(url, connect_args={"local_infile": True})
    t = time.perf_counter()
    with eng.begin() as c:
        raw = c.connection.dbapi_connection
        cur = raw.cursor()
        if kind == "postgresql":
            import io

            if hasattr(cur, "copy_expert"):
                cur.copy_expert("COPY scratch FROM STDIN", io.BytesIO(data))
            else:
                with cur.copy("COPY scratch FROM STDIN") as cp:
                    cp.write(data)
        elif kind == "mysql":
            cur.execute(
                f"LOAD DATA LOCAL INFILE '{tmp / 'rows.tsv'}' INTO TABLE scratch "
                "(`key`, value, timestamp, run_uuid, step, is_nan)"
            )
        else:
            cur.executemany(
                "INSERT INTO scratch (key, value, timestamp, run_uuid, step, is_nan) VALUES (?,?,?,?,?,?)",
                rows,
            )
    took = time.perf_counter() - t
    eng.dispose()
    return took


def client_loop(url: str, bundle: Path, root: Path, tmp: Path) -> float:
    """What a script logging the same runs through ``MlflowClient`` costs."""
    import mlflow
    import pyarrow.dataset as ds
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(url)
    exp = client.create_experiment(f"loop-{uuid.uuid4().hex[:6]}", artifact_location=root.as_uri())
    t = ds.dataset(bundle / "metrics", format="parquet").to_table()
    t = t.set_column(t.schema.get_field_index("timestamp"), "timestamp", t.column("timestamp").cast("int64"))
    table = t.to_pylist()
    params = ds.dataset(bundle / "params", format="parquet").to_table().to_pylist()
    by_run: dict[str, list] = {}
    for r in table:
        by_run.setdefault(r["run_key"], []).append(
            Metric(r["key"], r["value"], r["timestamp"] // 1000, r["step"])
        )
    pars: dict[str, list] = {}
    for p in params:
        pars.setdefault(p["run_key"], []).append(Param(p["path"][-1], p["value_json"]))
    t = time.perf_counter()
    for key, points in by_run.items():
        run = client.create_run(exp, run_name=key)
        rid = run.info.run_id
        client.log_batch(rid, params=pars.get(key, []))
        for i in range(0, len(points), 1000):
            client.log_batch(rid, metrics=points[i : i + 1000])
        client.set_terminated(rid)
    return time.perf_counter() - t


def server_for(kind: str, stack: list) -> object | None:
    from trackbridge.trackers.mlflow.localdb import LocalMariaDB, LocalPostgres

    if kind == "sqlite":
        return None
    db = (LocalPostgres if kind == "postgresql" else LocalMariaDB)(durable=True).start()
    stack.append(db)
    return db


def fresh(kind: str, server: object | None, tmp: Path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'{name}.db'}"
    return server.create_database(f"{name}_{uuid.uuid4().hex[:6]}")  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["points", "small", "all"], default="all")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "mysql", "all"], default="all")
    ap.add_argument(
        "--no-loop", action="store_true", help="leave out the MlflowClient loop of the points case"
    )
    ap.add_argument("--json")
    a = ap.parse_args()
    work = HERE / ".work"
    cases = ["points", "small"] if a.case == "all" else [a.case]
    kinds = ["sqlite", "postgresql", "mysql"] if a.db == "all" else [a.db]
    shapes = {"points": (10, 10, 5000, 10), "small": (1000, 5, 100, 10)}
    results = []
    for case in cases:
        bundle = make_bundle(work / f"sql-{case}", *shapes[case])
        rows = rows_of(bundle) if case == "points" else None
        for kind in kinds:
            stack: list = []
            tmp = Path(tempfile.mkdtemp(prefix="tb-bench-sql-"))
            try:
                server = server_for(kind, stack)
                res = {"case": case, "db": kind}
                res["trackbridge_s"] = trackbridge(bundle, fresh(kind, server, tmp, "tb"), tmp / "tb-files")
                res["command_s"] = command(bundle, fresh(kind, server, tmp, "cmd"), tmp / "cmd-files")
                if case == "points":
                    res["bulk_load_s"] = bulk_load(fresh(kind, server, tmp, "bulk"), rows, tmp)
                    res["vs_bulk_load"] = round(res["bulk_load_s"] / res["trackbridge_s"], 3)
                if case == "small" or not a.no_loop:
                    res["client_loop_s"] = client_loop(
                        fresh(kind, server, tmp, "loop"), bundle, tmp / "loop", tmp
                    )
                    res["vs_client_loop"] = round(res["client_loop_s"] / res["trackbridge_s"], 2)
                print(json.dumps(res), flush=True)
                results.append(res)
            finally:
                for s in stack:
                    s.stop()
                shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
