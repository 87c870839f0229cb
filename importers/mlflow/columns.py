"""A pending run's points, held as Arrow columns until its group is committed
(``trackbridge.importers.mlflow.bulk``).

A Python object per point cost more than the database's own insert of it: held
column-wise, the points go from the source's Arrow batches to SQLite's rows, to
PostgreSQL's ``COPY`` data or to MySQL's multi-row ``INSERT``s without being touched
one by one in Python. The rows are the
ones MLflow's ``log_batch`` writes: NaN and ±inf sanitised by MLflow's rule
(``SqlAlchemyStore.sanitize_metric_value``), exact repeats kept once (as the table's
primary key keeps them), and the latest value per key by MLflow's rule, greatest
``(step, timestamp, value)`` with the first of equals kept.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

POINTS = pa.schema(
    [("key", pa.string()), ("value", pa.float64()), ("timestamp", pa.int64()), ("step", pa.int64())]
)
ROWS = pa.schema([*POINTS, ("is_nan", pa.bool_())])
MAX_DOUBLE = 1.7976931348623157e308  # MLflow's stand-in for ±inf, which SQL cannot hold
_STORED = ["key", "value", "timestamp", "step", "is_nan"]


class NotBulk(Exception):
    """A call a pending run cannot answer (a point linked to a logged model): the run is
    written through MLflow's API instead, from the start."""


class PendingPoints:
    """Points added in batches: each batch sanitised once and folded into the latest
    values as it comes (a run's writer asks for them before its last batch); repeats
    dropped once, when the rows are asked for."""

    def __init__(self) -> None:
        self._chunks: list[pa.Table] = []  # sanitised, with the "same" column
        self.count = 0  # as added, repeats included: the size held in memory
        self._best: pa.Table | None = None  # one row per key, the latest
        self._rows: pa.Table | None = None
        self._latest: dict[str, tuple] | None = None

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        t = table.select(POINTS.names).cast(POINTS)
        is_nan = pc.is_nan(t["value"])
        clamped = pc.max_element_wise(pc.min_element_wise(t["value"], MAX_DOUBLE), -MAX_DOUBLE)
        value = pc.if_else(is_nan, 0.0, clamped)
        chunk = pa.table(
            {
                "key": t["key"], "value": value, "timestamp": t["timestamp"], "step": t["step"],
                "is_nan": is_nan,
                # -0.0 and 0.0 are one value to Python's comparison and the databases' keys
                "same": pc.add(value, 0.0),
            }
        )  # fmt: skip
        self._chunks.append(chunk)
        self.count += table.num_rows
        # the earlier latest values first: among equals the first added wins
        self._best = _best(pa.concat_tables([self._best, chunk]) if self._best is not None else chunk)
        self._rows = self._latest = None

    def add_records(self, recs: list[dict[str, Any]]) -> None:
        if any(r.get("model_id") for r in recs):
            raise NotBulk("a point linked to a logged model")
        self.add(pa.Table.from_pylist(recs, schema=POINTS))

    @property
    def rows(self) -> pa.Table:
        """The rows of ``metrics`` (key, value, timestamp, step, is_nan), exact repeats
        kept once as the table's primary key keeps them."""
        if self._rows is None:
            if not self._chunks:
                self._rows = ROWS.empty_table()
            else:
                kept = pa.concat_tables(self._chunks).group_by(
                    ["key", "same", "timestamp", "step", "is_nan"], use_threads=False
                ).aggregate([("value", "first")])  # fmt: skip
                self._rows = pa.table({c: kept["value_first" if c == "value" else c] for c in _STORED})
        return self._rows

    @property
    def latest(self) -> dict[str, tuple]:
        """key -> (step, timestamp, value, is_nan), the row of ``latest_metrics``."""
        if self._latest is None:
            b = self._best
            self._latest = (
                {}
                if b is None
                else {
                    k: tuple(row)
                    for k, *row in zip(
                        *(b[c].to_pylist() for c in ("key", "step", "timestamp", "value", "is_nan")),
                        strict=True,
                    )
                }
            )
        return self._latest

    def history(self, key: str) -> list[tuple]:
        """(key, value, timestamp, step) as MLflow returns them: NaN for a NaN point."""
        t = self.rows.filter(pc.equal(self.rows["key"], key))
        return [
            (k, math.nan if n else v, ts, s)
            for k, v, ts, s, n in zip(*(t[c].to_pylist() for c in _STORED), strict=True)
        ]


