"""trackbridge into MLflow's SQL stores, against the database's own bulk load and MLflow's
client, side by side in one run (issue 17).

    python bench/bench_sql.py                       # every case, every database
    python bench/bench_sql.py --case points --db postgresql
    python bench/bench_sql.py --case server          # through mlflow server --workers 4
    python bench/bench_sql.py --json bench/results/sql.json

Cases:

- ``points``: 500,000 points (10 runs x 10 keys x 5,000 steps) into a new store.
  Against the database's own bulk load of the same rows (PostgreSQL: ``COPY ... FROM
  STDIN``; MySQL: ``LOAD DATA LOCAL INFILE``; SQLite: one ``executemany``), twice: into
  a scratch table with MLflow's ``metrics`` indexes, and into MLflow's own ``metrics``
  table, whose foreign key to ``runs`` the database checks row by row; and against a
  ``MlflowClient.log_batch`` loop (1,000 points a call).
- ``small``: 1,000 small runs (10 params, 5 keys x 100 points) into a new store, against
  the same loads and MLflow's client doing per run what a user's script does:
  ``create_run``, one ``log_batch`` of params, ``log_batch`` of points, ``set_terminated``.
- ``server``: the points case through a PostgreSQL-backed ``mlflow server --workers 4``,
  ``trackbridge import --workers 4`` against MLflow's REST calls posted by 4 threads.

trackbridge is timed inside this process (``engine.copy`` from a bundle on disk, with
the command's default ``--workers`` for the destination: the bundle read included,
Python's start-up and ``import mlflow`` not, as for the references), and also as the
real command, start-up included. The database servers are
our own (``trackbridge.trackers.mlflow.localdb``), on loopback, with their fsyncs on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
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


def trackbridge(bundle: Path, url: str, root: Path | None, workers: int | None = None) -> float:
    """``workers``: the command's default for the destination when not given."""
    from trackbridge import engine
    from trackbridge.bundle_reader import BundleSource
    from trackbridge.model import Selection
    from trackbridge.uri import default_workers, open_sink

    workers = workers or default_workers(f"mlflow+{url}")  # as `import` picks it

    sink = open_sink(f"mlflow+{url}", artifact_root=str(root) if root else None)
    t = time.perf_counter()
    report = engine.copy(BundleSource(bundle), sink, Selection(), workers=workers)
    took = time.perf_counter() - t
    assert not report.failed, [r.error for r in report.runs if r.error]
    return took


def command(bundle: Path, url: str, root: Path | None, workers: int | None = None) -> float:
    extra = (["--artifact-root", str(root)] if root else []) + (
        ["--workers", str(workers)] if workers else []
    )
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "trackbridge.cli", "import", str(bundle), f"mlflow+{url}", *extra],
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


