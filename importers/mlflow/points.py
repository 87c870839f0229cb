"""Metric points into MLflow: ``log_batch`` in MLflow's batch limits, or, into an
in-process SQL store, straight into its tables one statement a batch (``SqlPoints``);
only the points a run lacks, so a resumed import adds each point once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from trackbridge.importers.mlflow.plan import MAX_METRICS_PER_BATCH, Plan
from trackbridge.model import RunPayload
from trackbridge.report import RunReport
from trackbridge.retry import POLICY
from trackbridge.trackers.mlflow import common as mc


class SqlPoints:
    """Metric points straight into an in-process SQLite store, one statement a batch.

    ``log_batch`` into a SQL store goes through SQLAlchemy's unit of work, one ORM object
    a point: about 220 µs a point here (4,500 points/s), so a 10M-point run would take
    40 minutes. The same rows go in with one ``INSERT OR IGNORE`` per 50,000 points, and
    the run's latest values through MLflow's own ``_update_latest_metrics_if_necessary``
    with one candidate per key, in one transaction. So the rows, the duplicate rule (the
    table's primary key) and the latest-value rule are ``log_batch``'s. Used only when
    the store has every part this relies on; otherwise ``log_batch`` it is."""

    BATCH = 50_000
    _NEEDS = (
        "ManagedSessionMaker",
        "_get_run",
        "_check_run_is_active",
        "_update_latest_metrics_if_necessary",
        "sanitize_metric_value",
    )
    _COLUMNS = ("key", "value", "timestamp", "run_uuid", "step", "is_nan")

    def __init__(self, store: Any, table: Any) -> None:
        self.store = store
        self._sql = (
            f"INSERT OR IGNORE INTO {table.name} ({', '.join(self._COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)"
        )

    @classmethod
    def of(cls, store: Any) -> SqlPoints | None:
        try:
            from mlflow.store.tracking.dbmodels.models import SqlMetric
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError:  # pragma: no cover - depends on MLflow's layout
            return None
        if not isinstance(store, SqlAlchemyStore) or store.engine.dialect.name != "sqlite":
            return None
        cols = SqlMetric.__table__.columns
        fits = {c.name for c in cols} >= set(cls._COLUMNS) and all(
            c.name in cls._COLUMNS or c.nullable or c.default is not None or c.server_default is not None
            for c in cols
        )
        if not fits or not all(hasattr(store, n) for n in cls._NEEDS):
            return None
        return cls(store, SqlMetric.__table__)

    def write(self, run_id: str, recs: list[dict[str, Any]]) -> None:
        from types import SimpleNamespace

        sanitize = self.store.sanitize_metric_value
        rows = []
        latest: dict[str, tuple[int, int, float, bool]] = {}
        for r in recs:
            key, step, ts = r["key"], r["step"], r["timestamp"]
            is_nan, value = sanitize(r["value"])
            rows.append((key, value, ts, run_id, step, is_nan))
            best = latest.get(key)
            if best is None or (step, ts, value) > best[:3]:
                latest[key] = (step, ts, value, is_nan)
        candidates = [
            SimpleNamespace(run_uuid=run_id, key=k, step=s, timestamp=t, value=v, is_nan=n)
            for k, (s, t, v, n) in latest.items()
        ]
        try:
            writing = self.store.ManagedSessionMaker(read_only=False)
        except TypeError:  # an MLflow before read-only sessions: every session writes
            writing = self.store.ManagedSessionMaker()
        with writing as session:
            self.store._check_run_is_active(self.store._get_run(run_uuid=run_id, session=session))
            # the driver's executemany, in the session's transaction: no per-row ORM or
            # SQLAlchemy parameter processing
            session.connection().exec_driver_sql(self._sql, rows)
            self.store._update_latest_metrics_if_necessary(candidates, session)


def fitted_points(batch: pa.RecordBatch, plan: Plan) -> pa.Table:
    """A batch of neutral points as MLflow takes them (key, value, timestamp in ms, step),
    column-wise; what had to change is reported once."""
    enc = batch.column("key").dictionary_encode()
    keys = pa.array([plan.metric_key(k) for k in enc.dictionary.to_pylist()], pa.string())
    micros = batch.column("timestamp").cast(pa.int64())
    millis = pc.divide(micros, 1000)
    if pc.any(pc.not_equal(pc.multiply(millis, 1000), micros)).as_py():
        plan.once(
            "timestamp-truncated",
            "metrics.timestamp",
            "MLflow keeps milliseconds; sub-millisecond parts of timestamps were dropped",
        )
    if pc.any(pc.is_inf(batch.column("value"))).as_py():
        plan.once("value-clamped", "metrics.value", "MLflow stores +/-Infinity as +/-1.7976931348623157e308")
    cols = {
        "key": keys.take(enc.indices),
        "value": batch.column("value"),
        "timestamp": millis,
        "step": batch.column("step"),
    }
    return pa.table(cols)


def to_records(batch: pa.RecordBatch, plan: Plan, model_ids: dict[str, str]) -> list[dict[str, Any]]:
    """A batch of neutral points as MLflow metric dicts, links to logged models included."""
    recs = fitted_points(batch, plan).to_pylist()
    models = batch.column("model_key")
    if models.null_count < len(models):
        names = batch.column("dataset_name").to_pylist()
        digests = batch.column("dataset_digest").to_pylist()
        for i, m in enumerate(models.to_pylist()):
            model_id = model_ids.get(m) if m else None
            if model_id:
                recs[i].update(model_id=model_id, dataset_name=names[i], dataset_digest=digests[i])
            elif m:
                plan.once(
                    "model-link-dropped",
                    "metrics.model_key",
                    f"points linked to {m}, which is not in the destination, "
                    "were logged to the run without the link",
                )
    return recs


def _json_point(r: dict[str, Any]) -> dict[str, Any]:
    """Protobuf JSON has no NaN or Infinity literals: they travel as strings."""
    v = r["value"]
    if math.isfinite(v):
        return r
    return {**r, "value": "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")}


def _vkey(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else repr(float(v))


def chunks_by_size(items: list[Any], max_count: int, max_bytes: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    size = 0
    for it in items:
        n = len(it.key) + len(str(it.value)) + 64
        if chunk and (len(chunk) >= max_count or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(it)
        size += n
    if chunk:
        yield chunk


class PointsWriter:
    """A run's points, each written once."""

    _same: Any = None  # how the store compares keys (the sink's ``key_collation``)

    def _write_metrics(
        self,
        run_id: str,
        payload: RunPayload,
        plan: Plan,
        have_keys: set[str] | None,
        report: RunReport,
    ) -> None:
        """Send every point in batches of 1,000; for a run that exists, only the missing ones."""
        have: dict[str, Counter[tuple[int, int, str]]] = {}
        pending: list[dict[str, Any]] = []
        for batch in payload.metrics():
            batch = plan.keep_hidden(batch)
            held = self._pending.get(run_id)
            if held is not None and not have_keys and batch.column("model_key").null_count == len(batch):
                # a new run held for the bulk path: its points stay columns
                self._pending_points(held, fitted_points(batch, plan))
                report.points += len(batch)
                continue
            recs = to_records(batch, plan, self._model_ids)
            if have_keys:
                recs = self._missing(run_id, recs, have_keys, have)
            pending += recs
            full = len(pending) - len(pending) % self._batch
            for i in range(0, full, self._batch):
                self._send_metrics(run_id, pending[i : i + self._batch])
            report.points += full
            del pending[:full]  # one shift per source batch, not one per request
        if pending:
            self._send_metrics(run_id, pending)
            report.points += len(pending)

    def append_points(self, run_id: str, batch: pa.RecordBatch) -> None:
        """Points for a run being logged right now (the dual-logging shim): fitted to
        MLflow as an import fits them, sent at once, never diffed."""
        plan = Plan(RunReport(run_key=""), same=self._same)
        recs = to_records(batch, plan, self._model_ids)
        for i in range(0, len(recs), self._batch):
            self._send_metrics(run_id, recs[i : i + self._batch])

    def _missing(
        self,
        run_id: str,
        recs: list[dict[str, Any]],
        have_keys: set[str],
        have: dict[str, Counter[tuple[int, int, str]]],
    ) -> list[dict[str, Any]]:
        """Drop the points the destination already holds (an import that died half-way)."""
        out = []
        for r in recs:
            key = r["key"]
            if key not in have_keys:
                out.append(r)
                continue
            if key not in have:
                # points come sorted by key: the keys before this one are done, and one
                # key's history at a time is what memory holds
                have.clear()
                have[key] = Counter(
                    (m.step, m.timestamp, _vkey(m.value)) for m in self.client.get_metric_history(run_id, key)
                )
            sig = (r["step"], r["timestamp"], _vkey(r["value"]))
            if have[key][sig] > 0:
                have[key][sig] -= 1
            else:
                out.append(r)
        return out

    def _send_metrics(self, run_id: str, recs: list[dict[str, Any]]) -> None:
        pending = self._pending.get(run_id)
        if pending is not None:  # a new run held for the bulk path
            self._pending_points(pending, recs)
            return
        if self._creds is not None:
            # REST: post the JSON ourselves. MLflow's client would build an entity and a
            # protobuf per point first, CPU the server (often on the same box) needs more.
            # A repeated batch is harmless: the store's primary key drops identical points.
            body = {"run_id": run_id, "metrics": [_json_point(r) for r in recs]}
            mc.rest(self._creds, "/api/2.0/mlflow/runs/log-batch", "POST", json=body)
            return
        if self._sql is not None and not any("model_id" in r for r in recs):
            # under the same retries as every client call ("database is locked" while
            # another process writes the store); a failed attempt's transaction is rolled
            # back, and a repeat adds nothing (INSERT OR IGNORE)
            POLICY.call(lambda: self._sql.write(run_id, recs))
            return
        from mlflow.entities import Metric

        for i in range(0, len(recs), MAX_METRICS_PER_BATCH):
            chunk = recs[i : i + MAX_METRICS_PER_BATCH]
            self.client.log_batch(run_id, metrics=[Metric(**r) for r in chunk], synchronous=True)