def _best(t: pa.Table) -> pa.Table:
    """The latest row per key by MLflow's rule: greatest (step, timestamp, value), the
    first of equals. The sort is stable, so each key's first row after it is its latest."""
    order = pc.sort_indices(
        t,
        sort_keys=[("key", "ascending"), ("step", "descending"), ("timestamp", "descending"),
                   ("same", "descending")],
    )  # fmt: skip
    s = t.take(order)
    keys = s["key"].combine_chunks()
    n = len(keys)
    first = pa.concat_arrays(
        [pa.array([True]), pc.not_equal(keys.slice(1), keys.slice(0, n - 1))]
    )  # a key's first row: where the key changes
    return s.filter(first)


def driver_rows(points: PendingPoints, run_id: str) -> list[tuple]:
    """(key, value, timestamp, run_uuid, step, is_nan) tuples for a driver's executemany."""
    t = points.rows
    n = t.num_rows
    key, value, ts, step, nan = (t[c].to_pylist() for c in _STORED)
    return list(zip(key, value, ts, [run_id] * n, step, nan, strict=True))


def _with_runs(runs: list[tuple[str, PendingPoints]]) -> pa.Table:
    tables = []
    for run_id, points in runs:
        t = points.rows
        tables.append(
            pa.table(
                {
                    "key": t["key"], "value": t["value"], "timestamp": t["timestamp"],
                    "run_uuid": pa.array([run_id] * t.num_rows, pa.string()), "step": t["step"],
                    "is_nan": t["is_nan"],
                }
            )
        )  # fmt: skip
    return pa.concat_tables(tables)


def copy_csv(runs: list[tuple[str, PendingPoints]]) -> bytes:
    """The rows of many runs in the column order (key, value, timestamp, run_uuid, step,
    is_nan), as CSV for PostgreSQL's ``COPY … WITH (FORMAT csv)``: Arrow's writer quotes
    what needs quoting and prints each double in its shortest exact form."""
    out = io.BytesIO()
    pa_csv.write_csv(_with_runs(runs), out, pa_csv.WriteOptions(include_header=False))
    return out.getvalue()


def values_lists(
    runs: list[tuple[str, PendingPoints]], literal: Callable[[str], str], per_statement: int = 20_000
) -> Iterator[str]:
    """The rows of many runs as the value lists of multi-row ``INSERT``s, per_statement
    rows to one, built column-wise: each distinct key quoted once by the driver's own
    ``literal`` (which knows the server's escaping rules), each double in its shortest
    exact form (Arrow's cast, as for ``copy_csv``). The same statements a driver's
    executemany sends, without its Python work per value."""
    t = _with_runs(runs)
    keys = t["key"].combine_chunks().dictionary_encode()
    quoted = pa.array([literal(k) for k in keys.dictionary.to_pylist()], pa.string()).take(keys.indices)
    row = pc.binary_join_element_wise(
        "(", quoted, ",", t["value"].cast(pa.string()), ",", t["timestamp"].cast(pa.string()), ",'",
        t["run_uuid"], "',", t["step"].cast(pa.string()), ",", pc.if_else(t["is_nan"], "1", "0"), ")", "",
    )  # fmt: skip
    for i in range(0, len(row), per_statement):
        yield ",".join(row.slice(i, per_statement).to_pylist())
