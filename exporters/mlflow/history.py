"""Full metric histories out of MLflow: paged ``get-history`` over REST, parsed by
Arrow's JSON reader (a 5,000-point page in 7 ms instead of 45), or the store's own
call in-process. Never a sampled endpoint.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from trackbridge import schema
from trackbridge.trackers.mlflow import common as mc

HISTORY_PAGE = 25000  # points a request
# a run's points that belong to a logged model: key -> (step, ts, value) -> (model id, dataset name, digest)
Links = dict[str, dict[tuple[int, int, float], tuple[str, str | None, str | None]]]


_POINT = pa.struct([("step", pa.int64()), ("timestamp", pa.int64()), ("value", pa.float64())])


_PAGE = pa.schema([("metrics", pa.list_(_POINT)), ("next_page_token", pa.string())])


def points_table(steps: Any, stamps: Any, values: Any) -> pa.Table:
    return pa.table(
        [pa.array(steps, pa.int64()), pa.array(stamps, pa.int64()), pa.array(values, pa.float64())],
        names=["step", "timestamp", "value"],
    )


def _parse_page(content: bytes) -> tuple[pa.Table, str | None]:
    """One ``get-history`` response → (step, timestamp, value) columns and the next token.

    Arrow's JSON reader does the common page in C. proto3 JSON leaves out zero fields
    (filled back here) and spells NaN and infinities as strings, which Arrow refuses as
    a double: such a page goes through Python's ``json`` instead, value by value.
    """
    import pyarrow.json as pj

    try:
        page = pj.read_json(
            io.BytesIO(content),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(content) + 1),
            parse_options=pj.ParseOptions(
                explicit_schema=_PAGE, newlines_in_values=True, unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        body = json.loads(content)
        points = body.get("metrics", [])
        return points_table(
            [int(m.get("step", 0)) for m in points],
            [int(m.get("timestamp", 0)) for m in points],
            [float(m.get("value", 0.0)) for m in points],
        ), body.get("next_page_token")
    points = page.column("metrics")[0].values
    token = page.column("next_page_token")[0].as_py()
    if points is None:  # no "metrics" at all: an empty history
        return points_table([], [], []), token
    return pa.table(
        [
            points.field("step").fill_null(0),
            points.field("timestamp").fill_null(0),
            points.field("value").fill_null(0.0),
        ],
        names=["step", "timestamp", "value"],
    ), token


class HistoryReader:
    """The metric histories of one run, every point."""

    def _history(self, run_id: str, key: str) -> pa.Table:
        """The full history of one metric, every page of it: columns step, timestamp (ms)
        and value."""
        if not self._rest:
            hist = self.client.get_metric_history(run_id, key)
            return points_table([m.step for m in hist], [m.timestamp for m in hist], [m.value for m in hist])
        # Over REST, skip MlflowClient's per-point entity objects and Python's JSON: the
        # server is the bottleneck and shares the CPU with us, so every client cycle
        # saved is speed. Arrow parses a 5,000-point page in a fifth of the time.
        creds = self.client._tracking_client.store.get_host_creds()
        pages = []
        token = None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": HISTORY_PAGE}
            if token:
                params["page_token"] = token
            resp = mc.rest(creds, "/api/2.0/mlflow/metrics/get-history", "GET", params=params)
            page, token = _parse_page(resp.content)
            pages.append(page)
            if not token:
                return pa.concat_tables(pages)

    def _history_table(
        self,
        key: str,
        run_id: str,
        mlflow_key: str,
        neutral_key: str,
        model_points: Links,
    ) -> pa.Table:
        hist = self._history(run_id, mlflow_key)
        n = hist.num_rows
        tbl = schema.metrics_table(
            key,
            pa.repeat(pa.scalar(neutral_key, pa.string()), n),
            hist.column("step"),
            pc.multiply_checked(hist.column("timestamp"), 1000),
            hist.column("value"),
        )
        hits = model_points.get(mlflow_key)
        if hits:  # a Python pass over the points only for a key linked to a logged model
            cols: list[list[str | None]] = [[None] * n for _ in range(3)]
            points = zip(*(hist.column(c).to_pylist() for c in ("step", "timestamp", "value")), strict=True)
            for i, point in enumerate(points):
                link = hits.get(point)
                if link:
                    cols[0][i], cols[1][i], cols[2][i] = link
            for name, col in zip(("model_key", "dataset_name", "dataset_digest"), cols, strict=True):
                i = tbl.schema.get_field_index(name)
                tbl = tbl.set_column(i, tbl.schema.field(i), pa.array(col, pa.string()))
        return tbl
