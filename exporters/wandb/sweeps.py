"""W&B sweeps as neutral searches: one row per sweep (``sweep_key`` = its own key), and
each trial's ``sweep_key`` pointing at it.

A trial's run record names its sweep (``sweep_id``), offline too; the sweep's definition
(method, metric and goal, parameter space) and its best run live only on the server, so
the online reader looks them up once per sweep and the offline reader has the id alone.
A trial trackbridge wrote from another tracker carries the search it belonged to in
``_trackbridge.sweep`` (W&B's SDK cannot make a sweep offline), and reads back as it went in.
Both readers keep one ``Sweeps`` and ask it the same three questions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trackbridge import schema
from trackbridge.model import RunPayload, TrackerSource
from trackbridge.trackers.wandb import common as wc
from trackbridge.trackers.wandb.api import SweepInfo

# W&B's sweep states → the neutral run status of the search's own row
SWEEP_STATUS = {
    "RUNNING": "running",
    "PENDING": "scheduled",
    "PAUSED": "running",
    "FINISHED": "finished",
    "CANCELED": "killed",
    "CANCELLED": "killed",
    "FAILED": "failed",
    "CRASHED": "crashed",
}


@dataclass
class _Search:
    row: dict[str, Any]
    params: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)


class Sweeps:
    """The searches of one W&B source, found while its runs are listed."""

    def __init__(self, source: TrackerSource, lookup: Callable[[str, str], SweepInfo | None]) -> None:
        self._source = source
        self._lookup = lookup  # (project, sweep id) -> what the server says, or None
        self._found: dict[str, _Search] = {}

    def trial(self, row: dict[str, Any], project: str, sweep_id: str | None, meta: Any) -> None:
        """Note the search a listed run is a trial of, and set the row's ``sweep_key``."""
        kept_sweep = meta.get("sweep") if isinstance(meta, dict) else None
        if isinstance(kept_sweep, dict) and kept_sweep.get("key"):
            key = self._kept(row, project, kept_sweep)
        elif sweep_id:
            key = self._server(row, project, sweep_id)
        else:
            return
        row["sweep_key"] = key
        found = self._found[key].row
        start = row.get("start_time")
        earlier = start is not None and (found["start_time"] is None or start < found["start_time"])
        if found.get("_from_trials") and earlier:
            found["start_time"] = start

    def _server(self, trial: dict[str, Any], project: str, sweep_id: str) -> str:
        key = wc.sweep_key(project, sweep_id)
        if key in self._found:
            return key
        info = self._lookup(project, sweep_id) or SweepInfo(sweep_id)
        row = self._row(key, trial["project_key"], sweep_id)
        row.update(
            name=info.name or sweep_id,
            # offline, the sweep's state is the server's alone: the trials here are done
            status=SWEEP_STATUS.get((info.state or "").upper(), "finished"),
            start_time=info.created_at,
        )
        row["_from_trials"] = info.created_at is None  # offline: the first trial's start
        search = _Search(row, wc.param_rows(key, info.config or {}))
        best = {
            "best_run_id": info.best_run_id,
            "best_run_name": info.best_run_name,
        }
        metric = (info.config or {}).get("metric") or {}
        if isinstance(metric, dict) and metric.get("name") and info.best_value is not None:
            best[f"best_{metric['name']}"] = info.best_value
        search.summary = [
            {"run_key": key, "path": [k], "value_json": schema.dumps_value(v)}
            for k, v in sorted(best.items())
            if v is not None
        ]
        self._found[key] = search
        return key

    def _kept(self, trial: dict[str, Any], project: str, kept_sweep: dict[str, Any]) -> str:
        origin = str(kept_sweep["key"])
        key = wc.sweep_key(project, hashlib.sha256(origin.encode()).hexdigest()[:16])
        self._source._origin[key] = origin
        if key in self._found:
            return key
        fields = kept_sweep.get("row") or {}
        row = self._row(key, trial["project_key"], fields.get("source_id"))
        row.update({k: fields.get(k) for k in wc.SWEEP_FIELDS if k != "source_id"})
        row["start_time"] = wc.seconds_to_dt(fields.get("start_time"))
        row["end_time"] = wc.seconds_to_dt(fields.get("end_time"))
        params = [{"run_key": key, **p} for p in kept_sweep.get("params") or []]
        summary = [{"run_key": key, **s} for s in kept_sweep.get("summary") or []]
        self._found[key] = _Search(row, params, summary)
        return key

    @staticmethod
    def _row(key: str, project_key: str, source_id: str | None) -> dict[str, Any]:
        return {
            "run_key": key,
            "project_key": project_key,
            "source_id": source_id,
            "name": None,
            "status": None,
            "lifecycle": "active",
            "start_time": None,
            "end_time": None,
            "labels": [],
            "sweep_key": key,
        }

    def rows(self, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The searches of these listed trials, as listed rows, each once."""
        keys = dict.fromkeys(r["sweep_key"] for r in trials if r.get("sweep_key"))
        return [{k: v for k, v in self._found[k].row.items() if not k.startswith("_")} for k in keys]

    def owns(self, run_key: str) -> bool:
        return run_key in self._found

    def read(self, run_key: str) -> RunPayload:
        """A search's own payload: its definition as params, its best run in the summary."""
        s = self._found[run_key]
        row = {f: s.row.get(f) for f in schema.SCHEMAS["runs"].names}
        return RunPayload(
            run=row,
            params=schema.table("params", s.params),
            tags=schema.empty("tags"),
            metrics=lambda: iter(()),
            summary=schema.table("summary", s.summary),
        )
