"""How one run's keys and values are fitted into MLflow's limits (the tracker's
declaration), and the record that undoes it: ``trackbridge/mapping.json``, which the
exporter reads back so that a round trip is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from trackbridge import fit, native, schema
from trackbridge.report import RunReport
from trackbridge.tracker import Tracker
from trackbridge.trackers.mlflow import LIMITS, TRACKER
from trackbridge.trackers.mlflow import common as mc

# MLflow's limits, as its declaration states them (trackbridge.trackers.mlflow)
MAX_KEY: int = LIMITS.key_chars  # type: ignore[assignment]
MAX_PARAM: int = LIMITS.param_value_chars  # type: ignore[assignment]
MAX_TAG: int = LIMITS.tag_value_chars  # type: ignore[assignment]
MAX_METRICS_PER_BATCH: int = LIMITS.metrics_per_batch  # type: ignore[assignment]
MAX_PARAMS_TAGS_PER_BATCH: int = LIMITS.params_tags_per_batch  # type: ignore[assignment]
MAX_BATCH_BYTES: int = LIMITS.batch_bytes  # type: ignore[assignment]
MAPPING_VERSION = 3  # 2: native landing (trackbridge.native); 3: searches nested, models logged


def fit_key(key: str) -> str:
    """The closest key MLflow accepts: allowed charset, no path tricks, ≤ 250 chars."""
    return fit.fit_key(key, LIMITS)


def key_collation(store: Any) -> Callable[[str], str] | None:
    """How the store's tables compare keys, where Python's ``==`` would mislead: MLflow
    makes its MySQL tables with the database's collation, by default case- and
    accent-insensitive, so a run's ``LR`` and ``lr`` are one primary key there and the
    second is renamed as any other collision is. (Behind an ``mlflow server`` the
    database cannot be seen, and keys are compared as written.)"""
    engine = getattr(store, "engine", None)
    if engine is not None and engine.dialect.name == "mysql":
        return fit.insensitive
    return None


def param_text(value_json: str, value_type: str) -> str:
    if value_type in ("str", "datetime"):
        v = schema.loads_value(value_json)
        return v if isinstance(v, str) else value_json
    return value_json


class Plan:
    """How one run's keys and values are fitted into MLflow, and the record to undo it."""

    def __init__(
        self, report: RunReport, source: Tracker | None = None, same: Callable[[str], str] | None = None
    ) -> None:
        """``same``: how the destination compares keys, where that is not as Python does
        (``mc.key_collation``: a MySQL store, where ``LR`` and ``lr`` are one key)."""
        self.report = report
        # the tracker the run came from: its system metrics get MLflow's names, its own
        # bookkeeping series (W&B's _runtime) go to a private file (trackbridge.native)
        self.source = source
        self.hidden = pa.array(sorted(source.bookkeeping_metrics) if source else [], pa.string())
        self.kept: list[pa.RecordBatch] = []
        self.system_named = 0
        self.mapping: dict[str, Any] = {"version": MAPPING_VERSION, "params": {}, "tags": {}, "metrics": {}}
        self._param_keys = fit.KeySpace(LIMITS, same)
        self._tag_keys = fit.KeySpace(LIMITS, same)
        self._metric_keys = fit.KeySpace(LIMITS, same)
        self._metric_cache: dict[str, str] = {}
        self._reported: set[tuple[str, str, str]] = set()

    def mapping_needed(self) -> bool:
        return any(self.mapping[k] for k in ("params", "tags", "metrics"))

    def _fit_value(self, text: str, limit: int, where: str) -> tuple[str, bool]:
        """Cut to MLflow's limit, visibly; the caller keeps the full value in mapping.json."""
        return fit.fit_value(text, limit, where, self.report, mc.MAPPING_ARTIFACT)

    def params(self, tbl: pa.Table) -> dict[str, str]:
        out = {}
        for p in tbl.to_pylist():
            original = ".".join(p["path"])
            key = self._param_keys.fit(original, tuple(p["path"]))
            if key != original:
                self.report.mapped("key-renamed", f"params.{original}", f"written as {key!r}")
            text, cut = self._fit_value(
                param_text(p["value_json"], p["value_type"]), MAX_PARAM, f"params.{original}"
            )
            exact = key == original and len(p["path"]) == 1 and p["value_type"] == "str" and not cut
            if not exact:
                self.mapping["params"][key] = {k: p[k] for k in ("path", "value_json", "value_type")}
            out[key] = text
        return out

    def tags(self, tbl: pa.Table, run: dict[str, Any]) -> dict[str, str]:
        out = {}
        for t in tbl.to_pylist():
            original = t["key"]
            if original in (mc.TAG_PARENT, mc.TAG_USER, mc.TAG_RUN_NAME) or mc.is_bookkeeping(original):
                continue  # set from the run's own fields, or ours to manage
            key = self._tag_keys.fit(original)
            if key != original:
                self.report.mapped("key-renamed", f"tags.{original}", f"written as {key!r}")
            value, cut = self._fit_value(t["value"] or "", MAX_TAG, f"tags.{original}")
            if key != original or cut:
                self.mapping["tags"][key] = {"key": original, "value": t["value"]}
            out[key] = value
        if run.get("notes"):
            notes, cut = self._fit_value(run["notes"], MAX_TAG, "runs.notes")
            if cut:
                self.mapping["tags"][mc.TAG_NOTE] = {"key": mc.TAG_NOTE, "value": run["notes"]}
            out[mc.TAG_NOTE] = notes
        for f, tag in mc.RUN_FIELD_TAGS.items():
            if run.get(f) and tag not in out:
                value, cut = self._fit_value(str(run[f]), MAX_TAG, f"runs.{f}")
                if cut:
                    self.mapping["tags"][tag] = {"key": tag, "value": str(run[f])}
                out[tag] = value
        for label in run.get("labels") or []:
            original = mc.LABEL_PREFIX + label
            key = self._tag_keys.fit(original)
            if key != original:
                self.report.mapped("key-renamed", f"runs.labels.{label}", f"written as tag {key!r}")
                self.mapping["tags"][key] = {"key": original, "value": ""}
            out[key] = "true"  # a value, so that the runs table shows it and a filter finds it
        if run.get("source_incomplete"):
            out[mc.TAG_INCOMPLETE] = "true"
        if run.get("step_scale"):  # a bundle of trackbridge 0.1: one scale for every key
            out[mc.TAG_STEP_SCALE] = str(run["step_scale"])
            self.report.mapped(
                "step-scaled",
                "metrics.step",
                f"decimal steps written × {run['step_scale']} as MLflow's integer steps; "
                f"divide by tag {mc.TAG_STEP_SCALE} for the exact step",
            )
        scales = schema.step_scales(run)
        if scales:
            # only the keys logged at decimal steps; every other key's steps are as logged
            out[mc.TAG_STEP_SCALE] = ", ".join(f"{k}={v}" for k, v in sorted(scales.items()))
            for k, v in sorted(scales.items()):
                self.report.mapped(
                    "step-scaled",
                    f"metrics.{k}",
                    f"decimal steps written × {v} as MLflow's integer steps (tag {mc.TAG_STEP_SCALE})",
                )
        if run.get("status") == "crashed":
            out[mc.TAG_SOURCE_STATUS] = "crashed"
            self.report.mapped(
                "status-mapped",
                "runs.status",
                f"crashed written as FAILED; original in tag {mc.TAG_SOURCE_STATUS}",
            )
        return out

    def once(self, kind: str, where: str, detail: str) -> None:
        """Report a mapping that applies to many points once per run, not once per batch."""
        if (kind, where, detail) not in self._reported:
            self._reported.add((kind, where, detail))
            self.report.mapped(kind, where, detail)

    def keep_hidden(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch without the source's bookkeeping series, which are kept aside."""
        if not len(self.hidden):
            return batch
        mask = pc.is_in(batch.column("key"), value_set=self.hidden)
        if not pc.any(mask).as_py():
            return batch
        self.kept.append(batch.filter(mask))
        return batch.filter(pc.invert(mask))

    def metric_key(self, original: str) -> str:
        k = self._metric_cache.get(original)
        if k is None:
            system = native.system_metric_key(self.source, original, TRACKER)
            if system is not None:
                k = self._metric_keys.fit(system, original)
                self._metric_cache[original] = k
                self.system_named += 1
                if k != original:
                    self.mapping["metrics"][k] = original
                return k
            k = self._metric_keys.fit(original)
            self._metric_cache[original] = k
            if k != original:
                self.mapping["metrics"][k] = original
                self.report.mapped("key-renamed", f"metrics.{original}", f"written as {k!r}")
        return k
