"""Images and tables of another tracker (MLflow's ``log_image`` and ``log_table``) as
``wandb.Image`` and ``wandb.Table`` at their step, so W&B's media panels show them.

A series row is such a value when it is an image or a table whose value is not already
W&B's own media entry (``_type``) and whose file came with the run. The rows as they were
are kept in ``_trackbridge.native_series``, and the reader puts them back in place of
the entries W&B makes, so a round trip is exact; the file stays a run file too.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from trackbridge import schema
from trackbridge.model import FileRef, RunPayload
from trackbridge.report import RunReport
from trackbridge.trackers.wandb import common as wc

KINDS = ("image-file", "table-file")


def foreign_media(payload: RunPayload) -> dict[tuple[str, int], tuple[dict[str, Any], FileRef]]:
    """(key, step) → (series row, its file) of the run's images and tables W&B should draw."""
    files = {f.path: f for a in payload.artifacts if a.row["type"] == "run-files" for f in a.files}
    out = {}
    media = payload.series.filter(pc.is_in(payload.series.column("kind"), value_set=pa.array(KINDS)))
    for r in media.to_pylist():
        if r["file_path"] not in files:
            continue
        value = schema.loads_value(r["value_json"])
        if isinstance(value, dict) and "_type" in value:
            continue  # W&B's own media entry: logged as it is
        out[(r["key"], r["step"])] = (r, files[r["file_path"]])
    return out


def kept_rows(found: dict[tuple[str, int], tuple[dict[str, Any], FileRef]]) -> list[dict[str, Any]]:
    """The rows as they were, for ``_trackbridge.native_series``."""
    return [
        {
            **{k: r[k] for k in ("key", "step", "kind", "value_json", "file_path", "file_sha256")},
            "timestamp": wc.dt_to_seconds(r["timestamp"]),
        }
        for r, _ in found.values()
    ]


def as_wandb(
    values: dict[str, Any],
    step: int,
    found: dict[tuple[str, int], tuple[dict[str, Any], FileRef]],
    stack: contextlib.ExitStack,
    report: RunReport,
) -> dict[str, Any]:
    """A history row with each such value made a ``wandb.Image`` or ``wandb.Table``; the
    files stay open on ``stack`` until the row is logged. A file the SDK cannot read is
    logged as the plain value and reported."""
    import wandb

    out = dict(values)
    for key in values:
        hit = found.get((key, step))
        if hit is None:
            continue
        row, ref = hit
        local = stack.enter_context(ref.fetch())
        try:
            if row["kind"] == "image-file":
                out[key] = wandb.Image(local)
            else:
                with open(local, encoding="utf-8") as fh:
                    doc = json.load(fh)
                out[key] = wandb.Table(columns=doc["columns"], data=doc["data"])
        except Exception as e:  # not a picture or a table the SDK reads: kept as a value
            report.mapped("media-not-shown", f"series.{key}", f"step {step}: {type(e).__name__}: {e}"[:300])
    return out