def copy_text(rows: list[tuple]) -> bytes:
    """Rows as PostgreSQL's COPY text format (tab-separated, the format's escapes)."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    out = io.StringIO()
    for key, value, ts, run_uuid, step, is_nan in rows:
        out.write(f"{esc(key)}\t{value!r}\t{ts}\t{run_uuid}\t{step}\t{'t' if is_nan else 'f'}\n")
    return out.getvalue().encode()


def bulk_load(url: str, rows: list[tuple], tmp: Path, into: str = "scratch") -> float:
    """The database's own bulk load of ``rows`` into a scratch copy of ``metrics`` (its
    primary key and indexes), the table made before the timer starts; with
    ``into="metrics"``, into MLflow's ``metrics`` table itself, whose foreign key to
    ``runs`` the database checks row by row (the runs' rows made before the timer)."""
    import sqlalchemy as sa
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(url, tmp.as_uri()).engine.dispose()  # MLflow's tables, to copy from
    eng = sa.create_engine(url)
    kind = eng.dialect.name
    with eng.begin() as c:
        if into == "metrics":
            c.execute(
                sa.text(
                    "INSERT INTO runs (run_uuid, name, status, lifecycle_stage, artifact_uri, experiment_id) "
                    "VALUES (:r, :r, 'FINISHED', 'active', '', 0)"
                ),
                [{"r": r} for r in sorted({row[3] for row in rows})],
            )
        elif kind == "postgresql":
            c.exec_driver_sql("CREATE TABLE scratch (LIKE metrics INCLUDING ALL)")
        elif kind == "mysql":
            c.exec_driver_sql("CREATE TABLE scratch LIKE metrics")
        else:
            for sql in c.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'metrics' AND sql IS NOT NULL"
            ).scalars():
                c.exec_driver_sql(sql.replace("metrics", "scratch", 1).replace(" ON metrics", " ON scratch"))
    data = copy_text(rows)
    if kind == "mysql":
        (tmp / "rows.tsv").write_bytes(data.replace(b"\tf\n", b"\t0\n"))
        eng = sa.create_engine(url, connect_args={"local_infile": True})
    if kind == "sqlite" and into == "metrics":
        eng = sa.create_engine(url)
        sa.event.listen(eng, "connect", lambda con, _: con.execute("PRAGMA foreign_keys = ON"))
    t = time.perf_counter()
    with eng.begin() as c:
        raw = c.connection.dbapi_connection
        cur = raw.cursor()
        if kind == "postgresql":
            if hasattr(cur, "copy_expert"):
                cur.copy_expert(f"COPY {into} FROM STDIN", io.BytesIO(data))
            else:
                with cur.copy(f"COPY {into} FROM STDIN") as cp:
                    cp.write(data)
        elif kind == "mysql":
            cur.execute(
                f"LOAD DATA LOCAL INFILE '{tmp / 'rows.tsv'}' INTO TABLE {into} "
                "(`key`, value, timestamp, run_uuid, step, is_nan)"
            )
        else:
            cur.executemany(
                f"INSERT INTO {into} (key, value, timestamp, run_uuid, step, is_nan) VALUES (?,?,?,?,?,?)",
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


def rest_loop(url: str, bundle: Path, threads: int) -> float:
    """The fastest a script can log the runs through a server: MLflow's REST calls
    (``runs/create``, ``runs/log-batch`` of params, of 1,000 points each,
    ``runs/update``) posted as JSON by ``threads`` threads, one run to a thread at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.dataset as ds
    import requests

    api = f"{url}/api/2.0/mlflow"
    exp = requests.post(
        f"{api}/experiments/create", json={"name": f"loop-{uuid.uuid4().hex[:6]}"}, timeout=60
    )
    exp_id = exp.json()["experiment_id"]
    t = ds.dataset(bundle / "metrics", format="parquet").to_table()
    t = t.set_column(t.schema.get_field_index("timestamp"), "timestamp", t.column("timestamp").cast("int64"))
    runs: dict[str, dict] = {}
    for r in t.to_pylist():
        runs.setdefault(r["run_key"], {"points": [], "params": []})["points"].append(
            {"key": r["key"], "value": r["value"], "timestamp": r["timestamp"] // 1000, "step": r["step"]}
        )
    for p in ds.dataset(bundle / "params", format="parquet").to_table().to_pylist():
        runs[p["run_key"]]["params"].append({"key": p["path"][-1], "value": p["value_json"]})
    local = threading.local()

    def one(item: tuple[str, dict]) -> None:
        key, run = item
        s = getattr(local, "s", None) or requests.Session()
        local.s = s

        def post(path: str, body: dict) -> dict:
            r = s.post(f"{api}/{path}", json=body, timeout=300)
            r.raise_for_status()
            return r.json()

        rid = post("runs/create", {"experiment_id": exp_id, "run_name": key, "start_time": 0})["run"]["info"][
            "run_id"
        ]
        post("runs/log-batch", {"run_id": rid, "params": run["params"]})
        for i in range(0, len(run["points"]), 1000):
            post("runs/log-batch", {"run_id": rid, "metrics": run["points"][i : i + 1000]})
        post("runs/update", {"run_id": rid, "status": "FINISHED", "end_time": 1})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, runs.items()))
    return time.perf_counter() - t0


def server_case(bundle: Path, db: object, tmp: Path, workers: int = 4) -> dict:
    """The same points through a PostgreSQL-backed ``mlflow server --workers 4``: a fresh
    server and database for each contender, trackbridge with ``--workers 4`` against
    ``rest_loop`` with 4 threads."""
    from trackbridge.trackers.mlflow.server import LocalMlflowServer

    res: dict = {"case": "server", "db": "postgresql", "server_workers": workers}
    for name in ("trackbridge", "command", "rest_loop"):
        srv = LocalMlflowServer(tmp / name, workers=workers, backend=db.create_database(f"{name}_srv"))  # type: ignore[attr-defined]
        url = srv.start()
        try:
            if name == "trackbridge":
                res["trackbridge_s"] = trackbridge(bundle, url, None, workers=workers)
            elif name == "command":
                res["command_s"] = command(bundle, url, None, workers=workers)
            else:
                res["rest_loop_s"] = rest_loop(url, bundle, workers)
        finally:
            srv.stop()
    res["vs_rest_loop"] = round(res["rest_loop_s"] / res["trackbridge_s"], 3)
    return res


def direct_case(
    case: str, kind: str, bundle: Path, rows: list[tuple], db: object | None, tmp: Path, loop: bool
) -> dict:
    """The bundle into a new in-process store of ``kind``, each contender into its own."""
    res: dict = {"case": case, "db": kind}
    res["trackbridge_s"] = trackbridge(bundle, fresh(kind, db, tmp, "tb"), tmp / "tb-files")
    res["command_s"] = command(bundle, fresh(kind, db, tmp, "cmd"), tmp / "cmd-files")
    res["bulk_load_s"] = bulk_load(fresh(kind, db, tmp, "bulk"), rows, tmp)
    res["vs_bulk_load"] = round(res["bulk_load_s"] / res["trackbridge_s"], 3)
    res["table_load_s"] = bulk_load(fresh(kind, db, tmp, "table"), rows, tmp, "metrics")
    res["vs_table_load"] = round(res["table_load_s"] / res["trackbridge_s"], 3)
    if loop:
        res["client_loop_s"] = client_loop(fresh(kind, db, tmp, "loop"), bundle, tmp / "loop", tmp)
        res["vs_client_loop"] = round(res["client_loop_s"] / res["trackbridge_s"], 2)
        # what the database itself allows a writer to gain on the loop: its own load of
        # the points alone into MLflow's table, no runs, params or tags
        res["loop_vs_table_load"] = round(res["client_loop_s"] / res["table_load_s"], 1)
    return res


def measured(kind: str, measure: Callable[[object | None, Path], dict]) -> dict:
    """One measurement with its own database server (none for SQLite) and temp folder,
    both gone afterwards."""
    stack: list = []
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-sql-"))
    try:
        res = measure(server_for(kind, stack), tmp)
        print(json.dumps(res), flush=True)
        return res
    finally:
        for s in stack:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


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
    ap.add_argument("--case", choices=["points", "small", "server", "all"], default="all")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "mysql", "all"], default="all")
    ap.add_argument(
        "--no-loop", action="store_true", help="leave out the MlflowClient loop of the points case"
    )
    ap.add_argument("--json")
    a = ap.parse_args()
    work = HERE / ".work"
    cases = ["points", "small", "server"] if a.case == "all" else [a.case]
    kinds = ["sqlite", "postgresql", "mysql"] if a.db == "all" else [a.db]
    shapes = {"points": (10, 10, 5000, 10), "small": (1000, 5, 100, 10)}
    results = []
    for case in cases:
        if case == "server":  # the points case's data, through a server
            bundle = make_bundle(work / "sql-points", *shapes["points"])
            results.append(measured("postgresql", partial(server_case, bundle)))
            continue
        bundle = make_bundle(work / f"sql-{case}", *shapes[case])
        rows = rows_of(bundle)
        loop = case == "small" or not a.no_loop
        for kind in kinds:
            results.append(measured(kind, partial(direct_case, case, kind, bundle, rows, loop=loop)))
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
