"""Whole new runs into an in-process SQL store (SQLite, PostgreSQL, MySQL), many to a
transaction, through MLflow's own tables.

Through MLflow's client a run costs six or more transactions (create, a ``log_batch``
of params and tags, points, the end, the bookkeeping tag), each a commit the database
makes durable: about 185 ms a small run on SQLite here, almost none of it data. Here a
new run is first written in memory (``PendingRun`` answers the client calls the writer
makes for it), and runs are then committed together: the run row, its tags, params,
points, latest values and dataset inputs in one transaction, points with the
database's own bulk mechanism (``COPY`` on PostgreSQL, multi-row ``INSERT`` on MySQL,
the driver's executemany on SQLite). A run is therefore either all there, fingerprint
included, or not there at all: a kill leaves nothing half-visible, and the next import
writes it whole.

The rows are the ones MLflow itself writes (``create_run``, ``log_batch``,
``set_terminated``, ``log_inputs``), the points held and settled column-wise by
``trackbridge.importers.mlflow.columns`` as MLflow's store settles them. A run that
grows past ``MAX_POINTS`` in memory is committed early as an unfinished run (status
RUNNING, no fingerprint, as the API path leaves one mid-import) and the rest of it goes
the API way.

Used only when the store's schema revision is the one the installed MLflow expects;
otherwise MLflow's API it is, and the report says so once.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from trackbridge.files import temp_dir
from trackbridge.importers.mlflow.columns import NotBulk, PendingPoints, copy_csv, driver_rows, values_lists
from trackbridge.trackers.mlflow import common as mc

__all__ = ["BulkStore", "NotBulk", "PendingRun", "Routed", "new_pending"]

MAX_POINTS = 250_000  # held in memory for one pending run before it is committed early


def _ms() -> int:
    return int(time.time() * 1000)


@dataclass
class PendingRun:
    """A new run as MLflow would hold it after the writer's calls, not yet in the store.

    Only the calls the writer makes for a new run are answered; anything else raises
    ``NotBulk`` rather than guess."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    name: str
    user: str
    start_time: int | None
    status: str = "RUNNING"
    end_time: int | None = None
    lifecycle: str = "active"
    deleted_time: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    points: PendingPoints = field(default_factory=PendingPoints)
    datasets: list[Any] = field(default_factory=list)
    payload: Any = None
    report: Any = None
    sealed: bool = False

    # -- the client calls, for this run

    def log_batch(self, metrics: Any = (), params: Any = (), tags: Any = (), **_: Any) -> None:
        for p in params or ():
            self.params.setdefault(p.key, p.value)  # MLflow refuses a changed param
        for t in tags or ():
            self.tags[t.key] = t.value
        if metrics:
            self.points.add_records(
                [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics]
            )

    def set_tag(self, key: str, value: str, **_: Any) -> None:
        self.tags[key] = value

    def delete_tag(self, key: str) -> None:
        self.tags.pop(key, None)

    def set_terminated(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.status, self.end_time = status, end_time if end_time is not None else _ms()

    def update_run(self, status: str | None = None, name: str | None = None) -> None:
        if status:
            self.status = status
        if name:
            self.name = self.tags[mc.TAG_RUN_NAME] = name

    def delete_run(self) -> None:
        self.lifecycle, self.deleted_time = "deleted", _ms()

    def log_inputs(self, datasets: Any = None, models: Any = None) -> None:
        if models:
            raise NotBulk("logged-model inputs")
        self.datasets += list(datasets or ())

    def _repo(self) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.artifact_uri)

    def local_dir(self) -> str | None:
        """The run's artifact folder when it is on this machine: files go straight in."""
        from urllib.parse import urlparse

        from mlflow.utils.file_utils import local_file_uri_to_path

        if urlparse(self.artifact_uri).scheme not in ("", "file"):
            return None
        return local_file_uri_to_path(self.artifact_uri)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Straight into a local artifact folder: no temporary file to copy from."""
        local = self.local_dir()
        if local is None:
            with temp_dir() as d:
                (d / os.path.basename(artifact_file)).write_text(text, encoding="utf-8")
                folder = os.path.dirname(artifact_file)
                return self._repo().log_artifact(str(d / os.path.basename(artifact_file)), folder or None)
        path = os.path.join(local, *artifact_file.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._repo().log_artifact(local_path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self._repo().log_artifacts(local_dir, artifact_path)

    def list_artifacts(self, path: str | None = None) -> list[Any]:
        return self._repo().list_artifacts(path)

    def get_metric_history(self, key: str) -> list[Any]:
        from mlflow.entities import Metric

        return [Metric(*p) for p in self.points.history(key)]

    def get_run(self) -> Any:
        from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

        info = RunInfo(
            run_id=self.run_id,
            experiment_id=self.experiment_id,
            user_id=self.user,
            status=self.status,
            start_time=self.start_time,
            end_time=self.end_time,
            lifecycle_stage=self.lifecycle,
            artifact_uri=self.artifact_uri,
            run_name=self.name,
        )
        data = RunData(
            metrics=[Metric(k, math.nan if n else v, t, s) for k, (s, t, v, n) in self.points.latest.items()],
            params=[Param(k, v) for k, v in self.params.items()],
            tags=[RunTag(k, v) for k, v in self.tags.items()],
        )
        return Run(info, data)


# the client methods a pending run answers (each takes the run id first)
RUN_CALLS = frozenset(
    {
        "log_batch", "set_tag", "delete_tag", "set_terminated", "update_run", "delete_run", "log_inputs",
        "log_text", "log_artifact", "log_artifacts", "list_artifacts", "get_metric_history", "get_run",
    }
)  # fmt: skip


class Routed:
    """The MLflow client, with the calls for a pending run answered by that run."""

    def __init__(self, client: Any, pending: dict[str, PendingRun]) -> None:
        self._client = client
        self._pending = pending

    @property
    def unwrapped(self) -> Routed:
        return Routed(getattr(self._client, "unwrapped", self._client), self._pending)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in RUN_CALLS and not (callable(attr) and not name.startswith("_")):
            return attr
        pending = self._pending

        def call(*args: Any, **kw: Any) -> Any:
            run_id = args[0] if args else kw.get("run_id")
            run = pending.get(run_id) if isinstance(run_id, str) else None
            if run is None:
                return attr(*args, **kw)
            if name not in RUN_CALLS:
                raise NotBulk(f"client.{name}")
            rest = {k: v for k, v in kw.items() if k != "run_id"}
            return getattr(run, name)(*args[1:], **rest)

        return call


@dataclass
class SchemaCheck:
    ok: bool
    why: str = ""


class BulkStore:
    """The tables of one in-process SQL store, written a transaction at a time."""

    DIALECTS = ("sqlite", "postgresql", "mysql")

    def __init__(self, store: Any) -> None:
        from mlflow.store.tracking.dbmodels import models as m

        self.store = store
        self.m = m
        self.dialect = store.engine.dialect.name

    @classmethod
    def check(cls, store: Any) -> SchemaCheck:
        """Whether this store's tables are the ones this MLflow writes: its schema revision
        is the installed MLflow's head (a store another MLflow migrated may differ)."""
        try:
            from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError:  # pragma: no cover - depends on MLflow's layout
            return SchemaCheck(False, "this MLflow has no schema revision to check")
        if os.environ.get("TRACKBRIDGE_BULK", "1") == "0":
            return SchemaCheck(False, "TRACKBRIDGE_BULK=0")
        if not isinstance(store, SqlAlchemyStore) or store.engine.dialect.name not in cls.DIALECTS:
            return SchemaCheck(False, "")
        try:
            have, want = _get_schema_version(store.engine), _get_latest_schema_revision()
        except Exception as e:  # any doubt: the API path
            return SchemaCheck(False, f"its schema revision could not be read ({type(e).__name__})")
        if have != want:
            return SchemaCheck(
                False, f"its schema revision {have} is not {want}, the one MLflow {_version()} writes"
            )
        return SchemaCheck(True)

    # -- one transaction

    def session(self) -> Any:
        try:
            return self.store.ManagedSessionMaker(read_only=False)
        except TypeError:  # an MLflow before read-only sessions
            return self.store.ManagedSessionMaker()

    def taken(self, session: Any, exp_ids: set[str], keys: list[str]) -> set[str]:
        """The source keys among ``keys`` that a run of the experiments carries."""
        m = self.m
        found: set[str] = set()
        ids = [int(e) for e in exp_ids]
        for i in range(0, len(keys), 500):
            q = (
                session.query(m.SqlTag.value)
                .join(m.SqlRun, m.SqlRun.run_uuid == m.SqlTag.run_uuid)
                .filter(m.SqlTag.key == mc.TAG_SOURCE_KEY, m.SqlTag.value.in_(keys[i : i + 500]))
                .filter(m.SqlRun.experiment_id.in_(ids))
            )
            found |= {r[0] for r in q.all()}
        return found

    def run_tags(self, session: Any, exp_id: str, keys: tuple[str, ...]) -> dict[str, dict[str, str]]:
        """The tags ``keys`` of every run of the experiment (deleted ones too), by run id:
        one query, where MLflow's search builds every run whole."""
        m = self.m
        q = (
            session.query(m.SqlTag.run_uuid, m.SqlTag.key, m.SqlTag.value)
            .join(m.SqlRun, m.SqlRun.run_uuid == m.SqlTag.run_uuid)
            .filter(m.SqlRun.experiment_id == int(exp_id), m.SqlTag.key.in_(keys))
        )
        out: dict[str, dict[str, str]] = {}
        for run_id, key, value in q.all():
            out.setdefault(run_id, {})[key] = value
        return out

    def set_tag_values(self, session: Any, key: str, values: dict[str, str]) -> None:
        """One tag of many runs, each to its value, in one statement sent many times."""
        from sqlalchemy import bindparam, update

        t = self.m.SqlTag.__table__
        stmt = (
            update(t).where(t.c.run_uuid == bindparam("rid"), t.c.key == key).values(value=bindparam("val"))
        )
        session.connection().execute(stmt, [{"rid": r, "val": v} for r, v in values.items()])

    def insert(self, session: Any, runs: list[PendingRun]) -> None:
        """Every row of ``runs``, in the session's transaction."""
        if not runs:
            return  # (an insert given no rows would add one row of nulls)
        m = self.m
        conn = session.connection()
        conn.execute(
            m.SqlRun.__table__.insert(),
            [
                {
                    "run_uuid": r.run_id, "name": r.name, "source_type": "UNKNOWN", "source_name": "",
                    "entry_point_name": "", "user_id": r.user, "status": r.status,
                    "start_time": r.start_time, "end_time": r.end_time, "deleted_time": r.deleted_time,
                    "source_version": "", "lifecycle_stage": r.lifecycle, "artifact_uri": r.artifact_uri,
                    "experiment_id": int(r.experiment_id),
                }
                for r in runs
            ],
        )  # fmt: skip
        tags = [{"key": k, "value": v, "run_uuid": r.run_id} for r in runs for k, v in r.tags.items()]
        params = [{"key": k, "value": v, "run_uuid": r.run_id} for r in runs for k, v in r.params.items()]
        latest = [
            {"key": k, "value": v, "timestamp": t, "step": s, "is_nan": n, "run_uuid": r.run_id}
            for r in runs
            for k, (s, t, v, n) in r.points.latest.items()
        ]
        for table, rows in ((m.SqlTag, tags), (m.SqlParam, params), (m.SqlLatestMetric, latest)):
            if rows:
                conn.execute(table.__table__.insert(), rows)
        self._points(conn, runs)
        for r in runs:
            if r.datasets:
                self._inputs(session, r)

    def _points(self, conn: Any, runs: list[PendingRun]) -> None:
        q = self.store.engine.dialect.identifier_preparer.quote  # `key` is a MySQL keyword
        cols = ", ".join(q(c) for c in ("key", "value", "timestamp", "run_uuid", "step", "is_nan"))
        table = q(self.m.SqlMetric.__table__.name)
        runs = [r for r in runs if r.points.count]
        if not runs:
            return
        if self.dialect == "postgresql":
            raw = conn.connection.dbapi_connection
            sql = f"COPY {table} ({cols}) FROM STDIN WITH (FORMAT csv)"
            data = copy_csv([(r.run_id, r.points) for r in runs])
            with raw.cursor() as cur:
                if hasattr(cur, "copy_expert"):  # psycopg2
                    cur.copy_expert(sql, io.BytesIO(data))
                else:  # psycopg 3
                    with cur.copy(sql) as copy:
                        copy.write(data)
            return
        if self.dialect == "mysql":
            # multi-row INSERTs, as the driver's executemany sends them, each well within
            # max_allowed_packet; keys quoted by the driver itself
            raw = conn.connection.dbapi_connection

            def literal(s: str) -> str:
                q = raw.literal(s)
                return q.decode() if isinstance(q, bytes) else q

            with raw.cursor() as cur:
                for values in values_lists([(r.run_id, r.points) for r in runs], literal):
                    cur.execute(f"INSERT INTO {table} ({cols}) VALUES {values}")
            return
        rows = [row for r in runs for row in driver_rows(r.points, r.run_id)]
        conn.exec_driver_sql(f"INSERT INTO {table} ({cols}) VALUES (?, ?, ?, ?, ?, ?)", rows)

    def _inputs(self, session: Any, r: PendingRun) -> None:
        """Dataset inputs as MLflow's ``log_inputs`` records them: a dataset once per
        experiment (by name and digest), one input edge per run, its tags."""
        import uuid

        m = self.m
        exp = int(r.experiment_id)
        seen: dict[tuple[str, str], Any] = {}
        for di in r.datasets:
            ds = di.dataset
            if (ds.name, ds.digest) in seen:
                continue
            seen[(ds.name, ds.digest)] = di
            have = (
                session.query(m.SqlDataset.dataset_uuid)
                .filter(m.SqlDataset.experiment_id == exp, m.SqlDataset.name == ds.name)
                .filter(m.SqlDataset.digest == ds.digest)
                .one_or_none()
            )
            if have is None:
                ds_uuid = uuid.uuid4().hex
                session.add(
                    m.SqlDataset(
                        dataset_uuid=ds_uuid, experiment_id=exp, name=ds.name, digest=ds.digest,
                        dataset_source_type=ds.source_type, dataset_source=ds.source,
                        dataset_schema=ds.schema, dataset_profile=ds.profile,
                    )
                )  # fmt: skip
                session.flush()
            else:
                ds_uuid = have[0]
            input_uuid = uuid.uuid4().hex
            session.add(
                m.SqlInput(
                    input_uuid=input_uuid, source_type="DATASET", source_id=ds_uuid,
                    destination_type="RUN", destination_id=r.run_id, step=0,
                )
            )  # fmt: skip
            for t in di.tags or ():
                session.add(m.SqlInputTag(input_uuid=input_uuid, name=t.key, value=t.value))
        session.flush()


def _version() -> str:
    import mlflow

    return mlflow.__version__


def new_pending(store: Any, exp: Any, payload: Any, tags: dict[str, str], name: str | None) -> PendingRun:
    """A run as ``create_run`` would make it: a new id, its artifacts under the
    experiment's location, a name (MLflow's random one when the source has none)."""
    import uuid

    from mlflow.utils.name_utils import _generate_random_name
    from mlflow.utils.uri import append_to_uri_path

    run_id = uuid.uuid4().hex
    name = name or tags.get(mc.TAG_RUN_NAME) or _generate_random_name()
    run = PendingRun(
        run_id=run_id,
        experiment_id=str(exp.experiment_id),
        artifact_uri=append_to_uri_path(exp.artifact_location, run_id, "artifacts"),
        name=name,
        user=tags.get(mc.TAG_USER, ""),
        start_time=mc.dt_to_ms(payload.run.get("start_time")) or _ms(),  # as MLflow's client
        tags={**tags, mc.TAG_RUN_NAME: name},
        payload=payload,
    )
    return run
