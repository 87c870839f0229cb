"""A W&B run's history and system metrics, as they arrive (decoded record batches or
the online API's rows), into the neutral ``metrics`` and ``series`` tables: the flat
lists become Arrow columns once, at the end, never a Python object per point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from trackbridge import schema
from trackbridge.errors import BadInputError
from trackbridge.exporters.wandb.decode import (
    Items,
    pb_items,
)
from trackbridge.trackers.wandb import common as wc


def _floats(values: pa.Array) -> pa.Array:
    """JSON numbers (``NaN`` and ``Infinity`` included) as float64, parsed by Arrow."""
    try:
        return values.cast(pa.float64())
    except pa.ArrowInvalid:  # something Arrow's parser does not take: let json decide
        return pa.array([float(json.loads(v)) for v in values.to_pylist()], pa.float64())


class HistoryTables:
    """History rows in, metrics and series tables out."""

    def _history_batch(self, batch: list[tuple[int, bytes]], log_path: Path) -> None:
        try:
            got = self._fast.history([p for _, p in batch])
        except Exception:
            got = None
        if got is None:
            if len(batch) > 1:  # record by record: the odd ones alone take the slow path
                for one in batch:
                    self._history_batch([one], log_path)
                return
            from wandb.proto import wandb_internal_pb2 as pb

            offset, payload = batch[0]
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception as e:
                raise BadInputError(f"{log_path}: byte {offset}: record does not decode ({e})") from e
            self._history(pb_items(rec.history.item), rec.history.step.num)
            return
        counts, steps, keys, values = got
        self.fast_records += len(counts)
        base = len(self.row_step)
        self.row_step.extend(steps)
        self.row_time.extend([None] * len(steps))
        self.item_key.extend(keys)
        self.item_json.extend(values)
        for i, c in enumerate(counts):
            self.item_row.extend([base + i] * c)

    def _history(self, items: Items, step: int) -> None:
        """One history row. Single keys go to the flat lists as they are, W&B's own
        (``_timestamp``, ``_step``…) included: ``tables()`` sorts them out for all rows
        at once. Nested keys (media, logged dicts) are rebuilt as a tree."""
        row = len(self.row_step)
        keys, jsons, rows = self.item_key, self.item_json, self.item_row
        nested: dict[str, Any] | None = None
        for path, v in items:
            if len(path) != 1:
                if nested is None:
                    nested = {}
                wc.set_path(nested, list(path), json.loads(v))
                continue
            keys.append(path[0])
            jsons.append(v)
            rows.append(row)
        self.row_step.append(step)
        self.row_time.append(None)
        if nested is not None:
            self.nested.append((row, nested))

    def _stats(self, s: Any) -> None:
        t = s.timestamp.seconds + s.timestamp.nanos / 1e9
        self._system(t, [(it.key, it.value_json) for it in s.item])

    def _system(self, t: float, items: list[tuple[str, str]]) -> None:
        row = len(self.row_step)
        self.row_step.append(self.stats_n)
        self.row_time.append(repr(t))
        self.stats_n += 1
        for key, value_json in items:
            self.item_key.append("system/" + key)
            self.item_json.append(value_json)
            self.item_row.append(row)

    def history_row(self, row: dict[str, Any]) -> None:
        """One ``scan_history`` row. Nested dicts that are not media are namespaces."""
        items: Items = []
        for path, v in wc.flatten({k: v for k, v in row.items() if k != "_step"}):
            items.append((tuple(path), schema.dumps_value(v)))
        self._history(items, int(row.get("_step") or 0))

    def system_row(self, row: dict[str, Any]) -> None:
        """One line of ``wandb-events.jsonl``: ``system.cpu`` → ``system/cpu``."""
        t = row.get("_timestamp")
        items = [
            (k.removeprefix("system."), schema.dumps_value(v))
            for k, v in row.items()
            if k not in ("_timestamp", "_runtime") and isinstance(v, int | float)
        ]
        self._system(float(t) if t is not None else 0.0, items)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """The metrics and series tables, built column-wise from the flat item lists."""
        keys = pa.array(self.item_key, pa.string())
        values = pa.array(self.item_json, pa.string())
        rows = pa.array(self.item_row, pa.int64())
        n_rows = len(self.row_step)
        # each row's time: stats rows carry it; history rows have a _timestamp item
        times = np.array([np.nan if t is None else float(t) for t in self.row_time], dtype=np.float64)
        is_ts = pc.equal(keys, "_timestamp")
        if n_rows and pc.any(is_ts).as_py():
            times[rows.filter(is_ts).to_numpy()] = _floats(values.filter(is_ts)).to_numpy(
                zero_copy_only=False
            )
        steps = np.array(self.row_step, dtype=np.int64)
        is_axis = pc.equal(keys, wc.STEP_AXIS)
        if pc.any(is_axis).as_py():  # a run trackbridge wrote on a row counter
            steps[rows.filter(is_axis).to_numpy()] = (
                _floats(values.filter(is_axis)).to_numpy().astype(np.int64)
            )
        self.steps_final = steps
        drop = pc.or_(pc.or_(is_ts, is_axis), pc.equal(keys, "_step"))
        if isinstance(self.config.get(wc.META_KEY), dict):
            drop = pc.or_(drop, pc.equal(keys, "_runtime"))  # our own import's clock
            # a decimal-step key's own x-axis (its exact step, which trackbridge/step scales)
            drop = pc.or_(drop, pc.starts_with(keys, wc.STEP_AXIS + "/"))
        keep = pc.invert(drop)
        keys, values, rows = keys.filter(keep), values.filter(keep), rows.filter(keep)
        first = pc.utf8_slice_codeunits(values, 0, 1)
        numeric = pc.is_in(first, value_set=pa.array(list("-0123456789NI")))
        known = times[~np.isnan(times)]
        self.last_time = float(known.max()) if known.size else None

        s_rows: list[dict[str, Any]] = []
        other = pc.invert(numeric)
        for k, v, r in zip(
            keys.filter(other).to_pylist(),
            values.filter(other).to_pylist(),
            rows.filter(other).to_pylist(),
            strict=True,
        ):
            self._series(s_rows, k, r, json.loads(v), times)
        m_keys, m_vals, m_rows = keys.filter(numeric), _floats(values.filter(numeric)), rows.filter(numeric)
        extra_k, extra_v, extra_r = [], [], []
        for row, tree in self.nested:
            for path, leaf in wc.flatten(tree):
                if type(leaf) is float or type(leaf) is int:
                    extra_k.append(".".join(path))
                    extra_v.append(float(leaf))
                    extra_r.append(row)
                else:
                    self._series(s_rows, ".".join(path), row, leaf, times)
        if extra_k:
            m_keys = pa.concat_arrays([m_keys, pa.array(extra_k, pa.string())])
            m_vals = pa.concat_arrays([m_vals, pa.array(extra_v, pa.float64())])
            m_rows = pa.concat_arrays([m_rows, pa.array(extra_r, pa.int64())])
        idx = m_rows.to_numpy()
        us = np.round(times[idx] * 1_000_000)
        stamps = pa.array(us, pa.float64(), from_pandas=True).cast(pa.int64()).cast(schema.TS)
        n = len(m_keys)
        none = pa.nulls(n, pa.string())
        tbl = pa.table(
            [
                pa.array([self.run_key] * n, pa.string()),
                m_keys,
                pa.array(steps[idx], pa.int64()),
                stamps,
                m_vals,
                none,
                none,
                none,
            ],
            schema=schema.SCHEMAS["metrics"],
        )
        if n:
            tbl = tbl.take(pc.sort_indices(tbl, [("key", "ascending"), ("step", "ascending")]))
        return tbl, schema.table("series", s_rows)

    def _series(self, out: list[dict[str, Any]], key: str, row: int, v: Any, times: np.ndarray) -> None:
        if isinstance(v, dict) and "_type" in v:
            kind = str(v["_type"])
            path = v.get("path") if isinstance(v.get("path"), str) else None
            sha = v.get("sha256") if isinstance(v.get("sha256"), str) else None
        else:
            kind = {bool: "bool", str: "string", type(None): "null"}.get(type(v), "json")
            path = sha = None
        t = float(times[row])
        out.append(
            {
                "run_key": self.run_key,
                "key": key,
                "step": int(self.steps_final[row]),
                "timestamp": None if math.isnan(t) else wc.seconds_to_dt(t),
                "kind": kind,
                "value_json": schema.dumps_value(v),
                "file_path": path,
                "file_sha256": sha,
            }
        )
