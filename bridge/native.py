"""Native landing: what makes a migrated run look, in its destination, like a run that
tracker's own users logged, decided once for every writer.

A destination user looks for a value where their tracker puts it: a W&B summary value
is a column of MLflow's runs table only if it is a metric; a machine's CPU load is in
MLflow's System metrics tab only under MLflow's own name for it. The writers use these
rules to put each field there, and record what they added so that their exporter takes
it back out: round trips stay exact.

System metrics have one neutral vocabulary, MLflow's own names (``cpu_utilization_percentage``,
``gpu_0_power_usage_watts``…) extended in the same style for what MLflow does not
measure (``gpu_0_temperature_celsius``). Each tracker declares how its reader spells
them (``Tracker.system_metric``) and how its writer does (``Tracker.system_metric_key``).
A name is translated only where both mean the same thing in the same unit; anything
else keeps its value and gets a readable name, never a converted value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from trackbridge import schema
from trackbridge.tracker import Tracker, registry

# A summary text longer than this stays in the run's private file: a tag is a table cell
SUMMARY_TEXT_CHARS = 250
# Where a summary value goes when its plain name is a history metric with another value
# (the run's last point is what the destination shows under that name)
SUMMARY_PREFIX = "summary/"


def system_of(run_key: str) -> Tracker | None:
    """The tracker a neutral key came from (``wandb:run/…`` → W&B), if it is installed."""
    name = run_key.split(":", 1)[0]
    return next((t for t in registry() if t.name == name), None)


def readable(name: str) -> str:
    """A tracker's own measurement name in the neutral vocabulary's style: lower case,
    words joined by ``_`` (``disk./.usageGB`` → ``disk_usage_gb``)."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return re.sub(r"[^a-z0-9]+", "_", words.lower()).strip("_") or "value"


def system_metric_key(source: Tracker | None, key: str, dest: Tracker) -> str | None:
    """The destination's key for the source's system metric ``key``, or None when
    ``key`` is not one, or either side has no vocabulary for it."""
    if source is None or source.system_metric is None or dest.system_metric_key is None:
        return None
    if source.name == dest.name:
        return None  # a tracker's own names are already native
    neutral = source.system_metric(key)
    return None if neutral is None else dest.system_metric_key(neutral)


def same(a: float, b: float) -> bool:
    """Equal as a runs table shows them: NaN is NaN, and ±inf is the largest finite
    value (MLflow stores infinities so)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    top = 1.7976931348623157e308
    return max(-top, min(top, a)) == max(-top, min(top, b))


@dataclass
class SummaryView:
    """A run's summary as a destination's runs table can show it: numbers as metrics,
    short texts as tags; everything else stays only in the private copy."""

    metrics: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def flat_summary(summary: Any) -> dict[str, Any]:
    """Summary rows by the name W&B's runs table gives them (``val/loss`` + ``min`` →
    ``val/loss.min``), without the tracker's own keys (``_runtime``, ``_wandb``)."""
    out: dict[str, Any] = {}
    for r in summary.to_pylist():
        path = r["path"]
        if not path or path[0].startswith("_"):
            continue
        value = schema.loads_value(r["value_json"])
        for sub, leaf in schema.flatten({path[-1]: value}, tuple(path[:-1])):
            out[".".join(sub)] = leaf
    return out


def summary_view(summary: Any, shown: dict[str, float], history: set[str]) -> SummaryView:
    """What of ``summary`` to show beside the history. ``shown`` is what the destination
    already shows for each history key (its last point), ``history`` the history keys:
    a summary value that equals what is shown adds nothing; one that differs gets
    ``summary/`` in front rather than a point that would rewrite the history."""
    view = SummaryView()
    for name, v in flat_summary(summary).items():
        if isinstance(v, (bool, str)):
            text = ("true" if v else "false") if isinstance(v, bool) else v
            if len(text) <= SUMMARY_TEXT_CHARS and "\n" not in text:
                view.texts[name] = text
            continue
        if not isinstance(v, int | float):
            continue  # media, lists, long texts: in the private copy only
        value = float(v)
        if name in history:
            have = shown.get(name)
            if have is not None and same(have, value):
                continue
            name = SUMMARY_PREFIX + name
        view.metrics[name] = value
    return view


# Artifact types that are models in the source's own words (W&B's ``type="model"``): an
# MLflow destination makes each an MLflow 3 logged model of the run that logged it, so
# the runs table's Models column and the model views list it.
MODEL_TYPES = frozenset({"model"})


def is_model(row: dict[str, Any]) -> bool:
    return (row.get("type") or "") in MODEL_TYPES
