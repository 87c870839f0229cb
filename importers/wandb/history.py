"""A run's points as the W&B SDK takes them: rows of one ``log`` call each, steps that
only grow, streamed from the run's Arrow points (never one Python dict per row for the
whole run), with a digest of the rows so a resumed online run can prove its prefix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from trackbridge import schema
from trackbridge.model import RunPayload
from trackbridge.trackers.wandb import common as wc


@dataclass
class History:
    """A run's history as the SDK takes it, streamed: memory follows the run's Arrow
    points, never one Python dict per row for the whole run.

    ``points`` holds every point (step, ts in µs or null, key, value, json) in row order:
    by step, timestamp and key, a key's repeats in the order the source gave them. Points
    that share a step and a timestamp become one row, as one ``log`` call made them; a
    key's n-th point at the same step and time goes into that call's n-th row.
    ``mapped`` says the rows' steps are not one increasing sequence (so ``_step`` counts
    rows instead)."""

    points: pa.Table
    mapped: bool
    system: pa.Table | None
    # points linked to an MLflow logged model and dataset, which a W&B history row cannot
    # say: (key, step, value, model_key, dataset_name, dataset_digest), kept in _trackbridge
    links: list[list[Any]] = field(default_factory=list)
    # keys logged at decimal steps (Neptune) → the x-axis metric that holds their exact step
    axes: dict[str, str] = field(default_factory=dict)
    count: int = 0  # rows, once ``rows(digest=True)`` has gone through them
    full_digest: str | None = None

    def rows(
        self, digest: bool = False, chunk: int = 65_536
    ) -> Iterator[tuple[int, float | None, dict[str, Any]]]:
        """(step, _timestamp seconds, values) per row. With ``digest``, ``count`` and
        ``full_digest`` are set once the last row has been handed out."""
        h = self._hasher() if digest else None
        n = 0
        current: tuple[int, int | None] | None = None
        bucket: list[dict[str, Any]] = []

        def emit() -> Iterator[tuple[int, float | None, dict[str, Any]]]:
            assert current is not None
            step, ts = current
            for values in bucket:
                row = (step, None if ts is None else ts / 1_000_000, values)
                if h is not None:
                    h.update(_row_bytes(row))
                yield row

        for off in range(0, self.points.num_rows, chunk):
            part = self.points.slice(off, chunk)
            cols = [part.column(c).to_pylist() for c in ("step", "ts", "key", "value", "json")]
            for step, ts, key, value, text in zip(*cols, strict=True):
                if (step, ts) != current:
                    if bucket:
                        n += len(bucket)
                        yield from emit()
                    current, bucket = (step, ts), []
                v = value if text is None else json.loads(text)
                for r in bucket:
                    if key not in r:
                        r[key] = v
                        break
                else:
                    bucket.append({key: v})
        if bucket:
            n += len(bucket)
            yield from emit()
        if h is not None:
            self.count, self.full_digest = n, h.hexdigest()

    def digest(self, n: int) -> str:
        """Of the first ``n`` rows as W&B holds them: a resumed run may only grow, so the
        rows already written must be the same ones."""
        h = self._hasher()
        for row in itertools.islice(self.rows(), n):
            h.update(_row_bytes(row))
        return h.hexdigest()

    def _hasher(self) -> Any:
        return hashlib.sha256(b"mapped" if self.mapped else b"steps")


def _row_bytes(row: tuple[int, float | None, dict[str, Any]]) -> bytes:
    return json.dumps(row, sort_keys=True, default=str).encode()


def with_links(args: dict[str, Any], history: History) -> dict[str, Any]:
    """``wandb.init`` arguments whose ``_trackbridge`` entry holds the history's model
    links (a copy: the fitted arguments stay as they were)."""
    if not history.links:
        return dict(args)
    config = dict(args["config"])
    config[wc.META_KEY] = {**config[wc.META_KEY], "model_links": history.links}
    return {**args, "config": config}


def history_of(payload: RunPayload) -> History:
    """The run's points in row order (see ``History``), with system metrics set aside."""
    parts, system, links = [], [], []
    for batch in payload.metrics():
        linked = batch.filter(pc.is_valid(batch.column("model_key")))
        cols = ("key", "step", "value", "model_key", "dataset_name", "dataset_digest")
        links += [[r[c] for c in cols] for r in linked.to_pylist()]
        keys_col = batch.column("key")
        aside = pc.or_(pc.starts_with(keys_col, "system/"), pc.equal(keys_col, "_runtime"))
        if pc.any(aside).as_py():
            system.append(batch.filter(aside))
            batch = batch.filter(pc.invert(aside))
        parts.append(_points(batch, batch.column("value"), pa.nulls(batch.num_rows, pa.string())))
    series = payload.series
    parts.append(_points(series, pa.nulls(series.num_rows, pa.float64()), series.column("value_json")))
    points = _float_untimed(pa.concat_tables(parts).combine_chunks())
    scales = schema.step_scales(payload.run)
    decimal = None
    if scales:  # keys at decimal steps go on their own x-axis, after the rest
        on_axis = pc.is_in(points.column("key"), value_set=pa.array(sorted(scales), pa.string()))
        decimal = points.filter(on_axis)
        points = points.filter(pc.invert(on_axis))
    n = points.num_rows
    sort = pa.table(
        {
            "step": points.column("step"),
            "ts": pc.fill_null(points.column("ts"), -1),
            "key": points.column("key"),
            "order": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    order = pc.sort_indices(sort, [(c, "ascending") for c in sort.column_names])
    sort = sort.select(["step", "ts", "key"]).take(order)
    # one row per step, in increasing order, unless a step is negative, has two times, or
    # has a key twice at one time (each makes a second row for that step)
    step, ts, key = (sort.column(c) for c in ("step", "ts", "key"))
    mapped = n > 0 and (
        pc.min(step).as_py() < 0
        or (
            n > 1
            and pc.any(
                pc.and_(
                    pc.equal(step.slice(1), step.slice(0, n - 1)),
                    pc.or_(
                        pc.not_equal(ts.slice(1), ts.slice(0, n - 1)),
                        pc.equal(key.slice(1), key.slice(0, n - 1)),
                    ),
                )
            ).as_py()
        )
    )
    del sort, step, ts, key  # before the points are copied: one sorted copy at a time
    sys_tbl = pa.Table.from_batches(system) if system else None
    points = points.take(order)
    axes: dict[str, str] = {}
    if decimal is not None and decimal.num_rows:
        points, axes = _decimal_rows(points, decimal, scales)
    return History(points, bool(mapped), sys_tbl, links, axes)


def _float_untimed(points: pa.Table) -> pa.Table:
    """A point with no time (a table MLflow logged without one) joins the first row of
    its step: its own row would give the step two times, and W&B a row counter."""
    ts = points.column("ts")
    if ts.null_count == 0 or ts.null_count == points.num_rows:
        return points
    firsts = points.filter(pc.is_valid(ts)).group_by("step").aggregate([("ts", "min")])
    order = pa.array(np.arange(points.num_rows, dtype=np.int64))
    joined = points.append_column("_order", order).join(firsts, keys="step", join_type="left outer")
    joined = joined.sort_by("_order")
    filled = pc.coalesce(joined.column("ts"), joined.column("ts_min"))
    return joined.select(points.column_names).set_column(1, "ts", filled)


def _decimal_rows(
    points: pa.Table, decimal: pa.Table, scales: dict[str, int]
) -> tuple[pa.Table, dict[str, str]]:
    """The points of keys logged at decimal steps, each in a row of its own after every
    other row (so every other key keeps its W&B ``_step`` exactly), holding its exact
    decimal step in the key's own x-axis metric (``trackbridge/step/<key>``) and its
    scaled step in ``trackbridge/step``, which the reader takes as the step."""
    base = (pc.max(points.column("step")).as_py() + 1) if points.num_rows else 0
    order = pc.sort_indices(decimal, [("step", "ascending"), ("ts", "ascending"), ("key", "ascending")])
    decimal = decimal.take(order)
    n = decimal.num_rows
    wstep = pa.array(np.arange(base, base + n, dtype=np.int64))
    names = sorted(scales)
    keys = decimal.column("key").combine_chunks()
    per_key = pa.array([float(scales[k]) for k in names]).take(pc.index_in(keys, value_set=pa.array(names)))
    step = decimal.column("step").combine_chunks().cast(pa.float64())
    axis = pc.binary_join_element_wise(wc.STEP_AXIS + "/", keys, "")
    extra = pa.table(
        {
            "step": pa.concat_arrays([wstep, wstep]),
            "ts": pa.concat_arrays([decimal.column("ts").combine_chunks()] * 2),
            "key": pa.concat_arrays([pa.array([wc.STEP_AXIS] * n, pa.string()), axis]),
            "value": pa.concat_arrays([step, pc.divide(step, per_key)]),
            "json": pa.nulls(2 * n, pa.string()),
        }
    )
    axes = {k: f"{wc.STEP_AXIS}/{k}" for k in pc.unique(keys).to_pylist()}
    own = decimal.set_column(0, "step", wstep)
    # each decimal point and its two axis values make one row: sort them together
    both = pa.concat_tables([own, extra.cast(own.schema)])
    both = both.take(pc.sort_indices(both, [("step", "ascending")]))
    return pa.concat_tables([points, both]), axes


def _points(tbl: pa.Table | pa.RecordBatch, value: Any, text: Any) -> pa.Table:
    """Metrics (a float value) or series (a JSON text) as ``History.points`` rows."""
    return pa.table(
        {
            "step": tbl.column("step"),
            # µs as integers: a float round trip could split a row
            "ts": tbl.column("timestamp").cast(pa.int64()),
            "key": tbl.column("key"),
            "value": value,
            "json": text,
        }
    )
